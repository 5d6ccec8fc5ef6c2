//! The sidecar's own RA-TLS identity: fetched from the guest agent, short-lived, refreshed
//! before it expires, and published by atomic swap so listeners pick it up without a restart.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use tokio::{sync::watch, task::JoinHandle};

use crate::attestation::AttestationStatus;
use crate::{
    agent::{AgentClient, AgentError, InfoResponse, TlsKeyRequest, TlsKeyResponse},
    cert::{self, CertError, ChainView},
    tls::CertResolver,
    AppId, TrustAnchors,
};

/// Default lifetime requested for identity certificates (the agent's own default is ten years).
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// Backdating of `not_before`, so a peer whose clock is a little behind accepts the certificate.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
/// First retry delay after a failed refresh; doubles up to [`DEFAULT_RETRY_MAX`].
pub const DEFAULT_RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest delay between refresh retries.
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(300);

/// How the identity is requested and refreshed.
#[derive(Clone, Debug)]
pub struct IdentityConfig {
    /// Subject CN of the certificate.
    pub subject: String,
    /// SANs of the certificate.
    pub alt_names: Vec<String>,
    /// Requested lifetime.
    pub validity: Duration,
    /// Refresh this long before expiry; `None` = a third of the lifetime.
    pub refresh_margin: Option<Duration>,
    /// Ask for an attestation bound to the key (RA-TLS).
    pub ra_tls: bool,
    /// First retry delay after a failed refresh.
    pub retry_min: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            subject: "dstack-mesh".into(),
            alt_names: vec!["localhost".into()],
            validity: DEFAULT_VALIDITY,
            refresh_margin: None,
            ra_tls: true,
            retry_min: DEFAULT_RETRY_MIN,
            retry_max: DEFAULT_RETRY_MAX,
        }
    }
}

/// Never refresh more often than this, whatever the certificate says.
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(1);
/// Longest single sleep of the refresh task; it then re-reads the clock, so a suspended VM
/// does not wake up hours past the refresh point.
const MAX_SLEEP: Duration = Duration::from_secs(300);
/// Shortest lifetime that may be requested: a refresh round trip and a few retries must fit
/// inside the last third.
pub const MIN_VALIDITY: Duration = Duration::from_secs(10);
/// Longest lifetime that may be requested (the agent's own default is ten years).
pub const MAX_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

impl IdentityConfig {
    /// Check the settings before anything is requested.
    pub fn validate(&self) -> Result<(), IdentityError> {
        let bad = |m: String| Err(IdentityError::Config(m));
        if self.validity < MIN_VALIDITY || self.validity > MAX_VALIDITY {
            return bad(format!(
                "validity {:?} is outside {}s..={}d",
                self.validity,
                MIN_VALIDITY.as_secs(),
                MAX_VALIDITY.as_secs() / 86400
            ));
        }
        if let Some(margin) = self.refresh_margin {
            if margin >= self.validity {
                return bad(format!(
                    "refresh margin {margin:?} must be shorter than the validity {:?}",
                    self.validity
                ));
            }
        }
        if self.retry_min.is_zero() || self.retry_min > self.retry_max {
            return bad(format!(
                "retry delays must satisfy 0 < min ({:?}) <= max ({:?})",
                self.retry_min, self.retry_max
            ));
        }
        Ok(())
    }
}

