//! A stand-in for Cloudflare's v4 API (zones and DNS records), served in the test process over
//! plain HTTP on loopback, for DNS-01 tests of a Cloudflare client.
//!
//! It follows the documented protocol where clients depend on it: the
//! `{"success","errors","messages","result"}` envelope, bearer-token authentication, real paging
//! with `result_info`, exact case-insensitive `name` filters, and the error codes clients branch
//! on (10000 authentication, 7003 unknown zone, 81044 unknown record, 81053/81054 CNAME
//! conflicts, 81058 identical record, 9005 bad IPv4 address, 9004 not proxiable). Other
//! validation failures are 400 with code 1004 and a message saying what was wrong. Two choices
//! are stricter than Cloudflare, so that a client bug fails here instead of being fixed up:
//! a record name outside the zone is rejected (Cloudflare appends the zone to it), and only
//! A, AAAA, CNAME, TXT and CAA records exist.
//!
//! TXT records under `_acme-challenge.` can be mirrored into pebble-challtestsrv, so that
//! pebble (resolving through challtestsrv) sees what the client published. challtestsrv's
//! `/set-txt` *adds* a value (even one it already has) and `/clear-txt` removes every value of
//! the name, so each change clears the name and sets again whatever TXT values remain there.
//!
//! The server runs on its own thread with a current-thread runtime, so plain `#[test]`s and
//! async tests alike can use it; the controls ([`CloudflareStandIn::requests`],
//! [`CloudflareStandIn::fail_with`], ...) are synchronous.

use std::{
    convert::Infallible,
    net::Ipv4Addr,
    sync::{Arc, Mutex, MutexGuard},
    thread::JoinHandle,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{header, Response};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{json, Map, Value};

use crate::pebble::post_json;

/// The API's path prefix.
pub const PREFIX: &str = "/client/v4";

/// `GET /zones` paging: default, smallest and largest `per_page` (out-of-range values are
/// clamped).
const ZONES_PER_PAGE: (usize, usize, usize) = (20, 5, 50);

/// `GET /zones/{id}/dns_records` paging, likewise.
const RECORDS_PER_PAGE: (usize, usize, usize) = (100, 5, 5_000_000);

/// The record types the stand-in knows.
const TYPES: [&str; 5] = ["A", "AAAA", "CNAME", "TXT", "CAA"];

/// The prefix of names whose TXT records are mirrored into challtestsrv.
const ACME_CHALLENGE: &str = "_acme-challenge.";

/// A request as it arrived.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// `GET`, `POST`, ...
    pub method: String,
    /// Path and query, e.g. `/client/v4/zones?name=example.test`.
    pub path: String,
    /// The `Authorization` header's value, if any.
    pub authorization: Option<String>,
    /// The body parsed as JSON; `Null` when empty, a JSON string holding the text when it is
    /// not JSON.
    pub body: Value,
}

