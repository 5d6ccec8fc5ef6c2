//! A stand-in for Amazon Route53 (REST/XML API 2013-04-01) and STS's `AssumeRole`, over plain
//! HTTP on loopback, following the documented protocol where a client depends on it:
//!
//! - every request signed with SigV4, checked here from the request as received (canonical
//!   path, query and signed headers, the body's hash, the scope's region and service); a wrong
//!   signature is `403 SignatureDoesNotMatch`, an unknown key `403 InvalidClientTokenId`;
//! - with a role configured, Route53 answers only the role's temporary credentials (key,
//!   secret and signed session token from `AssumeRole`), the long-term key gets `AccessDenied`;
//! - `ListHostedZones` paged by `marker`/`NextMarker` (at most 100), private zones among them;
//!   `GetHostedZone`; `ListResourceRecordSets` from the first set at or after `name`/`type`, in
//!   Route53's order, names with `*` as `\052`;
//! - `ChangeResourceRecordSets` with CREATE (refused if the set exists), DELETE (refused unless
//!   values and TTL match exactly), UPSERT; TXT values must be quoted strings, a CNAME holds
//!   one value; errors as `InvalidChangeBatch` with Route53's messages; each change `PENDING`
//!   until `GetChange` looks at it (then `INSYNC`), or forever when stuck.
//!
//! TXT values under `_acme-challenge.` are mirrored into pebble-challtestsrv when asked.

use std::{
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::http_stand_in;

const XMLNS: &str = "https://route53.amazonaws.com/doc/2013-04-01/";

/// One record set.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordSet {
    /// Its zone's id.
    pub zone: String,
    /// Its name, lowercase, no trailing dot.
    pub name: String,
    /// `TXT`, `CNAME`, ...
    pub rtype: String,
    /// Its TTL.
    pub ttl: u32,
    /// Its values as written (TXT quoted).
    pub values: Vec<String>,
}

/// The role the stand-in lets a key assume.
#[derive(Clone, Debug)]
pub struct Role {
    /// Its ARN.
    pub arn: String,
    /// The external id its trust policy asks for.
    pub external_id: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    /// (id, name, private).
    zones: Vec<(String, String, bool)>,
    sets: Vec<RecordSet>,
    /// (id, status).
    changes: Vec<(String, &'static str)>,
    stuck: bool,
    /// Temporary credentials handed out: (key, secret, token).
    temporary: Vec<(String, String, String)>,
    requests: Vec<String>,
}

/// The stand-in; it stops with the test's runtime.
#[derive(Clone, Debug)]
pub struct Route53StandIn {
    /// Route53's root, `http://127.0.0.1:<port>`.
    pub base: String,
    /// STS's root (the same server).
    pub sts: String,
    state: Arc<Mutex<State>>,
}

#[derive(Clone)]
struct Config {
    key: (String, String),
    role: Option<Role>,
    mirror: Option<String>,
}

impl Route53StandIn {
    /// Serve public `zones` (and a private twin of the first) to the key `(id, secret)`; with
    /// `role`, Route53 calls need its credentials. With `challtestsrv`, `_acme-challenge.` TXT
    /// values are mirrored there.
    pub async fn start(
        key: (&str, &str),
        zones: &[&str],
        role: Option<Role>,
        challtestsrv: Option<String>,
    ) -> Self {
        let mut all: Vec<(String, String, bool)> = zones
            .iter()
            .enumerate()
            .map(|(i, z)| (format!("Z{:04}PUBLIC", i + 1), (*z).to_owned(), false))
            .collect();
        if let Some(first) = zones.first() {
            all.push(("Z9999PRIVATE".into(), (*first).to_owned(), true));
        }
        let state = Arc::new(Mutex::new(State {
            zones: all,
            ..State::default()
        }));
        let config = Config {
            key: (key.0.to_owned(), key.1.to_owned()),
            role,
            mirror: challtestsrv,
        };
        let shared = state.clone();
        let addr =
            http_stand_in::serve(move |req| handle(req, shared.clone(), config.clone())).await;
        Self {
            base: format!("http://{addr}"),
            sts: format!("http://{addr}"),
            state,
        }
    }

    /// Every record set now.
    pub fn sets(&self) -> Vec<RecordSet> {
        self.state.lock().unwrap().sets.clone()
    }

    /// Put a set in place, as someone else's records.
    pub fn add(&self, set: RecordSet) {
        self.state.lock().unwrap().sets.push(set);
    }

