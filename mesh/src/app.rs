//! The whole sidecar, built from a [`Config`]: tests start it in-process exactly as `run` does.

use std::{net::SocketAddr, sync::Arc};

use ratls::{
    agent::{AgentAddress, AgentClient},
    identity::RotatingIdentity,
};
use tokio::{net::TcpListener, task::JoinSet};

use crate::{
    acme::{self, Acme},
    admin::Admin,
    auth::{AuthService, NginxProof},
    config::Config,
    config::RegistryApp,
    inbound::{self, Inbound},
    outbound::{self, AgentPassthrough, Outbound},
    proxy,
    registry::{self, NodePort, Registry},
    runtime::{self, Workers},
    trust::{self, TrustError},
    tunnel::{self, TcpService, TunnelPort},
};

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// No guest agent answered.
    #[error("identity: {0}")]
    Agent(#[from] ratls::agent::AgentError),
    /// The agent gave no usable identity.
    #[error("identity: {0}")]
    Identity(#[from] ratls::identity::IdentityError),
    /// The inbound side could not be built or bound.
    #[error(transparent)]
    Inbound(#[from] inbound::InboundError),
    /// The outbound proxy could not be built or bound.
    #[error(transparent)]
    Outbound(#[from] outbound::OutboundError),
    /// A trust anchor is unusable.
    #[error(transparent)]
    Trust(#[from] TrustError),
    /// The public-domain subsystem could not be built.
    #[error(transparent)]
    Acme(#[from] acme::AcmeError),
    /// A TCP service could not be built or bound.
    #[error(transparent)]
    TcpService(#[from] tunnel::TcpServiceError),
    /// The per-core worker threads could not start.
    #[error("per-core runtime: cannot start a worker thread: {0}")]
    Workers(#[source] std::io::Error),
    /// A listener could not be bound.
    #[error("{what} {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A running sidecar. Dropping it stops every listener.
#[derive(Debug)]
pub struct App {
    /// Our identity.
    pub identity: RotatingIdentity,
    /// The inbound side, when enabled.
    pub inbound: Option<Arc<Inbound>>,
    /// The auth service, when enabled.
    pub auth: Option<Arc<AuthService>>,
    /// The outbound proxy, when enabled.
    pub outbound: Option<Arc<Outbound>>,
    /// Public domains, when configured.
    pub acme: Option<Arc<Acme>>,
    /// Attested TCP services (`[[inbound.tcp]]`).
    pub tcp_services: Vec<Arc<TcpService>>,
    /// Tunnel ports (`[[tunnels]]`).
    pub tunnels: Vec<Arc<TunnelPort>>,
    bound: Bound,
    drain: proxy::Drain,
    drain_timeout: std::time::Duration,
    /// What is running: the last configuration, as far as it was applied.
    running: Config,
    admin: Option<Arc<Admin>>,
    /// The public domains' lifecycle tasks; a reload that replaces the domains drops them.
    acme_tasks: JoinSet<()>,
    tasks: JoinSet<()>,
    /// The per-core threads serving the busy listeners (`per-core` runtime); dropped after the
    /// drain, which ends their connections.
    _workers: Option<Workers>,
    /// The attestation policy peers are held to (`[attestation]`).
    attestor: Option<Arc<ratls::attested::Attestor>>,
    /// Held so that dropping the app aborts them.
    _background: JoinSet<()>,
}

/// Find the agent, retrying (1 s, doubling to 10 s) for `start_timeout` while some address
/// exists but does not answer: in a compose file the sidecar may start before the agent
/// answers, or the agent restarts, and a crash loop helps nobody. No socket at any of the
/// addresses is a deployment without the mount: that fails at once, naming them.
async fn wait_for_agent(
    candidates: Vec<AgentAddress>,
    config: &crate::config::AgentConfig,
) -> Result<(AgentClient, ratls::agent::InfoResponse), ratls::agent::AgentError> {
    let deadline = tokio::time::Instant::now() + config.start_timeout;
    let mut backoff = std::time::Duration::from_secs(1);
    loop {
        match AgentClient::discover(candidates.clone(), config.timeout).await {
            Ok(found) => return Ok(found),
            Err(e)
                if reachable(&candidates) && tokio::time::Instant::now() + backoff < deadline =>
            {
                tracing::warn!(error = %e, retry_in = ?backoff, "guest agent not answering: waiting for it");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(10));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Whether any of `candidates` could answer: a TCP address, or a socket that exists.
fn reachable(candidates: &[AgentAddress]) -> bool {
    candidates
        .iter()
        .any(|a| !matches!(a, AgentAddress::Unix(path) if !path.exists()))
}

impl App {
    /// Find the agent, take an identity, build and bind every listener, then serve.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        let candidates = AgentAddress::candidates(config.agent.address.as_deref(), None)?;
        let (agent, info) = wait_for_agent(candidates, &config.agent).await?;
        let identity = RotatingIdentity::start(agent, info, config.identity.clone()).await?;
        Self::start_with(config, identity).await
    }

    /// Start on an identity the caller already has.
    // Long on purpose: the start sequence in order (load, bind every listener, serve), the
    // one place that shows what the sidecar runs.
    pub async fn start_with(
        config: Config,
        identity: RotatingIdentity,
    ) -> Result<Self, StartError> {
        // SIGTERM: every listener stops accepting and every connection winds down. Peers'
        // quotes are held to `[attestation]` on every listener and the outbound proxy.
        let shared = Shared {
            drain: proxy::Drain::default(),
            metrics: Arc::default(),
            attestor: config
                .attestation
                .as_ref()
                .map(trust::attestor)
                .transpose()?,
        };
        // Stored certificates are loaded before the listener opens: served from the first
        // connection, with no request to the CA.
        let acme = match config.public.serves_domains() {
            false => None,
            true => Some(Acme::new(
                &config.public,
                &shared_store(&config, &identity),
                identity.agent().clone(),
                None,
            )?),
        };
        // Bind everything before serving anything: a port in use fails the start, not later.
        let mut bound = Vec::new();
        let inbound = bind_inbound(&config, &identity, acme.as_ref(), &shared, &mut bound).await?;
        let auth = bind_auth(&config, &identity, &shared, &mut bound).await?;
        let outbound = bind_outbound(&config, &identity, &shared, &mut bound).await?;
        let tcp_services = bind_tcp_services(&config, &identity, &shared, &mut bound).await?;
        let tunnel_ports = match &outbound {
            Some((outbound, _)) => bind_tunnels(&config, outbound, &shared, &mut bound).await?,
            None => Vec::new(),
        };
        let http01 = match (&acme, config.public.acme.http_listen) {
            (Some(_), Some(addr)) => {
                Some(bind("acme.http_listen", addr, &mut bound, "http").await?)
            }
            _ => None,
        };
        let admin = match config.admin.enabled {
            true => Some(bind("admin.listen", config.admin.listen, &mut bound, "admin").await?),
            false => None,
        };
        if admin.is_some() && !config.admin.listen.ip().is_loopback() {
            tracing::warn!(addr = %config.admin.listen, "the admin listener listens beyond loopback: anything that reaches it can read certificate state and trigger renewals");
        }

        // Serve. Listeners run in `tasks` (one ending is an error); tasks that finish their
        // work (gateway discovery) in `background`.
        let (mut tasks, mut background) = (JoinSet::new(), JoinSet::new());
        // The busy listeners: on this runtime, or a socket per per-core worker.
        let mut jobs = PerWorker::new(runtime::workers());
        let inbound = inbound.map(|(inbound, sockets)| {
            let serving = inbound.clone();
            jobs.serve(sockets, &mut tasks, move |l| serving.clone().serve(l));
            inbound
        });
        let auth = auth.map(|(auth, sockets)| {
            let serving = auth.clone();
            jobs.serve(sockets, &mut tasks, move |l| serving.clone().serve(l));
            auth
        });
        let outbound = outbound.map(|(outbound, sockets)| {
            // Static routes serve at once; the gateway, for every other target, is configured
            // or found in the background.
            match outbound::configured_gateway(&config.outbound, config.gateway_domain.as_ref()) {
                Some((addressing, domain)) => outbound.set_gateway(addressing, domain),
                None => {
                    background.spawn(outbound.clone().discover_gateway());
                }
            }
            let serving = outbound.clone();
            jobs.serve(sockets, &mut tasks, move |l| serving.clone().serve(l));
            outbound
        });
        let workers = jobs.start(&mut tasks)?;
        let tcp_services: Vec<_> = (tcp_services.into_iter())
            .map(|(service, listener)| {
                tasks.spawn(service.clone().serve(listener));
                service
            })
            .collect();
        let tunnels: Vec<_> = (tunnel_ports.into_iter())
            .map(|(port, listener)| {
                tasks.spawn(port.clone().serve(listener));
                port
            })
            .collect();
        if let (Some(acme), Some(listener)) = (&acme, http01) {
            let challenges = acme.challenges();
            tasks.spawn(acme::http01::serve(
                listener,
                challenges,
                shared.drain.clone(),
            ));
        }
        let admin = admin.map(|listener| {
            let admin = Admin::new(identity.clone(), acme.clone())
                .with_inbound(inbound.clone())
                .with_outbound(outbound.clone())
                .with_tunnels(tcp_services.clone(), tunnels.clone())
                .with_metrics(shared.metrics.clone())
                .with_drain(shared.drain.clone())
                .with_attestor(shared.attestor.clone());
            let admin = Arc::new(admin);
            tasks.spawn(admin.clone().serve(listener));
            admin
        });
        start_registry(
            &config,
            &identity,
            inbound.as_ref(),
            &bound,
            &mut background,
        );
        // Collateral: from the PCCS when one is configured (cached in the directory), else the
        // directory as an operator keeps it.
        if let (Some(attestor), Some(attestation)) = (&shared.attestor, &config.attestation) {
            let (attestor, dir) = (attestor.clone(), attestation.collateral_dir.clone());
            match &attestation.pccs {
                Some(pccs) => match crate::pccs::Pccs::new(&pccs.url) {
                    Ok(client) => {
                        for fmspc in &pccs.fmspcs {
                            background.spawn(crate::pccs::keep(
                                attestor.clone(),
                                client.clone(),
                                fmspc.clone(),
                                dir.clone(),
                            ));
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "attestation: no PCCS client; the directory alone serves")
                    }
                },
                None => {
                    background.spawn(trust::keep_collateral(attestor, dir));
                }
            }
        }
        let mut acme_tasks = JoinSet::new();
        if let Some(acme) = &acme {
            acme.start(&mut acme_tasks);
        }
        for (what, addr) in &bound {
            tracing::info!(listener = %what, %addr, "listening");
        }
        Ok(Self {
            identity,
            inbound,
            auth,
            outbound,
            acme,
            tcp_services,
            tunnels,
            bound,
            drain: shared.drain,
            drain_timeout: config.drain_timeout,
            running: config,
            admin,
            acme_tasks,
            tasks,
            _workers: workers,
            attestor: shared.attestor.clone(),
            _background: background,
        })
    }

    /// The address a listener actually bound (`inbound`, `auth`, `outbound`, `http`, `admin`,
    /// `tcp:<name>`, `tunnel:<name>`).
    pub fn addr(&self, what: &str) -> Option<SocketAddr> {
        self.bound.iter().find(|(w, _)| *w == what).map(|(_, a)| *a)
    }

    /// Serve until `shutdown` resolves, applying each configuration `reloads` delivers (SIGHUP;
    /// a load error is logged and the running configuration stays); then drain: stop accepting,
    /// let in-flight requests finish (up to `[lifecycle] drain_timeout`), stop.
    pub async fn run_until(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
        mut reloads: tokio::sync::mpsc::Receiver<Result<Config, ReloadError>>,
    ) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(ended) = self.tasks.join_next() => {
                    tracing::error!(?ended, "a listener stopped unexpectedly");
                    break;
                }
                Some(loaded) = reloads.recv() => match loaded.and_then(|c| self.reload(c)) {
                    Ok(report) => tracing::info!(applied = ?report.applied, needs_restart = ?report.needs_restart, "configuration reloaded"),
                    Err(e) => tracing::error!(error = %e, "configuration reload rejected: the running configuration stays"),
                },
            }
        }
        self.drain.start();
        // The listeners return once they see the drain; joining them drops their sockets, so
        // new connections are refused from here on.
        let stopped = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(std::time::Duration::from_secs(1), stopped)
            .await
            .is_err()
        {
            self.tasks.shutdown().await;
        }
        let open = self.drain.live();
        tracing::info!(connections = open, deadline = ?self.drain_timeout, "shutting down: no new connections; finishing requests in flight");
        match self.drain.wait(self.drain_timeout).await {
            0 => tracing::info!("drained: every connection finished"),
            left => tracing::warn!(
                connections = left,
                "drain deadline passed: closing what is left"
            ),
        }
    }
}

/// What every listener shares: the drain (SIGTERM), the request metrics, and the attestation
/// policy when `[attestation]` requires one.
struct Shared {
    drain: proxy::Drain,
    metrics: Arc<crate::metrics::Metrics>,
    attestor: Option<Arc<ratls::attested::Attestor>>,
}

/// Where listeners bound, by name.
type Bound = Vec<(String, SocketAddr)>;

/// The inbound listener (with the public domains on it), bound.
async fn bind_inbound(
    config: &Config,
    identity: &RotatingIdentity,
    acme: Option<&Arc<Acme>>,
    shared: &Shared,
    bound: &mut Bound,
) -> Result<Option<(Arc<Inbound>, Sockets)>, StartError> {
    if !config.inbound.enabled {
        return Ok(None);
    }
    let mut inbound = Inbound::new(config.inbound.clone(), identity, shared.attestor.clone())?
        .with_drain(shared.drain.clone())
        .with_metrics(shared.metrics.clone());
    if let Some(acme) = acme {
        inbound = inbound.with_public(acme.clone())?;
    }
    let inbound = Arc::new(inbound);
    let sockets = match runtime::workers() {
        0 => Sockets::Shared(inbound.bind().await?),
        n => Sockets::bind_per_worker("inbound.listen", config.inbound.listen, n)?,
    };
    bound.push(("inbound".into(), sockets.local()));
    Ok(Some((inbound, sockets)))
}

/// What the app's instances share for public domains: the `[store]` and this app's id.
fn shared_store(config: &Config, identity: &RotatingIdentity) -> acme::Shared {
    acme::Shared {
        store: config.store.clone(),
        app_id: identity.current().app_id.clone(),
    }
}

/// The auth service for nginx, bound; nginx's word counts only with its secret and a CA file
/// that holds the mesh roots alone.
async fn bind_auth(
    config: &Config,
    identity: &RotatingIdentity,
    shared: &Shared,
    bound: &mut Bound,
) -> Result<Option<(Arc<AuthService>, Sockets)>, StartError> {
    let settings = &config.auth;
    if !settings.listener.enabled {
        return Ok(None);
    }
    let allow = settings.allow.as_ref().unwrap_or(&config.inbound.allow);
    let policy = trust::mesh_policy(&config.inbound, allow, identity, shared.attestor.as_ref())?;
    let addr = settings.listener.listen;
    let sockets = match runtime::workers() {
        0 => Sockets::Shared(bind("auth.listen", addr, bound, "auth").await?),
        n => {
            let sockets = Sockets::bind_per_worker("auth.listen", addr, n)?;
            bound.push(("auth".into(), sockets.local()));
            sockets
        }
    };
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "the auth service listens beyond loopback: anything that reaches it can ask about certificates; nginx should be its only client");
    }
    let roots_trusted =
        || trust::nginx_roots_are_trusted(&config.tls.ca_file, &config.inbound, identity);
    let nginx = match (&settings.nginx_secret, settings.trust_nginx_chain) {
        (_, false) => NginxProof::Never,
        (Some(secret), true) if roots_trusted() => NginxProof::Secret(secret.clone()),
        (None, true) if settings.trust_loopback && roots_trusted() => {
            tracing::warn!("auth: nginx's word on a chain is taken from any caller on loopback (auth.trust_loopback); a secret (auth.nginx_secret) limits it to nginx");
            NginxProof::Loopback
        }
        (None, true) if !settings.trust_loopback => {
            tracing::info!("no auth.nginx_secret: the auth service verifies every chain itself (a KMS leaf that nginx passes alone is refused); render nginx's configuration with `dstack-mesh nginx-config server` and a secret to take nginx's word");
            NginxProof::Never
        }
        _ => NginxProof::Never,
    };
    let auth = AuthService::new(Arc::new(policy), nginx)
        .with_limits(settings.header_timeout, settings.max_connections)
        .with_drain(shared.drain.clone());
    Ok(Some((Arc::new(auth), sockets)))
}

/// The outbound proxy, bound (its gateway is set when it starts serving).
async fn bind_outbound(
    config: &Config,
    identity: &RotatingIdentity,
    shared: &Shared,
    bound: &mut Bound,
) -> Result<Option<(Arc<Outbound>, Sockets)>, StartError> {
    if !config.client.enabled {
        return Ok(None);
    }
    let anchors = trust::mesh_anchors(&config.inbound, identity)?;
    let access = outbound::AgentAccess {
        quotes: config.outbound.agent_quote_methods,
        keys: config.outbound.agent_key_methods,
    };
    let agent = AgentPassthrough::new(identity.agent().clone(), access);
    let outbound = Outbound::new(
        config.client.listen,
        config.outbound.clone(),
        identity.resolver(),
        anchors,
        Some(agent),
    )?
    .with_drain(shared.drain.clone())
    .with_attestor(shared.attestor.clone())
    .with_metrics(shared.metrics.clone());
    if !config.client.listen.ip().is_loopback() {
        tracing::warn!(addr = %config.client.listen, "the outbound proxy listens beyond loopback: anything that reaches it can call other apps as this app");
    }
    let outbound = Arc::new(outbound);
    let sockets = match runtime::workers() {
        0 => Sockets::Shared(outbound.bind().await?),
        n => Sockets::bind_per_worker("client.listen", config.client.listen, n)?,
    };
    bound.push(("outbound".into(), sockets.local()));
    Ok(Some((outbound, sockets)))
}

/// The registry role on the inbound listener, and this sidecar's own registration through its
/// outbound proxy, as `[registry]` asks.
fn start_registry(
    config: &Config,
    identity: &RotatingIdentity,
    inbound: Option<&Arc<Inbound>>,
    bound: &Bound,
    background: &mut JoinSet<()>,
) {
    let own = identity.current().app_id.clone();
    if let (true, Some(inbound)) = (config.registry.enabled, inbound) {
        let registry = Registry::load(&config.registry, &own);
        // With an etcd store, the entries live there (sealed with the app's key).
        #[cfg(feature = "etcd")]
        let registry = match acme::fleet(&config.store, &own, identity.agent()) {
            Some(fleet) => registry.with_fleet(fleet),
            None => registry,
        };
        let registry = Arc::new(registry);
        inbound.set_registry(registry.clone());
        background.spawn(registry.keep());
    }
    let outbound = bound.iter().find(|(w, _)| w == "outbound").map(|(_, a)| *a);
    if let (Some(registration), Some(outbound)) = (&config.registry.register, outbound) {
        let server = match &registration.server_app {
            RegistryApp::OwnApp => own,
            RegistryApp::App(app) => app.clone(),
        };
        // The services this node offers, at the ports tunnels target.
        let ports = (config.tcp_services.iter())
            .map(|s| {
                let name = format!("tcp:{}", s.name);
                let port = (bound.iter().find(|(w, _)| *w == name))
                    .map_or(s.listen.port(), |(_, a)| a.port());
                NodePort {
                    name: s.name.clone(),
                    port,
                }
            })
            .collect();
        background.spawn(registry::client::keep_registered(
            outbound,
            server,
            registration.clone(),
            ports,
        ));
    }
}

/// The attested TCP services, bound; they trust what the inbound listener trusts.
async fn bind_tcp_services(
    config: &Config,
    identity: &RotatingIdentity,
    shared: &Shared,
    bound: &mut Bound,
) -> Result<Vec<(Arc<TcpService>, TcpListener)>, StartError> {
    let mut services = Vec::new();
    for service in &config.tcp_services {
        let service = TcpService::new(
            service.clone(),
            &config.inbound,
            identity,
            shared.attestor.clone(),
        )?
        .with_drain(shared.drain.clone())
        .with_metrics(shared.metrics.clone());
        let listener = service.bind().await?;
        bound.push((format!("tcp:{}", service.config().name), local(&listener)));
        services.push((Arc::new(service), listener));
    }
    Ok(services)
}

/// The tunnel ports, bound; they dial through `outbound`'s gateway and routes.
async fn bind_tunnels(
    config: &Config,
    outbound: &Arc<Outbound>,
    shared: &Shared,
    bound: &mut Bound,
) -> Result<Vec<(Arc<TunnelPort>, TcpListener)>, StartError> {
    let mut ports = Vec::new();
    for tunnel in &config.tunnels {
        let port =
            TunnelPort::new(tunnel.clone(), outbound.clone()).with_drain(shared.drain.clone());
        let listener = port.bind().await.map_err(|source| StartError::Bind {
            what: "tunnels.listen",
            addr: tunnel.listen,
            source,
        })?;
        bound.push((format!("tunnel:{}", tunnel.name), local(&listener)));
        ports.push((Arc::new(port), listener));
    }
    Ok(ports)
}

/// Why a reload was refused; the running configuration stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file or the environment does not load.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigErrors),
    /// The new allowlist or public domains cannot be served.
    #[error(transparent)]
    Inbound(#[from] inbound::InboundError),
    /// A trust anchor is unusable.
    #[error(transparent)]
    Trust(#[from] TrustError),
    /// The new public domains cannot be set up.
    #[error(transparent)]
    Acme(#[from] acme::AcmeError),
    /// The configurations could not be compared.
    #[error("comparing configurations: {0}")]
    Compare(serde_json::Error),
}

/// What a reload changed, and what it could not change without a restart.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// Settings now in force.
    pub applied: Vec<&'static str>,
    /// Sections that differ but are only read at start.
    pub needs_restart: Vec<String>,
}

impl App {
    /// Apply `new` where it can be applied live: the inbound and auth allowlists and the
    /// outbound static routes. Everything is built before anything is swapped, so a failure
    /// changes nothing. Other changed sections are reported as needing a restart.
    // Long on purpose: everything a reload changes is built first and swapped after, in one
    // place, so that no failure can leave half a configuration applied.
    pub fn reload(&mut self, new: Config) -> Result<ReloadReport, ReloadError> {
        let old = &self.running;
        let mut report = ReloadReport::default();
        let inbound_allow = match (&self.inbound, new.inbound.allow != old.inbound.allow) {
            (Some(inbound), true) => {
                Some(inbound.prepare_allow(&new.inbound.allow, &self.identity)?)
            }
            _ => None,
        };
        let auth_allow = |c: &Config| c.auth.allow.clone().unwrap_or(c.inbound.allow.clone());
        let auth_policy = match (&self.auth, auth_allow(&new) != auth_allow(old)) {
            (Some(_), true) => Some(Arc::new(trust::mesh_policy(
                &new.inbound,
                &auth_allow(&new),
                &self.identity,
                self.attestor.as_ref(),
            )?)),
            _ => None,
        };
        // Public domains: a new subsystem on the same store (stored certificates serve at once,
        // nothing is reissued) and the same challenge responses (the :80 listener's).
        let public = match (
            &self.inbound,
            public_reloadable(&new) != public_reloadable(old),
        ) {
            (Some(inbound), true) => {
                let acme = match new.public.serves_domains() {
                    false => None,
                    true => Some(Acme::new(
                        &new.public,
                        &shared_store(&new, &self.identity),
                        self.identity.agent().clone(),
                        self.acme.as_ref().map(|a| a.challenges()),
                    )?),
                };
                let side = inbound.prepare_public(acme.clone())?;
                Some((acme, side))
            }
            _ => None,
        };
        let routes = match (&self.outbound, new.outbound.routes != old.outbound.routes) {
            (Some(_), true) => Some(new.outbound.routes.clone()),
            _ => None,
        };

        // Everything built: swap.
        let mut running = self.running.clone();
        if new.drain_timeout != old.drain_timeout {
            self.drain_timeout = new.drain_timeout;
            running.drain_timeout = new.drain_timeout;
            report.applied.push("lifecycle.drain_timeout");
        }
        if let (Some(inbound), Some(prepared)) = (&self.inbound, inbound_allow) {
            inbound.apply_allow(prepared);
            running.inbound.allow = new.inbound.allow.clone();
            report.applied.push("inbound.allowed_apps");
        }
        if let (Some(auth), Some(policy)) = (&self.auth, auth_policy) {
            auth.set_policy(policy);
            running.auth.allow = new.auth.allow.clone();
            running.inbound.allow = new.inbound.allow.clone();
            report.applied.push("auth.allowed_apps");
        }
        if let (Some(inbound), Some((acme, side))) = (&self.inbound, public) {
            inbound.set_public(side);
            if let Some(admin) = &self.admin {
                admin.set_acme(acme.clone());
            }
            // Dropping the old tasks stops the old domains' renewals; the new ones start.
            self.acme_tasks = JoinSet::new();
            if let Some(acme) = &acme {
                acme.start(&mut self.acme_tasks);
            }
            self.acme = acme;
            let http_listen = running.public.acme.http_listen;
            running.public = new.public.clone();
            running.public.acme.http_listen = http_listen;
            report.applied.push("domains");
        }
        // The attestation rules; its collateral sources and TDX root are read at start.
        if let (Some(attestor), Some(now), Some(want)) =
            (&self.attestor, &mut running.attestation, &new.attestation)
        {
            if now.rules != want.rules {
                attestor.set_rules(want.rules.clone());
                now.rules = want.rules.clone();
                report.applied.push("attestation");
            }
        }
        if let (Some(outbound), Some(routes)) = (&self.outbound, routes) {
            outbound.set_routes(routes);
            running.outbound.routes = new.outbound.routes.clone();
            report.applied.push("outbound.routes");
        }
        // What still differs is read only at start.
        let (now, want) = (
            serde_json::to_value(&running).map_err(ReloadError::Compare)?,
            serde_json::to_value(&new).map_err(ReloadError::Compare)?,
        );
        if let (Some(now), Some(want)) = (now.as_object(), want.as_object()) {
            report.needs_restart = want
                .iter()
                .filter(|(k, v)| now.get(*k) != Some(v))
                .map(|(k, _)| k.clone())
                .collect();
        }
        if !report.needs_restart.is_empty() {
            tracing::warn!(sections = ?report.needs_restart, "changed settings that are read only at start: restart to apply them");
        }
        self.running = running;
        Ok(report)
    }
}

/// The public-domain settings a reload can apply (all but the `:80` listener's address), and
/// the store they live in.
fn public_reloadable(
    c: &Config,
) -> (
    crate::config::PublicConfig,
    crate::config::store::StoreConfig,
) {
    let mut p = c.public.clone();
    p.acme.http_listen = None;
    (p, c.store.clone())
}

/// Bind `addr` for the listener `name` (its configuration `key` in errors).
async fn bind(
    key: &'static str,
    addr: SocketAddr,
    bound: &mut Bound,
    name: &'static str,
) -> Result<TcpListener, StartError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind {
            what: key,
            addr,
            source,
        })?;
    bound.push((name.into(), local(&listener)));
    Ok(listener)
}

/// A busy listener's sockets: one served on the process's runtime, or one per per-core worker
/// (`SO_REUSEPORT`, the same address).
enum Sockets {
    Shared(TcpListener),
    PerWorker(Vec<std::net::TcpListener>),
}

impl Sockets {
    fn bind_per_worker(key: &'static str, addr: SocketAddr, n: usize) -> Result<Self, StartError> {
        runtime::reuseport_listeners(addr, n)
            .map(Self::PerWorker)
            .map_err(|source| StartError::Bind {
                what: key,
                addr,
                source,
            })
    }

    fn local(&self) -> SocketAddr {
        match self {
            Self::Shared(listener) => local(listener),
            Self::PerWorker(listeners) => listeners
                .first()
                .and_then(|l| l.local_addr().ok())
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
        }
    }
}

/// The per-core workers' jobs, gathered while the listeners are set up.
struct PerWorker(Vec<Vec<runtime::Job>>);

impl PerWorker {
    fn new(workers: usize) -> Self {
        Self((0..workers).map(|_| Vec::new()).collect())
    }

    /// Serve `sockets` with `serve`: in `tasks` on this runtime, or on each worker (a listener
    /// is registered with the runtime that serves it).
    fn serve<F, Fut>(&mut self, sockets: Sockets, tasks: &mut JoinSet<()>, serve: F)
    where
        F: Fn(TcpListener) -> Fut + Clone + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listeners = match sockets {
            Sockets::Shared(listener) => {
                tasks.spawn(serve(listener));
                return;
            }
            Sockets::PerWorker(listeners) => listeners,
        };
        for (jobs, listener) in self.0.iter_mut().zip(listeners) {
            let serve = serve.clone();
            jobs.push(Box::new(move || {
                Box::pin(async move {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => serve(listener).await,
                        Err(e) => tracing::error!(error = %e, "a worker cannot serve its socket"),
                    }
                })
            }));
        }
    }

    /// Start the workers that have jobs; each one's end (its listeners closed) ends a task in
    /// `tasks`, as a listener on this runtime would.
    fn start(self, tasks: &mut JoinSet<()>) -> Result<Option<Workers>, StartError> {
        if self.0.iter().all(Vec::is_empty) {
            return Ok(None);
        }
        let (workers, done) = Workers::start(self.0).map_err(StartError::Workers)?;
        for listening in done {
            tasks.spawn(async move {
                let _ = listening.await;
            });
        }
        Ok(Some(workers))
    }
}

fn local(listener: &TcpListener) -> SocketAddr {
    listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}
