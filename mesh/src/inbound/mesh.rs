//! The mesh branch: HTTP from an authenticated caller, forwarded to the app.

use std::{
    convert::Infallible, future::Future, net::SocketAddr, pin::Pin, sync::Arc, time::Duration,
};

use http::{Request, Response, StatusCode};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use ratls::{verifier::peer_identity, VerifiedPeer};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use super::Inbound;
use crate::proxy::{self, Activity, Body, CallerHeaders, IdleIo};

/// How often an idle h2 connection is pinged, and how long the answer may take.
const H2_KEEPALIVE: (Duration, Duration) = (Duration::from_secs(30), Duration::from_secs(20));

/// A connection being served; boxed so the task holds only what serving needs.
pub(super) type Serving = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Set up HTTP on an authenticated connection. A plain function, not an async one: an async
/// fn would keep its arguments (the whole TLS stream) in its state for the connection's life.
pub(super) fn serve(
    inbound: Arc<Inbound>,
    tls: TlsStream<IdleIo<TcpStream>>,
    remote: SocketAddr,
    activity: Arc<Activity>,
) -> Option<Serving> {
    let peer = match peer_identity(tls.get_ref().1) {
        Ok(peer) => Arc::new(peer),
        Err(e) => {
            tracing::warn!(%remote, reason = e.reason(), "mesh caller has no usable identity");
            return None;
        }
    };
    tracing::debug!(%remote, caller = %peer.app_id, "mesh connection");
    let config = &inbound.config;
    let caller = Arc::new(CallerHeaders::new(
        Some(&peer.app_id.to_string()),
        peer.instance_id.as_deref(),
        remote.ip(),
        "https",
    ));
    let service = {
        let inbound = inbound.clone();
        // Boxed per request: hyper keeps one slot per connection for the request future, and
        // an unboxed one would hold its full size on every idle connection.
        service_fn(move |req| Box::pin(handle(inbound.clone(), peer.clone(), caller.clone(), req)))
    };
    // ALPN already chose the protocol. Each is driven in its own box: an HTTP/1.1 connection
    // does not carry the size of h2's state, nor the other way round.
    let idle = config.idle_timeout;
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(tls);
    if h2 {
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX))
            .keep_alive_interval(Some(H2_KEEPALIVE.0))
            .keep_alive_timeout(H2_KEEPALIVE.1);
        let conn = builder.serve_connection(io, service);
        Some(Box::pin(drive(
            conn,
            |c| c.graceful_shutdown(),
            activity,
            idle,
            remote,
        )))
    } else {
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            // Also bounds how long an idle keep-alive connection waits for its next request.
            .header_read_timeout(config.header_timeout)
            .max_buf_size(config.max_header_bytes.max(8192))
            .keep_alive(true)
            .serve_connection(io, service)
            .with_upgrades();
        Some(Box::pin(drive(
            conn,
            |c| c.graceful_shutdown(),
            activity,
            idle,
            remote,
        )))
    }
}

/// Serve a connection until it ends, or until no byte has moved for `idle`; then let it finish
/// what is in flight (a few seconds at most).
async fn drive<C, E>(
    conn: C,
    shutdown: impl FnOnce(Pin<&mut C>),
    activity: Arc<Activity>,
    idle: Duration,
    remote: SocketAddr,
) where
    C: Future<Output = Result<(), E>>,
    E: std::error::Error + 'static,
{
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(%remote, error = %crate::error_chain(&e), "mesh connection ended with an error");
            }
        }
        _ = activity.idle_for(idle) => {
            tracing::debug!(%remote, "mesh connection idle; closing");
            shutdown(conn.as_mut());
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
    }
}

async fn handle(
    inbound: Arc<Inbound>,
    peer: Arc<VerifiedPeer>,
    caller: Arc<CallerHeaders>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    // Answered here, as dstack-vpc's nginx did: health checks never touch the app.
    if req.uri().path() == "/health" {
        return Ok(proxy::text_response(StatusCode::OK, "healthy\n"));
    }
    // Cheap clones (Method is inline for standard methods, Uri shares its bytes): kept for
    // the log line without allocating.
    let (method, uri) = (req.method().clone(), req.uri().clone());
    let result = proxy::forward(&inbound.upstream, req, |headers| caller.apply(headers)).await;
    let path = uri.path();
    Ok(match result {
        Ok(resp) => {
            tracing::debug!(caller = %peer.app_id, %method, %path, status = resp.status().as_u16(), "mesh request");
            resp
        }
        Err(e) => {
            tracing::warn!(caller = %peer.app_id, %method, %path, error = %e, "mesh request failed");
            let short = match e.status() {
                StatusCode::GATEWAY_TIMEOUT => "backend timed out",
                _ => "backend unavailable",
            };
            proxy::error_response(e.status(), short)
        }
    })
}
