//! Namecheap's XML API (`xml.response`): the account's domains (`namecheap.domains.getList`,
//! paged) are the zones; a zone's hosts come from `namecheap.domains.dns.getHosts` and are
//! written back whole by `namecheap.domains.dns.setHosts`, which replaces every host record of
//! the domain. So each change reads the hosts, adds or removes exactly one record, and sends
//! every other record back as it was (name, type, address, MX preference, TTL, and the
//! domain's email type), one change at a time; records we did not write are never lost.
//! Every call carries `ApiUser`, `ApiKey`, `UserName` and a whitelisted IPv4 `ClientIp`;
//! calls are paced to Namecheap's 20 a minute. Errors are Namecheap's `Number` and text.

use std::{
    collections::VecDeque,
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;

use super::{
    rest::{public_resolvers, relative, Https},
    sigv4::encode,
    BoxFuture, Data, DnsError, Provider, Record, Rtype, Zone,
};

/// Namecheap's documented limit: 20 calls a minute (and 700 an hour).
const PER_MINUTE: usize = 20;
/// The account's domains are listed again after this long.
const ZONES_FRESH: Duration = Duration::from_secs(300);
/// Where lego asks for the caller's public IPv4 when none is configured.
pub const CLIENT_IP_URL: &str = "https://dynamicdns.park-your-domain.com/getip";

/// How the provider is set up.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `https://api.namecheap.com/xml.response` (or the sandbox's).
    pub api_url: String,
    /// The API user (also sent as `UserName`).
    pub api_user: String,
    /// The API key.
    pub api_key: String,
    /// The whitelisted IPv4 address calls come from; unset: asked of `client_ip_url`.
    pub client_ip: Option<Ipv4Addr>,
    /// Where to ask for it.
    pub client_ip_url: String,
}

/// One host record as Namecheap lists and takes it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Host {
    /// Relative to the domain, `@` the apex.
    name: String,
    rtype: String,
    address: String,
    mx_pref: String,
    ttl: String,
}

/// A domain's hosts and its email type.
#[derive(Debug)]
struct Hosts {
    hosts: Vec<Host>,
    email_type: Option<String>,
}

/// The API, the credentials, the pace and the one-change-at-a-time lock.
pub struct Namecheap {
    https: Https,
    settings: Settings,
    client_ip: tokio::sync::OnceCell<Ipv4Addr>,
    /// When the last calls went out (at most [`PER_MINUTE`] in any minute).
    sent: tokio::sync::Mutex<VecDeque<tokio::time::Instant>>,
    zones: tokio::sync::Mutex<Option<(tokio::time::Instant, Vec<Zone>)>>,
    changing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Namecheap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Namecheap")
            .field("api_url", &self.settings.api_url)
            .field("api_user", &self.settings.api_user)
            .finish_non_exhaustive()
    }
}

fn fail(message: String) -> DnsError {
    DnsError::Provider {
        provider: "namecheap",
        message,
    }
}

/// `zone` as Namecheap's `SLD` and `TLD` (the account's domains are registered names, so the
/// first label is the SLD whatever the public suffix: `example.co.uk` is `example`, `co.uk`).
fn split(zone: &str) -> Result<(&str, &str), DnsError> {
    zone.split_once('.')
        .ok_or_else(|| fail(format!("{zone} is not a registered domain name")))
}

/// An element's attribute, whatever the case of the element's name.
fn is(node: &roxmltree::Node<'_, '_>, name: &str) -> bool {
    node.is_element() && node.tag_name().name().eq_ignore_ascii_case(name)
}

