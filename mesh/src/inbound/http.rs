//! HTTP from an accepted caller, forwarded to a backend. The mesh branch (an authenticated
//! peer, to the mesh backend) and public domains in `http` mode (anyone, to the domain's
//! backend) share it; what differs between them is in the connection's [`Conn`].

use std::{convert::Infallible, future::Future, pin::Pin, sync::Arc, time::Duration};

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use ratls::VerifiedPeer;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::{
    acme::{evidence::Evidence, Domain},
    config::InboundConfig,
    metrics::PeerMetrics,
    proxy::{
        self, conn::Lifetime, Activity, Body, CallerHeaders, GuardedBody, Hold, Hop, IdleIo,
        Tunnel, Upstream,
    },
    registry::Registry,
};

const X_FORWARDED_HOST: http::HeaderName = http::HeaderName::from_static("x-forwarded-host");

/// A connection being served; boxed so the task holds only what serving needs.
pub(super) type Serving = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Who is on the other end.
pub(super) enum Who {
    /// An authenticated mesh peer.
    Peer(VerifiedPeer),
    /// A public client of this domain.
    Public(Arc<Domain>),
}

/// One accepted connection: who called, where its requests go, and when it must end.
pub(super) struct Conn {
    pub who: Who,
    pub upstream: Upstream,
    /// Evidence files served at `/evidences/` (public domains, when enabled).
    pub evidence: Option<Arc<Evidence>>,
    /// The registry role's `/api/` (mesh callers, when enabled).
    pub registry: Option<Arc<Registry>>,
    /// Identity and forwarding headers every request gets.
    pub headers: CallerHeaders,
    /// This caller's request counters (the peer is fixed for the connection).
    pub metrics: PeerMetrics,
    pub activity: Arc<Activity>,
    /// Its slot under the connection limit and its place in the drain count.
    pub hold: Hold,
    /// When it must end besides its own close.
    pub lifetime: Lifetime,
}

/// What every request of one connection shares.
struct Caller {
    who: Who,
    upstream: Upstream,
    evidence: Option<Arc<Evidence>>,
    registry: Option<Arc<Registry>>,
    headers: CallerHeaders,
    tunnel: Tunnel,
    metrics: PeerMetrics,
    max_header_bytes: usize,
}

/// Serve HTTP/1.1 or h2 (as ALPN chose) on `tls`. A plain function, not an async one: an async
/// fn would keep its arguments (the whole TLS stream) in its state for the connection's life.
pub(super) fn serve(
    conn: Conn,
    tls: TlsStream<IdleIo<TcpStream>>,
    config: &InboundConfig,
) -> Serving {
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    if h2 {
        // h2 PINGs are bytes too: only requests count towards idleness.
        conn.activity.ignore_bytes();
    }
    let caller = Arc::new(Caller {
        who: conn.who,
        upstream: conn.upstream,
        evidence: conn.evidence,
        registry: conn.registry,
        headers: conn.headers,
        tunnel: Tunnel {
            activity: conn.activity,
            idle: config.idle_timeout,
            hold: conn.hold,
        },
        metrics: conn.metrics,
        max_header_bytes: config.max_header_bytes,
    });
    // Boxed per request: hyper keeps one slot per connection for the request future, and an
    // unboxed one would hold its full size on every idle connection.
    let service = service_fn(move |req| Box::pin(handle(caller.clone(), req)));
    let lifetime = conn.lifetime;
    // ALPN already chose the protocol. Each is driven in its own box: an HTTP/1.1 connection
    // does not carry the size of h2's state, nor the other way round.
    let io = TokioIo::new(tls);
    if h2 {
        let conn = proxy::conn::http2(config.max_header_bytes, proxy::conn::H2_MAX_STREAMS)
            .serve_connection(io, service);
        Box::pin(lifetime.drive(conn, |c| c.graceful_shutdown()))
    } else {
        let conn = proxy::conn::http1(config.header_timeout)
            .max_buf_size(config.max_header_bytes.max(8192))
            .serve_connection(io, service)
            .with_upgrades();
        Box::pin(lifetime.drive(conn, |c| c.graceful_shutdown()))
    }
}

/// One request: answered here (head too large, mesh `/health`, the registry, evidence), or
/// forwarded with
/// the caller's identity set and everything it could forge removed.
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
    // The registry's API, for the caller its certificate proved.
    if let (Who::Peer(peer), Some(registry)) = (&caller.who, &caller.registry) {
        if Registry::serves(req.uri().path()) {
            return Ok(registry.handle(peer, req).await);
        }
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
    let forwarded_host = match caller.who {
        Who::Public(_) => requested_host(&req),
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
    caller.metrics.request(
        result
            .as_ref()
            .map_or(true, |r| r.status().is_server_error()),
        started.elapsed(),
    );
    let path = uri.path();
    let (who, kind): (&dyn std::fmt::Display, _) = match &caller.who {
        Who::Peer(peer) => (&peer.app_id, "mesh"),
        Who::Public(domain) => (&domain.config.names[0], "public"),
    };
    let mut resp = match result {
        Ok(resp) => {
            tracing::debug!(caller = %who, kind, %method, %path, status = resp.status().as_u16(), "inbound request");
            resp.map(|body| GuardedBody::new(body, in_flight).boxed())
        }
        Err(e) => {
            let failure = e.failure();
            let detail = format_args!("{kind} caller {who}, {method} {path}: {e}");
            failure.log(Hop::Backend, "inbound request failed", &detail);
            proxy::error_response(failure.status(), failure.short(Hop::Backend))
        }
    };
    // The domain's added headers (HSTS among them), unless the app set its own.
    if let Who::Public(domain) = &caller.who {
        let headers = resp.headers_mut();
        for (name, value) in &domain.config.response_headers {
            headers.entry(name).or_insert_with(|| value.clone());
        }
    }
    Ok(resp)
}

/// The host the client asked for (h2's `:authority` or HTTP/1.1's `Host`), for public domains.
fn requested_host(req: &Request<Incoming>) -> Option<http::HeaderValue> {
    match req.uri().authority() {
        Some(a) => http::HeaderValue::from_str(a.as_str()).ok(),
        None => req.headers().get(http::header::HOST).cloned(),
    }
}

/// How long a caller's certificate still vouches for its connection.
pub(super) fn remaining(not_after: i64) -> Duration {
    Duration::from_secs(u64::try_from(not_after - crate::clock::unix_now()).unwrap_or(0))
}
