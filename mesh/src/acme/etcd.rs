//! The replicated store on etcd v3: every value sealed with the app's key ([`Sealer`]) under a
//! name the store cannot read, a lease lock per object with fenced writes, so that one
//! instance of the app orders a certificate and a paused one cannot overwrite a newer result.
//!
//! Keys are `<prefix>/<kind>/<HMAC>`. A lock is `<prefix>/lock/<HMAC>` attached to the holder's
//! lease; a fenced write is a transaction that succeeds only while that key still carries
//! that lease. When the holder dies its lease expires, the key goes, and a waiter takes over.

use std::{path::PathBuf, sync::Arc, time::Duration};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
};

use super::seal::{Kind, SealError, Sealer};

/// How to reach etcd.
#[derive(Clone, Debug)]
pub struct EtcdSettings {
    /// `http://host:port` or `https://host:port`, one per member.
    pub endpoints: Vec<String>,
    /// The app's key prefix (`/dstack-mesh/<app id>` by default).
    pub prefix: String,
    /// CA of etcd's server certificates (TLS).
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (mTLS).
    pub cert_file: Option<PathBuf>,
    /// The client certificate's key.
    pub key_file: Option<PathBuf>,
    /// Each request's deadline, and the connection's.
    pub timeout: Duration,
}

/// Why an etcd operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// etcd could not be reached or refused the request.
    #[error("etcd at {endpoints}: {source}")]
    Unavailable {
        /// The endpoints tried.
        endpoints: String,
        /// What the client said.
        source: etcd_client::Error,
    },
    /// The request did not finish in time.
    #[error("etcd at {endpoints}: no answer within {timeout:?}")]
    Timeout {
        /// The endpoints tried.
        endpoints: String,
        /// The deadline.
        timeout: Duration,
    },
    /// A TLS file is unreadable.
    #[error("etcd TLS file {path}: {source}")]
    TlsFile {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A stored value did not open: changed, moved or sealed by another app. Treated as absent.
    #[error("stored {kind} {name:?} refused: {source}")]
    Sealed {
        /// Its kind.
        kind: &'static str,
        /// Its logical name.
        name: String,
        /// Why.
        source: SealError,
    },
    /// The lock was lost (its lease expired) before the write: a newer holder may have written.
    #[error("lock on {0:?} lost before the write")]
    LostLock(String),
}

/// The app's objects in etcd.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    settings: Arc<EtcdSettings>,
    sealer: Arc<Sealer>,
}

/// The error for a value of `kind` under `name` that does not seal or open.
fn refused(kind: Kind, name: &str) -> impl FnOnce(SealError) -> EtcdError + '_ {
    move |source| EtcdError::Sealed {
        kind: kind.label(),
        name: name.to_owned(),
        source,
    }
}

/// gRPC status codes of a request that a member did not answer: CANCELLED (the client's
/// per-attempt timeout), UNKNOWN (how tonic reports a connection that broke mid-request, as
/// when a member is killed), DEADLINE_EXCEEDED, UNAVAILABLE (refused, reset, no leader yet).
const GRPC_RETRY: [i32; 4] = [1, 2, 4, 14];

/// A member did not answer (down, partitioned, electing a leader): worth sending again, to
/// whichever member the client picks next. Every request here is safe to repeat: puts write
/// the same value, a repeated lock attempt finds its own key and gives its lease back.
fn unreachable_member(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(status) => GRPC_RETRY.contains(&i32::from(status.code())),
        etcd_client::Error::TransportError(_) => true,
        _ => false,
    }
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.settings.endpoints)
            .field("prefix", &self.settings.prefix)
            .finish_non_exhaustive()
    }
}

/// What the challenge watch reports.
#[derive(Debug)]
pub enum ChallengeEvent {
    /// A response was published (or was there when the watch started).
    Published {
        /// Its etcd key.
        key: String,
        /// What was published.
        payload: Vec<u8>,
    },
    /// A value under the challenge keys that does not open: ignored.
    Refused {
        /// Its etcd key.
        key: String,
        /// Why.
        source: SealError,
    },
    /// A response was withdrawn or its lease ended.
    Gone {
        /// Its etcd key.
        key: String,
    },
}

