//! Several instances of one app, one certificate per domain: orders go through the fleet's lock
//! in etcd, and an instance that finds a fresh certificate there takes it instead of ordering.
//!
//! Nothing here is on the handshake path: each instance serves from memory and its local store;
//! etcd is asked only when a domain needs a certificate (first start, renewal), and when it does
//! not answer, that attempt fails and is retried like a CA that is down.

use std::{sync::Arc, time::Duration};

use ratls::agent::{AgentClient, AgentError};
use tokio::sync::OnceCell;

use super::{
    etcd::{EtcdError, EtcdSettings, EtcdStore, Lock},
    seal::{Kind, Sealer, SEAL_KEY_PATH},
    store::domain_key,
};

/// Why the shared store could not be used for an order.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    /// The sealing secret did not come from the guest agent.
    #[error("sealing key from the guest agent: {0}")]
    Agent(#[from] AgentError),
    /// The agent's `GetKey` answer is not hex.
    #[error("the guest agent's GetKey answer is not hex")]
    KeyNotHex,
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
        }
    }

    /// Why the store is unusable right now, if it is (the last request failed).
    pub fn problem(&self) -> Option<String> {
        self.failing.lock().ok()?.clone()
    }

    /// Remember how `result` went, for [`Replicas::problem`].
    fn note<T>(&self, result: Result<T, SharedError>) -> Result<T, SharedError> {
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
                let reply = self.agent.get_key(SEAL_KEY_PATH, "store-seal").await?;
                let secret = hex::decode(reply.key.trim_start_matches("0x"))
                    .map_err(|_| SharedError::KeyNotHex)?;
                let sealer = Arc::new(Sealer::from_secret(&secret));
                Ok(EtcdStore::connect(self.settings.clone(), sealer).await?)
            })
            .await
    }

    /// Connect now, so a wrong endpoint or credential shows at start (it is retried at the
    /// first order too).
    pub async fn check(&self) -> Result<(), SharedError> {
        let result = self.store().await.map(|_| ());
        self.note(result)
    }

    /// The fleet's lock on `domain`; waits while another instance orders.
    pub async fn lock(&self, domain: &str) -> Result<Lock, SharedError> {
        let store = self.store().await?;
        Ok(store
            .lock(&format!("order/{domain}"), self.lock_ttl)
            .await?)
    }

    /// The certificate the fleet has for `domain`, if any. A value that does not open is
    /// logged and treated as absent (the caller orders a new one).
    pub async fn fetch(&self, domain: &str) -> Result<Option<Shared>, SharedError> {
        let store = self.store().await?;
        let chain_key = domain_key(domain, "chain.pem");
        let key_key = domain_key(domain, "key.pem");
        let opened = async {
            let chain = store.get(Kind::Certificate, &chain_key).await?;
            let key = store.get(Kind::PrivateKey, &key_key).await?;
            Ok::<_, EtcdError>(chain.zip(key))
        };
        match opened.await {
            // Authentic (it opened), so PEM text as written.
            Ok(found) => Ok(found.map(|(chain, key)| Shared {
                chain_pem: String::from_utf8_lossy(&chain).into_owned(),
                key_pem: String::from_utf8_lossy(&key).into_owned(),
            })),
            Err(e @ EtcdError::Sealed { .. }) => {
                tracing::error!(domain, store = %self.location(), error = %e, "refusing the fleet's stored certificate: ordering a new one");
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Publish `shared` for the fleet, while `lock` is held (key first: a reader never gets
    /// a new chain with the old key).
    pub async fn publish(
        &self,
        lock: &Lock,
        domain: &str,
        shared: &Shared,
    ) -> Result<(), SharedError> {
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
