//! A stand-in for Hetzner's DNS in the Hetzner Cloud API (`/v1/zones`, record sets and
//! actions), over plain HTTP on loopback, following the documented protocol where a client
//! depends on it: `Authorization: Bearer <token>`; `page`/`per_page` paging (default 25, at most
//! 100) with `meta.pagination`; record sets named relative to the zone (`@` the apex) with id
//! `name/TYPE`; values added and removed by actions (`add_records`, `remove_records`) that
//! report `running` when started and `success` when looked at again (`GET /v1/actions/{id}`),
//! so a client must poll; TXT values as quoted strings; errors as `{"error": {"code",
//! "message", "details"}}` (401 `unauthorized`, 404 `not_found`, 400 `invalid_input`).
//! Stricter than Hetzner so that a client bug fails here: a name that repeats the zone is
//! refused, and a CNAME value must be fully qualified.
//!
//! TXT values under `_acme-challenge.` are mirrored into pebble-challtestsrv when asked.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::{json, Value};

use crate::http_stand_in::{self, json_response, serve_api};

/// Paging: default and largest `per_page`.
const PER_PAGE: (usize, usize) = (25, 100);

/// One record set.
#[derive(Clone, Debug, PartialEq)]
pub struct RrSet {
    /// Its zone's id.
    pub zone: u64,
    /// Its zone's name.
    pub zone_name: String,
    /// Relative name, `@` the apex.
    pub name: String,
    /// `TXT`, `CNAME`, ...
    pub rtype: String,
    /// Its TTL.
    pub ttl: Option<u64>,
    /// Its values, as sent.
    pub values: Vec<String>,
}

impl RrSet {
    fn json(&self) -> Value {
        json!({
            "id": format!("{}/{}", self.name, self.rtype), "name": self.name, "type": self.rtype,
            "ttl": self.ttl, "zone": self.zone, "labels": {}, "protection": {"change": false},
            "records": self.values.iter().map(|v| json!({"value": v, "comment": ""})).collect::<Vec<_>>(),
        })
    }

