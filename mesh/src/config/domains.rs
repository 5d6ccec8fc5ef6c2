//! Public domains (`[[domains]]`, `[acme]`) and dstack-ingress's environment variables.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use serde::Deserialize;

use super::{raw::DurationValue, secs, source::Source, Check, HostPort};

/// Environment variables with dstack-ingress's names.
pub mod env {
    /// The single domain.
    pub const DOMAIN: &[&str] = &["DOMAIN"];
    /// Several domains, one per line.
    pub const DOMAINS: &[&str] = &["DOMAINS"];
    /// `domain=host:port`, one per line.
    pub const ROUTING_MAP: &[&str] = &["ROUTING_MAP"];
    /// The backend of `DOMAIN` (and of `DOMAINS` entries missing from `ROUTING_MAP`).
    pub const TARGET_ENDPOINT: &[&str] = &["TARGET_ENDPOINT"];
    /// An extra name on the single domain's certificate.
    pub const ALIAS_DOMAIN: &[&str] = &["ALIAS_DOMAIN"];
    /// Account contact.
    pub const EMAIL: &[&str] = &["ACME_EMAIL", "CERTBOT_EMAIL"];
    /// Let's Encrypt's staging CA.
    pub const STAGING: &[&str] = &["ACME_STAGING", "CERTBOT_STAGING"];
    /// `tls-alpn-01`, `http-01` or `dns-01`.
    pub const CHALLENGE: &[&str] = &["CHALLENGE_TYPE"];
    /// Renew this many days before expiry.
    pub const RENEW_DAYS: &[&str] = &["RENEW_DAYS_BEFORE"];
    /// Serve the evidence files at `/evidences/`.
    pub const EVIDENCE_SERVER: &[&str] = &["EVIDENCE_SERVER"];
    /// Send tcp-mode backends a PROXY v2 header with the client's address.
    pub const SEND_PROXY_PROTOCOL: &[&str] = &["SEND_PROXY_PROTOCOL"];
    /// The ALPN protocols offered on the environment's domains (`h2,http/1.1`).
    pub const ALPN: &[&str] = &["ALPN"];
    /// The ACME profile to order with (`acme.profile`).
    pub const PROFILE: &[&str] = &["ACME_PROFILE"];
    /// Where the evidence files are kept: `acme.evidence_dir`.
    pub const EVIDENCE_DIR: &[&str] = &["EVIDENCE_DIR"];
    /// dstack-ingress's name for `DELEGATION_ZONE` before 2.3, which it now ignores silently.
    pub const OLD_CHALLENGE_ALIAS: &str = "ACME_CHALLENGE_ALIAS";
    /// dstack-ingress settings of its own internals (certbot, lego, its HAProxy's loopback
    /// hops, its evidence HTTP server): accepted, and logged as not needed.
    pub const INTERNALS: [(&str, &str); 9] = [
        ("LEGO_PATH", "lego's state directory"),
        ("LEGO_BIN", "the lego binary"),
        ("TLSALPN_PORT", "lego's loopback TLS-ALPN-01 port"),
        ("TLSALPN_ADDRESS", "lego's loopback TLS-ALPN-01 address"),
        ("TLS_TERMINATE_PORT", "HAProxy's loopback TLS hop"),
        ("CERTBOT_TIMEOUT", "certbot's deadline"),
        (
            "RENEW_INTERVAL",
            "renewal runs on a timer with jitter and backoff",
        ),
        (
            "EVIDENCE_PORT",
            "evidence is served on the domains themselves, at /evidences/",
        ),
        (
            "CLIENT_MAX_BODY_SIZE",
            "bodies stream; there is no limit to raise",
        ),
    ];
}

/// Notes on the dstack-ingress variables set that dstack-mesh does not need.
pub(super) fn ingress_notes(env: &dyn Source) -> Vec<String> {
    env::INTERNALS
        .iter()
        .filter_map(|(var, why)| {
            env.get(var)
                .map(|_| format!("dstack-ingress setting not needed: {var} ({why})"))
        })
        .collect()
}

/// Default directory of the certificate store.
pub const DEFAULT_STORE: &str = "/var/lib/dstack-mesh/acme";
/// Default first retry after a failed issuance.
pub const DEFAULT_RETRY_MIN: Duration = Duration::from_secs(10);
/// Default longest wait between retries.
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(6 * 3600);
/// Default lifetime of `internal-ca` certificates.
pub const DEFAULT_INTERNAL_LIFETIME: Duration = Duration::from_secs(90 * 86400);
/// Default deadline of one request to the CA.
pub const DEFAULT_CA_TIMEOUT: Duration = Duration::from_secs(30);
/// Let's Encrypt's production directory.
pub const LETSENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// Let's Encrypt's staging directory.
pub const LETSENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";

/// How a public domain's traffic reaches its backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Proxy HTTP (h2 or HTTP/1.1 from clients) with `x-forwarded-*`.
    #[default]
    Http,
    /// Splice the decrypted stream, any protocol.
    Tcp,
}

/// How the CA validates control of a name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub enum Challenge {
    /// RFC 8737, answered on the shared TLS listener.
    #[default]
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
    /// A token under `/.well-known/acme-challenge/` on `:80`.
    #[serde(rename = "http-01")]
    Http01,
    /// A TXT record through a DNS provider.
    #[serde(rename = "dns-01")]
    Dns01,
}