    /// The id of the public zone `name`.
    pub fn zone_id(&self, name: &str) -> String {
        let s = self.state.lock().unwrap();
        s.zones
            .iter()
            .find(|(_, n, private)| n == name && !private)
            .map(|(id, _, _)| id.clone())
            .unwrap()
    }

    /// Changes stay `PENDING` from now on.
    pub fn stick(&self) {
        self.state.lock().unwrap().stuck = true;
    }

    /// `METHOD path` of each request, in order (`POST /` for STS).
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }
}

fn xml(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(http::header::CONTENT_TYPE, "text/xml".parse().unwrap());
    resp
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    xml(
        status,
        format!("<?xml version=\"1.0\"?>\n<ErrorResponse xmlns=\"{XMLNS}\"><Error><Type>Sender</Type><Code>{code}</Code><Message>{}</Message></Error><RequestId>5e77e75e-0000</RequestId></ErrorResponse>", escape(message)),
    )
}

fn invalid_batch(messages: &[String]) -> Response<Full<Bytes>> {
    let items: String = messages
        .iter()
        .map(|m| format!("<Message>{}</Message>", escape(m)))
        .collect();
    xml(
        StatusCode::BAD_REQUEST,
        format!("<?xml version=\"1.0\"?>\n<InvalidChangeBatch xmlns=\"{XMLNS}\"><Messages>{items}</Messages><RequestId>5e77e75e-0001</RequestId></InvalidChangeBatch>"),
    )
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn sha256_hex(bytes: &[u8]) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    aws_lc_rs::hmac::sign(
        &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key),
        data,
    )
    .as_ref()
    .to_vec()
}

/// The parts of a SigV4 `Authorization` header.
struct Authorization {
    key: String,
    date: String,
    region: String,
    service: String,
    signed: Vec<String>,
    signature: String,
}

fn authorization(value: &str) -> Option<Authorization> {
    let rest = value.strip_prefix("AWS4-HMAC-SHA256 ")?;
    let mut credential = None;
    let mut signed = None;
    let mut signature = None;
    for part in rest.split(", ") {
        let (k, v) = part.split_once('=')?;
        match k {
            "Credential" => credential = Some(v),
            "SignedHeaders" => signed = Some(v),
            "Signature" => signature = Some(v),
            _ => return None,
        }
    }
    let scope: Vec<&str> = credential?.split('/').collect();
    let [key, date, region, service, "aws4_request"] = scope.as_slice() else {
        return None;
    };
    Some(Authorization {
        key: (*key).to_owned(),
        date: (*date).to_owned(),
        region: (*region).to_owned(),
        service: (*service).to_owned(),
        signed: signed?.split(';').map(str::to_owned).collect(),
        signature: signature?.to_owned(),
    })
}

/// Recompute the signature of the request as it arrived, with `secret`.
fn expected_signature(
    parts: &http::request::Parts,
    body: &[u8],
    auth: &Authorization,
    secret: &str,
) -> Option<String> {
    let mut query: Vec<(String, String)> = parts
        .uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (kv.to_owned(), String::new()),
        })
        .collect();
    query.sort();
    let query = query
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let mut headers = String::new();
    for name in &auth.signed {
        let value = parts.headers.get(name.as_str())?.to_str().ok()?;
        headers.push_str(&format!("{name}:{}\n", value.trim()));
    }
    let date = parts.headers.get("x-amz-date")?.to_str().ok()?;
    let canonical = format!(
        "{}\n{}\n{query}\n{headers}\n{}\n{}",
        parts.method,
        parts.uri.path(),
        auth.signed.join(";"),
        sha256_hex(body)
    );
    let scope = format!(
        "{}/{}/{}/aws4_request",
        auth.date, auth.region, auth.service
    );
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{date}\n{scope}\n{}",
        sha256_hex(canonical.as_bytes())
    );
    let k = hmac(format!("AWS4{secret}").as_bytes(), auth.date.as_bytes());
    let k = hmac(&k, auth.region.as_bytes());
    let k = hmac(&k, auth.service.as_bytes());
    let k = hmac(&k, b"aws4_request");
    Some(
        hmac(&k, to_sign.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    )
}