/// `text` as an `ApiResponse`: the document when `Status="OK"` and no `Error`, else
/// Namecheap's numbered errors.
fn answer(text: &str) -> Result<roxmltree::Document<'_>, DnsError> {
    let doc = roxmltree::Document::parse(text).map_err(|e| {
        fail(format!(
            "an answer that is not XML ({e}): {}",
            text.chars().take(300).collect::<String>()
        ))
    })?;
    let root = doc.root_element();
    let errors: Vec<String> = root
        .descendants()
        .filter(|n| is(n, "Error"))
        .map(|n| {
            format!(
                "{} [{}]",
                n.text().unwrap_or_default().trim(),
                n.attribute("Number").unwrap_or("?")
            )
        })
        .collect();
    if !errors.is_empty() {
        return Err(fail(errors.join("; ")));
    }
    if !is(&root, "ApiResponse") || root.attribute("Status") != Some("OK") {
        return Err(fail(format!(
            "status {:?} without an error",
            root.attribute("Status").unwrap_or_default()
        )));
    }
    Ok(doc)
}

impl Namecheap {
    /// Calls end after `timeout` each.
    pub fn new(settings: Settings, timeout: Duration) -> Result<Self, super::SetupError> {
        let client_ip = tokio::sync::OnceCell::new_with(settings.client_ip);
        Ok(Self {
            https: Https::new(timeout)?,
            settings,
            client_ip,
            sent: tokio::sync::Mutex::new(VecDeque::new()),
            zones: tokio::sync::Mutex::new(None),
            changing: tokio::sync::Mutex::new(()),
        })
    }

    /// The configured address, or the one the lookup service sees (once).
    async fn client_ip(&self) -> Result<Ipv4Addr, DnsError> {
        self.client_ip
            .get_or_try_init(|| async {
                let url = &self.settings.client_ip_url;
                let req = http::Request::get(url)
                    .body(Full::new(Bytes::new()))
                    .map_err(|e| fail(format!("GET {url}: {e}")))?;
                let super::rest::Answer { status, body, .. } = self
                    .https
                    .exchange(req)
                    .await
                    .map_err(|e| fail(format!("finding our public IPv4 at {url}: {e} (set NAMECHEAP_CLIENT_IP)")))?;
                let text = String::from_utf8_lossy(&body).trim().to_owned();
                match (status.is_success(), text.parse::<Ipv4Addr>()) {
                    (true, Ok(ip)) => {
                        tracing::info!(client_ip = %ip, "namecheap: calls come from this address (whitelist it in the account)");
                        Ok(ip)
                    }
                    _ => Err(fail(format!("{url} answered {status} {text:?}, not an IPv4 address: set NAMECHEAP_CLIENT_IP to the whitelisted one"))),
                }
            })
            .await
            .copied()
    }

    /// Wait for a slot: at most [`PER_MINUTE`] calls in any minute.
    async fn pace(&self) {
        let mut sent = self.sent.lock().await;
        let now = tokio::time::Instant::now();
        while sent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
        {
            sent.pop_front();
        }
        if sent.len() >= PER_MINUTE {
            if let Some(oldest) = sent.pop_front() {
                let free = oldest + Duration::from_secs(60);
                tracing::debug!(
                    wait_ms = free.duration_since(now).as_millis() as u64,
                    "namecheap: pacing to 20 calls a minute"
                );
                tokio::time::sleep_until(free).await;
            }
        }
        sent.push_back(tokio::time::Instant::now());
    }

