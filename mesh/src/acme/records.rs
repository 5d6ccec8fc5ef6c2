//! The dstack DNS records of each public domain (CNAME to the gateway, app-address TXT, CAA
//! pin), written once at start and retried with backoff until they are in place.

use std::{sync::Arc, time::Duration};

use super::{
    client::IssueError,
    dns01::{
        setup::RecordCheck, webhook::Required, BoxFuture, DnsError, OperatorRecords, Outcome,
        Record, Wanted,
    },
    jitter, Acme, Domain, IssuerRuntime,
};
use crate::config::dns::setup::{DnsSetup, SetupMode};

impl Acme {
    pub(super) async fn dstack_records(self: Arc<Self>, d: Arc<Domain>) {
        let Some(dns) = self.dns.clone() else { return };
        let mut failures = 0u32;
        loop {
            match self.write_records(&dns, &d).await {
                Ok(outcomes) => {
                    let changed: Vec<String> = outcomes
                        .iter()
                        .filter_map(|o| match o {
                            Outcome::Unchanged(_) => None,
                            Outcome::Skipped(why) => Some(format!("skipped {why}")),
                            Outcome::Created(r) => Some(format!("added {r}")),
                            Outcome::Replaced { now, old } => {
                                Some(format!("{now} (was {})", old.join(", ")))
                            }
                        })
                        .collect();
                    match changed.is_empty() {
                        true => {
                            tracing::info!(domain = %d.name(), records = outcomes.len(), "dstack DNS records already in place")
                        }
                        false => {
                            tracing::info!(domain = %d.name(), changes = ?changed, "dstack DNS records written")
                        }
                    }
                    d.set(|s| s.dns_records = Some("in place".into()));
                    return;
                }
                Err(e) => {
                    failures += 1;
                    let wait = super::renewal::backoff(
                        self.config.retry_min,
                        self.config.retry_max,
                        failures,
                        None,
                        std::time::SystemTime::now(),
                    );
                    tracing::error!(domain = %d.name(), error = %e, retry_in = ?wait, "dstack DNS records not written");
                    d.set(|s| s.dns_records = Some(format!("error: {e}")));
                    tokio::time::sleep(wait + jitter(wait / 10)).await;
                }
            }
        }
    }

    async fn write_records(
        &self,
        dns: &super::dns01::Dns,
        d: &Domain,
    ) -> Result<Vec<Outcome>, String> {
        let (wanted, _) = self.wanted_records(dns, d).await?;
        let mut out = Vec::new();
        let writes = async {
            for w in wanted {
                out.push(match w {
                    Wanted::Record {
                        record, exclusive, ..
                    } => dns.ensure(record, exclusive).await?,
                    Wanted::Skipped(why) => Outcome::Skipped(why),
                });
            }
            Ok::<_, DnsError>(())
        };
        tokio::time::timeout(Duration::from_secs(120), writes)
            .await
            .map_err(|_| "the DNS provider did not finish within 120 s".to_owned())?
            .map_err(|e| e.to_string())?;
        Ok(out)
    }

    /// `d`'s dstack records, and this instance's identity (app id, instance id).
    async fn wanted_records(
        &self,
        dns: &super::dns01::Dns,
        d: &Domain,
    ) -> Result<(Vec<Wanted>, (String, String)), String> {
        let info = self
            .agent
            .info()
            .await
            .map_err(|e| format!("app id from the guest agent: {e}"))?;
        // The CAA pin names the account every replica derives from the app key.
        let caa = match self.issuers.get(&d.config.issuer) {
            Some(IssuerRuntime::Acme(client)) if dns.sets_caa() => {
                let account = client.account_url().await.map_err(|e| e.to_string())?;
                match client.caa_identities().await.first() {
                    Some(identity) => Some((identity.clone(), account)),
                    None => {
                        tracing::warn!(domain = %d.name(), directory = %client.directory(), "no CAA record written: the CA's directory lists no caaIdentities (set [dns] caa_identities)");
                        None
                    }
                }
            }
            _ => None,
        };
        let port = dns.app_port().unwrap_or(443);
        let caa = caa.as_ref().map(|(i, a)| (i.as_str(), a.as_str()));
        let wanted = dns.dstack_record_set(&d.config, &info.app_id, port, caa);
        Ok((wanted, (info.app_id, info.instance_id)))
    }