/// Who signed: `Ok(true)` for temporary credentials, `Ok(false)` for the long-term key.
fn check_signature(
    parts: &http::request::Parts,
    body: &[u8],
    state: &Mutex<State>,
    config: &Config,
    service: &str,
) -> Result<bool, Box<Response<Full<Bytes>>>> {
    let Some(auth) = parts
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(authorization)
    else {
        return Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "MissingAuthenticationToken",
            "Missing Authentication Token",
        )));
    };
    let host = parts.headers.contains_key(http::header::HOST);
    if !host
        || !auth.signed.iter().any(|h| h == "host")
        || !auth.signed.iter().any(|h| h == "x-amz-date")
    {
        return Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "IncompleteSignature",
            "host and x-amz-date must be signed",
        )));
    }
    if auth.region != "us-east-1" || auth.service != service {
        return Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "SignatureDoesNotMatch",
            &format!("Credential should be scoped to a valid region and service {service}"),
        )));
    }
    let (secret, temporary) = if auth.key == config.key.0 {
        (config.key.1.clone(), false)
    } else {
        let s = state.lock().unwrap();
        let Some((_, secret, token)) = s.temporary.iter().find(|(k, _, _)| *k == auth.key) else {
            return Err(Box::new(error(
                StatusCode::FORBIDDEN,
                "InvalidClientTokenId",
                "The security token included in the request is invalid.",
            )));
        };
        let sent = parts
            .headers
            .get("x-amz-security-token")
            .and_then(|v| v.to_str().ok());
        if sent != Some(token.as_str()) || !auth.signed.iter().any(|h| h == "x-amz-security-token")
        {
            return Err(Box::new(error(
                StatusCode::FORBIDDEN,
                "InvalidClientTokenId",
                "The security token included in the request is invalid.",
            )));
        }
        (secret.clone(), true)
    };
    match expected_signature(parts, body, &auth, &secret) {
        Some(sig) if sig == auth.signature => Ok(temporary),
        _ => Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method.",
        ))),
    }
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<Mutex<State>>,
    config: Config,
) -> Response<Full<Bytes>> {
    let (parts, body) = http_stand_in::parts(req).await;
    let path = parts.uri.path().to_owned();
    state
        .lock()
        .unwrap()
        .requests
        .push(format!("{} {path}", parts.method));
    if parts.method == Method::POST && path == "/" {
        return match check_signature(&parts, &body, &state, &config, "sts") {
            Ok(_) => assume_role(&state, &config, &body),
            Err(resp) => *resp,
        };
    }
    match check_signature(&parts, &body, &state, &config, "route53") {
        Ok(false) if config.role.is_some() => {
            return error(
                StatusCode::FORBIDDEN,
                "AccessDenied",
                &format!("User: arn:aws:iam::111122223333:user/dns is not authorized to perform: route53 on {path}"),
            )
        }
        Ok(_) => {}
        Err(resp) => return *resp,
    }
    let query = http_stand_in::query_pairs(&parts.uri);
    let (resp, changed) = route(&state, &parts.method, &path, &query, &body);
    if let (Some(base), Some((name, values))) = (config.mirror, changed) {
        if name.starts_with("_acme-challenge.") {
            let values = values
                .iter()
                .map(|v| v.trim_matches('"').to_owned())
                .collect();
            http_stand_in::mirror_txt(base, format!("{name}."), values).await;
        }
    }
    resp
}

fn assume_role(state: &Mutex<State>, config: &Config, body: &[u8]) -> Response<Full<Bytes>> {
    let form: Vec<(String, String)> = String::from_utf8_lossy(body)
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), decode(v)))
        .collect();
    let field = |k: &str| form.iter().find(|(f, _)| f == k).map(|(_, v)| v.as_str());
    let Some(role) = &config.role else {
        return error(StatusCode::FORBIDDEN, "AccessDenied", "no role to assume");
    };
    if field("Action") != Some("AssumeRole") || field("Version") != Some("2011-06-15") {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidAction",
            "Could not find operation",
        );
    }
    if field("RoleArn") != Some(role.arn.as_str())
        || field("ExternalId") != role.external_id.as_deref()
    {
        return error(
            StatusCode::FORBIDDEN,
            "AccessDenied",
            &format!("User: arn:aws:iam::111122223333:user/dns is not authorized to perform: sts:AssumeRole on resource: {}", field("RoleArn").unwrap_or_default()),
        );
    }
    let session = field("RoleSessionName").unwrap_or_default();
    if session.len() < 2 || session.len() > 64 {
        return error(
            StatusCode::BAD_REQUEST,
            "ValidationError",
            "RoleSessionName",
        );
    }
    let mut s = state.lock().unwrap();
    let n = s.temporary.len() + 1;
    let creds = (
        format!("ASIATEMPORARY{n:07}"),
        format!("temporary-secret-{n}"),
        format!("FwoGZXIvYXdzE-session-token-{n}"),
    );
    s.temporary.push(creds.clone());
    let expires = time_text(SystemTime::now() + std::time::Duration::from_secs(3600));
    xml(
        StatusCode::OK,
        format!("<AssumeRoleResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><AssumeRoleResult><Credentials><AccessKeyId>{}</AccessKeyId><SecretAccessKey>{}</SecretAccessKey><SessionToken>{}</SessionToken><Expiration>{expires}</Expiration></Credentials><AssumedRoleUser><Arn>{}/{session}</Arn><AssumedRoleId>AROA:{session}</AssumedRoleId></AssumedRoleUser></AssumeRoleResult><ResponseMetadata><RequestId>c6104cbe</RequestId></ResponseMetadata></AssumeRoleResponse>", creds.0, creds.1, creds.2, role.arn),
    )
}