/// Why an identity could not be obtained.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The agent call failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The certificate chain is unusable.
    #[error("identity certificate: {0}")]
    Cert(#[from] CertError),
    /// The private key is unusable or does not match the leaf.
    #[error("identity key: {0}")]
    Key(String),
    /// The configuration cannot work.
    #[error("identity config: {0}")]
    Config(String),
    /// `Info` returned an app id that is not hex.
    #[error("guest agent Info: app_id: {0}")]
    BadInfo(crate::AppIdError),
    /// The agent issued an identity that peers would refuse.
    #[error("the agent issued an identity peers would refuse ({role}): {rejection}")]
    Unusable {
        /// The role it failed in.
        role: crate::PeerRole,
        /// Why.
        rejection: crate::Rejection,
    },
    /// The chain does not end in a self-signed root, so there is no trust anchor to share.
    #[error("identity chain does not end in a self-signed CA root (last element: {0})")]
    NoRoot(String),
    /// A refreshed chain ends in another root than the one this process started with, the
    /// root its peers and its own verifiers trust: the agent's CA changed under it.
    #[error(
        "the agent's new certificate chains to another root CA (SHA-256 {now}) than the one \
         this sidecar started with and its peers trust ({was}): keeping the current identity; \
         restart the sidecar to adopt the new root"
    )]
    RootChanged {
        /// Fingerprint of the root in use.
        was: String,
        /// Fingerprint of the agent's new root.
        now: String,
    },
    /// Neither the certificate nor `Info` names the app.
    #[error("identity has no app id (certificate without app id and Info without app_id)")]
    NoAppId,
    /// Certificate and `Info` disagree on the app.
    #[error("identity certificate is for app {cert} but the agent's Info says {info}")]
    AppIdConflict {
        /// From the certificate.
        cert: AppId,
        /// From Info.
        info: AppId,
    },
}

/// One identity: key, chain and what it says.
pub struct Identity {
    /// The key and chain, ready for rustls.
    pub key: Arc<CertifiedKey>,
    /// The chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The last certificate of the chain: the mesh's default trust anchor.
    pub root: CertificateDer<'static>,
    /// Our app id.
    pub app_id: AppId,
    /// Our instance id, when known.
    pub instance_id: Option<String>,
    /// The app's name from the agent's `Info`.
    pub app_name: String,
    /// Validity of the leaf (unix seconds).
    pub not_before: i64,
    /// End of validity of the leaf (unix seconds).
    pub not_after: i64,
    /// What the leaf's attestation shows (the quote itself is not verified).
    pub attestation: AttestationStatus,
    /// SHA-256 of the leaf (hex).
    pub fingerprint: String,
    /// When it was fetched (unix seconds).
    pub fetched_at: i64,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("app_id", &self.app_id)
            .field("instance_id", &self.instance_id)
            .field("not_after", &cert::rfc3339(self.not_after))
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Build an identity from a `GetTlsKey` answer and the agent's `Info`.
    pub fn from_response(
        resp: &TlsKeyResponse,
        info: &InfoResponse,
    ) -> Result<Self, IdentityError> {
        let chain = cert::parse_pem_list(&resp.certificate_chain)?;
        let view = ChainView::new(&chain)?;
        let key_der = PrivateKeyDer::from_pem_slice(resp.key.as_bytes())
            .map_err(|e| IdentityError::Key(format!("not a PEM private key: {e}")))?;
        let signing =
            crate::crypto::signing_key(key_der).map_err(|e| IdentityError::Key(e.to_string()))?;
        let key = CertifiedKey::new(chain.clone(), signing);
        key.keys_match()
            .map_err(|e| IdentityError::Key(format!("key does not match the certificate: {e}")))?;

        let info_id = match info.app_id.trim() {
            "" => None,
            s => Some(s.parse::<AppId>().map_err(IdentityError::BadInfo)?),
        };
        let app_id = match (view.app_id.clone(), info_id) {
            (Some(cert), Some(info)) if cert != info => {
                return Err(IdentityError::AppIdConflict { cert, info })
            }
            (Some(id), _) | (None, Some(id)) => id,
            (None, None) => return Err(IdentityError::NoAppId),
        };
        let instance_id = view
            .instance_id
            .clone()
            .or_else(|| Some(info.instance_id.clone()).filter(|s| !s.is_empty()));
        let root = chain.last().cloned().ok_or(CertError::Empty)?;
        let leaf = cert::parse_x509(0, &chain[0])?;
        Ok(Self {
            key: Arc::new(key),
            root,
            app_id,
            instance_id,
            app_name: info.app_name.clone(),
            not_before: leaf.validity().not_before.timestamp(),
            not_after: leaf.validity().not_after.timestamp(),
            attestation: AttestationStatus::from_binding(
                view.attestation.as_ref().is_some_and(|a| a.binds_key),
            ),
            fingerprint: view.leaf.sha256_fingerprint,
            fetched_at: unix_now(),
            chain,
        })
    }

