//! Whether a customer's domain still points at this app (`[domain_health]`): its
//! `_dstack-app-address` TXT names this app, or its CNAME chain leads to the gateway's domain,
//! or its addresses are the gateway's. A domain whose DNS moved elsewhere is `dns_moved`: no
//! order is placed for it (an order would fail at validation and burn the CA's rate limits)
//! until its DNS comes back, which is noticed by itself. With `probe`, each site pointing here
//! is also visited as a browser would: its address, TLS with its name, the certificate it
//! serves (ours or not), and an HTTP status.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use super::{
    dns01::{
        wire::{self, Answer},
        Rtype,
    },
    jitter, Acme, Domain, Status,
};
use crate::config::sources::HealthConfig;

/// Deadline of one query.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of each step of a probe (connect, handshake, response head).
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

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

    /// The pause after the `moved`-th check in a row that found the DNS elsewhere: the
    /// interval, doubling up to 8 times it (at the default 10 min, a customer gone for good
    /// costs a look every 80 min, and one who comes back is seen within that).
    pub fn interval_after(&self, moved: u32) -> Duration {
        self.config.interval * (1u32 << moved.min(3))
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
            match answer.txts().next() {
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
        let mut cnames: Vec<String> = answer.cnames().map(str::to_owned).collect();
        if cnames.is_empty() {
            if let Ok(direct) = self.query(bare, Rtype::Cname).await {
                cnames.extend(direct.cnames().map(str::to_owned));
            }
        }
        let addresses: Vec<&str> = answer.addresses().collect();
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
            let gateway_answer = match self.query(gateway, Rtype::A).await {
                Ok(a) => a,
                Err(e) => return Pointing::Unknown(format!("the gateway {gateway}: {e}")),
            };
            if gateway_answer.addresses().any(|g| addresses.contains(&g)) {
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

impl Health {
    /// Visit `name` through the public path: the address it resolves to, on the probe's port,
    /// TLS with `name` as SNI, then `GET <path>`. `ours` is the leaf this sidecar serves for it.
    /// What was found, or why the site fails a visitor. None without `probe`.
    pub async fn probe(&self, name: &str, ours: &[u8]) -> Option<Result<String, String>> {
        let probe = self.config.probe.as_ref()?;
        Some(self.visit(name, ours, probe).await)
    }

    async fn visit(
        &self,
        name: &str,
        ours: &[u8],
        probe: &crate::config::sources::ProbeConfig,
    ) -> Result<String, String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let step = |what: &'static str| move |_| format!("{what} timed out");
        let answer = self.query(name, Rtype::A).await?;
        let ip = answer
            .addresses()
            .find_map(|a| a.parse::<std::net::IpAddr>().ok())
            .ok_or_else(|| format!("{name} has no address ({})", answer.rcode))?;
        let addr = SocketAddr::new(ip, probe.port);
        let started = tokio::time::Instant::now();
        let tcp = tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(step("connect"))?
            .map_err(|e| format!("connect to {addr}: {e}"))?;
        let server_name = rustls::pki_types::ServerName::try_from(name.to_owned())
            .map_err(|e| format!("{name}: {e}"))?;
        let pinned = Arc::new(PinnedLeaf {
            leaf: ours.to_vec(),
            other: std::sync::Mutex::new(None),
        });
        let handshake = probe_connector(pinned.clone()).connect(server_name, tcp);
        let mut tls = match tokio::time::timeout(PROBE_TIMEOUT, handshake)
            .await
            .map_err(step("TLS handshake"))?
        {
            Ok(tls) => tls,
            Err(e) => {
                let other = pinned.other.lock().ok().and_then(|mut o| o.take());
                return Err(match other {
                    Some(what) => {
                        format!("{addr} serves another certificate ({what}), not this sidecar's")
                    }
                    None => format!("TLS handshake with {addr}: {e}"),
                });
            }
        };
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {name}\r\nUser-Agent: dstack-mesh-probe\r\nConnection: close\r\n\r\n",
            probe.path
        );
        let head = async {
            tls.write_all(request.as_bytes()).await?;
            let mut head = Vec::with_capacity(64);
            let mut buf = [0u8; 256];
            while !head.contains(&b'\n') && head.len() < 1024 {
                let n = tls.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&buf[..n]);
            }
            Ok::<_, std::io::Error>(head)
        };
        let head = tokio::time::timeout(PROBE_TIMEOUT, head)
            .await
            .map_err(step("response"))?
            .map_err(|e| format!("our certificate, then the request failed: {e}"))?;
        let status = std::str::from_utf8(&head)
            .ok()
            .and_then(|h| {
                h.strip_prefix("HTTP/1.1 ")
                    .or_else(|| h.strip_prefix("HTTP/1.0 "))
            })
            .and_then(|h| h.get(..3))
            .and_then(|code| code.parse::<u16>().ok())
            .ok_or_else(|| "our certificate, then no HTTP response".to_owned())?;
        let ms = started.elapsed().as_millis();
        match status {
            500.. => Err(format!(
                "our certificate, then HTTP {status} for {}",
                probe.path
            )),
            _ => Ok(format!(
                "our certificate, HTTP {status} for {}, {ms} ms",
                probe.path
            )),
        }
    }
}