/// The stand-in, stopped on drop; on a panicking thread the requests it saw are printed first.
#[derive(Debug)]
pub struct CloudflareStandIn {
    /// The API base, `http://127.0.0.1:<port>/client/v4`.
    pub base: String,
    shared: Arc<Shared>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl CloudflareStandIn {
    /// Serve `zones` (active, no records) to callers presenting `Authorization: Bearer
    /// <token>`, on a free loopback port. With `challtestsrv_management`
    /// (`http://127.0.0.1:<port>`), `_acme-challenge.` TXT records are mirrored there.
    pub fn start(token: &str, zones: &[&str], challtestsrv_management: Option<String>) -> Self {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .expect("bind the Cloudflare stand-in");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let addr = listener.local_addr().expect("the stand-in's address");
        let shared = Arc::new(Shared {
            token: token.to_owned(),
            mirror: challtestsrv_management,
            state: Mutex::new(State {
                zones: zones
                    .iter()
                    .map(|name| ZoneEntry {
                        id: random_id(),
                        name: name.trim_end_matches('.').to_ascii_lowercase(),
                        created_on: timestamp(),
                    })
                    .collect(),
                ..State::default()
            }),
            mirroring: Mutex::new(()),
        });
        let (shutdown, stop) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("cloudflare-stand-in".to_owned())
            .spawn({
                let shared = shared.clone();
                move || serve(listener, shared, stop)
            })
            .expect("start the stand-in's thread");
        Self {
            base: format!("http://{addr}{PREFIX}"),
            shared,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// The id of zone `name`; panics if it is not served.
    pub fn zone_id(&self, name: &str) -> String {
        self.shared
            .state()
            .zone_by_name(name)
            .map(|z| z.id.clone())
            .unwrap_or_else(|| panic!("the stand-in serves no zone {name}"))
    }

    /// Every request so far, in arrival order (refused ones included).
    pub fn requests(&self) -> Vec<Request> {
        self.shared.state().requests.clone()
    }

    /// The records now stored, as the API shows them, in creation order.
    pub fn records(&self) -> Vec<Value> {
        self.shared
            .state()
            .records
            .iter()
            .map(Record::to_json)
            .collect()
    }

    /// Answer every following request with `status` and a Cloudflare-style error envelope
    /// (403: 10000 "Authentication error"; 429: 971; anything else: 10001), before looking at
    /// the token or the route; `0` goes back to normal.
    pub fn fail_with(&self, status: u16) {
        self.shared.state().fail = status;
    }

    /// Make every following request meet `fault` (`None`: the API again), replacing the one
    /// set before in one step, so no request in between finds the API working.
    pub fn fault(&self, fault: Option<Fault>) {
        let mut state = self.shared.state();
        (state.fail, state.garbage, state.delay, state.cut) = (0, false, Duration::ZERO, false);
        match fault {
            None => {}
            Some(Fault::Status(status)) => state.fail = status,
            Some(Fault::Garbage) => state.garbage = true,
            Some(Fault::Slow(delay)) => state.delay = delay,
            Some(Fault::Unreachable) => state.cut = true,
        }
    }

    /// Store a record of someone else's, as if made in the dashboard: no token, not in
    /// [`CloudflareStandIn::requests`], no conflict checks, but the content must be valid
    /// (a CAA record as `0 issue "ca.example"`). Mirrored like API changes; returns its id.
    pub fn insert(&self, zone: &str, rtype: &str, name: &str, content: &str) -> String {
        let record = {
            let mut state = self.shared.state();
            let zone = state
                .zone_by_name(zone)
                .unwrap_or_else(|| panic!("the stand-in serves no zone {zone}"))
                .clone();
            let body = json!({"type": rtype, "name": name, "content": content});
            let fields = Fields::parse(&zone, &body)
                .unwrap_or_else(|e| panic!("insert {rtype} {name} {content}: {}", e.message));
            let record = Record::new(&zone, fields);
            state.records.push(record.clone());
            record
        };
        mirror(&self.shared, &touched([Some(&record)]));
        record.id
    }
}

impl Drop for CloudflareStandIn {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- Cloudflare stand-in requests ---");
            for r in self.requests() {
                eprintln!("{} {} {}", r.method, r.path, r.body);
            }
        }
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// What the server thread and the controls share.
#[derive(Debug)]
struct Shared {
    token: String,
    // challtestsrv's management API.
    mirror: Option<String>,
    state: Mutex<State>,
    // Held while mirroring, so concurrent changes to one name cannot interleave their
    // clear-then-set sequences.
    mirroring: Mutex<()>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves consistent data: keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How the API fails, for [`CloudflareStandIn::fault`].
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Every request answered with this status and an error envelope, as [`CloudflareStandIn::fail_with`].
    Status(u16),
    /// `200` with an HTML maintenance page, as a proxy in front of the API might answer.
    Garbage,
    /// Every request held this long before its answer.
    Slow(Duration),
    /// Every connection closed unanswered as soon as it is accepted (a kept-alive one at its
    /// next request), as an API that cannot be reached.
    Unreachable,
}

#[derive(Debug, Default)]
struct State {
    zones: Vec<ZoneEntry>,
    records: Vec<Record>,
    requests: Vec<Request>,
    // Status every request gets (0: none).
    fail: u16,
    // Answer `200` with an HTML page instead of the API (a proxy or maintenance page).
    garbage: bool,
    // Hold every request this long first.
    delay: Duration,
    // Close every connection as soon as it is accepted (the API unreachable).
    cut: bool,
}

impl State {
    fn zone_by_name(&self, name: &str) -> Option<&ZoneEntry> {
        let name = name.trim_end_matches('.');
        self.zones
            .iter()
            .find(|z| z.name.eq_ignore_ascii_case(name))
    }
}

#[derive(Debug, Clone)]
struct ZoneEntry {
    id: String,
    name: String,
    created_on: String,
}

impl ZoneEntry {
    fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "name": self.name,
            "status": "active",
            "paused": false,
            "type": "full",
            "development_mode": 0,
            "name_servers": [format!("ns1.{}", self.name)],
            "created_on": self.created_on,
            "modified_on": self.created_on,
        })
    }
}