    /// One call of `command` with `params`, as a form POST (setHosts may carry many hosts);
    /// the answer's text. A 405 (Namecheap's rate limit) is waited out once.
    async fn call(&self, command: &str, params: &[(String, String)]) -> Result<String, DnsError> {
        let ip = self.client_ip().await?.to_string();
        let mut form: Vec<(&str, &str)> = vec![
            ("ApiUser", &self.settings.api_user),
            ("ApiKey", &self.settings.api_key),
            ("UserName", &self.settings.api_user),
            ("ClientIp", &ip),
            ("Command", command),
        ];
        form.extend(params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let body: String = form
            .iter()
            .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let url = &self.settings.api_url;
        for attempt in 0..2 {
            self.pace().await;
            let req = http::Request::post(url)
                .header(
                    http::header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded",
                )
                .body(Full::new(Bytes::from(body.clone())))
                .map_err(|e| fail(format!("{command}: {e}")))?;
            let super::rest::Answer {
                status,
                body: bytes,
                ..
            } = self
                .https
                .exchange(req)
                .await
                .map_err(|e| fail(format!("{command}: {e}")))?;
            if status == http::StatusCode::METHOD_NOT_ALLOWED && attempt == 0 {
                tracing::warn!(command, "namecheap: rate limited (405): waiting a minute");
                tokio::time::sleep(Duration::from_secs(60)).await;
                continue;
            }
            let text = String::from_utf8_lossy(&bytes).into_owned();
            if !status.is_success() {
                return Err(fail(format!(
                    "{command}: HTTP {status}: {}",
                    text.chars().take(300).collect::<String>()
                )));
            }
            answer(&text).map_err(|e| fail(format!("{command}: {}", provider_words(&e))))?;
            return Ok(text);
        }
        Err(fail(format!("{command}: rate limited")))
    }

    /// The domain's hosts and email type.
    async fn hosts(&self, zone: &Zone) -> Result<Hosts, DnsError> {
        let (sld, tld) = split(&zone.name)?;
        let text = self
            .call(
                "namecheap.domains.dns.getHosts",
                &[("SLD".into(), sld.into()), ("TLD".into(), tld.into())],
            )
            .await?;
        read_hosts(&text, zone)
    }

    /// Replace the domain's hosts with `hosts` (every one of them: setHosts drops the rest).
    async fn set_hosts(&self, zone: &Zone, hosts: &Hosts) -> Result<(), DnsError> {
        let (sld, tld) = split(&zone.name)?;
        let mut params = vec![
            ("SLD".to_owned(), sld.to_owned()),
            ("TLD".to_owned(), tld.to_owned()),
        ];
        if let Some(t) = &hosts.email_type {
            params.push(("EmailType".into(), t.clone()));
        }
        for (i, h) in hosts.hosts.iter().enumerate() {
            let n = i + 1;
            params.push((format!("HostName{n}"), h.name.clone()));
            params.push((format!("RecordType{n}"), h.rtype.clone()));
            params.push((format!("Address{n}"), h.address.clone()));
            if !h.mx_pref.is_empty() {
                params.push((format!("MXPref{n}"), h.mx_pref.clone()));
            }
            if !h.ttl.is_empty() {
                params.push((format!("TTL{n}"), h.ttl.clone()));
            }
        }
        let text = self.call("namecheap.domains.dns.setHosts", &params).await?;
        let doc = answer(&text)?;
        match doc
            .descendants()
            .find(|n| is(n, "DomainDNSSetHostsResult"))
            .and_then(|r| r.attribute("IsSuccess"))
        {
            Some("true") => Ok(()),
            other => Err(fail(format!(
                "setHosts for {}: IsSuccess={other:?}",
                zone.name
            ))),
        }
    }
}

/// The message of a provider failure, without the provider's name (it is added once).
/// A `getHosts` answer: the domain's hosts and email type.
fn read_hosts(text: &str, zone: &Zone) -> Result<Hosts, DnsError> {
    let doc = answer(text)?;
    let Some(result) = doc.descendants().find(|n| is(n, "DomainDNSGetHostsResult")) else {
        return Err(fail(format!(
            "getHosts: no DomainDNSGetHostsResult for {}",
            zone.name
        )));
    };
    if result.attribute("IsUsingOurDNS") == Some("false") {
        return Err(fail(format!(
            "{} does not use Namecheap's nameservers: its host records have no effect",
            zone.name
        )));
    }
    let hosts = result
        .children()
        .filter(|n| is(n, "host"))
        .map(|h| {
            let a = |k: &str| h.attribute(k).unwrap_or_default().to_owned();
            Host {
                name: a("Name"),
                rtype: a("Type"),
                address: a("Address"),
                mx_pref: a("MXPref"),
                ttl: a("TTL"),
            }
        })
        .collect();
    Ok(Hosts {
        hosts,
        email_type: result
            .attribute("EmailType")
            .filter(|t| !t.is_empty())
            .map(str::to_owned),
    })
}

fn provider_words(e: &DnsError) -> String {
    match e {
        DnsError::Provider { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// A record's value as Namecheap's `Address`: TXT unquoted, CNAME fully qualified, CAA as
/// `flags tag "value"`.
fn address(data: &Data) -> Option<String> {
    Some(match data {
        Data::Txt(v) => v.clone(),
        Data::Cname(t) => format!("{t}."),
        Data::Caa {
            critical,
            tag,
            value,
        } => format!("{} {tag} \"{value}\"", if *critical { 128 } else { 0 }),
        Data::Other(..) => return None,
    })
}

/// A host as ours, when it is a type we read.
fn data_of(host: &Host) -> Option<Data> {
    Some(match host.rtype.as_str() {
        "TXT" => Data::Txt(host.address.clone()),
        "CNAME" => Data::Cname(host.address.trim_end_matches('.').to_ascii_lowercase()),
        "CAA" => super::doh::caa(&host.address)?,
        "A" => Data::Other(Rtype::A, host.address.clone()),
        "AAAA" => Data::Other(Rtype::Aaaa, host.address.clone()),
        _ => return None,
    })
}

/// Pages of domains followed at most.
const MAX_PAGES: usize = 100;

impl Provider for Namecheap {
    fn name(&self) -> &'static str {
        "namecheap"
    }

    fn zones(&self) -> BoxFuture<'_, Result<Vec<Zone>, DnsError>> {
        Box::pin(async move {
            let mut cached = self.zones.lock().await;
            if let Some((at, zones)) = cached.as_ref() {
                if at.elapsed() < ZONES_FRESH {
                    return Ok(zones.clone());
                }
            }
            let mut zones = Vec::new();
            for page in 1..=MAX_PAGES {
                let text = self
                    .call(
                        "namecheap.domains.getList",
                        &[
                            ("Page".into(), page.to_string()),
                            ("PageSize".into(), "100".into()),
                        ],
                    )
                    .await?;
                let doc = answer(&text)?;
                zones.extend(
                    doc.descendants()
                        .filter(|n| is(n, "Domain"))
                        .filter(|d| d.attribute("IsOurDNS") != Some("false"))
                        .filter_map(|d| {
                            let name = d
                                .attribute("Name")?
                                .trim_end_matches('.')
                                .to_ascii_lowercase();
                            Some(Zone {
                                id: name.clone(),
                                name,
                            })
                        }),
                );
                let total = doc
                    .descendants()
                    .find(|n| is(n, "TotalItems"))
                    .and_then(|n| n.text())
                    .and_then(|t| t.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                let listed = doc.descendants().filter(|n| is(n, "Domain")).count();
                if listed == 0 || page * 100 >= total {
                    break;
                }
            }
            *cached = Some((tokio::time::Instant::now(), zones.clone()));
            Ok(zones)
        })
    }

    fn records<'a>(
        &'a self,
        zone: &'a Zone,
        name: &'a str,
        rtype: Rtype,
    ) -> BoxFuture<'a, Result<Vec<Record>, DnsError>> {
        Box::pin(async move {
            let Some(rel) = relative(zone, name, "@") else {
                return Ok(Vec::new());
            };
            let hosts = self.hosts(zone).await?;
            Ok(hosts
                .hosts
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case(&rel) && h.rtype == rtype.as_str())
                .filter_map(|h| {
                    Some(Record {
                        name: name.to_owned(),
                        data: data_of(h)?,
                        ttl: h.ttl.parse().unwrap_or(1799),
                        id: None,
                    })
                })
                .collect())
        })
    }

