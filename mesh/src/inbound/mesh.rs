//! HTTP from a caller, forwarded to a backend: the mesh branch (an authenticated peer, to the
//! mesh backend) and the public-domain branch in `http` mode (anyone, to the domain's backend).

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
use crate::{
    acme::Domain,
    proxy::{self, Activity, Body, CallerHeaders, GuardedBody, IdleIo, Tunnel, Upstream},
};

const X_FORWARDED_HOST: http::HeaderName = http::HeaderName::from_static("x-forwarded-host");
/// How often an idle h2 connection is pinged, and how long the answer may take.
const H2_KEEPALIVE: (Duration, Duration) = (Duration::from_secs(30), Duration::from_secs(20));
/// Concurrent streams one h2 caller may open.
const H2_MAX_STREAMS: u32 = 128;
/// After an idle or expiry shutdown starts, requests in flight get this long to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// A connection being served; boxed so the task holds only what serving needs.
pub(super) type Serving = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Who is on the other end.
enum Who {
    /// An authenticated mesh peer.
    Peer(VerifiedPeer),
    /// A public client of this domain.
    Public(Arc<Domain>),
}

/// What every request of one connection shares.
struct Caller {
    upstream: Upstream,
    who: Who,
    /// Evidence files served at `/evidences/` (public domains, when enabled).
    evidence: Option<Arc<crate::acme::evidence::Evidence>>,
    headers: CallerHeaders,
    tunnel: Tunnel,
    /// This caller's request counters (the peer is fixed for the connection).
    metrics: crate::metrics::PeerMetrics,
    /// Largest request head accepted.
    max_header_bytes: usize,
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
    // The caller's certificate vouches for this connection only while it is valid.
    let expires = u64::try_from(peer.not_after)
        .ok()
        .and_then(|t| {
            (UNIX_EPOCH + Duration::from_secs(t))
                .duration_since(SystemTime::now())
                .ok()
        })
        .unwrap_or_default();
    let headers = CallerHeaders::new(
        Some(&peer.app_id.to_string()),
        peer.instance_id.as_deref(),
        remote.ip(),
        "https",
    );
    let upstream = inbound.upstream.clone();
    Some(serve_http(
        &inbound,
        Who::Peer(peer),
        None,
        upstream,
        headers,
        tls,
        remote,
        activity,
        hold,
        expires,
    ))
}

/// Serve a public domain in `http` mode: anyone may call; the backend learns the client's
/// address, scheme and host from `x-forwarded-*` (the client's own copies removed).
pub(super) fn serve_public(
    inbound: &Inbound,
    public: &super::PublicSide,
    domain: Arc<Domain>,
    tls: TlsStream<IdleIo<TcpStream>>,
    remote: SocketAddr,
    activity: Arc<Activity>,
    hold: Arc<dyn Any + Send + Sync>,
) -> Option<Serving> {
    let upstream = public.upstreams.get(domain.name())?.clone();
    let evidence = public.acme.as_ref().and_then(|a| a.evidence_served());
    let headers = CallerHeaders::new(None, None, remote.ip(), "https");
    Some(serve_http(
        inbound,
        Who::Public(domain),
        evidence,
        upstream,
        headers,
        tls,
        remote,
        activity,
        hold,
        Duration::MAX,
    ))
}

#[allow(clippy::too_many_arguments)]
fn serve_http(
    inbound: &Inbound,
    who: Who,
    evidence: Option<Arc<crate::acme::evidence::Evidence>>,
    upstream: Upstream,
    headers: CallerHeaders,
    tls: TlsStream<IdleIo<TcpStream>>,
    remote: SocketAddr,
    activity: Arc<Activity>,
    hold: Arc<dyn Any + Send + Sync>,
    expires: Duration,
) -> Serving {
    let config = &inbound.config;
    let idle = config.idle_timeout;
    let header_timeout = config.header_timeout;
    let max_header_bytes = config.max_header_bytes;
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    if h2 {
        // h2 PINGs are bytes too: only requests count towards idleness.
        activity.ignore_bytes();
    }
    let label = match &who {
        Who::Peer(peer) => peer.app_id.to_string(),
        Who::Public(domain) => domain.name().to_owned(),
    };
    let metrics = inbound
        .metrics
        .peer(crate::metrics::Direction::Inbound, &label);
    let caller = Arc::new(Caller {
        metrics,
        headers,
        tunnel: Tunnel {
            activity: activity.clone(),
            idle,
            hold,
        },
        who,
        evidence,
        upstream,
        max_header_bytes,
    });
    // Boxed per request: hyper keeps one slot per connection for the request future, and an
    // unboxed one would hold its full size on every idle connection.
    let service = service_fn(move |req| Box::pin(handle(caller.clone(), req)));
    let watch = Watch {
        activity,
        idle,
        expires,
        remote,
        drain: inbound.drain.clone(),
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
        Box::pin(watch.drive(conn, |c| c.graceful_shutdown()))
    } else {
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            // Also bounds how long an idle keep-alive connection waits for its next request.
            .header_read_timeout(header_timeout)
            .max_buf_size(max_header_bytes.max(8192))
            .keep_alive(true)
            .serve_connection(io, service)
            .with_upgrades();
        Box::pin(watch.drive(conn, |c| c.graceful_shutdown()))
    }
}

