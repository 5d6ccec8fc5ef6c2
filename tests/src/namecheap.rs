//! A stand-in for Namecheap's XML API (`/xml.response`), over plain HTTP on loopback, following
//! the documented protocol where a client depends on it:
//!
//! - global parameters in the query or a form body: `ApiUser`, `ApiKey`, `UserName`,
//!   `ClientIp` (which must be the whitelisted IPv4), `Command`; a wrong key is error 1011102,
//!   another address 1011150, both as `Status="ERROR"` with HTTP 200;
//! - `namecheap.domains.getList` paged (`Page`, `PageSize` 10 to 100, `Paging/TotalItems`);
//! - `namecheap.domains.dns.getHosts` (`SLD`, `TLD`): lowercase `host` elements with
//!   `HostId`, `Name`, `Type`, `Address`, `MXPref`, `TTL`, and the domain's `EmailType`;
//! - `namecheap.domains.dns.setHosts`: replaces every host of the domain with `HostName<n>`,
//!   `RecordType<n>`, `Address<n>`, `MXPref<n>`, `TTL<n>` (60 to 60000), numbered from 1
//!   without gaps, and `EmailType` (a domain whose email type is sent differently, or left
//!   out while it has MX records, has its mail rerouted: that is recorded);
//! - unknown domain 2019166.
//!
//! Also `/getip`, answering the caller's address, as Namecheap's dynamic-DNS service does.
//! TXT values under `_acme-challenge.` are mirrored into pebble-challtestsrv when asked.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::http_stand_in;

/// One host record, as Namecheap keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    /// Relative name, `@` the apex.
    pub name: String,
    /// `A`, `TXT`, `MX`, `URL`, ...
    pub rtype: String,
    /// Its value.
    pub address: String,
    /// MX preference.
    pub mx_pref: String,
    /// TTL in seconds.
    pub ttl: String,
}

impl Host {
    /// A host with MX preference 10.
    pub fn new(name: &str, rtype: &str, address: &str, ttl: u32) -> Self {
        Self {
            name: name.into(),
            rtype: rtype.into(),
            address: address.into(),
            mx_pref: "10".into(),
            ttl: ttl.to_string(),
        }
    }
}

#[derive(Debug, Default)]
struct Domain {
    name: String,
    email_type: String,
    hosts: Vec<Host>,
}

#[derive(Debug, Default)]
struct State {
    domains: Vec<Domain>,
    /// Email types changed by a setHosts: (domain, before, after).
    rerouted: Vec<(String, String, String)>,
    commands: Vec<String>,
}

/// The stand-in; it stops with the test's runtime.
#[derive(Clone, Debug)]
pub struct NamecheapStandIn {
    /// The API URL, `http://127.0.0.1:<port>/xml.response`.
    pub url: String,
    /// The address lookup, `http://127.0.0.1:<port>/getip`.
    pub getip: String,
    state: Arc<Mutex<State>>,
}

#[derive(Clone)]
struct Account {
    user: String,
    key: String,
    ip: String,
    mirror: Option<String>,
}

impl NamecheapStandIn {
    /// Serve `domains` (with email type `MX`) to `user`/`key` calling from `ip`.
    pub async fn start(
        user: &str,
        key: &str,
        ip: &str,
        domains: &[&str],
        challtestsrv: Option<String>,
    ) -> Self {
        let state = Arc::new(Mutex::new(State {
            domains: domains
                .iter()
                .map(|d| Domain {
                    name: (*d).to_owned(),
                    email_type: "MX".into(),
                    hosts: Vec::new(),
                })
                .collect(),
            ..State::default()
        }));
        let account = Account {
            user: user.into(),
            key: key.into(),
            ip: ip.into(),
            mirror: challtestsrv,
        };
        let shared = state.clone();
        let addr = http_stand_in::serve(move |req| {
            let (state, account) = (shared.clone(), account.clone());
            async move {
                let uri = req.uri().clone();
                if uri.path() == "/getip" {
                    return text(StatusCode::OK, "127.0.0.1".into());
                }
                let body = req
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let mut params: Vec<(String, String)> = http_stand_in::query_pairs(&uri)
                    .into_iter()
                    .map(|(k, v)| (k, decode(&v)))
                    .collect();
                params.extend(
                    String::from_utf8_lossy(&body)
                        .split('&')
                        .filter_map(|kv| kv.split_once('='))
                        .map(|(k, v)| (k.to_owned(), decode(v))),
                );
                if uri.path() != "/xml.response" {
                    return text(StatusCode::NOT_FOUND, "not found".into());
                }
                let (resp, changed) = handle(&state, &account, &params);
                if let (Some(base), Some((domain, txts))) = (account.mirror, changed) {
                    for (name, values) in txts {
                        let fqdn = match name.as_str() {
                            "@" => format!("{domain}."),
                            n => format!("{n}.{domain}."),
                        };
                        http_stand_in::mirror_txt(base.clone(), fqdn, values).await;
                    }
                }
                resp
            }
        })
        .await;
        Self {
            url: format!("http://{addr}/xml.response"),
            getip: format!("http://{addr}/getip"),
            state,
        }
    }

