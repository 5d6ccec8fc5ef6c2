//! A stand-in for Linode's (Akamai's) API v4 domains and records (`/v4/domains`), over plain
//! HTTP on loopback, following the documented protocol where a client depends on it:
//! `Authorization: Bearer <token>`; `page`/`page_size` paging (default 25, 25 to 500) with
//! `page`, `pages` and `results`; record names relative to the domain (empty for the apex) with
//! the value in `target`; a TTL rounded up to Linode's next allowed value; CAA with its `tag`;
//! `200` with the record on create and `{}` on delete; errors as `{"errors": [{"field",
//! "reason"}]}` (401 "Invalid Token", 404 "Not found", 400 with the field). Stricter than
//! Linode so that a client bug fails here: a name that repeats the domain is refused (Linode
//! would make `www.example.com.example.com`).
//!
//! TXT records under `_acme-challenge.` are mirrored into pebble-challtestsrv when asked.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::{json, Value};

use crate::http_stand_in::{self, json_response, serve_api};

/// Paging: default, smallest and largest `page_size`.
const PAGE_SIZE: (usize, usize, usize) = (25, 25, 500);
/// The TTLs Linode keeps (others are rounded up to the next; 0 is the domain's default).
const TTLS: [u64; 15] = [
    0, 30, 120, 300, 3600, 7200, 14400, 28800, 57600, 86400, 172800, 345600, 604800, 1209600,
    2419200,
];

/// One stored record.
#[derive(Clone, Debug, PartialEq)]
pub struct LinodeRecord {
    /// Its id.
    pub id: u64,
    /// Its domain's id.
    pub domain_id: u64,
    /// Its domain's name.
    pub domain: String,
    /// `A`, `AAAA`, `CNAME`, `TXT`, `CAA`.
    pub rtype: String,
    /// Relative name, empty for the apex.
    pub name: String,
    /// Its value.
    pub target: String,
    /// Its TTL, as kept.
    pub ttl_sec: u64,
    /// CAA tag.
    pub tag: Option<String>,
}

impl LinodeRecord {
    fn json(&self) -> Value {
        json!({
            "id": self.id, "type": self.rtype, "name": self.name, "target": self.target,
            "priority": 0, "weight": 0, "port": 0, "service": null, "protocol": null,
            "ttl_sec": self.ttl_sec, "tag": self.tag,
            "created": "2026-01-01T00:00:00", "updated": "2026-01-01T00:00:00",
        })
    }

