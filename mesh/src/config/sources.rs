//! `[[domain_sources]]`: lists of customer domains kept outside the configuration (a file, an
//! HTTP endpoint), each domain routed as its entry says or by the source's default route.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::Deserialize;

use super::{
    domains::{domain_route, Challenge, DomainConfig, Issuer, RawDomain},
    raw::DurationValue,
    secs, Check,
};

/// The route fields of a source's table (they are `[[domains]]`'s), as a `[[domains]]` entry
/// without names.
macro_rules! raw_route {
    ($raw:expr) => {
        RawDomain {
            names: None,
            backend: $raw.backend.clone(),
            mode: $raw.mode.clone(),
            issuer: $raw.issuer.clone(),
            challenge: $raw.challenge.clone(),
            send_proxy_protocol: $raw.send_proxy_protocol,
            alpn: $raw.alpn.clone(),
            hsts: $raw.hsts.clone(),
            response_headers: $raw.response_headers.clone(),
        }
    };
}

/// `[on_demand] ask_rate`: 20 new names a second, as a burst of 20. A flood of invented names
/// costs the `ask` endpoint no more than that.
pub const DEFAULT_ASK_RATE: super::domains::RateLimit = super::domains::RateLimit {
    count: 20,
    per: Duration::from_secs(1),
};

/// Domains one source may list unless `max_domains` says otherwise.
pub const DEFAULT_MAX_DOMAINS: usize = 20_000;

/// One `[[domain_sources]]` entry as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    pub name: Option<String>,
    pub file: Option<String>,
    pub url: Option<String>,
    pub redis: Option<String>,
    pub key: Option<String>,
    pub headers: Option<BTreeMap<String, String>>,
    pub interval: Option<DurationValue>,
    pub timeout: Option<DurationValue>,
    pub max_domains: Option<usize>,
    pub grace: Option<DurationValue>,
    pub backend: Option<String>,
    pub mode: Option<String>,
    pub issuer: Option<String>,
    pub challenge: Option<String>,
    pub send_proxy_protocol: Option<bool>,
    pub alpn: Option<Vec<String>>,
    pub hsts: Option<String>,
    pub response_headers: Option<BTreeMap<String, String>>,
}

/// Where a source's list comes from.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// A file: one domain per line (`name [backend [mode]]`), or JSON; read again when it
    /// changes.
    File(PathBuf),
    /// An HTTP(S) endpoint answering JSON, polled with `If-None-Match`.
    Http {
        /// The endpoint.
        url: String,
        /// Sent with every request (a bearer token, say).
        #[serde(skip)]
        headers: Vec<(http::HeaderName, http::HeaderValue)>,
    },
    /// A Redis key (a set of names, a hash of name → route, or a string holding a list),
    /// polled, and read again at once on a keyspace notification when the server sends them.
    Redis {
        /// `redis://[user:password@]host:port/db` (the password never shown).
        #[serde(skip)]
        url: String,
        /// The key.
        key: String,
    },
    /// Names admitted at their first handshake (`[on_demand]`): a name no other source lists
    /// is checked with `ask`, and served once its certificate is issued.
    OnDemand(OnDemand),
}

/// How names are admitted on demand.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct OnDemand {
    /// `GET <ask>?domain=<name>`: `200` admits the name, anything else refuses it.
    pub ask: String,
    /// How long an admission stands before the name is asked about again.
    #[serde(with = "secs")]
    pub allowed_ttl: Duration,
    /// How long a refusal stands (a refused name costs nothing until then).
    #[serde(with = "secs")]
    pub refused_ttl: Duration,
    /// How long a first handshake waits for the certificate before a TLS alert.
    #[serde(with = "secs")]
    pub deadline: Duration,
    /// New names asked about at most (a burst of that many, refilled over the window): past
    /// it, a new name is refused at once, unasked and uncached. None when `off`.
    pub ask_rate: Option<super::domains::RateLimit>,
}

