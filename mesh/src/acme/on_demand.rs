//! On-demand issuance (`[on_demand]`): a name met in a ClientHello that no domain serves is
//! checked with `ask` (one request per name at a time, the answer cached both ways), admitted
//! as a domain of the on-demand source, and the handshake waits for its first certificate.
//! Every concurrent handshake for the name waits on the same domain, whose one lifecycle task
//! places the one order.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, oneshot, OnceCell, Semaphore};

use super::{Acme, Domain, Status};
use crate::config::sources::OnDemand as OnDemandConfig;

/// Answers kept at most (refusals of random names must not grow without bound).
const MAX_CACHED: usize = 100_000;
/// `ask` requests in flight at most; more wait their turn (within the handshake's deadline).
const MAX_ASKING: usize = 16;
/// How long a question `ask` did not answer (down, slow, a 5xx) stands as a refusal: long
/// enough that a flood of handshakes does not hammer a failing endpoint, short enough that a
/// customer is not refused for minutes after it is back.
const UNANSWERED_TTL: Duration = Duration::from_secs(5);

/// What the sources task is asked to do for on-demand names.
pub(super) enum Request {
    /// Admit this name (allowed by `ask`): its domain, or none when no more fit.
    Admit(String, oneshot::Sender<Option<Arc<Domain>>>),
    /// `ask` refuses these now: stop serving them.
    Forget(Vec<String>),
}

/// What `ask` said about a name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Answer {
    /// `200`.
    Allowed,
    /// Another answer (`404`, `403`, ...): refused for `refused_ttl`.
    Refused,
    /// No answer (unreachable, slow, a `5xx`): refused for [`UNANSWERED_TTL`].
    Unanswered,
}

/// One name's answer, shared by every handshake that asked while it was being fetched.
struct Asked {
    answer: OnceCell<Answer>,
    since: Instant,
}

/// New questions allowed now (`ask_rate`): a token bucket.
#[derive(Debug)]
struct AskBudget {
    tokens: f64,
    refilled: Instant,
    /// Names refused unasked since the last warning, and when that was.
    refused: u64,
    warned: Option<Instant>,
}

/// The `ask` check and the way to the sources task.
pub(super) struct OnDemand {
    pub(super) config: OnDemandConfig,
    timeout: Duration,
    client: crate::https::GetClient,
    asked: Mutex<HashMap<String, Arc<Asked>>>,
    asking: Semaphore,
    budget: Mutex<AskBudget>,
    pub(super) requests: mpsc::Sender<Request>,
    /// Taken by the sources task when it starts.
    pub(super) inbox: Mutex<Option<mpsc::Receiver<Request>>>,
}

impl std::fmt::Debug for OnDemand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnDemand")
            .field("ask", &self.config.ask)
            .finish_non_exhaustive()
    }
}

impl OnDemand {
    /// `config`'s check, with `timeout` per `ask` request.
    pub(super) fn new(
        config: OnDemandConfig,
        timeout: Duration,
    ) -> Result<Self, crate::https::RootsError> {
        let (requests, inbox) = mpsc::channel(64);
        let burst = config.ask_rate.map_or(0.0, |r| f64::from(r.count));
        Ok(Self {
            config,
            timeout,
            client: crate::https::get_client(timeout)?,
            asked: Mutex::default(),
            asking: Semaphore::new(MAX_ASKING),
            budget: Mutex::new(AskBudget {
                tokens: burst,
                refilled: Instant::now(),
                refused: 0,
                warned: None,
            }),
            requests,
            inbox: Mutex::new(Some(inbox)),
        })
    }

    /// Whether `ask` allows `name` (met in a handshake): cached, asked once however many
    /// handshakes wait, and a new question only within `ask_rate`.
    pub(super) async fn allowed(&self, name: &str) -> bool {
        self.answer(name, true).await == Some(Answer::Allowed)
    }

