//! Public domains: certificates obtained (ACME or the internal CA), stored, served by SNI on
//! the inbound listener, and renewed.
//!
//! Each domain has one task that owns its lifecycle:
//! `pending → issuing → valid → renewing → valid`, or `failed` with the CA's message and the
//! time of the next attempt. The certificate being served changes only when a new one has been
//! checked (chain, key match, names) and stored, through an `ArcSwap` the TLS resolver reads,
//! so a renewal never drops a connection and a failed one keeps the old certificate serving.

pub mod ari;
pub mod cert;
pub mod challenge;
pub mod client;
pub mod dns01;
pub mod eab;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod evidence;
pub mod health;
pub mod http01;
pub mod internal;
pub mod limits;
pub mod on_demand;
mod records;
pub(crate) mod renewal;
#[cfg(feature = "etcd")]
pub mod replicas;
pub mod revoke;
pub mod seal;
pub mod sources;
pub mod store;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use arc_swap::{ArcSwap, ArcSwapOption};
use ratls::agent::AgentClient;
use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::{sync::Notify, task::JoinSet};

use crate::config::{store::StoreConfig, AcmeConfig, DomainConfig, Issuer, Mode, PublicConfig};

/// What the instances of an app share: where (`[store]`) and as which app.
#[derive(Clone, Debug)]
pub struct Shared {
    /// The store backend.
    pub store: StoreConfig,
    /// The app, whose key seals the values and whose id names its prefix.
    pub app_id: ratls::AppId,
}
use cert::Loaded;
use challenge::Challenges;
use client::AcmeClient;
use internal::InternalIssuer;
use store::{CertStore, DirStore};

/// Longest sleep between checks of a valid certificate (clock jumps, suspended VMs).
const RECHECK: Duration = Duration::from_secs(12 * 3600);
/// Backoff cap while a domain has no usable certificate: it is down until one arrives.
const CAP_WITHOUT_CERT: Duration = Duration::from_secs(300);
/// Backoff cap in the last week before expiry.
const CAP_NEAR_EXPIRY: Duration = Duration::from_secs(1800);
/// Longest a whole order may take, whatever the CA does.
const ORDER_DEADLINE: Duration = Duration::from_secs(300);

/// Why the public-domain subsystem could not start.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    /// A configured root file is unusable.
    #[error("acme.ca_roots: {0}")]
    Roots(#[from] crate::https::RootsError),
    /// The DNS provider could not be set up.
    #[error("dns: {0}")]
    Dns(#[from] dns01::SetupError),
    /// The ACME client could not be built (its roots: `acme.ca_roots`).
    #[error("ACME client for {directory}: acme.ca_roots: {reason}")]
    Client {
        /// The directory.
        directory: String,
        /// Why.
        reason: crate::https::RootsError,
    },
}

/// Where a domain is in its lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Nothing issued yet; the first order has not started.
    Pending,
    /// The first certificate is being ordered.
    Issuing,
    /// A certificate is served and not yet due.
    Valid,
    /// A served certificate is being replaced.
    Renewing,
    /// The last attempt failed; see the error and the next attempt.
    Failed,
    /// Its DNS leads elsewhere (`[domain_health]`): no order until it points here again.
    DnsMoved,
}

