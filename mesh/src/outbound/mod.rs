//! The outbound proxy: the app sends plain HTTP with `x-dstack-target-*` headers, the proxy
//! forwards it over mutual RA-TLS to the target's sidecar, verified in the handshake.
//!
//! A request's path: parse the routing headers (a bad one is a `400` naming it, nothing
//! dialled) → no target: the guest-agent passthrough → route (gateway name, fixed or static
//! address) → a pooled connection to the target, h2-multiplexed when the peer offers it → strip
//! routing and hop-by-hop headers → stream both bodies; WebSocket upgrades are spliced.

pub(crate) mod agent;
mod pool;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use arc_swap::{ArcSwap, ArcSwapOption};
use gateway_client::{
    target::strip_routing_headers, Addressing, Connector, ConnectorConfig, StaticRoutes, Target,
    Transport,
};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use ratls::{tls::CertResolver, TrustAnchors};
use tokio::{net::TcpListener, sync::Semaphore};

pub use agent::{AgentAccess, AgentPassthrough};
pub(crate) use pool::received_alert;
pub use pool::{PeerInfo, PeerPool, PoolConfig};

use crate::{
    config::OutboundConfig,
    metrics::Direction,
    proxy::{
        self, conn::Lifetime, Activity, Body, GuardedBody, Hop, IdleIo, Tunnel, UpstreamError,
    },
};

/// Why the outbound proxy could not be built.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    /// The gateway's roots cannot be used.
    #[error("outbound.gateway_roots: {0}")]
    Roots(#[from] crate::https::RootsError),
    /// rustls refused the settings.
    #[error("outbound TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// Binding the listener failed.
    #[error("client.listen {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
}

/// A request refused before anything was dialled: the app's doing.
enum Unroutable {
    /// A routing header cannot be used.
    Header(gateway_client::target::TargetError),
    /// `CONNECT` without a target.
    Connect,
}

impl Unroutable {
    fn answer(&self) -> Response<Body> {
        match self {
            Self::Header(e) => {
                tracing::warn!(header = e.header(), error = %e, "bad routing header");
                proxy::detailed_error(
                    StatusCode::BAD_REQUEST,
                    "bad routing header",
                    &e.to_string(),
                )
            }
            Self::Connect => proxy::detailed_error(
                StatusCode::BAD_REQUEST,
                "CONNECT needs a target",
                "name it in x-dstack-target-app / x-dstack-target-port, or CONNECT <app-id>.dstack:<port>",
            ),
        }
    }
}

/// What the log line of a sent request names, and how it is sent.
struct Sent {
    method: Method,
    path: String,
    /// The app's Host travels on (as `:authority` over h2); without one, the target's name.
    host: HeaderValue,
    upgrade: bool,
}

impl Sent {
    fn of(req: &Request<Incoming>, route: &gateway_client::Route) -> Self {
        let host = req
            .headers()
            .get(header::HOST)
            .cloned()
            .or_else(|| {
                req.uri()
                    .authority()
                    .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            })
            .or_else(|| HeaderValue::from_str(&route.server_name).ok())
            .unwrap_or_else(|| HeaderValue::from_static("localhost"));
        Self {
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
            host,
            upgrade: proxy::is_websocket(req),
        }
    }
}

/// Counters of what went out (exported by the admin endpoint).
#[derive(Debug, Default)]
pub struct OutboundStats {
    /// Requests forwarded to a verified peer.
    pub authenticated: AtomicU64,
    /// Requests forwarded through the gateway's own TLS, the peer not verified.
    pub unauthenticated: AtomicU64,
    /// Requests answered with an error status by the proxy itself.
    pub failed: AtomicU64,
}

