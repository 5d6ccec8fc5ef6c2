//! The inbound listener: one TLS port for mesh callers (and, with the ACME subsystem, public
//! domains), chosen per connection from the ClientHello.
//!
//! A connection's path, stage by stage:
//! listen → accept (connection limit) → peek the ClientHello and route, then finish the
//! handshake, all under one deadline → verify the caller (inside the handshake) → serve
//! HTTP/1.1 or h2 → strip forgeable headers, set the caller's identity → forward to the app.

mod mesh;
mod public;
pub mod route;

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use arc_swap::ArcSwap;
use ratls::{identity::RotatingIdentity, Policy, Rejection, TrustAnchors};
use rustls::ServerConfig;
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_rustls::LazyConfigAcceptor;

use crate::{
    acme::{Acme, Domain},
    config::{Allow, InboundConfig, Mode},
    proxy::{self, Activity, IdleIo, Upstream, UpstreamConfig},
};
use route::{Hello, NoPublicNames, PublicNames, Route};

/// Why the inbound listener could not be built.
#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    /// A trust anchor file could not be read.
    #[error("inbound.trust_anchors: {path}: {reason}")]
    Anchor {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
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
    drain: proxy::Drain,
    /// The allowlist now in force (SIGHUP replaces it).
    allow: ArcSwap<Allow>,
    metrics: Arc<crate::metrics::Metrics>,
}

/// What the listener serves besides the mesh: the public domains, their certificates and
/// backends. A reload builds a new one and swaps it in; connections keep the one they began on.
pub struct PublicSide {
    names: Arc<dyn PublicNames>,
    acme: Option<Arc<Acme>>,
    /// `http`-mode domains' backends, by primary name.
    upstreams: HashMap<String, Upstream>,
}

impl std::fmt::Debug for PublicSide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublicSide")
            .field("domains", &self.upstreams.len())
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

/// Which branch a connection took at the ClientHello.
enum Branch {
    Mesh,
    Public(Arc<Domain>),
    Challenge,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound")
            .field("listen", &self.config.listen)
            .field("backend", &self.config.backend)
            .finish_non_exhaustive()
    }
}

/// The mesh policy for callers: our root plus configured anchors, and `allow`.
pub fn mesh_policy(
    config: &InboundConfig,
    allow: &Allow,
    identity: &RotatingIdentity,
) -> Result<Policy, InboundError> {
    let anchors = mesh_anchors(config, identity)?;
    Ok(Policy::new(anchors)
        .allow(allow.resolve(&identity.current().app_id))
        .require_attestation(config.require_attestation))
}

