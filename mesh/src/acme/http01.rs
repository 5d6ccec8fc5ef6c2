//! The plain-HTTP listener (`:80`): HTTP-01 key authorizations, and a redirect to https for
//! everything else.

use std::{convert::Infallible, sync::Arc, time::Duration};

use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};

use super::challenge::Challenges;
use crate::proxy::{self, Body};

const PREFIX: &str = "/.well-known/acme-challenge/";
/// A validation request is tiny; anything slower is not one.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_CONNECTIONS: usize = 1024;

/// Serve `listener` until the future is dropped.
pub async fn serve(listener: TcpListener, challenges: Arc<Challenges>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    while let Some((tcp, _remote, hold)) =
        proxy::accept(&listener, &slots, "acme.http_listen").await
    {
        let challenges = challenges.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let answer = answer(&challenges, &req);
                async move { Ok::<_, Infallible>(answer) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), service);
            let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
            drop(hold);
        });
    }
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
