//! A stand-in for Google Cloud DNS (API v1) and Google's OAuth token endpoint, over plain HTTP
//! on loopback, following the documented protocol where a client depends on it:
//!
//! - `POST /token` takes the JWT-bearer grant: the assertion's RS256 signature checked with the
//!   service account's public key, `kid`, `iss`, `aud` (this endpoint), the Cloud DNS scope and
//!   a lifetime of at most an hour; an access token for an hour, else
//!   `{"error": "invalid_grant", "error_description"}`;
//! - `/dns/v1/projects/{project}/managedZones` paged by `pageToken` (50 a page), public and
//!   private zones; `managedZones/{zone}`; `.../rrsets?name=&type=`; `POST .../changes` applied
//!   atomically: each deletion must match the set exactly (412 `conditionNotMet`), an
//!   addition of a set that stays is 409 `alreadyExists`; a change is `pending` until looked
//!   at (`GET .../changes/{id}`), then `done`;
//! - a missing or unknown token is 401, errors as `{"error": {"code", "message", "errors":
//!   [{"domain", "reason"}]}}`.
//!
//! [`service_account`] makes a real RSA key (Debian's openssl) and its key file.
//! TXT values under `_acme-challenge.` are mirrored into pebble-challtestsrv when asked.

use std::{
    path::Path,
    process::Command,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::{json, Value};

use crate::http_stand_in::{self, json_response};

/// Zones a page.
const PAGE: usize = 50;

/// One record set.
#[derive(Clone, Debug, PartialEq)]
pub struct RrSet {
    /// Its zone's name.
    pub zone: String,
    /// Its name with the trailing dot.
    pub name: String,
    /// `TXT`, `CNAME`, ...
    pub rtype: String,
    /// TTL.
    pub ttl: u64,
    /// Its values as written (TXT quoted).
    pub rrdatas: Vec<String>,
}

impl RrSet {
    fn json(&self) -> Value {
        json!({"kind": "dns#resourceRecordSet", "name": self.name, "type": self.rtype, "ttl": self.ttl, "rrdatas": self.rrdatas})
    }

    fn read(zone: &str, v: &Value) -> Option<Self> {
        Some(Self {
            zone: zone.to_owned(),
            name: v["name"].as_str()?.to_owned(),
            rtype: v["type"].as_str()?.to_owned(),
            ttl: v["ttl"].as_u64()?,
            rrdatas: v["rrdatas"]
                .as_array()?
                .iter()
                .map(|d| d.as_str().map(str::to_owned))
                .collect::<Option<_>>()?,
        })
    }
}

/// A service account's key file for `token_uri`, with a fresh 2048-bit RSA key made by
/// openssl in `dir`; the key's public half (PKCS#1 DER) beside it.
pub fn service_account(dir: &Path, project: &str, token_uri: &str) -> (String, Vec<u8>) {
    let key = dir.join("gcloud-key.pem");
    let public = dir.join("gcloud-key.pub.der");
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        key.to_str().unwrap(),
    ]);
    run(&[
        "rsa",
        "-in",
        key.to_str().unwrap(),
        "-RSAPublicKey_out",
        "-outform",
        "DER",
        "-out",
        public.to_str().unwrap(),
    ]);
    let json = json!({
        "type": "service_account",
        "project_id": project,
        "private_key_id": "5e77e75e0000",
        "private_key": std::fs::read_to_string(&key).unwrap(),
        "client_email": format!("dns@{project}.iam.gserviceaccount.com"),
        "client_id": "1234567890",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
    });
    (json.to_string(), std::fs::read(&public).unwrap())
}