/// The roots mesh peers must chain to: our KMS root plus configured anchors (federation).
pub fn mesh_anchors(
    config: &InboundConfig,
    identity: &RotatingIdentity,
) -> Result<TrustAnchors, InboundError> {
    let current = identity.current();
    let mut roots = vec![current.root.clone()];
    for path in &config.trust_anchors {
        let anchor_err = |reason: String| InboundError::Anchor {
            path: path.display().to_string(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| anchor_err(e.to_string()))?;
        roots.extend(ratls::cert::parse_chain(&bytes).map_err(|e| anchor_err(e.to_string()))?);
    }
    TrustAnchors::new(&roots).map_err(|e| InboundError::Anchor {
        path: "(trust anchors)".into(),
        reason: e.to_string(),
    })
}

impl Inbound {
    /// Build the inbound side on `identity`.
    pub fn new(config: InboundConfig, identity: &RotatingIdentity) -> Result<Self, InboundError> {
        let policy = Arc::new(mesh_policy(&config, &config.allow, identity)?);
        let mesh_tls = ratls::tls::mesh_server_config(identity.resolver(), policy.clone())?;
        let upstream = Upstream::new(
            &config.backend.to_string(),
            UpstreamConfig {
                connect_timeout: config.backend_connect_timeout,
                response_timeout: config.backend_timeout,
                ..UpstreamConfig::default()
            },
        )
        .map_err(|e| InboundError::Backend(e.to_string()))?;
        Ok(Self {
            connections: Arc::new(Semaphore::new(config.max_connections)),
            drain: proxy::Drain::default(),
            allow: ArcSwap::from_pointee(config.allow.clone()),
            metrics: Arc::default(),
            mesh_tls: ArcSwap::from_pointee(mesh_tls),
            policy: ArcSwap::new(policy),
            upstream,
            public: ArcSwap::from_pointee(PublicSide {
                names: Arc::new(NoPublicNames),
                acme: None,
                upstreams: HashMap::new(),
            }),
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
        let mut upstreams = HashMap::new();
        for domain in acme.iter().flat_map(|a| a.domains()) {
            if domain.config.mode != Mode::Http {
                continue;
            }
            let upstream = Upstream::new(
                &domain.config.backend.to_string(),
                UpstreamConfig {
                    connect_timeout: self.config.backend_connect_timeout,
                    response_timeout: self.config.backend_timeout,
                    ..UpstreamConfig::default()
                },
            )
            .map_err(|e| InboundError::Backend(format!("{}: {e}", domain.name())))?;
            upstreams.insert(domain.name().to_owned(), upstream);
        }
        let names: Arc<dyn PublicNames> = match &acme {
            Some(acme) => acme.clone(),
            None => Arc::new(NoPublicNames),
        };
        Ok(PublicSide {
            names,
            acme,
            upstreams,
        })
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
        let policy = Arc::new(mesh_policy(&self.config, allow, identity)?);
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

    /// The mesh route this listener serves, as the admin port reports it.
    pub fn mesh_route(&self) -> crate::admin::MeshRoute {
        crate::admin::MeshRoute {
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

    /// Record requests and refused handshakes into `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.config
            .max_connections
            .saturating_sub(self.connections.available_permits())
    }

    /// Accept connections until the future is dropped or the drain starts.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        // The slot is held by the connection and by any WebSocket tunnel spliced from it.
        while let Some((tcp, remote, hold)) =
            proxy::accept(&listener, &self.connections, "inbound", &self.drain).await
        {
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
        let io = IdleIo::new(tcp, activity.clone());
        // The public side as of this connection's start (a reload may swap it meanwhile).
        let public = self.public.load_full();
        // ClientHello and handshake share one deadline, so a slow client cannot stretch it.
        let handshake = async {
            let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io)
                .await
                .map_err(|e| (e, None))?;
            let hello = Hello::from_rustls(&start.client_hello());
            let acme = public.acme.as_ref();
            let (branch, config) = match route::route(&hello, public.names.as_ref()) {
                Route::AcmeChallenge(_) => match acme {
                    Some(acme) => (Branch::Challenge, acme.challenge_tls()),
                    None => (Branch::Mesh, self.mesh_tls.load_full()),
                },
                Route::PublicDomain(name) => match acme.and_then(|a| a.lookup(&name)) {
                    Some(domain) => (Branch::Public(domain.clone()), domain.tls()),
                    None => (Branch::Mesh, self.mesh_tls.load_full()),
                },
                Route::Mesh => (Branch::Mesh, self.mesh_tls.load_full()),
            };
            match start.into_stream(config).into_fallible().await {
                Ok(tls) => Ok((branch, tls)),
                Err((e, io)) => Err((e, Some(io))),
            }
        };
        // Each phase is boxed, so the task does not keep the handshake's space for the life of
        // the connection: an idle connection holds only what serving needs (see BENCHMARKS.md).
        let handshake = Box::pin(handshake);
        let (branch, tls) = match tokio::time::timeout(self.config.handshake_timeout, handshake)
            .await
        {
            Ok(Ok(done)) => done,
            Ok(Err((e, io))) => {
                let reason = log_handshake_failure(remote, &e);
                self.metrics
                    .handshake_failure(crate::metrics::Direction::Inbound, reason);
                if let Some(io) = io {
                    // Boxed like every phase: its buffer must not sit in every connection's task.
                    Box::pin(linger(io)).await;
                }
                return;
            }
            Err(_) => {
                self.metrics
                    .handshake_failure(crate::metrics::Direction::Inbound, "timeout");
                tracing::debug!(%remote, timeout = ?self.config.handshake_timeout, "inbound handshake timed out");
                return;
            }
        };
        match branch {
            Branch::Mesh => {
                if let Some(serving) = mesh::serve(self, tls, remote, activity, hold) {
                    serving.await;
                }
            }
            Branch::Challenge => Box::pin(public::close_validation(tls, remote)).await,
            Branch::Public(domain) => match domain.config.mode {
                Mode::Http => {
                    let serving =
                        mesh::serve_public(&self, &public, domain, tls, remote, activity, hold);
                    drop(public);
                    if let Some(serving) = serving {
                        serving.await;
                    }
                }
                Mode::Tcp => {
                    Box::pin(public::splice(&self.config, &domain, tls, remote, activity)).await;
                    drop(hold);
                }
            },
        }
    }
}

/// After refusing a handshake: the alert is written; close our side and read what the client
/// already sent (TLS 1.3 clients send their first request right after their certificate)
/// before closing. Closing with unread data makes the kernel send a reset, which can destroy the
/// alert before the client reads it, and the client would learn only "connection reset".
async fn linger(mut io: IdleIo<tokio::net::TcpStream>) {
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
fn log_handshake_failure(remote: SocketAddr, e: &std::io::Error) -> &'static str {
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