#[derive(Debug, Clone)]
struct Record {
    id: String,
    zone_id: String,
    zone_name: String,
    fields: Fields,
    created_on: String,
    modified_on: String,
}

impl Record {
    fn new(zone: &ZoneEntry, fields: Fields) -> Self {
        let now = timestamp();
        Self {
            id: random_id(),
            zone_id: zone.id.clone(),
            zone_name: zone.name.clone(),
            fields,
            created_on: now.clone(),
            modified_on: now,
        }
    }

    fn to_json(&self) -> Value {
        let f = &self.fields;
        let mut json = json!({
            "id": self.id,
            "zone_id": self.zone_id,
            "zone_name": self.zone_name,
            "name": f.name,
            "type": f.rtype,
            "content": f.content,
            "proxiable": proxiable(&f.rtype),
            "proxied": f.proxied,
            "ttl": f.ttl,
            "settings": {},
            "meta": {},
            "comment": f.comment,
            "tags": [],
            "created_on": self.created_on,
            "modified_on": self.modified_on,
        });
        if let Some(caa) = &f.caa {
            json["data"] = json!({"flags": caa.flags, "tag": caa.tag, "value": caa.value});
        }
        json
    }

    // The writable fields as a request body would hold them (the base a PATCH merges into).
    fn as_body(&self) -> Map<String, Value> {
        let mut body = Map::new();
        let f = &self.fields;
        body.insert("type".into(), f.rtype.clone().into());
        body.insert("name".into(), f.name.clone().into());
        body.insert("content".into(), f.content.clone().into());
        body.insert("ttl".into(), f.ttl.into());
        body.insert("proxied".into(), f.proxied.into());
        body.insert("comment".into(), f.comment.clone().into());
        if let Some(caa) = &f.caa {
            body.insert(
                "data".into(),
                json!({"flags": caa.flags, "tag": caa.tag, "value": caa.value}),
            );
        }
        body
    }

    fn is_acme_txt(&self) -> bool {
        self.fields.rtype == "TXT" && self.fields.name.starts_with(ACME_CHALLENGE)
    }
}

// A record's validated, normalized writable fields.
#[derive(Debug, Clone, PartialEq)]
struct Fields {
    rtype: String,
    // Lowercase FQDN without the trailing dot.
    name: String,
    // Presentation form; for CAA made from `caa`.
    content: String,
    // Seconds; 1 is "automatic".
    ttl: u64,
    proxied: bool,
    comment: Option<String>,
    caa: Option<Caa>,
}

#[derive(Debug, Clone, PartialEq)]
struct Caa {
    flags: u8,
    tag: String,
    value: String,
}

