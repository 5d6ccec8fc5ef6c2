//! Public domains: certificates obtained (ACME or the internal CA), stored, served by SNI on
//! the inbound listener, and renewed.
//!
//! Each domain has one task that owns its lifecycle:
//! `pending → issuing → valid → renewing → valid`, or `failed` with the CA's message and the
//! time of the next attempt. The certificate being served changes only when a new one has been
//! checked (chain, key match, names) and stored, through an `ArcSwap` the TLS resolver reads,
//! so a renewal never drops a connection and a failed one keeps the old certificate serving.

pub mod cert;
pub mod challenge;
pub mod client;
pub mod http01;
pub mod internal;
pub mod store;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwapOption;
use ratls::agent::AgentClient;
use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
    ServerConfig,
};
use tokio::{sync::Notify, task::JoinSet};

use crate::{
    config::{AcmeConfig, DomainConfig, Issuer, Mode, PublicConfig},
    inbound::route::PublicNames,
};
use cert::Loaded;
use challenge::Challenges;
use client::{AcmeClient, IssueError, Issued};
use internal::InternalCa;
use store::{domain_key, CertStore, DirStore};

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
    Roots(String),
    /// The internal CA could not be created or loaded.
    #[error("internal CA in {store}: {reason}")]
    InternalCa {
        /// The store.
        store: String,
        /// Why.
        reason: String,
    },
    /// A TLS configuration was refused.
    #[error("public TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// The ACME client could not be built.
    #[error("ACME client for {directory}: {reason}")]
    Client {
        /// The directory.
        directory: String,
        /// Why.
        reason: String,
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
}

#[derive(Debug, Default)]
struct DomainState {
    status: Option<Status>,
    last_error: Option<String>,
    next_attempt: Option<SystemTime>,
    consecutive_failures: u32,
    failures_total: u64,
    issued_total: u64,
    /// The stored certificate came from another issuer or for other names: replace it.
    stale: bool,
}

/// One public domain at run time.
pub struct Domain {
    /// Its configuration.
    pub config: DomainConfig,
    served: ArcSwapOption<Loaded>,
    serving: Arc<ArcSwapOption<CertifiedKey>>,
    state: Mutex<DomainState>,
    renew_now: Notify,
    tls: Arc<ServerConfig>,
}

impl std::fmt::Debug for Domain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Domain")
            .field("names", &self.config.names)
            .finish_non_exhaustive()
    }
}

impl Domain {
    /// The TLS configuration clients of this domain get.
    pub fn tls(&self) -> Arc<ServerConfig> {
        self.tls.clone()
    }

    /// The primary name.
    pub fn name(&self) -> &str {
        self.config.primary()
    }

    fn serve(&self, loaded: Option<Loaded>) {
        self.serving.store(loaded.as_ref().map(|l| l.key.clone()));
        self.served.store(loaded.map(Arc::new));
    }

