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
        Data, Rtype,
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
        let ip = addresses_of(&answer)
            .iter()
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
        let mut tls =
            tokio::time::timeout(PROBE_TIMEOUT, probe_connector().connect(server_name, tcp))
                .await
                .map_err(step("TLS handshake"))?
                .map_err(|e| format!("TLS handshake with {addr}: {e}"))?;
        let served = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
        if served.map(|c| c.as_ref()) != Some(ours) {
            let what = served
                .and_then(|c| x509_parser::parse_x509_certificate(c).ok())
                .map(|(_, c)| format!("issued by {}", c.issuer()))
                .unwrap_or_else(|| "unreadable".to_owned());
            return Err(format!(
                "{addr} serves another certificate ({what}), not this sidecar's"
            ));
        }
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

/// A TLS client that takes any chain (the probe compares it with ours itself) but still
/// checks the handshake's signature, so the server holds the key of what it presented.
fn probe_connector() -> tokio_rustls::TlsConnector {
    static CONNECTOR: std::sync::OnceLock<tokio_rustls::TlsConnector> = std::sync::OnceLock::new();
    CONNECTOR
        .get_or_init(|| {
            let provider = ratls::crypto::provider();
            let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .unwrap_or_else(|_| unreachable!("the provider supports TLS 1.2 and 1.3"))
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyChain(provider)))
                .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            tokio_rustls::TlsConnector::from(Arc::new(config))
        })
        .clone()
}

/// Takes the chain as it comes; checks the handshake signature.
#[derive(Debug)]
struct AnyChain(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyChain {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
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
            &self.0.signature_verification_algorithms,
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
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
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
