//! Pooled, verified connections to peers, per target.
//!
//! A target's connections live in a [`Slot`]: one shared h2 connection when the peer
//! negotiated h2 (another dstack-mesh), where every request is a stream; otherwise idle
//! HTTP/1.1 connections kept alive for reuse (nginx). While a target's protocol is unknown,
//! one dial at a time, so a burst of first requests opens one h2 connection, not one each.
//! WebSocket upgrades need HTTP/1.1 and their connection for good, so they dial an
//! `http/1.1`-only connection of their own.
//!
//! hyper-util's pool is not used: it keys connections by the request's authority and sends that
//! authority as h2's `:authority`, so the app's `Host` could not travel as `:authority`.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, Weak,
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwapOption;
use gateway_client::{ConnectError, Connector, Target, Transport};
use http::{header, uri::Scheme, HeaderValue, Request, Response, Uri, Version};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use ratls::AppId;
use tokio::sync::Semaphore;

use crate::{
    metrics::{Metrics, Side},
    proxy::{self, Body, UpstreamError},
    runtime::Sharded,
};

/// How long an h2 PING may go unanswered before the connection is dropped.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Idle HTTP/1.1 connections kept per target.
const MAX_IDLE_PER_TARGET: usize = 64;
/// Requests in flight to all peers at once; more wait within the response deadline.
const MAX_IN_FLIGHT: usize = 8192;
/// How often idle connections past their time are closed.
const SWEEP_EVERY: Duration = Duration::from_secs(15);

/// Pool settings.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Response-head deadline after the upload.
    pub response_timeout: Duration,
    /// Idle connections close after this.
    pub idle_timeout: Duration,
    /// h2 PING interval.
    pub keepalive_interval: Duration,
}

/// The connector behind the pool; swapped in when gateway discovery succeeds late.
pub(crate) type SharedConnector = Arc<ArcSwapOption<Connector>>;

/// What a pooled connection says about its peer (in each response's extensions).
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// The verified app id (`None` over the gateway's own TLS).
    pub app_id: Option<AppId>,
    /// The verified instance id, when the certificate names one.
    pub instance: Option<String>,
    /// Where the connection went.
    pub address: String,
}

/// Connections to peers, pooled per target.
#[derive(Clone)]
pub struct PeerPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    multiplexed: SharedConnector,
    upgrades: SharedConnector,
    /// Per worker thread: each keeps its own connections, driven by its own reactor.
    slots: Sharded<Mutex<HashMap<Target, Arc<Slot>>>>,
    in_flight: Arc<Semaphore>,
    config: PoolConfig,
    /// Counts each new connection's key exchange group.
    metrics: Arc<Metrics>,
    /// The certificate we present: a connection carries new requests only while the one it
    /// was dialled with is current (the peer ends it when that one expires).
    resolver: ratls::tls::CertResolver,
}

/// One target's connections.
#[derive(Default)]
struct Slot {
    h2: Mutex<Option<Shared>>,
    idle: Mutex<Vec<Idle>>,
    /// The peer answered HTTP/1.1: dial freely, h2 will not come.
    h1_only: AtomicBool,
    /// One dial at a time while the protocol is unknown.
    dialing: tokio::sync::Mutex<()>,
    last_used: Mutex<Option<Instant>>,
}

/// The target's h2 connection, shared by its requests.
struct Shared {
    sender: http2::SendRequest<Body>,
    info: PeerInfo,
    dialled: Dialled,
    /// Tells it from a newer one dialled after it.
    number: u64,
}

struct Idle {
    sender: http1::SendRequest<Body>,
    info: PeerInfo,
    since: Instant,
    dialled: Dialled,
}

/// Which of our identities a connection was dialled with (its expiry; `None`: a fixed key).
type Dialled = Option<i64>;

/// A connection chosen for one request.
enum Conn {
    H1(http1::SendRequest<Body>, Dialled),
    /// With the connection's number, to forget this one and not a newer one.
    H2(http2::SendRequest<Body>, u64),
}

/// Why a request did not get a response head.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PoolError {
    /// No connection could be made.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The exchange on a connection failed; `true` when the connection was new.
    #[error("{0}")]
    Send(#[source] hyper::Error, bool),
    /// A new connection ended with the peer's alert (its refusal of our certificate).
    #[error("{0}")]
    Refused(String),
}

/// How a new h2 connection ended: the peer's TLS alert, when it sent one. TLS 1.3 delivers a
/// refusal of our certificate after the handshake, to the connection's driver; the request
/// itself may see only that the connection closed.
type Ended = tokio::sync::oneshot::Receiver<Option<String>>;