#[derive(Debug, Default)]
struct State {
    project: String,
    /// (name, dnsName, private).
    zones: Vec<(String, String, bool)>,
    sets: Vec<RrSet>,
    changes: Vec<(String, &'static str)>,
    tokens: Vec<String>,
    grants: usize,
    requests: Vec<String>,
}

#[derive(Clone)]
struct Account {
    public_key: Vec<u8>,
    email: String,
    token_uri: String,
    mirror: Option<String>,
}

/// The stand-in; it stops with the test's runtime.
#[derive(Clone, Debug)]
pub struct GcloudStandIn {
    /// The API root, `http://127.0.0.1:<port>/dns/v1`.
    pub api: String,
    /// The token endpoint.
    pub token_uri: String,
    state: Arc<Mutex<State>>,
}

impl GcloudStandIn {
    /// A project `project` with public `zones` (and a private twin of the first), and the key
    /// file of the service account it accepts (made here, naming this token endpoint).
    pub async fn start(
        dir: &Path,
        project: &str,
        zones: &[&str],
        challtestsrv: Option<String>,
    ) -> (Self, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // The key file names the token endpoint: make it for the address served below.
        let token_uri = format!("http://{addr}/token");
        let (key_file, public_key) = service_account(dir, project, &token_uri);
        let mut all: Vec<(String, String, bool)> = zones
            .iter()
            .map(|z| (z.replace('.', "-"), format!("{z}."), false))
            .collect();
        if let Some(first) = zones.first() {
            all.push(("private-twin".into(), format!("{first}."), true));
        }
        let state = Arc::new(Mutex::new(State {
            project: project.into(),
            zones: all,
            ..State::default()
        }));
        let account = Account {
            public_key,
            email: format!("dns@{project}.iam.gserviceaccount.com"),
            token_uri: token_uri.clone(),
            mirror: challtestsrv,
        };
        let shared = state.clone();
        http_stand_in::serve_listener(listener, move |req| {
            handle(req, shared.clone(), account.clone())
        });
        (
            Self {
                api: format!("http://{addr}/dns/v1"),
                token_uri,
                state,
            },
            key_file,
        )
    }

    /// Every record set now.
    pub fn sets(&self) -> Vec<RrSet> {
        self.state.lock().unwrap().sets.clone()
    }

    /// Put a set in place, as someone else's records.
    pub fn add(&self, set: RrSet) {
        self.state.lock().unwrap().sets.push(set);
    }

    /// Tokens granted so far.
    pub fn grants(&self) -> usize {
        self.state.lock().unwrap().grants
    }

    /// Forget every token granted (as if they expired): the next call gets a 401.
    pub fn revoke_tokens(&self) {
        self.state.lock().unwrap().tokens.clear();
    }

    /// `METHOD path` of each request, in order.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }
}

fn error(status: StatusCode, reason: &str, message: &str) -> Response<Full<Bytes>> {
    json_response(
        status,
        json!({"error": {"code": status.as_u16(), "message": message, "errors": [{"message": message, "domain": "global", "reason": reason}]}}),
    )
}

fn b64(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(u32::from(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        }))
    };
    let mut out = Vec::new();
    for chunk in text.as_bytes().chunks(4) {
        let mut n = 0;
        for (i, c) in chunk.iter().enumerate() {
            n |= value(*c)? << (18 - 6 * i);
        }
        for i in 0..chunk.len().saturating_sub(1) {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    Some(out)
}

fn grant(state: &Mutex<State>, account: &Account, body: &[u8]) -> Response<Full<Bytes>> {
    let invalid = |why: &str| {
        json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": "invalid_grant", "error_description": why}),
        )
    };
    let form: Vec<(String, String)> = String::from_utf8_lossy(body)
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.replace("%3A", ":")))
        .collect();
    let get = |k: &str| form.iter().find(|(f, _)| f == k).map(|(_, v)| v.as_str());
    if get("grant_type") != Some("urn:ietf:params:oauth:grant-type:jwt-bearer") {
        return json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": "unsupported_grant_type", "error_description": "Invalid grant_type"}),
        );
    }
    let Some(jwt) = get("assertion") else {
        return invalid("no assertion");
    };
    let parts: Vec<&str> = jwt.split('.').collect();
    let [h, c, sig] = parts.as_slice() else {
        return invalid("Invalid JWT: not three parts");
    };
    let (Some(header), Some(claims), Some(sig)) = (b64(h), b64(c), b64(sig)) else {
        return invalid("Invalid JWT: not base64url");
    };
    let key = aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256,
        &account.public_key,
    );
    if key.verify(format!("{h}.{c}").as_bytes(), &sig).is_err() {
        return invalid("Invalid JWT Signature.");
    }
    let header: Value = serde_json::from_slice(&header).unwrap_or_default();
    let claims: Value = serde_json::from_slice(&claims).unwrap_or_default();
    if header["alg"] != "RS256" || header["kid"] != "5e77e75e0000" {
        return invalid("Invalid JWT: alg or kid");
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let (iat, exp) = (
        claims["iat"].as_u64().unwrap_or(0),
        claims["exp"].as_u64().unwrap_or(0),
    );
    if claims["iss"] != account.email.as_str()
        || claims["aud"] != account.token_uri.as_str()
        || exp <= now
        || exp.saturating_sub(iat) > 3600
        || iat > now + 60
    {
        return invalid("Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim.");
    }
    let scope = claims["scope"].as_str().unwrap_or_default();
    if !scope.split(' ').any(|s| {
        s == "https://www.googleapis.com/auth/ndev.clouddns.readwrite"
            || s == "https://www.googleapis.com/auth/cloud-platform"
    }) {
        return invalid("Invalid OAuth scope or ID token audience provided.");
    }
    let mut s = state.lock().unwrap();
    s.grants += 1;
    let token = format!("ya29.stand-in-{}", s.grants);
    s.tokens.push(token.clone());
    json_response(
        StatusCode::OK,
        json!({"access_token": token, "expires_in": 3599, "token_type": "Bearer"}),
    )
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<Mutex<State>>,
    account: Account,
) -> Response<Full<Bytes>> {
    let (parts, body) = http_stand_in::parts(req).await;
    let path = parts.uri.path().to_owned();
    state
        .lock()
        .unwrap()
        .requests
        .push(format!("{} {path}", parts.method));
    if parts.method == Method::POST && path == "/token" {
        return grant(&state, &account, &body);
    }
    let authorized = parts
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| state.lock().unwrap().tokens.iter().any(|k| k == t));
    if !authorized {
        return error(
            StatusCode::UNAUTHORIZED,
            "authError",
            "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential.",
        );
    }
    let query = http_stand_in::query_pairs(&parts.uri);
    let (resp, changed) = route(&state, &parts.method, &path, &query, &body);
    if let (Some(base), Some((name, values))) = (account.mirror, changed) {
        if name.starts_with("_acme-challenge.") {
            let values = values
                .iter()
                .map(|v| v.trim_matches('"').to_owned())
                .collect();
            http_stand_in::mirror_txt(base, name, values).await;
        }
    }
    resp
}

