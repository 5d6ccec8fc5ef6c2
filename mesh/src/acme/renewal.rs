//! Renewal: when a certificate is due, how long to wait after a failure, and the loop each
//! domain runs: order, check, store, serve; or fail, report, back off and try again.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

#[cfg(feature = "etcd")]
use super::{
    etcd::Change,
    replicas::{Fetched, Replicas, Shared},
    seal::Kind,
};
use crate::config::{Challenge, KeySource};

use super::{
    cert::{self, Loaded},
    client::{CaFault, IssueError, Issued, LocalError, Unreachable},
    jitter,
    store::{domain_key, CertStore},
    Acme, Domain, IssuerRuntime, Status, CAP_NEAR_EXPIRY, CAP_WITHOUT_CERT, ORDER_DEADLINE,
    RECHECK,
};

/// Where a certificate came from.
#[derive(Clone, Copy, Debug)]
enum Origin {
    /// This instance ordered it.
    Ordered,
    /// Another instance did; this one took it from the fleet's store.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    Fleet,
}

/// Serve `loaded` for `d`: valid again, failures cleared, counted by where it came from.
fn serve_valid(d: &Domain, loaded: Loaded, origin: Origin) {
    d.serve(Some(loaded));
    d.set(|s| {
        s.status = Some(Status::Valid);
        // Valid, and said so if it is served from memory only.
        s.last_error = s.unstored.clone();
        s.next_attempt = None;
        s.consecutive_failures = 0;
        match origin {
            Origin::Ordered => s.issued_total += 1,
            Origin::Fleet => s.from_fleet_total += 1,
        }
        s.stale = false;
    });
}

/// What tells a retry that the dependency that failed is back.
enum Probe {
    Ca(Arc<super::client::AcmeClient>),
    #[cfg(feature = "etcd")]
    Store(Arc<Replicas>),
}

/// When a certificate valid from `not_before` to `not_after` is due: `renew_before` ahead of
/// expiry, else when a third of its lifetime remains; never in the first tenth of its life (a
/// setting longer than the CA's lifetime must not turn into an order loop).
pub fn due(
    not_before: SystemTime,
    not_after: SystemTime,
    renew_before: Option<Duration>,
) -> SystemTime {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    let before = renew_before.unwrap_or(lifetime / 3);
    let due = not_after.checked_sub(before).unwrap_or(not_before);
    due.max(not_before + lifetime / 10)
}

/// The wait after `failures` failed attempts in a row: doubling from `min`, capped by `max`, and
/// much lower while the domain has no usable certificate (it is down) or little time left.
pub fn backoff(
    min: Duration,
    max: Duration,
    failures: u32,
    not_after: Option<SystemTime>,
    now: SystemTime,
) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    let base = min.saturating_mul(1 << exp);
    let cap = match not_after.map(|t| t.duration_since(now)) {
        None | Some(Err(_)) => CAP_WITHOUT_CERT,
        Some(Ok(left)) if left < Duration::from_secs(7 * 86400) => CAP_NEAR_EXPIRY,
        Some(Ok(_)) => max,
    };
    base.min(cap).min(max).max(min)
}

/// The CA's renewal window for one certificate (ARI, RFC 9773) and when to ask again.
#[derive(Clone, Debug)]
pub(crate) struct AriState {
    /// The certificate it is about.
    serial: String,
    /// The window, when the CA gave one.
    window: Option<super::ari::Window>,
    /// The moment picked in it (uniformly at random, kept while the window stays).
    chosen: Option<SystemTime>,
    /// Ask again then.
    next_check: SystemTime,
    /// Failures in a row.
    failures: u32,
    /// The last answer, in words (`/certs`).
    said: String,
}

impl AriState {
    /// The last answer, in words.
    pub(super) fn said(&self) -> &str {
        &self.said
    }

    /// A CA's answer: `window` (with the moment `chosen` in it), or none when it offers no ARI.
    fn answered(
        serial: &str,
        window: Option<super::ari::Window>,
        chosen: Option<SystemTime>,
        next_check: SystemTime,
    ) -> Self {
        let said = match &window {
            Some(w) => format!(
                "window {} to {}{}",
                crate::clock::rfc3339_of(w.start_time()),
                crate::clock::rfc3339_of(w.end_time()),
                w.explanation
                    .as_deref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            ),
            None => "not offered by the CA: renewing by the certificate's lifetime".into(),
        };
        Self {
            serial: serial.to_owned(),
            window,
            chosen,
            next_check,
            failures: 0,
            said,
        }
    }
}