    /// Put hosts in place, as the owner's records, with the domain's email type.
    pub fn set(&self, domain: &str, email_type: &str, hosts: Vec<Host>) {
        let mut s = self.state.lock().unwrap();
        let d = s.domains.iter_mut().find(|d| d.name == domain).unwrap();
        d.email_type = email_type.into();
        d.hosts = hosts;
    }

    /// The hosts of `domain` now.
    pub fn hosts(&self, domain: &str) -> Vec<Host> {
        let s = self.state.lock().unwrap();
        s.domains
            .iter()
            .find(|d| d.name == domain)
            .map(|d| d.hosts.clone())
            .unwrap_or_default()
    }

    /// Every email-type change a setHosts made: (domain, before, after).
    pub fn rerouted(&self) -> Vec<(String, String, String)> {
        self.state.lock().unwrap().rerouted.clone()
    }

    /// The commands called, in order.
    pub fn commands(&self) -> Vec<String> {
        self.state.lock().unwrap().commands.clone()
    }
}

fn decode(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1..i + 3)) {
            (b'%', Some(hex)) => {
                out.push(
                    u8::from_str_radix(std::str::from_utf8(hex).unwrap_or("00"), 16).unwrap_or(0),
                );
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}

fn escape(v: &str) -> String {
    v.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn ok(command: &str, inner: &str) -> Response<Full<Bytes>> {
    text(
        StatusCode::OK,
        format!("<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<ApiResponse Status=\"OK\" xmlns=\"http://api.namecheap.com/xml.response\"><Errors /><Warnings /><RequestedCommand>{command}</RequestedCommand><CommandResponse Type=\"{command}\">{inner}</CommandResponse><Server>STANDIN</Server><GMTTimeDifference>--5:00</GMTTimeDifference><ExecutionTime>0.01</ExecutionTime></ApiResponse>"),
    )
}

fn error(number: u32, message: &str) -> Response<Full<Bytes>> {
    text(
        StatusCode::OK,
        format!("<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<ApiResponse Status=\"ERROR\" xmlns=\"http://api.namecheap.com/xml.response\"><Errors><Error Number=\"{number}\">{}</Error></Errors><Warnings /><RequestedCommand /><Server>STANDIN</Server><GMTTimeDifference>--5:00</GMTTimeDifference><ExecutionTime>0</ExecutionTime></ApiResponse>", escape(message)),
    )
}

type Changed = Option<(String, Vec<(String, Vec<String>)>)>;

fn handle(
    state: &Mutex<State>,
    account: &Account,
    params: &[(String, String)],
) -> (Response<Full<Bytes>>, Changed) {
    let get = |k: &str| params.iter().find(|(p, _)| p == k).map(|(_, v)| v.as_str());
    let command = get("Command").unwrap_or_default().to_owned();
    state.lock().unwrap().commands.push(command.clone());
    if get("ApiUser") != Some(&account.user) || get("UserName") != Some(&account.user) {
        return (error(1011101, "Parameter APIUser is invalid"), None);
    }
    if get("ApiKey") != Some(&account.key) {
        return (
            error(
                1011102,
                "API Key is invalid or API access has not been enabled",
            ),
            None,
        );
    }
    if get("ClientIp") != Some(&account.ip) {
        return (error(1011150, "Parameter RequestIP is invalid"), None);
    }
    let mut s = state.lock().unwrap();
    let domain_of = |s: &State| {
        let (sld, tld) = (
            get("SLD").unwrap_or_default(),
            get("TLD").unwrap_or_default(),
        );
        let name = format!("{sld}.{tld}").to_ascii_lowercase();
        s.domains.iter().position(|d| d.name == name)
    };
    match command.as_str() {
        "namecheap.domains.getList" => {
            let page: usize = get("Page").and_then(|p| p.parse().ok()).unwrap_or(1).max(1);
            let size: usize = get("PageSize")
                .and_then(|p| p.parse().ok())
                .unwrap_or(20)
                .clamp(10, 100);
            let items: String = s
                .domains
                .iter()
                .enumerate()
                .skip((page - 1) * size)
                .take(size)
                .map(|(i, d)| format!("<Domain ID=\"{}\" Name=\"{}\" User=\"{}\" Created=\"01/01/2024\" Expires=\"01/01/2027\" IsExpired=\"false\" IsLocked=\"false\" AutoRenew=\"true\" WhoisGuard=\"ENABLED\" IsPremium=\"false\" IsOurDNS=\"true\"/>", 1000 + i, d.name, account.user))
                .collect();
            let inner = format!("<DomainGetListResult>{items}</DomainGetListResult><Paging><TotalItems>{}</TotalItems><CurrentPage>{page}</CurrentPage><PageSize>{size}</PageSize></Paging>", s.domains.len());
            (ok(&command, &inner), None)
        }
        "namecheap.domains.dns.getHosts" => {
            let Some(i) = domain_of(&s) else {
                return (error(2019166, "Domain not found"), None);
            };
            let d = &s.domains[i];
            let hosts: String = d
                .hosts
                .iter()
                .enumerate()
                .map(|(n, h)| format!("<host HostId=\"{}\" Name=\"{}\" Type=\"{}\" Address=\"{}\" MXPref=\"{}\" TTL=\"{}\" AssociatedAppTitle=\"\" FriendlyName=\"\" IsActive=\"true\" IsDDNSEnabled=\"false\" />", 217_000 + n, escape(&h.name), h.rtype, escape(&h.address), h.mx_pref, h.ttl))
                .collect();
            let inner = format!("<DomainDNSGetHostsResult Domain=\"{}\" EmailType=\"{}\" IsUsingOurDNS=\"true\">{hosts}</DomainDNSGetHostsResult>", d.name, d.email_type);
            (ok(&command, &inner), None)
        }
        "namecheap.domains.dns.setHosts" => {
            let Some(i) = domain_of(&s) else {
                return (error(2019166, "Domain not found"), None);
            };
            let mut hosts = Vec::new();
            for n in 1.. {
                let Some(name) = get(&format!("HostName{n}")) else {
                    break;
                };
                let (Some(rtype), Some(address)) =
                    (get(&format!("RecordType{n}")), get(&format!("Address{n}")))
                else {
                    return (
                        error(
                            2015330,
                            &format!("RecordType{n} and Address{n} are required"),
                        ),
                        None,
                    );
                };
                let ttl = get(&format!("TTL{n}")).unwrap_or("1800");
                if !ttl.parse::<u32>().is_ok_and(|t| (60..=60_000).contains(&t)) {
                    return (error(2011170, &format!("TTL{n} is invalid")), None);
                }
                hosts.push(Host {
                    name: name.into(),
                    rtype: rtype.into(),
                    address: address.into(),
                    mx_pref: get(&format!("MXPref{n}")).unwrap_or("10").into(),
                    ttl: ttl.into(),
                });
            }
            if params.iter().any(|(k, _)| {
                k.strip_prefix("HostName")
                    .and_then(|n| n.parse::<usize>().ok())
                    .is_some_and(|n| n > hosts.len())
            }) {
                return (
                    error(
                        2011331,
                        "HostName parameters must be numbered from 1 without gaps",
                    ),
                    None,
                );
            }
            let d = &mut s.domains[i];
            let sent = get("EmailType").unwrap_or_default().to_owned();
            if sent != d.email_type {
                let domain = d.name.clone();
                let before = d.email_type.clone();
                d.email_type = sent.clone();
                s.rerouted.push((domain, before, sent));
            }
            let d = &mut s.domains[i];
            let txts: Vec<(String, Vec<String>)> = {
                let mut names: Vec<String> = hosts
                    .iter()
                    .chain(d.hosts.iter())
                    .filter(|h| h.rtype == "TXT" && h.name.starts_with("_acme-challenge"))
                    .map(|h| h.name.clone())
                    .collect();
                names.sort();
                names.dedup();
                names
                    .into_iter()
                    .map(|n| {
                        let values = hosts
                            .iter()
                            .filter(|h| h.rtype == "TXT" && h.name == n)
                            .map(|h| h.address.clone())
                            .collect();
                        (n, values)
                    })
                    .collect()
            };
            d.hosts = hosts;
            let inner = format!(
                "<DomainDNSSetHostsResult Domain=\"{}\" IsSuccess=\"true\"><Warnings /></DomainDNSSetHostsResult>",
                d.name
            );
            (ok(&command, &inner), Some((d.name.clone(), txts)))
        }
        other => (
            error(1010104, &format!("Command {other:?} is not supported")),
            None,
        ),
    }
}