/// A domain's state as the admin endpoint and `certs list` show it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CertStatus {
    /// Primary name.
    pub domain: String,
    /// Every name on the certificate.
    pub names: Vec<String>,
    /// Lifecycle state.
    pub status: Status,
    /// Configured issuer.
    pub issuer: String,
    /// The served certificate's issuer name, if any.
    pub issued_by: Option<String>,
    /// `http` or `tcp`.
    pub mode: Mode,
    /// Where traffic goes.
    pub backend: String,
    /// Start of validity (Unix seconds).
    pub not_before: Option<u64>,
    /// End of validity (Unix seconds).
    pub not_after: Option<u64>,
    /// When renewal is due (Unix seconds).
    pub renew_at: Option<u64>,
    /// Serial of the served certificate (hex).
    pub serial: Option<String>,
    /// The served certificate has expired.
    pub expired: bool,
    /// The last error, until an attempt succeeds.
    pub last_error: Option<String>,
    /// When the next attempt starts after a failure (Unix seconds).
    pub next_attempt: Option<u64>,
    /// Failed attempts in a row.
    pub consecutive_failures: u32,
    /// Failed attempts since start.
    pub failures_total: u64,
    /// Certificates obtained since start.
    pub issued_total: u64,
    /// The dstack DNS records (CNAME, app-address TXT, CAA): `in place` or the last error;
    /// absent when no DNS provider writes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_records: Option<String>,
    /// The records the operator must create when no DNS provider writes them
    /// (`DNS_SETUP_MODE`), each with whether the DoH resolvers see it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_setup: Option<Vec<dns01::setup::RecordCheck>>,
    /// The fleet's copy in the shared store: `shared`, or why it was refused or could not
    /// be read; absent with the file store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<String>,
    /// Certificates taken from the fleet (another instance ordered them) since start.
    #[serde(default)]
    pub from_fleet_total: u64,
    /// The CA's renewal window (ARI) for the served certificate, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewal_info: Option<String>,
    /// Its source dropped it: served until then (Unix seconds), the source's grace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removing_at: Option<u64>,
    /// Where its DNS leads, as last checked (`[domain_health]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_health: Option<String>,
    /// The last visit to the site through its public path (`[domain_health] probe`):
    /// `ok: ...` or `failed: ...`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site_probe: Option<String>,
    /// Why its order waits, while the CA's rate limit holds it back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued: Option<String>,
    /// The source that lists it (`[[domain_sources]]`); absent for a configured domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Why its source fails, while it does (the domain stays, from the last good list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_error: Option<String>,
}

#[derive(Debug, Default)]
struct DomainState {
    status: Option<Status>,
    last_error: Option<String>,
    /// Why the certificate served now is not in the local store (a full disk), if it is not.
    unstored: Option<String>,
    next_attempt: Option<SystemTime>,
    consecutive_failures: u32,
    failures_total: u64,
    issued_total: u64,
    /// The stored certificate came from another issuer or for other names: replace it.
    stale: bool,
    /// The dstack DNS records: `in place` or the last error.
    dns_records: Option<String>,
    /// The records the operator must create (`DNS_SETUP_MODE`), as last seen.
    dns_setup: Option<Vec<dns01::setup::RecordCheck>>,
    /// What was last posted to the DNS webhook (posted again only when it changes).
    posted: Option<Vec<dns01::webhook::Required>>,
    /// The records were seen once and the settle pause is behind us.
    settled: bool,
    /// The fleet's copy: `shared`, refused, or unreadable.
    fleet: Option<String>,
    from_fleet_total: u64,
    /// Serials revoked here (`certs revoke`): never served again, whoever offers them.
    revoked: Vec<String>,
    /// The CA's renewal window for the served certificate (ARI), when it gave one.
    ari: Option<renewal::AriState>,
    /// Why its order waits for the rate limit, while it does.
    queued: Option<String>,
    /// Its source dropped it: served until then.
    removing_at: Option<SystemTime>,
    /// Where its DNS leads elsewhere, while it does.
    dns_moved: Option<String>,
    dns_moved_since: Option<SystemTime>,
    /// The last health check, in words.
    dns_health: Option<String>,
    /// The last probe of the site, in words.
    site_probe: Option<String>,
}

/// One public domain at run time.
pub struct Domain {
    /// Its configuration.
    pub config: DomainConfig,
    /// The source that lists it; none for a configured domain.
    pub source: Option<String>,
    /// Its TLS configuration on the listener, built at its first connection (a sourced
    /// domain; the configured ones are built with the listener).
    pub(crate) tls: std::sync::OnceLock<Arc<rustls::ServerConfig>>,
    served: ArcSwapOption<Loaded>,
    serving: Arc<ArcSwapOption<CertifiedKey>>,
    state: Mutex<DomainState>,
    renew_now: Notify,
    /// Its DNS points here again (an order held back goes).
    dns_back: Notify,
    /// Ticks at every change of what it serves or of its state (handshakes waiting for an
    /// on-demand certificate watch it).
    events: tokio::sync::watch::Sender<()>,
}

