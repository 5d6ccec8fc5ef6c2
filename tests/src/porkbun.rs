//! A stand-in for Porkbun's API v3 (`/api/json/v3`), over plain HTTP on loopback, following the
//! documented protocol where a client depends on it: every call a `POST` whose JSON body
//! carries `apikey` and `secretapikey`; `{"status": "SUCCESS", ...}` or `{"status": "ERROR",
//! "message"}` with HTTP 400 (as recorded answers show); `/domain/listAll` a thousand domains from `start`;
//! records by `/dns/retrieveByNameType/{domain}/{type}/{subdomain}` with `name` the full name,
//! `ttl` and `id` as strings; `/dns/create/{domain}` with `name` the subdomain (empty for the
//! apex) answering the new `id`; `/dns/delete/{domain}/{id}`; a TTL below 600 refused. Stricter
//! than Porkbun so that a client bug fails here: a subdomain that repeats the domain is
//! refused.
//!
//! TXT records under `_acme-challenge.` are mirrored into pebble-challtestsrv when asked.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::{json, Value};

use crate::http_stand_in::{self, json_response, serve_api};

/// Domains per `listAll` answer.
const LIST_PAGE: usize = 1000;

/// One stored record.
#[derive(Clone, Debug, PartialEq)]
pub struct PorkbunRecord {
    /// Its id.
    pub id: u64,
    /// Its domain.
    pub domain: String,
    /// Its full name.
    pub name: String,
    /// `TXT`, `CNAME`, ...
    pub rtype: String,
    /// Its content.
    pub content: String,
    /// Its TTL.
    pub ttl: u64,
}

impl PorkbunRecord {
    fn json(&self) -> Value {
        json!({
            "id": self.id.to_string(), "name": self.name, "type": self.rtype,
            "content": self.content, "ttl": self.ttl.to_string(), "prio": "0", "notes": "",
        })
    }
}

#[derive(Debug, Default)]
struct State {
    domains: Vec<String>,
    records: Vec<PorkbunRecord>,
    next_id: u64,
    requests: Vec<String>,
    /// The next this many requests are refused as Porkbun's front end refuses a burst.
    throttled: usize,
}

/// The stand-in; it stops with the test's runtime.
#[derive(Clone, Debug)]
pub struct PorkbunStandIn {
    /// The API base, `http://127.0.0.1:<port>/api/json/v3`.
    pub base: String,
    state: Arc<Mutex<State>>,
}

impl PorkbunStandIn {
    /// Answer the next `n` requests with Porkbun's 503 page (more than about one a second).
    pub fn throttle(&self, n: usize) {
        self.state.lock().unwrap().throttled = n;
    }

    /// Serve `domains` to the key pair `api_key`:`secret` (given as `api_key:secret`); with
    /// `challtestsrv`, `_acme-challenge.` TXT records are mirrored there.
    pub async fn start(keys: &str, domains: &[&str], challtestsrv: Option<String>) -> Self {
        let state = Arc::new(Mutex::new(State {
            domains: domains.iter().map(|d| (*d).to_owned()).collect(),
            next_id: 106_926_652,
            ..State::default()
        }));
        let addr = serve_api(state.clone(), keys, challtestsrv, handle).await;
        Self {
            base: format!("http://{addr}/api/json/v3"),
            state,
        }
    }

    /// Every record now.
    pub fn records(&self) -> Vec<PorkbunRecord> {
        self.state.lock().unwrap().records.clone()
    }

    /// `path` of each request, in order.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json_response(status, json!({"status": "ERROR", "message": message}))
}

fn success(mut body: Value) -> Response<Full<Bytes>> {
    body["status"] = "SUCCESS".into();
    json_response(StatusCode::OK, body)
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<Mutex<State>>,
    keys: String,
    mirror: Option<String>,
) -> Response<Full<Bytes>> {
    let taken = http_stand_in::take(req, "").await;
    {
        let mut s = state.lock().unwrap();
        s.requests.push(taken.path.clone());
        if s.throttled > 0 {
            s.throttled -= 1;
            let mut resp = Response::new(Full::new(Bytes::from_static(
                b"<html><body><h1>503 Service Temporarily Unavailable</h1></body></html>",
            )));
            *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            return resp;
        }
    }
    if taken.method != Method::POST {
        return error(StatusCode::METHOD_NOT_ALLOWED, "Only POST is accepted.");
    }
    let Ok(body) = serde_json::from_slice::<Value>(&taken.body) else {
        return error(StatusCode::BAD_REQUEST, "Could not parse the JSON body.");
    };
    let given = format!(
        "{}:{}",
        body["apikey"].as_str().unwrap_or_default(),
        body["secretapikey"].as_str().unwrap_or_default()
    );
    if given != keys {
        return error(StatusCode::BAD_REQUEST, "Invalid API key. (001)");
    }
    let (resp, changed) = route(&state, &taken.path, &body);
    if let (Some(base), Some(r)) = (mirror, changed) {
        if r.rtype == "TXT" && r.name.starts_with("_acme-challenge") {
            let values: Vec<String> = state
                .lock()
                .unwrap()
                .records
                .iter()
                .filter(|x| x.rtype == "TXT" && x.name == r.name)
                .map(|x| x.content.clone())
                .collect();
            http_stand_in::mirror_txt(base, format!("{}.", r.name), values).await;
        }
    }
    resp
}

