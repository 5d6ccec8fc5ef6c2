//! Several instances of one app, one certificate per domain: orders go through the fleet's lock
//! in etcd, and an instance that finds a fresh certificate there takes it instead of ordering.
//!
//! Nothing here is on the handshake path: each instance serves from memory and its local store;
//! etcd is asked only when a domain needs a certificate (first start, renewal), and when it does
//! not answer, that attempt fails and is retried like a CA that is down.

use std::{sync::Arc, time::Duration};

use ratls::agent::AgentClient;
use tokio::sync::OnceCell;

use super::{
    challenge::{Challenges, FleetFuture, Response, ShareChallenges},
    client::{app_secret, SeedError},
    etcd::{ChallengeEvent, EtcdError, EtcdSettings, EtcdStore, Lock, Watch},
    seal::{Kind, Sealer, SEAL_KEY_PATH},
    store::domain_key,
};

/// How long a published challenge lives if its publisher dies mid-order.
const CHALLENGE_TTL: Duration = Duration::from_secs(300);
/// How long a publisher waits for every instance to answer a challenge before the CA looks.
const ACK_DEADLINE: Duration = Duration::from_secs(10);
/// Longest wait between attempts to follow the store again (so `/ready` clears soon after
/// etcd returns).
pub const RECONNECT_MAX: Duration = Duration::from_secs(8);
/// Membership lease: an instance that dies stops being waited for after this.
const MEMBER_TTL: Duration = Duration::from_secs(10);

/// Why the shared store could not be used for an order.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    /// The sealing secret did not come from the guest agent.
    #[error("sealing key: {0}")]
    Seal(#[from] SeedError),
    /// etcd failed, or a value in it did not open.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
}

/// A certificate as the fleet shares it.
#[derive(Debug)]
pub struct Shared {
    /// The chain (PEM).
    pub chain_pem: String,
    /// Its key (PEM).
    pub key_pem: String,
}

/// What the store holds for a domain.
#[derive(Debug)]
pub enum Fetched {
    /// Nothing yet.
    Absent,
    /// The fleet's certificate.
    Found(Shared),
    /// A value that does not open (changed, moved, or sealed by another app): reported,
    /// never served, and replaced by the next order.
    Refused(String),
}

/// The fleet's view of the store: connected on first use (the sealing secret comes from the
/// agent, which may answer later than the start).
#[derive(Debug)]
pub struct Replicas {
    settings: EtcdSettings,
    lock_ttl: Duration,
    agent: AgentClient,
    store: OnceCell<EtcdStore>,
    /// Why the last request to the store failed; `None` once one succeeds (for `/ready`).
    failing: std::sync::Mutex<Option<String>>,
    /// This process among the fleet's members (random: instances of one CVM image look alike).
    instance: String,
    /// Values refused since start, by kind (for metrics).
    refused: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

impl Replicas {
    /// The fleet of the app whose prefix is `settings.prefix`.
    pub fn new(settings: EtcdSettings, lock_ttl: Duration, agent: AgentClient) -> Self {
        Self {
            settings,
            lock_ttl,
            agent,
            store: OnceCell::new(),
            failing: std::sync::Mutex::new(None),
            refused: Default::default(),
            instance: {
                let mut id = [0u8; 16];
                let _ = aws_lc_rs::rand::SecureRandom::fill(
                    &aws_lc_rs::rand::SystemRandom::new(),
                    &mut id,
                );
                hex::encode(id)
            },
        }
    }

    /// Answer the challenges the fleet publishes, for as long as this instance runs: join the
    /// fleet (so publishers wait for this one), apply each response to `challenges` and say
    /// so, forget withdrawn ones. Reconnects after a failure.
    pub async fn serve_challenges(self: Arc<Self>, challenges: Arc<Challenges>) {
        let mut applied: std::collections::HashMap<String, Response> = Default::default();
        let mut retry = Duration::from_secs(1);
        loop {
            let session = async {
                let store = self.store().await?;
                let membership = store.join(&self.instance, MEMBER_TTL).await?;
                let _membership = AbortOnDrop(membership);
                let mut watch = store.watch(Kind::Challenge).await?;
                // What is already published first: "answering" must mean it.
                for change in watch.existing() {
                    let event = store.challenge_event(change);
                    self.on_challenge(store, &challenges, &mut applied, event)
                        .await;
                }
                tracing::info!(store = %self.location(), "answering the fleet's challenges");
                self.note(Ok(()))?;
                retry = Duration::from_secs(1);
                while let Some(change) = watch.next().await? {
                    let event = store.challenge_event(change);
                    self.on_challenge(store, &challenges, &mut applied, event)
                        .await;
                }
                Ok::<_, SharedError>(())
            };
            if let Err(e) = self.note(session.await) {
                tracing::warn!(store = %self.location(), error = %e, retry_in_s = retry.as_secs(), "not following the fleet's challenges");
            }
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(RECONNECT_MAX);
        }
    }