impl std::str::FromStr for Challenge {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "tls-alpn-01" | "tls-alpn" => Ok(Self::TlsAlpn01),
            "http-01" | "http" => Ok(Self::Http01),
            "dns-01" | "dns" => Ok(Self::Dns01),
            other => Err(format!(
                "{other:?} is not a challenge type (tls-alpn-01, http-01, dns-01)"
            )),
        }
    }
}

/// Who signs a domain's certificate.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Issuer {
    /// An ACME directory (Let's Encrypt, ZeroSSL, a private CA, pebble).
    Acme(String),
    /// A local CA: no network, not publicly trusted (the demo's default).
    InternalCa,
}

impl Issuer {
    /// The short name shown by `certs list`.
    pub fn label(&self) -> String {
        match self {
            Self::Acme(url) if url == LETSENCRYPT => "letsencrypt".into(),
            Self::Acme(url) if url == LETSENCRYPT_STAGING => "letsencrypt-staging".into(),
            Self::Acme(url) => url.clone(),
            Self::InternalCa => "internal-ca".into(),
        }
    }
}

impl std::str::FromStr for Issuer {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "letsencrypt" => Ok(Self::Acme(LETSENCRYPT.into())),
            "letsencrypt-staging" => Ok(Self::Acme(LETSENCRYPT_STAGING.into())),
            "internal-ca" => Ok(Self::InternalCa),
            url if url.starts_with("https://") || url.starts_with("http://") => {
                url.parse::<http::Uri>()
                    .map_err(|e| format!("{url:?}: {e}"))?;
                Ok(Self::Acme(url.to_owned()))
            }
            other => Err(format!(
                "{other:?} is not an issuer (letsencrypt, letsencrypt-staging, internal-ca or an ACME directory URL)"
            )),
        }
    }
}

/// One public domain: the names on its certificate and where its traffic goes.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DomainConfig {
    /// The primary name first, then aliases (SANs); `*.example.com` for a wildcard.
    pub names: Vec<String>,
    /// Where traffic goes.
    pub backend: HostPort,
    /// HTTP proxy or TCP splice.
    pub mode: Mode,
    /// Who signs the certificate.
    pub issuer: Issuer,
    /// How the CA validates.
    pub challenge: Challenge,
    /// `tcp` mode: each connection to the backend starts with a PROXY v2 header naming the
    /// client (`http` mode tells it in `x-forwarded-for` instead).
    pub send_proxy_protocol: bool,
    /// The ALPN protocols offered, in preference order; empty: `h2`, `http/1.1` in http mode,
    /// none in tcp mode.
    pub alpn: Vec<String>,
    /// Names under a wildcard that go to their own backend (dstack-ingress's `ROUTING_MAP`
    /// beside `DOMAINS=*.example.com`), by the name the client asked for.
    pub routes: BTreeMap<String, HostPort>,
    /// `http` mode: headers added to responses that lack them (`[domains.response_headers]`,
    /// e.g. `X-Content-Type-Options = "nosniff"`, and `hsts = "max-age=31536000"` as
    /// `Strict-Transport-Security`, off by default since browsers remember it); the app's own
    /// value wins.
    #[serde(serialize_with = "header_pairs")]
    pub response_headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

impl DomainConfig {
    /// The primary name: the domain's key everywhere (store, CLI, status).
    pub fn primary(&self) -> &str {
        self.names.first().map_or("", String::as_str)
    }

    /// Where a connection for the name `sni` goes.
    pub fn backend_for(&self, sni: Option<&str>) -> &HostPort {
        sni.and_then(|n| self.routes.get(&n.to_ascii_lowercase()))
            .unwrap_or(&self.backend)
    }

    /// The ALPN protocols its TLS configuration offers.
    pub fn alpn_offer(&self) -> Vec<Vec<u8>> {
        match (self.alpn.is_empty(), self.mode) {
            (true, Mode::Http) => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            (true, Mode::Tcp) => Vec::new(),
            (false, _) => self.alpn.iter().map(|p| p.as_bytes().to_vec()).collect(),
        }
    }
}

/// An ALPN list (`ALPN`, `[[domains]] alpn`): protocol ids as dstack-ingress accepts them; in
/// http mode only the ones the proxy speaks.
fn alpn_list(key: &str, items: &[String], mode: Mode, c: &mut Check) -> Vec<String> {
    let mut out = Vec::new();
    for p in items.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
        let valid = p.len() <= 255
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'/' | b'-'));
        if !valid {
            c.fail(
                key,
                format!("{p:?} is not an ALPN protocol id (letters, digits, . / -)"),
            );
        } else if mode == Mode::Http && !matches!(p, "h2" | "http/1.1") {
            c.fail(key, format!("{p:?}: an http-mode domain speaks h2 and http/1.1 only (use mode = \"tcp\" to pass another protocol through)"));
        } else if !out.iter().any(|o: &String| o == p) {
            out.push(p.to_owned());
        }
    }
    out
}

