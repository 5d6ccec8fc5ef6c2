//! The CA's published rate limits, kept on our side so that a burst of new domains queues
//! instead of failing: new orders per account in a window (Let's Encrypt: 300 per 3 hours) and
//! certificates per registered domain in a window (50 per 7 days). An order waits for a free
//! slot; its domain says so on `/certs` meanwhile. The slots taken are kept in the store, so a
//! restart does not forget them.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use super::store::CertStore;
use crate::config::domains::RateLimit;

/// Where the slots taken are kept.
const STORE_KEY: &str = "rate-limits.json";

/// The limits and the orders that count against them.
#[derive(Debug)]
pub struct Limits {
    orders: Option<RateLimit>,
    per_domain: Option<RateLimit>,
    taken: Mutex<Taken>,
    store: Arc<dyn CertStore>,
}

/// When each counted order was placed (Unix seconds), overall and by registered domain.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Taken {
    orders: VecDeque<u64>,
    domains: HashMap<String, VecDeque<u64>>,
}

/// The registered domain (eTLD+1) a name counts against: `careers.customer.com` →
/// `customer.com`, `a.b.co.uk` → `b.co.uk`; the name itself when the suffix list knows none.
pub fn registered_domain(name: &str) -> String {
    let bare = name.strip_prefix("*.").unwrap_or(name);
    psl::domain_str(bare).unwrap_or(bare).to_owned()
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Drop what left the window; the moment a slot frees when the window is full.
fn full_until(times: &mut VecDeque<u64>, limit: &RateLimit, now: u64) -> Option<u64> {
    let per = limit.per.as_secs();
    while times.front().is_some_and(|t| t + per <= now) {
        times.pop_front();
    }
    match times.len() >= limit.count as usize {
        true => times
            .get(times.len() - limit.count as usize)
            .map(|t| t + per),
        false => None,
    }
}

impl Limits {
    /// `orders` per account and `per_domain` per registered domain (none: unlimited), with
    /// what an earlier run took read back from `store`.
    pub fn new(
        orders: Option<RateLimit>,
        per_domain: Option<RateLimit>,
        store: Arc<dyn CertStore>,
    ) -> Self {
        let taken = store
            .read(STORE_KEY)
            .ok()
            .flatten()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Self {
            orders,
            per_domain,
            taken: Mutex::new(taken),
            store,
        }
    }

    /// Wait for a slot to order `names`, then take it. `queued` hears why and until when
    /// whenever the order has to wait, and `None` once it may go.
    pub async fn slot(&self, names: &[String], mut queued: impl FnMut(Option<String>)) {
        let mut domains: Vec<String> = names.iter().map(|n| registered_domain(n)).collect();
        domains.sort();
        domains.dedup();
        loop {
            let now = unix(SystemTime::now());
            let wait = {
                let mut taken = self.taken.lock().unwrap_or_else(|p| p.into_inner());
                let mut until: Option<(u64, String)> = None;
                let mut later = |t: Option<u64>, why: String| {
                    if let Some(t) = t {
                        if until.as_ref().is_none_or(|(u, _)| t > *u) {
                            until = Some((t, why));
                        }
                    }
                };
                if let Some(limit) = &self.orders {
                    let t = full_until(&mut taken.orders, limit, now);
                    later(
                        t,
                        format!(
                            "{} new orders per {:?} for the account",
                            limit.count, limit.per
                        ),
                    );
                }
                if let Some(limit) = &self.per_domain {
                    for domain in &domains {
                        let times = taken.domains.entry(domain.clone()).or_default();
                        let t = full_until(times, limit, now);
                        later(
                            t,
                            format!(
                                "{} certificates per {:?} for {domain}",
                                limit.count, limit.per
                            ),
                        );
                    }
                    taken.domains.retain(|_, times| !times.is_empty());
                }
                match until {
                    Some(wait) => Some(wait),
                    None => {
                        if self.orders.is_some() {
                            taken.orders.push_back(now);
                        }
                        if self.per_domain.is_some() {
                            for domain in &domains {
                                taken
                                    .domains
                                    .entry(domain.clone())
                                    .or_default()
                                    .push_back(now);
                            }
                        }
                        self.keep(&taken);
                        None
                    }
                }
            };
            let Some((until, why)) = wait else {
                queued(None);
                return;
            };
            let at = SystemTime::UNIX_EPOCH + Duration::from_secs(until);
            queued(Some(format!(
                "queued by the CA's rate limit ({why}) until {}",
                crate::clock::rfc3339_of(at)
            )));
            tracing::info!(domains = ?names, %why, until = %crate::clock::rfc3339_of(at), "order queued by the rate limit");
            tokio::time::sleep(Duration::from_secs(until.saturating_sub(now).max(1))).await;
        }
    }

    /// Keep the slots taken for the next run (a store that cannot take them forgets them).
    fn keep(&self, taken: &Taken) {
        let written = serde_json::to_vec(taken)
            .map_err(|e| e.to_string())
            .and_then(|b| {
                self.store
                    .write(STORE_KEY, &b, false)
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = written {
            tracing::debug!(error = %e, "rate-limit slots not stored");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_count_against_their_registered_domain() {
        assert_eq!(registered_domain("careers.customer.com"), "customer.com");
        assert_eq!(registered_domain("*.shop.customer.com"), "customer.com");
        assert_eq!(registered_domain("a.b.co.uk"), "b.co.uk");
        assert_eq!(registered_domain("x.github.io"), "x.github.io");
    }

    #[test]
    fn a_full_window_frees_when_its_oldest_order_leaves_it() {
        let limit = RateLimit {
            count: 2,
            per: Duration::from_secs(100),
        };
        let mut times = VecDeque::from([10, 50]);
        assert_eq!(full_until(&mut times, &limit, 60), Some(110));
        assert_eq!(full_until(&mut times, &limit, 110), None);
        assert_eq!(times, [50]);
        times.push_back(120);
        assert_eq!(full_until(&mut times, &limit, 130), Some(150));
    }
}