    /// Its full name.
    pub fn fqdn(&self) -> String {
        match self.name.as_str() {
            "@" => self.zone_name.clone(),
            n => format!("{n}.{}", self.zone_name),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    zones: Vec<(u64, String)>,
    sets: Vec<RrSet>,
    actions: Vec<(u64, &'static str)>,
    next_action: u64,
    requests: Vec<String>,
}

/// The stand-in; it stops with the test's runtime.
#[derive(Clone, Debug)]
pub struct HetznerStandIn {
    /// The API base with its version, `http://127.0.0.1:<port>/v1`.
    pub base: String,
    state: Arc<Mutex<State>>,
}

impl HetznerStandIn {
    /// Serve `zones` to `Bearer <token>`; with `challtestsrv` (`http://127.0.0.1:<port>`),
    /// `_acme-challenge.` TXT values are mirrored there.
    pub async fn start(token: &str, zones: &[&str], challtestsrv: Option<String>) -> Self {
        let state = Arc::new(Mutex::new(State {
            zones: zones
                .iter()
                .enumerate()
                .map(|(i, z)| (42 + i as u64, (*z).to_owned()))
                .collect(),
            next_action: 13,
            ..State::default()
        }));
        let addr = serve_api(state.clone(), token, challtestsrv, handle).await;
        Self {
            base: format!("http://{addr}/v1"),
            state,
        }
    }

    /// Every record set now.
    pub fn sets(&self) -> Vec<RrSet> {
        self.state.lock().unwrap().sets.clone()
    }

    /// `METHOD path` of each request, in order.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    json_response(
        status,
        json!({"error": {"code": code, "message": message, "details": {}}}),
    )
}

/// One page of `items` under `key`, as `query` asks, with `meta.pagination`.
fn page(items: Vec<Value>, key: &str, query: &[(String, String)]) -> Value {
    let number = |k: &str| {
        query
            .iter()
            .find(|(q, _)| q == k)
            .and_then(|(_, v)| v.parse::<usize>().ok())
    };
    let per_page = number("per_page")
        .unwrap_or(PER_PAGE.0)
        .clamp(1, PER_PAGE.1);
    let total = items.len();
    let last = total.div_ceil(per_page).max(1);
    let page = number("page").unwrap_or(1).clamp(1, last);
    let shown: Vec<Value> = items
        .into_iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .collect();
    json!({
        key: shown,
        "meta": {"pagination": {
            "page": page, "per_page": per_page,
            "previous_page": if page > 1 { json!(page - 1) } else { Value::Null },
            "next_page": if page < last { json!(page + 1) } else { Value::Null },
            "last_page": last, "total_entries": total,
        }},
    })
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
        .push(format!("{method} {path}"));
    if !authorized {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "unable to authenticate",
        );
    }
    let (resp, changed) = route(&state, method, &path, &query, &body);
    if let (Some(base), Some(set)) = (mirror, changed) {
        if set.rtype == "TXT" && set.name.starts_with("_acme-challenge") {
            let values = set
                .values
                .iter()
                .map(|v| v.trim_matches('"').to_owned())
                .collect();
            http_stand_in::mirror_txt(base, format!("{}.", set.fqdn()), values).await;
        }
    }
    resp
}

/// The answer to one authorized request, and the record set it changed (as it is now).
fn route(
    state: &Mutex<State>,
    method: Method,
    path: &str,
    query: &[(String, String)],
    body: &[u8],
) -> (Response<Full<Bytes>>, Option<RrSet>) {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let not_found = || error(StatusCode::NOT_FOUND, "not_found", "resource not found");
    let mut s = state.lock().unwrap();
    let zone_of = |s: &State, id: &str| {
        s.zones
            .iter()
            .find(|(i, n)| i.to_string() == id || n == id)
            .cloned()
    };
    let want = |k: &str| query.iter().find(|(q, _)| q == k).map(|(_, v)| v.clone());
    match (method, parts.as_slice()) {
        (Method::GET, ["v1", "zones"]) => {
            let items = s
                .zones
                .iter()
                .map(|(id, name)| json!({"id": id, "name": name, "ttl": 3600, "mode": "primary", "status": "ok"}))
                .collect();
            (
                json_response(StatusCode::OK, page(items, "zones", query)),
                None,
            )
        }
        (Method::GET, ["v1", "zones", zone, "rrsets"]) => {
            let Some((zone, _)) = zone_of(&s, zone) else {
                return (not_found(), None);
            };
            let (name, rtype) = (want("name"), want("type"));
            let items = s
                .sets
                .iter()
                .filter(|r| r.zone == zone)
                .filter(|r| name.as_ref().is_none_or(|n| r.name == *n))
                .filter(|r| rtype.as_ref().is_none_or(|t| r.rtype == *t))
                .map(RrSet::json)
                .collect();
            (
                json_response(StatusCode::OK, page(items, "rrsets", query)),
                None,
            )
        }
        (Method::GET, ["v1", "actions", id]) => {
            match s.actions.iter().find(|(a, _)| a.to_string() == *id) {
                Some((id, command)) => (
                    json_response(
                        StatusCode::OK,
                        json!({"action": {"id": id, "command": command, "status": "success", "progress": 100, "error": null}}),
                    ),
                    None,
                ),
                None => (not_found(), None),
            }
        }
        (Method::POST, ["v1", "zones", zone, "rrsets", name, rtype, "actions", action]) => {
            let Some((zone, zone_name)) = zone_of(&s, zone) else {
                return (not_found(), None);
            };
            let Ok(v) = serde_json::from_slice::<Value>(body) else {
                return (
                    error(StatusCode::BAD_REQUEST, "invalid_input", "invalid JSON"),
                    None,
                );
            };
            let invalid = |m: &str| (error(StatusCode::BAD_REQUEST, "invalid_input", m), None);
            if *name == zone_name || name.ends_with(&format!(".{zone_name}")) {
                return invalid("record set names are relative to the zone");
            }
            let values: Vec<String> = v["records"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r["value"].as_str().map(str::to_owned))
                .collect();
            if values.is_empty() {
                return invalid("records must not be empty");
            }
            for value in &values {
                if *rtype == "TXT" && !http_stand_in::quoted_strings(value) {
                    return invalid("TXT values are quoted strings of at most 255 characters");
                }
                if *rtype == "CNAME" && !value.ends_with('.') {
                    return invalid("CNAME values are fully qualified");
                }
            }
            let at = s
                .sets
                .iter()
                .position(|r| r.zone == zone && r.name == *name && r.rtype == *rtype);
            let command = match (*action, at) {
                ("add_records", Some(i)) => {
                    for value in values {
                        if !s.sets[i].values.contains(&value) {
                            s.sets[i].values.push(value);
                        }
                    }
                    "add_rrset_records"
                }
                ("add_records", None) => {
                    s.sets.push(RrSet {
                        zone,
                        zone_name,
                        name: (*name).to_owned(),
                        rtype: (*rtype).to_owned(),
                        ttl: v["ttl"].as_u64(),
                        values,
                    });
                    "add_rrset_records"
                }
                ("remove_records", Some(i)) => {
                    s.sets[i].values.retain(|x| !values.contains(x));
                    "remove_rrset_records"
                }
                _ => return (not_found(), None),
            };
            let changed = s
                .sets
                .iter()
                .find(|r| r.zone == zone && r.name == *name && r.rtype == *rtype)
                .cloned();
            s.sets.retain(|r| !r.values.is_empty());
            let id = s.next_action;
            s.next_action += 1;
            s.actions.push((id, command));
            (
                json_response(
                    StatusCode::CREATED,
                    json!({"action": {"id": id, "command": command, "status": "running", "progress": 0,
                        "resources": [{"id": zone, "type": "zone"}], "error": null}}),
                ),
                changed,
            )
        }
        _ => (not_found(), None),
    }
}