/// External Account Binding for CAs that require it (ZeroSSL, most commercial CAs).
#[derive(Clone, PartialEq, Eq, serde::Serialize)]
pub struct Eab {
    /// Key identifier.
    pub kid: String,
    /// The HMAC key (base64url as CAs hand it out). Never printed.
    #[serde(serialize_with = "redacted")]
    pub hmac_key: String,
}

impl std::fmt::Debug for Eab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Eab")
            .field("kid", &self.kid)
            .field("hmac_key", &"<redacted>")
            .finish()
    }
}

fn opt_secs<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_str(&format!("{}s", d.as_secs())),
        None => s.serialize_none(),
    }
}

fn redacted<S: serde::Serializer>(_: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str("<redacted>")
}

/// How certificates are obtained, kept and renewed (`[acme]`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AcmeConfig {
    /// Directory of the certificate store.
    pub store: PathBuf,
    /// Account contact (`mailto:` is added).
    pub email: Option<String>,
    /// Renew this long before expiry; unset: when a third of the lifetime remains.
    #[serde(serialize_with = "opt_secs")]
    pub renew_before: Option<Duration>,
    /// The `:80` listener (HTTP-01 and redirects to https), when set.
    pub http_listen: Option<SocketAddr>,
    /// External Account Binding.
    pub eab: Option<Eab>,
    /// Extra roots (PEM) trusted for the CA's own HTTPS (private CAs, pebble).
    pub ca_roots: Vec<PathBuf>,
    /// First retry after a failure; doubles up to `retry_max`.
    #[serde(with = "secs")]
    pub retry_min: Duration,
    /// Longest wait between retries (shortened while a certificate is near expiry).
    #[serde(with = "secs")]
    pub retry_max: Duration,
    /// Deadline of each request to the CA.
    #[serde(with = "secs")]
    pub ca_timeout: Duration,
    /// Lifetime of `internal-ca` certificates.
    #[serde(with = "secs")]
    pub internal_ca_lifetime: Duration,
    /// Where the evidence files go (default: `<store>/evidences`).
    pub evidence_dir: PathBuf,
    /// Serve them at `https://<domain>/evidences/` (`EVIDENCE_SERVER`).
    pub evidence_server: bool,
    /// Where each certificate's private key comes from.
    pub key_source: KeySource,
    /// The ACME profile orders ask for (`classic`, `tlsserver`, `shortlived`), when set.
    pub profile: Option<String>,
    /// New orders per account in a window (`order_limit`, default Let's Encrypt's 300 per 3
    /// hours); more wait.
    pub order_limit: Option<RateLimit>,
    /// Certificates per registered domain in a window (`domain_limit`, default Let's
    /// Encrypt's 50 per 7 days); more wait.
    pub domain_limit: Option<RateLimit>,
}

/// `count` per `per` (`"300/3h"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RateLimit {
    /// Orders in a window.
    pub count: u32,
    /// The window.
    #[serde(with = "secs")]
    pub per: Duration,
}

/// Let's Encrypt's new orders per account: 300 per 3 hours.
pub const LETSENCRYPT_ORDERS: RateLimit = RateLimit {
    count: 300,
    per: Duration::from_secs(3 * 3600),
};
/// Let's Encrypt's certificates per registered domain: 50 per 7 days.
pub const LETSENCRYPT_PER_DOMAIN: RateLimit = RateLimit {
    count: 50,
    per: Duration::from_secs(7 * 86400),
};

impl std::str::FromStr for RateLimit {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?}: COUNT/DURATION (\"300/3h\") or \"off\"");
        let (count, per) = s.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        let per = super::parse_duration(per.trim()).map_err(|_| bad())?;
        if count == 0 || per.is_zero() {
            return Err(bad());
        }
        Ok(Self { count, per })
    }
}

/// `[acme] order_limit` / `domain_limit` (and `[on_demand] ask_rate`): `default` when unset,
/// none when `off`.
pub(super) fn rate_limit(
    key: &str,
    raw: Option<&str>,
    default: RateLimit,
    c: &mut Check,
) -> Option<RateLimit> {
    match raw.map(str::trim) {
        None => Some(default),
        Some("off") => None,
        Some(text) => text.parse().map_err(|e| c.fail(key, e)).ok(),
    }
}

/// Where a domain's certificate key comes from (`[acme] key_source`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeySource {
    /// A new key for every certificate.
    #[default]
    Random,
    /// Derived from the app's key (the guest agent's `GetKey`), one per domain: every
    /// instance presents the same public key, with or without a shared store, and renewals
    /// keep it.
    Derived,
}

impl std::str::FromStr for KeySource {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "random" => Ok(Self::Random),
            "derived" => Ok(Self::Derived),
            other => Err(format!("{other:?} is not \"random\" or \"derived\"")),
        }
    }
}

impl Default for AcmeConfig {
    fn default() -> Self {
        Self {
            store: DEFAULT_STORE.into(),
            email: None,
            renew_before: None,
            http_listen: None,
            eab: None,
            ca_roots: Vec::new(),
            retry_min: DEFAULT_RETRY_MIN,
            retry_max: DEFAULT_RETRY_MAX,
            ca_timeout: DEFAULT_CA_TIMEOUT,
            internal_ca_lifetime: DEFAULT_INTERNAL_LIFETIME,
            evidence_dir: PathBuf::from(DEFAULT_STORE).join("evidences"),
            evidence_server: true,
            key_source: KeySource::Random,
            profile: None,
            order_limit: Some(LETSENCRYPT_ORDERS),
            domain_limit: Some(LETSENCRYPT_PER_DOMAIN),
        }
    }
}