impl std::fmt::Debug for Domain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Domain")
            .field("names", &self.config.names)
            .finish_non_exhaustive()
    }
}

impl Domain {
    /// A domain with nothing served yet.
    fn new(config: DomainConfig, source: Option<String>) -> Self {
        Self {
            config,
            source,
            tls: std::sync::OnceLock::new(),
            served: ArcSwapOption::empty(),
            serving: Arc::new(ArcSwapOption::empty()),
            state: Mutex::new(DomainState::default()),
            renew_now: Notify::new(),
            dns_back: Notify::new(),
            events: tokio::sync::watch::Sender::new(()),
        }
    }

    /// The certificate this domain serves now (none: a TLS alert, never another domain's or
    /// the mesh one); renewals swap it under the listener.
    pub fn resolver(&self) -> Arc<dyn ResolvesServerCert> {
        Arc::new(DomainResolver(self.serving.clone()))
    }

    /// The primary name.
    pub fn name(&self) -> &str {
        self.config.primary()
    }

    fn serve(&self, loaded: Option<Loaded>) {
        self.serving.store(loaded.as_ref().map(|l| l.key.clone()));
        self.served.store(loaded.map(Arc::new));
        self.events.send_replace(());
    }

    fn set(&self, f: impl FnOnce(&mut DomainState)) {
        if let Ok(mut s) = self.state.lock() {
            f(&mut s);
        }
        self.events.send_replace(());
    }
}

/// Serves whatever certificate the domain holds now; none means a TLS alert, never another
/// domain's certificate or the mesh one.
#[derive(Debug)]
struct DomainResolver(Arc<ArcSwapOption<CertifiedKey>>);

impl ResolvesServerCert for DomainResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.load_full()
    }
}

enum IssuerRuntime {
    Acme(Arc<AcmeClient>),
    Internal(Arc<InternalIssuer>),
}

/// The public-domain subsystem.
pub struct Acme {
    /// The configured domains.
    domains: Vec<Arc<Domain>>,
    exact: HashMap<String, usize>,
    wildcard: HashMap<String, usize>,
    /// Where more domains come from, and the ones they list now.
    sources: Vec<sources::Source>,
    sourced: ArcSwap<sources::Sourced>,
    /// Names admitted at their first handshake, when `[on_demand]` is set.
    on_demand: Option<on_demand::OnDemand>,
    /// The CA's rate limits, kept here so that orders queue.
    limits: limits::Limits,
    /// Whether customer domains still point here, when checked.
    health: Option<health::Health>,
    /// A certificate changed: the evidence is rewritten (once for a burst: with thousands of
    /// domains, once per certificate would be quadratic).
    evidence_due: Notify,
    challenges: Arc<Challenges>,
    store: Arc<dyn CertStore>,
    issuers: HashMap<Issuer, IssuerRuntime>,
    evidence: Arc<evidence::Evidence>,
    config: AcmeConfig,
    /// The fleet's store, when instances share certificates through etcd.
    #[cfg(feature = "etcd")]
    replicas: Option<Arc<replicas::Replicas>>,
    /// The DNS provider and resolvers, when configured.
    dns: Option<Arc<dns01::Dns>>,
    agent: AgentClient,
}

impl std::fmt::Debug for Acme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acme")
            .field("domains", &self.domains.len())
            .field("store", &self.store.location())
            .finish_non_exhaustive()
    }
}

/// A uniformly random duration below `max` (jitter).
fn jitter(max: Duration) -> Duration {
    let mut bytes = [0u8; 8];
    let _ = aws_lc_rs::rand::SecureRandom::fill(&aws_lc_rs::rand::SystemRandom::new(), &mut bytes);
    let max_ms = max.as_millis().max(1) as u64;
    Duration::from_millis(u64::from_le_bytes(bytes) % max_ms)
}