    /// Check the identity as a peer would, in both roles, against its own root: an agent that
    /// hands out something peers refuse must not replace a working identity.
    pub fn self_check(&self) -> Result<(), IdentityError> {
        let root = cert::parse_x509(self.chain.len() - 1, &self.root)?;
        if root.subject() != root.issuer() || !root.is_ca() {
            return Err(IdentityError::NoRoot(root.subject().to_string()));
        }
        let policy = crate::Policy::new(self.trust_anchors()?);
        let now = rustls_pki_types::UnixTime::now();
        let (leaf, rest) = self.chain.split_first().ok_or(CertError::Empty)?;
        for role in [crate::PeerRole::Server, crate::PeerRole::Client] {
            policy
                .verify(leaf, rest, role, now)
                .map_err(|rejection| IdentityError::Unusable { role, rejection })?;
        }
        Ok(())
    }

    /// The root of our own chain as the only trust anchor.
    pub fn trust_anchors(&self) -> Result<TrustAnchors, CertError> {
        TrustAnchors::new(std::slice::from_ref(&self.root))
    }

    /// When to refresh: `margin` before expiry, or at two thirds of the lifetime, counted from
    /// when it was fetched (agents that ignore the requested validity backdate to 1975), and
    /// never sooner than [`MIN_REFRESH_INTERVAL`] after the fetch.
    pub fn refresh_at(&self, margin: Option<Duration>) -> SystemTime {
        let start = self.not_before.max(self.fetched_at).max(0) as u64;
        let end = (self.not_after.max(0) as u64).max(start);
        let lifetime = end - start;
        let margin = margin.map_or(lifetime / 3, |m| m.as_secs());
        let at = end
            .saturating_sub(margin)
            .max(start + MIN_REFRESH_INTERVAL.as_secs());
        UNIX_EPOCH + Duration::from_secs(at)
    }
}

/// The current identity and the task that keeps it fresh. Clones share both; the task stops
/// when the last clone is dropped.
#[derive(Clone, Debug)]
pub struct RotatingIdentity {
    shared: Arc<Shared>,
    _task: Arc<AbortOnDrop>,
}

#[derive(Debug)]
struct Shared {
    agent: AgentClient,
    info: InfoResponse,
    config: IdentityConfig,
    /// The one source of truth; the resolver reads it at every handshake.
    current: Arc<ArcSwap<Identity>>,
    /// Notifies subscribers; always sent after `current` is stored, under `fetching`.
    tx: watch::Sender<Arc<Identity>>,
    /// One fetch-and-publish at a time, so an older fetch never overwrites a newer one.
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl RotatingIdentity {
    /// Fetch the first identity (failing if the agent cannot give one) and start refreshing.
    pub async fn start(
        agent: AgentClient,
        info: InfoResponse,
        config: IdentityConfig,
    ) -> Result<Self, IdentityError> {
        config.validate()?;
        let first = Arc::new(fetch(&agent, &info, &config).await?);
        let (tx, _) = watch::channel(first.clone());
        let shared = Arc::new(Shared {
            current: Arc::new(ArcSwap::new(first)),
            agent,
            info,
            config,
            tx,
            fetching: tokio::sync::Mutex::new(()),
        });
        let task = tokio::spawn(refresh_loop(Arc::downgrade(&shared)));
        Ok(Self {
            shared,
            _task: Arc::new(AbortOnDrop(task)),
        })
    }

    /// The identity in use now.
    pub fn current(&self) -> Arc<Identity> {
        self.shared.current.load_full()
    }

    /// A resolver for rustls configs that always presents the current identity.
    pub fn resolver(&self) -> CertResolver {
        CertResolver::identity(self.shared.current.clone())
    }

    /// The guest agent the identity comes from.
    pub fn agent(&self) -> &AgentClient {
        &self.shared.agent
    }

    /// A receiver that sees every new identity.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Identity>> {
        self.shared.tx.subscribe()
    }