    fn create<'a>(
        &'a self,
        zone: &'a Zone,
        record: &'a Record,
    ) -> BoxFuture<'a, Result<Record, DnsError>> {
        Box::pin(async move {
            let rel = relative(zone, &record.name, "@")
                .ok_or_else(|| fail(format!("{} is not in {}", record.name, zone.name)))?;
            let rtype = record.data.rtype();
            let value = address(&record.data)
                .ok_or_else(|| fail(format!("{} records are not written", rtype.as_str())))?;
            let _one = self.changing.lock().await;
            let mut hosts = self.hosts(zone).await?;
            let present = hosts.hosts.iter().any(|h| {
                h.name.eq_ignore_ascii_case(&rel)
                    && h.rtype == rtype.as_str()
                    && data_of(h).is_some_and(|d| d.same(&record.data))
            });
            if !present {
                hosts.hosts.push(Host {
                    name: rel,
                    rtype: rtype.as_str().to_owned(),
                    address: value,
                    mx_pref: "10".into(),
                    // Namecheap takes 60 to 60000 seconds.
                    ttl: record.ttl.clamp(60, 60_000).to_string(),
                });
                self.set_hosts(zone, &hosts).await?;
            }
            Ok(record.clone())
        })
    }

    fn delete<'a>(
        &'a self,
        zone: &'a Zone,
        record: &'a Record,
    ) -> BoxFuture<'a, Result<(), DnsError>> {
        Box::pin(async move {
            let Some(rel) = relative(zone, &record.name, "@") else {
                return Ok(());
            };
            let _one = self.changing.lock().await;
            let mut hosts = self.hosts(zone).await?;
            let before = hosts.hosts.len();
            // Only this value: another challenge at the same name (a wildcard and its base)
            // stays.
            hosts.hosts.retain(|h| {
                !(h.name.eq_ignore_ascii_case(&rel)
                    && h.rtype == record.data.rtype().as_str()
                    && data_of(h).is_some_and(|d| d.same(&record.data)))
            });
            if hosts.hosts.len() == before {
                return Ok(());
            }
            self.set_hosts(zone, &hosts).await
        })
    }

    fn default_resolvers(&self) -> BoxFuture<'_, Vec<SocketAddr>> {
        Box::pin(async { public_resolvers() })
    }
}

