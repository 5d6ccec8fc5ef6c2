//! A stand-in for DigitalOcean's API v2 domains and records (`/v2/domains`), over plain HTTP on
//! loopback, following the documented protocol where a client depends on it: `Authorization:
//! Bearer <token>`; `page`/`per_page` paging (default 20, at most 200) with `links.pages.next`
//! and `meta.total`; the records filter by `type` and by `name` (the full name); record names
//! relative to the domain, `@` for the apex; `201` with `domain_record` on create, `204` on
//! delete; errors as `{"id", "message"}` (401 `unauthorized`, 404 `not_found`, 422
//! `unprocessable_entity`, 500 `server_error`); a TTL below 30 refused. Stricter than
//! DigitalOcean so that a client bug fails here: a name outside the domain is refused, and a
//! CNAME target must be fully qualified (a trailing dot).
//!
//! TXT records under `_acme-challenge.` are mirrored into pebble-challtestsrv when asked, so
//! pebble (resolving there) sees what the client published.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::{json, Value};

use crate::http_stand_in::{self, json_response, serve_api};

/// Paging: default and largest `per_page`.
const PER_PAGE: (usize, usize) = (20, 200);

/// One stored record (name relative to its domain).
#[derive(Clone, Debug, PartialEq)]
pub struct DoRecord {
    /// Its id.
    pub id: u64,
    /// Its domain.
    pub domain: String,
    /// `A`, `AAAA`, `CNAME`, `TXT`, `CAA`.
    pub rtype: String,
    /// Relative name, `@` for the apex.
    pub name: String,
    /// Its data.
    pub data: String,
    /// Its TTL.
    pub ttl: u64,
    /// CAA flags.
    pub flags: Option<u64>,
    /// CAA tag.
    pub tag: Option<String>,
}

impl DoRecord {
    fn json(&self) -> Value {
        json!({
            "id": self.id, "type": self.rtype, "name": self.name, "data": self.data,
            "priority": null, "port": null, "ttl": self.ttl, "weight": null,
            "flags": self.flags, "tag": self.tag,
        })
    }