    fn set(&self, f: impl FnOnce(&mut DomainState)) {
        if let Ok(mut s) = self.state.lock() {
            f(&mut s);
        }
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
    Internal(Arc<InternalCa>),
}

/// The public-domain subsystem.
pub struct Acme {
    domains: Vec<Arc<Domain>>,
    exact: HashMap<String, usize>,
    wildcard: HashMap<String, usize>,
    challenges: Arc<Challenges>,
    challenge_tls: Arc<ServerConfig>,
    store: Arc<dyn CertStore>,
    issuers: HashMap<Issuer, IssuerRuntime>,
    config: AcmeConfig,
}

impl std::fmt::Debug for Acme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acme")
            .field("domains", &self.domains.len())
            .field("store", &self.store.location())
            .finish_non_exhaustive()
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A uniformly random duration below `max` (jitter).
fn jitter(max: Duration) -> Duration {
    let mut bytes = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    let max_ms = max.as_millis().max(1) as u64;
    Duration::from_millis(u64::from_le_bytes(bytes) % max_ms)
}

impl Acme {
    /// Build the subsystem: open the store, load stored certificates, prepare the issuers.
    /// Nothing talks to a CA until [`Acme::start`].
    pub fn new(public: &PublicConfig, agent: AgentClient) -> Result<Arc<Self>, AcmeError> {
        let store: Arc<dyn CertStore> = Arc::new(DirStore::new(&public.acme.store));
        let mut extra_roots = Vec::new();
        for path in &public.acme.ca_roots {
            let bytes = std::fs::read(path)
                .map_err(|e| AcmeError::Roots(format!("{}: {e}", path.display())))?;
            let certs = ratls::cert::parse_chain(&bytes)
                .map_err(|e| AcmeError::Roots(format!("{}: {e}", path.display())))?;
            extra_roots.extend(certs);
        }
        let challenges = Arc::new(Challenges::default());
        let challenge_tls = Arc::new(challenges.server_config()?);
        let mut issuers = HashMap::new();
        for d in &public.domains {
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
                    })?,
                )),
                Issuer::InternalCa => IssuerRuntime::Internal(Arc::new(
                    InternalCa::open(&store, public.acme.internal_ca_lifetime).map_err(
                        |reason| AcmeError::InternalCa {
                            store: store.location(),
                            reason,
                        },
                    )?,
                )),
            };
            issuers.insert(d.issuer.clone(), runtime);
        }
        let mut domains = Vec::new();
        let (mut exact, mut wildcard) = (HashMap::new(), HashMap::new());
        for (i, config) in public.domains.iter().enumerate() {
            for name in &config.names {
                match name.strip_prefix("*.") {
                    Some(base) => wildcard.insert(base.to_owned(), i),
                    None => exact.insert(name.clone(), i),
                };
            }
            let serving = Arc::new(ArcSwapOption::empty());
            let mut tls = ServerConfig::builder_with_provider(ratls::crypto::provider())
                .with_protocol_versions(rustls::DEFAULT_VERSIONS)?
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(DomainResolver(serving.clone())));
            if config.mode == Mode::Http {
                tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            }
            let domain = Arc::new(Domain {
                config: config.clone(),
                served: ArcSwapOption::empty(),
                serving,
                state: Mutex::new(DomainState::default()),
                renew_now: Notify::new(),
                tls: Arc::new(tls),
            });
            load_stored(store.as_ref(), &domain);
            domains.push(domain);
        }
        Ok(Arc::new(Self {
            domains,
            exact,
            wildcard,
            challenges,
            challenge_tls,
            store,
            issuers,
            config: public.acme.clone(),
        }))
    }

    /// Start one lifecycle task per domain.
    pub fn start(self: &Arc<Self>, tasks: &mut JoinSet<()>) {
        for domain in &self.domains {
            tasks.spawn(self.clone().lifecycle(domain.clone()));
        }
    }

    /// The challenge responses (the `:80` listener answers HTTP-01 from them).
    pub fn challenges(&self) -> Arc<Challenges> {
        self.challenges.clone()
    }

    /// TLS for TLS-ALPN-01 validation connections.
    pub fn challenge_tls(&self) -> Arc<ServerConfig> {
        self.challenge_tls.clone()
    }

    /// The domain serving `name` (exact or alias first, then a wildcard one label up).
    pub fn lookup(&self, name: &str) -> Option<&Arc<Domain>> {
        let i = self.exact.get(name).or_else(|| {
            let (_, base) = name.split_once('.')?;
            self.wildcard.get(base)
        })?;
        self.domains.get(*i)
    }

    /// Every domain.
    pub fn domains(&self) -> &[Arc<Domain>] {
        &self.domains
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

    /// What needs an operator: expired certificates and domains with none.
    pub fn problems(&self) -> Vec<String> {
        self.status()
            .into_iter()
            .filter_map(|s| {
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
            })
            .collect()
    }

    /// Every domain's state.
    pub fn status(&self) -> Vec<CertStatus> {
        let now = SystemTime::now();
        self.domains
            .iter()
            .map(|d| {
                let served = d.served.load_full();
                let state = d.state.lock().map(|s| {
                    (
                        s.status.unwrap_or(Status::Pending),
                        s.last_error.clone(),
                        s.next_attempt,
                        s.consecutive_failures,
                        s.failures_total,
                        s.issued_total,
                    )
                });
                let (status, last_error, next_attempt, consecutive, failures, issued) =
                    state.unwrap_or((Status::Pending, None, None, 0, 0, 0));
                CertStatus {
                    domain: d.name().to_owned(),
                    names: d.config.names.clone(),
                    status,
                    issuer: d.config.issuer.label(),
                    issued_by: served.as_ref().map(|l| l.issuer.clone()),
                    mode: d.config.mode,
                    backend: d.config.backend.to_string(),
                    not_before: served.as_ref().map(|l| unix(l.not_before)),
                    not_after: served.as_ref().map(|l| unix(l.not_after)),
                    renew_at: served.as_ref().map(|l| unix(self.renew_at(l))),
                    serial: served.as_ref().map(|l| l.serial.clone()),
                    expired: served.as_ref().is_some_and(|l| l.expired(now)),
                    last_error,
                    next_attempt: next_attempt.map(unix),
                    consecutive_failures: consecutive,
                    failures_total: failures,
                    issued_total: issued,
                }
            })
            .collect()
    }

    /// When `cert` is due: `renew_before` ahead of expiry, else when a third of its lifetime
    /// remains; never in the first tenth of its life (a setting longer than the CA's lifetime
    /// must not turn into an order loop).
    fn renew_at(&self, cert: &Loaded) -> SystemTime {
        let lifetime = cert
            .not_after
            .duration_since(cert.not_before)
            .unwrap_or_default();
        let before = self.config.renew_before.unwrap_or(lifetime / 3);
        let due = cert
            .not_after
            .checked_sub(before)
            .unwrap_or(cert.not_before);
        due.max(cert.not_before + lifetime / 10)
    }

    /// The wait after `failures` failed attempts in a row: doubling from `retry_min`, capped
    /// by `retry_max`, and much lower while the domain has no certificate or little time left.
    fn backoff(&self, failures: u32, cert: Option<&Loaded>) -> Duration {
        let exp = failures.saturating_sub(1).min(20);
        let base = self.config.retry_min.saturating_mul(1 << exp);
        let now = SystemTime::now();
        let cap = match cert {
            None => CAP_WITHOUT_CERT,
            Some(c) if c.expired(now) => CAP_WITHOUT_CERT,
            Some(c)
                if c.not_after.duration_since(now).unwrap_or_default()
                    < Duration::from_secs(7 * 86400) =>
            {
                CAP_NEAR_EXPIRY
            }
            Some(_) => self.config.retry_max,
        };
        let wait = base
            .min(cap)
            .min(self.config.retry_max)
            .max(self.config.retry_min);
        // Up to a tenth more, so replicas that failed together do not retry together.
        wait + jitter(wait / 10)
    }

    async fn lifecycle(self: Arc<Self>, d: Arc<Domain>) {
        let name = d.name().to_owned();
        loop {
            let current = d.served.load_full();
            let stale = d.state.lock().map(|s| s.stale).unwrap_or(false);
            let now = SystemTime::now();
            if let (Some(cert), false) = (current.as_deref(), stale) {
                let due = self.renew_at(cert);
                if due > now {
                    d.set(|s| {
                        if s.status != Some(Status::Failed) {
                            s.status = Some(Status::Valid);
                        }
                    });
                    let lifetime = cert
                        .not_after
                        .duration_since(cert.not_before)
                        .unwrap_or_default();
                    // Replicas with the same certificate spread their renewals.
                    let wait = due.duration_since(now).unwrap_or_default()
                        + jitter((lifetime / 100).min(Duration::from_secs(3600)));
                    tokio::select! {
                        _ = tokio::time::sleep(wait.min(RECHECK)) => continue,
                        _ = d.renew_now.notified() => {}
                    }
                }
            }
            d.set(|s| {
                s.status = Some(if current.is_some() {
                    Status::Renewing
                } else {
                    Status::Issuing
                });
            });
            tracing::info!(domain = %name, issuer = %d.config.issuer.label(), renewal = current.is_some(), "ordering a certificate");
            let started = std::time::Instant::now();
            match self.obtain(&d).await {
                Ok(loaded) => {
                    tracing::info!(
                        domain = %name,
                        serial = %loaded.serial,
                        not_after = %crate::tools::format_time(loaded.not_after),
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "certificate issued and served"
                    );
                    d.serve(Some(loaded));
                    d.set(|s| {
                        s.status = Some(Status::Valid);
                        s.last_error = None;
                        s.next_attempt = None;
                        s.consecutive_failures = 0;
                        s.issued_total += 1;
                        s.stale = false;
                    });
                }
                Err(e) => {
                    let failures = d
                        .state
                        .lock()
                        .map(|s| s.consecutive_failures + 1)
                        .unwrap_or(1);
                    let wait = match &e {
                        // The CA said how long; doubling on top of its answer only delays.
                        IssueError::RateLimited(_) => {
                            self.backoff(failures + 2, current.as_deref())
                        }
                        _ => self.backoff(failures, current.as_deref()),
                    };
                    let expired = current
                        .as_ref()
                        .is_some_and(|c| c.expired(SystemTime::now()));
                    tracing::error!(
                        domain = %name,
                        attempt = failures,
                        retry_in_s = wait.as_secs(),
                        serving = if expired { "an EXPIRED certificate" } else if current.is_some() { "the previous certificate" } else { "nothing (TLS alert)" },
                        error = %e,
                        "certificate order failed"
                    );
                    d.set(|s| {
                        s.status = Some(Status::Failed);
                        s.last_error = Some(e.to_string());
                        s.next_attempt = Some(SystemTime::now() + wait);
                        s.consecutive_failures = failures;
                        s.failures_total += 1;
                    });
                    self.wait_to_retry(&d, wait, &e).await;
                }
            }
        }
    }

    /// Sleep until the next attempt; wake early on `certs renew`, or when the CA that was down
    /// answers its directory again (probed cheaply, so recovery takes seconds, not a backoff).
    async fn wait_to_retry(&self, d: &Domain, wait: Duration, error: &IssueError) {
        let deadline = tokio::time::Instant::now() + wait;
        let probe = match (&self.issuers.get(&d.config.issuer), error.probe_helps()) {
            (Some(IssuerRuntime::Acme(c)), true) => Some(c.clone()),
            _ => None,
        };
        let interval = self.config.retry_min.min(Duration::from_secs(5));
        loop {
            let step = match probe {
                Some(_) => deadline.min(tokio::time::Instant::now() + interval),
                None => deadline,
            };
            tokio::select! {
                _ = tokio::time::sleep_until(step) => {}
                _ = d.renew_now.notified() => return,
            }
            if tokio::time::Instant::now() >= deadline {
                return;
            }
            if let Some(client) = &probe {
                if client.probe().await.is_ok() {
                    tracing::info!(domain = %d.name(), directory = %client.directory(), "the CA answers again: retrying now");
                    return;
                }
            }
        }
    }

    async fn obtain(&self, d: &Domain) -> Result<Loaded, IssueError> {
        let names = &d.config.names;
        let issued: Issued = match self.issuers.get(&d.config.issuer) {
            Some(IssuerRuntime::Acme(client)) => tokio::time::timeout(
                ORDER_DEADLINE,
                client.issue(names, d.config.challenge, &self.challenges),
            )
            .await
            .map_err(|_| {
                IssueError::Unreachable(format!("the order took longer than {ORDER_DEADLINE:?}"))
            })??,
            Some(IssuerRuntime::Internal(ca)) => ca.issue(names).map_err(IssueError::Local)?,
            None => return Err(IssueError::Local("no issuer configured".into())),
        };
        let loaded = cert::load(
            issued.chain_pem.as_bytes(),
            issued.key_pem.as_bytes(),
            names,
        )
        .map_err(|e| IssueError::Server(format!("the issued certificate is unusable: {e}")))?;
        // Key first: a crash between the two writes leaves a pair that does not match, which
        // the next start detects and reissues; never a certificate served with a wrong key.
        let name = d.name();
        let meta = serde_json::json!({ "issuer": d.config.issuer.label(), "names": names });
        let stored = self
            .store
            .write(
                &domain_key(name, "key.pem"),
                issued.key_pem.as_bytes(),
                true,
            )
            .and_then(|()| {
                self.store.write(
                    &domain_key(name, "chain.pem"),
                    issued.chain_pem.as_bytes(),
                    false,
                )
            })
            .and_then(|()| {
                self.store.write(
                    &domain_key(name, "meta.json"),
                    meta.to_string().as_bytes(),
                    false,
                )
            });
        if let Err(e) = stored {
            // Served anyway: a full disk must not take the domain down; the next start orders.
            tracing::error!(domain = %name, error = %e, "certificate not stored");
        }
        Ok(loaded)
    }
}