/// `[acme]` as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAcme {
    pub store: Option<String>,
    pub email: Option<String>,
    pub issuer: Option<String>,
    pub challenge: Option<String>,
    pub renew_before: Option<DurationValue>,
    pub http_listen: Option<String>,
    pub eab_kid: Option<String>,
    pub eab_hmac_key: Option<String>,
    pub ca_roots: Option<Vec<String>>,
    pub retry_min: Option<DurationValue>,
    pub retry_max: Option<DurationValue>,
    pub ca_timeout: Option<DurationValue>,
    pub internal_ca_lifetime: Option<DurationValue>,
    pub evidence_dir: Option<String>,
    pub evidence_server: Option<bool>,
    pub key_source: Option<String>,
    pub profile: Option<String>,
    pub order_limit: Option<String>,
    pub domain_limit: Option<String>,
}

/// One `[[domains]]` entry as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDomain {
    pub names: Option<Vec<String>>,
    pub backend: Option<String>,
    pub mode: Option<String>,
    pub issuer: Option<String>,
    pub challenge: Option<String>,
    pub send_proxy_protocol: Option<bool>,
    pub alpn: Option<Vec<String>>,
    pub hsts: Option<String>,
    pub response_headers: Option<BTreeMap<String, String>>,
}

/// Check one DNS name (lowercased, no trailing dot); `*.` is allowed as the first label.
pub fn check_name(name: &str) -> Result<String, String> {
    let lower = name.trim().trim_end_matches('.').to_ascii_lowercase();
    let bare = lower.strip_prefix("*.").unwrap_or(&lower);
    let bad = |why: &str| Err(format!("{name:?} is not a valid domain name: {why}"));
    if bare.is_empty() {
        return bad("empty");
    }
    if lower.len() > 253 {
        return bad("longer than 253 characters");
    }
    let labels: Vec<&str> = bare.split('.').collect();
    if labels.len() < 2 {
        return bad("a public name has at least two labels");
    }
    for label in &labels {
        if label.is_empty() || label.len() > 63 {
            return bad("each label is 1 to 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return bad("only letters, digits and '-' (use punycode for other scripts)");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad("a label cannot start or end with '-'");
        }
    }
    if labels
        .last()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return bad("an IP address is not a domain");
    }
    Ok(lower)
}

/// dstack-ingress's `TARGET_ENDPOINT`: `host:port`, optionally `http://` or `grpc://`.
pub fn parse_target(text: &str) -> Result<HostPort, String> {
    let t = text.trim();
    let bare = ["http://", "https://", "grpc://", "grpcs://", "tcp://"]
        .iter()
        .find_map(|p| t.strip_prefix(p))
        .unwrap_or(t)
        .trim_end_matches('/');
    bare.parse::<HostPort>()
        .map_err(|e| format!("{text:?}: {e} (expected host:port, optionally with http://)"))
}

/// Everything about public domains.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PublicConfig {
    /// The domains.
    pub domains: Vec<DomainConfig>,
    /// Where more domains come from (`[[domain_sources]]`).
    pub sources: Vec<super::sources::SourceConfig>,
    /// Whether the customer domains still point here (`[domain_health]`), when checked.
    pub health: Option<super::sources::HealthConfig>,
    /// Issuance settings.
    pub acme: AcmeConfig,
    /// DNS provider, resolvers and the dstack records.
    pub dns: super::dns::DnsConfig,
}

impl PublicConfig {
    /// Whether any public domain is served: configured, or from a source.
    pub fn serves_domains(&self) -> bool {
        !self.domains.is_empty() || !self.sources.is_empty()
    }
}

