//! A pooled HTTP/1.1 client for one upstream (the local app): connect deadline, response-head
//! deadline, keep-alive reuse, upgrades.
//!
//! The pool is our own, not hyper-util's: one upstream needs no map of hosts, and a connection
//! goes back to the pool when its response body has been read to the end, with no task spawned
//! per request to wait for that (hyper-util's costs a task, a channel and a hashed lookup on
//! every request).

use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, Weak,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame};
use http_body_util::BodyExt;
use hyper::{
    body::Incoming,
    client::conn::http1::{self, SendRequest},
};
use tokio::sync::{Notify, Semaphore};

use http::{header, HeaderValue, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;

use super::{Body, BoxError};
use crate::runtime::Sharded;

/// Deadlines and pool size of an upstream.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    /// TCP connect deadline.
    pub connect_timeout: Duration,
    /// Deadline for the response head (status and headers); bodies stream without one.
    pub response_timeout: Duration,
    /// An idle pooled connection is closed after this.
    pub pool_idle_timeout: Duration,
    /// Idle connections kept per upstream.
    pub max_idle: usize,
    /// Requests at the upstream at once.
    pub max_in_flight: usize,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(60),
            pool_idle_timeout: Duration::from_secs(90),
            max_idle: 256,
            max_in_flight: 4096,
        }
    }
}

/// Why the upstream gave no response.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// Could not connect (down, refused, connect deadline).
    #[error("upstream {upstream} unreachable: {reason}")]
    Connect {
        /// The upstream.
        upstream: String,
        /// Why.
        reason: String,
    },
    /// Connecting (TCP or TLS handshake) did not finish in time.
    #[error("upstream {upstream}: {reason}")]
    ConnectTimeout {
        /// The upstream.
        upstream: String,
        /// Which step and how long.
        reason: String,
    },
    /// The peer is not the one asked for: refused inside the handshake, nothing was sent.
    #[error("upstream {upstream} refused: {reason}")]
    Refused {
        /// The upstream.
        upstream: String,
        /// The rule the peer's certificate broke (its `reason()` labels metrics).
        rejection: ratls::Rejection,
        /// The whole story, with the address dialled.
        reason: String,
    },
    /// The peer refused us (our certificate) after the handshake.
    #[error("upstream {upstream} refused this caller: {reason}")]
    Rejected {
        /// The upstream.
        upstream: String,
        /// Why, as far as we can tell.
        reason: String,
    },
    /// Connected, but no response head within the deadline.
    #[error("upstream {upstream} sent no response within {timeout:?}")]
    Timeout {
        /// The upstream.
        upstream: String,
        /// The deadline.
        timeout: Duration,
    },
    /// Too many requests at the upstream already; none freed up within the deadline.
    #[error("upstream {upstream} is at its limit of requests in flight")]
    Busy {
        /// The upstream.
        upstream: String,
    },
    /// The caller's request body failed mid-way (it went away): nothing to answer.
    #[error("the caller abandoned its request body")]
    CallerAborted,
    /// The exchange failed (connection reset, malformed response, ...).
    #[error("upstream {upstream} failed: {reason}")]
    Failed {
        /// The upstream.
        upstream: String,
        /// Why.
        reason: String,
    },
}

/// One upstream `host:port` with a connection pool.
#[derive(Clone, Debug)]
pub struct Upstream {
    pool: Arc<Pool>,
    in_flight: Arc<Semaphore>,
    authority: http::uri::Authority,
    config: UpstreamConfig,
}

impl Upstream {
    /// A pool for `authority` (`host:port`).
    pub fn new(authority: &str, config: UpstreamConfig) -> Result<Self, http::Error> {
        let authority: http::uri::Authority = authority.parse().map_err(http::Error::from)?;
        Ok(Self {
            pool: Arc::new(Pool {
                authority: authority.clone(),
                config: config.clone(),
                idle: Sharded::default(),
                reaping: AtomicBool::new(false),
            }),
            in_flight: Arc::new(Semaphore::new(config.max_in_flight.max(1))),
            authority,
            config,
        })
    }

