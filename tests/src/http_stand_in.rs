//! What the HTTP stand-ins share: a loopback server that hands each request to a handler,
//! JSON answers, the query as pairs, and challenge TXT values mirrored into challtestsrv (so
//! pebble, resolving there, sees what a client published through a provider's API).

use std::{convert::Infallible, future::Future, net::SocketAddr};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

/// Serve `handler` on a free loopback port until the test's runtime ends; the address.
pub async fn serve<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    serve_listener(listener, handler)
}

/// Serve `handler` on `listener` (bound by the caller, who needed its address first) until
/// the test's runtime ends; the address.
pub fn serve_listener<F, Fut>(listener: tokio::net::TcpListener, handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send,
{
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    addr
}

/// Serve a provider's API: each request goes to `handle` with the stand-in's `state`, the
/// token it accepts, and challtestsrv's management URL when records are mirrored there.
pub async fn serve_api<S, H, Fut>(
    state: std::sync::Arc<std::sync::Mutex<S>>,
    token: &str,
    mirror: Option<String>,
    handle: H,
) -> SocketAddr
where
    S: Send + 'static,
    H: Fn(Request<Incoming>, std::sync::Arc<std::sync::Mutex<S>>, String, Option<String>) -> Fut
        + Clone
        + Send
        + Sync
        + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send,
{
    let token = token.to_owned();
    serve(move |req| handle(req, state.clone(), token.clone(), mirror.clone())).await
}

/// A request taken apart.
#[derive(Debug)]
pub struct Taken {
    /// Its method.
    pub method: http::Method,
    /// Its path.
    pub path: String,
    /// Its query, as pairs.
    pub query: Vec<(String, String)>,
    /// It carried `Authorization: Bearer <the token>`.
    pub bearer: bool,
    /// Its body (empty when it could not be read).
    pub body: Bytes,
}

/// `req` taken apart, its bearer token compared with `token`.
pub async fn take(req: Request<Incoming>, token: &str) -> Taken {
    use http_body_util::BodyExt;
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let query = query_pairs(req.uri());
    let bearer = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .is_some_and(|v| v.as_bytes() == format!("Bearer {token}").as_bytes());
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Taken {
        method,
        path,
        query,
        bearer,
        body,
    }
}

/// `body` as a JSON answer with `status` (no body for `Null`).
pub fn json_response(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(match body {
        Value::Null => Bytes::new(),
        b => Bytes::from(b.to_string()),
    }));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        "application/json".parse().unwrap(),
    );
    resp
}

/// The query of `uri` as (key, value) pairs, in order.
pub fn query_pairs(uri: &http::Uri) -> Vec<(String, String)> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Make challtestsrv (`base`, its management API) answer `values` for TXT at `host`: its
/// `/set-txt` adds a value, so the name is cleared and each value set again.
pub async fn mirror_txt(base: String, host: String, values: Vec<String>) {
    tokio::task::spawn_blocking(move || {
        let _ = crate::pebble::post_json(&base, "/clear-txt", &json!({"host": host}));
        for value in values {
            let _ =
                crate::pebble::post_json(&base, "/set-txt", &json!({"host": host, "value": value}));
        }
    })
    .await
    .unwrap();
}

/// Whether `v` is one or more quoted strings of at most 255 bytes, as the record-set APIs
/// (Hetzner, Route53) want TXT values.
pub fn quoted_strings(v: &str) -> bool {
    let mut rest = v.trim();
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let Some(after) = rest.strip_prefix('"') else {
            return false;
        };
        let mut end = None;
        let mut escaped = false;
        for (i, ch) in after.char_indices() {
            match (ch, escaped) {
                ('\\', false) => escaped = true,
                ('"', false) => {
                    end = Some(i);
                    break;
                }
                _ => escaped = false,
            }
        }
        let Some(end) = end else { return false };
        if end > 255 {
            return false;
        }
        rest = after[end + 1..].trim_start();
    }
    true
}

/// `req`'s head and its whole body (empty when it could not be read).
pub async fn parts(req: Request<Incoming>) -> (http::request::Parts, Bytes) {
    use http_body_util::BodyExt;
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    (parts, body)
}