    /// Its full name.
    pub fn fqdn(&self) -> String {
        match self.name.as_str() {
            "" => self.domain.clone(),
            n => format!("{n}.{}", self.domain),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    domains: Vec<(u64, String)>,
    records: Vec<LinodeRecord>,
    next_id: u64,
    requests: Vec<String>,
}

/// The stand-in; it stops with the test's runtime.
#[derive(Clone, Debug)]
pub struct LinodeStandIn {
    /// The API base with its version, `http://127.0.0.1:<port>/v4`.
    pub base: String,
    state: Arc<Mutex<State>>,
}

impl LinodeStandIn {
    /// Serve `domains` to `Bearer <token>`; with `challtestsrv` (`http://127.0.0.1:<port>`),
    /// `_acme-challenge.` TXT records are mirrored there.
    pub async fn start(token: &str, domains: &[&str], challtestsrv: Option<String>) -> Self {
        let state = Arc::new(Mutex::new(State {
            domains: domains
                .iter()
                .enumerate()
                .map(|(i, d)| (1_000 + i as u64, (*d).to_owned()))
                .collect(),
            next_id: 5_000_000,
            ..State::default()
        }));
        let addr = serve_api(state.clone(), token, challtestsrv, handle).await;
        Self {
            base: format!("http://{addr}/v4"),
            state,
        }
    }

    /// Every record now.
    pub fn records(&self) -> Vec<LinodeRecord> {
        self.state.lock().unwrap().records.clone()
    }

    /// `METHOD path?query` of each request, in order.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }
}

fn error(status: StatusCode, field: Option<&str>, reason: &str) -> Response<Full<Bytes>> {
    let mut e = json!({"reason": reason});
    if let Some(f) = field {
        e["field"] = f.into();
    }
    json_response(status, json!({"errors": [e]}))
}

/// One page of `items`, as `query` asks.
fn page(items: Vec<Value>, query: &[(String, String)]) -> Value {
    let number = |k: &str| {
        query
            .iter()
            .find(|(q, _)| q == k)
            .and_then(|(_, v)| v.parse::<usize>().ok())
    };
    let size = number("page_size")
        .unwrap_or(PAGE_SIZE.0)
        .clamp(PAGE_SIZE.1, PAGE_SIZE.2);
    let total = items.len();
    let pages = total.div_ceil(size).max(1);
    let page = number("page").unwrap_or(1).clamp(1, pages);
    let data: Vec<Value> = items
        .into_iter()
        .skip((page - 1) * size)
        .take(size)
        .collect();
    json!({"data": data, "page": page, "pages": pages, "results": total})
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<Mutex<State>>,
    token: String,
    mirror: Option<String>,
) -> Response<Full<Bytes>> {
    let http_stand_in::Taken {
        method,
        path,
        query,
        bearer: authorized,
        body,
    } = http_stand_in::take(req, &token).await;
    state
        .lock()
        .unwrap()
        .requests
        .push(format!("{method} {path}?{}", req_query(&query)));
    if !authorized {
        return error(StatusCode::UNAUTHORIZED, None, "Invalid Token");
    }
    let (resp, changed) = route(&state, method, &path, &query, &body);
    if let Some(record) = changed {
        mirror_txt(&state, mirror, &record).await;
    }
    resp
}

fn req_query(query: &[(String, String)]) -> String {
    query
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// The answer to one authorized request, and the record it created or deleted.
fn route(
    state: &Mutex<State>,
    method: Method,
    path: &str,
    query: &[(String, String)],
    body: &[u8],
) -> (Response<Full<Bytes>>, Option<LinodeRecord>) {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let not_found = || error(StatusCode::NOT_FOUND, None, "Not found");
    let mut s = state.lock().unwrap();
    let domain = |s: &State, id: &str| s.domains.iter().find(|(i, _)| i.to_string() == id).cloned();
    match (method, parts.as_slice()) {
        (Method::GET, ["v4", "domains"]) => {
            let items = s
                .domains
                .iter()
                .map(|(id, d)| json!({"id": id, "domain": d, "type": "master", "status": "active", "ttl_sec": 0}))
                .collect();
            (json_response(StatusCode::OK, page(items, query)), None)
        }
        (Method::GET, ["v4", "domains", id, "records"]) => {
            let Some((id, _)) = domain(&s, id) else {
                return (not_found(), None);
            };
            let items = s
                .records
                .iter()
                .filter(|r| r.domain_id == id)
                .map(LinodeRecord::json)
                .collect();
            (json_response(StatusCode::OK, page(items, query)), None)
        }
        (Method::POST, ["v4", "domains", id, "records"]) => {
            let Some((domain_id, domain)) = domain(&s, id) else {
                return (not_found(), None);
            };
            let Ok(v) = serde_json::from_slice::<Value>(body) else {
                return (error(StatusCode::BAD_REQUEST, None, "Invalid JSON"), None);
            };
            let bad = |field: &str, reason: &str| {
                (error(StatusCode::BAD_REQUEST, Some(field), reason), None)
            };
            let rtype = v["type"].as_str().unwrap_or_default().to_owned();
            if !["A", "AAAA", "CNAME", "TXT", "CAA"].contains(&rtype.as_str()) {
                return bad("type", "type is not a supported record type");
            }
            let name = v["name"].as_str().unwrap_or_default().to_ascii_lowercase();
            if name == domain || name.ends_with(&format!(".{domain}")) || name.ends_with('.') {
                return bad("name", "name must be relative to the domain");
            }
            let target = v["target"].as_str().unwrap_or_default().to_owned();
            if target.is_empty() {
                return bad("target", "target is required");
            }
            let tag = v["tag"].as_str().map(str::to_owned);
            if rtype == "CAA" && !matches!(tag.as_deref(), Some("issue" | "issuewild" | "iodef")) {
                return bad("tag", "tag must be issue, issuewild or iodef");
            }
            let asked = v["ttl_sec"].as_u64().unwrap_or(0);
            let ttl_sec = TTLS
                .iter()
                .copied()
                .find(|t| *t >= asked)
                .unwrap_or(2_419_200);
            let record = LinodeRecord {
                id: s.next_id,
                domain_id,
                domain,
                rtype,
                name,
                target,
                ttl_sec,
                tag,
            };
            s.next_id += 1;
            s.records.push(record.clone());
            (json_response(StatusCode::OK, record.json()), Some(record))
        }
        (Method::DELETE, ["v4", "domains", id, "records", rid]) => {
            let Some(at) = s
                .records
                .iter()
                .position(|r| r.domain_id.to_string() == *id && r.id.to_string() == *rid)
            else {
                return (not_found(), None);
            };
            let record = s.records.remove(at);
            (json_response(StatusCode::OK, json!({})), Some(record))
        }
        _ => (not_found(), None),
    }
}

/// challtestsrv's TXT values at `record`'s name made what is stored there.
async fn mirror_txt(state: &Mutex<State>, mirror: Option<String>, record: &LinodeRecord) {
    let Some(base) = mirror else { return };
    if record.rtype != "TXT" || !record.name.starts_with("_acme-challenge") {
        return;
    }
    let host = format!("{}.", record.fqdn());
    let values: Vec<String> = state
        .lock()
        .unwrap()
        .records
        .iter()
        .filter(|r| r.rtype == "TXT" && r.fqdn() == record.fqdn())
        .map(|r| r.target.clone())
        .collect();
    http_stand_in::mirror_txt(base, host, values).await;
}