/// The outbound side.
pub struct Outbound {
    listen: SocketAddr,
    config: OutboundConfig,
    resolver: CertResolver,
    anchors: TrustAnchors,
    webpki: Arc<rustls::ClientConfig>,
    multiplexed: Arc<ArcSwapOption<Connector>>,
    upgrades: Arc<ArcSwapOption<Connector>>,
    /// TCP tunnels (`[[tunnels]]`, `CONNECT`): the tunnel ALPN, sessions resumed per target.
    tunnels: ArcSwapOption<Connector>,
    /// The attestation policy peers are held to, when `[attestation]` requires one.
    attestor: Option<Arc<ratls::attested::Attestor>>,
    /// The gateway, once known, and what `/gateway` answers.
    gateway: ArcSwapOption<(Addressing, String)>,
    /// Direct addresses; the rest go through the gateway.
    routes: ArcSwap<StaticRoutes>,
    pool: PeerPool,
    agent: Option<AgentPassthrough>,
    connections: Arc<Semaphore>,
    /// Its idle connections, closed to make room when it is full.
    reclaim: Arc<proxy::Reclaim>,
    drain: proxy::Drain,
    metrics: Arc<crate::metrics::Metrics>,
    /// What went out.
    pub stats: OutboundStats,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound")
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

/// The gateway the configuration names (a fixed address or a base domain), and what `/gateway`
/// answers; `None`: it must be discovered.
pub fn configured_gateway(
    config: &OutboundConfig,
    gateway: Option<&gateway_client::GatewaySetting>,
) -> Option<(Addressing, String)> {
    use gateway_client::GatewaySetting;
    let addressing = match gateway? {
        GatewaySetting::Fixed(addr) => Addressing::Fixed(addr.clone()),
        GatewaySetting::Domain { base, port } => Addressing::Gateway {
            base_domain: base.clone(),
            port: port.unwrap_or(gateway_client::address::DEFAULT_GATEWAY_PORT),
            dial: config.gateway_address.clone(),
        },
    };
    Some((addressing, gateway?.to_string()))
}

/// The gateway's own TLS: the WebPKI roots plus `extra` (`outbound.gateway_roots`).
pub fn webpki_config(
    extra: Option<&std::path::Path>,
) -> Result<rustls::ClientConfig, OutboundError> {
    let extra = extra.map(crate::https::roots_file).transpose()?;
    Ok(crate::https::client_config(
        extra.as_deref().unwrap_or_default(),
    )?)
}

fn pool_config(config: &OutboundConfig) -> PoolConfig {
    PoolConfig {
        response_timeout: config.response_timeout,
        idle_timeout: config.pool_idle_timeout,
        keepalive_interval: config.keepalive_interval,
    }
}

impl Outbound {
    /// The proxy on `listen`, presenting `resolver`'s certificate and trusting `anchors` for
    /// peers. `addressing` may come later ([`Outbound::set_addressing`]) when the gateway is
    /// discovered after the start; until then targeted requests get `502`.
    pub fn new(
        listen: SocketAddr,
        config: OutboundConfig,
        resolver: CertResolver,
        anchors: TrustAnchors,
        agent: Option<AgentPassthrough>,
    ) -> Result<Self, OutboundError> {
        let webpki = Arc::new(webpki_config(config.gateway_roots.as_deref())?);
        let multiplexed = Arc::new(ArcSwapOption::empty());
        let upgrades = Arc::new(ArcSwapOption::empty());
        let metrics = Arc::<crate::metrics::Metrics>::default();
        let pool = PeerPool::new(
            multiplexed.clone(),
            upgrades.clone(),
            pool_config(&config),
            metrics.clone(),
            resolver.clone(),
        );
        let (routes, max_connections) = (config.routes.clone(), config.max_connections);
        Ok(Self {
            listen,
            agent: agent.filter(|_| config.agent_passthrough),
            config,
            resolver,
            anchors,
            webpki,
            multiplexed,
            upgrades,
            tunnels: ArcSwapOption::empty(),
            attestor: None,
            gateway: ArcSwapOption::empty(),
            routes: ArcSwap::from_pointee(routes),
            pool,
            connections: Arc::new(Semaphore::new(max_connections)),
            reclaim: Arc::default(),
            drain: proxy::Drain::default(),
            metrics,
            stats: OutboundStats::default(),
        })
    }