/// Load a domain's stored certificate; anything unusable is reported, moved aside and
/// reissued, never served.
fn load_stored(store: &dyn CertStore, d: &Domain) {
    let name = d.name();
    let chain_key = domain_key(name, "chain.pem");
    let key_key = domain_key(name, "key.pem");
    let read = |k: &str| store.read(k);
    let problem = match (read(&chain_key), read(&key_key)) {
        (Ok(None), Ok(None)) => return,
        (Ok(Some(chain)), Ok(Some(key))) => match cert::load(&chain, &key, &d.config.names) {
            Ok(loaded) => {
                let meta: Option<serde_json::Value> = store
                    .read(&domain_key(name, "meta.json"))
                    .ok()
                    .flatten()
                    .and_then(|b| serde_json::from_slice(&b).ok());
                let issuer = meta
                    .as_ref()
                    .and_then(|m| m.get("issuer"))
                    .and_then(|v| v.as_str())
                    .map(str::to_owned);
                let stale = issuer.as_deref() != Some(d.config.issuer.label().as_str());
                if stale {
                    tracing::info!(domain = %name, stored = ?issuer, configured = %d.config.issuer.label(), "stored certificate is from another issuer: serving it until the new one arrives");
                }
                tracing::info!(domain = %name, serial = %loaded.serial, not_after = %crate::tools::format_time(loaded.not_after), "stored certificate loaded");
                d.serve(Some(loaded));
                d.set(|s| {
                    s.status = Some(Status::Valid);
                    s.stale = stale;
                });
                return;
            }
            Err(e) => format!("stored certificate unusable: {e}"),
        },
        (Ok(Some(_)), Ok(None)) => "stored certificate has no key".to_owned(),
        (Ok(None), Ok(Some(_))) => "stored key has no certificate".to_owned(),
        (Err(e), _) | (_, Err(e)) => format!("store unreadable: {e}"),
    };
    tracing::error!(domain = %name, store = %store.location(), problem = %problem, "reissuing: the stored files are moved aside and never served");
    for key in [&chain_key, &key_key] {
        if let Err(e) = store.quarantine(key) {
            tracing::warn!(domain = %name, error = %e, "could not move a bad file aside");
        }
    }
    d.set(|s| s.last_error = Some(problem));
}

impl PublicNames for Acme {
    fn has_challenge(&self, name: &str) -> bool {
        self.challenges.has_tls_alpn(name)
    }

    fn domain_for(&self, name: &str) -> Option<String> {
        self.lookup(name).map(|d| d.name().to_owned())
    }
}
