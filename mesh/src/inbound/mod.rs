//! The inbound listener: one TLS port for mesh callers and public domains, the branch chosen
//! per connection from its ClientHello. [`Inbound::connection`] is a connection's whole path:
//!
//! listen → accept (connection limit) → peek the ClientHello and route it (`route`), then
//! finish the handshake with that route's TLS, verifying a mesh caller inside it, all under
//! one deadline → serve the branch: the mesh (`mesh`: the caller's identity, HTTP, forgeable
//! headers stripped, `x-dstack-app-id` set, the mesh backend), a public domain (`public`:
//! HTTP with `x-forwarded-*`, or a TCP splice, to the domain's backend), or an ACME
//! validation (`public`: the challenge certificate, then close). HTTP for the mesh and public
//! domains is one path (`http`).

mod http;
mod mesh;
pub mod proxy_protocol;
mod public;
pub mod route;

use std::{net::SocketAddr, sync::Arc};

use arc_swap::ArcSwap;
use ratls::{identity::RotatingIdentity, Policy, Rejection};
use rustls::ServerConfig;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_rustls::{server::TlsStream, LazyConfigAcceptor};

pub use public::PublicSide;

use crate::{
    acme::{Acme, Domain},
    config::{Allow, InboundConfig, Mode},
    metrics::{Direction, Metrics, Side},
    proxy::{self, Activity, Hold, IdleIo, Upstream},
    trust::{self, TrustError},
};
use route::{Hello, Route};

/// Why the inbound listener could not be built.
#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    /// A trust anchor is unusable.
    #[error(transparent)]
    Trust(#[from] TrustError),
    /// The TLS configuration was refused.
    #[error("inbound TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// The backend address is not usable.
    #[error("inbound.backend: {0}")]
    Backend(String),
    /// Binding the listener failed.
    #[error("inbound.listen {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
}

/// The inbound side: its settings, the mesh TLS config and the backend pool.
pub struct Inbound {
    config: InboundConfig,
    mesh_tls: ArcSwap<ServerConfig>,
    policy: ArcSwap<Policy>,
    upstream: Upstream,
    /// Public domains: swapped whole when a reload changes them.
    public: ArcSwap<PublicSide>,
    connections: Arc<Semaphore>,
    /// Its idle connections, closed to make room when it is full.
    reclaim: Arc<proxy::Reclaim>,
    drain: proxy::Drain,
    /// The allowlist now in force (SIGHUP replaces it).
    allow: ArcSwap<Allow>,
    /// The registry role, when this sidecar runs it.
    registry: arc_swap::ArcSwapOption<crate::registry::Registry>,
    /// The attestation policy callers are held to, when `[attestation]` requires one.
    attestor: Option<Arc<ratls::attested::Attestor>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound")
            .field("listen", &self.config.listen)
            .field("backend", &self.config.backend)
            .finish_non_exhaustive()
    }
}

/// A new allowlist, built and checked, ready to swap in.
#[derive(Debug)]
pub struct PreparedAllow {
    allow: Allow,
    policy: Arc<Policy>,
    tls: Arc<ServerConfig>,
}

/// The mesh route this listener serves, as the admin port reports it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct MeshRoute {
    /// Where it listens (as configured).
    pub listen: String,
    /// Where requests go.
    pub backend: String,
    /// Who may call (`"any"`, `"own_app"` or `{"apps": [...]}`).
    pub allowed_apps: serde_json::Value,
    /// Whether callers must carry an attestation.
    pub require_attestation: bool,
}

impl MeshRoute {
    /// The allowlist in words.
    pub fn allowed(&self) -> String {
        match &self.allowed_apps {
            serde_json::Value::String(s) if s == "any" => "any app under the trust anchors".into(),
            serde_json::Value::String(s) if s == "own_app" => "this app's own instances".into(),
            v => match v.get("apps").and_then(serde_json::Value::as_array) {
                Some(apps) => apps
                    .iter()
                    .filter_map(serde_json::Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", "),
                None => v.to_string(),
            },
        }
    }
}

/// Why a connection never reached its branch.
enum Refused {
    /// Its PROXY header.
    Proxy(proxy_protocol::ProxyError),
    /// The TLS handshake; the stream, when there is an alert to linger over.
    Tls(std::io::Error, Option<IdleIo<TcpStream>>),
}

/// Which branch a connection took at the ClientHello.
enum Branch {
    Mesh,
    Public(Arc<Domain>),
    Challenge,
}