/// `[on_demand]` as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOnDemand {
    pub ask: Option<String>,
    pub ask_timeout: Option<DurationValue>,
    pub allowed_ttl: Option<DurationValue>,
    pub refused_ttl: Option<DurationValue>,
    pub deadline: Option<DurationValue>,
    pub ask_rate: Option<String>,
    pub max_domains: Option<usize>,
    pub backend: Option<String>,
    pub mode: Option<String>,
    pub issuer: Option<String>,
    pub challenge: Option<String>,
    pub send_proxy_protocol: Option<bool>,
    pub alpn: Option<Vec<String>>,
    pub hsts: Option<String>,
    pub response_headers: Option<BTreeMap<String, String>>,
}

/// The name of the on-demand source in logs, `/sources` and metrics.
pub const ON_DEMAND: &str = "on-demand";

/// `[on_demand]`: a source of its own, fed by handshakes.
pub(super) fn on_demand(
    raw: &RawOnDemand,
    issuer: &Issuer,
    challenge: Challenge,
    send_proxy_protocol: bool,
    c: &mut Check,
) -> Option<SourceConfig> {
    let key = "on_demand";
    let ask = match raw.ask.as_deref().map(str::trim) {
        Some(url) => match url.parse::<http::Uri>() {
            Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some() => {
                url.to_owned()
            }
            _ => {
                c.fail(
                    "on_demand.ask",
                    format!("{url:?}: an http:// or https:// URL"),
                );
                return None;
            }
        },
        None => {
            c.fail(
                "on_demand.ask",
                "the URL that says which names may have a certificate (GET ?domain=<name>, 200 = yes): without it anyone could make this CVM order certificates for any name",
            );
            return None;
        }
    };
    let route = raw_route!(raw);
    let route = domain_route(
        key,
        ON_DEMAND,
        &route,
        issuer,
        challenge,
        send_proxy_protocol,
        c,
    )?;
    if route.challenge == Challenge::Dns01 && route.issuer != Issuer::InternalCa {
        c.fail(
            "on_demand.challenge",
            "a first handshake cannot wait for DNS to propagate: tls-alpn-01 or http-01",
        );
    }
    let max_domains = match raw.max_domains {
        Some(0) => {
            c.fail("on_demand.max_domains", "must be greater than zero");
            DEFAULT_MAX_DOMAINS
        }
        Some(n) => n,
        None => DEFAULT_MAX_DOMAINS,
    };
    Some(SourceConfig {
        name: ON_DEMAND.into(),
        kind: SourceKind::OnDemand(OnDemand {
            ask,
            allowed_ttl: c.long_duration(
                "on_demand.allowed_ttl",
                raw.allowed_ttl.as_ref(),
                Duration::from_secs(3600),
            ),
            refused_ttl: c.long_duration(
                "on_demand.refused_ttl",
                raw.refused_ttl.as_ref(),
                Duration::from_secs(300),
            ),
            deadline: c.duration(
                "on_demand.deadline",
                raw.deadline.as_ref(),
                Duration::from_secs(60),
            ),
            ask_rate: super::domains::rate_limit(
                "on_demand.ask_rate",
                raw.ask_rate.as_deref(),
                DEFAULT_ASK_RATE,
                c,
            ),
        }),
        interval: Duration::from_secs(3600),
        timeout: c.duration(
            "on_demand.ask_timeout",
            raw.ask_timeout.as_ref(),
            Duration::from_secs(5),
        ),
        max_domains,
        grace: Duration::ZERO,
        route,
    })
}

/// One source of domains.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SourceConfig {
    /// Its name in logs, `/certs` and metrics.
    pub name: String,
    /// Where the list comes from.
    pub kind: SourceKind,
    /// How often it is read (a file: checked for a change).
    #[serde(with = "secs")]
    pub interval: Duration,
    /// Deadline of one read.
    #[serde(with = "secs")]
    pub timeout: Duration,
    /// A list longer than this is refused whole (the last good one stays).
    pub max_domains: usize,
    /// A domain the list drops is served this much longer (none: it goes at once), so a
    /// customer removed by mistake is not cut off before someone notices.
    #[serde(with = "secs")]
    pub grace: Duration,
    /// The route of a listed domain whose entry names none (its names left empty).
    pub route: DomainConfig,
}