/// The answer to one authenticated call, and the record it created or deleted.
fn route(
    state: &Mutex<State>,
    path: &str,
    body: &Value,
) -> (Response<Full<Bytes>>, Option<PorkbunRecord>) {
    let parts: Vec<&str> = path
        .trim_start_matches("/api/json/v3/")
        .split('/')
        .collect();
    let mut s = state.lock().unwrap();
    let unknown = |d: &str| {
        (
            error(StatusCode::BAD_REQUEST, &format!("Invalid domain {d}.")),
            None,
        )
    };
    match parts.as_slice() {
        ["domain", "listAll"] => {
            let start: usize = body["start"]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let domains: Vec<Value> = s
                .domains
                .iter()
                .skip(start)
                .take(LIST_PAGE)
                .map(|d| json!({"domain": d, "status": "ACTIVE", "tld": d.rsplit('.').next()}))
                .collect();
            (success(json!({"domains": domains})), None)
        }
        ["dns", "retrieveByNameType", domain, rtype, rest @ ..] => {
            if !s.domains.iter().any(|d| d == domain) {
                return unknown(domain);
            }
            let sub = rest.join("/");
            let name = match sub.as_str() {
                "" => (*domain).to_owned(),
                sub => format!("{sub}.{domain}"),
            };
            let records: Vec<Value> = s
                .records
                .iter()
                .filter(|r| r.domain == *domain && r.rtype == *rtype && r.name == name)
                .map(PorkbunRecord::json)
                .collect();
            (success(json!({"records": records})), None)
        }
        ["dns", "create", domain] => {
            if !s.domains.iter().any(|d| d == domain) {
                return unknown(domain);
            }
            let sub = body["name"]
                .as_str()
                .unwrap_or_default()
                .to_ascii_lowercase();
            if sub == *domain || sub.ends_with(&format!(".{domain}")) {
                return (
                    error(
                        StatusCode::BAD_REQUEST,
                        "The name is the subdomain, without the domain.",
                    ),
                    None,
                );
            }
            let rtype = body["type"].as_str().unwrap_or_default().to_owned();
            if !["A", "AAAA", "CNAME", "TXT", "CAA"].contains(&rtype.as_str()) {
                return (error(StatusCode::BAD_REQUEST, "Invalid type."), None);
            }
            let ttl: u64 = body["ttl"]
                .as_str()
                .and_then(|t| t.parse().ok())
                .unwrap_or(600);
            if ttl < 600 {
                return (
                    error(
                        StatusCode::BAD_REQUEST,
                        "The TTL must be at least 600 seconds.",
                    ),
                    None,
                );
            }
            let content = body["content"].as_str().unwrap_or_default().to_owned();
            if content.is_empty() {
                return (error(StatusCode::BAD_REQUEST, "Content is required."), None);
            }
            let record = PorkbunRecord {
                id: s.next_id,
                domain: (*domain).to_owned(),
                name: match sub.as_str() {
                    "" => (*domain).to_owned(),
                    sub => format!("{sub}.{domain}"),
                },
                rtype,
                content,
                ttl,
            };
            s.next_id += 1;
            s.records.push(record.clone());
            (success(json!({"id": record.id})), Some(record))
        }
        ["dns", "delete", domain, id] => {
            let Some(at) = s
                .records
                .iter()
                .position(|r| r.domain == *domain && r.id.to_string() == *id)
            else {
                return (error(StatusCode::BAD_REQUEST, "Invalid record id."), None);
            };
            let record = s.records.remove(at);
            (success(json!({})), Some(record))
        }
        _ => (error(StatusCode::NOT_FOUND, "Invalid endpoint."), None),
    }
}
