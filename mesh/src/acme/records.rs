//! The dstack DNS records of each public domain (CNAME to the gateway, app-address TXT, CAA
//! pin), written once at start and retried with backoff until they are in place.

use std::{sync::Arc, time::Duration};

use super::{dns01::Outcome, jitter, Acme, Domain, IssuerRuntime};

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
        let app_id = self
            .agent
            .info()
            .await
            .map_err(|e| format!("app id from the guest agent: {e}"))?
            .app_id;
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
        tokio::time::timeout(
            Duration::from_secs(120),
            dns.ensure_records(&d.config, &app_id, port, caa),
        )
        .await
        .map_err(|_| "the DNS provider did not finish within 120 s".to_owned())?
        .map_err(|e| e.to_string())
    }
}