/// One issuer per distinct `issuer` of the domains: an ACME client (the account derived from
/// the app's key, the CA's roots) or the internal CA (its key derived too when `shares_keys`:
/// the instances must agree on it).
fn issuers(
    public: &PublicConfig,
    agent: &AgentClient,
    store: &Arc<dyn CertStore>,
    shares_keys: bool,
) -> Result<HashMap<Issuer, IssuerRuntime>, AcmeError> {
    let mut extra_roots = Vec::new();
    for path in &public.acme.ca_roots {
        extra_roots.extend(crate::https::roots_file(path)?);
    }
    let mut issuers = HashMap::new();
    let routes = public.sources.iter().map(|s| &s.route);
    for d in public.domains.iter().chain(routes) {
        if issuers.contains_key(&d.issuer) {
            continue;
        }
        let runtime = match &d.issuer {
            Issuer::Acme(directory) => IssuerRuntime::Acme(Arc::new(
                AcmeClient::new(
                    directory,
                    &extra_roots,
                    public.acme.ca_timeout,
                    agent.clone(),
                    store.clone(),
                    public.acme.email.clone(),
                    public.acme.eab.clone(),
                )
                .map_err(|reason| AcmeError::Client {
                    directory: directory.clone(),
                    reason,
                })?
                .with_caa_identities(public.dns.caa_identities.clone())
                .with_profile(public.acme.profile.clone()),
            )),
            Issuer::InternalCa => IssuerRuntime::Internal(Arc::new(InternalIssuer::new(
                store.clone(),
                public.acme.internal_ca_lifetime,
                shares_keys.then(|| agent.clone()),
            ))),
        };
        issuers.insert(d.issuer.clone(), runtime);
    }
    Ok(issuers)
}

impl Acme {
    /// Build the subsystem: open the store, load stored certificates, prepare the issuers.
    /// Nothing talks to a CA until [`Acme::start`]. `challenges` carries over from the
    /// instance a reload replaces, since the `:80` listener answers from it.
    pub fn new(
        public: &PublicConfig,
        shared: &Shared,
        agent: AgentClient,
        challenges: Option<Arc<Challenges>>,
    ) -> Result<Arc<Self>, AcmeError> {
        let store: Arc<dyn CertStore> = Arc::new(DirStore::new(&public.acme.store));
        let challenges = challenges.unwrap_or_default();
        // Instances that share certificates (etcd) or keys (derived) share the internal CA.
        let shares_keys = !matches!(shared.store, StoreConfig::File)
            || public.acme.key_source == crate::config::KeySource::Derived;
        let issuers = issuers(public, &agent, &store, shares_keys)?;
        let mut domains = Vec::new();
        let (mut exact, mut wildcard) = (HashMap::new(), HashMap::new());
        for (i, config) in public.domains.iter().enumerate() {
            for name in &config.names {
                match name.strip_prefix("*.") {
                    Some(base) => wildcard.insert(base.to_owned(), i),
                    None => exact.insert(name.clone(), i),
                };
            }
            domains.push(Arc::new(Domain::new(config.clone(), None)));
        }
        let loading: Vec<&Domain> = domains.iter().map(Arc::as_ref).collect();
        renewal::load_all_stored(store.as_ref(), &loading);
        let dns = match public.dns.provider.is_some()
            || !public.dns.resolvers.is_empty()
            || public.dns.setup.is_some()
        {
            true => Some(Arc::new(dns01::Dns::new(&public.dns)?)),
            false => None,
        };
        #[cfg(feature = "etcd")]
        let replicas = fleet(&shared.store, &shared.app_id, &agent);
        #[cfg(feature = "etcd")]
        if let Some(fleet) = &replicas {
            challenges.share_with(fleet.clone());
        }
        Ok(Arc::new(Self {
            #[cfg(feature = "etcd")]
            replicas,
            dns,
            agent: agent.clone(),
            domains,
            exact,
            wildcard,
            sources: public
                .sources
                .iter()
                .cloned()
                .map(sources::Source::new)
                .collect(),
            sourced: ArcSwap::default(),
            on_demand: match public.sources.iter().find_map(|s| match &s.kind {
                crate::config::sources::SourceKind::OnDemand(od) => Some((od.clone(), s.timeout)),
                _ => None,
            }) {
                Some((config, timeout)) => Some(on_demand::OnDemand::new(config, timeout)?),
                None => None,
            },
            challenges,
            evidence_due: Notify::new(),
            health: public
                .health
                .clone()
                .map(|h| health::Health::new(h, &shared.app_id.to_string())),
            limits: limits::Limits::new(
                public.acme.order_limit,
                public.acme.domain_limit,
                store.clone(),
            ),
            store,
            issuers,
            evidence: evidence::Evidence::new(&public.acme.evidence_dir, agent),
            config: public.acme.clone(),
        }))
    }