impl Inbound {
    /// Build the inbound side on `identity`, holding callers to `attestor` when there is one.
    pub fn new(
        config: InboundConfig,
        identity: &RotatingIdentity,
        attestor: Option<Arc<ratls::attested::Attestor>>,
    ) -> Result<Self, InboundError> {
        let policy = Arc::new(trust::mesh_policy(
            &config,
            &config.allow,
            identity,
            attestor.as_ref(),
        )?);
        let mesh_tls = ratls::tls::mesh_server_config(identity.resolver(), policy.clone())?;
        let upstream = Upstream::new(
            &config.backend.to_string(),
            public::upstream_config(&config),
        )
        .map_err(|e| InboundError::Backend(e.to_string()))?;
        Ok(Self {
            connections: Arc::new(Semaphore::new(config.max_connections)),
            reclaim: Arc::default(),
            drain: proxy::Drain::default(),
            allow: ArcSwap::from_pointee(config.allow.clone()),
            registry: arc_swap::ArcSwapOption::empty(),
            attestor,
            metrics: Arc::default(),
            mesh_tls: ArcSwap::from_pointee(mesh_tls),
            policy: ArcSwap::new(policy),
            upstream,
            public: ArcSwap::from_pointee(PublicSide::none()),
            config,
        })
    }

    /// Serve public domains on this listener too.
    pub fn with_public(self, acme: Arc<Acme>) -> Result<Self, InboundError> {
        let side = self.prepare_public(Some(acme))?;
        self.set_public(side);
        Ok(self)
    }

    /// Build the public side for `acme` (none: no public domains); nothing changes until
    /// [`Inbound::set_public`].
    pub fn prepare_public(&self, acme: Option<Arc<Acme>>) -> Result<PublicSide, InboundError> {
        match acme {
            Some(acme) => PublicSide::new(acme, &self.config),
            None => Ok(PublicSide::none()),
        }
    }

    /// New handshakes see `side`; established connections keep the one they began on.
    pub fn set_public(&self, side: PublicSide) {
        self.public.store(Arc::new(side));
    }

    /// Bind the configured address.
    pub async fn bind(&self) -> Result<TcpListener, InboundError> {
        TcpListener::bind(self.config.listen)
            .await
            .map_err(|source| InboundError::Bind {
                addr: self.config.listen,
                source,
            })
    }

    /// The policy callers are held to now.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    /// Build the policy and TLS configuration for `allow`; nothing changes until
    /// [`Inbound::apply_allow`], so a reload that fails elsewhere leaves this side untouched.
    pub fn prepare_allow(
        &self,
        allow: &Allow,
        identity: &RotatingIdentity,
    ) -> Result<PreparedAllow, InboundError> {
        let policy = Arc::new(trust::mesh_policy(
            &self.config,
            allow,
            identity,
            self.attestor.as_ref(),
        )?);
        let tls = ratls::tls::mesh_server_config(identity.resolver(), policy.clone())?;
        Ok(PreparedAllow {
            allow: allow.clone(),
            policy,
            tls: Arc::new(tls),
        })
    }

    /// New handshakes are held to the new allowlist; established connections keep the
    /// verdict they were admitted with.
    pub fn apply_allow(&self, prepared: PreparedAllow) {
        self.mesh_tls.store(prepared.tls);
        self.policy.store(prepared.policy);
        self.allow.store(Arc::new(prepared.allow));
    }

    /// The mesh route this listener serves.
    pub fn mesh_route(&self) -> MeshRoute {
        MeshRoute {
            listen: self.config.listen.to_string(),
            backend: self.config.backend.to_string(),
            allowed_apps: serde_json::to_value(&*self.allow.load_full()).unwrap_or_default(),
            require_attestation: self.config.require_attestation,
        }
    }

    /// Stop with `drain` (SIGTERM) instead of a private one.
    pub fn with_drain(mut self, drain: proxy::Drain) -> Self {
        self.drain = drain;
        self
    }

    /// Serve `registry`'s API to mesh callers (`/api/nodes/update`, `/api/discover/<type>`).
    pub fn set_registry(&self, registry: Arc<crate::registry::Registry>) {
        self.registry.store(Some(registry));
    }