/// `2026-12-06T07:00:00Z`.
fn time_text(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap().as_secs();
    let days = secs / 86400;
    let (h, m, s) = (secs % 86400 / 3600, secs % 3600 / 60, secs % 60);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

/// `%XX` decoded.
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
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Route53's listing order: labels reversed (`com.example.www`), then type.
fn order_key(name: &str, rtype: &str) -> (String, String) {
    let reversed: Vec<&str> = name.split('.').rev().collect();
    (reversed.join("."), rtype.to_owned())
}

fn zone_xml(id: &str, name: &str, private: bool) -> String {
    format!("<HostedZone><Id>/hostedzone/{id}</Id><Name>{name}.</Name><CallerReference>ref-{id}</CallerReference><Config><PrivateZone>{private}</PrivateZone></Config><ResourceRecordSetCount>2</ResourceRecordSetCount></HostedZone>")
}

type Changed = Option<(String, Vec<String>)>;

fn route(
    state: &Mutex<State>,
    method: &Method,
    path: &str,
    query: &[(String, String)],
    body: &[u8],
) -> (Response<Full<Bytes>>, Changed) {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let want = |k: &str| query.iter().find(|(q, _)| q == k).map(|(_, v)| decode(v));
    let mut s = state.lock().unwrap();
    let no_zone = |id: &str| {
        error(
            StatusCode::NOT_FOUND,
            "NoSuchHostedZone",
            &format!("No hosted zone found with ID: {id}"),
        )
    };
    match (method, parts.as_slice()) {
        (&Method::GET, ["2013-04-01", "hostedzone"]) => {
            let max = want("maxitems")
                .and_then(|m| m.parse::<usize>().ok())
                .unwrap_or(100)
                .min(100);
            let mut zones = s.zones.clone();
            zones.sort();
            let start = match want("marker") {
                Some(m) => match zones.iter().position(|(id, _, _)| *id == m) {
                    Some(i) => i,
                    None => {
                        return (
                            error(StatusCode::BAD_REQUEST, "InvalidInput", "Invalid marker"),
                            None,
                        )
                    }
                },
                None => 0,
            };
            let page: String = zones
                .iter()
                .skip(start)
                .take(max)
                .map(|(id, n, p)| zone_xml(id, n, *p))
                .collect();
            let next = zones.get(start + max).map(|(id, _, _)| id.clone());
            let tail = match &next {
                Some(n) => format!("<IsTruncated>true</IsTruncated><NextMarker>{n}</NextMarker>"),
                None => "<IsTruncated>false</IsTruncated>".to_owned(),
            };
            (
                xml(StatusCode::OK, format!("<?xml version=\"1.0\"?>\n<ListHostedZonesResponse xmlns=\"{XMLNS}\"><HostedZones>{page}</HostedZones>{tail}<MaxItems>{max}</MaxItems></ListHostedZonesResponse>")),
                None,
            )
        }
        (&Method::GET, ["2013-04-01", "hostedzone", id]) => {
            let Some((id, name, private)) = s.zones.iter().find(|(z, _, _)| z == id).cloned()
            else {
                return (no_zone(id), None);
            };
            (
                xml(StatusCode::OK, format!("<?xml version=\"1.0\"?>\n<GetHostedZoneResponse xmlns=\"{XMLNS}\">{}<DelegationSet><NameServers><NameServer>ns-1.awsdns-01.org</NameServer></NameServers></DelegationSet></GetHostedZoneResponse>", zone_xml(&id, &name, private))),
                None,
            )
        }
        (&Method::GET, ["2013-04-01", "hostedzone", id, "rrset"]) => {
            if !s.zones.iter().any(|(z, _, _)| z == id) {
                return (no_zone(id), None);
            }
            let (name, rtype) = (want("name"), want("type"));
            if rtype.is_some() && name.is_none() {
                return (
                    error(
                        StatusCode::BAD_REQUEST,
                        "InvalidInput",
                        "The input is not valid: type without name",
                    ),
                    None,
                );
            }
            let max = want("maxitems")
                .and_then(|m| m.parse::<usize>().ok())
                .unwrap_or(300)
                .min(300);
            let from = order_key(
                name.as_deref().unwrap_or("").trim_end_matches('.'),
                rtype.as_deref().unwrap_or(""),
            );
            let mut sets: Vec<&RecordSet> = s.sets.iter().filter(|r| r.zone == *id).collect();
            sets.sort_by_key(|r| order_key(&r.name, &r.rtype));
            let page: String = sets
                .iter()
                .filter(|r| order_key(&r.name, &r.rtype) >= from)
                .take(max)
                .map(|r| {
                    let values: String = r
                        .values
                        .iter()
                        .map(|v| format!("<ResourceRecord><Value>{}</Value></ResourceRecord>", escape(v)))
                        .collect();
                    format!(
                        "<ResourceRecordSet><Name>{}.</Name><Type>{}</Type><TTL>{}</TTL><ResourceRecords>{values}</ResourceRecords></ResourceRecordSet>",
                        r.name.replace('*', "\\052"),
                        r.rtype,
                        r.ttl
                    )
                })
                .collect();
            (
                xml(StatusCode::OK, format!("<?xml version=\"1.0\"?>\n<ListResourceRecordSetsResponse xmlns=\"{XMLNS}\"><ResourceRecordSets>{page}</ResourceRecordSets><IsTruncated>false</IsTruncated><MaxItems>{max}</MaxItems></ListResourceRecordSetsResponse>")),
                None,
            )
        }
        (&Method::POST, ["2013-04-01", "hostedzone", id, "rrset", ""]) => {
            let Some((_, zone_name, _)) = s.zones.iter().find(|(z, _, _)| z == id).cloned() else {
                return (no_zone(id), None);
            };
            let text = String::from_utf8_lossy(body).into_owned();
            let change = match parse_change(&text) {
                Ok(c) => c,
                Err(why) => return (error(StatusCode::BAD_REQUEST, "InvalidInput", &why), None),
            };
            apply(&mut s, id, &zone_name, change)
        }
        (&Method::GET, ["2013-04-01", "change", id]) => {
            let stuck = s.stuck;
            let Some(change) = s.changes.iter_mut().find(|(c, _)| c == id) else {
                return (
                    error(
                        StatusCode::NOT_FOUND,
                        "NoSuchChange",
                        &format!("A change with the specified change ID does not exist: {id}"),
                    ),
                    None,
                );
            };
            if !stuck {
                change.1 = "INSYNC";
            }
            (
                xml(StatusCode::OK, format!("<?xml version=\"1.0\"?>\n<GetChangeResponse xmlns=\"{XMLNS}\"><ChangeInfo><Id>/change/{id}</Id><Status>{}</Status><SubmittedAt>2026-12-06T06:00:00.000Z</SubmittedAt></ChangeInfo></GetChangeResponse>", change.1)),
                None,
            )
        }
        _ => (
            error(StatusCode::NOT_FOUND, "UnknownOperationException", path),
            None,
        ),
    }
}

/// `n`'s child element `name`.
fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children()
        .find(|c| c.is_element() && c.tag_name().name() == name)
}