/// The `[[domain_sources]]` entries, each domain's route defaulting to `issuer`, `challenge`
/// and `send_proxy_protocol` as `[[domains]]` entries do.
pub(super) fn sources(
    raw: &[RawSource],
    issuer: &Issuer,
    challenge: Challenge,
    send_proxy_protocol: bool,
    c: &mut Check,
) -> Vec<SourceConfig> {
    let mut out: Vec<SourceConfig> = Vec::new();
    for (i, s) in raw.iter().enumerate() {
        let key = format!("domain_sources[{i}]");
        let kind = match (&s.file, &s.url, &s.redis) {
            (Some(path), None, None) if !path.trim().is_empty() => SourceKind::File(path.into()),
            (None, Some(url), None) => match http_source(&key, url, s.headers.as_ref(), c) {
                Some(kind) => kind,
                None => continue,
            },
            (None, None, Some(url)) => match redis_source(&key, url, s.key.as_deref(), c) {
                Some(kind) => kind,
                None => continue,
            },
            (None, None, None) | (Some(_), None, None) => {
                c.fail(
                    &key,
                    "no list: set file = \"/path\", url = \"https://...\" or redis = \"redis://...\"",
                );
                continue;
            }
            _ => {
                c.fail(&key, "one of file, url or redis");
                continue;
            }
        };
        if s.headers.is_some() && !matches!(kind, SourceKind::Http { .. }) {
            c.fail(
                &format!("{key}.headers"),
                "only an url source sends headers",
            );
        }
        if s.key.is_some() && !matches!(kind, SourceKind::Redis { .. }) {
            c.fail(&format!("{key}.key"), "only a redis source reads a key");
        }
        let name = match &s.name {
            Some(n) if !n.trim().is_empty() => n.trim().to_owned(),
            _ => match &kind {
                SourceKind::File(path) => format!("file:{}", path.display()),
                SourceKind::Http { url, .. } => url.clone(),
                SourceKind::Redis { url, key } => format!("{}/{key}", redact_userinfo(url)),
                SourceKind::OnDemand(_) => ON_DEMAND.into(),
            },
        };
        if out.iter().any(|o| o.name == name) || name == ON_DEMAND {
            c.fail(
                &format!("{key}.name"),
                format!("{name:?} names another source too"),
            );
        }
        let default_interval = match kind {
            SourceKind::File(_) => Duration::from_secs(2),
            SourceKind::Http { .. } => Duration::from_secs(60),
            // Notifications carry the changes when the server sends them.
            SourceKind::Redis { .. } => Duration::from_secs(30),
            SourceKind::OnDemand(_) => Duration::from_secs(3600),
        };
        let interval = c.duration(
            &format!("{key}.interval"),
            s.interval.as_ref(),
            default_interval,
        );
        let timeout = c.duration(
            &format!("{key}.timeout"),
            s.timeout.as_ref(),
            Duration::from_secs(10),
        );
        let max_domains = match s.max_domains {
            Some(0) => {
                c.fail(&format!("{key}.max_domains"), "must be greater than zero");
                DEFAULT_MAX_DOMAINS
            }
            Some(n) => n,
            None => DEFAULT_MAX_DOMAINS,
        };
        let route = raw_route!(s);
        let Some(route) = domain_route(
            &key,
            &name,
            &route,
            issuer,
            challenge,
            send_proxy_protocol,
            c,
        ) else {
            continue;
        };
        let grace = match &s.grace {
            Some(g) => c.long_duration(&format!("{key}.grace"), Some(g), Duration::ZERO),
            None => Duration::ZERO,
        };
        out.push(SourceConfig {
            name,
            kind,
            interval,
            timeout,
            max_domains,
            grace,
            route,
        });
    }
    out
}

/// An `url` source: http(s), with its headers checked.
fn http_source(
    key: &str,
    url: &str,
    headers: Option<&BTreeMap<String, String>>,
    c: &mut Check,
) -> Option<SourceKind> {
    let uri: http::Uri = match url.trim().parse() {
        Ok(u) => u,
        Err(e) => {
            c.fail(&format!("{key}.url"), format!("{url:?}: {e}"));
            return None;
        }
    };
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        c.fail(
            &format!("{key}.url"),
            format!("{url:?}: an http:// or https:// URL"),
        );
        return None;
    }
    let mut pairs = Vec::new();
    for (name, value) in headers.into_iter().flatten() {
        let field = format!("{key}.headers.{name}");
        match (
            http::HeaderName::from_bytes(name.as_bytes()),
            http::HeaderValue::from_str(value),
        ) {
            (Ok(n), Ok(mut v)) => {
                v.set_sensitive(true);
                pairs.push((n, v));
            }
            (Err(_), _) => c.fail(&field, "not a header name"),
            (_, Err(_)) => c.fail(&field, "not a header value"),
        }
    }
    Some(SourceKind::Http {
        url: url.trim().to_owned(),
        headers: pairs,
    })
}