impl Fields {
    // Check a create/replace body for `zone`.
    fn parse(zone: &ZoneEntry, body: &Value) -> Result<Self, ApiError> {
        let obj = body.as_object().ok_or_else(invalid_body)?;
        let rtype = match obj.get("type") {
            Some(Value::String(t)) if TYPES.contains(&t.to_ascii_uppercase().as_str()) => {
                t.to_ascii_uppercase()
            }
            Some(Value::String(t)) => {
                return Err(ApiError::validation(format!(
                    "record type {t} is not supported"
                )))
            }
            _ => return Err(ApiError::validation("type is required")),
        };
        let name = match obj.get("name") {
            Some(Value::String(n)) => n.trim_end_matches('.').to_ascii_lowercase(),
            _ => return Err(ApiError::validation("name is required")),
        };
        let name = if name == "@" { zone.name.clone() } else { name };
        if name != zone.name && !name.ends_with(&format!(".{}", zone.name)) {
            return Err(ApiError::validation(format!(
                "record name {name} is not in zone {}",
                zone.name
            )));
        }
        let ttl = match obj.get("ttl") {
            None | Some(Value::Null) => 1,
            Some(ttl) => ttl
                .as_u64()
                .filter(|t| *t == 1 || (30..=86400).contains(t))
                .ok_or_else(|| {
                    ApiError::validation(
                        "TTL must be between 30 and 86400 seconds, or 1 for Automatic",
                    )
                })?,
        };
        let proxied = match obj.get("proxied") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(p)) => *p,
            Some(_) => return Err(ApiError::validation("proxied must be a boolean")),
        };
        if proxied && !proxiable(&rtype) {
            return Err(ApiError::bad_request(
                9004,
                "This record type cannot be proxied.",
            ));
        }
        let comment = match obj.get("comment") {
            None | Some(Value::Null) => None,
            Some(Value::String(c)) => Some(c.clone()),
            Some(_) => return Err(ApiError::validation("comment must be a string")),
        };
        let content = obj.get("content").and_then(Value::as_str);
        let (content, caa) = if rtype == "CAA" {
            let caa = match obj.get("data") {
                Some(data) if !data.is_null() => caa_from_data(data)?,
                _ => caa_from_content(content.unwrap_or_default())?,
            };
            let content = format!("{} {} \"{}\"", caa.flags, caa.tag, caa.value);
            (content, Some(caa))
        } else {
            let content = content
                .filter(|c| !c.is_empty())
                .ok_or_else(|| ApiError::validation("content is required"))?;
            match rtype.as_str() {
                "A" if content.parse::<Ipv4Addr>().is_err() => {
                    return Err(ApiError::bad_request(
                        9005,
                        "Content for A record must be a valid IPv4 address.",
                    ))
                }
                "AAAA" if content.parse::<std::net::Ipv6Addr>().is_err() => {
                    return Err(ApiError::validation(
                        "Content for AAAA record must be a valid IPv6 address.",
                    ))
                }
                _ => {}
            }
            (content.to_owned(), None)
        };
        Ok(Self {
            rtype,
            name,
            content,
            ttl,
            proxied,
            comment,
            caa,
        })
    }
}

fn caa_from_data(data: &Value) -> Result<Caa, ApiError> {
    let flags = data["flags"]
        .as_u64()
        .and_then(|f| u8::try_from(f).ok())
        .ok_or_else(|| ApiError::validation("CAA data.flags must be 0 to 255"))?;
    let tag = data["tag"].as_str().unwrap_or_default();
    let value = data["value"]
        .as_str()
        .ok_or_else(|| ApiError::validation("CAA data.value is required"))?;
    caa(flags, tag, value)
}

// `0 issue "ca.example"`.
fn caa_from_content(content: &str) -> Result<Caa, ApiError> {
    let mut parts = content.splitn(3, ' ');
    let (Some(flags), Some(tag), Some(value)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(ApiError::validation("CAA records need data or content"));
    };
    let flags = flags
        .parse()
        .map_err(|_| ApiError::validation("CAA flags must be 0 to 255"))?;
    caa(flags, tag, unquote(value))
}