/// Everything read from an answer body: the errors and the hosts.
#[doc(hidden)]
pub fn read_answer(body: &[u8]) {
    let Ok(text) = std::str::from_utf8(body) else {
        return;
    };
    let zone = Zone {
        name: "example.com".into(),
        id: "example.com".into(),
    };
    if let Ok(hosts) = read_hosts(text, &zone) {
        for host in &hosts.hosts {
            let _ = data_of(host);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_and_errors_read_as_namecheap_writes_them() {
        let bad = r#"<?xml version="1.0" encoding="utf-8"?>
<ApiResponse Status="ERROR" xmlns="http://api.namecheap.com/xml.response"><Errors><Error Number="1011102">API Key is invalid or API access has not been enabled</Error></Errors><Warnings /><RequestedCommand /></ApiResponse>"#;
        let e = answer(bad).unwrap_err().to_string();
        assert!(
            e.contains("API Key is invalid or API access has not been enabled [1011102]"),
            "{e}"
        );
        assert!(answer("<ApiResponse Status=\"ERROR\"><Errors/></ApiResponse>").is_err());
        assert!(answer("<html>").is_err());
        assert_eq!(split("example.co.uk").unwrap(), ("example", "co.uk"));
        assert!(split("localhost").is_err());
        assert_eq!(
            address(&Data::Cname("gw.example.net".into())).unwrap(),
            "gw.example.net."
        );
        let host = Host {
            name: "@".into(),
            rtype: "CAA".into(),
            address: "0 issue \"letsencrypt.org\"".into(),
            mx_pref: "10".into(),
            ttl: "1799".into(),
        };
        assert!(matches!(data_of(&host), Some(Data::Caa { tag, .. }) if tag == "issue"));
    }
}