/// A `redis` source: a `redis://` URL the client accepts, and the key.
fn redis_source(key: &str, url: &str, name: Option<&str>, c: &mut Check) -> Option<SourceKind> {
    let url = url.trim();
    // The client's own message may quote the URL, password included: ours does not.
    if !url.starts_with("redis://") || redis::Client::open(url).is_err() {
        c.fail(
            &format!("{key}.redis"),
            format!(
                "{:?} is not a redis:// URL (redis://[user:password@]host:port/db; TLS to Redis is not supported, keep it on the CVM's own network)",
                redact_userinfo(url)
            ),
        );
        return None;
    }
    let Some(name) = name.map(str::trim).filter(|k| !k.is_empty()) else {
        c.fail(&format!("{key}.key"), "the Redis key holding the domains");
        return None;
    };
    Some(SourceKind::Redis {
        url: url.to_owned(),
        key: name.to_owned(),
    })
}

/// `url` without its password, for names and messages.
pub fn redact_userinfo(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((_, host)) => format!("{scheme}://***@{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// `[domain_health]` as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    pub gateway: Option<String>,
    pub interval: Option<DurationValue>,
    pub resolvers: Option<Vec<String>>,
    pub probe: Option<bool>,
    pub probe_port: Option<u16>,
    pub probe_path: Option<String>,
}

/// Whether each customer domain (from a source or on demand) still points at this app.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HealthConfig {
    /// The gateway's domain a customer's CNAME (or A records) must lead to
    /// (`_.dstack-prod5.phala.network`; any name under its base counts); default
    /// `[dns] gateway_domain`.
    pub gateway: Option<String>,
    /// How often each domain is checked (and right before each of its orders).
    #[serde(with = "secs")]
    pub interval: Duration,
    /// Who answers (default `[dns] resolvers`, else the system's).
    pub resolvers: Vec<std::net::SocketAddr>,
    /// The app-address TXT prefix (`_dstack-app-address`): a TXT naming this app there
    /// counts as pointing here too.
    pub txt_prefix: String,
    /// Visit each site as a browser would after each check that finds its DNS pointing here.
    pub probe: Option<ProbeConfig>,
}

/// `[domain_health] probe`: a visit to each customer site through the public path.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ProbeConfig {
    /// The port dialled at the address the domain resolves to (the gateway's; 443).
    pub port: u16,
    /// The path requested (`/`).
    pub path: String,
}

/// `[domain_health]`, defaults from `[dns]`.
pub(super) fn health(raw: &RawHealth, dns: &super::dns::DnsConfig, c: &mut Check) -> HealthConfig {
    let gateway = raw
        .gateway
        .as_deref()
        .map(|g| g.trim().trim_end_matches('.').to_ascii_lowercase())
        .filter(|g| !g.is_empty())
        .or_else(|| dns.gateway_domain.clone());
    let mut resolvers = Vec::new();
    for r in raw.resolvers.iter().flatten() {
        match super::dns::resolver(r) {
            Ok(addr) => resolvers.push(addr),
            Err(e) => c.fail("domain_health.resolvers", e),
        }
    }
    if resolvers.is_empty() {
        resolvers = dns.resolvers.clone();
    }
    HealthConfig {
        gateway,
        interval: c.duration(
            "domain_health.interval",
            raw.interval.as_ref(),
            Duration::from_secs(600),
        ),
        resolvers,
        txt_prefix: dns.txt_prefix.clone(),
        probe: raw.probe.unwrap_or(false).then(|| {
            let path = raw.probe_path.clone().unwrap_or_else(|| "/".to_owned());
            if !path.starts_with('/') || path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
                c.fail(
                    "domain_health.probe_path",
                    format!("{path:?} is not a request path (it starts with /, no spaces)"),
                );
            }
            ProbeConfig {
                port: raw.probe_port.unwrap_or(443),
                path,
            }
        }),
    }
}