fn caa(flags: u8, tag: &str, value: &str) -> Result<Caa, ApiError> {
    if !["issue", "issuewild", "iodef"].contains(&tag) {
        return Err(ApiError::validation(format!(
            "CAA tag {tag:?} must be issue, issuewild or iodef"
        )));
    }
    Ok(Caa {
        flags,
        tag: tag.to_owned(),
        value: value.to_owned(),
    })
}

fn proxiable(rtype: &str) -> bool {
    matches!(rtype, "A" | "AAAA" | "CNAME")
}

// One pair of surrounding double quotes removed (TXT content may arrive quoted).
fn unquote(s: &str) -> &str {
    s.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(s)
}

/// An error answer: HTTP status and one entry of `errors`.
#[derive(Debug)]
struct ApiError {
    status: u16,
    code: u32,
    message: String,
    // Further entries after the first (Cloudflare adds 7000 to 7003).
    more: Vec<(u32, &'static str)>,
}

impl ApiError {
    fn new(status: u16, code: u32, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            more: Vec::new(),
        }
    }

    fn bad_request(code: u32, message: impl Into<String>) -> Self {
        Self::new(400, code, message)
    }

    fn validation(message: impl Into<String>) -> Self {
        Self::bad_request(1004, message)
    }

    fn authentication() -> Self {
        Self::new(403, 10000, "Authentication error")
    }

    fn no_route() -> Self {
        Self::new(404, 7000, "No route for that URI")
    }

    // An id in the path that names nothing.
    fn unroutable(route: &str) -> Self {
        let mut e = Self::new(
            404,
            7003,
            format!("Could not route to {route}, perhaps your object identifier is invalid?"),
        );
        e.more.push((7000, "No route for that URI"));
        e
    }

    fn no_record() -> Self {
        Self::new(404, 81044, "Record does not exist.")
    }

    // What `fail_with(status)` answers.
    fn injected(status: u16) -> Self {
        match status {
            401 | 403 => Self::new(status, 10000, "Authentication error"),
            429 => Self::new(
                status,
                971,
                "Please wait and consider throttling your request speed",
            ),
            _ => Self::new(status, 10001, "Internal server error"),
        }
    }

    fn envelope(&self) -> Value {
        let mut errors = vec![json!({"code": self.code, "message": self.message})];
        errors.extend(
            self.more
                .iter()
                .map(|(code, message)| json!({"code": code, "message": message})),
        );
        json!({"success": false, "errors": errors, "messages": [], "result": null})
    }
}

fn invalid_body() -> ApiError {
    ApiError::bad_request(9207, "Request body is invalid.")
}

// A successful answer and the `_acme-challenge.` names whose TXT set it may have changed.
struct Answer {
    body: Value,
    touched: Vec<String>,
}

impl Answer {
    fn result(result: Value) -> Self {
        Self {
            body: json!({"success": true, "errors": [], "messages": [], "result": result}),
            touched: Vec::new(),
        }
    }

    fn list(result: Vec<Value>, info: Value) -> Self {
        let mut answer = Self::result(result.into());
        answer.body["result_info"] = info;
        answer
    }

    fn touching(mut self, touched: Vec<String>) -> Self {
        self.touched = touched;
        self
    }
}