/// How long a request that lost its new connection waits for the driver's reason.
const ENDED_WAIT: Duration = Duration::from_secs(1);

impl std::fmt::Debug for PeerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerPool")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl PeerPool {
    /// A pool over `multiplexed` (offers h2 and http/1.1) and `upgrades` (http/1.1 only).
    pub(crate) fn new(
        multiplexed: SharedConnector,
        upgrades: SharedConnector,
        config: PoolConfig,
        metrics: Arc<Metrics>,
        resolver: ratls::tls::CertResolver,
    ) -> Self {
        let inner = Arc::new(PoolInner {
            multiplexed,
            upgrades,
            slots: Sharded::default(),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            config,
            metrics,
            resolver,
        });
        tokio::spawn(sweep(Arc::downgrade(&inner)));
        Self { inner }
    }

    /// Connections held now: (h2, idle HTTP/1.1).
    pub fn connections(&self) -> (usize, usize) {
        let mut held = (0, 0);
        for slots in self.inner.slots.all() {
            let slots = slots.lock().unwrap_or_else(|p| p.into_inner());
            for slot in slots.values() {
                let has_h2 = slot
                    .h2
                    .lock()
                    .is_ok_and(|c| c.as_ref().is_some_and(|c| !c.sender.is_closed()));
                held.0 += usize::from(has_h2);
                held.1 += slot.idle.lock().map_or(0, |i| i.len());
            }
        }
        held
    }

    /// Send `req` to `target`, called `name` in errors (its URI's path and query are kept;
    /// `host` is its authority). `upgrade` dials a connection of its own, HTTP/1.1 only.
    pub async fn send(
        &self,
        target: &Target,
        name: &str,
        req: Request<Body>,
        host: HeaderValue,
        upgrade: bool,
    ) -> Result<Response<Incoming>, UpstreamError> {
        proxy::exchange(
            |req| {
                self.inner
                    .clone()
                    .request(target.clone(), req, host, upgrade)
            },
            &self.inner.in_flight,
            req,
            self.inner.config.response_timeout,
            name,
            |e| classify(e, target, name),
        )
        .await
    }
}

impl PoolInner {
    fn slot(&self, target: &Target) -> Arc<Slot> {
        let mut slots = self.slots.local().lock().unwrap_or_else(|p| p.into_inner());
        // A lookup first: the key is cloned only for a target's first request.
        if let Some(slot) = slots.get(target) {
            return slot.clone();
        }
        slots.entry(target.clone()).or_default().clone()
    }

    async fn request(
        self: Arc<Self>,
        target: Target,
        req: Request<Body>,
        host: HeaderValue,
        upgrade: bool,
    ) -> Result<Response<Incoming>, PoolError> {
        let slot = self.slot(&target);
        if let Ok(mut used) = slot.last_used.lock() {
            *used = Some(Instant::now());
        }
        // Dialling (a handshake) and the retry are boxed: most requests take a pooled
        // connection, and should not carry (and copy) their state.
        let (conn, info, reused, ended) = match upgrade {
            true => {
                let (conn, info, ended) = Box::pin(self.dial(&target, &slot, true)).await?;
                (conn, info, false, ended)
            }
            false => match slot.checkout(self.resolver.identity_not_after()) {
                Some((conn, info)) => (conn, info, true, None),
                None => {
                    let (conn, info, ended) = Box::pin(self.connect(&target, &slot)).await?;
                    (conn, info, false, ended)
                }
            },
        };
        // On a pooled h2 connection, a copy of a bodiless idempotent request, to send again if
        // the peer refuses its stream unprocessed (HTTP/1.1 hands back an unsent request).
        let (h2_number, replay) = match &conn {
            Conn::H2(_, number) => (
                Some(*number),
                reused.then(|| proxy::replayable(&req)).flatten(),
            ),
            Conn::H1(..) => (None, None),
        };
        match send_on(conn, req, &host, &slot, &info, upgrade).await {
            Ok(resp) => Ok(resp),
            // A pooled connection closed under us before any byte of the request was written
            // (the request is whole), or the peer refused the h2 stream without processing it
            // (RST_STREAM REFUSED_STREAM, or above a graceful GOAWAY's last stream id, as at
            // our certificate's expiry: RFC 9113 §8.7): once more on a fresh connection.
            Err((e, req)) if reused => {
                let unprocessed = unprocessed(&e);
                let Some(req) = req.or(replay.filter(|_| unprocessed)) else {
                    return Err(Box::pin(send_failed(e, false, ended)).await);
                };
                if unprocessed {
                    // The peer is closing that h2 connection: a new one, not it again (and
                    // not a newer one another request dialled meanwhile).
                    if let Ok(mut h2) = slot.h2.lock() {
                        if h2.as_ref().map(|c| c.number) == h2_number {
                            *h2 = None;
                        }
                    }
                }
                tracing::debug!(target = %target, error = %e, "pooled connection was closed; retrying on a fresh one");
                Box::pin(self.retry(&target, &slot, req, &host, upgrade)).await
            }
            Err((e, _)) => Err(Box::pin(send_failed(e, !reused, ended)).await),
        }
    }