/// A value under a watched kind: put (its sealed bytes) or gone.
#[derive(Debug)]
pub struct Change {
    /// Its etcd key.
    pub key: String,
    /// The sealed value; `None` when it was deleted or its lease ended.
    pub sealed: Option<Vec<u8>>,
}

/// The values of one kind as they come and go.
pub struct Watch {
    endpoints: String,
    pending: std::collections::VecDeque<Change>,
    stream: etcd_client::WatchStream,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").finish_non_exhaustive()
    }
}

impl Watch {
    /// What was there when the watch started (taken once; [`Watch::next`] then reports
    /// changes only).
    pub fn existing(&mut self) -> Vec<Change> {
        self.pending.drain(..).collect()
    }

    /// The next change; `None` when the watch ended (watch again).
    pub async fn next(&mut self) -> Result<Option<Change>, EtcdError> {
        loop {
            if let Some(change) = self.pending.pop_front() {
                return Ok(Some(change));
            }
            let resp = match self.stream.message().await {
                Ok(Some(resp)) => resp,
                Ok(None) => return Ok(None),
                Err(source) => {
                    return Err(EtcdError::Unavailable {
                        endpoints: self.endpoints.clone(),
                        source,
                    })
                }
            };
            for event in resp.events() {
                if let Some(kv) = event.kv() {
                    self.pending.push_back(Change {
                        key: String::from_utf8_lossy(kv.key()).into_owned(),
                        sealed: (event.event_type() == EventType::Put).then(|| kv.value().to_vec()),
                    });
                }
            }
        }
    }
}

/// A held lock: its lease is kept alive until dropped or released.
#[derive(Debug)]
pub struct Lock {
    name: String,
    key: String,
    lease: i64,
    keepalive: tokio::task::JoinHandle<()>,
}

impl Lock {
    /// The lease fencing this holder's writes.
    pub fn lease(&self) -> i64 {
        self.lease
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        self.keepalive.abort();
    }
}

