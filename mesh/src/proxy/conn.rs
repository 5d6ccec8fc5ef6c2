//! Serving one accepted connection with hyper, the same way on every listener (inbound,
//! outbound, auth, admin, `:80`): the protocol's builder with its deadlines, then
//! [`Lifetime::drive`] until the connection ends, idles, outlives its caller's certificate,
//! or the sidecar drains; then a graceful shutdown that lets requests in flight finish.

use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use hyper::server::conn::{http1, http2};
use hyper_util::{
    rt::{TokioExecutor, TokioTimer},
    server::conn::auto,
};

use super::{Activity, Drain, Reclaim};

/// How often an idle h2 connection is pinged, and how long the answer may take.
pub const H2_KEEPALIVE: (Duration, Duration) = (Duration::from_secs(30), Duration::from_secs(20));
/// After an idle shutdown or a drain starts, requests in flight get this long to finish (a
/// drain's own deadline cuts it off earlier). After an expiry they run to their end.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// HTTP/1.1 with keep-alive; `header_timeout` also bounds how long an idle keep-alive
/// connection waits for its next request.
pub fn http1(header_timeout: Duration) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    builder
}

/// Concurrent h2 streams a client may open on one connection.
pub const H2_MAX_STREAMS: u32 = 128;

/// h2 with keep-alive PINGs, `max_streams` concurrent streams and a header-list limit.
pub fn http2(max_header_bytes: usize, max_streams: u32) -> http2::Builder<TokioExecutor> {
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(max_streams)
        .keep_alive_interval(Some(H2_KEEPALIVE.0))
        .keep_alive_timeout(H2_KEEPALIVE.1);
    builder
}

/// HTTP/1.1 or h2 with prior knowledge, whichever the client speaks (the local app's side).
pub fn auto(header_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    // The same h2 bounds as the inbound side: a local app is no more trusted with memory.
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(
            u32::try_from(crate::config::DEFAULT_MAX_HEADER_BYTES).unwrap_or(u32::MAX),
        )
        .max_concurrent_streams(H2_MAX_STREAMS);
    builder
}

const EXPIRED: &str = "caller certificate expired";

/// When a served connection must end besides its own close.
#[derive(Clone)]
pub struct Lifetime {
    /// Which listener (for the log).
    pub listener: &'static str,
    /// The peer (for the log).
    pub remote: SocketAddr,
    /// The connection's activity and how long it may idle; `None`: never idle.
    pub idle: Option<(Arc<Activity>, Duration)>,
    /// The listener's idle connections, closed when it is full (with `idle` only).
    pub reclaim: Option<Arc<Reclaim>>,
    /// How long the connection may live at most (a caller's certificate's remaining validity).
    pub expires: Duration,
    /// SIGTERM.
    pub drain: Drain,
    /// How long requests in flight get once a shutdown starts.
    pub grace: Duration,
}

impl std::fmt::Debug for Lifetime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lifetime")
            .field("listener", &self.listener)
            .field("remote", &self.remote)
            .finish_non_exhaustive()
    }
}

impl Lifetime {
    /// A connection that ends only by itself or by the drain.
    pub fn until_drain(listener: &'static str, remote: SocketAddr, drain: Drain) -> Self {
        Self {
            listener,
            remote,
            idle: None,
            reclaim: None,
            expires: Duration::MAX,
            drain,
            grace: SHUTDOWN_GRACE,
        }
    }

    /// Serve `conn` until it ends, goes idle, expires or the sidecar drains; then `shutdown`
    /// it gracefully and let what is in flight finish within the grace period.
    pub async fn drive<C, E>(self, conn: C, shutdown: impl FnOnce(Pin<&mut C>))
    where
        C: Future<Output = Result<(), E>>,
        E: Into<super::BoxError>,
    {
        let (listener, remote) = (self.listener, self.remote);
        tokio::pin!(conn);
        let idle = async {
            match &self.idle {
                Some((activity, limit)) => activity.idle_for(*limit).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(idle);
        let reclaimed = async {
            match (&self.reclaim, &self.idle) {
                (Some(reclaim), Some((activity, _))) => reclaim.picked(activity).await,
                _ => std::future::pending().await,
            }
        };
        tokio::pin!(reclaimed);
        let why = tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    let e: super::BoxError = e.into();
                    tracing::debug!(listener, %remote, error = %crate::error_chain(e.as_ref()), "connection ended with an error");
                }
                return;
            }
            _ = &mut idle => "idle",
            _ = &mut reclaimed => "listener full",
            _ = tokio::time::sleep(self.expires) => EXPIRED,
            _ = self.drain.started() => "shutting down",
        };
        tracing::debug!(listener, %remote, why, "closing connection");
        shutdown(conn.as_mut());
        let cut_off = async {
            if why == EXPIRED {
                // Requests in flight were authorized when they began: they run to their end
                // unless they stall (no body frame either way for the idle limit) or the
                // sidecar drains; only new requests need a valid certificate.
                let stalled = async {
                    match &self.idle {
                        Some((activity, limit)) => activity.quiet_for(*limit).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = stalled => return,
                    _ = self.drain.started() => {}
                }
            }
            tokio::time::sleep(self.grace).await;
        };
        tokio::select! {
            _ = conn => {}
            _ = cut_off => tracing::debug!(listener, %remote, why, "requests in flight cut off"),
        }
    }
}