// Accept connections until `stop` fires, each served by hyper's HTTP/1.1.
fn serve(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("the stand-in's runtime");
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        loop {
            let tcp = tokio::select! {
                _ = &mut stop => break,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, _)) => tcp,
                    // Out of descriptors or a connection reset before accept: keep serving.
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
            };
            if shared.state().cut {
                drop(tcp);
                continue;
            }
            let shared = shared.clone();
            tokio::spawn(async move {
                // A kept-alive connection is cut at its next request, unanswered.
                let service = service_fn(move |req| {
                    let shared = shared.clone();
                    async move {
                        if shared.state().cut {
                            return Err(std::io::Error::other("the API is unreachable"));
                        }
                        handle(shared, req).await.map_err(|never| match never {})
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
}

async fn handle(
    shared: Arc<Shared>,
    req: http::Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, bytes) = crate::http_stand_in::parts(req).await;
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    let request = Request {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned()),
        authorization: parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body,
    };
    let (delay, garbage) = {
        let mut state = shared.state();
        state.requests.push(request.clone());
        (state.delay, state.garbage)
    };
    tokio::time::sleep(delay).await;
    if garbage {
        return Ok(Response::builder()
            .status(200)
            .header(header::CONTENT_TYPE, "text/html")
            .body(Full::new(Bytes::from_static(
                b"<html>down for maintenance</html>",
            )))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))));
    }
    let outcome = answer(&shared.token, &mut shared.state(), &request);
    let (status, body) = match outcome {
        Ok(answer) => {
            if !answer.touched.is_empty() {
                // Before answering, so the client sees the change already mirrored.
                let shared = shared.clone();
                let _ = tokio::task::spawn_blocking(move || mirror(&shared, &answer.touched)).await;
            }
            (200, answer.body)
        }
        Err(e) => (e.status, e.envelope()),
    };
    let mut response = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json");
    if status == 429 {
        // As the API's rate limit answers.
        response = response.header(header::RETRY_AFTER, "30");
    }
    let response = response
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())));
    Ok(response)
}

// Authenticate and route one request.
fn answer(token: &str, state: &mut State, req: &Request) -> Result<Answer, ApiError> {
    if state.fail != 0 {
        return Err(ApiError::injected(state.fail));
    }
    if req.authorization.as_deref() != Some(format!("Bearer {token}").as_str()) {
        return Err(ApiError::authentication());
    }
    let (path, query) = req.path.split_once('?').unwrap_or((&req.path, ""));
    let route = path.strip_prefix(PREFIX).ok_or_else(ApiError::no_route)?;
    let query = parse_query(query);
    let segments: Vec<&str> = route.trim_matches('/').split('/').collect();
    match (req.method.as_str(), segments.as_slice()) {
        ("GET", ["zones"]) => Ok(list_zones(state, &query)),
        (method, ["zones", zone_id, rest @ ..]) => {
            let zone = state
                .zones
                .iter()
                .find(|z| z.id == *zone_id)
                .cloned()
                .ok_or_else(|| ApiError::unroutable(route))?;
            match (method, rest) {
                ("GET", []) => Ok(Answer::result(zone.to_json())),
                ("GET", ["dns_records"]) => Ok(list_records(state, &zone, &query)),
                ("POST", ["dns_records"]) => create(state, &zone, &req.body),
                ("GET", ["dns_records", id]) => {
                    let record = state
                        .records
                        .iter()
                        .find(|r| r.id == *id && r.zone_id == zone.id)
                        .ok_or_else(ApiError::no_record)?;
                    Ok(Answer::result(record.to_json()))
                }
                ("PUT", ["dns_records", id]) => update(state, &zone, id, &req.body, false),
                ("PATCH", ["dns_records", id]) => update(state, &zone, id, &req.body, true),
                ("DELETE", ["dns_records", id]) => delete(state, &zone, id),
                _ => Err(ApiError::no_route()),
            }
        }
        _ => Err(ApiError::no_route()),
    }
}

fn list_zones(state: &State, query: &[(String, String)]) -> Answer {
    let name = param(query, "name");
    let status = param(query, "status");
    let zones: Vec<Value> = state
        .zones
        .iter()
        .filter(|z| name.is_none_or(|n| z.name.eq_ignore_ascii_case(n.trim_end_matches('.'))))
        .filter(|_| status.is_none_or(|s| s == "active"))
        .map(ZoneEntry::to_json)
        .collect();
    let (zones, info) = paginate(zones, query, ZONES_PER_PAGE);
    Answer::list(zones, info)
}