    /// What `ask` says about `name`, from the cache or asked now; `budgeted` questions count
    /// against `ask_rate` (None: over it, not asked).
    pub(super) async fn answer(&self, name: &str, budgeted: bool) -> Option<Answer> {
        let entry = {
            let mut asked = self.asked.lock().unwrap_or_else(|p| p.into_inner());
            let fresh = asked.get(name).filter(|a| !self.stale(a)).cloned();
            match fresh {
                Some(entry) => entry,
                None => {
                    // A new question: within `ask_rate`, or refused now, unasked, uncached.
                    if budgeted && !self.may_ask() {
                        return None;
                    }
                    if asked.len() >= MAX_CACHED {
                        asked.retain(|_, a| !self.stale(a));
                        if asked.len() >= MAX_CACHED {
                            asked.clear();
                        }
                    }
                    let entry = Arc::new(Asked {
                        answer: OnceCell::new(),
                        since: Instant::now(),
                    });
                    asked.insert(name.to_owned(), entry.clone());
                    entry
                }
            }
        };
        Some(*entry.answer.get_or_init(|| self.ask(name)).await)
    }

    /// Whether one more name may be asked about now (`ask_rate`); past it, a warning every
    /// 10 s at most says how many were refused unasked.
    fn may_ask(&self) -> bool {
        let Some(rate) = self.config.ask_rate else {
            return true;
        };
        let mut b = self.budget.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let capacity = f64::from(rate.count);
        let refill =
            now.duration_since(b.refilled).as_secs_f64() * capacity / rate.per.as_secs_f64();
        b.tokens = (b.tokens + refill).min(capacity);
        b.refilled = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return true;
        }
        b.refused += 1;
        if b.warned
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10))
        {
            tracing::warn!(refused = b.refused, ask_rate = %format!("{}/{:?}", rate.count, rate.per), "on demand: more new names than ask_rate allows: refused without asking");
            b.refused = 0;
            b.warned = Some(now);
        }
        false
    }

    /// Whether an answer is too old to use (an unanswered one never is: it is being fetched).
    fn stale(&self, asked: &Asked) -> bool {
        let ttl = match asked.answer.get() {
            None => return false,
            Some(Answer::Allowed) => self.config.allowed_ttl,
            Some(Answer::Refused) => self.config.refused_ttl,
            Some(Answer::Unanswered) => UNANSWERED_TTL.min(self.config.refused_ttl),
        };
        asked.since.elapsed() >= ttl
    }

    /// `GET <ask>?domain=<name>`: `200` allows; anything else, or no answer, refuses (a new
    /// name gets no certificate while the check is down; names already served keep theirs).
    async fn ask(&self, name: &str) -> Answer {
        let Ok(_permit) = self.asking.acquire().await else {
            return Answer::Unanswered;
        };
        let sep = if self.config.ask.contains('?') {
            '&'
        } else {
            '?'
        };
        let url = format!("{}{sep}domain={name}", self.config.ask);
        let request = async {
            let uri: http::Uri = url.parse().map_err(|e| format!("{e}"))?;
            let resp = self
                .client
                .get(uri)
                .await
                .map_err(|e| ratls::error_chain(&e))?;
            Ok::<_, String>(resp.status())
        };
        let answer = tokio::time::timeout(self.timeout, request).await;
        match answer {
            Ok(Ok(status)) if status == http::StatusCode::OK => {
                tracing::info!(domain = %name, "on demand: ask allows the name");
                Answer::Allowed
            }
            Ok(Ok(status)) if status.is_server_error() => {
                tracing::warn!(domain = %name, ask = %self.config.ask, %status, "on demand: ask failed: the name is refused for now");
                Answer::Unanswered
            }
            Ok(Ok(status)) => {
                tracing::info!(domain = %name, %status, "on demand: ask refuses the name");
                Answer::Refused
            }
            Ok(Err(e)) => {
                tracing::warn!(domain = %name, ask = %self.config.ask, error = %e, "on demand: ask unreachable: the name is refused for now");
                Answer::Unanswered
            }
            Err(_) => {
                tracing::warn!(domain = %name, ask = %self.config.ask, timeout = ?self.timeout, "on demand: ask did not answer in time: the name is refused for now");
                Answer::Unanswered
            }
        }
    }
}