/// A true/false environment variable (`1`/`0` and `yes`/`no` too); a typo is an error.
pub(super) fn env_flag(env: &dyn Source, keys: &[&'static str], c: &mut Check) -> Option<bool> {
    super::source::first(env, keys).and_then(|(var, v)| match v.trim() {
        "1" | "true" | "yes" => Some(true),
        "0" | "false" | "no" => Some(false),
        other => {
            c.fail(var, format!("{other:?} is not true or false"));
            None
        }
    })
}

/// `[acme]`, `[dns]`, `[[domains]]`, `[[domain_sources]]`, `[on_demand]`, `[domain_health]`
/// and dstack-ingress's variables.
pub(super) fn public(raw: &super::raw::RawConfig, env: &dyn Source, c: &mut Check) -> PublicConfig {
    let (acme, issuer, challenge) = acme_settings(raw.acme.as_ref(), env, c);
    let dns = super::dns::dns(raw.dns.as_ref(), env, c);
    let domains = raw.domains.as_deref().unwrap_or_default();
    // dstack-ingress answers DNS-01 unless told otherwise; so do its deployments here, when
    // their DNS credentials come from the environment.
    let challenge = match challenge {
        Some(chosen) => chosen,
        None if dns.provider.is_some() && super::dns::provider_from_env(env) => Challenge::Dns01,
        None => Challenge::default(),
    };
    let mut list = Vec::new();
    let send_proxy = env_flag(env, env::SEND_PROXY_PROTOCOL, c).unwrap_or(false);
    for (i, d) in domains.iter().enumerate() {
        list.extend(configured_domain(i, d, &issuer, challenge, send_proxy, c));
    }
    list.extend(ingress_domains(env, &issuer, challenge, c));
    check_domains(&list, &dns, &acme, c);
    let sources = raw.domain_sources.as_deref().unwrap_or_default();
    let mut sources = super::sources::sources(sources, &issuer, challenge, send_proxy, c);
    // Names admitted at their first handshake come last: a listed name keeps its source.
    sources.extend(
        raw.on_demand
            .as_ref()
            .and_then(|raw| super::sources::on_demand(raw, &issuer, challenge, send_proxy, c)),
    );
    // A source's domains are checked as they arrive; what their route needs, now.
    let routes: Vec<(String, DomainConfig)> = sources
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                DomainConfig {
                    names: Vec::new(),
                    ..s.route.clone()
                },
            )
        })
        .collect();
    check_domains(&routes, &dns, &acme, c);
    let health = raw
        .domain_health
        .as_ref()
        .map(|raw| super::sources::health(raw, &dns, c));
    PublicConfig {
        domains: list.into_iter().map(|(_, d)| d).collect(),
        sources,
        health,
        acme,
        dns,
    }
}

/// `[acme]` and its variables; the default issuer and challenge of every domain.
fn acme_settings(
    acme: Option<&RawAcme>,
    env: &dyn Source,
    c: &mut Check,
) -> (AcmeConfig, Issuer, Option<Challenge>) {
    let first = |keys: &[&'static str]| super::source::first(env, keys);
    let raw = acme.cloned().unwrap_or_default();
    let staging = env_flag(env, env::STAGING, c);
    let evidence_server = env_flag(env, env::EVIDENCE_SERVER, c);
    let issuer = match (staging, raw.issuer.as_deref()) {
        (Some(true), _) => Issuer::Acme(LETSENCRYPT_STAGING.into()),
        (_, Some(text)) => text
            .parse()
            .map_err(|e| c.fail("acme.issuer", e))
            .unwrap_or(Issuer::InternalCa),
        (_, None) => Issuer::Acme(LETSENCRYPT.into()),
    };
    let challenge = match (first(env::CHALLENGE), raw.challenge.as_deref()) {
        (Some((var, v)), _) => Some(v.parse().map_err(|e| c.fail(var, e)).unwrap_or_default()),
        (None, Some(v)) => Some(
            v.parse()
                .map_err(|e| c.fail("acme.challenge", e))
                .unwrap_or_default(),
        ),
        (None, None) => None,
    };
    let renew_before = renew_before(&raw, env, c);
    let eab = match (raw.eab_kid, raw.eab_hmac_key) {
        (Some(kid), Some(hmac_key)) => Some(Eab { kid, hmac_key }),
        (None, None) => None,
        _ => {
            c.fail(
                "acme.eab_kid",
                "eab_kid and eab_hmac_key go together (both from the CA's dashboard)",
            );
            None
        }
    };
    let store: PathBuf = raw
        .store
        .map_or_else(|| DEFAULT_STORE.into(), PathBuf::from);
    let acme = AcmeConfig {
        evidence_dir: first(env::EVIDENCE_DIR)
            .map(|(_, v)| v)
            .or(raw.evidence_dir)
            .map_or_else(|| store.join("evidences"), PathBuf::from),
        evidence_server: evidence_server.or(raw.evidence_server).unwrap_or(true),
        key_source: raw
            .key_source
            .as_deref()
            .map(|t| t.parse().map_err(|e| c.fail("acme.key_source", e)))
            .transpose()
            .ok()
            .flatten()
            .unwrap_or_default(),
        store,
        email: first(env::EMAIL).map(|(_, v)| v).or(raw.email),
        order_limit: rate_limit(
            "acme.order_limit",
            raw.order_limit.as_deref(),
            LETSENCRYPT_ORDERS,
            c,
        ),
        domain_limit: rate_limit(
            "acme.domain_limit",
            raw.domain_limit.as_deref(),
            LETSENCRYPT_PER_DOMAIN,
            c,
        ),
        profile: first(env::PROFILE)
            .map(|(_, v)| v)
            .or(raw.profile.clone())
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty())
            .and_then(|p| {
                // Profile names are short tokens (Let's Encrypt: classic, tlsserver, shortlived).
                match p
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                {
                    true => Some(p),
                    false => {
                        c.fail("acme.profile", format!("{p:?} is not an ACME profile name"));
                        None
                    }
                }
            }),
        renew_before,
        http_listen: raw
            .http_listen
            .as_deref()
            .and_then(|t| c.socket("acme.http_listen", t)),
        eab,
        ca_roots: raw
            .ca_roots
            .unwrap_or_default()
            .into_iter()
            .map(PathBuf::from)
            .collect(),
        retry_min: c.duration("acme.retry_min", raw.retry_min.as_ref(), DEFAULT_RETRY_MIN),
        retry_max: c.duration("acme.retry_max", raw.retry_max.as_ref(), DEFAULT_RETRY_MAX),
        ca_timeout: c.duration(
            "acme.ca_timeout",
            raw.ca_timeout.as_ref(),
            DEFAULT_CA_TIMEOUT,
        ),
        internal_ca_lifetime: c.long_duration(
            "acme.internal_ca_lifetime",
            raw.internal_ca_lifetime.as_ref(),
            DEFAULT_INTERNAL_LIFETIME,
        ),
    };

    (acme, issuer, challenge)
}