    /// Record requests and refused handshakes into `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.config
            .max_connections
            .saturating_sub(self.connections.available_permits())
    }

    /// Idle connections closed so far to make room at `max_connections`.
    pub fn reclaimed_connections(&self) -> u64 {
        self.reclaim.closed()
    }

    /// Accept connections until the future is dropped or the drain starts.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        // The slot is held by the connection and by any WebSocket tunnel spliced from it.
        while let Some((tcp, remote, hold)) = proxy::accept(
            &listener,
            &self.connections,
            Some(&self.reclaim),
            "inbound",
            &self.drain,
        )
        .await
        {
            self.metrics.accepted(Direction::Inbound);
            tokio::spawn(self.clone().connection(tcp, remote, hold));
        }
    }

    /// One connection's whole path. Each phase is boxed, so the task does not keep the
    /// handshake's space for the life of the connection: an idle connection holds only what
    /// serving needs (see BENCHMARKS.md).
    async fn connection(self: Arc<Self>, tcp: TcpStream, remote: SocketAddr, hold: Hold) {
        let activity = Activity::new();
        let io = IdleIo::new(tcp, activity.clone());
        // The public side as of this connection's start (a reload may swap it meanwhile).
        let public = self.public.load_full();
        // PROXY header (when the gateway sends one) → ClientHello → route → handshake (a mesh
        // caller is verified inside it), all under one deadline. `remote` becomes the client
        // the header names.
        let Some((branch, tls, remote)) = Box::pin(self.handshake(io, &public, remote)).await
        else {
            return;
        };
        match branch {
            // Mesh: the verified caller → HTTP → its identity set → the mesh backend.
            Branch::Mesh => {
                drop(public);
                if let Some(serving) = mesh::serve(&self, tls, remote, activity, hold) {
                    serving.await;
                }
            }
            // ACME TLS-ALPN-01: the CA reads the challenge certificate and leaves.
            Branch::Challenge => Box::pin(public::close_validation(tls, remote)).await,
            // Public, http mode: HTTP → x-forwarded-* → the domain's backend.
            Branch::Public(domain) if domain.config.mode == Mode::Http => {
                let serving =
                    public::serve_http(&self, &public, domain, tls, remote, activity, hold);
                drop(public);
                if let Some(serving) = serving {
                    serving.await;
                }
            }
            // Public, tcp mode: the decrypted stream spliced to the domain's backend.
            Branch::Public(domain) => {
                drop(public);
                Box::pin(public::splice(&self.config, &domain, tls, remote, activity)).await;
                drop(hold);
            }
        }
    }

    /// Read the PROXY header (when configured), peek the ClientHello, route it, and finish the
    /// handshake with the route's TLS, under one deadline so a slow client cannot stretch it.
    /// The branch, the stream and the client's address; `None` when any step failed or timed
    /// out (logged and counted).
    async fn handshake(
        &self,
        mut io: IdleIo<TcpStream>,
        public: &PublicSide,
        peer: SocketAddr,
    ) -> Option<(Branch, TlsStream<IdleIo<TcpStream>>, SocketAddr)> {
        let accept = self.config.proxy_protocol;
        // Time spent waiting for an on-demand certificate (its own deadline bounds it) does not
        // count against the handshake's.
        let waited_ms = std::sync::atomic::AtomicU64::new(0);
        // The client (the one a PROXY header names), and how the handshake went.
        let handshake = async {
            let mut remote = peer;
            if accept != proxy_protocol::Accept::Off {
                match proxy_protocol::read(&mut io, accept).await {
                    Ok(client) => remote = client.unwrap_or(peer),
                    Err(e) => return (remote, Err(Refused::Proxy(e))),
                }
            }
            let start = match LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io).await
            {
                Ok(start) => start,
                Err(e) => return (remote, Err(Refused::Tls(e, None))),
            };
            let client_hello = start.client_hello();
            let hello = Hello::from_rustls(&client_hello);
            // Up to here nothing was allocated for the name: a known domain goes on as it is.
            let route = match (route::route(&hello, public), public.on_demand()) {
                // Admitted on demand, its certificate on its way: wait for it.
                (Route::PublicDomain(domain), Some((acme, deadline)))
                    if domain.awaits_first_certificate() =>
                {
                    waiting(&waited_ms, deadline, acme.first_certificate(&domain)).await;
                    Route::PublicDomain(domain)
                }
                // A name nothing serves: a customer's first visit, if on-demand admits it.
                (Route::Mesh, Some((acme, deadline))) => match hello.server_name {
                    Some(name) => match waiting(&waited_ms, deadline, acme.admit(name)).await {
                        Some(domain) => Route::PublicDomain(domain),
                        None => Route::Mesh,
                    },
                    None => Route::Mesh,
                },
                (route, _) => route,
            };
            let (branch, config) = self.branch(route, public);
            let done = match start.into_stream(config).into_fallible().await {
                Ok(tls) => Ok((branch, tls)),
                Err((e, io)) => Err(Refused::Tls(e, Some(io))),
            };
            (remote, done)
        };
        tokio::pin!(handshake);
        let started = tokio::time::Instant::now();
        let result = loop {
            let waited = std::time::Duration::from_millis(
                waited_ms.load(std::sync::atomic::Ordering::Relaxed),
            );
            let deadline = started + self.config.handshake_timeout + waited;
            tokio::select! {
                done = &mut handshake => break Ok(done),
                _ = tokio::time::sleep_until(deadline) => {
                    let waited = std::time::Duration::from_millis(
                        waited_ms.load(std::sync::atomic::Ordering::Relaxed),
                    );
                    if tokio::time::Instant::now() >= started + self.config.handshake_timeout + waited {
                        break Err(());
                    }
                }
            }
        };
        match result {
            Ok((remote, Ok((branch, tls)))) => {
                let side = match branch {
                    Branch::Mesh => Side::Mesh,
                    Branch::Public(_) => Side::Public,
                    Branch::Challenge => Side::AcmeChallenge,
                };
                let group = tls.get_ref().1.negotiated_key_exchange_group();
                self.metrics.handshake(side, group.map(|g| g.name()));
                Some((branch, tls, remote))
            }
            Ok((_, Err(Refused::Proxy(e)))) => {
                self.metrics
                    .handshake_failure(Direction::Inbound, "proxy_protocol");
                tracing::warn!(%peer, error = %e, "inbound connection refused: PROXY protocol");
                None
            }
            Ok((remote, Err(Refused::Tls(e, io)))) => {
                let reason = log_handshake_failure(remote, &e);
                self.metrics.handshake_failure(Direction::Inbound, reason);
                if let Some(io) = io {
                    // Boxed like every phase: its buffer must not sit in every connection's task.
                    Box::pin(linger(io)).await;
                }
                None
            }
            Err(_) => {
                self.metrics
                    .handshake_failure(Direction::Inbound, "timeout");
                tracing::debug!(%peer, timeout = ?self.config.handshake_timeout, "inbound handshake timed out");
                None
            }
        }
    }

    /// The branch and TLS configuration for `route`; a name the public side no longer serves
    /// goes to the mesh.
    fn branch(
        &self,
        route: Route<Arc<Domain>>,
        public: &PublicSide,
    ) -> (Branch, Arc<ServerConfig>) {
        let mesh = || (Branch::Mesh, self.mesh_tls.load_full());
        match route {
            Route::AcmeChallenge => public
                .challenge_tls()
                .map_or_else(mesh, |tls| (Branch::Challenge, tls)),
            Route::PublicDomain(domain) => match public.tls(&domain) {
                Some(tls) => (Branch::Public(domain), tls),
                None => mesh(),
            },
            Route::Mesh => mesh(),
        }
    }
}