type Changed = Option<(String, Vec<String>)>;

fn decode(v: &str) -> String {
    v.replace("%2A", "*").replace("%2a", "*")
}

fn route(
    state: &Mutex<State>,
    method: &Method,
    path: &str,
    query: &[(String, String)],
    body: &[u8],
) -> (Response<Full<Bytes>>, Changed) {
    let mut s = state.lock().unwrap();
    let prefix = format!("/dns/v1/projects/{}/", s.project);
    let Some(rest) = path.strip_prefix(&prefix) else {
        return (error(StatusCode::FORBIDDEN, "forbidden", "Forbidden"), None);
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let want = |k: &str| query.iter().find(|(q, _)| q == k).map(|(_, v)| decode(v));
    let zone_json = |(name, dns, private): &(String, String, bool)| json!({"kind": "dns#managedZone", "name": name, "dnsName": dns, "id": format!("{}", 4_000_000 + name.len()), "visibility": if *private { "private" } else { "public" }, "nameServers": ["ns-cloud-a1.googledomains.com."]});
    let find = |s: &State, z: &str| s.zones.iter().find(|(n, _, _)| n == z).cloned();
    let not_found = |z: &str| {
        error(
            StatusCode::NOT_FOUND,
            "notFound",
            &format!("The 'parameters.managedZone' resource named '{z}' does not exist."),
        )
    };
    match (method, parts.as_slice()) {
        (&Method::GET, ["managedZones"]) => {
            let start: usize = want("pageToken")
                .and_then(|t| t.strip_prefix("page-").and_then(|n| n.parse().ok()))
                .unwrap_or(0);
            let page: Vec<Value> = s
                .zones
                .iter()
                .skip(start)
                .take(PAGE)
                .map(zone_json)
                .collect();
            let mut body = json!({"kind": "dns#managedZonesListResponse", "managedZones": page});
            if start + PAGE < s.zones.len() {
                body["nextPageToken"] = json!(format!("page-{}", start + PAGE));
            }
            (json_response(StatusCode::OK, body), None)
        }
        (&Method::GET, ["managedZones", z]) => match find(&s, z) {
            Some(zone) => (json_response(StatusCode::OK, zone_json(&zone)), None),
            None => (not_found(z), None),
        },
        (&Method::GET, ["managedZones", z, "rrsets"]) => {
            if find(&s, z).is_none() {
                return (not_found(z), None);
            }
            let (name, rtype) = (want("name"), want("type"));
            if rtype.is_some() && name.is_none() {
                return (
                    error(StatusCode::BAD_REQUEST, "invalid", "type requires name"),
                    None,
                );
            }
            let sets: Vec<Value> = s
                .sets
                .iter()
                .filter(|r| r.zone == *z)
                .filter(|r| name.as_ref().is_none_or(|n| r.name == *n))
                .filter(|r| rtype.as_ref().is_none_or(|t| r.rtype == *t))
                .map(RrSet::json)
                .collect();
            (
                json_response(
                    StatusCode::OK,
                    json!({"kind": "dns#resourceRecordSetsListResponse", "rrsets": sets}),
                ),
                None,
            )
        }
        (&Method::POST, ["managedZones", z, "changes"]) => {
            let Some((zone, dns, _)) = find(&s, z) else {
                return (not_found(z), None);
            };
            let change: Value = serde_json::from_slice(body).unwrap_or_default();
            let list = |k: &str| -> Option<Vec<RrSet>> {
                change[k]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|v| RrSet::read(&zone, v))
                            .collect::<Option<Vec<_>>>()
                    })
                    .unwrap_or(Some(Vec::new()))
            };
            let (Some(deletions), Some(additions)) = (list("deletions"), list("additions")) else {
                return (
                    error(
                        StatusCode::BAD_REQUEST,
                        "invalid",
                        "Invalid value for 'entity.change'",
                    ),
                    None,
                );
            };
            let mut sets = s.sets.clone();
            for (i, d) in deletions.iter().enumerate() {
                match sets.iter().position(|r| *r == *d) {
                    Some(at) => {
                        sets.remove(at);
                    }
                    None => {
                        return (
                            error(
                                StatusCode::PRECONDITION_FAILED,
                                "conditionNotMet",
                                &format!("Precondition not met for 'entity.change.deletions[{i}]'"),
                            ),
                            None,
                        )
                    }
                }
            }
            for (i, a) in additions.iter().enumerate() {
                if !a.name.ends_with(&format!(".{dns}")) && a.name != dns {
                    return (
                        error(
                            StatusCode::BAD_REQUEST,
                            "invalid",
                            &format!(
                                "Invalid value for 'entity.change.additions[{i}].name': '{}'",
                                a.name
                            ),
                        ),
                        None,
                    );
                }
                if sets.iter().any(|r| r.name == a.name && r.rtype == a.rtype) {
                    return (
                        error(
                            StatusCode::CONFLICT,
                            "alreadyExists",
                            &format!("The resource 'entity.change.additions[{i}]' named '{} ({})' already exists", a.name, a.rtype),
                        ),
                        None,
                    );
                }
                sets.push(a.clone());
            }
            s.sets = sets;
            let id = (s.changes.len() + 1).to_string();
            s.changes.push((id.clone(), "pending"));
            let changed = additions
                .iter()
                .chain(deletions.iter())
                .find(|r| r.rtype == "TXT")
                .map(|r| {
                    let now = s
                        .sets
                        .iter()
                        .find(|x| x.zone == zone && x.name == r.name && x.rtype == "TXT")
                        .map(|x| x.rrdatas.clone())
                        .unwrap_or_default();
                    (r.name.clone(), now)
                });
            (
                json_response(
                    StatusCode::OK,
                    json!({"kind": "dns#change", "id": id, "status": "pending", "startTime": "2026-12-06T07:00:00.000Z", "additions": change["additions"], "deletions": change["deletions"]}),
                ),
                changed,
            )
        }
        (&Method::GET, ["managedZones", _, "changes", id]) => {
            let Some(change) = s.changes.iter_mut().find(|(c, _)| c == id) else {
                return (
                    error(
                        StatusCode::NOT_FOUND,
                        "notFound",
                        &format!("The 'parameters.changeId' resource named '{id}' does not exist."),
                    ),
                    None,
                );
            };
            change.1 = "done";
            (
                json_response(
                    StatusCode::OK,
                    json!({"kind": "dns#change", "id": id, "status": "done"}),
                ),
                None,
            )
        }
        _ => (error(StatusCode::NOT_FOUND, "notFound", path), None),
    }
}