/// One `Change` of a batch: action and set.
struct Change {
    action: String,
    set: RecordSet,
}

fn parse_change(text: &str) -> Result<Change, String> {
    let doc = roxmltree::Document::parse(text).map_err(|e| format!("malformed XML: {e}"))?;
    let root = doc.root_element();
    if root.tag_name().name() != "ChangeResourceRecordSetsRequest"
        || root.tag_name().namespace() != Some(XMLNS)
    {
        return Err("expected ChangeResourceRecordSetsRequest in the 2013-04-01 namespace".into());
    }
    let changes: Vec<_> = root
        .descendants()
        .filter(|n| n.is_element() && n.tag_name().name() == "Change")
        .collect();
    let [change] = changes.as_slice() else {
        return Err(format!("expected one Change, got {}", changes.len()));
    };
    let set = child(*change, "ResourceRecordSet").ok_or("no ResourceRecordSet")?;
    let order: Vec<&str> = set
        .children()
        .filter(|c| c.is_element())
        .map(|c| c.tag_name().name())
        .collect();
    if order != ["Name", "Type", "TTL", "ResourceRecords"] {
        return Err(format!(
            "ResourceRecordSet elements out of schema order: {order:?}"
        ));
    }
    let text_of = |n: roxmltree::Node<'_, '_>, name: &str| {
        child(n, name)
            .and_then(|c| c.text())
            .unwrap_or_default()
            .to_owned()
    };
    let name = text_of(set, "Name");
    Ok(Change {
        action: text_of(*change, "Action"),
        set: RecordSet {
            zone: String::new(),
            name: name.trim_end_matches('.').to_ascii_lowercase(),
            rtype: text_of(set, "Type"),
            ttl: text_of(set, "TTL")
                .parse()
                .map_err(|_| "TTL is not a number")?,
            values: set
                .descendants()
                .filter(|n| n.is_element() && n.tag_name().name() == "Value")
                .map(|n| n.text().unwrap_or_default().to_owned())
                .collect(),
        },
    })
}

