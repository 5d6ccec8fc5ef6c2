//! Whether a customer's domain still points at this app (`[domain_health]`): its
//! `_dstack-app-address` TXT names this app, or its CNAME chain leads to the gateway's domain,
//! or its addresses are the gateway's. A domain whose DNS moved elsewhere is `dns_moved`: no
//! order is placed for it (an order would fail at validation and burn the CA's rate limits)
//! until its DNS comes back, which is noticed by itself.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use super::{
    dns01::{
        wire::{self, Answer},
        Data, Rtype,
    },
    jitter, Acme, Domain, Status,
};
use crate::config::sources::HealthConfig;

/// Deadline of one query.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a name's DNS leads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pointing {
    /// Here: the app-address TXT, the gateway, or its addresses.
    Here(String),
    /// Elsewhere, and where.
    Moved(String),
    /// Not known now (the resolvers failed): nothing changes.
    Unknown(String),
}

/// The check.
#[derive(Debug)]
pub struct Health {
    config: HealthConfig,
    app_id: String,
    resolvers: Vec<SocketAddr>,
}

/// The system's resolvers (`/etc/resolv.conf`), for when none are configured.
fn system_resolvers() -> Vec<SocketAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|ip| ip.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

impl Health {
    /// Checks for `app_id`'s domains as `config` says.
    pub fn new(config: HealthConfig, app_id: &str) -> Self {
        let resolvers = match config.resolvers.is_empty() {
            true => system_resolvers(),
            false => config.resolvers.clone(),
        };
        Self {
            config,
            app_id: app_id.to_owned(),
            resolvers,
        }
    }

    /// How often each domain is checked.
    pub fn interval(&self) -> Duration {
        self.config.interval
    }

    /// `rtype` at `name` from the first resolver that answers.
    async fn query(&self, name: &str, rtype: Rtype) -> Result<Answer, String> {
        let mut last = "no resolver configured".to_owned();
        for server in &self.resolvers {
            match wire::query(*server, name, rtype, QUERY_TIMEOUT).await {
                Ok(answer) => return Ok(answer),
                Err(e) => last = e.to_string(),
            }
        }
        Err(last)
    }

    /// Where `name`'s DNS leads now.
    pub async fn check(&self, name: &str) -> Pointing {
        let bare = name.strip_prefix("*.").unwrap_or(name);
        let txt_owner = format!("{}.{bare}", self.config.txt_prefix);
        let ours = format!("{}:", self.app_id);
        if let Ok(answer) = self.query(&txt_owner, Rtype::Txt).await {
            let txt = answer.records.iter().find_map(|r| match &r.data {
                Data::Txt(v) => Some(v.clone()),
                _ => None,
            });
            match txt {
                Some(v) if v.starts_with(&ours) => {
                    return Pointing::Here(format!("{txt_owner} TXT names this app"))
                }
                // Another app claims the name: it moved to that app.
                Some(v) => {
                    return Pointing::Moved(format!("{txt_owner} TXT is {v:?}, another app"))
                }
                None => {}
            }
        }
        let answer = match self.query(bare, Rtype::A).await {
            Ok(a) => a,
            Err(e) => return Pointing::Unknown(e),
        };
        let mut cnames: Vec<String> = answer
            .records
            .iter()
            .filter_map(|r| match &r.data {
                Data::Cname(t) => Some(t.clone()),
                _ => None,
            })
            .collect();
        if cnames.is_empty() {
            if let Ok(direct) = self.query(bare, Rtype::Cname).await {
                cnames.extend(direct.records.iter().filter_map(|r| match &r.data {
                    Data::Cname(t) => Some(t.clone()),
                    _ => None,
                }));
            }
        }
        let addresses = addresses_of(&answer);
        let Some(gateway) = &self.config.gateway else {
            return Pointing::Moved(format!(
                "no {txt_owner} TXT names this app (and no gateway domain to compare with)"
            ));
        };
        let base = gateway
            .strip_prefix("_.")
            .or_else(|| gateway.strip_prefix("*."))
            .unwrap_or(gateway);
        let under = |t: &str| t == gateway || t == base || t.ends_with(&format!(".{base}"));
        if let Some(t) = cnames.iter().find(|t| under(t)) {
            return Pointing::Here(format!("CNAME to {t}"));
        }
        // A CNAME that leads elsewhere decides: the addresses are its target's.
        if cnames.is_empty() && !addresses.is_empty() {
            let gateway_addresses = match self.query(gateway, Rtype::A).await {
                Ok(a) => addresses_of(&a),
                Err(e) => return Pointing::Unknown(format!("the gateway {gateway}: {e}")),
            };
            if addresses.iter().any(|a| gateway_addresses.contains(a)) {
                return Pointing::Here(format!("A {} is the gateway's", addresses.join(", ")));
            }
        }
        let leads = match (cnames.first(), addresses.is_empty()) {
            (Some(t), _) => format!("CNAME to {t}"),
            (None, false) => format!("A {}", addresses.join(", ")),
            (None, true) => format!("no address ({})", answer.rcode),
        };
        Pointing::Moved(format!("{leads}: not the gateway {gateway}"))
    }
}