    async fn on_challenge(
        &self,
        store: &EtcdStore,
        challenges: &Challenges,
        applied: &mut std::collections::HashMap<String, Response>,
        event: ChallengeEvent,
    ) {
        match event {
            ChallengeEvent::Published { key, payload } => {
                let response: Response = match serde_json::from_slice(&payload) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(error = %e, "a published challenge is not one this version reads");
                        return;
                    }
                };
                if let Err(e) = challenges.apply(&response) {
                    tracing::error!(error = %e, "cannot answer a published challenge");
                    return;
                }
                applied.insert(key.clone(), response);
                if let Err(e) = store.ack(&key, &self.instance, CHALLENGE_TTL).await {
                    tracing::warn!(error = %e, "could not say this instance answers a challenge");
                }
            }
            ChallengeEvent::Gone { key } => {
                if let Some(response) = applied.remove(&key) {
                    challenges.forget(&response);
                }
            }
            ChallengeEvent::Refused { key, source } => {
                self.count_refused(Kind::Challenge);
                tracing::error!(key, error = %source, "refusing a published challenge that does not open");
            }
        }
    }

    /// Why the store is unusable right now, if it is (the last request failed).
    pub fn problem(&self) -> Option<String> {
        self.failing.lock().ok()?.clone()
    }

    /// Values that did not open since start, by kind.
    pub fn refused(&self) -> Vec<(&'static str, u64)> {
        self.refused
            .lock()
            .map(|r| r.iter().map(|(k, n)| (*k, *n)).collect())
            .unwrap_or_default()
    }

    fn count_refused(&self, kind: Kind) {
        if let Ok(mut refused) = self.refused.lock() {
            *refused.entry(kind.label()).or_default() += 1;
        }
    }

    /// Remember how `result` went, for [`Replicas::problem`].
    pub fn note<T>(&self, result: Result<T, SharedError>) -> Result<T, SharedError> {
        if let Ok(mut failing) = self.failing.lock() {
            *failing = result
                .as_ref()
                .err()
                .map(|e| format!("{} ({})", e, self.location()));
        }
        result
    }

    /// Where the fleet's store is, for messages.
    pub fn location(&self) -> String {
        format!(
            "etcd {} under {}",
            self.settings.endpoints.join(","),
            self.settings.prefix
        )
    }

    async fn store(&self) -> Result<&EtcdStore, SharedError> {
        self.store
            .get_or_try_init(|| async {
                let secret = app_secret(&self.agent, SEAL_KEY_PATH, "store-seal").await?;
                let sealer = Arc::new(Sealer::from_secret(&secret));
                Ok(EtcdStore::connect(self.settings.clone(), sealer).await?)
            })
            .await
    }

    /// The plaintext of `name` as `kind`, for state outside certificates (the registry's).
    pub async fn get_value(&self, kind: Kind, name: &str) -> Result<Option<Vec<u8>>, SharedError> {
        let result = async { Ok(self.store().await?.get(kind, name).await?) };
        self.note(result.await)
    }

    /// Seal and store `value` under `name` as `kind` (last writer wins).
    pub async fn put_value(&self, kind: Kind, name: &str, value: &[u8]) -> Result<(), SharedError> {
        let result = async { Ok(self.store().await?.put(kind, name, value).await?) };
        self.note(result.await)
    }

    /// Ask the store something, so a wrong endpoint or credential shows at start, and a
    /// store that came back is noticed without waiting out a backoff.
    pub async fn check(&self) -> Result<(), SharedError> {
        let result = async {
            let store = self.store().await?;
            store.get(Kind::Order, "hello").await?;
            Ok(())
        };
        self.note(result.await)
    }

    /// The fleet's lock on `domain`, or `None` after waiting for the instance that held it
    /// (look at what it left before trying again).
    pub async fn lock_or_wait(&self, domain: &str) -> Result<Option<Lock>, SharedError> {
        let result = async {
            let store = self.store().await?;
            Ok(store
                .lock_or_wait(&format!("order/{domain}"), self.lock_ttl)
                .await?)
        };
        self.note(result.await)
    }

    /// Open the fleet's `kind` (certificate or key) for `domain` as a watch delivered it; a
    /// value that does not open is counted and logged, and the reason returned.
    pub async fn open_fleet(
        &self,
        kind: Kind,
        domain: &str,
        sealed: &[u8],
    ) -> Result<Vec<u8>, String> {
        let store = self.store().await.map_err(|e| e.to_string())?;
        store
            .open(kind, &domain_key(domain, file_of(kind)), sealed)
            .map_err(|e| {
                self.count_refused(kind);
                tracing::error!(domain, store = %self.location(), error = %e, "refusing the fleet's stored certificate: it is never served, and the next order replaces it");
                e.to_string()
            })
    }

    /// The certificate the fleet has for `domain`. A value that does not open is counted,
    /// logged and reported as [`Fetched::Refused`], never returned.
    pub async fn fetch(&self, domain: &str) -> Result<Fetched, SharedError> {
        let store = self.store().await?;
        let chain_key = domain_key(domain, "chain.pem");
        let key_key = domain_key(domain, "key.pem");
        let opened = async {
            let chain = store.get(Kind::Certificate, &chain_key).await?;
            let key = store.get(Kind::PrivateKey, &key_key).await?;
            Ok::<_, EtcdError>(chain.zip(key))
        };
        let fetched = match opened.await {
            // Authentic (it opened), so PEM text as written.
            Ok(found) => Ok(match found {
                None => Fetched::Absent,
                Some((chain, key)) => Fetched::Found(Shared {
                    chain_pem: String::from_utf8_lossy(&chain).into_owned(),
                    key_pem: String::from_utf8_lossy(&key).into_owned(),
                }),
            }),
            Err(e @ EtcdError::Sealed { kind, .. }) => {
                if let Some(kind) = [Kind::Certificate, Kind::PrivateKey]
                    .into_iter()
                    .find(|k| k.label() == kind)
                {
                    self.count_refused(kind);
                }
                tracing::error!(domain, store = %self.location(), error = %e, "refusing the fleet's stored certificate: it is never served, and the next order replaces it");
                Ok(Fetched::Refused(e.to_string()))
            }
            Err(e) => Err(e.into()),
        };
        self.note(fetched)
    }

    /// A watch on the fleet's certificates or keys (`kind`), and which of `domains` each etcd
    /// key is.
    pub async fn watch_domains(
        &self,
        kind: Kind,
        domains: &[&str],
    ) -> Result<(Watch, std::collections::HashMap<String, usize>), SharedError> {
        let result = async {
            let store = self.store().await?;
            let keys = domains
                .iter()
                .enumerate()
                .map(|(i, d)| (store.key(kind, &domain_key(d, file_of(kind))), i))
                .collect();
            Ok((store.watch(kind).await?, keys))
        };
        self.note(result.await)
    }

    /// Publish `shared` for the fleet, while `lock` is held (key first: a reader never gets
    /// a new chain with the old key).
    pub async fn publish(
        &self,
        lock: &Lock,
        domain: &str,
        shared: &Shared,
    ) -> Result<(), SharedError> {
        let result = async {
            let store = self.store().await?;
            for (kind, file, pem) in [
                (Kind::PrivateKey, "key.pem", &shared.key_pem),
                (Kind::Certificate, "chain.pem", &shared.chain_pem),
            ] {
                store
                    .put_fenced(lock, kind, &domain_key(domain, file), pem.as_bytes())
                    .await?;
            }
            Ok(())
        };
        self.note(result.await)
    }

    /// The etcd name of a challenge response.
    fn challenge_name(response: &Response) -> String {
        match response {
            Response::TlsAlpn01 { name, .. } => format!("tls-alpn-01/{name}"),
            Response::Http01 { token, .. } => format!("http-01/{token}"),
        }
    }

    /// Give the lock back (waiters take it at once rather than after its lease).
    pub async fn release(&self, lock: Lock) {
        if let Ok(store) = self.store().await {
            if let Err(e) = store.release(lock).await {
                tracing::warn!(store = %self.location(), error = %e, "order lock not released: it frees itself when its lease ends");
            }
        }
    }
}

