//! `DNS_SETUP_MODE`: the dstack records of a deployment that keeps DNS credentials out of the
//! CVM. dstack-mesh says which records to create (`print`), waits until public resolvers see
//! them (`wait`), or hands them to the operator's service, signed and quoted (`webhook`).

use std::time::Duration;

use super::{pick, Check, RawDns, Secret, Source};

/// Environment variables, dstack-ingress's names.
pub mod env {
    /// `print`, `wait` (default) or `webhook`.
    pub const MODE: &[&str] = &["DNS_SETUP_MODE"];
    /// How long to wait for the records (seconds, or `30m`).
    pub const TIMEOUT: &[&str] = &["DNS_SETUP_TIMEOUT"];
    /// Between two looks.
    pub const INTERVAL: &[&str] = &["DNS_SETUP_INTERVAL"];
    /// DNS-over-HTTPS resolvers (JSON API), comma-separated; `DOH_RESOLVER` is the old name.
    pub const DOH_RESOLVERS: &[&str] = &["DOH_RESOLVERS", "DOH_RESOLVER"];
    /// Pause after the records are visible, before the first order (the gateway caches TXT).
    pub const SETTLE: &[&str] = &["DNS_SETTLE_SECONDS"];
    /// Where `webhook` posts the records.
    pub const WEBHOOK_URL: &[&str] = &["DNS_WEBHOOK_URL"];
    /// The HMAC-SHA256 key of the webhook's payload.
    pub const WEBHOOK_TOKEN: &[&str] = &["DNS_WEBHOOK_TOKEN"];
    /// Deadline of one webhook request (seconds).
    pub const WEBHOOK_TIMEOUT: &[&str] = &["DNS_WEBHOOK_TIMEOUT"];
}

/// dstack-ingress's default resolvers: Google's and Cloudflare's JSON APIs.
pub const DEFAULT_DOH: [&str; 2] = [
    "https://dns.google/resolve",
    "https://cloudflare-dns.com/dns-query",
];
/// Default wait for the records.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);
/// Default pause between looks.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(15);
/// Default pause once visible.
pub const DEFAULT_SETTLE: Duration = Duration::from_secs(30);
/// Default deadline of one webhook request.
pub const DEFAULT_WEBHOOK_TIMEOUT: Duration = Duration::from_secs(15);

/// What is done about records nobody in the CVM can write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SetupMode {
    /// Show them (log, `/certs`, the status page) and order at once.
    Print,
    /// Show them, then order once every DoH resolver sees every one.
    Wait,
    /// Post them to the operator's service, then wait as `Wait` does.
    Webhook,
}

/// The operator's service that creates records.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Webhook {
    /// Where to post.
    pub url: String,
    /// Signs the payload (HMAC-SHA256); none: unsigned (the quote still binds it).
    pub token: Option<Secret>,
    /// Deadline of one request.
    #[serde(with = "super::secs")]
    pub timeout: Duration,
}

/// `DNS_SETUP_MODE` and its settings.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DnsSetup {
    /// The mode.
    pub mode: SetupMode,
    /// DoH JSON endpoints that must all see each record.
    pub doh_resolvers: Vec<String>,
    /// How long to wait.
    #[serde(with = "super::secs")]
    pub timeout: Duration,
    /// Between looks.
    #[serde(with = "super::secs")]
    pub interval: Duration,
    /// Pause once visible, before the first order.
    #[serde(with = "super::secs")]
    pub settle: Duration,
    /// `webhook`'s service.
    pub webhook: Option<Webhook>,
}