    /// The WebPKI client config used for the gateway's own TLS (and its discovery).
    pub fn webpki(&self) -> Arc<rustls::ClientConfig> {
        self.webpki.clone()
    }

    /// The gateway from now on (configured or discovered); `domain` is what `/gateway` answers.
    pub fn set_gateway(&self, addressing: Addressing, domain: String) {
        self.gateway.store(Some(Arc::new((addressing, domain))));
        self.readdress();
    }

    /// New static routes (SIGHUP); the gateway stays.
    pub fn set_routes(&self, routes: StaticRoutes) {
        self.routes.store(Arc::new(routes));
        self.readdress();
    }

    /// Build the connectors for the routes and the gateway as they are now: the routes' targets
    /// directly, the rest through the gateway; neither known yet, no connector (502s).
    fn readdress(&self) {
        let routes = self.routes.load_full();
        let gateway = self.gateway.load_full();
        let addressing = match (routes.is_empty(), gateway.as_deref()) {
            (true, None) => return,
            (true, Some((gateway, _))) => gateway.clone(),
            (false, gateway) => Addressing::Static {
                routes: (*routes).clone(),
                otherwise: gateway.map(|(g, _)| Box::new(g.clone())),
            },
        };
        let connector = |alpn: &[&[u8]], resume: bool| {
            let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
            let mut webpki = (*self.webpki).clone();
            webpki.alpn_protocols = alpn.clone();
            Arc::new(Connector::new(
                addressing.clone(),
                self.resolver.clone(),
                self.anchors.clone(),
                Some(Arc::new(webpki)),
                ConnectorConfig {
                    connect_timeout: self.config.connect_timeout,
                    handshake_timeout: self.config.handshake_timeout,
                    alpn,
                    resume,
                    attestor: self.attestor.clone(),
                },
            ))
        };
        self.multiplexed
            .store(Some(connector(ratls::tls::MESH_ALPN, false)));
        self.upgrades.store(Some(connector(&[b"http/1.1"], false)));
        self.tunnels
            .store(Some(connector(&[ratls::tls::TUNNEL_ALPN], true)));
    }

    /// The connector tunnels dial with; `None` until a route or the gateway is known.
    pub fn tunnel_connector(&self) -> Option<Arc<Connector>> {
        self.tunnels.load_full()
    }

    /// How long a tunnel's target may take to say its backend answered, after the handshake.
    pub fn tunnel_deadline(&self) -> Duration {
        self.config.handshake_timeout
    }

    /// The request metrics (tunnel ports count into them too).
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.metrics
    }

    /// Whether targets can be routed yet.
    pub fn has_addressing(&self) -> bool {
        self.multiplexed.load().is_some()
    }

    /// Bind the listener.
    pub async fn bind(&self) -> Result<TcpListener, OutboundError> {
        TcpListener::bind(self.listen)
            .await
            .map_err(|source| OutboundError::Bind {
                addr: self.listen,
                source,
            })
    }

    /// Stop with `drain` (SIGTERM) instead of a private one.
    pub fn with_drain(mut self, drain: proxy::Drain) -> Self {
        self.drain = drain;
        self
    }

    /// Hold peers to `attestor`'s attestation policy (before the gateway is set).
    pub fn with_attestor(mut self, attestor: Option<Arc<ratls::attested::Attestor>>) -> Self {
        self.attestor = attestor;
        self
    }

