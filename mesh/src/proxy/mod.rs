//! HTTP forwarding shared by the inbound and outbound sides: hop-by-hop headers, streaming
//! bodies, upgrades, and errors that tell the caller who failed without leaking details.

pub mod conn;
mod drain;
mod failure;
mod forward;
mod headers;
mod idle;
mod reclaim;
mod upstream;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};

pub use drain::{Drain, Tracked};
pub use failure::{Blame, Failure, Hop};
pub use forward::{forward, forward_with, is_websocket, Tunnel};
pub use headers::{remove_hop_by_hop, strip_forgeable, CallerHeaders, IDENTITY_HEADERS};
pub use idle::{Activity, GuardedBody, IdleIo, RequestGuard};
pub use reclaim::Reclaim;
pub(crate) use upstream::{exchange, replayable};
pub use upstream::{Upstream, UpstreamConfig, UpstreamError};

/// Any error a body can raise.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type every proxy path uses: streamed, never collected.
pub type Body = BoxBody<Bytes, BoxError>;

/// What a connection holds while it lives: its slot under the connection limit and its place
/// in the drain count (dropped when the connection and every tunnel spliced from it have
/// ended).
pub type Hold = std::sync::Arc<dyn std::any::Any + Send + Sync>;

/// How often a full listener asks its idle connections again to make room.
const RECLAIM_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The next connection on `listener`, once `slots` (the connection limit) has room. Past the
/// limit, callers queue in the kernel backlog; with `reclaim`, the first of them is accepted
/// and waits while idle connections are asked to close for it (only a caller that is there
/// costs an idle one its connection). Accept errors (EMFILE and friends) back off and never
/// end the loop; `None` once `drain` has started (the caller then drops the listener, so new
/// connections are refused) or the limit is closed.
pub async fn accept(
    listener: &tokio::net::TcpListener,
    slots: &std::sync::Arc<tokio::sync::Semaphore>,
    reclaim: Option<&Reclaim>,
    what: &'static str,
    drain: &Drain,
) -> Option<(tokio::net::TcpStream, std::net::SocketAddr, Hold)> {
    let permit = match (slots.clone().try_acquire_owned(), reclaim) {
        (Ok(permit), _) => Some(permit),
        (Err(tokio::sync::TryAcquireError::Closed), _) => return None,
        (Err(tokio::sync::TryAcquireError::NoPermits), Some(_)) => None,
        (Err(tokio::sync::TryAcquireError::NoPermits), None) => tokio::select! {
            permit = slots.clone().acquire_owned() => Some(permit.ok()?),
            _ = drain.started() => return None,
        },
    };
    let (tcp, remote) = loop {
        let accepted = tokio::select! {
            biased;
            _ = drain.started() => return None,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok(accepted) => break accepted,
            Err(e) => {
                tracing::warn!(listener = what, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    };
    // No permit yet only with `reclaim`.
    let permit = match permit {
        Some(permit) => permit,
        None => loop {
            // Room may have come since the first look.
            if let Ok(permit) = slots.clone().try_acquire_owned() {
                break permit;
            }
            if let Some(reclaim) = reclaim {
                tracing::debug!(
                    listener = what,
                    "connection limit reached: closing idle connections"
                );
                reclaim.ask();
            }
            tokio::select! {
                permit = slots.clone().acquire_owned() => break permit.ok()?,
                _ = drain.started() => return None,
                _ = tokio::time::sleep(RECLAIM_EVERY) => {}
            }
        },
    };
    let _ = tcp.set_nodelay(true);
    Some((tcp, remote, std::sync::Arc::new((permit, drain.track()))))
}

/// Serve small local HTTP/1.1 listeners (admin, `:80`) whose answers need no I/O: a connection
/// limit, a header deadline and a deadline on each connection's life.
pub async fn serve_plain<F, Fut>(
    listener: tokio::net::TcpListener,
    what: &'static str,
    max_connections: usize,
    drain: Drain,
    answer: F,
) where
    F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
    const CONNECTION_LIFE: std::time::Duration = std::time::Duration::from_secs(300);
    let answer = std::sync::Arc::new(answer);
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(max_connections));
    while let Some((tcp, remote, hold)) = accept(&listener, &slots, None, what, &drain).await {
        let answer = answer.clone();
        let lifetime = conn::Lifetime {
            expires: CONNECTION_LIFE,
            grace: HEADER_TIMEOUT,
            ..conn::Lifetime::until_drain(what, remote, drain.clone())
        };
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let resp = answer(req);
                async move { Ok::<_, std::convert::Infallible>(resp.await) }
            });
            let conn = conn::http1(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
            lifetime.drive(conn, |c| c.graceful_shutdown()).await;
            drop(hold);
        });
    }
}

/// The size of `req`'s head as an HTTP/1.1 client wrote it: request line, every header line,
/// the blank line. hyper bounds its read buffer only between reads, so a head that arrives in
/// one large read can pass its limit; this is the exact check.
pub fn head_size<B>(req: &http::Request<B>) -> usize {
    let uri = req.uri();
    let target = uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |p| p.as_str().len());
    let request_line = req.method().as_str().len() + 1 + target + 1 + "HTTP/1.1\r\n".len();
    let headers: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + 2 + value.len() + 2)
        .sum();
    request_line + headers + 2
}

/// The path and query of `uri` (`/` when it has none, as in authority-form).
pub fn path_and_query(uri: &http::Uri) -> http::uri::PathAndQuery {
    uri.path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"))
}

/// A complete body (errors, health answers).
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A short JSON error for the caller; the details belong in the log line, not here.
pub fn error_response(status: StatusCode, error: &str) -> Response<Body> {
    json_response(status, serde_json::json!({ "error": error }).to_string())
}

/// A JSON error with its detail, for callers that may know it (the local app, not a peer).
pub fn detailed_error(status: StatusCode, error: &str, detail: &str) -> Response<Body> {
    json_response(
        status,
        serde_json::json!({ "error": error, "detail": detail }).to_string(),
    )
}

/// A JSON answer.
pub fn json_response(status: StatusCode, json: String) -> Response<Body> {
    let mut resp = Response::new(full(json));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// A plain-text answer.
pub fn text_response(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut resp = Response::new(full(text));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}