    /// The request once more, on a fresh connection.
    async fn retry(
        &self,
        target: &Target,
        slot: &Arc<Slot>,
        req: Request<Body>,
        host: &HeaderValue,
        upgrade: bool,
    ) -> Result<Response<Incoming>, PoolError> {
        let (conn, info, ended) = self.connect(target, slot).await?;
        match send_on(conn, req, host, slot, &info, upgrade).await {
            Ok(resp) => Ok(resp),
            Err((e, _)) => Err(send_failed(e, false, ended).await),
        }
    }

    /// A connection for a new request: dial, one at a time until the protocol is known.
    async fn connect(
        &self,
        target: &Target,
        slot: &Slot,
    ) -> Result<(Conn, PeerInfo, Option<Ended>), PoolError> {
        if slot.h1_only.load(Ordering::Relaxed) {
            return self.dial(target, slot, false).await;
        }
        let _dialing = slot.dialing.lock().await;
        // Someone else's dial may have brought the h2 connection meanwhile.
        if let Some((conn, info)) = slot.checkout(self.resolver.identity_not_after()) {
            return Ok((conn, info, None));
        }
        self.dial(target, slot, false).await
    }

    async fn dial(
        &self,
        target: &Target,
        slot: &Slot,
        upgrade: bool,
    ) -> Result<(Conn, PeerInfo, Option<Ended>), PoolError> {
        let connector = match upgrade {
            true => &self.upgrades,
            false => &self.multiplexed,
        }
        .load_full()
        .ok_or_else(|| {
            ConnectError::Config(
                "no gateway is known yet (discovery has not succeeded; set dstack.gateway_domain)"
                    .into(),
            )
        })?;
        // Read before the handshake: a rotation during it leaves the connection old, not new.
        let dialled = self.resolver.identity_not_after();
        let connected = connector.connect(target).await?;
        let group = connected.stream.get_ref().1.negotiated_key_exchange_group();
        self.metrics
            .handshake(Side::Outbound, group.map(|g| g.name()));
        let info = PeerInfo {
            app_id: connected.peer.as_ref().map(|p| p.app_id.clone()),
            instance: connected.peer.and_then(|p| p.instance_id),
            address: connected.route.connect.to_string(),
        };
        if target.transport == Transport::GatewayTls {
            tracing::warn!(target = %target, address = %info.address, "unauthenticated connection through the gateway's own TLS (x-dstack-target-use-tls: false): the peer's identity is not verified");
        } else {
            tracing::debug!(target = %target, address = %info.address, h2 = connected.h2, "peer connection verified");
        }
        let io = TokioIo::new(connected.stream);
        let handshake_failed = |e: hyper::Error| PoolError::Send(e, true);
        if connected.h2 {
            let mut builder = http2::Builder::new(TokioExecutor::new());
            builder
                .timer(TokioTimer::new())
                .keep_alive_interval(self.config.keepalive_interval)
                .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                .keep_alive_while_idle(true);
            let (sender, conn) = builder.handshake(io).await.map_err(handshake_failed)?;
            let name = target.to_string();
            let (ended, ended_rx) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                let alert = match conn.await {
                    Ok(()) => None,
                    Err(e) => {
                        tracing::debug!(target = %name, error = %e, "h2 peer connection ended");
                        alert_in(&e)
                    }
                };
                let _ = ended.send(alert);
            });
            static CONNECTIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let number = CONNECTIONS.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut h2) = slot.h2.lock() {
                *h2 = Some(Shared {
                    sender: sender.clone(),
                    info: info.clone(),
                    dialled,
                    number,
                });
            }
            Ok((Conn::H2(sender, number), info, Some(ended_rx)))
        } else {
            slot.h1_only.store(!upgrade, Ordering::Relaxed);
            let (sender, conn) = http1::Builder::new()
                .handshake(io)
                .await
                .map_err(handshake_failed)?;
            tokio::spawn(async move {
                let _ = conn.with_upgrades().await;
            });
            Ok((Conn::H1(sender, dialled), info, None))
        }
    }
}