/// Run `wait`, an on-demand wait bounded by `deadline`, with `waited_ms` telling the
/// handshake's deadline how long it has taken (at most `deadline` while it runs).
async fn waiting<T>(
    waited_ms: &std::sync::atomic::AtomicU64,
    deadline: std::time::Duration,
    wait: impl std::future::Future<Output = T>,
) -> T {
    use std::sync::atomic::Ordering::Relaxed;
    let ms = |d: std::time::Duration| d.as_millis() as u64;
    waited_ms.store(ms(deadline), Relaxed);
    let started = tokio::time::Instant::now();
    let done = wait.await;
    waited_ms.store(ms(started.elapsed()), Relaxed);
    done
}

/// After refusing a handshake: the alert is written; close our side and read what the client
/// already sent (TLS 1.3 clients send their first request right after their certificate)
/// before closing. Closing with unread data makes the kernel send a reset, which can destroy the
/// alert before the client reads it, and the client would learn only "connection reset".
pub(crate) async fn linger(mut io: IdleIo<TcpStream>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const LINGER: std::time::Duration = std::time::Duration::from_secs(2);
    let drain = async {
        let _ = io.shutdown().await;
        let mut scratch = [0u8; 4096];
        let mut left: usize = 64 * 1024;
        while left > 0 {
            match io.read(&mut scratch).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// Log a failed handshake; the reason label for the metrics.
pub(crate) fn log_handshake_failure(remote: SocketAddr, e: &std::io::Error) -> &'static str {
    let rejection = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .and_then(Rejection::from_tls_error);
    match rejection {
        Some(r) => {
            tracing::warn!(%remote, reason = r.reason(), detail = %r, "mesh caller refused");
            r.reason()
        }
        None => {
            tracing::debug!(%remote, error = %e, "inbound handshake failed");
            "tls_error"
        }
    }
}