/// The part of a certificate's ARI state kept in the store (`certs/<domain>/ari.json`), so a
/// restart keeps the moment chosen in the window and honours the CA's Retry-After instead of
/// asking again at once.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredAri {
    serial: String,
    window: Option<super::ari::Window>,
    /// Unix seconds.
    chosen: Option<u64>,
    /// Unix seconds.
    next_check: u64,
}

/// The ARI state kept in the store, if it reads as one (a garbled file is ignored).
pub(crate) fn read_stored_ari(bytes: &[u8]) -> Option<(String, AriState)> {
    let kept: StoredAri = serde_json::from_slice(bytes).ok()?;
    let state = AriState::answered(
        &kept.serial,
        kept.window,
        kept.chosen.map(from_unix),
        from_unix(kept.next_check),
    );
    Some((kept.serial, state))
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn from_unix(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

/// `d`'s renewal window state, when it is about `cert` (a new certificate has none yet).
fn ari_for(d: &Domain, cert: &Loaded) -> Option<AriState> {
    d.state
        .lock()
        .ok()
        .and_then(|s| s.ari.clone())
        .filter(|a| a.serial == cert.serial)
}

/// A uniformly random moment in `w`; its end when that has passed (renew at once).
fn pick(w: &super::ari::Window, now: SystemTime) -> SystemTime {
    let (start, end) = (w.start_time(), w.end_time());
    if end <= now {
        return end;
    }
    start + jitter(end.duration_since(start).unwrap_or_default())
}

impl Acme {
    /// When `cert` is due: inside the CA's suggested window when it gave one (or earlier, when
    /// `renew_before` says so), else by its lifetime (see [`due`]).
    pub(super) fn renew_at(&self, d: &Domain, cert: &Loaded) -> SystemTime {
        let by_lifetime = due(cert.not_before, cert.not_after, self.config.renew_before);
        let chosen = ari_for(d, cert).and_then(|a| a.chosen);
        match (chosen, self.config.renew_before) {
            (Some(t), Some(_)) => t.min(by_lifetime),
            (Some(t), None) => t,
            (None, _) => by_lifetime,
        }
    }

    /// When the CA's window for `cert` is to be asked for again (now, for a certificate not
    /// asked about yet).
    fn ari_next_check(&self, d: &Domain, cert: &Loaded) -> SystemTime {
        ari_for(d, cert).map_or(SystemTime::UNIX_EPOCH, |a| a.next_check)
    }

    /// Ask the CA for `cert`'s renewal window when it is time to; a CA without ARI, or one
    /// that fails to answer, leaves renewal to the certificate's lifetime.
    async fn refresh_ari(&self, d: &Domain, cert: &Loaded) {
        // An issuer without ARI (the internal CA) has nothing to ask or to have kept.
        let Some(IssuerRuntime::Acme(client)) = self.issuers.get(&d.config.issuer) else {
            return;
        };
        let now = SystemTime::now();
        if ari_for(d, cert).is_none() {
            if let Some(kept) = self.stored_ari(d, cert) {
                d.set(|s| s.ari = Some(kept));
            }
        }
        if self.ari_next_check(d, cert) > now {
            return;
        }
        let Some(leaf) = cert.key.cert.first() else {
            return;
        };
        let previous = ari_for(d, cert);
        let floor = self.config.retry_min.min(super::ari::RETRY_MIN);
        let state = match client.renewal_info(leaf.as_ref(), floor).await {
            Ok(super::ari::Suggestion::Window(window, retry)) => {
                let kept = previous
                    .as_ref()
                    .filter(|p| p.window.as_ref() == Some(&window))
                    .and_then(|p| p.chosen);
                let chosen = kept.unwrap_or_else(|| pick(&window, now));
                if kept.is_none() {
                    tracing::info!(
                        domain = %d.name(),
                        serial = %cert.serial,
                        window_start = %crate::clock::rfc3339_of(window.start_time()),
                        window_end = %crate::clock::rfc3339_of(window.end_time()),
                        renew_at = %crate::clock::rfc3339_of(chosen),
                        explanation = window.explanation.as_deref().unwrap_or(""),
                        "the CA's renewal window (ARI)"
                    );
                }
                let state =
                    AriState::answered(&cert.serial, Some(window), Some(chosen), now + retry);
                self.keep_ari(d, &state);
                state
            }
            Ok(super::ari::Suggestion::Unsupported) => {
                let state = AriState::answered(&cert.serial, None, None, now + RECHECK);
                self.keep_ari(d, &state);
                state
            }
            Err(e) => {
                let failures = previous.as_ref().map_or(0, |p| p.failures) + 1;
                let retry = e.retry_after(failures, floor);
                tracing::warn!(domain = %d.name(), error = %e, retry_in_s = retry.as_secs(), "no renewal window from the CA: keeping the last one, else renewing by the certificate's lifetime");
                let mut state = previous.unwrap_or(AriState {
                    serial: cert.serial.clone(),
                    window: None,
                    chosen: None,
                    next_check: now,
                    failures: 0,
                    said: String::new(),
                });
                state.failures = failures;
                state.next_check = now + retry;
                state.said = format!("unavailable ({e}): renewing by the certificate's lifetime unless a window was given before");
                state
            }
        };
        d.set(|s| s.ari = Some(state));
    }

    /// The ARI state kept for `cert` by an earlier run, if any.
    fn stored_ari(&self, d: &Domain, cert: &Loaded) -> Option<AriState> {
        let bytes = self.store.read(&domain_key(d.name(), "ari.json")).ok()??;
        let (serial, state) = read_stored_ari(&bytes)?;
        (serial == cert.serial).then_some(state)
    }

    /// Keep a CA's answer for the next run; a store that cannot take it costs one more request
    /// after a restart, nothing else.
    fn keep_ari(&self, d: &Domain, state: &AriState) {
        let kept = StoredAri {
            serial: state.serial.clone(),
            window: state.window.clone(),
            chosen: state.chosen.map(unix),
            next_check: unix(state.next_check),
        };
        let written = serde_json::to_vec(&kept)
            .map_err(|e| e.to_string())
            .and_then(|b| {
                self.store
                    .write(&domain_key(d.name(), "ari.json"), &b, false)
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = written {
            tracing::debug!(domain = %d.name(), error = %e, "renewal window not stored");
        }
    }

    /// The wait after a failure (see [`backoff`]), plus up to a tenth more so replicas that
    /// failed together do not retry together.
    fn backoff(&self, failures: u32, cert: Option<&Loaded>) -> Duration {
        let wait = backoff(
            self.config.retry_min,
            self.config.retry_max,
            failures,
            cert.map(|c| c.not_after),
            SystemTime::now(),
        );
        wait + jitter(wait / 10)
    }

    // Long on purpose: the domain's state machine as one loop (pending, issuing, valid,
    // renewing, failed), every transition visible in one place.
    pub(super) async fn lifecycle(self: Arc<Self>, d: Arc<Domain>) {
        let name = d.name().to_owned();
        loop {
            let current = d.served.load_full();
            let stale = d.state.lock().map(|s| s.stale).unwrap_or(false);
            if let (Some(cert), false) = (current.as_deref(), stale) {
                Box::pin(self.refresh_ari(&d, cert)).await;
                let now = SystemTime::now();
                let due = self.renew_at(&d, cert);
                if due > now {
                    d.set(|s| {
                        if s.dns_moved.is_none() {
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
                    // The CA may move the window (a revocation ahead): look again when it says.
                    // An issuer without ARI says nothing (it used to wake every domain every
                    // second: 10,000 store reads a second at 10,000 domains).
                    let ask = ari_for(&d, cert).map_or(RECHECK, |a| {
                        a.next_check.duration_since(now).unwrap_or_default()
                    });
                    tokio::select! {
                        _ = tokio::time::sleep(wait.min(RECHECK).min(ask.max(Duration::from_secs(1)))) => continue,
                        _ = d.renew_now.notified() => {}
                    }
                }
            }
            // A customer's domain whose DNS leads elsewhere: an order would fail validation
            // and spend the CA's limits. Hold it until the DNS points here (the health check
            // wakes it), or a while.
            if let Err(why) = Box::pin(self.points_here(&d)).await {
                d.set(|s| s.last_error = Some(format!("DNS moved: {why}")));
                let wait = self.health.as_ref().map_or(RECHECK, |h| h.interval());
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = d.dns_back.notified() => {}
                    _ = d.renew_now.notified() => {}
                }
                continue;
            }
            // What is served now: the fleet may have replaced it during the wait.
            let current = d.served.load_full();
            d.set(|s| {
                s.status = Some(if current.is_some() {
                    Status::Renewing
                } else {
                    Status::Issuing
                });
            });
            tracing::info!(domain = %name, issuer = %d.config.issuer.label(), renewal = current.is_some(), "ordering a certificate");
            let started = std::time::Instant::now();
            // Boxed, like every phase: a domain at rest (thousands of them) holds only the
            // loop's own state, not an order's.
            match Box::pin(self.acquire(&d, current.as_deref())).await {
                Ok((loaded, origin)) => {
                    tracing::info!(
                        domain = %name,
                        serial = %loaded.serial,
                        not_after = %crate::clock::rfc3339_of(loaded.not_after),
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "certificate issued and served"
                    );
                    serve_valid(&d, loaded, origin);
                    self.evidence_due.notify_one();
                }
                Err(e) => {
                    let failures = d
                        .state
                        .lock()
                        .map(|s| s.consecutive_failures + 1)
                        .unwrap_or(1);
                    let wait = match &e {
                        // A rate limit lasts hours: the usual pace only spends the allowance,
                        // and never before the CA's Retry-After.
                        IssueError::RateLimited(p) => self
                            .backoff(failures + 2, current.as_deref())
                            .max(p.retry_after.unwrap_or_default()),
                        // A throttled DNS API: never before its Retry-After.
                        IssueError::Dns(super::dns01::DnsError::Throttled {
                            retry_after, ..
                        }) => self.backoff(failures, current.as_deref()).max(*retry_after),
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
                    Box::pin(self.wait_to_retry(&d, wait, &e)).await;
                }
            }
        }
    }

    /// Sleep until the next attempt; wake early on `certs renew`, or when the CA or the fleet's
    /// store that was down answers again (probed cheaply, so recovery takes seconds, not a
    /// backoff).
    async fn wait_to_retry(&self, d: &Domain, wait: Duration, error: &IssueError) {
        let deadline = tokio::time::Instant::now() + wait;
        let probe = match (&self.issuers.get(&d.config.issuer), error) {
            #[cfg(feature = "etcd")]
            (_, IssueError::Shared(_)) => self.replicas.clone().map(Probe::Store),
            (Some(IssuerRuntime::Acme(c)), e) if e.probe_helps() => Some(Probe::Ca(c.clone())),
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
            match &probe {
                Some(Probe::Ca(client)) if client.probe().await.is_ok() => {
                    tracing::info!(domain = %d.name(), directory = %client.directory(), "the CA answers again: retrying now");
                    return;
                }
                #[cfg(feature = "etcd")]
                Some(Probe::Store(replicas)) if replicas.check().await.is_ok() => {
                    tracing::info!(domain = %d.name(), store = %replicas.location(), "the fleet's store answers again: retrying now");
                    return;
                }
                _ => {}
            }
        }
    }

    /// A certificate for `d`: alone, an order; with replicas, under the fleet's lock: the
    /// fleet's if another instance just got a fresh one, else an order the fleet then shares.
    async fn acquire(
        &self,
        d: &Domain,
        current: Option<&Loaded>,
    ) -> Result<(Loaded, Origin), IssueError> {
        // Records the operator creates come first (not under the fleet's lock: that wait may
        // be long).
        if matches!(
            self.issuers.get(&d.config.issuer),
            Some(IssuerRuntime::Acme(_))
        ) {
            self.dns_setup(d).await?;
        }
        #[cfg(feature = "etcd")]
        if let Some(replicas) = &self.replicas {
            return self.acquire_shared(replicas, d, current).await;
        }
        Ok((self.obtain(d, current).await?.0, Origin::Ordered))
    }

    /// [`Acme::acquire`] through the fleet: its certificate when it has a fresh one, else an
    /// order under its lock. An instance that finds the lock held waits for the holder and
    /// then looks again, so the fleet's instances do not queue through the lock.
    #[cfg(feature = "etcd")]
    async fn acquire_shared(
        &self,
        replicas: &Replicas,
        d: &Domain,
        current: Option<&Loaded>,
    ) -> Result<(Loaded, Origin), IssueError> {
        let name = d.name();
        let lock = loop {
            if let Some(loaded) = self.fresh_from_fleet(replicas, d, current).await? {
                return Ok((loaded, Origin::Fleet));
            }
            let attempt = replicas.lock_or_wait(name).await.inspect_err(|e| {
                d.set(|s| s.fleet = Some(format!("unreachable: {e}")));
            })?;
            if let Some(lock) = attempt {
                break lock;
            }
        };
        let result = async {
            // It may have landed between the look and the lock.
            if let Some(loaded) = self.fresh_from_fleet(replicas, d, current).await? {
                return Ok((loaded, Origin::Fleet));
            }
            tracing::info!(domain = %name, store = %replicas.location(), "ordering for the fleet (holding its lock)");
            let (loaded, issued) = self.obtain(d, current).await?;
            // Served before it is shared: this instance's own watch then sees nothing newer.
            d.serve(Some(loaded.clone()));
            let shared = Shared {
                chain_pem: issued.chain_pem,
                key_pem: issued.key_pem,
            };
            match replicas.publish(&lock, name, &shared).await {
                Ok(()) => d.set(|s| s.fleet = Some("shared".into())),
                // Served here anyway; another instance that finds nothing orders again.
                Err(e) => {
                    tracing::error!(domain = %name, store = %replicas.location(), error = %e, "certificate not shared with the fleet");
                    d.set(|s| s.fleet = Some(format!("not shared: {e}")));
                }
            }
            Ok((loaded, Origin::Ordered))
        }
        .await;
        replicas.release(lock).await;
        result
    }

    /// The fleet's certificate for `d` if it is fresh and newer than `current` (or the same
    /// one, unless that is what this renewal replaces: `certs renew`, another issuer's).
    #[cfg(feature = "etcd")]
    async fn fresh_from_fleet(
        &self,
        replicas: &Replicas,
        d: &Domain,
        current: Option<&Loaded>,
    ) -> Result<Option<Loaded>, IssueError> {
        let Some(loaded) = self.fleet_copy(replicas, d).await? else {
            return Ok(None);
        };
        let stale = d.state.lock().map(|s| s.stale).unwrap_or(false);
        let fresh = !d.revoked(&loaded.serial)
            && self.renew_at(d, &loaded) > SystemTime::now()
            && current.is_none_or(|c| {
                c.superseded_by(loaded.not_after, &loaded.serial)
                    || (loaded.serial == c.serial && !stale)
            });
        if !fresh {
            return Ok(None);
        }
        tracing::info!(domain = %d.name(), serial = %loaded.serial, store = %replicas.location(), "the fleet's certificate taken: no order");
        Ok(Some(loaded))
    }

    /// The fleet's certificate for `d`, checked, and kept in the local store: `None` when
    /// there is none, or it is unusable or refused (reported on `d`).
    #[cfg(feature = "etcd")]
    async fn fleet_copy(
        &self,
        replicas: &Replicas,
        d: &Domain,
    ) -> Result<Option<Loaded>, IssueError> {
        let name = d.name();
        let shared = match replicas.fetch(name).await {
            Ok(Fetched::Found(shared)) => shared,
            Ok(Fetched::Absent) => return Ok(None),
            Ok(Fetched::Refused(why)) => {
                d.set(|s| s.fleet = Some(format!("refused: {why}")));
                return Ok(None);
            }
            Err(e) => {
                d.set(|s| s.fleet = Some(format!("unreachable: {e}")));
                return Err(e.into());
            }
        };
        let issued = Issued {
            chain_pem: shared.chain_pem,
            key_pem: shared.key_pem,
        };
        match cert::load(
            issued.chain_pem.as_bytes(),
            issued.key_pem.as_bytes(),
            &d.config.names,
        ) {
            Ok(loaded) => {
                d.set(|s| s.fleet = Some("shared".into()));
                self.keep(d, &issued);
                Ok(Some(loaded))
            }
            Err(e) => {
                // Authentic but not for this configuration (another version's names).
                tracing::error!(domain = %name, error = %e, "the fleet's certificate is unusable here");
                d.set(|s| s.fleet = Some(format!("unusable here: {e}")));
                Ok(None)
            }
        }
    }

    /// Serve what the fleet publishes as it lands: a certificate another instance ordered
    /// (first issuance, a renewal, `certs renew`) is served here within a watch event, not at
    /// this instance's own due time; one that does not open is reported and re-ordered once
    /// for the fleet (every instance asks; the lock lets one order and the rest take it).
    #[cfg(feature = "etcd")]
    pub(super) async fn follow_fleet(self: Arc<Self>, replicas: Arc<Replicas>) {
        let names: Vec<&str> = self.domains.iter().map(|d| d.name()).collect();
        let mut retry = Duration::from_secs(1);
        loop {
            let session = async {
                let (mut certs, cert_keys) =
                    replicas.watch_domains(Kind::Certificate, &names).await?;
                let (mut keys, key_keys) = replicas.watch_domains(Kind::PrivateKey, &names).await?;
                retry = Duration::from_secs(1);
                let mut changes: Vec<(Kind, Change)> = (certs.existing().into_iter())
                    .map(|c| (Kind::Certificate, c))
                    .chain(keys.existing().into_iter().map(|c| (Kind::PrivateKey, c)))
                    .collect();
                loop {
                    for (kind, change) in changes.drain(..) {
                        let index = match kind {
                            Kind::Certificate => cert_keys.get(&change.key),
                            _ => key_keys.get(&change.key),
                        };
                        // A deletion takes nothing from anyone: each instance keeps its copy.
                        let (Some(d), Some(sealed)) =
                            (index.and_then(|i| self.domains.get(*i)), &change.sealed)
                        else {
                            continue;
                        };
                        match kind {
                            Kind::Certificate => self.adopt(&replicas, d, sealed).await,
                            // A key is read with its certificate; here it is only checked.
                            _ => {
                                if let Err(why) = replicas
                                    .open_fleet(Kind::PrivateKey, d.name(), sealed)
                                    .await
                                {
                                    self.refused(d, &why);
                                }
                            }
                        }
                    }
                    let next = tokio::select! {
                        c = certs.next() => c?.map(|c| (Kind::Certificate, c)),
                        k = keys.next() => k?.map(|k| (Kind::PrivateKey, k)),
                    };
                    match next {
                        Some(change) => changes.push(change),
                        None => return Ok::<_, super::replicas::SharedError>(()),
                    }
                }
            };
            if let Err(e) = replicas.note(session.await) {
                tracing::warn!(store = %replicas.location(), error = %e, retry_in_s = retry.as_secs(), "not following the fleet's certificates");
            }
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(super::replicas::RECONNECT_MAX);
        }
    }

    /// The fleet's copy of `d` does not open: say so, and replace it for the fleet (serving
    /// here goes on meanwhile; the lock lets one instance order).
    #[cfg(feature = "etcd")]
    fn refused(&self, d: &Domain, why: &str) {
        d.set(|s| s.fleet = Some(format!("refused: {why}")));
        d.renew_now.notify_one();
    }

    /// Take the fleet's certificate for `d`, `sealed` as the watch delivered it, when it is
    /// newer than the one served here. Opened first: only a newer one costs a read of its
    /// key, and one that does not open is reported and replaced through the lock.
    #[cfg(feature = "etcd")]
    async fn adopt(&self, replicas: &Replicas, d: &Domain, sealed: &[u8]) {
        let chain = match replicas
            .open_fleet(Kind::Certificate, d.name(), sealed)
            .await
        {
            Ok(chain) => chain,
            Err(why) => return self.refused(d, &why),
        };
        let served = d.served.load_full();
        match (cert::leaf_summary(&chain), served.as_deref()) {
            (Some((_, serial)), _) if d.revoked(&serial) => return,
            (Some((t, serial)), Some(c)) if !c.superseded_by(t, &serial) => {
                d.set(|s| s.fleet = Some("shared".into()));
                return;
            }
            (None, _) => {
                tracing::error!(domain = %d.name(), "the fleet's certificate does not parse");
                return;
            }
            _ => {}
        }
        match self.fleet_copy(replicas, d).await {
            // Only a newer one: the same one is what this instance may be replacing.
            Ok(Some(loaded))
                if d.served
                    .load()
                    .as_ref()
                    .is_none_or(|c| c.superseded_by(loaded.not_after, &loaded.serial)) =>
            {
                tracing::info!(domain = %d.name(), serial = %loaded.serial, store = %replicas.location(), "the fleet's newer certificate taken: no order");
                serve_valid(d, loaded, Origin::Fleet);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(domain = %d.name(), error = %e, "the fleet's certificate could not be read");
            }
        }
    }

    /// An order (or the internal CA), kept in the local store; an order that replaces
    /// `current` says so (ARI's `replaces`).
    async fn obtain(
        &self,
        d: &Domain,
        current: Option<&Loaded>,
    ) -> Result<(Loaded, Issued), IssueError> {
        let names = &d.config.names;
        let key = match self.config.key_source {
            KeySource::Random => None,
            KeySource::Derived => Some(self.derived_key(d).await?),
        };
        let replacing = current
            .filter(|c| !d.revoked(&c.serial))
            .and_then(|c| c.key.cert.first())
            .map(|c| c.as_ref());
        // DNS-01 with no provider here: the operator publishes each challenge, within
        // DNS_SETUP_TIMEOUT on top of the order's own deadline.
        let operator = self
            .dns
            .as_deref()
            .filter(|dns| d.config.challenge == Challenge::Dns01 && dns.operator_places())
            .and_then(|dns| dns.setup());
        let hand = super::records::OperatorHand {
            acme: self,
            domain: d,
        };
        let deadline = ORDER_DEADLINE + operator.map_or(Duration::ZERO, |s| s.timeout);
        let spec = super::client::OrderSpec {
            names,
            challenge: d.config.challenge,
            key: key.as_ref(),
            replacing,
            operator: operator.map(|_| &hand as &dyn super::dns01::OperatorRecords),
        };
        let issued: Issued = match self.issuers.get(&d.config.issuer) {
            Some(IssuerRuntime::Acme(client)) => {
                // A burst of new domains waits its turn rather than failing at the CA.
                // Renewals are exempt, as at Let's Encrypt (ARI renewals, and renewals of the
                // same names for the per-domain limit).
                if current.is_none() {
                    self.limits
                        .slot(names, |queued| d.set(|s| s.queued = queued))
                        .await;
                }
                tokio::time::timeout(
                    deadline,
                    client.issue(&spec, &self.challenges, self.dns.as_deref()),
                )
                .await
                .map_err(|_| IssueError::Unreachable(Unreachable::OrderDeadline(deadline)))??
            }
            Some(IssuerRuntime::Internal(ca)) => ca
                .issue(names, key.as_ref())
                .await
                .map_err(LocalError::from)?,
            None => return Err(LocalError::NoIssuer.into()),
        };
        let loaded = cert::load(
            issued.chain_pem.as_bytes(),
            issued.key_pem.as_bytes(),
            names,
        )
        .map_err(|e| IssueError::Server(CaFault::Unusable(e)))?;
        self.keep(d, &issued);
        Ok((loaded, issued))
    }

    /// `d`'s certificate key derived from the app's key: the same on every instance.
    async fn derived_key(&self, d: &Domain) -> Result<rcgen::KeyPair, IssueError> {
        let path = super::client::domain_key_path(d.name());
        let seed = super::client::app_secret(&self.agent, &path, "domain-key")
            .await
            .map_err(LocalError::from)?;
        let der = super::client::derive_domain_key(&seed).map_err(LocalError::from)?;
        let key = rcgen::KeyPair::try_from(der.secret_pkcs8_der())
            .map_err(|e| LocalError::DomainKey(e.to_string()))?;
        Ok(key)
    }

    /// Write `issued` to the local store (served whether or not that works).
    fn keep(&self, d: &Domain, issued: &Issued) {
        let names = &d.config.names;
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
        // Served anyway: a full disk must not take the domain down; a start without this
        // certificate serves the stored one (still valid) or orders again.
        let unstored = stored.err().map(|e| {
            tracing::error!(domain = %name, error = %e, "certificate not stored");
            format!("served, but not stored: {e}")
        });
        d.set(|s| s.unstored = unstored);
    }
}

/// Load a domain's stored certificate; anything unusable is reported, moved aside and
/// reissued, never served.
/// [`load_stored`] for each of `domains`, on every core: at start-up that is every domain,
/// and reading and checking a stored pair costs ~85 µs (10,000 took 0.85 s on one core).
pub(super) fn load_all_stored(store: &dyn CertStore, domains: &[&Domain]) {
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    if threads == 1 || domains.len() < 256 {
        domains.iter().for_each(|d| load_stored(store, d));
        return;
    }
    std::thread::scope(|scope| {
        for part in domains.chunks(domains.len().div_ceil(threads)) {
            scope.spawn(move || part.iter().for_each(|d| load_stored(store, d)));
        }
    });
}

pub(super) fn load_stored(store: &dyn CertStore, d: &Domain) {
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
                tracing::info!(domain = %name, serial = %loaded.serial, not_after = %crate::clock::rfc3339_of(loaded.not_after), "stored certificate loaded");
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

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86400);

    /// A store that counts its reads.
    #[derive(Debug)]
    struct Counted(Arc<dyn CertStore>, Arc<std::sync::atomic::AtomicUsize>);

    impl CertStore for Counted {
        fn read(&self, key: &str) -> Result<Option<Vec<u8>>, super::super::store::StoreError> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.0.read(key)
        }
        fn write(
            &self,
            key: &str,
            bytes: &[u8],
            secret: bool,
        ) -> Result<(), super::super::store::StoreError> {
            self.0.write(key, bytes, secret)
        }
        fn set_aside(&self, key: &str, why: &str) -> Result<(), super::super::store::StoreError> {
            self.0.set_aside(key, why)
        }
        fn location(&self) -> String {
            self.0.location()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_valid_certificate_of_an_issuer_without_ari_rests_until_its_renewal() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[acme]\nstore = \"{}\"\nissuer = \"internal-ca\"\n\
             [[domains]]\nnames = [\"a.example.test\"]\nbackend = \"127.0.0.1:9\"\n",
            dir.path().join("store").display()
        );
        let env: std::collections::HashMap<&str, &str> = std::collections::HashMap::new();
        let config = crate::config::Config::from_toml(&text, &env).unwrap();
        let shared = super::super::Shared {
            store: config.store.clone(),
            app_id: "5bb4ff9a3837357f19dc176407a5709c62eb6c56".parse().unwrap(),
        };
        let agent = ratls::agent::AgentClient::new(ratls::agent::AgentAddress::Unix(
            dir.path().join("no-agent.sock"),
        ));
        let mut acme = Acme::new(&config.public, &shared, agent, None).unwrap();
        let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let only = Arc::get_mut(&mut acme).unwrap();
        only.store = Arc::new(Counted(only.store.clone(), reads.clone()));
        let d = acme.domains[0].clone();
        let task = tokio::spawn(acme.clone().lifecycle(d.clone()));
        while d.served.load().is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Issued (five years' lifetime); an hour at rest touches the store no more.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let before = reads.load(std::sync::atomic::Ordering::SeqCst);
        // Every pass of the lifecycle touches the domain's state, which ticks its events.
        let mut woke = d.events.subscribe();
        woke.mark_unchanged();
        tokio::time::sleep(Duration::from_secs(3600)).await;
        let during = reads.load(std::sync::atomic::Ordering::SeqCst) - before;
        assert_eq!(during, 0, "store reads during an hour at rest");
        assert!(
            !woke.has_changed().unwrap(),
            "the lifecycle woke during an hour at rest"
        );
        task.abort();
    }

    #[test]
    fn renewal_is_due_at_two_thirds_or_the_setting() {
        let start = SystemTime::UNIX_EPOCH + 1000 * DAY;
        let end = start + 90 * DAY;
        assert_eq!(due(start, end, None), start + 60 * DAY);
        assert_eq!(due(start, end, Some(30 * DAY)), start + 60 * DAY);
        assert_eq!(due(start, end, Some(20 * DAY)), start + 70 * DAY);
        // Longer than the lifetime: not an order loop, the first tenth is kept.
        assert_eq!(due(start, end, Some(365 * DAY)), start + 9 * DAY);
    }

    #[test]
    fn backoff_doubles_and_is_capped_by_what_is_at_stake() {
        let (min, max) = (Duration::from_secs(10), Duration::from_secs(6 * 3600));
        let now = SystemTime::UNIX_EPOCH + 1000 * DAY;
        let far = Some(now + 60 * DAY);
        let waits: Vec<u64> = (1..=6)
            .map(|f| backoff(min, max, f, far, now).as_secs())
            .collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 320]);
        assert_eq!(backoff(min, max, 40, far, now), max);
        // No certificate, or an expired one: the domain is down, retry within minutes.
        assert_eq!(backoff(min, max, 40, None, now), CAP_WITHOUT_CERT);
        assert_eq!(
            backoff(min, max, 40, Some(now - DAY), now),
            CAP_WITHOUT_CERT
        );
        assert_eq!(
            backoff(min, max, 40, Some(now + 3 * DAY), now),
            CAP_NEAR_EXPIRY
        );
        // A cap below the minimum never shortens the minimum.
        assert_eq!(
            backoff(Duration::from_secs(600), max, 1, None, now).as_secs(),
            600
        );
    }
}