    /// Send `req` (its URI's path and query are kept) as HTTP/1.1. A `Host` the caller named is
    /// kept; else the URI's authority becomes it.
    pub async fn send(
        &self,
        mut req: Request<Body>,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        if !req.headers().contains_key(header::HOST) {
            if let Some(host) = req
                .uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            {
                req.headers_mut().insert(header::HOST, host);
            }
        }
        // Origin form (`/path?query`) on the request line, as to any origin server.
        *req.uri_mut() = Uri::from(super::path_and_query(req.uri()));
        *req.version_mut() = Version::HTTP_11;

        // A safe request without a body can be sent again if the connection was closed or
        // reset under it before any answer: a backend's keep-alive close racing it. Only safe
        // methods: the backend may have acted on the request before it closed.
        let replay = req.method().is_safe().then(|| replayable(&req)).flatten();
        let pool = &self.pool;
        exchange(
            |req| async move {
                match (pool.request(req).await, replay) {
                    (Err(PoolError::Exchange(e)), Some(again)) if closed_under_request(&e) => {
                        tracing::debug!(upstream = %self.authority, error = %crate::error_chain(&e), "the backend closed a kept-alive connection under a request: sending it again");
                        pool.request(again).await
                    }
                    (result, _) => result,
                }
            },
            &self.in_flight,
            req,
            self.config.response_timeout,
            self.authority.as_str(),
            |e: &PoolError| match e {
                PoolError::Connect(reason) => Some(UpstreamError::Connect {
                    upstream: self.authority.to_string(),
                    reason: reason.clone(),
                }),
                PoolError::Exchange(_) => None,
            },
        )
        .await
    }

    /// `host:port` of the upstream.
    pub fn authority(&self) -> &str {
        self.authority.as_str()
    }
}

