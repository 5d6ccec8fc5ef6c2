//! RFC 2136 dynamic update signed with TSIG (RFC 8945): BIND, Knot, PowerDNS and most managed
//! DNS accept it. Records are read back from the same primary, so a change is checked where
//! it was made.

use std::{net::SocketAddr, time::Duration};

use hickory_proto::rr::{rdata::tsig::TsigAlgorithm, TSigner};

use super::{wire, BoxFuture, DnsError, Provider, Record, Rtype, SetupError, Zone};

/// Time skew the server may see between our clock and its own (RFC 8945 recommends 300 s).
const FUDGE: u16 = 300;

/// A primary server and the TSIG key it accepts.
pub struct Rfc2136 {
    server: String,
    signer: TSigner,
    key_name: String,
    zones: Vec<String>,
    timeout: Duration,
}

impl std::fmt::Debug for Rfc2136 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rfc2136")
            .field("server", &self.server)
            .field("key", &self.key_name)
            .finish_non_exhaustive()
    }
}

impl Rfc2136 {
    /// `server` is `host[:port]` (53 by default); `secret` is base64.
    pub fn new(
        server: &str,
        key_name: &str,
        algorithm: &str,
        secret: &str,
        zones: &[String],
        timeout: Duration,
    ) -> Result<Self, SetupError> {
        let algorithm = match algorithm {
            "hmac-sha256" => TsigAlgorithm::HmacSha256,
            "hmac-sha384" => TsigAlgorithm::HmacSha384,
            "hmac-sha512" => TsigAlgorithm::HmacSha512,
            other => return Err(SetupError::Algorithm(other.to_owned())),
        };
        let key = crate::base64url::decode(secret)?;
        let signer =
            TSigner::new(key, algorithm, wire::name(key_name)?, FUDGE).map_err(|source| {
                SetupError::Tsig {
                    name: key_name.to_owned(),
                    source,
                }
            })?;
        let server = match server.rsplit_once(':') {
            Some((_, port)) if port.parse::<u16>().is_ok() && !server.ends_with(']') => {
                server.to_owned()
            }
            _ => format!("{server}:53"),
        };
        Ok(Self {
            server,
            signer,
            key_name: key_name.to_owned(),
            zones: zones.to_vec(),
            timeout,
        })
    }

    fn fail(&self, message: String) -> DnsError {
        DnsError::Provider {
            provider: "rfc2136",
            message,
        }
    }

    async fn addr(&self) -> Result<SocketAddr, DnsError> {
        let lookup =
            tokio::time::timeout(self.timeout, tokio::net::lookup_host(&self.server)).await;
        match lookup {
            Ok(Ok(mut addrs)) => addrs
                .next()
                .ok_or_else(|| self.fail(format!("{} has no address", self.server))),
            Ok(Err(e)) => Err(self.fail(format!("{}: {e}", self.server))),
            Err(_) => Err(self.fail(format!(
                "{}: no address within {:?}",
                self.server, self.timeout
            ))),
        }
    }

    async fn send(&self, zone: &Zone, change: wire::Change<'_>) -> Result<(), DnsError> {
        let server = self.addr().await?;
        wire::update(server, &zone.name, &[change], &self.signer, self.timeout)
            .await
            .map_err(|e| {
                self.fail(format!(
                    "update of {} with key {}: {e}",
                    zone.name, self.key_name
                ))
            })
    }
}

impl Provider for Rfc2136 {
    fn name(&self) -> &'static str {
        "rfc2136"
    }

    fn zones(&self) -> BoxFuture<'_, Result<Vec<Zone>, DnsError>> {
        Box::pin(async move {
            Ok(self
                .zones
                .iter()
                .map(|z| Zone {
                    name: z.clone(),
                    id: z.clone(),
                })
                .collect())
        })
    }

    fn zone_for<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Zone, DnsError>> {
        Box::pin(async move {
            if let Some(zone) = super::closest_zone(name, &self.zones().await?) {
                return Ok(zone.clone());
            }
            if !self.zones.is_empty() {
                return Err(DnsError::NoZone {
                    provider: self.name(),
                    name: name.to_owned(),
                    zones: format!("configured: {}", self.zones.join(", ")),
                });
            }
            // No zones configured: the primary knows which of its zones holds the name.
            let server = self.addr().await?;
            let zone = wire::zone_of(server, name, self.timeout)
                .await
                .map_err(|e| self.fail(e.to_string()))?;
            Ok(Zone {
                name: zone.clone(),
                id: zone,
            })
        })
    }

    fn records<'a>(
        &'a self,
        _zone: &'a Zone,
        name: &'a str,
        rtype: Rtype,
    ) -> BoxFuture<'a, Result<Vec<Record>, DnsError>> {
        Box::pin(async move {
            let server = self.addr().await?;
            let answer = wire::query(server, name, rtype, self.timeout)
                .await
                .map_err(|e| self.fail(e.to_string()))?;
            Ok(answer.records)
        })
    }

    fn create<'a>(
        &'a self,
        zone: &'a Zone,
        record: &'a Record,
    ) -> BoxFuture<'a, Result<Record, DnsError>> {
        Box::pin(async move {
            self.send(zone, wire::Change::Add(record)).await?;
            Ok(record.clone())
        })
    }

    fn delete<'a>(
        &'a self,
        zone: &'a Zone,
        record: &'a Record,
    ) -> BoxFuture<'a, Result<(), DnsError>> {
        Box::pin(self.send(zone, wire::Change::Delete(record)))
    }

    fn default_resolvers(&self) -> BoxFuture<'_, Vec<SocketAddr>> {
        // The primary itself: it has the record the moment the update succeeds.
        Box::pin(async move { self.addr().await.into_iter().collect() })
    }
}