impl EtcdStore {
    /// Connect to `settings.endpoints` (TLS when files are given) and seal with `sealer`.
    pub async fn connect(settings: EtcdSettings, sealer: Arc<Sealer>) -> Result<Self, EtcdError> {
        // Each attempt gets a third of the deadline, so a dead member costs one attempt, not
        // the whole call.
        let attempt = settings.timeout / 3;
        let mut options = ConnectOptions::new()
            .with_connect_timeout(attempt)
            .with_timeout(attempt)
            .with_keep_alive(Duration::from_secs(10), attempt);
        if settings.ca_file.is_some() || settings.cert_file.is_some() {
            let read = |path: &PathBuf| {
                std::fs::read(path).map_err(|source| EtcdError::TlsFile {
                    path: path.clone(),
                    source,
                })
            };
            let mut tls = TlsOptions::new();
            if let Some(ca) = &settings.ca_file {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            if let (Some(cert), Some(key)) = (&settings.cert_file, &settings.key_file) {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            options = options.with_tls(tls);
        }
        let endpoints = settings.endpoints.join(",");
        let connect = Client::connect(&settings.endpoints, Some(options));
        let client = match tokio::time::timeout(settings.timeout, connect).await {
            Ok(Ok(client)) => client,
            Ok(Err(source)) => return Err(EtcdError::Unavailable { endpoints, source }),
            Err(_) => {
                return Err(EtcdError::Timeout {
                    endpoints,
                    timeout: settings.timeout,
                })
            }
        };
        let store = Self {
            client,
            settings: Arc::new(settings),
            sealer,
        };
        // A connection is lazy: one read proves the endpoints answer.
        store.get(Kind::Order, "hello").await?;
        Ok(store)
    }

    /// The etcd key of `name` as `kind`.
    pub fn key(&self, kind: Kind, name: &str) -> String {
        format!("{}/{}", self.settings.prefix, self.sealer.name(kind, name))
    }

    /// `op` on a client within the request deadline, its errors naming the endpoints. A
    /// member that cannot be reached is not an answer: the request goes again (the client
    /// balances over the members, so it lands on a live one) until the deadline.
    async fn call<T, F>(&self, mut op: impl FnMut(Client) -> F) -> Result<T, EtcdError>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let endpoints = || self.settings.endpoints.join(",");
        let deadline = tokio::time::Instant::now() + self.settings.timeout;
        loop {
            match tokio::time::timeout_at(deadline, op(self.client.clone())).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(e)) if unreachable_member(&e) && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(Err(source)) => {
                    return Err(EtcdError::Unavailable {
                        endpoints: endpoints(),
                        source,
                    })
                }
                Err(_) => {
                    return Err(EtcdError::Timeout {
                        endpoints: endpoints(),
                        timeout: self.settings.timeout,
                    })
                }
            }
        }
    }

    /// `txn` within the request deadline.
    async fn txn(&self, txn: Txn) -> Result<etcd_client::TxnResponse, EtcdError> {
        self.call(|mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await
    }

    /// The plaintext of `name`, or `None`. A value that does not open is an error (the caller
    /// reports it and treats the object as absent).
    pub async fn get(&self, kind: Kind, name: &str) -> Result<Option<Vec<u8>>, EtcdError> {
        let key = self.key(kind, name);
        let resp = self
            .call(|mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        resp.kvs()
            .first()
            .map(|kv| self.open(kind, name, kv.value()))
            .transpose()
    }

    /// Open a sealed value of `kind` stored under `name` (as a watch delivered it).
    pub fn open(&self, kind: Kind, name: &str, sealed: &[u8]) -> Result<Vec<u8>, EtcdError> {
        self.sealer
            .open(kind, name, sealed)
            .map_err(refused(kind, name))
    }

    /// Seal and store `value` under `name` (last writer wins: for state one instance owns).
    pub async fn put(&self, kind: Kind, name: &str, value: &[u8]) -> Result<(), EtcdError> {
        let sealed = self
            .sealer
            .seal(kind, name, value)
            .map_err(refused(kind, name))?;
        let key = self.key(kind, name);
        self.call(|mut c| {
            let (key, sealed) = (key.clone(), sealed.clone());
            async move { c.put(key, sealed, None).await }
        })
        .await
        .map(|_| ())
    }

    /// Seal and store `value` under `name`, while `lock` is still held.
    pub async fn put_fenced(
        &self,
        lock: &Lock,
        kind: Kind,
        name: &str,
        value: &[u8],
    ) -> Result<(), EtcdError> {
        let sealed = self
            .sealer
            .seal(kind, name, value)
            .map_err(refused(kind, name))?;
        let txn = Txn::new()
            .when([Compare::lease(
                lock.key.clone(),
                CompareOp::Equal,
                lock.lease,
            )])
            .and_then([TxnOp::put(self.key(kind, name), sealed, None)]);
        let resp = self.txn(txn).await?;
        match resp.succeeded() {
            true => Ok(()),
            false => Err(EtcdError::LostLock(lock.name.clone())),
        }
    }

    /// The lock on `name`, waiting (on a watch) while another instance holds it. The lease lives
    /// `ttl` unless kept alive; this instance keeps it alive until the [`Lock`] is dropped.
    pub async fn lock(&self, name: &str, ttl: Duration) -> Result<Lock, EtcdError> {
        loop {
            if let Some(lock) = self.lock_or_wait(name, ttl).await? {
                return Ok(lock);
            }
        }
    }

    /// The lock on `name` if it is free; else wait until its holder lets go (released, or its
    /// lease expired) or `ttl` passes, and return `None`: the caller looks at what the holder
    /// left before trying again, so waiters do not queue through the lock one by one.
    pub async fn lock_or_wait(&self, name: &str, ttl: Duration) -> Result<Option<Lock>, EtcdError> {
        let key = self.key(Kind::Lock, name);
        let ttl_secs = i64::try_from(ttl.as_secs().max(2)).unwrap_or(i64::MAX);
        let lease = self
            .call(|mut c| async move { c.lease_grant(ttl_secs, None).await })
            .await?
            .id();
        let holder = self
            .sealer
            .seal(Kind::Lock, name, format!("lease {lease:x}").as_bytes())
            .map_err(refused(Kind::Lock, name))?;
        // Take it if nobody holds it (the key does not exist: create revision 0).
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                holder,
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let resp = self.txn(txn).await?;
        if resp.succeeded() {
            let keepalive = self.keep_alive(lease, ttl).await?;
            return Ok(Some(Lock {
                name: name.to_owned(),
                key,
                lease,
                keepalive,
            }));
        }
        let _ = self
            .call(|mut c| async move { c.lease_revoke(lease).await })
            .await;
        // Held: wait for its key to go, from the revision just read, so a delete in between is
        // not missed.
        let since = resp.header().map_or(0, |h| h.revision());
        let mut watch = self
            .call(|mut c| {
                let key = key.clone();
                let from = WatchOptions::new().with_start_revision(since + 1);
                async move { c.watch(key, Some(from)).await }
            })
            .await?;
        let deadline = tokio::time::Instant::now() + ttl;
        while let Ok(Ok(Some(resp))) = tokio::time::timeout_at(deadline, watch.message()).await {
            if resp
                .events()
                .iter()
                .any(|e| e.event_type() == EventType::Delete)
            {
                break;
            }
        }
        Ok(None)
    }

    /// A task that renews `lease` at a third of `ttl` until aborted.
    async fn keep_alive(
        &self,
        lease: i64,
        ttl: Duration,
    ) -> Result<tokio::task::JoinHandle<()>, EtcdError> {
        let (mut keeper, mut responses) = self
            .call(|mut c| async move { c.lease_keep_alive(lease).await })
            .await?;
        Ok(tokio::spawn(async move {
            let mut tick = tokio::time::interval(ttl / 3);
            loop {
                tick.tick().await;
                if keeper.keep_alive().await.is_err() {
                    return;
                }
                match responses.message().await {
                    Ok(Some(resp)) if resp.ttl() > 0 => {}
                    // TTL 0: the lease is gone; the fenced writes will say so.
                    _ => return,
                }
            }
        }))
    }

    /// Give the lock up now (its key goes with its lease).
    pub async fn release(&self, lock: Lock) -> Result<(), EtcdError> {
        lock.keepalive.abort();
        let lease = lock.lease;
        self.call(|mut c| async move { c.lease_revoke(lease).await })
            .await?;
        Ok(())
    }

    /// Publish a challenge response under `name` for `ttl` (it goes with its lease if the
    /// publisher dies). Sealed against its own etcd key, so a watcher that knows only the key
    /// can open it, and nothing can move it. Returns the key.
    pub async fn publish_challenge(
        &self,
        name: &str,
        payload: &[u8],
        ttl: Duration,
    ) -> Result<String, EtcdError> {
        let key = self.key(Kind::Challenge, name);
        let sealed = self
            .sealer
            .seal(Kind::Challenge, &key, payload)
            .map_err(refused(Kind::Challenge, name))?;
        let lease = self.grant(ttl).await?;
        let put = PutOptions::new().with_lease(lease);
        self.call(|mut c| {
            let (key, sealed, put) = (key.clone(), sealed.clone(), put.clone());
            async move { c.put(key, sealed, Some(put)).await }
        })
        .await?;
        Ok(key)
    }

    /// Take a published challenge back, with its acks.
    pub async fn withdraw_challenge(&self, key: &str) -> Result<(), EtcdError> {
        let acks = self.acks_prefix(key);
        for (target, prefix) in [(key.to_owned(), false), (acks, true)] {
            self.call(|mut c| {
                let target = target.clone();
                let options = prefix.then(|| etcd_client::DeleteOptions::new().with_prefix());
                async move { c.delete(target, options).await }
            })
            .await?;
        }
        Ok(())
    }

    /// The values of `kind` there now, then every change: a watch on the kind's keys.
    pub async fn watch(&self, kind: Kind) -> Result<Watch, EtcdError> {
        let prefix = format!("{}/{}/", self.settings.prefix, kind.label());
        let existing = self
            .call(|mut c| {
                let prefix = prefix.clone();
                async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let since = existing.header().map_or(0, |h| h.revision());
        let pending = existing
            .kvs()
            .iter()
            .map(|kv| Change {
                key: String::from_utf8_lossy(kv.key()).into_owned(),
                sealed: Some(kv.value().to_vec()),
            })
            .collect();
        let stream = self
            .call(|mut c| {
                let prefix = prefix.clone();
                let from = WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(since + 1);
                async move { c.watch(prefix, Some(from)).await }
            })
            .await?;
        Ok(Watch {
            endpoints: self.settings.endpoints.join(","),
            pending,
            stream,
        })
    }

    /// What a change under the challenge keys means.
    pub fn challenge_event(&self, change: Change) -> ChallengeEvent {
        let key = change.key;
        match change.sealed {
            None => ChallengeEvent::Gone { key },
            Some(sealed) => match self.sealer.open(Kind::Challenge, &key, &sealed) {
                Ok(payload) => ChallengeEvent::Published { key, payload },
                Err(source) => ChallengeEvent::Refused { key, source },
            },
        }
    }

    /// Join the fleet as `instance` until the returned task is aborted (the membership goes
    /// with its lease when the process dies).
    pub async fn join(
        &self,
        instance: &str,
        ttl: Duration,
    ) -> Result<tokio::task::JoinHandle<()>, EtcdError> {
        let key = self.key(Kind::Member, instance);
        let lease = self.grant(ttl).await?;
        let put = PutOptions::new().with_lease(lease);
        self.call(|mut c| {
            let (key, put) = (key.clone(), put.clone());
            async move { c.put(key, Vec::<u8>::new(), Some(put)).await }
        })
        .await?;
        self.keep_alive(lease, ttl).await
    }

    /// `instance` answers the challenge published at `key`.
    pub async fn ack(&self, key: &str, instance: &str, ttl: Duration) -> Result<(), EtcdError> {
        let ack = format!(
            "{}{}",
            self.acks_prefix(key),
            self.sealer.name(Kind::Ack, instance)
        );
        let lease = self.grant(ttl).await?;
        let put = PutOptions::new().with_lease(lease);
        self.call(|mut c| {
            let (ack, put) = (ack.clone(), put.clone());
            async move { c.put(ack, Vec::<u8>::new(), Some(put)).await }
        })
        .await?;
        Ok(())
    }

    /// How many instances are in the fleet, and how many answer the challenge at `key`.
    pub async fn coverage(&self, key: &str) -> Result<(i64, i64), EtcdError> {
        let members = format!("{}/{}/", self.settings.prefix, Kind::Member.label());
        let mut counts = [0i64; 2];
        for (count, prefix) in counts.iter_mut().zip([members, self.acks_prefix(key)]) {
            *count = self
                .call(|mut c| {
                    let prefix = prefix.clone();
                    let options = GetOptions::new().with_prefix().with_count_only();
                    async move { c.get(prefix, Some(options)).await }
                })
                .await?
                .count();
        }
        Ok((counts[0], counts[1]))
    }

    fn acks_prefix(&self, key: &str) -> String {
        let hash = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, key.as_bytes());
        format!(
            "{}/{}/{}/",
            self.settings.prefix,
            Kind::Ack.label(),
            hex::encode(&hash.as_ref()[..16])
        )
    }

    async fn grant(&self, ttl: Duration) -> Result<i64, EtcdError> {
        let secs = i64::try_from(ttl.as_secs().max(2)).unwrap_or(i64::MAX);
        Ok(self
            .call(|mut c| async move { c.lease_grant(secs, None).await })
            .await?
            .id())
    }
}