    /// Record requests and refused peers into `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        // The pool counts its handshakes there too; it holds no connection yet.
        self.pool = PeerPool::new(
            self.multiplexed.clone(),
            self.upgrades.clone(),
            pool_config(&self.config),
            metrics.clone(),
            self.resolver.clone(),
        );
        self.metrics = metrics;
        self
    }

    /// Connections from apps open now.
    pub fn open_connections(&self) -> usize {
        self.config
            .max_connections
            .saturating_sub(self.connections.available_permits())
    }

    /// Idle connections from apps closed so far to make room at `max_connections`.
    pub fn reclaimed_connections(&self) -> u64 {
        self.reclaim.closed()
    }

    /// Pooled connections to peers: (h2, idle HTTP/1.1).
    pub fn pooled(&self) -> (usize, usize) {
        self.pool.connections()
    }

    /// Accept connections from apps until the future is dropped or the drain starts.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        while let Some((tcp, remote, hold)) = proxy::accept(
            &listener,
            &self.connections,
            Some(&self.reclaim),
            "outbound",
            &self.drain,
        )
        .await
        {
            self.metrics.accepted(Direction::Outbound);
            tokio::spawn(self.clone().connection(tcp, remote, hold));
        }
    }

    async fn connection(
        self: Arc<Self>,
        tcp: tokio::net::TcpStream,
        remote: SocketAddr,
        hold: proxy::Hold,
    ) {
        let activity = Activity::new();
        let io = TokioIo::new(IdleIo::new(tcp, activity.clone()));
        let tunnel = Tunnel {
            activity: activity.clone(),
            idle: self.config.idle_timeout,
            hold,
        };
        let this = self.clone();
        let service = service_fn(move |req| Box::pin(this.clone().handle(req, tunnel.clone())));
        // HTTP/1.1, and h2 with prior knowledge for gRPC clients.
        let builder = proxy::conn::auto(self.config.header_timeout);
        let conn = builder.serve_connection_with_upgrades(io, service);
        let lifetime = Lifetime {
            idle: Some((activity, self.config.idle_timeout)),
            reclaim: Some(self.reclaim.clone()),
            ..Lifetime::until_drain("outbound", remote, self.drain.clone())
        };
        lifetime.drive(conn, |c| c.graceful_shutdown()).await;
    }

    /// One request from the app: parse → route → send → respond.
    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        tunnel: Tunnel,
    ) -> Result<Response<Body>, Infallible> {
        let in_flight = tunnel.activity.request();
        // CONNECT: a TCP tunnel to the target, answered only once it is verified and ready.
        // The rare paths are boxed: the request future is allocated per request and moved
        // into its box, so every byte of their state would be paid by every request.
        if req.method() == Method::CONNECT {
            return Ok(Box::pin(self.connect(req, tunnel)).await);
        }
        // Parse: the routing headers. None: the guest agent; a bad one: 400 naming it.
        let target = match self.parse(&req) {
            Ok(Some(target)) => target,
            Ok(None) => {
                let resp = Box::pin(self.agent(req)).await;
                return Ok(resp.map(|b| GuardedBody::new(b, in_flight).boxed()));
            }
            Err(refusal) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                return Ok(refusal.answer());
            }
        };
        // Route: where the target lives, known before anything is dialled.
        let route = match self.route(&target) {
            Ok(route) => route,
            Err(detail) => {
                return Ok(self.refuse(
                    &target,
                    StatusCode::BAD_GATEWAY,
                    "no route to target",
                    &detail,
                ))
            }
        };
        // Send: a pooled connection whose peer was verified in the handshake; routing and
        // hop-by-hop headers removed, bodies streamed, a WebSocket upgrade spliced.
        let request = Sent::of(&req, &route);
        let started = std::time::Instant::now();
        let name = target.to_string();
        let (host, upgrade) = (request.host.clone(), request.upgrade);
        let result = proxy::forward_with(req, Some(tunnel), strip_routing_headers, &name, |req| {
            self.pool.send(&target, &name, req, host, upgrade)
        })
        .await;
        // Respond: count, log, and answer; a failure as a classified JSON error.
        Ok(self.respond(&target, &request, started, result, in_flight))
    }

    /// The target the routing headers name; `None` for the guest agent.
    fn parse(&self, req: &Request<Incoming>) -> Result<Option<Target>, Unroutable> {
        Target::from_headers(req.headers()).map_err(Unroutable::Header)
    }

    /// `CONNECT`: parse the target (routing headers, else `<app-id>.dstack:<port>`) → route →
    /// open a tunnel (verified handshake, the service's backend answered) → `200` and splice
    /// the app's connection to it; any failure is the JSON error a request would get, and
    /// nothing of the app's was sent.
    async fn connect(&self, mut req: Request<Incoming>, tunnel: Tunnel) -> Response<Body> {
        let target = match Target::from_headers(req.headers()) {
            Ok(Some(target)) => Ok(target),
            Ok(None) => req
                .uri()
                .authority()
                .ok_or(Unroutable::Connect)
                .and_then(|a| {
                    Target::from_connect_authority(a.as_str()).map_err(Unroutable::Header)
                }),
            Err(e) => Err(Unroutable::Header(e)),
        };
        let target = match target {
            Ok(target) if target.transport == Transport::Mesh => target,
            Ok(_) => {
                return self.refuse_connect(
                    "CONNECT needs mutual RA-TLS",
                    "x-dstack-target-use-tls: false cannot carry a tunnel",
                )
            }
            Err(refusal) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                return refusal.answer();
            }
        };
        let name = crate::config::tunnels::CONNECT_NAME;
        if let Err(detail) = self.route(&target) {
            self.metrics.tunnel(Direction::Outbound, name, "no_route");
            return self.refuse(
                &target,
                StatusCode::BAD_GATEWAY,
                "no route to target",
                &detail,
            );
        }
        let Some(connector) = self.tunnel_connector() else {
            return self.refuse_connect("no route to target", "the gateway is not known yet");
        };
        let opened = match crate::tunnel::open(&connector, &target, self.tunnel_deadline()).await {
            Ok(opened) => opened,
            Err(e) => {
                e.count(&self.metrics, name);
                let e = e.upstream(&target);
                let failure = e.failure();
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                failure.log(
                    Hop::Peer,
                    "outbound tunnel failed",
                    &format_args!("CONNECT {target}: {e}"),
                );
                return proxy::detailed_error(
                    failure.status(),
                    failure.short(Hop::Peer),
                    &e.to_string(),
                );
            }
        };
        opened.count(&self.metrics, name);
        self.stats.authenticated.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%target, resumed = opened.resumed, "CONNECT tunnel open");
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let mut stream = opened.stream;
            match upgrade.await {
                Ok(upgraded) => {
                    // A tunnel's idle limit, not a request connection's: databases hold quiet
                    // connections.
                    let idle = crate::config::tunnels::DEFAULT_TUNNEL_IDLE_TIMEOUT.max(tunnel.idle);
                    let mut app = TokioIo::new(upgraded);
                    let ended =
                        crate::tunnel::splice(&mut app, &mut stream, &tunnel.activity, idle).await;
                    tracing::debug!(%target, ?ended, "CONNECT tunnel closed");
                }
                Err(e) => {
                    tracing::debug!(error = %e, "CONNECT: the app's connection was not upgraded")
                }
            }
            drop(tunnel);
        });
        Response::new(proxy::full(bytes::Bytes::new()))
    }

    /// A `CONNECT` that cannot be carried: `502` with why.
    fn refuse_connect(&self, error: &str, detail: &str) -> Response<Body> {
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error, detail, "outbound CONNECT refused");
        proxy::detailed_error(StatusCode::BAD_GATEWAY, error, detail)
    }

    /// A request without a target: `/health` (dstack-vpc's image health-checks its client
    /// proxy there), else the guest-agent passthrough, when it is on.
    async fn agent(&self, req: Request<Incoming>) -> Response<Body> {
        if req.uri().path() == "/health" && matches!(*req.method(), Method::GET | Method::HEAD) {
            return proxy::text_response(StatusCode::OK, "healthy\n");
        }
        match &self.agent {
            Some(agent) => {
                let gateway = self.gateway.load_full();
                agent
                    .handle(req, gateway.as_deref().map(|(_, d)| d.as_str()))
                    .await
            }
            None => proxy::detailed_error(
                StatusCode::BAD_REQUEST,
                "no target",
                "x-dstack-target-app is required (the guest-agent passthrough is off)",
            ),
        }
    }

    /// Where `target` is dialled, or why it cannot be.
    fn route(&self, target: &Target) -> Result<gateway_client::Route, String> {
        match self.multiplexed.load().as_ref() {
            Some(connector) => connector.route(target).map_err(|e| e.to_string()),
            None => Err("the gateway is not known yet: discovery has not succeeded (set dstack.gateway_domain)".into()),
        }
    }

    /// Count and log the exchange, and turn a failure into the app's JSON error.
    fn respond(
        &self,
        target: &Target,
        request: &Sent,
        started: std::time::Instant,
        result: Result<Response<Body>, UpstreamError>,
        in_flight: proxy::RequestGuard,
    ) -> Response<Body> {
        let mut label = [0u8; 128];
        let peer = crate::metrics::hex_label(target.app_id.as_bytes(), &mut label);
        let failed = result
            .as_ref()
            .map_or(true, |r| r.status().is_server_error());
        self.metrics
            .request(Direction::Outbound, peer, failed, started.elapsed());
        let (method, path) = (&request.method, &request.path);
        match result {
            Ok(resp) => {
                let counter = match target.transport {
                    Transport::Mesh => &self.stats.authenticated,
                    Transport::GatewayTls => &self.stats.unauthenticated,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                let peer = resp.extensions().get::<PeerInfo>();
                tracing::debug!(
                    %target,
                    peer = ?peer.and_then(|p| p.app_id.as_ref()).map(ToString::to_string),
                    authenticated = target.transport == Transport::Mesh,
                    %method, %path,
                    status = resp.status().as_u16(),
                    "outbound request"
                );
                resp.map(|b| GuardedBody::new(b, in_flight).boxed())
            }
            Err(e) => {
                match &e {
                    UpstreamError::Refused { rejection, .. } => self
                        .metrics
                        .handshake_failure(Direction::Outbound, rejection.reason()),
                    UpstreamError::Rejected { .. } => self
                        .metrics
                        .handshake_failure(Direction::Outbound, "refused_by_peer"),
                    _ => {}
                }
                let failure = e.failure();
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                let detail = format_args!("{target}, {method} {path}: {e}");
                failure.log(Hop::Peer, "outbound request failed", &detail);
                // The app is ours: it gets the detail too.
                proxy::detailed_error(failure.status(), failure.short(Hop::Peer), &e.to_string())
            }
        }
    }

    /// Find the gateway from the CVM's sys-config and its `/prpc/Info`, retrying with backoff
    /// until it answers; meanwhile targeted requests get `502` and everything else works.
    pub async fn discover_gateway(self: Arc<Self>) {
        let mut delay = Duration::from_secs(1);
        loop {
            let found = match gateway_client::discovery::gateway_urls(&self.config.sys_config) {
                Ok(urls) => gateway_client::discovery::discover(
                    &urls,
                    self.webpki.clone(),
                    gateway_client::discovery::DEFAULT_TIMEOUT,
                )
                .await
                .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match found {
                Ok((url, info)) => {
                    tracing::info!(%url, base_domain = %info.base_domain, port = info.external_port, "gateway discovered");
                    let addressing = Addressing::Gateway {
                        base_domain: info.base_domain.clone(),
                        port: info.external_port,
                        dial: self.config.gateway_address.clone(),
                    };
                    self.set_gateway(addressing, info.base_domain);
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?delay, "gateway discovery failed; targeted requests get 502 until it succeeds (or set dstack.gateway_domain)");
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(60));
        }
    }

    /// Count, log and answer a failure that is not the app's doing.
    fn refuse(
        &self,
        target: &Target,
        status: StatusCode,
        error: &str,
        detail: &str,
    ) -> Response<Body> {
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(target = %target, status = status.as_u16(), error, detail, "outbound request failed");
        proxy::detailed_error(status, error, detail)
    }
}