/// The store file of a domain's certificate or key.
fn file_of(kind: Kind) -> &'static str {
    match kind {
        Kind::PrivateKey => "key.pem",
        _ => "chain.pem",
    }
}

/// Aborts a task when dropped (a membership's keep-alive).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl ShareChallenges for Replicas {
    fn publish<'a>(&'a self, response: &'a Response) -> FleetFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let store = self.store().await.map_err(|e| e.to_string())?;
            let payload = serde_json::to_vec(response).map_err(|e| e.to_string())?;
            let key = store
                .publish_challenge(&Self::challenge_name(response), &payload, CHALLENGE_TTL)
                .await
                .map_err(|e| e.to_string())?;
            // Every member answers before the CA looks, or a lagging one would fail the order.
            let deadline = tokio::time::Instant::now() + ACK_DEADLINE;
            loop {
                let (members, acks) = store.coverage(&key).await.map_err(|e| e.to_string())?;
                if acks >= members {
                    tracing::debug!(members, "every instance answers the challenge");
                    return Ok(());
                }
                if tokio::time::Instant::now() >= deadline {
                    tracing::warn!(members, acks, "not every instance answers the challenge: the CA may reach one that cannot");
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    }

    fn withdraw<'a>(&'a self, response: &'a Response) -> FleetFuture<'a, ()> {
        Box::pin(async move {
            if let Ok(store) = self.store().await {
                let key = store.key(Kind::Challenge, &Self::challenge_name(response));
                if let Err(e) = store.withdraw_challenge(&key).await {
                    tracing::warn!(error = %e, "a challenge stays published until its lease ends");
                }
            }
        })
    }
}