/// Whether `name` is how a mesh peer reaches this CVM through the gateway
/// (`<app or instance id>-<port>[s].<base>`): never a customer's domain, never asked about.
pub fn is_mesh_name(name: &str) -> bool {
    let first = name.split('.').next().unwrap_or_default();
    let Some((id, port)) = first.rsplit_once('-') else {
        return false;
    };
    let port = port.strip_suffix('s').unwrap_or(port);
    id.len() >= 8
        && id.bytes().all(|b| b.is_ascii_hexdigit())
        && !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
}

impl Acme {
    /// The domain for `name`, met in a ClientHello: one that serves it, or one `[on_demand]`
    /// admits now. A domain admitted on demand that has no certificate yet is waited on until
    /// its first is served, its order fails, or the deadline passes (then it is served without
    /// one: a TLS alert); every handshake for the name waits on the same order. None when
    /// on-demand issuance is off, the name is not a customer domain, or `ask` refuses it.
    pub async fn admit(&self, name: &str) -> Option<Arc<Domain>> {
        let on_demand = self.on_demand.as_ref()?;
        let deadline = tokio::time::Instant::now() + on_demand.config.deadline;
        // Admitted since the router looked (another handshake's ask came first).
        if let Some(known) = self.lookup(name) {
            if known.awaits_first_certificate() {
                let _ = tokio::time::timeout_at(deadline, first_certificate(&known)).await;
            }
            return Some(known);
        }
        if is_mesh_name(name) {
            return None;
        }
        let name = crate::config::domains::check_name(name).ok()?;
        if name.starts_with("*.") {
            return None;
        }
        let admitted = async {
            if !on_demand.allowed(&name).await {
                return None;
            }
            let (reply, answer) = oneshot::channel();
            on_demand
                .requests
                .send(Request::Admit(name.clone(), reply))
                .await
                .ok()?;
            answer.await.ok()?
        };
        let domain = tokio::time::timeout_at(deadline, admitted).await.ok()??;
        let _ = tokio::time::timeout_at(deadline, first_certificate(&domain)).await;
        Some(domain)
    }

    /// Until `domain`, admitted on demand, serves its first certificate, its order fails, or
    /// the on-demand deadline passes.
    pub async fn first_certificate(&self, domain: &Domain) {
        if let Some(on_demand) = &self.on_demand {
            let _ =
                tokio::time::timeout(on_demand.config.deadline, first_certificate(domain)).await;
        }
    }
}

impl Domain {
    /// Whether it was admitted on demand and serves no certificate yet: a handshake for it
    /// waits. A plain load: the hot path of every other handshake.
    pub fn awaits_first_certificate(&self) -> bool {
        self.source.as_deref() == Some(crate::config::sources::ON_DEMAND)
            && self.served.load().is_none()
    }
}

/// Until `domain` serves a certificate, or its order has failed.
async fn first_certificate(domain: &Domain) {
    let mut events = domain.events.subscribe();
    loop {
        let failed = domain
            .state
            .lock()
            .map(|s| s.status == Some(Status::Failed))
            .unwrap_or(false);
        if domain.served.load().is_some() || failed {
            return;
        }
        if events.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_names_of_mesh_peers_are_never_customer_domains() {
        for mesh in [
            "5bb4ff9a3837357f19dc176407a5709c62eb6c56-8080s.dstack.example",
            "5bb4ff9a3837357f19dc176407a5709c62eb6c56-443.gateway.example",
            "0123abcd-1s.x",
        ] {
            assert!(is_mesh_name(mesh), "{mesh}");
        }
        for customer in [
            "shop.customer.com",
            "careers-2024.customer.com",
            "abc-80s.customer.com",
            "deadbeef-s.example",
            "deadbeefx-80.example",
        ] {
            assert!(!is_mesh_name(customer), "{customer}");
        }
    }
}