/// A TLS client for one probe: it completes a handshake only with a server presenting
/// `pinned`'s leaf (the handshake signature checked too), so the request goes to nothing but
/// this sidecar.
fn probe_connector(pinned: Arc<PinnedLeaf>) -> tokio_rustls::TlsConnector {
    let mut config = rustls::ClientConfig::builder_with_provider(ratls::crypto::provider())
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|_| unreachable!("the provider supports TLS 1.2 and 1.3"))
        .dangerous()
        .with_custom_certificate_verifier(pinned)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Accepts exactly one leaf certificate, the one this sidecar serves for the probed name: a
/// pin, stricter than a chain to a root. What another server presented instead is kept for the
/// probe's report.
#[derive(Debug)]
struct PinnedLeaf {
    leaf: Vec<u8>,
    other: std::sync::Mutex<Option<String>>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedLeaf {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.leaf.as_slice() {
            return Ok(rustls::client::danger::ServerCertVerified::assertion());
        }
        let what = x509_parser::parse_x509_certificate(end_entity)
            .map(|(_, c)| format!("issued by {}", c.issuer()))
            .unwrap_or_else(|_| "unreadable".to_owned());
        if let Ok(mut other) = self.other.lock() {
            *other = Some(what);
        }
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::ApplicationVerificationFailure,
        ))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &ratls::crypto::provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &ratls::crypto::provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        ratls::crypto::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl Acme {
    /// Check `d` every interval (with jitter, so thousands do not ask at once) and mark it
    /// `dns_moved` while its DNS leads elsewhere; back, its lifecycle is woken.
    pub(super) async fn watch_health(self: Arc<Self>, d: Arc<Domain>) {
        let Some(health) = &self.health else {
            return;
        };
        let mut moved = 0;
        loop {
            let pointing = health.check(d.name()).await;
            self.note_health(&d, &pointing);
            moved = match pointing {
                Pointing::Moved(_) => moved + 1,
                Pointing::Here(_) | Pointing::Unknown(_) => 0,
            };
            // A site whose DNS points here and that serves a certificate: visit it.
            let leaf = d
                .served
                .load()
                .as_ref()
                .and_then(|l| l.key.cert.first().cloned());
            if let (Pointing::Here(_), Some(leaf)) = (&pointing, leaf) {
                if let Some(visit) = health.probe(d.name(), leaf.as_ref()).await {
                    self.note_probe(&d, visit);
                }
            }
            let every = health.interval_after(moved);
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

    fn note_probe(&self, d: &Domain, visit: Result<String, String>) {
        let failed_before = d
            .state
            .lock()
            .map(|s| {
                s.site_probe
                    .as_deref()
                    .is_some_and(|p| p.starts_with("failed"))
            })
            .unwrap_or(false);
        let said = match visit {
            Ok(found) => {
                if failed_before {
                    tracing::info!(domain = %d.name(), %found, "site reachable again through its public path");
                }
                format!("ok: {found}")
            }
            Err(why) => {
                if !failed_before {
                    tracing::warn!(domain = %d.name(), %why, "site not reachable as a visitor sees it");
                }
                format!("failed: {why}")
            }
        };
        d.set(|s| s.site_probe = Some(said));
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

#[cfg(test)]
mod tests {
    use rustls::client::danger::ServerCertVerifier;

    use super::*;

    fn leaf(name: &str) -> rustls::pki_types::CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn a_domain_whose_dns_stays_away_is_looked_at_less_and_less_often() {
        let health = Health::new(
            HealthConfig {
                gateway: Some("_.gw.example".into()),
                interval: Duration::from_secs(600),
                resolvers: vec!["127.0.0.1:53".parse().unwrap()],
                txt_prefix: "_dstack-app-address".into(),
                probe: None,
            },
            "app",
        );
        let minutes: Vec<u64> = (0..7)
            .map(|n| health.interval_after(n).as_secs() / 60)
            .collect();
        assert_eq!(minutes, [10, 20, 40, 80, 80, 80, 80]);
    }

    #[test]
    fn the_probe_accepts_only_the_leaf_this_sidecar_serves() {
        let (ours, other) = (leaf("a.example.com"), leaf("a.example.com"));
        let pinned = PinnedLeaf {
            leaf: ours.to_vec(),
            other: std::sync::Mutex::new(None),
        };
        let name = rustls::pki_types::ServerName::try_from("a.example.com").unwrap();
        let now = rustls::pki_types::UnixTime::now();
        assert!(pinned
            .verify_server_cert(&ours, &[], &name, &[], now)
            .is_ok());
        assert!(pinned.other.lock().unwrap().is_none());
        // The same name, another key and certificate: refused, and what it was is kept.
        assert!(pinned
            .verify_server_cert(&other, &[], &name, &[], now)
            .is_err());
        let what = pinned.other.lock().unwrap().clone().unwrap();
        assert!(what.starts_with("issued by"), "{what}");
    }
}