    /// Start one lifecycle task per domain.
    pub fn start(self: &Arc<Self>, tasks: &mut JoinSet<()>) {
        // A wrong etcd endpoint or credential shows at start, not at the first renewal; then
        // this instance answers the fleet's challenges.
        #[cfg(feature = "etcd")]
        if let Some(replicas) = self.replicas.clone() {
            let challenges = self.challenges.clone();
            let fleet = replicas.clone();
            tasks.spawn(async move {
                match replicas.check().await {
                    Ok(()) => tracing::info!(store = %replicas.location(), "sharing certificates with the app's other instances"),
                    Err(e) => tracing::error!(store = %replicas.location(), error = %e, "the fleet's store is unavailable: certificates held here are served, orders wait for it"),
                }
                replicas.serve_challenges(challenges).await;
            });
            tasks.spawn(self.clone().follow_fleet(fleet));
        }
        for domain in &self.domains {
            self.start_domain(domain, tasks);
        }
        tasks.spawn(self.clone().follow_sources());
        // Stored certificates get fresh evidence (a new quote) at every start, and again after
        // each change (a burst of changes: once).
        let acme = self.clone();
        acme.evidence_due.notify_one();
        tasks.spawn(async move {
            loop {
                acme.evidence_due.notified().await;
                acme.refresh_evidence().await;
            }
        });
    }

    /// Run `domain`'s lifecycle (and its dstack records, when a DNS provider writes them) in
    /// `tasks`: the handle stops it.
    fn start_domain(
        self: &Arc<Self>,
        domain: &Arc<Domain>,
        tasks: &mut JoinSet<()>,
    ) -> tokio::task::AbortHandle {
        let lifecycle = self.clone().lifecycle(domain.clone());
        let records = self
            .dns
            .as_ref()
            .is_some_and(|d| d.manages_records())
            .then(|| self.clone().dstack_records(domain.clone()));
        // A customer's domain (from a source) is watched for its DNS moving away.
        let health = (domain.source.is_some() && self.health.is_some())
            .then(|| self.clone().watch_health(domain.clone()));
        tasks.spawn(async move {
            let records = async {
                if let Some(records) = records {
                    Box::pin(records).await;
                }
            };
            let health = async {
                if let Some(health) = health {
                    Box::pin(health).await;
                }
            };
            tokio::join!(Box::pin(lifecycle), records, health);
        })
    }

    /// The evidence files (the admin port lists them whatever `evidence_server` says).
    pub fn evidence(&self) -> Arc<evidence::Evidence> {
        self.evidence.clone()
    }

    /// The evidence files, when they are served on the public domains.
    pub fn evidence_served(&self) -> Option<Arc<evidence::Evidence>> {
        self.config.evidence_server.then(|| self.evidence.clone())
    }