/// A copy of `req` to send again, if it is idempotent (RFC 9110 §9.2.2) and has no body.
pub(crate) fn replayable(req: &Request<Body>) -> Option<Request<Body>> {
    if !req.method().is_idempotent() || !req.body().is_end_stream() {
        return None;
    }
    let mut copy = Request::new(super::full(Bytes::new()));
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

/// How long a kept-alive connection may take to be ready for its next request.
const READY_WAIT: Duration = Duration::from_millis(100);

/// Kept-alive HTTP/1.1 connections to one upstream, the most recently used last; one list per
/// worker thread (a connection is driven by the reactor of the thread that dialled it).
#[derive(Debug)]
struct Pool {
    authority: http::uri::Authority,
    config: UpstreamConfig,
    idle: Sharded<Mutex<Vec<Idle>>>,
    /// Whether the task closing connections idle past `pool_idle_timeout` runs.
    reaping: AtomicBool,
}

#[derive(Debug)]
struct Idle {
    sender: SendRequest<Body>,
    since: Instant,
}

/// Why the pool gave no response.
#[derive(Debug, thiserror::Error)]
enum PoolError {
    /// No connection: the TCP connect failed or took too long.
    #[error("{0}")]
    Connect(String),
    /// The exchange on a connection failed.
    #[error(transparent)]
    Exchange(hyper::Error),
}

impl Pool {
    /// `req` on a kept-alive connection, else on a new one; a request a kept-alive connection
    /// closed before taking (hyper hands it back unsent) goes on a new one.
    async fn request(
        self: &Arc<Self>,
        req: Request<Body>,
    ) -> Result<Response<PooledBody>, PoolError> {
        let (mut sender, reused) = match self.checkout().await {
            Some(sender) => (sender, true),
            None => (self.dial().await?, false),
        };
        let resp = match sender.try_send_request(req).await {
            Ok(resp) => resp,
            Err(mut e) => match e.take_message() {
                Some(req) if reused => {
                    drop(sender);
                    sender = self.dial().await?;
                    sender
                        .send_request(req)
                        .await
                        .map_err(PoolError::Exchange)?
                }
                _ => return Err(PoolError::Exchange(e.into_error())),
            },
        };
        // An upgraded connection belongs to its tunnel from now on.
        let keep = (resp.status() != StatusCode::SWITCHING_PROTOCOLS).then_some(sender);
        Ok(resp.map(|body| PooledBody::new(body, keep, Arc::downgrade(self))))
    }

    /// The most recently used idle connection that is still open and ready.
    async fn checkout(&self) -> Option<SendRequest<Body>> {
        loop {
            let mut idle = (self.idle.local().lock())
                .unwrap_or_else(|p| p.into_inner())
                .pop()?;
            if idle.sender.is_closed() || idle.since.elapsed() >= self.config.pool_idle_timeout {
                continue;
            }
            if idle.sender.is_ready() {
                return Some(idle.sender);
            }
            // Its last response was read to the end, but hyper's side of the connection may
            // need a moment to be ready for the next (or find it closed). A moment only.
            if let Ok(Ok(())) = tokio::time::timeout(READY_WAIT, idle.sender.ready()).await {
                return Some(idle.sender);
            }
        }
    }

    /// A new connection, its driver spawned.
    async fn dial(&self) -> Result<SendRequest<Body>, PoolError> {
        let timeout = self.config.connect_timeout;
        let tcp = match tokio::time::timeout(
            timeout,
            tokio::net::TcpStream::connect(self.authority.as_str()),
        )
        .await
        {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Err(PoolError::Connect(format!("tcp connect error: {e}"))),
            Err(_) => {
                return Err(PoolError::Connect(format!(
                    "tcp connect timed out after {timeout:?}"
                )))
            }
        };
        let _ = tcp.set_nodelay(true);
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(PoolError::Exchange)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(sender)
    }

    /// Keep `sender` for the next request, within `max_idle`.
    fn checkin(self: Arc<Self>, sender: SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        {
            let mut idle = self.idle.local().lock().unwrap_or_else(|p| p.into_inner());
            // `max_idle` bounds the whole pool.
            if idle.len() >= self.config.max_idle.div_ceil(self.idle.len()) {
                // The longest idle goes (dropping its sender closes the connection).
                idle.remove(0);
            }
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
        if !self.reaping.swap(true, Ordering::Relaxed) {
            tokio::spawn(reap(Arc::downgrade(&self)));
        }
    }
}

/// Close the pool's connections idle past `pool_idle_timeout`, until the pool is gone.
async fn reap(pool: Weak<Pool>) {
    loop {
        let Some(period) = pool.upgrade().map(|p| p.config.pool_idle_timeout) else {
            return;
        };
        tokio::time::sleep(period / 2).await;
        let Some(pool) = pool.upgrade() else { return };
        for idle in pool.idle.all() {
            let mut idle = idle.lock().unwrap_or_else(|p| p.into_inner());
            idle.retain(|i| !i.sender.is_closed() && i.since.elapsed() < period);
        }
    }
}

/// A response body from the pool: once read to the end, its connection goes back to the pool
/// (an HTTP/1.1 connection carries one exchange at a time). Dropped before the end, the
/// connection is not reused.
pub struct PooledBody {
    body: Incoming,
    keep: Option<(SendRequest<Body>, Weak<Pool>)>,
}

impl PooledBody {
    fn new(body: Incoming, sender: Option<SendRequest<Body>>, pool: Weak<Pool>) -> Self {
        let mut this = Self {
            body,
            keep: sender.map(|s| (s, pool)),
        };
        // A response without a body (HEAD, 204, 304, a zero length) is whole already.
        if this.body.is_end_stream() {
            this.give_back();
        }
        this
    }

    fn give_back(&mut self) {
        if let Some((sender, pool)) = self.keep.take() {
            if let Some(pool) = pool.upgrade() {
                pool.checkin(sender);
            }
        }
    }
}

impl HttpBody for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.give_back(),
            // The last byte of a body of known length: readers stop here without asking
            // again (hyper's server among them).
            Poll::Ready(Some(Ok(_))) if self.body.is_end_stream() => self.give_back(),
            Poll::Ready(Some(Err(_))) => self.keep = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl std::fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBody").finish_non_exhaustive()
    }
}

/// Whether the connection ended before any of the response came: closed or reset by the
/// backend (an idle close racing the request), never a response that broke mid-way.
fn closed_under_request(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() || e.is_canceled() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_canceled() {
                return true;
            }
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ) {
                return true;
            }
        }
        source = err.source();
    }
    false
}