/// `e`, from a connection that was `fresh`; when it says only that a new connection closed,
/// the alert the connection's driver saw (if it saw one soon).
async fn send_failed(e: hyper::Error, fresh: bool, ended: Option<Ended>) -> PoolError {
    if let Some(ended) = ended {
        if (e.is_canceled() || e.is_closed()) && alert_in(&e).is_none() {
            if let Ok(Ok(Some(alert))) = tokio::time::timeout(ENDED_WAIT, ended).await {
                return PoolError::Refused(alert);
            }
        }
    }
    PoolError::Send(e, fresh)
}

/// Whether the peer refused the h2 stream without processing it: `REFUSED_STREAM`, or a
/// stream above the last one a graceful GOAWAY (`NO_ERROR`) kept.
fn unprocessed(e: &hyper::Error) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<h2::Error>())
        .is_some_and(|h| {
            h.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h.is_go_away() && h.is_remote() && h.reason() == Some(h2::Reason::NO_ERROR))
        })
}

/// The peer's TLS alert, anywhere in `err`'s chain.
fn alert_in(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut source = Some(err);
    while let Some(err) = source {
        let io = err
            .downcast_ref::<std::io::Error>()
            .or_else(|| err.downcast_ref::<h2::Error>().and_then(h2::Error::get_io));
        if let Some(alert) = io.and_then(received_alert) {
            return Some(alert);
        }
        source = err.source();
    }
    None
}

impl Slot {
    /// A usable pooled connection dialled as `current`: the h2 one, else an idle HTTP/1.1
    /// one. One dialled under an older identity takes no new request (its requests in flight
    /// go on): the peer ends it when that identity expires, and a request sent then would race
    /// the peer's GOAWAY.
    fn checkout(&self, current: Dialled) -> Option<(Conn, PeerInfo)> {
        if let Ok(mut h2) = self.h2.lock() {
            match h2.as_ref() {
                Some(c) if !c.sender.is_closed() && c.dialled == current => {
                    return Some((Conn::H2(c.sender.clone(), c.number), c.info.clone()))
                }
                Some(_) => *h2 = None,
                None => {}
            }
        }
        let mut idle = self.idle.lock().ok()?;
        while let Some(entry) = idle.pop() {
            if entry.sender.is_ready() && entry.dialled == current {
                return Some((Conn::H1(entry.sender, entry.dialled), entry.info));
            }
        }
        None
    }

    /// Keep an HTTP/1.1 connection for the next request.
    fn checkin(&self, sender: http1::SendRequest<Body>, info: PeerInfo, dialled: Dialled) {
        if let Ok(mut idle) = self.idle.lock() {
            // The bound is the pool's, over every thread's shard.
            if idle.len() < MAX_IDLE_PER_TARGET.div_ceil(crate::runtime::shards()) {
                idle.push(Idle {
                    sender,
                    info,
                    since: Instant::now(),
                    dialled,
                });
            }
        }
    }

    /// Close what has been idle for `limit`; whether anything is left.
    fn sweep(&self, limit: Duration) -> bool {
        let now = Instant::now();
        let mut left = false;
        if let Ok(mut idle) = self.idle.lock() {
            idle.retain(|e| now.duration_since(e.since) < limit && !e.sender.is_closed());
            left |= !idle.is_empty();
        }
        let unused = self
            .last_used
            .lock()
            .ok()
            .and_then(|t| *t)
            .is_none_or(|t| now.duration_since(t) >= limit);
        if let Ok(mut h2) = self.h2.lock() {
            if unused || h2.as_ref().is_some_and(|c| c.sender.is_closed()) {
                *h2 = None;
            }
            left |= h2.is_some();
        }
        left
    }
}