    /// Its full name.
    pub fn fqdn(&self) -> String {
        match self.name.as_str() {
            "@" => self.domain.clone(),
            n => format!("{n}.{}", self.domain),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    domains: Vec<String>,
    records: Vec<DoRecord>,
    next_id: u64,
    fail_with: Option<u16>,
    requests: Vec<String>,
}

/// The stand-in; it stops with the test's runtime.
#[derive(Clone, Debug)]
pub struct DigitalOceanStandIn {
    /// The API base without `/v2`, `http://127.0.0.1:<port>`.
    pub base: String,
    state: Arc<Mutex<State>>,
}

impl DigitalOceanStandIn {
    /// Serve `domains` to `Bearer <token>`; with `challtestsrv` (`http://127.0.0.1:<port>`),
    /// `_acme-challenge.` TXT records are mirrored there.
    pub async fn start(token: &str, domains: &[&str], challtestsrv: Option<String>) -> Self {
        let state = Arc::new(Mutex::new(State {
            domains: domains.iter().map(|d| (*d).to_owned()).collect(),
            next_id: 28_448_432,
            ..State::default()
        }));
        let addr = serve_api(state.clone(), token, challtestsrv, handle).await;
        Self {
            base: format!("http://{addr}"),
            state,
        }
    }

    /// Every record now.
    pub fn records(&self) -> Vec<DoRecord> {
        self.state.lock().unwrap().records.clone()
    }

    /// Answer every request with `status` (`server_error`) from now on; `None` stops.
    pub fn fail_with(&self, status: Option<u16>) {
        self.state.lock().unwrap().fail_with = status;
    }

    /// `METHOD path?query` of each request, in order.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }
}

fn error(status: StatusCode, id: &str, message: &str) -> Response<Full<Bytes>> {
    json_response(
        status,
        json!({"id": id, "message": message, "request_id": "standin-1"}),
    )
}

/// One page of `items` under `key`, as `query` asks, with `links` and `meta`.
fn page(items: Vec<Value>, key: &str, path: &str, query: &[(String, String)]) -> Value {
    let number = |k: &str| {
        query
            .iter()
            .find(|(q, _)| q == k)
            .and_then(|(_, v)| v.parse::<usize>().ok())
    };
    let per_page = number("per_page")
        .unwrap_or(PER_PAGE.0)
        .clamp(1, PER_PAGE.1);
    let page = number("page").unwrap_or(1).max(1);
    let total = items.len();
    let last = total.div_ceil(per_page).max(1);
    let shown: Vec<Value> = items
        .into_iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .collect();
    let mut pages = serde_json::Map::new();
    let others: Vec<String> = query
        .iter()
        .filter(|(k, _)| k != "page" && k != "per_page")
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let link = |p: usize| {
        let mut q = others.clone();
        q.push(format!("page={p}"));
        q.push(format!("per_page={per_page}"));
        format!("https://api.digitalocean.com{path}?{}", q.join("&"))
    };
    if page < last {
        pages.insert("next".into(), link(page + 1).into());
        pages.insert("last".into(), link(last).into());
    }
    if page > 1 {
        pages.insert("first".into(), link(1).into());
        pages.insert("prev".into(), link(page - 1).into());
    }
    let links = match pages.is_empty() {
        true => json!({}),
        false => json!({ "pages": pages }),
    };
    json!({ key: shown, "links": links, "meta": {"total": total} })
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
    {
        let mut s = state.lock().unwrap();
        s.requests.push(format!("{method} {path}"));
        if let Some(status) = s.fail_with {
            return error(
                StatusCode::from_u16(status).unwrap(),
                "server_error",
                "Server Error",
            );
        }
    }
    if !authorized {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Unable to authenticate you.",
        );
    }
    let (resp, changed) = route(&state, method, &path, &query, &body);
    if let Some(record) = changed {
        mirror_txt(&state, mirror, &record).await;
    }
    resp
}

/// The answer to one authorized request, and the record it created or deleted.
fn route(
    state: &Mutex<State>,
    method: Method,
    path: &str,
    query: &[(String, String)],
    body: &[u8],
) -> (Response<Full<Bytes>>, Option<DoRecord>) {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let not_found = || {
        error(
            StatusCode::NOT_FOUND,
            "not_found",
            "The resource you were accessing could not be found.",
        )
    };
    let mut s = state.lock().unwrap();
    match (method, parts.as_slice()) {
        (Method::GET, ["v2", "domains"]) => {
            let items = s
                .domains
                .iter()
                .map(|d| json!({"name": d, "ttl": 1800, "zone_file": ""}))
                .collect();
            (
                json_response(StatusCode::OK, page(items, "domains", path, query)),
                None,
            )
        }
        (Method::GET, ["v2", "domains", domain, "records"]) => {
            if !s.domains.iter().any(|d| d == domain) {
                return (not_found(), None);
            }
            let want = |k: &str| query.iter().find(|(q, _)| q == k).map(|(_, v)| v.clone());
            let (rtype, name) = (want("type"), want("name"));
            let items = s
                .records
                .iter()
                .filter(|r| r.domain == *domain)
                .filter(|r| rtype.as_ref().is_none_or(|t| r.rtype == *t))
                .filter(|r| {
                    name.as_ref()
                        .is_none_or(|n| r.fqdn().eq_ignore_ascii_case(n))
                })
                .map(DoRecord::json)
                .collect();
            (
                json_response(StatusCode::OK, page(items, "domain_records", path, query)),
                None,
            )
        }
        (Method::POST, ["v2", "domains", domain, "records"]) => {
            if !s.domains.iter().any(|d| d == domain) {
                return (not_found(), None);
            }
            let v: Value = match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(_) => {
                    return (
                        error(
                            StatusCode::BAD_REQUEST,
                            "bad_request",
                            "Unable to parse request body.",
                        ),
                        None,
                    )
                }
            };
            let unprocessable =
                |m: &str| error(StatusCode::UNPROCESSABLE_ENTITY, "unprocessable_entity", m);
            let rtype = v["type"].as_str().unwrap_or_default().to_owned();
            if !["A", "AAAA", "CNAME", "TXT", "CAA"].contains(&rtype.as_str()) {
                return (unprocessable("Type is not a supported record type."), None);
            }
            // Relative (`www`, `@`); a fully qualified name (trailing dot, as lego sends) must
            // sit in the domain.
            let given = v["name"].as_str().unwrap_or_default().to_ascii_lowercase();
            let name = match given.strip_suffix('.') {
                Some(fqdn) if fqdn == *domain => "@".to_owned(),
                Some(fqdn) => match fqdn.strip_suffix(&format!(".{domain}")) {
                    Some(rel) => rel.to_owned(),
                    None => return (unprocessable("Name is not within the domain."), None),
                },
                None if given.is_empty() => return (unprocessable("Name can't be blank."), None),
                None => given,
            };
            let data = v["data"].as_str().unwrap_or_default().to_owned();
            let ttl = v["ttl"].as_u64().unwrap_or(1800);
            if ttl < 30 {
                return (unprocessable("Ttl must be at least 30 seconds."), None);
            }
            if data.is_empty() {
                return (unprocessable("Data can't be blank."), None);
            }
            if rtype == "CNAME" && (name == "@" || !data.ends_with('.')) {
                return (
                    unprocessable(
                        "CNAME records must be fully qualified and cannot be at the apex.",
                    ),
                    None,
                );
            }
            let (flags, tag) = (v["flags"].as_u64(), v["tag"].as_str().map(str::to_owned));
            if rtype == "CAA" && (flags.is_none() || tag.is_none()) {
                return (
                    unprocessable("Flags and tag are required for CAA records."),
                    None,
                );
            }
            let record = DoRecord {
                id: s.next_id,
                domain: (*domain).to_owned(),
                rtype,
                name,
                data: data.trim_end_matches('.').to_owned(),
                ttl,
                flags,
                tag,
            };
            s.next_id += 1;
            s.records.push(record.clone());
            (
                json_response(StatusCode::CREATED, json!({"domain_record": record.json()})),
                Some(record),
            )
        }
        (Method::DELETE, ["v2", "domains", domain, "records", id]) => {
            let Some(at) = s
                .records
                .iter()
                .position(|r| r.domain == *domain && r.id.to_string() == *id)
            else {
                return (not_found(), None);
            };
            let record = s.records.remove(at);
            (
                json_response(StatusCode::NO_CONTENT, Value::Null),
                Some(record),
            )
        }
        _ => (not_found(), None),
    }
}

/// challtestsrv's TXT values at `record`'s name made what is stored there.
async fn mirror_txt(state: &Mutex<State>, mirror: Option<String>, record: &DoRecord) {
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
        .map(|r| r.data.clone())
        .collect();
    http_stand_in::mirror_txt(base, host, values).await;
}