fn list_records(state: &State, zone: &ZoneEntry, query: &[(String, String)]) -> Answer {
    let rtype = param(query, "type");
    let name = param(query, "name");
    let content = param(query, "content");
    let records: Vec<Value> = state
        .records
        .iter()
        .filter(|r| r.zone_id == zone.id)
        .filter(|r| rtype.is_none_or(|t| r.fields.rtype.eq_ignore_ascii_case(t)))
        .filter(|r| name.is_none_or(|n| r.fields.name.eq_ignore_ascii_case(n)))
        .filter(|r| content.is_none_or(|c| r.fields.content == c))
        .map(Record::to_json)
        .collect();
    let (records, info) = paginate(records, query, RECORDS_PER_PAGE);
    Answer::list(records, info)
}

fn create(state: &mut State, zone: &ZoneEntry, body: &Value) -> Result<Answer, ApiError> {
    let fields = Fields::parse(zone, body)?;
    check_conflicts(state, zone, &fields, None)?;
    let record = Record::new(zone, fields);
    let answer = Answer::result(record.to_json()).touching(touched([Some(&record)]));
    state.records.push(record);
    Ok(answer)
}

// PUT replaces the writable fields; PATCH (`merge`) changes only those in the body.
fn update(
    state: &mut State,
    zone: &ZoneEntry,
    id: &str,
    body: &Value,
    merge: bool,
) -> Result<Answer, ApiError> {
    let at = state
        .records
        .iter()
        .position(|r| r.id == id && r.zone_id == zone.id)
        .ok_or_else(ApiError::no_record)?;
    let body = if merge {
        let changes = body.as_object().ok_or_else(invalid_body)?;
        let mut merged = state.records[at].as_body();
        // New CAA content without data means the content is the value to use.
        if changes.contains_key("content") && !changes.contains_key("data") {
            merged.remove("data");
        }
        merged.extend(changes.clone());
        Value::Object(merged)
    } else {
        body.clone()
    };
    let fields = Fields::parse(zone, &body)?;
    check_conflicts(state, zone, &fields, Some(id))?;
    let old = state.records[at].clone();
    let record = &mut state.records[at];
    record.fields = fields;
    record.modified_on = timestamp();
    let record = record.clone();
    Ok(Answer::result(record.to_json()).touching(touched([Some(&old), Some(&record)])))
}

fn delete(state: &mut State, zone: &ZoneEntry, id: &str) -> Result<Answer, ApiError> {
    let at = state
        .records
        .iter()
        .position(|r| r.id == id && r.zone_id == zone.id)
        .ok_or_else(ApiError::no_record)?;
    let record = state.records.remove(at);
    Ok(Answer::result(json!({"id": record.id})).touching(touched([Some(&record)])))
}

// Cloudflare refuses a record identical to one at the same name (81058), a CNAME where any
// A, AAAA or CNAME record is (81053), and anything else where a CNAME is (81054).
fn check_conflicts(
    state: &State,
    zone: &ZoneEntry,
    new: &Fields,
    except: Option<&str>,
) -> Result<(), ApiError> {
    let same_name = state
        .records
        .iter()
        .filter(|r| r.zone_id == zone.id && Some(r.id.as_str()) != except)
        .filter(|r| r.fields.name == new.name);
    for other in same_name {
        let f = &other.fields;
        if f.rtype == new.rtype && f.content == new.content {
            return Err(ApiError::bad_request(
                81058,
                "An identical record already exists.",
            ));
        }
        if new.rtype == "CNAME" {
            return Err(ApiError::bad_request(
                81053,
                "An A, AAAA, or CNAME record with that host already exists.",
            ));
        }
        if f.rtype == "CNAME" {
            return Err(ApiError::bad_request(
                81054,
                "A CNAME record with that host already exists.",
            ));
        }
    }
    Ok(())
}

// `_acme-challenge.` names among `records` that are TXT records, once each.
fn touched<'a>(records: impl IntoIterator<Item = Option<&'a Record>>) -> Vec<String> {
    let mut names: Vec<String> = records
        .into_iter()
        .flatten()
        .filter(|r| r.is_acme_txt())
        .map(|r| r.fields.name.clone())
        .collect();
    names.sort();
    names.dedup();
    names
}