/// Send on `conn`; on failure, the request back when none of it was written.
async fn send_on(
    conn: Conn,
    mut req: Request<Body>,
    host: &HeaderValue,
    slot: &Arc<Slot>,
    info: &PeerInfo,
    upgrade: bool,
) -> Result<Response<Incoming>, (hyper::Error, Option<Request<Body>>)> {
    let result = match conn {
        Conn::H2(mut sender, _) => {
            // h2 carries the host as `:authority`; a `Host` beside it is a duplicate to nginx.
            req.headers_mut().remove(header::HOST);
            *req.version_mut() = Version::HTTP_2;
            let path = proxy::path_and_query(req.uri());
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(Scheme::HTTPS);
            parts.authority = host.to_str().ok().and_then(|h| h.parse().ok());
            parts.path_and_query = Some(path);
            if let Ok(uri) = Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
            sender.try_send_request(req).await
        }
        Conn::H1(mut sender, dialled) => {
            req.headers_mut().insert(header::HOST, host.clone());
            *req.version_mut() = Version::HTTP_11;
            let path = proxy::path_and_query(req.uri());
            *req.uri_mut() = Uri::from(path);
            let result = sender.try_send_request(req).await;
            if result.is_ok() && !upgrade {
                // Back to the pool once this exchange is over and the connection can take
                // another request; a closed one is dropped.
                let (slot, info) = (slot.clone(), info.clone());
                tokio::spawn(async move {
                    if std::future::poll_fn(|cx| sender.poll_ready(cx))
                        .await
                        .is_ok()
                    {
                        slot.checkin(sender, info, dialled);
                    }
                });
            }
            result
        }
    };
    match result {
        Ok(mut resp) => {
            resp.extensions_mut().insert(info.clone());
            Ok(resp)
        }
        Err(mut e) => {
            let req = e.take_message();
            Err((e.into_error(), req))
        }
    }
}

/// Close idle connections past their time, and forget targets with nothing left.
async fn sweep(pool: Weak<PoolInner>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(pool) = pool.upgrade() else { return };
        let limit = pool.config.idle_timeout;
        for shard in pool.slots.all() {
            let slots: Vec<(Target, Arc<Slot>)> = match shard.lock() {
                Ok(slots) => slots.iter().map(|(t, s)| (t.clone(), s.clone())).collect(),
                Err(_) => return,
            };
            for (target, slot) in slots {
                if !slot.sweep(limit) && Arc::strong_count(&slot) <= 2 {
                    if let Ok(mut slots) = shard.lock() {
                        slots.remove(&target);
                    }
                }
            }
        }
    }
}

/// The peer's refusal of our certificate, as the caller sees it.
fn refused(upstream: String, alert: &str) -> UpstreamError {
    UpstreamError::Rejected {
        upstream,
        reason: format!(
            "the peer refused this sidecar's certificate ({alert}): is this app on the target's allowlist, under a root it trusts?"
        ),
    }
}

/// A failure as the caller should see it: connect failures by their typed cause, and a peer
/// that refused our certificate (with TLS 1.3 the client learns that only after its
/// handshake, from the peer's alert) as a refusal, not a broken peer.
fn classify(e: &PoolError, target: &Target, name: &str) -> Option<UpstreamError> {
    let upstream = name.to_owned();
    match e {
        PoolError::Connect(connect) => {
            let reason = connect.to_string();
            Some(match connect {
                ConnectError::Timeout { .. } => UpstreamError::ConnectTimeout { upstream, reason },
                ConnectError::Refused { .. } if target.transport == Transport::GatewayTls => {
                    UpstreamError::Connect {
                        upstream,
                        reason: format!("the gateway's certificate is not trusted: {reason}"),
                    }
                }
                ConnectError::Refused { rejection, .. } => UpstreamError::Refused {
                    upstream,
                    rejection: rejection.clone(),
                    reason,
                },
                _ => UpstreamError::Connect { upstream, reason },
            })
        }
        PoolError::Refused(alert) => Some(refused(upstream, alert)),
        PoolError::Send(err, fresh) => {
            if let Some(alert) = alert_in(err) {
                return Some(refused(upstream, &alert));
            }
            // Through a TCP gateway the peer's alert can be lost when the gateway closes first.
            (*fresh && target.transport == Transport::Mesh).then(|| UpstreamError::Failed {
                upstream,
                reason: format!(
                    "{}: the peer closed a new connection after the handshake (a sidecar that does not allow this app refuses it this way)",
                    crate::error_chain(err)
                ),
            })
        }
    }
}

/// The alert a peer ended the connection with. tokio-rustls hands it over as text only
/// (`InvalidData`, rustls's `Display` of `AlertReceived`), so the text is what there is.
pub(crate) fn received_alert(io: &std::io::Error) -> Option<String> {
    if let Some(rustls::Error::AlertReceived(alert)) =
        io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        return Some(format!("TLS alert {alert:?}"));
    }
    let text = io.get_ref()?.to_string();
    (io.kind() == std::io::ErrorKind::InvalidData && text.starts_with("received fatal alert"))
        .then_some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fatal_alerts_are_recognised_by_their_text() {
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "received fatal alert: CertificateUnknown",
        );
        assert!(received_alert(&io).unwrap().contains("CertificateUnknown"));
        let other = std::io::Error::new(std::io::ErrorKind::InvalidData, "bad record mac");
        assert_eq!(received_alert(&other), None);
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(received_alert(&reset), None);
    }
}
