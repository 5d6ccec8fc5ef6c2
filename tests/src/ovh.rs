//! A stand-in for OVHcloud's API (`/1.0`), over plain HTTP on loopback, following the
//! documented protocol where a client depends on it:
//!
//! - `GET /1.0/auth/time` (unsigned) answers the server's clock, set here five minutes ahead
//!   of the machine's, so a client that signs with its own clock fails (`Invalid timestamp`);
//! - signed calls: `X-Ovh-Application`, `X-Ovh-Consumer`, `X-Ovh-Timestamp`, `X-Ovh-Signature`
//!   (`$1$` + SHA-1 of secret, consumer key, method, full URL, body, timestamp) checked; an
//!   unknown application key is 403 `This application key is invalid`, an unknown consumer
//!   key 403 `This credential does not exist`, a wrong signature 400 `Invalid signature`;
//! - OAuth2: `POST /auth/oauth2/token` (client credentials, HTTP Basic, scope `all`), then
//!   `Authorization: Bearer`;
//! - `/domain/zone`, `/domain/zone/{zone}/record?fieldType=&subDomain=` (ids above 2^32),
//!   `/record/{id}`, `POST /record` (TXT targets quoted as OVH does since 2025; a CNAME target
//!   without a trailing dot is taken as relative and gets the zone appended), `DELETE
//!   /record/{id}` (404 when unknown), `POST /domain/zone/{zone}/refresh`, which publishes.
//!
//! Only published TXT values under `_acme-challenge.` are mirrored into pebble-challtestsrv.

use std::{
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::{json, Value};

use crate::http_stand_in::{self, json_response};

/// The server's clock runs this far ahead.
const SKEW: i64 = 300;

/// One record.
#[derive(Clone, Debug, PartialEq)]
pub struct OvhRecord {
    /// Its id.
    pub id: u64,
    /// Its zone.
    pub zone: String,
    /// Relative name, empty for the apex.
    pub sub_domain: String,
    /// `TXT`, `CNAME`, ...
    pub field_type: String,
    /// Its target, as OVH keeps it.
    pub target: String,
    /// TTL.
    pub ttl: u64,
}

impl OvhRecord {
    fn json(&self) -> Value {
        json!({"id": self.id, "zone": self.zone, "subDomain": self.sub_domain, "fieldType": self.field_type, "target": self.target, "ttl": self.ttl})
    }
}

#[derive(Debug, Default)]
struct State {
    zones: Vec<String>,
    records: Vec<OvhRecord>,
    next_id: u64,
    refreshes: usize,
    tokens: Vec<String>,
    grants: usize,
    requests: Vec<String>,
}

#[derive(Clone)]
struct Keys {
    application: (String, String),
    consumer: String,
    client: (String, String),
    mirror: Option<String>,
}

/// The stand-in; it stops with the test's runtime.
#[derive(Clone, Debug)]
pub struct OvhStandIn {
    /// The endpoint URL, `http://127.0.0.1:<port>/1.0`.
    pub endpoint: String,
    /// The OAuth2 token URL.
    pub token_url: String,
    state: Arc<Mutex<State>>,
}

impl OvhStandIn {
    /// `zones` for the application `(key, secret)` with consumer key `consumer`, and for the
    /// OAuth2 client `(id, secret)`.
    pub async fn start(
        application: (&str, &str),
        consumer: &str,
        client: (&str, &str),
        zones: &[&str],
        challtestsrv: Option<String>,
    ) -> Self {
        let state = Arc::new(Mutex::new(State {
            zones: zones.iter().map(|z| (*z).to_owned()).collect(),
            next_id: 5_390_000_000,
            ..State::default()
        }));
        let keys = Keys {
            application: (application.0.into(), application.1.into()),
            consumer: consumer.into(),
            client: (client.0.into(), client.1.into()),
            mirror: challtestsrv,
        };
        let shared = state.clone();
        let addr = http_stand_in::serve(move |req| handle(req, shared.clone(), keys.clone())).await;
        Self {
            endpoint: format!("http://{addr}/1.0"),
            token_url: format!("http://{addr}/auth/oauth2/token"),
            state,
        }
    }

    /// Every record now.
    pub fn records(&self) -> Vec<OvhRecord> {
        self.state.lock().unwrap().records.clone()
    }

    /// Put a record in place, as someone else's.
    pub fn add(&self, zone: &str, sub_domain: &str, field_type: &str, target: &str) {
        let mut s = self.state.lock().unwrap();
        s.next_id += 1;
        let id = s.next_id;
        s.records.push(OvhRecord {
            id,
            zone: zone.into(),
            sub_domain: sub_domain.into(),
            field_type: field_type.into(),
            target: target.into(),
            ttl: 3600,
        });
    }

    /// Zone refreshes so far.
    pub fn refreshes(&self) -> usize {
        self.state.lock().unwrap().refreshes
    }

    /// OAuth2 tokens granted so far.
    pub fn grants(&self) -> usize {
        self.state.lock().unwrap().grants
    }

    /// `METHOD path` of each request, in order.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }
}

fn error(status: StatusCode, class: &str, message: &str) -> Response<Full<Bytes>> {
    let mut resp = json_response(status, json!({"class": class, "message": message}));
    resp.headers_mut()
        .insert("x-ovh-queryid", "EU.ext-3.5e77e75e".parse().unwrap());
    resp
}

fn server_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        + SKEW
}