    /// The records the operator makes for `d`: with a delegation zone the CNAMEs into it
    /// (the provider writes the rest there), else every dstack record.
    async fn operator_records(
        &self,
        dns: &super::dns01::Dns,
        d: &Domain,
    ) -> Result<(Vec<Wanted>, (String, String)), String> {
        let (wanted, identity) = self.wanted_records(dns, d).await?;
        match dns.delegates() {
            true => Ok((dns.delegation_cnames(&d.config), identity)),
            false => Ok((wanted, identity)),
        }
    }

    /// Before ordering for `d` when no DNS provider writes its records (`DNS_SETUP_MODE`):
    /// show them, post them to the operator's webhook, wait until every DoH resolver sees
    /// every one, then, the first time, let the gateway's cache settle. A record still missing
    /// at the deadline fails this attempt, naming it. `print` waits too (dstack-ingress orders
    /// at once): an order placed before the records are visible only fails at the CA.
    pub(super) async fn dns_setup(&self, d: &Domain) -> Result<(), IssueError> {
        let Some(dns) = self.dns.as_deref() else {
            return Ok(());
        };
        let Some(setup) = dns.setup() else {
            return Ok(());
        };
        let (wanted, identity) = self
            .operator_records(dns, d)
            .await
            .map_err(DnsError::NotVisible)?;
        let required = super::dns01::setup::required(&wanted);
        let first = d
            .state
            .lock()
            .map(|s| s.dns_setup.is_none())
            .unwrap_or(true);
        if first {
            tracing::warn!(domain = %d.name(), mode = ?setup.mode, "{}", super::dns01::setup::describe(d.name(), &required));
            d.set(|s| s.dns_setup = Some(required.iter().map(RecordCheck::pending).collect()));
        }
        let posted = d.state.lock().ok().and_then(|s| s.posted.clone());
        if posted.as_ref() != Some(&required) {
            let challenge = d.config.challenge.as_str();
            if self
                .hand_over(d, setup, &required, &identity, challenge)
                .await
            {
                d.set(|s| s.posted = Some(required.clone()));
            }
        }
        self.until_seen(dns, d, setup, &wanted, Vec::new()).await?;
        let settled = d.state.lock().map(|s| s.settled).unwrap_or(false);
        if !settled {
            tracing::info!(domain = %d.name(), settle = ?setup.settle, "DNS records visible; letting the gateway's cache settle before the first order");
            tokio::time::sleep(setup.settle).await;
            d.set(|s| s.settled = true);
        }
        Ok(())
    }

    /// DNS-01 without a provider in the CVM: each order's `_acme-challenge` TXT records are
    /// the operator's to create, shown and posted as the dstack records are; the CA is told
    /// to look once every DoH resolver sees them.
    async fn operator_challenges(&self, d: &Domain, records: &[Record]) -> Result<(), DnsError> {
        let dns = self.dns.as_deref().ok_or(DnsError::NoProvider)?;
        let setup = dns.setup().ok_or(DnsError::NoProvider)?;
        let wanted: Vec<Wanted> = records
            .iter()
            .map(|record| Wanted::Record {
                record: record.clone(),
                exclusive: false,
                alias: false,
                note: CHALLENGE_NOTE,
            })
            .collect();
        let required = super::dns01::setup::required(&wanted);
        tracing::warn!(domain = %d.name(), mode = ?setup.mode, "{}", super::dns01::setup::describe(d.name(), &required));
        // The standing records stay listed above this order's challenges.
        let standing: Vec<RecordCheck> = d
            .state
            .lock()
            .ok()
            .and_then(|s| s.dns_setup.clone())
            .unwrap_or_default()
            .into_iter()
            .filter(|c| c.record.note != CHALLENGE_NOTE)
            .collect();
        let info = self
            .agent
            .info()
            .await
            .map_err(|e| DnsError::NotVisible(format!("app id from the guest agent: {e}")))?;
        let identity = (info.app_id, info.instance_id);
        self.hand_over(d, setup, &required, &identity, "dns-01")
            .await;
        self.until_seen(dns, d, setup, &wanted, standing).await
    }