/// Seconds (dstack-ingress's form) or a duration such as `30m`.
fn seconds(
    env: &dyn Source,
    keys: &[&'static str],
    file: Option<super::DurationValue>,
    key: &'static str,
    default: Duration,
    zero_ok: bool,
    c: &mut Check,
) -> Duration {
    let file = file.map(|v| match v {
        super::DurationValue::Seconds(n) => n.to_string(),
        super::DurationValue::Text(t) => t,
    });
    let Some((var, text)) = pick(env, keys, file, key) else {
        return default;
    };
    let t = text.trim();
    let parsed = t
        .parse::<u64>()
        .map(Duration::from_secs)
        .or_else(|_| super::super::parse_duration(t));
    match parsed {
        Ok(d) if d.is_zero() && !zero_ok => {
            c.fail(var, "must be above zero");
            default
        }
        Ok(d) if d > super::super::MAX_DURATION => {
            c.fail(var, format!("{t:?} is longer than 30 days"));
            default
        }
        Ok(d) => d,
        Err(e) => {
            c.fail(var, e);
            default
        }
    }
}

/// A DoH endpoint: https, or http to a loopback address (tests, a local resolver).
fn doh_url(text: &str) -> Result<String, String> {
    let t = text.trim().trim_end_matches('/');
    let uri: http::Uri = t.parse().map_err(|e| format!("{t:?} is not a URL: {e}"))?;
    let host = uri.host().unwrap_or_default();
    let loopback = host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match uri.scheme_str() {
        Some("https") if !host.is_empty() => Ok(t.to_owned()),
        Some("http") if loopback => Ok(t.to_owned()),
        _ => Err(format!(
            "{t:?}: a DNS-over-HTTPS endpoint is an https:// URL (http:// only on loopback)"
        )),
    }
}

/// `DNS_SETUP_MODE` and its settings, for a deployment whose dstack records no provider
/// writes: `None` when a provider writes them.
pub(super) fn setup(
    raw: &RawDns,
    env: &dyn Source,
    provider_writes: bool,
    c: &mut Check,
) -> Option<DnsSetup> {
    let mode = pick(env, env::MODE, raw.setup_mode.clone(), "dns.setup_mode");
    if provider_writes {
        if let Some((var, _)) = mode {
            c.fail(var, "the DNS provider writes the records itself: DNS_SETUP_MODE is for deployments without DNS credentials in the CVM (unset DNS_PROVIDER and its credential, or DNS_SETUP_MODE)");
        }
        return None;
    }
    let mode = match mode {
        None => SetupMode::Wait,
        Some((var, m)) => match m.trim().to_ascii_lowercase().as_str() {
            "print" => SetupMode::Print,
            "wait" => SetupMode::Wait,
            "webhook" => SetupMode::Webhook,
            other => {
                c.fail(var, format!("{other:?} is not print, wait or webhook"));
                SetupMode::Wait
            }
        },
    };
    let doh_resolvers = match pick(
        env,
        env::DOH_RESOLVERS,
        raw.doh_resolvers.as_ref().map(|l| l.join(",")),
        "dns.doh_resolvers",
    ) {
        None => DEFAULT_DOH.iter().map(|s| (*s).to_owned()).collect(),
        Some((var, list)) => {
            let urls: Vec<String> = list
                .split([',', ' ', '\n'])
                .filter(|u| !u.trim().is_empty())
                .filter_map(|u| doh_url(u).map_err(|e| c.fail(var, e)).ok())
                .collect();
            if urls.is_empty() {
                c.fail(var, "names no resolver");
            }
            urls
        }
    };
    let webhook = match pick(
        env,
        env::WEBHOOK_URL,
        raw.webhook_url.clone(),
        "dns.webhook_url",
    ) {
        Some((var, url)) => {
            let url = url.trim().to_owned();
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                c.fail(var, format!("{url:?} is not an http(s) URL"));
            }
            Some(Webhook {
                url,
                token: pick(
                    env,
                    env::WEBHOOK_TOKEN,
                    raw.webhook_token.clone(),
                    "dns.webhook_token",
                )
                .map(|(_, t)| Secret(t.trim().to_owned())),
                timeout: seconds(
                    env,
                    env::WEBHOOK_TIMEOUT,
                    raw.webhook_timeout.clone(),
                    "dns.webhook_timeout",
                    DEFAULT_WEBHOOK_TIMEOUT,
                    false,
                    c,
                ),
            })
        }
        None => None,
    };
    if mode == SetupMode::Webhook && webhook.is_none() {
        c.fail(
            "DNS_WEBHOOK_URL",
            "DNS_SETUP_MODE=webhook needs the URL of the service that creates the records",
        );
    }
    Some(DnsSetup {
        mode,
        doh_resolvers,
        timeout: seconds(
            env,
            env::TIMEOUT,
            raw.setup_timeout.clone(),
            "dns.setup_timeout",
            DEFAULT_TIMEOUT,
            false,
            c,
        ),
        interval: seconds(
            env,
            env::INTERVAL,
            raw.setup_interval.clone(),
            "dns.setup_interval",
            DEFAULT_INTERVAL,
            false,
            c,
        ),
        settle: seconds(
            env,
            env::SETTLE,
            raw.settle.clone(),
            "dns.settle",
            DEFAULT_SETTLE,
            true,
            c,
        ),
        webhook,
    })
}
