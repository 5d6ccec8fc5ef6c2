//! The dstack DNS records of each public domain (CNAME to the gateway, app-address TXT, CAA
//! pin), written once at start and retried with backoff until they are in place.

use std::{sync::Arc, time::Duration};

use super::{
    client::IssueError,
    dns01::{setup::RecordCheck, webhook::Required, DnsError, Outcome, Wanted},
    jitter, Acme, Domain, IssuerRuntime,
};
use crate::config::dns::setup::SetupMode;

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
    /// show them, post them to the operator's webhook, and (`wait`, `webhook`) wait until
    /// every DoH resolver sees every one, then, the first time, let the gateway's cache
    /// settle. A record still missing at the deadline fails this attempt, naming it.
    pub(super) async fn dns_setup(&self, d: &Domain) -> Result<(), IssueError> {
        let Some(dns) = self.dns.as_deref() else {
            return Ok(());
        };
        let Some(setup) = dns.setup() else {
            return Ok(());
        };
        let (wanted, (app_id, instance_id)) = self
            .operator_records(dns, d)
            .await
            .map_err(DnsError::NotVisible)?;
        let required = super::dns01::setup::required(&wanted);
        let pending = |r: &Required| RecordCheck {
            record: r.clone(),
            visible: false,
            seen: None,
        };
        let first = d
            .state
            .lock()
            .map(|s| s.dns_setup.is_none())
            .unwrap_or(true);
        if first {
            tracing::warn!(domain = %d.name(), mode = ?setup.mode, "{}", super::dns01::setup::describe(d.name(), &required));
            d.set(|s| s.dns_setup = Some(required.iter().map(pending).collect()));
        }
        if setup.mode == SetupMode::Print {
            return Ok(());
        }
        if let (SetupMode::Webhook, Some(webhook)) = (setup.mode, &setup.webhook) {
            let posted = d.state.lock().ok().and_then(|s| s.posted.clone());
            if posted.as_ref() != Some(&required) {
                let ctx = super::dns01::webhook::Context {
                    domain: d.name(),
                    challenge: d.config.challenge.as_str(),
                    app_id: &app_id,
                    instance_id: &instance_id,
                    timestamp: crate::clock::unix_now(),
                };
                let token = webhook.token.as_ref().map(|t| t.0.as_str());
                let body =
                    super::dns01::webhook::envelope(&ctx, &required, token, &self.agent).await;
                match super::dns01::webhook::post(webhook, &body).await {
                    Ok(()) => {
                        tracing::info!(domain = %d.name(), url = %webhook.url, records = required.len(), "DNS records posted to the webhook");
                        d.set(|s| s.posted = Some(required.clone()));
                    }
                    // Its records may still appear (an operator, a later retry): wait anyway.
                    Err(e) => {
                        tracing::warn!(domain = %d.name(), error = %e, "DNS webhook not reached; waiting for the records anyway")
                    }
                }
            }
        }
        let deadline = tokio::time::Instant::now() + setup.timeout;
        loop {
            let checks = dns.look(&wanted).await;
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
            d.set(|s| s.dns_setup = Some(checks));
            if missing.is_empty() {
                break;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(DnsError::NotVisible(format!(
                    "DNS records not visible to every DoH resolver within {}s: {}",
                    setup.timeout.as_secs(),
                    missing.join("; ")
                ))
                .into());
            }
            tracing::info!(domain = %d.name(), missing = ?missing, "waiting for the DNS records");
            tokio::time::sleep(setup.interval.min(deadline - now)).await;
        }
        let settled = d.state.lock().map(|s| s.settled).unwrap_or(false);
        if !settled {
            tracing::info!(domain = %d.name(), settle = ?setup.settle, "DNS records visible; letting the gateway's cache settle before the first order");
            tokio::time::sleep(setup.settle).await;
            d.set(|s| s.settled = true);
        }
        Ok(())
    }
}