fn sha1_signature(input: &str) -> String {
    let d = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY,
        input.as_bytes(),
    );
    format!(
        "$1${}",
        d.as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

fn decode_basic(value: &str) -> Option<(String, String)> {
    let b64 = value.strip_prefix("Basic ")?;
    let value = |c: u8| -> Option<u32> {
        Some(u32::from(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        }))
    };
    let mut out = Vec::new();
    for chunk in b64.trim_end_matches('=').as_bytes().chunks(4) {
        let mut n = 0;
        for (i, c) in chunk.iter().enumerate() {
            n |= value(*c)? << (18 - 6 * i);
        }
        for i in 0..chunk.len().saturating_sub(1) {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    let text = String::from_utf8(out).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((id.to_owned(), secret.to_owned()))
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<Mutex<State>>,
    keys: Keys,
) -> Response<Full<Bytes>> {
    let (parts, body) = http_stand_in::parts(req).await;
    let path = parts.uri.path().to_owned();
    state
        .lock()
        .unwrap()
        .requests
        .push(format!("{} {path}", parts.method));
    let header = |k: &str| {
        parts
            .headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    if path == "/auth/oauth2/token" && parts.method == Method::POST {
        let form = String::from_utf8_lossy(&body);
        let client = header("authorization").and_then(|v| decode_basic(&v));
        if client != Some(keys.client.clone()) {
            return json_response(
                StatusCode::BAD_REQUEST,
                json!({"error": "invalid_client", "error_description": "ovhcloud oauth2 client does not exists"}),
            );
        }
        if !form.contains("grant_type=client_credentials") || !form.contains("scope=all") {
            return json_response(StatusCode::BAD_REQUEST, json!({"error": "invalid_request"}));
        }
        let mut s = state.lock().unwrap();
        s.grants += 1;
        let token = format!("eyJ.stand-in-{}", s.grants);
        s.tokens.push(token.clone());
        return json_response(
            StatusCode::OK,
            json!({"access_token": token, "token_type": "Bearer", "expires_in": 3600, "scope": "all"}),
        );
    }
    if path == "/1.0/auth/time" {
        return json_response(StatusCode::OK, json!(server_now()));
    }
    // Who calls: a bearer, or a signed call.
    match header("authorization") {
        Some(v) => {
            let known = v
                .strip_prefix("Bearer ")
                .is_some_and(|t| state.lock().unwrap().tokens.iter().any(|k| k == t));
            if !known {
                return error(
                    StatusCode::UNAUTHORIZED,
                    "Client::Unauthorized",
                    "The provided access token is invalid",
                );
            }
        }
        None => {
            if header("x-ovh-application").as_deref() != Some(keys.application.0.as_str()) {
                return error(
                    StatusCode::FORBIDDEN,
                    "Client::Forbidden",
                    "This application key is invalid",
                );
            }
            if header("x-ovh-consumer").as_deref() != Some(keys.consumer.as_str()) {
                return error(
                    StatusCode::FORBIDDEN,
                    "Client::Forbidden",
                    "This credential does not exist",
                );
            }
            let ts: i64 = header("x-ovh-timestamp")
                .and_then(|t| t.parse().ok())
                .unwrap_or(0);
            if (ts - server_now()).abs() > 30 {
                return error(
                    StatusCode::BAD_REQUEST,
                    "Client::BadRequest",
                    "Invalid timestamp",
                );
            }
            let host = header("host").unwrap_or_default();
            let url = format!(
                "http://{host}{}",
                parts.uri.path_and_query().map_or("", |p| p.as_str())
            );
            let expected = sha1_signature(&format!(
                "{}+{}+{}+{url}+{}+{ts}",
                keys.application.1,
                keys.consumer,
                parts.method,
                String::from_utf8_lossy(&body)
            ));
            if header("x-ovh-signature").as_deref() != Some(expected.as_str()) {
                return error(
                    StatusCode::BAD_REQUEST,
                    "Client::BadRequest",
                    "Invalid signature",
                );
            }
        }
    }
    let query = http_stand_in::query_pairs(&parts.uri);
    let (resp, published) = route(&state, &parts.method, &path, &query, &body);
    if let (Some(base), Some(txts)) = (keys.mirror, published) {
        for (name, values) in txts {
            http_stand_in::mirror_txt(base.clone(), name, values).await;
        }
    }
    resp
}

type Published = Option<Vec<(String, Vec<String>)>>;

fn route(
    state: &Mutex<State>,
    method: &Method,
    path: &str,
    query: &[(String, String)],
    body: &[u8],
) -> (Response<Full<Bytes>>, Published) {
    let mut s = state.lock().unwrap();
    let parts: Vec<&str> = path.trim_start_matches("/1.0/").split('/').collect();
    let want = |k: &str| {
        query
            .iter()
            .find(|(q, _)| q == k)
            .map(|(_, v)| v.replace("%2A", "*"))
    };
    let no_zone = || {
        error(
            StatusCode::NOT_FOUND,
            "Client::NotFound",
            "This service does not exist",
        )
    };
    match (method, parts.as_slice()) {
        (&Method::GET, ["domain", "zone"]) => (json_response(StatusCode::OK, json!(s.zones)), None),
        (_, ["domain", "zone", zone, ..]) if !s.zones.iter().any(|z| z == zone) => {
            (no_zone(), None)
        }
        (&Method::GET, ["domain", "zone", zone, "record"]) => {
            let (ft, sub) = (want("fieldType"), want("subDomain"));
            let ids: Vec<u64> = s
                .records
                .iter()
                .filter(|r| r.zone == *zone)
                .filter(|r| ft.as_ref().is_none_or(|t| r.field_type == *t))
                .filter(|r| sub.as_ref().is_none_or(|d| r.sub_domain == *d))
                .map(|r| r.id)
                .collect();
            (json_response(StatusCode::OK, json!(ids)), None)
        }
        (&Method::GET, ["domain", "zone", zone, "record", id]) => {
            match s
                .records
                .iter()
                .find(|r| r.zone == *zone && r.id.to_string() == *id)
            {
                Some(r) => (json_response(StatusCode::OK, r.json()), None),
                None => (
                    error(
                        StatusCode::NOT_FOUND,
                        "Client::NotFound",
                        &format!("The requested object (id = {id}) does not exist"),
                    ),
                    None,
                ),
            }
        }
        (&Method::POST, ["domain", "zone", zone, "record"]) => {
            let v: Value = serde_json::from_slice(body).unwrap_or_default();
            let (Some(ft), Some(target)) = (v["fieldType"].as_str(), v["target"].as_str()) else {
                return (
                    error(
                        StatusCode::BAD_REQUEST,
                        "Client::BadRequest",
                        "Missing parameter(s): fieldType, target",
                    ),
                    None,
                );
            };
            let ttl = v["ttl"].as_u64().unwrap_or(0);
            if ttl != 0 && ttl < 60 {
                return (
                    error(
                        StatusCode::BAD_REQUEST,
                        "Client::BadRequest",
                        "Invalid TTL: must be 0 or at least 60",
                    ),
                    None,
                );
            }
            let target = match ft {
                "TXT" if !target.starts_with('"') => format!("\"{target}\""),
                "CNAME" if !target.ends_with('.') => format!("{target}.{zone}."),
                _ => target.to_owned(),
            };
            s.next_id += 1;
            let record = OvhRecord {
                id: s.next_id,
                zone: (*zone).to_owned(),
                sub_domain: v["subDomain"].as_str().unwrap_or_default().to_owned(),
                field_type: ft.to_owned(),
                target,
                ttl,
            };
            s.records.push(record.clone());
            (json_response(StatusCode::OK, record.json()), None)
        }
        (&Method::DELETE, ["domain", "zone", zone, "record", id]) => {
            match s
                .records
                .iter()
                .position(|r| r.zone == *zone && r.id.to_string() == *id)
            {
                Some(i) => {
                    s.records.remove(i);
                    (json_response(StatusCode::OK, Value::Null), None)
                }
                None => (
                    error(
                        StatusCode::NOT_FOUND,
                        "Client::NotFound",
                        &format!("The requested object (id = {id}) does not exist"),
                    ),
                    None,
                ),
            }
        }
        (&Method::POST, ["domain", "zone", zone, "refresh"]) => {
            s.refreshes += 1;
            // Published: every challenge name of the zone as it now is.
            let mut names: Vec<String> = s
                .records
                .iter()
                .filter(|r| {
                    r.zone == *zone
                        && r.field_type == "TXT"
                        && r.sub_domain.starts_with("_acme-challenge")
                })
                .map(|r| r.sub_domain.clone())
                .collect();
            names.push("_acme-challenge".into());
            names.sort();
            names.dedup();
            let published = names
                .into_iter()
                .map(|sub| {
                    let values = s
                        .records
                        .iter()
                        .filter(|r| r.zone == *zone && r.field_type == "TXT" && r.sub_domain == sub)
                        .map(|r| r.target.trim_matches('"').to_owned())
                        .collect();
                    (format!("{sub}.{zone}."), values)
                })
                .collect();
            (json_response(StatusCode::OK, Value::Null), Some(published))
        }
        _ => (
            error(
                StatusCode::NOT_FOUND,
                "Client::NotFound",
                &format!("Got an invalid (or empty) URL: {path}"),
            ),
            None,
        ),
    }
}