/// `RENEW_DAYS_BEFORE` / `acme.renew_before`; `None`: when a third of the lifetime remains.
fn renew_before(raw: &RawAcme, env: &dyn Source, c: &mut Check) -> Option<Duration> {
    let first = |keys: &[&'static str]| super::source::first(env, keys);
    match first(env::RENEW_DAYS) {
        Some((var, v)) => match v.trim().parse::<u64>() {
            Ok(days) if (1..=365).contains(&days) => Some(Duration::from_secs(days * 86400)),
            _ => {
                c.fail(var, format!("{v:?} is not a number of days from 1 to 365"));
                None
            }
        },
        None => raw.renew_before.as_ref().and_then(|v| {
            let d = match v {
                DurationValue::Seconds(n) => Ok(Duration::from_secs(*n)),
                DurationValue::Text(t) => super::parse_duration(t),
            };
            d.map_err(|e| c.fail("acme.renew_before", e)).ok()
        }),
    }
}

/// One `[[domains]]` entry (the key names it in errors); `None` when it cannot be used.
fn configured_domain(
    i: usize,
    d: &RawDomain,
    issuer: &Issuer,
    challenge: Challenge,
    send_proxy_protocol: bool,
    c: &mut Check,
) -> Option<(String, DomainConfig)> {
    let key = format!("domains[{i}]");
    let names: Vec<String> = d
        .names
        .iter()
        .flatten()
        .filter_map(|n| check_name(n).map_err(|e| c.fail(&key, e)).ok())
        .collect();
    if d.names.as_ref().is_none_or(Vec::is_empty) {
        c.fail(&key, "no names: set names = [\"example.com\", ...]");
        return None;
    }
    let label = d.names.iter().flatten().next().cloned().unwrap_or_default();
    let route = domain_route(&key, &label, d, issuer, challenge, send_proxy_protocol, c)?;
    Some((key, DomainConfig { names, ..route }))
}

/// Where a domain's traffic goes and how its certificate is obtained, as `d` says (`key` and
/// `label` name it in errors); its names are left empty.
pub(super) fn domain_route(
    key: &str,
    label: &str,
    d: &RawDomain,
    issuer: &Issuer,
    challenge: Challenge,
    send_proxy_protocol: bool,
    c: &mut Check,
) -> Option<DomainConfig> {
    let Some(backend) = d.backend.as_deref() else {
        c.fail(
            key,
            format!("{label}: no backend (set backend = \"host:port\")"),
        );
        return None;
    };
    let backend = match parse_target(backend) {
        Ok(b) => b,
        Err(e) => {
            c.fail(&format!("{key}.backend"), e);
            return None;
        }
    };
    let mode = match d.mode.as_deref().map(str::trim) {
        None | Some("http") => Mode::Http,
        Some("tcp") => Mode::Tcp,
        Some(other) => {
            c.fail(
                &format!("{key}.mode"),
                format!("{other:?}: use http or tcp"),
            );
            Mode::Http
        }
    };
    let issuer = match d.issuer.as_deref() {
        Some(t) => t
            .parse()
            .map_err(|e| c.fail(&format!("{key}.issuer"), e))
            .unwrap_or(Issuer::InternalCa),
        None => issuer.clone(),
    };
    let challenge = match d.challenge.as_deref() {
        Some(t) => t
            .parse()
            .map_err(|e| c.fail(&format!("{key}.challenge"), e))
            .unwrap_or_default(),
        None => challenge,
    };
    let send_proxy_protocol = match (d.send_proxy_protocol, mode) {
        (Some(true), Mode::Http) => {
            c.fail(
                &format!("{key}.send_proxy_protocol"),
                "only tcp-mode backends get a PROXY header (http mode's connections are pooled; the client is in x-forwarded-for)",
            );
            false
        }
        (Some(set), _) => set,
        // SEND_PROXY_PROTOCOL sets it for every tcp-mode domain.
        (None, Mode::Tcp) => send_proxy_protocol,
        (None, Mode::Http) => false,
    };
    let alpn = alpn_list(
        &format!("{key}.alpn"),
        d.alpn.as_deref().unwrap_or_default(),
        mode,
        c,
    );
    // `hsts` is one more added header, checked for its max-age; both are for http mode only.
    let hsts = d.hsts.as_deref().map(|v| {
        let name = Ok(http::header::STRICT_TRANSPORT_SECURITY);
        (format!("{key}.hsts"), name, hsts_value(v))
    });
    let table = d.response_headers.iter().flatten().map(|(name, value)| {
        (
            format!("{key}.response_headers.{name}"),
            http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| "not a header name".into()),
            http::HeaderValue::from_str(value)
                .map_err(|_| format!("{value:?} is not a header value")),
        )
    });
    let mut response_headers = Vec::new();
    for (field, name, value) in hsts.into_iter().chain(table) {
        match (mode, name, value) {
            (Mode::Tcp, _, _) => c.fail(
                &field,
                "tcp mode passes the backend's bytes through: set the header in the backend",
            ),
            (_, Ok(n), Ok(_)) if is_framing(&n) => c.fail(
                &field,
                "a header that frames the message is the proxy's to set",
            ),
            (_, Ok(n), Ok(v)) => response_headers.push((n, v)),
            (_, Err(e), _) | (_, _, Err(e)) => c.fail(&field, e),
        }
    }
    Some(DomainConfig {
        names: Vec::new(),
        backend,
        mode,
        issuer,
        challenge,
        send_proxy_protocol,
        alpn,
        routes: BTreeMap::new(),
        response_headers,
    })
}

