//! The plain-HTTP listener (`:80`): HTTP-01 key authorizations, and a redirect to https for
//! everything else.

use std::sync::Arc;

use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::net::TcpListener;

use super::challenge::Challenges;
use crate::proxy::{self, Body};

const PREFIX: &str = "/.well-known/acme-challenge/";
const MAX_CONNECTIONS: usize = 1024;

/// Serve `listener` until the future is dropped.
pub async fn serve(listener: TcpListener, challenges: Arc<Challenges>, drain: proxy::Drain) {
    proxy::serve_plain(
        listener,
        "acme.http_listen",
        MAX_CONNECTIONS,
        drain,
        move |req| std::future::ready(answer(&challenges, &req)),
    )
    .await;
}

fn answer(challenges: &Challenges, req: &Request<Incoming>) -> Response<Body> {
    let path = req.uri().path();
    if let Some(token) = path.strip_prefix(PREFIX) {
        return match challenges.http_response(token) {
            Some(key_auth) => {
                let mut resp = Response::new(proxy::full(key_auth));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                );
                resp
            }
            None => proxy::text_response(StatusCode::NOT_FOUND, "no such challenge\n"),
        };
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<http::uri::Authority>().ok());
    let Some(host) = host else {
        return proxy::text_response(StatusCode::BAD_REQUEST, "a Host header is needed\n");
    };
    let location = format!(
        "https://{}{}",
        host.host(),
        proxy::path_and_query(req.uri())
    );
    match HeaderValue::from_str(&location) {
        Ok(value) => {
            let mut resp = proxy::text_response(StatusCode::MOVED_PERMANENTLY, "use https\n");
            resp.headers_mut().insert(header::LOCATION, value);
            resp
        }
        Err(_) => proxy::text_response(StatusCode::BAD_REQUEST, "bad Host header\n"),
    }
}