    /// `webhook` mode: post `required` to the operator's service; whether it took them. A
    /// failure is logged, not fatal: the records may still appear (an operator, a retry).
    async fn hand_over(
        &self,
        d: &Domain,
        setup: &DnsSetup,
        required: &[Required],
        (app_id, instance_id): &(String, String),
        challenge: &str,
    ) -> bool {
        let (SetupMode::Webhook, Some(webhook)) = (setup.mode, &setup.webhook) else {
            return false;
        };
        let ctx = super::dns01::webhook::Context {
            domain: d.name(),
            challenge,
            app_id,
            instance_id,
            timestamp: crate::clock::unix_now(),
        };
        let token = webhook.token.as_ref().map(|t| t.0.as_str());
        let body = super::dns01::webhook::envelope(&ctx, required, token, &self.agent).await;
        match super::dns01::webhook::post(webhook, &body).await {
            Ok(()) => {
                tracing::info!(domain = %d.name(), url = %webhook.url, records = required.len(), "DNS records posted to the webhook");
                true
            }
            Err(e) => {
                tracing::warn!(domain = %d.name(), error = %e, "DNS webhook not reached; waiting for the records anyway");
                false
            }
        }
    }

    /// Look through the DoH resolvers until every one sees every record of `wanted`, showing
    /// each look on `/certs` after `shown`; past `DNS_SETUP_TIMEOUT`, fail naming what is
    /// missing and what was seen instead.
    async fn until_seen(
        &self,
        dns: &super::dns01::Dns,
        d: &Domain,
        setup: &DnsSetup,
        wanted: &[Wanted],
        shown: Vec<RecordCheck>,
    ) -> Result<(), DnsError> {
        let deadline = tokio::time::Instant::now() + setup.timeout;
        loop {
            let checks = dns.look(wanted).await;
            let missing: Vec<String> = checks
                .iter()
                .filter(|c| !c.visible)
                .map(|c| {
                    format!(
                        "{} {} -> {} (seen: {})",
                        c.record.rtype,
                        c.record.name,
                        c.record.value,
                        c.seen.as_deref().unwrap_or("none")
                    )
                })
                .collect();
            let mut listed = shown.clone();
            listed.extend(checks);
            d.set(|s| s.dns_setup = Some(listed));
            if missing.is_empty() {
                return Ok(());
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(DnsError::NotVisible(format!(
                    "DNS records not visible to every DoH resolver within {}s: {}",
                    setup.timeout.as_secs(),
                    missing.join("; ")
                )));
            }
            tracing::info!(domain = %d.name(), missing = ?missing, "waiting for the DNS records");
            tokio::time::sleep(setup.interval.min(deadline - now)).await;
        }
    }
}

/// What a DNS-01 challenge record is for, as listed.
const CHALLENGE_NOTE: &str = "DNS-01 challenge of the current order (may be removed after it)";

/// The operator, through `DNS_SETUP_MODE`, publishes `domain`'s DNS-01 challenges.
pub(super) struct OperatorHand<'a> {
    pub(super) acme: &'a Acme,
    pub(super) domain: &'a Domain,
}

impl std::fmt::Debug for OperatorHand<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorHand")
            .field("domain", &self.domain.name())
            .finish_non_exhaustive()
    }
}

impl OperatorRecords for OperatorHand<'_> {
    fn publish<'a>(&'a self, challenges: &'a [Record]) -> BoxFuture<'a, Result<(), DnsError>> {
        Box::pin(self.acme.operator_challenges(self.domain, challenges))
    }
}