    /// Fetch a new identity now and publish it. On failure the current one stays.
    pub async fn refresh_now(&self) -> Result<Arc<Identity>, IdentityError> {
        self.shared.refresh().await
    }
}

impl Shared {
    async fn refresh(&self) -> Result<Arc<Identity>, IdentityError> {
        let _one_at_a_time = self.fetching.lock().await;
        let next = Arc::new(fetch(&self.agent, &self.info, &self.config).await?);
        let root = &self.current.load().root;
        if next.root != *root {
            let fingerprint = |der: &[u8]| {
                hex::encode(
                    &aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der).as_ref()[..8],
                )
            };
            return Err(IdentityError::RootChanged {
                was: fingerprint(root),
                now: fingerprint(&next.root),
            });
        }
        self.publish(next.clone());
        Ok(next)
    }

    fn publish(&self, next: Arc<Identity>) {
        self.current.store(next.clone());
        tracing::info!(
            app_id = %next.app_id,
            not_after = %cert::rfc3339(next.not_after),
            fingerprint = %next.fingerprint,
            "identity refreshed"
        );
        self.tx.send_replace(next);
    }
}

async fn fetch(
    agent: &AgentClient,
    info: &InfoResponse,
    config: &IdentityConfig,
) -> Result<Identity, IdentityError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let not_after = now.checked_add(config.validity).ok_or_else(|| {
        IdentityError::Config(format!("validity {:?} overflows", config.validity))
    })?;
    let req = TlsKeyRequest {
        subject: config.subject.clone(),
        alt_names: config.alt_names.clone(),
        usage_ra_tls: config.ra_tls,
        usage_server_auth: true,
        usage_client_auth: true,
        with_app_info: true,
        not_before: Some(now.saturating_sub(CLOCK_SKEW).as_secs()),
        not_after: Some(not_after.as_secs()),
    };
    let resp = agent.get_tls_key(&req).await?;
    let identity = Identity::from_response(&resp, info)?;
    identity.self_check()?;
    Ok(identity)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Sleeps until the refresh point of the current identity, refreshes, retries with backoff.
/// Holds only a weak reference so dropping the last handle ends it.
async fn refresh_loop(shared: std::sync::Weak<Shared>) {
    let mut rx = match shared.upgrade() {
        Some(s) => s.tx.subscribe(),
        None => return,
    };
    loop {
        let (wait, retry_min, retry_max) = {
            let Some(s) = shared.upgrade() else { return };
            let at = s.current.load().refresh_at(s.config.refresh_margin);
            let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
            (wait, s.config.retry_min, s.config.retry_max)
        };
        if !wait.is_zero() {
            tokio::select! {
                // Wake at least every MAX_SLEEP to re-read the wall clock.
                _ = tokio::time::sleep(wait.min(MAX_SLEEP)) => {}
                // Someone refreshed on demand: recompute the deadline from the new identity.
                changed = rx.changed() => if changed.is_err() { return },
            }
            continue;
        }
        let mut backoff = retry_min;
        loop {
            let Some(s) = shared.upgrade() else { return };
            match s.refresh().await {
                Ok(_) => {
                    rx.borrow_and_update();
                    break;
                }
                Err(e) => {
                    if s.current.load().not_after <= unix_now() {
                        tracing::error!(error = %e, retry_in = ?backoff, "identity expired and refresh failed");
                    } else {
                        tracing::warn!(error = %e, retry_in = ?backoff, "identity refresh failed; serving the current identity");
                    }
                }
            }
            drop(s);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(retry_max);
        }
    }
}