    /// Rewrite the evidence: the accounts, every served certificate, sums and a new quote.
    pub async fn refresh_evidence(&self) {
        let mut certs = std::collections::BTreeMap::new();
        for d in &self.domains() {
            if d.served.load().is_none() {
                continue;
            }
            if let Ok(Some(pem)) = self.store.read(&store::domain_key(d.name(), "chain.pem")) {
                certs.insert(
                    d.name().to_owned(),
                    String::from_utf8_lossy(&pem).into_owned(),
                );
            }
        }
        // Nothing served and nothing listed: nothing to say (a revocation of the last
        // certificate still rewrites the listing without it).
        if certs.is_empty() && self.evidence.listed().is_empty() {
            return;
        }
        let mut issuers: Vec<(&Issuer, &IssuerRuntime)> = self.issuers.iter().collect();
        issuers.sort_by_key(|(issuer, _)| issuer.label());
        let mut accounts = Vec::new();
        for (_, runtime) in issuers {
            accounts.push(match runtime {
                IssuerRuntime::Acme(client) => client.describe().await,
                IssuerRuntime::Internal(_) => serde_json::json!({ "issuer": "internal-ca" }),
            });
        }
        // One account reads as certbot's single account does; several as a list.
        let account = match accounts.len() {
            1 => accounts.remove(0),
            _ => serde_json::json!({ "accounts": accounts }),
        };
        match self.evidence.write(&account, &certs).await {
            Ok(()) => {
                tracing::info!(certificates = certs.len(), dir = ?self.evidence, "evidence written")
            }
            Err(e) => tracing::warn!(error = %e, "evidence not written"),
        }
    }

    /// The challenge responses (the `:80` listener answers HTTP-01 from them).
    pub fn challenges(&self) -> Arc<Challenges> {
        self.challenges.clone()
    }

    /// The domain serving `name`: a configured one (exact or alias) first, then one a source
    /// lists, then a wildcard one label up, configured first.
    pub fn lookup(&self, name: &str) -> Option<Arc<Domain>> {
        if let Some(i) = self.exact.get(name) {
            return self.domains.get(*i).cloned();
        }
        let sourced = self.sourced.load();
        if let Some(d) = sourced.exact.get(name) {
            return Some(d.clone());
        }
        let (_, base) = name.split_once('.')?;
        match self.wildcard.get(base) {
            Some(i) => self.domains.get(*i).cloned(),
            None => sourced.wildcard.get(base).cloned(),
        }
    }

    /// The configured domains.
    pub fn configured_domains(&self) -> &[Arc<Domain>] {
        &self.domains
    }

    /// Every domain: the configured ones, then the sourced ones.
    pub fn domains(&self) -> Vec<Arc<Domain>> {
        let sourced = self.sourced.load();
        self.domains.iter().chain(&sourced.list).cloned().collect()
    }

    /// How long a first handshake waits for an on-demand certificate, when `[on_demand]` is
    /// set.
    pub fn on_demand_deadline(&self) -> Option<Duration> {
        self.on_demand.as_ref().map(|o| o.config.deadline)
    }

    /// Each source, and how it is doing.
    pub fn sources(&self) -> Vec<sources::SourceStatus> {
        self.sources.iter().map(sources::Source::status).collect()
    }

    /// Start a renewal of `domain` now (`certs renew`). False when no such domain.
    pub fn renew(&self, domain: &str) -> bool {
        match self.lookup(domain) {
            Some(d) => {
                d.set(|s| s.stale = true);
                d.renew_now.notify_one();
                true
            }
            None => false,
        }
    }

    /// What needs an operator: the fleet's store failing, expired certificates and domains
    /// with none.
    pub fn problems(&self) -> Vec<String> {
        #[cfg(feature = "etcd")]
        let store = self
            .replicas
            .as_ref()
            .and_then(|r| r.problem())
            .map(|why| format!("store: {why}"));
        #[cfg(not(feature = "etcd"))]
        let store = None;
        store
            .into_iter()
            .chain(self.sources.iter().filter_map(sources::Source::problem))
            .chain(self.status().into_iter().filter_map(|s| {
                let why = s.last_error.as_deref().unwrap_or("no attempt finished yet");
                if s.expired {
                    Some(format!(
                        "{}: the certificate expired and renewal keeps failing: {why}",
                        s.domain
                    ))
                } else if s.not_after.is_none() && s.status == Status::Failed {
                    Some(format!("{}: no certificate: {why}", s.domain))
                } else {
                    None
                }
            }))
            .collect()
    }