/// The A records' addresses in `answer`.
fn addresses_of(answer: &Answer) -> Vec<String> {
    answer
        .records
        .iter()
        .filter_map(|r| match &r.data {
            Data::Other(Rtype::A, ip) => Some(ip.clone()),
            _ => None,
        })
        .collect()
}

impl Acme {
    /// Check `d` every interval (with jitter, so thousands do not ask at once) and mark it
    /// `dns_moved` while its DNS leads elsewhere; back, its lifecycle is woken.
    pub(super) async fn watch_health(self: Arc<Self>, d: Arc<Domain>) {
        let Some(health) = &self.health else {
            return;
        };
        loop {
            let pointing = health.check(d.name()).await;
            self.note_health(&d, &pointing);
            let every = health.interval();
            tokio::time::sleep(every + jitter(every / 10)).await;
        }
    }

    /// Whether `d` may be ordered for: not while its DNS leads elsewhere (checked now).
    pub(super) async fn points_here(&self, d: &Domain) -> Result<(), String> {
        let Some(health) = self.health.as_ref().filter(|_| d.source.is_some()) else {
            return Ok(());
        };
        match health.check(d.name()).await {
            Pointing::Moved(why) => {
                self.note_health(d, &Pointing::Moved(why.clone()));
                Err(why)
            }
            other => {
                self.note_health(d, &other);
                Ok(())
            }
        }
    }

    fn note_health(&self, d: &Domain, pointing: &Pointing) {
        let was_moved = d
            .state
            .lock()
            .map(|s| s.dns_moved.is_some())
            .unwrap_or(false);
        match pointing {
            Pointing::Moved(why) => {
                if !was_moved {
                    tracing::warn!(domain = %d.name(), %why, "domain's DNS moved away: no orders until it points here again");
                }
                d.set(|s| {
                    s.dns_moved = Some(why.clone());
                    s.dns_health = Some(format!("moved: {why}"));
                    s.dns_moved_since.get_or_insert(SystemTime::now());
                    s.status = Some(Status::DnsMoved);
                });
            }
            Pointing::Here(how) => {
                let served = d.served.load().is_some();
                d.set(|s| {
                    s.dns_health = Some(format!("points here: {how}"));
                    s.dns_moved = None;
                    s.dns_moved_since = None;
                    if s.status == Some(Status::DnsMoved) {
                        s.status = Some(if served {
                            Status::Valid
                        } else {
                            Status::Pending
                        });
                    }
                });
                if was_moved {
                    tracing::info!(domain = %d.name(), %how, "domain's DNS points here again");
                    // An order held back goes now (a lifecycle not holding one looks again and
                    // finds nothing due: no order).
                    d.dns_back.notify_one();
                }
            }
            Pointing::Unknown(why) => {
                tracing::debug!(domain = %d.name(), %why, "domain's DNS not checked");
            }
        }
    }
}