// Make challtestsrv's TXT values for each of `names` what the stored records say. Blocking.
fn mirror(shared: &Shared, names: &[String]) {
    let Some(base) = &shared.mirror else { return };
    let _one_at_a_time = shared.mirroring.lock().unwrap_or_else(|e| e.into_inner());
    for name in names {
        let values: Vec<String> = shared
            .state()
            .records
            .iter()
            .filter(|r| r.is_acme_txt() && r.fields.name == *name)
            .map(|r| unquote(&r.fields.content).to_owned())
            .collect();
        let host = format!("{name}.");
        post_to_challtestsrv(base, "/clear-txt", &json!({"host": host}));
        for value in values {
            post_to_challtestsrv(base, "/set-txt", &json!({"host": host, "value": value}));
        }
    }
}

// A failure here breaks the test's DNS, not the client's request: say so where the test's
// output shows it, and let the validation that follows fail.
fn post_to_challtestsrv(base: &str, path: &str, body: &Value) {
    match post_json(base, path, body) {
        Ok(reply) if reply.status == 200 => {}
        Ok(reply) => eprintln!(
            "Cloudflare stand-in: challtestsrv answered {} to POST {path} {body}",
            reply.status
        ),
        Err(e) => eprintln!("Cloudflare stand-in: POST {path} {body} to challtestsrv: {e}"),
    }
}

// One page of `items` as `page` and `per_page` in `query` ask, and its `result_info`.
fn paginate(
    items: Vec<Value>,
    query: &[(String, String)],
    (default, min, max): (usize, usize, usize),
) -> (Vec<Value>, Value) {
    let number = |key| param(query, key).and_then(|v| v.parse::<usize>().ok());
    let per_page = number("per_page").unwrap_or(default).clamp(min, max);
    let page = number("page").unwrap_or(1).max(1);
    let total = items.len();
    let start = (page - 1).saturating_mul(per_page).min(total);
    let end = start.saturating_add(per_page).min(total);
    let items = items[start..end].to_vec();
    let info = json!({
        "page": page,
        "per_page": per_page,
        "count": items.len(),
        "total_count": total,
        "total_pages": total.div_ceil(per_page),
    });
    (items, info)
}

fn param<'a>(query: &'a [(String, String)], key: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

// `a=b&c=d`, percent-decoded (`+` is a space, as in forms).
fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = s
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                if let Some(byte) = hex {
                    out.push(byte);
                    i += 2;
                } else {
                    out.push(b'%');
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

// 32 lowercase hex digits, like Cloudflare's zone and record ids.
fn random_id() -> String {
    use aws_lc_rs::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("random id");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// Now as Cloudflare writes times: `2024-05-01T12:34:56.123456Z`.
fn timestamp() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (year, month, day) = civil_from_days(secs / 86_400);
    let time = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        time / 3600,
        time % 3600 / 60,
        time % 60,
        now.subsec_micros()
    )
}

// Year, month, day of the `days`th day after 1970-01-01 (Howard Hinnant's civil_from_days,
// for days on or after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(19_783), (2024, 3, 1));
    }

    #[test]
    fn paging() {
        let items: Vec<Value> = (0..12).map(Value::from).collect();
        let q = parse_query("page=3&per_page=5");
        let (page, info) = paginate(items, &q, ZONES_PER_PAGE);
        assert_eq!(page, vec![Value::from(10), Value::from(11)]);
        assert_eq!(
            info,
            json!({"page": 3, "per_page": 5, "count": 2, "total_count": 12, "total_pages": 3})
        );
    }

    #[test]
    fn queries() {
        assert_eq!(
            parse_query("name=_acme-challenge%2Ewww.example.test&type=TXT&x"),
            [
                ("name".into(), "_acme-challenge.www.example.test".into()),
                ("type".into(), "TXT".into()),
                ("x".into(), String::new()),
            ]
        );
    }
}