    /// The shared store, when there is one: whether its last request worked, and the values
    /// refused since start by kind.
    pub fn store_state(&self) -> Option<(bool, Vec<(&'static str, u64)>)> {
        #[cfg(feature = "etcd")]
        if let Some(replicas) = &self.replicas {
            return Some((replicas.problem().is_none(), replicas.refused()));
        }
        None
    }

    /// Every domain's state.
    pub fn status(&self) -> Vec<CertStatus> {
        let now = SystemTime::now();
        let failing: HashMap<&str, String> = self
            .sources
            .iter()
            .filter_map(|s| Some((s.config.name.as_str(), s.status().last_error?)))
            .collect();
        self.domains()
            .iter()
            .map(|d| {
                let served = d.served.load_full();
                let state = d.state.lock().map(|s| {
                    (
                        s.status.unwrap_or(Status::Pending),
                        s.last_error.clone(),
                        s.next_attempt,
                        (s.consecutive_failures, s.failures_total, s.issued_total),
                        (s.dns_records.clone(), s.fleet.clone(), s.from_fleet_total),
                        (
                            s.dns_setup.clone(),
                            s.ari.as_ref().map(|a| a.said().to_owned()),
                            s.queued.clone(),
                            (s.dns_health.clone(), s.site_probe.clone()),
                            s.removing_at,
                        ),
                    )
                });
                let (
                    status,
                    last_error,
                    next_attempt,
                    counts,
                    (records, fleet, from_fleet),
                    (setup, renewal_info, queued, (dns_health, site_probe), removing_at),
                ) = state.unwrap_or((
                    Status::Pending,
                    None,
                    None,
                    (0, 0, 0),
                    (None, None, 0),
                    (None, None, None, (None, None), None),
                ));
                let (consecutive, failures, issued) = counts;
                CertStatus {
                    domain: d.name().to_owned(),
                    names: d.config.names.clone(),
                    status,
                    issuer: d.config.issuer.label(),
                    issued_by: served.as_ref().map(|l| l.issuer.clone()),
                    mode: d.config.mode,
                    backend: d.config.backend.to_string(),
                    not_before: served
                        .as_ref()
                        .map(|l| crate::clock::unix_u64(l.not_before)),
                    not_after: served.as_ref().map(|l| crate::clock::unix_u64(l.not_after)),
                    renew_at: served
                        .as_ref()
                        .map(|l| crate::clock::unix_u64(self.renew_at(d, l))),
                    serial: served.as_ref().map(|l| l.serial.clone()),
                    expired: served.as_ref().is_some_and(|l| l.expired(now)),
                    last_error,
                    next_attempt: next_attempt.map(crate::clock::unix_u64),
                    consecutive_failures: consecutive,
                    failures_total: failures,
                    issued_total: issued,
                    dns_records: records,
                    dns_setup: setup,
                    fleet,
                    from_fleet_total: from_fleet,
                    renewal_info,
                    queued,
                    dns_health,
                    site_probe,
                    removing_at: removing_at.map(crate::clock::unix_u64),
                    source: d.source.clone(),
                    source_error: d.source.as_deref().and_then(|s| failing.get(s)).cloned(),
                }
            })
            .collect()
    }
}

/// The app's etcd store when `store` is etcd (connected on first use): its instances share
/// certificates there, and the registry its entries.
#[cfg(feature = "etcd")]
pub fn fleet(
    store: &StoreConfig,
    app_id: &ratls::AppId,
    agent: &AgentClient,
) -> Option<Arc<replicas::Replicas>> {
    match store {
        StoreConfig::File => None,
        StoreConfig::Etcd(etcd) => Some(Arc::new(replicas::Replicas::new(
            etcd::EtcdSettings {
                endpoints: etcd.endpoints.clone(),
                prefix: format!("{}/{}", etcd.prefix, app_id),
                ca_file: etcd.ca_file.clone(),
                cert_file: etcd.cert_file.clone(),
                key_file: etcd.key_file.clone(),
                timeout: etcd.timeout,
            },
            etcd.lock_ttl,
            agent.clone(),
        ))),
    }
}