fn apply(
    s: &mut State,
    zone: &str,
    zone_name: &str,
    change: Change,
) -> (Response<Full<Bytes>>, Changed) {
    let Change { action, mut set } = change;
    set.zone = zone.to_owned();
    let label = format!("[name='{}.', type='{}']", set.name, set.rtype);
    if set.name != zone_name && !set.name.ends_with(&format!(".{zone_name}")) {
        return (
            invalid_batch(&[format!(
                "RRSet with DNS name {}. is not permitted in zone {zone_name}.",
                set.name
            )]),
            None,
        );
    }
    if set.values.is_empty() {
        return (
            invalid_batch(&["ResourceRecords must not be empty".into()]),
            None,
        );
    }
    if set.rtype == "TXT" && !set.values.iter().all(|v| http_stand_in::quoted_strings(v)) {
        return (
            invalid_batch(&["Invalid Resource Record: 'FATAL problem: InvalidCharacterString (Value should be enclosed in quotation marks) encountered'".into()]),
            None,
        );
    }
    if set.rtype == "CNAME" && set.values.len() > 1 {
        return (
            invalid_batch(&[format!("RRSet of type CNAME with DNS name {}. does not contain exactly one resource record.", set.name)]),
            None,
        );
    }
    let at = s
        .sets
        .iter()
        .position(|r| r.zone == zone && r.name == set.name && r.rtype == set.rtype);
    match (action.as_str(), at) {
        ("CREATE", Some(_)) => {
            return (
                invalid_batch(&[format!(
                    "Tried to create resource record set {label} but it already exists"
                )]),
                None,
            )
        }
        ("CREATE", None) | ("UPSERT", None) => s.sets.push(set.clone()),
        ("UPSERT", Some(i)) => s.sets[i] = set.clone(),
        ("DELETE", None) => {
            return (
                invalid_batch(&[format!(
                    "Tried to delete resource record set {label} but it was not found"
                )]),
                None,
            )
        }
        ("DELETE", Some(i)) => {
            if s.sets[i].values != set.values || s.sets[i].ttl != set.ttl {
                return (
                    invalid_batch(&[format!("Tried to delete resource record set {label} but the values provided do not match the current values")]),
                    None,
                );
            }
            s.sets.remove(i);
        }
        (other, _) => {
            return (
                error(
                    StatusCode::BAD_REQUEST,
                    "InvalidInput",
                    &format!("Invalid Action {other:?}"),
                ),
                None,
            )
        }
    }
    let id = format!("C{:012}", s.changes.len() + 1);
    s.changes.push((id.clone(), "PENDING"));
    let now = s
        .sets
        .iter()
        .find(|r| r.zone == zone && r.name == set.name && r.rtype == set.rtype)
        .map(|r| r.values.clone())
        .unwrap_or_default();
    let changed = (set.rtype == "TXT").then(|| (set.name.clone(), now));
    (
        xml(StatusCode::OK, format!("<?xml version=\"1.0\"?>\n<ChangeResourceRecordSetsResponse xmlns=\"{XMLNS}\"><ChangeInfo><Id>/change/{id}</Id><Status>PENDING</Status><SubmittedAt>2026-12-06T06:00:00.000Z</SubmittedAt></ChangeInfo></ChangeResourceRecordSetsResponse>")),
        changed,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(
            time_text(UNIX_EPOCH + std::time::Duration::from_secs(1_440_938_160)),
            "2015-08-30T12:36:00Z"
        );
    }
}