/// Headers that say how the message is framed or routed: never added from configuration.
fn is_framing(name: &http::HeaderName) -> bool {
    use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING, UPGRADE};
    [CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING, UPGRADE].contains(name)
        || name.as_str() == "keep-alive"
}

fn header_pairs<S: serde::Serializer>(
    v: &[(http::HeaderName, http::HeaderValue)],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(
        v.iter()
            .map(|(n, v)| (n.as_str(), v.to_str().unwrap_or_default())),
    )
}

/// A `Strict-Transport-Security` value (RFC 6797 §6.1): `max-age=<seconds>` and optional
/// directives (`includeSubDomains`, `preload`).
fn hsts_value(v: &str) -> Result<http::HeaderValue, String> {
    let max_age = v.split(';').map(str::trim).find_map(|d| {
        d.to_ascii_lowercase()
            .strip_prefix("max-age=")
            .map(str::to_owned)
    });
    match max_age {
        Some(secs)
            if !secs.is_empty() && secs.trim_matches('"').bytes().all(|b| b.is_ascii_digit()) =>
        {
            http::HeaderValue::from_str(v.trim())
                .map_err(|_| format!("{v:?} is not a header value"))
        }
        _ => Err(format!(
            "{v:?} has no max-age=<seconds> (e.g. \"max-age=31536000; includeSubDomains\")"
        )),
    }
}

