//! The mesh branch: HTTP from an authenticated caller, forwarded to the app.

use std::{
    any::Any,
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use ratls::{verifier::peer_identity, VerifiedPeer};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use super::Inbound;
use crate::proxy::{self, Activity, Body, CallerHeaders, GuardedBody, IdleIo, Tunnel};

/// How often an idle h2 connection is pinged, and how long the answer may take.
const H2_KEEPALIVE: (Duration, Duration) = (Duration::from_secs(30), Duration::from_secs(20));
/// Concurrent streams one h2 caller may open.
const H2_MAX_STREAMS: u32 = 128;
/// After an idle or expiry shutdown starts, requests in flight get this long to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// A connection being served; boxed so the task holds only what serving needs.
pub(super) type Serving = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What every request of one connection shares.
struct Caller {
    inbound: Arc<Inbound>,
    peer: VerifiedPeer,
    headers: CallerHeaders,
    tunnel: Tunnel,
}

/// Set up HTTP on an authenticated connection. A plain function, not an async one: an async
/// fn would keep its arguments (the whole TLS stream) in its state for the connection's life.
pub(super) fn serve(
    inbound: Arc<Inbound>,
    tls: TlsStream<IdleIo<TcpStream>>,
    remote: SocketAddr,
    activity: Arc<Activity>,
    hold: Arc<dyn Any + Send + Sync>,
) -> Option<Serving> {
    let peer = match peer_identity(tls.get_ref().1) {
        Ok(peer) => peer,
        Err(e) => {
            tracing::warn!(%remote, reason = e.reason(), "mesh caller has no usable identity");
            return None;
        }
    };
    tracing::debug!(%remote, caller = %peer.app_id, "mesh connection");
    let config = &inbound.config;
    let idle = config.idle_timeout;
    let header_timeout = config.header_timeout;
    let max_header_bytes = config.max_header_bytes;
    // The caller's certificate vouches for this connection only while it is valid.
    let expires = u64::try_from(peer.not_after)
        .ok()
        .and_then(|t| {
            (UNIX_EPOCH + Duration::from_secs(t))
                .duration_since(SystemTime::now())
                .ok()
        })
        .unwrap_or_default();
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    if h2 {
        // h2 PINGs are bytes too: only requests count towards idleness.
        activity.ignore_bytes();
    }
    let caller = Arc::new(Caller {
        headers: CallerHeaders::new(
            Some(&peer.app_id.to_string()),
            peer.instance_id.as_deref(),
            remote.ip(),
            "https",
        ),
        tunnel: Tunnel {
            activity: activity.clone(),
            idle,
            hold,
        },
        peer,
        inbound,
    });
    // Boxed per request: hyper keeps one slot per connection for the request future, and an
    // unboxed one would hold its full size on every idle connection.
    let service = service_fn(move |req| Box::pin(handle(caller.clone(), req)));
    let watch = Watch {
        activity,
        idle,
        expires,
        remote,
    };
    // ALPN already chose the protocol. Each is driven in its own box: an HTTP/1.1 connection
    // does not carry the size of h2's state, nor the other way round.
    let io = TokioIo::new(tls);
    if h2 {
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(H2_MAX_STREAMS)
            .keep_alive_interval(Some(H2_KEEPALIVE.0))
            .keep_alive_timeout(H2_KEEPALIVE.1);
        let conn = builder.serve_connection(io, service);
        Some(Box::pin(watch.drive(conn, |c| c.graceful_shutdown())))
    } else {
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            // Also bounds how long an idle keep-alive connection waits for its next request.
            .header_read_timeout(header_timeout)
            .max_buf_size(max_header_bytes.max(8192))
            .keep_alive(true)
            .serve_connection(io, service)
            .with_upgrades();
        Some(Box::pin(watch.drive(conn, |c| c.graceful_shutdown())))
    }
}

/// When a connection must end besides its own close.
struct Watch {
    activity: Arc<Activity>,
    idle: Duration,
    expires: Duration,
    remote: SocketAddr,
}

impl Watch {
    /// Serve until the connection ends, goes idle, or outlives the caller's certificate; then
    /// let what is in flight finish (within [`SHUTDOWN_GRACE`]).
    async fn drive<C, E>(self, conn: C, shutdown: impl FnOnce(Pin<&mut C>))
    where
        C: Future<Output = Result<(), E>>,
        E: std::error::Error + 'static,
    {
        let remote = self.remote;
        tokio::pin!(conn);
        let why = tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%remote, error = %crate::error_chain(&e), "mesh connection ended with an error");
                }
                return;
            }
            _ = self.activity.idle_for(self.idle) => "idle",
            _ = tokio::time::sleep(self.expires) => "caller certificate expired",
        };
        tracing::debug!(%remote, why, "closing mesh connection");
        shutdown(conn.as_mut());
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
    }
}

async fn handle(caller: Arc<Caller>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    // Answered here, as dstack-vpc's nginx did: health checks never touch the app.
    if req.uri().path() == "/health" {
        return Ok(proxy::text_response(StatusCode::OK, "healthy\n"));
    }
    // In flight until the response body has been sent.
    let in_flight = caller.tunnel.activity.request();
    // Cheap clones (Method is inline for standard methods, Uri shares its bytes): kept for
    // the log line without allocating.
    let (method, uri) = (req.method().clone(), req.uri().clone());
    let upstream = &caller.inbound.upstream;
    let result = proxy::forward(upstream, req, Some(caller.tunnel.clone()), |headers| {
        caller.headers.apply(headers)
    })
    .await;
    let path = uri.path();
    let app_id = &caller.peer.app_id;
    Ok(match result {
        Ok(resp) => {
            tracing::debug!(caller = %app_id, %method, %path, status = resp.status().as_u16(), "mesh request");
            resp.map(|body| GuardedBody::new(body, in_flight).boxed())
        }
        Err(e) => {
            if e.is_callers() {
                tracing::debug!(caller = %app_id, %method, %path, error = %e, "mesh request abandoned");
            } else {
                tracing::warn!(caller = %app_id, %method, %path, error = %e, "mesh request failed");
            }
            let short = match e.status() {
                StatusCode::GATEWAY_TIMEOUT => "backend timed out",
                StatusCode::SERVICE_UNAVAILABLE => "backend busy",
                StatusCode::BAD_REQUEST => "request body incomplete",
                _ => "backend unavailable",
            };
            proxy::error_response(e.status(), short)
        }
    })
}