/// When a connection must end besides its own close.
struct Watch {
    activity: Arc<Activity>,
    idle: Duration,
    expires: Duration,
    remote: SocketAddr,
    drain: proxy::Drain,
}

impl Watch {
    /// Serve until the connection ends, goes idle, outlives the caller's certificate, or the
    /// sidecar drains; then let what is in flight finish (within [`SHUTDOWN_GRACE`]; a drain's
    /// own deadline cuts it off earlier).
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
                    tracing::debug!(%remote, error = %crate::error_chain(&e), "inbound connection ended with an error");
                }
                return;
            }
            _ = self.activity.idle_for(self.idle) => "idle",
            _ = tokio::time::sleep(self.expires) => "caller certificate expired",
            _ = self.drain.started() => "shutting down",
        };
        tracing::debug!(%remote, why, "closing inbound connection");
        shutdown(conn.as_mut());
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
    }
}

async fn handle(caller: Arc<Caller>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    // h2 bounds its header list itself (`max_header_list_size`).
    if req.version() != http::Version::HTTP_2 && proxy::head_size(&req) > caller.max_header_bytes {
        tracing::debug!(
            limit = caller.max_header_bytes,
            "inbound request head too large"
        );
        return Ok(proxy::error_response(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request head too large",
        ));
    }
    // Answered here, as dstack-vpc's nginx did: mesh health checks never touch the app.
    if matches!(caller.who, Who::Peer(_)) && req.uri().path() == "/health" {
        return Ok(proxy::text_response(StatusCode::OK, "healthy\n"));
    }
    if let Some(answer) = caller
        .evidence
        .as_ref()
        .and_then(|e| e.answer(req.uri().path()))
    {
        return Ok(answer);
    }
    // In flight until the response body has been sent.
    let in_flight = caller.tunnel.activity.request();
    let started = std::time::Instant::now();
    // Cheap clones (Method is inline for standard methods, Uri shares its bytes): kept for
    // the log line without allocating.
    let (method, uri) = (req.method().clone(), req.uri().clone());
    // The host the client asked for (h2's :authority or HTTP/1.1's Host), for public domains.
    let forwarded_host = match caller.who {
        Who::Public(_) => uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                req.headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .and_then(|h| http::HeaderValue::from_str(&h).ok()),
        Who::Peer(_) => None,
    };
    let result = proxy::forward(
        &caller.upstream,
        req,
        Some(caller.tunnel.clone()),
        |headers| {
            caller.headers.apply(headers);
            if let Some(host) = forwarded_host {
                headers.insert(X_FORWARDED_HOST, host);
            }
        },
    )
    .await;
    let path = uri.path();
    let who: &dyn std::fmt::Display = match &caller.who {
        Who::Peer(peer) => &peer.app_id,
        Who::Public(domain) => &domain.config.names[0],
    };
    let kind = match caller.who {
        Who::Peer(_) => "mesh",
        Who::Public(_) => "public",
    };
    caller.metrics.request(
        result
            .as_ref()
            .map_or(true, |r| r.status().is_server_error()),
        started.elapsed(),
    );
    Ok(match result {
        Ok(resp) => {
            tracing::debug!(caller = %who, kind, %method, %path, status = resp.status().as_u16(), "inbound request");
            resp.map(|body| GuardedBody::new(body, in_flight).boxed())
        }
        Err(e) => {
            if e.is_callers() {
                tracing::debug!(caller = %who, kind, %method, %path, error = %e, "inbound request abandoned");
            } else {
                tracing::warn!(caller = %who, kind, %method, %path, error = %e, "inbound request failed");
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