/// dstack-ingress's variables: `DOMAIN` (with `ALIAS_DOMAIN`), `DOMAINS`, `TARGET_ENDPOINT`,
/// `ROUTING_MAP`.
fn ingress_domains(
    env: &dyn Source,
    issuer: &Issuer,
    challenge: Challenge,
    c: &mut Check,
) -> Vec<(String, DomainConfig)> {
    let first = |keys: &[&'static str]| super::source::first(env, keys);
    let mut list = Vec::new();
    let single = first(env::DOMAIN);
    let many = first(env::DOMAINS);
    let target = first(env::TARGET_ENDPOINT);
    let alias = first(env::ALIAS_DOMAIN);
    if env.get(env::OLD_CHALLENGE_ALIAS).is_some() {
        c.fail(
            env::OLD_CHALLENGE_ALIAS,
            "renamed DELEGATION_ZONE in dstack-ingress 2.3 (which now ignores the old name silently and leaves delegation off): set DELEGATION_ZONE instead",
        );
    }
    let alpn = match first(env::ALPN) {
        Some((var, text)) => {
            let items: Vec<String> = text.split(',').map(str::to_owned).collect();
            alpn_list(var, &items, Mode::Http, c)
        }
        None => Vec::new(),
    };
    let mut routes = routing_map(env, c);
    let default_backend = target
        .as_ref()
        .and_then(|(var, t)| parse_target(t).map_err(|e| c.fail(var, e)).ok());
    // (variable, entry number in DOMAINS, name)
    let mut env_domains: Vec<(&str, Option<usize>, String)> = Vec::new();
    if let Some((var, d)) = &single {
        env_domains.push((var, None, d.trim().to_owned()));
    }
    if let Some((var, text)) = &many {
        if alias.is_some() {
            c.fail(
                "ALIAS_DOMAIN",
                "ALIAS_DOMAIN adds names to the single DOMAIN's certificate; with DOMAINS give each domain its aliases as `domain=alias1,alias2` (one domain per line)",
            );
        }
        // One line with `=` is one domain with its aliases (their commas are the aliases').
        let lines = match !text.trim().contains('\n') && text.contains('=') {
            true => vec![(1, text.trim())],
            false => entries(text),
        };
        for (n, line) in lines {
            env_domains.push((var, Some(n), line.to_owned()));
        }
    }
    if alias.is_some() && single.is_none() && many.is_none() {
        c.fail("ALIAS_DOMAIN", "ALIAS_DOMAIN needs DOMAIN");
    }
    for (var, n, text) in env_domains {
        let named = |e: String| match n {
            Some(n) => format!("entry {n} ({text:?}): {e}"),
            None => e,
        };
        // `domain=alias1,alias2`: the aliases share the domain's certificate and route.
        let (primary, aliases) = match text.split_once('=') {
            Some((p, a)) => (p.trim(), a.split(',').map(str::trim).collect::<Vec<_>>()),
            None => (text.as_str(), Vec::new()),
        };
        let Ok(name) = check_name(primary).map_err(|e| c.fail(var, named(e))) else {
            continue;
        };
        let Some(backend) = routes.remove(&name).or_else(|| default_backend.clone()) else {
            c.fail(
                var,
                format!(
                    "{name}: no backend (set TARGET_ENDPOINT, or {name}=host:port in ROUTING_MAP)"
                ),
            );
            continue;
        };
        let mut names = vec![name];
        for a in aliases.into_iter().filter(|a| !a.is_empty()) {
            if let Ok(a) = check_name(a).map_err(|e| c.fail(var, named(e))) {
                names.push(a);
            }
        }
        if var == "DOMAIN" {
            if let Some((avar, list)) = &alias {
                for a in list.split(',').map(str::trim).filter(|a| !a.is_empty()) {
                    if let Ok(a) = check_name(a).map_err(|e| c.fail(avar, e)) {
                        names.push(a);
                    }
                }
            }
        }
        names.dedup();
        list.push((
            var.to_owned(),
            DomainConfig {
                names,
                backend,
                mode: Mode::Http,
                issuer: issuer.clone(),
                challenge,
                send_proxy_protocol: false,
                alpn: alpn.clone(),
                routes: BTreeMap::new(),
                response_headers: Vec::new(),
            },
        ));
    }
    // A routed name under a wildcard domain: that certificate, its own backend.
    for (name, backend) in routes {
        let parent = name.split_once('.').map(|(_, p)| format!("*.{p}"));
        match list
            .iter_mut()
            .find(|(_, d)| parent.as_ref().is_some_and(|p| d.names.contains(p)))
        {
            Some((_, d)) => {
                d.routes.insert(name, backend);
            }
            None => c.fail(
                "ROUTING_MAP",
                format!("{name} is routed but neither DOMAIN nor DOMAINS holds it or a wildcard over it"),
            ),
        }
    }

    list
}

/// `ROUTING_MAP`: `domain=host:port` lines.
fn routing_map(env: &dyn Source, c: &mut Check) -> BTreeMap<String, HostPort> {
    let first = |keys: &[&'static str]| super::source::first(env, keys);
    let mut routes = BTreeMap::new();
    if let Some((var, map)) = first(env::ROUTING_MAP) {
        for (n, line) in entries(&map) {
            let Some((domain, backend)) = line.split_once('=') else {
                c.fail(
                    var,
                    format!("entry {n} ({line:?}): expected domain=host:port"),
                );
                continue;
            };
            match (check_name(domain.trim()), parse_target(backend.trim())) {
                (Ok(d), Ok(b)) => {
                    routes.insert(d, b);
                }
                (Err(e), _) | (_, Err(e)) => c.fail(var, format!("entry {n} ({line:?}): {e}")),
            }
        }
    }
    routes
}

/// The entries of a dstack-ingress list variable, numbered from 1: one per line, or
/// comma-separated when it is one line; blank and `#` lines skipped.
fn entries(text: &str) -> Vec<(usize, &str)> {
    let items: Vec<&str> = match text.trim().contains('\n') {
        true => text.lines().collect(),
        false => text.split(',').collect(),
    };
    items
        .into_iter()
        .map(str::trim)
        .enumerate()
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
        .map(|(i, l)| (i + 1, l))
        .collect()
}

/// Names are unique across domains; wildcards need DNS-01; each challenge has what it needs.
fn check_domains(
    list: &[(String, DomainConfig)],
    dns: &super::dns::DnsConfig,
    acme: &AcmeConfig,
    c: &mut Check,
) {
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for (key, d) in list {
        for name in &d.names {
            if let Some(other) = seen.insert(name.clone(), key.clone()) {
                c.fail(
                    key,
                    format!("{name} is also served by {other}: a name belongs to one domain"),
                );
            }
            if name.starts_with("*.")
                && d.challenge != Challenge::Dns01
                && d.issuer != Issuer::InternalCa
            {
                c.fail(
                    key,
                    format!("{name}: a wildcard needs the dns-01 challenge; CAs never offer {} for wildcards", d.challenge.as_str()),
                );
            }
        }
        if d.challenge == Challenge::Dns01
            && d.issuer != Issuer::InternalCa
            && dns.provider.is_none()
            && dns.setup.is_none()
        {
            c.fail(
                key,
                format!("{}: dns-01 needs a DNS provider (DNS_PROVIDER=cloudflare, rfc2136, route53, gcloud, digitalocean, hetzner, linode, namecheap, ovh, porkbun or httpreq, or [dns] provider), or DNS_SETUP_MODE to create each challenge record yourself", d.primary()),
            );
        }
        if d.challenge == Challenge::Http01
            && d.issuer != Issuer::InternalCa
            && acme.http_listen.is_none()
        {
            c.fail(
                key,
                format!(
                    "{}: http-01 needs the :80 listener (acme.http_listen = \"0.0.0.0:80\")",
                    d.primary()
                ),
            );
        }
    }
}

impl Challenge {
    /// The ACME name (CAA `validationmethods` uses it too).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TlsAlpn01 => "tls-alpn-01",
            Self::Http01 => "http-01",
            Self::Dns01 => "dns-01",
        }
    }
}

#[cfg(test)]
mod tests;