/// Send `req` on `client`: wait for a slot under `in_flight`, then for the response head
/// within `timeout` counted from the end of the upload. `classify` turns the client's own
/// errors (connect failures above all) into typed ones; the rest are `Failed`.
pub(crate) async fn exchange<F, E, B>(
    send: impl FnOnce(Request<Body>) -> F,
    in_flight: &Arc<Semaphore>,
    req: Request<Body>,
    timeout: Duration,
    upstream: &str,
    classify: impl FnOnce(&E) -> Option<UpstreamError>,
) -> Result<Response<B>, UpstreamError>
where
    F: std::future::Future<Output = Result<Response<B>, E>>,
    E: std::error::Error + 'static,
{
    // A bounded number of requests at the upstream at once: past it, callers wait (within
    // the response deadline) instead of exhausting file descriptors for everyone.
    let _slot = match tokio::time::timeout(timeout, in_flight.clone().acquire_owned()).await {
        Ok(Ok(slot)) => slot,
        _ => {
            return Err(UpstreamError::Busy {
                upstream: upstream.to_owned(),
            })
        }
    };
    // The response deadline starts when the request body has been sent: a slow upload is
    // the caller's pace, not a slow upstream.
    let (req, sent) = watch_body(req);
    let exchange = send(req);
    tokio::pin!(exchange);
    let deadline = async {
        sent.ended.notified().await;
        tokio::time::sleep(timeout).await;
    };
    let result = tokio::select! {
        result = &mut exchange => result,
        _ = deadline => return Err(UpstreamError::Timeout { upstream: upstream.to_owned(), timeout }),
    };
    match result {
        Ok(resp) => Ok(resp),
        Err(e) => {
            if let Some(typed) = classify(&e) {
                return Err(typed);
            }
            // The caller's own body failed (it went away mid-upload): its doing, not ours.
            if sent.caller_failed.load(Ordering::Relaxed) {
                return Err(UpstreamError::CallerAborted);
            }
            Err(UpstreamError::Failed {
                upstream: upstream.to_owned(),
                reason: crate::error_chain(&e),
            })
        }
    }
}

/// What the request body reports while it is sent.
#[derive(Debug, Default)]
struct SendState {
    ended: Notify,
    caller_failed: AtomicBool,
}

/// Wrap the request body so the sender learns when it has been sent in full, or failed.
fn watch_body(req: Request<Body>) -> (Request<Body>, Arc<SendState>) {
    let state = Arc::new(SendState::default());
    if req.body().is_end_stream() {
        // Nothing to send: the response deadline runs from now, whoever sends it (a request
        // sent again after a closed connection is not watched).
        state.ended.notify_one();
    }
    let req = req.map(|body| {
        WatchedBody {
            inner: body,
            state: state.clone(),
            done: AtomicBool::new(false),
        }
        .boxed()
    });
    (req, state)
}

struct WatchedBody {
    inner: Body,
    state: Arc<SendState>,
    done: AtomicBool,
}

impl WatchedBody {
    fn finish(&self) {
        if !self.done.swap(true, Ordering::Relaxed) {
            self.state.ended.notify_one();
        }
    }
}

impl HttpBody for WatchedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.finish(),
            Poll::Ready(Some(Err(_))) => {
                self.state.caller_failed.store(true, Ordering::Relaxed);
                self.finish();
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        // hyper never polls a body that says it is empty: the end is now.
        let end = self.inner.is_end_stream();
        if end {
            self.finish();
        }
        end
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Join two upgraded connections (client side and upstream side) until either closes or the
/// tunnel is idle; the tunnel's hold lives until then.
pub(crate) async fn splice_upgrades(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    tunnel: super::forward::Tunnel,
) {
    match tokio::try_join!(client, upstream) {
        Ok((client, upstream)) => {
            let mut client = TokioIo::new(client);
            let mut upstream = TokioIo::new(upstream);
            tokio::select! {
                ended = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
                    if let Err(e) = ended {
                        tracing::debug!(error = %e, "upgraded connection ended");
                    }
                }
                _ = tunnel.activity.idle_for(tunnel.idle) => {
                    tracing::debug!("upgraded connection idle; closing");
                }
            }
        }
        Err(e) => tracing::debug!(error = %e, "upgrade failed"),
    }
    drop(tunnel);
}

#[cfg(test)]
mod tests;
