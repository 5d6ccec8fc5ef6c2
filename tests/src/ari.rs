//! What Debian's pebble (2.4) lacks, in front of it: ACME Renewal Information (RFC 9773) and
//! Let's Encrypt's profiles. An HTTPS proxy that passes every request to pebble unchanged,
//! `Host` included, so pebble builds its URLs (and checks each JWS `url`) for this address;
//! it adds `renewalInfo` and `meta.profiles` to the directory, answers
//! `GET /renewal-info/<AKI>.<serial>` for each certificate it has seen pass (a window at
//! configurable fractions of the lifetime, moved into the past on demand, or an error
//! status), records each newOrder's `profile` and `replaces`, and refuses a profile the
//! directory does not advertise with `invalidProfile`, as Let's Encrypt does. It can also
//! fail every request as a CA that is down, slow, broken or rate limiting would ([`CaFault`]).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};

/// How the front fails every request to the CA (renewalInfo aside), to stand for a CA that
/// is down, slow, broken or rate limiting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaFault {
    /// Close each connection without a byte.
    Down,
    /// Hold each request this long before passing it on.
    Slow(Duration),
    /// Answer `200` with a body that is not JSON.
    Garbage,
    /// Answer new orders `429` with a `rateLimited` problem and `Retry-After: secs`, as Let's
    /// Encrypt does.
    RateLimited(u64),
}

/// One certificate seen on its way to the client.
#[derive(Clone, Debug)]
pub struct Seen {
    /// Its RFC 9773 identifier.
    pub id: String,
    /// Validity, Unix seconds.
    pub not_before: u64,
    /// Validity, Unix seconds.
    pub not_after: u64,
}

#[derive(Debug)]
struct State {
    profiles: Option<Vec<String>>,
    /// The window, as fractions of each certificate's lifetime.
    window: (f64, f64),
    /// The certificates whose window ended a minute ago.
    past: Vec<String>,
    /// Answer renewalInfo with this status instead.
    status: Option<u16>,
    retry_after: u64,
    seen: Vec<Seen>,
    orders: Vec<serde_json::Value>,
    renewal_info_requests: usize,
    /// Reflect `replaces` and `profile` in new orders (a conforming server does).
    reflect: bool,
    /// Each accepted connection's key exchange group.
    groups: Vec<rustls::NamedGroup>,
    fault: Option<CaFault>,
    /// Requests that met a fault.
    faulted: usize,
}

/// The front; it stops with the test's runtime.
#[derive(Clone, Debug)]
pub struct AriFront {
    /// Its directory URL.
    pub directory: String,
    /// The root its HTTPS certificate chains to.
    pub ca_file: PathBuf,
    state: Arc<Mutex<State>>,
}

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

fn unbase64url(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'-' => 62,
        _ => 63,
    };
    let mut out = Vec::new();
    for chunk in text.as_bytes().chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, c)| n | u32::from(value(*c)) << (18 - 6 * i));
        for i in 0..chunk.len().saturating_sub(1) {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

/// The RFC 9773 identifier and validity of a PEM chain's leaf.
fn identify(chain_pem: &[u8]) -> Option<Seen> {
    let leaf = CertificateDer::pem_slice_iter(chain_pem).next()?.ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).ok()?;
    let aki = cert
        .iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })?;
    Some(Seen {
        id: format!(
            "{}.{}",
            base64url(&aki),
            base64url(cert.tbs_certificate.raw_serial())
        ),
        not_before: u64::try_from(cert.validity().not_before.timestamp()).ok()?,
        not_after: u64::try_from(cert.validity().not_after.timestamp()).ok()?,
    })
}

fn rfc3339(secs: u64) -> String {
    let days = secs / 86400;
    let (h, m, s) = (secs % 86400 / 3600, secs % 3600 / 60, secs % 60);
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

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(http::header::CONTENT_TYPE, content_type.parse().unwrap());
    resp
}

impl AriFront {
    /// A front for `pebble_directory` (trusting `pebble_ca`), files in `dir`, advertising
    /// `profiles` (none: no `meta.profiles`); windows at 50-55% of each lifetime, asked again
    /// after 1 s.
    pub async fn start(
        dir: &Path,
        pebble_directory: &str,
        pebble_ca: &Path,
        profiles: Option<&[&str]>,
    ) -> Self {
        let ca = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "ARI front test root");
        let ca_cert = ca_params.self_signed(&ca).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&key, &rcgen::Issuer::from_params(&ca_params, &ca))
            .unwrap();
        let ca_file = dir.join("ari-front-ca.pem");
        std::fs::write(&ca_file, ca_cert.pem()).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(ratls::crypto::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap(),
            )
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(pebble_ca).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let upstream = Arc::new(
            rustls::ClientConfig::builder_with_provider(ratls::crypto::provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        let pebble: http::Uri = pebble_directory.parse().unwrap();
        let pebble_addr: SocketAddr = format!(
            "{}:{}",
            pebble.host().unwrap(),
            pebble.port_u16().unwrap_or(443)
        )
        .parse()
        .unwrap();
        let state = Arc::new(Mutex::new(State {
            profiles: profiles.map(|p| p.iter().map(|s| (*s).to_owned()).collect()),
            window: (0.50, 0.55),
            past: Vec::new(),
            status: None,
            retry_after: 1,
            seen: Vec::new(),
            orders: Vec::new(),
            renewal_info_requests: 0,
            reflect: true,
            groups: Vec::new(),
            fault: None,
            faulted: 0,
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let shared = state.clone();
        let dir_path = pebble.path().to_owned();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, state, upstream, dir_path) = (
                    acceptor.clone(),
                    shared.clone(),
                    upstream.clone(),
                    dir_path.clone(),
                );
                tokio::spawn(async move {
                    if state.lock().unwrap().fault == Some(CaFault::Down) {
                        state.lock().unwrap().faulted += 1;
                        let _ = tcp.set_zero_linger();
                        return;
                    }
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    if let Some(g) = tls.get_ref().1.negotiated_key_exchange_group() {
                        state.lock().unwrap().groups.push(g.name());
                    }
                    let service = service_fn(move |req| {
                        let (state, upstream, dir_path) =
                            (state.clone(), upstream.clone(), dir_path.clone());
                        async move {
                            Ok::<_, std::convert::Infallible>(
                                handle(req, &state, upstream, pebble_addr, &dir_path).await,
                            )
                        }
                    });
                    // A connection per request, so that a CA going down is met at once.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(false)
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self {
            directory: format!("https://{addr}{}", pebble.path()),
            ca_file,
            state,
        }
    }

    /// Windows at these fractions of each certificate's lifetime.
    pub fn set_window(&self, start: f64, end: f64) {
        self.state.lock().unwrap().window = (start, end);
    }

    /// The window of every certificate seen so far ends a minute ago (a revocation ahead:
    /// renew now); later ones keep theirs.
    pub fn move_windows_into_the_past(&self) {
        let mut s = self.state.lock().unwrap();
        s.past = s.seen.iter().map(|c| c.id.clone()).collect();
    }

    /// Answer renewalInfo with `status` (404, 500), or windows again (`None`).
    /// Answer renewalInfo with `Retry-After: secs` (1 until told).
    pub fn set_retry_after(&self, secs: u64) {
        self.state.lock().unwrap().retry_after = secs;
    }

    pub fn answer_status(&self, status: Option<u16>) {
        self.state.lock().unwrap().status = status;
    }

    /// Stop reflecting `replaces` and `profile` in new orders, as pebble 2.4 does.
    pub fn stop_reflecting(&self) {
        self.state.lock().unwrap().reflect = false;
    }

    /// The certificates seen, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// Each newOrder's payload, in order.
    pub fn orders(&self) -> Vec<serde_json::Value> {
        self.state.lock().unwrap().orders.clone()
    }

    /// The key exchange group of each connection the client made.
    pub fn groups(&self) -> Vec<rustls::NamedGroup> {
        self.state.lock().unwrap().groups.clone()
    }

    /// Fail every request this way from now on (`None`: pass them again).
    pub fn set_fault(&self, fault: Option<CaFault>) {
        self.state.lock().unwrap().fault = fault;
    }

    /// Requests (connections, for `Down`) that met a fault so far.
    pub fn faulted(&self) -> usize {
        self.state.lock().unwrap().faulted
    }

    /// renewalInfo requests so far.
    pub fn renewal_info_requests(&self) -> usize {
        self.state.lock().unwrap().renewal_info_requests
    }
}

async fn handle(
    req: Request<Incoming>,
    state: &Mutex<State>,
    upstream: Arc<rustls::ClientConfig>,
    pebble: SocketAddr,
    dir_path: &str,
) -> Response<Full<Bytes>> {
    let (parts, body) = crate::http_stand_in::parts(req).await;
    let host = parts
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let path = parts.uri.path().to_owned();
    if let Some(id) = path.strip_prefix("/renewal-info/") {
        return renewal_info(state, id);
    }
    let fault = {
        let mut s = state.lock().unwrap();
        // Let's Encrypt's limits answer new orders, not nonces or the directory.
        let applies = match s.fault {
            Some(CaFault::RateLimited(_)) => path == "/order-plz",
            fault => fault.is_some(),
        };
        s.faulted += usize::from(applies);
        s.fault.filter(|_| applies)
    };
    match fault {
        Some(CaFault::Slow(hold)) => tokio::time::sleep(hold).await,
        Some(CaFault::Garbage) => {
            return reply(
                StatusCode::OK,
                "application/json",
                b"{\"directory\": [".to_vec(),
            )
        }
        Some(CaFault::RateLimited(secs)) => {
            let problem = serde_json::json!({"type": "urn:ietf:params:acme:error:rateLimited", "detail": "too many new orders (10) from this account in the last 3h0m0s", "status": 429});
            let mut resp = reply(
                StatusCode::TOO_MANY_REQUESTS,
                "application/problem+json",
                problem.to_string().into_bytes(),
            );
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, secs.into());
            return resp;
        }
        Some(CaFault::Down) | None => {}
    }
    let mut echo = None;
    if path == "/order-plz" {
        let jws: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let payload: serde_json::Value =
            serde_json::from_slice(&unbase64url(jws["payload"].as_str().unwrap_or_default()))
                .unwrap_or_default();
        let mut s = state.lock().unwrap();
        s.orders.push(payload.clone());
        echo = Some(payload.clone());
        if let Some(p) = payload["profile"].as_str() {
            if !s.profiles.iter().flatten().any(|o| o == p) {
                let problem = serde_json::json!({"type": "urn:ietf:params:acme:error:invalidProfile", "detail": format!("profile {p:?} is not offered"), "status": 400});
                return reply(
                    StatusCode::BAD_REQUEST,
                    "application/problem+json",
                    problem.to_string().into_bytes(),
                );
            }
        }
    }
    // Everything else goes to pebble as it came, Host included.
    let upstream_resp = async {
        let tcp = tokio::net::TcpStream::connect(pebble).await.ok()?;
        let name = ServerName::try_from(pebble.ip().to_string()).ok()?;
        let tls = tokio_rustls::TlsConnector::from(upstream)
            .connect(name, tcp)
            .await
            .ok()?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .ok()?;
        tokio::spawn(conn);
        let mut forward = Request::builder()
            .method(parts.method.clone())
            .uri(parts.uri.path_and_query().map_or("/", |p| p.as_str()));
        for (k, v) in &parts.headers {
            forward = forward.header(k, v);
        }
        let resp = sender
            .send_request(forward.body(Full::new(body.clone())).ok()?)
            .await
            .ok()?;
        let (rparts, rbody) = resp.into_parts();
        let rbody = rbody.collect().await.ok()?.to_bytes();
        Some((rparts, rbody))
    }
    .await;
    let Some((mut rparts, rbody)) = upstream_resp else {
        return reply(
            StatusCode::BAD_GATEWAY,
            "text/plain",
            b"pebble unreachable".to_vec(),
        );
    };
    rparts.headers.remove(http::header::CONTENT_LENGTH);
    rparts.headers.remove(http::header::TRANSFER_ENCODING);
    let mut rbody = rbody.to_vec();
    if parts.method == http::Method::GET && path == dir_path {
        let mut dir: serde_json::Value = serde_json::from_slice(&rbody).unwrap_or_default();
        dir["renewalInfo"] = serde_json::json!(format!("https://{host}/renewal-info"));
        if let Some(profiles) = &state.lock().unwrap().profiles {
            let map: serde_json::Map<String, serde_json::Value> = profiles
                .iter()
                .map(|p| (p.clone(), serde_json::json!(format!("the {p} profile"))))
                .collect();
            dir["meta"]["profiles"] = serde_json::Value::Object(map);
        }
        rbody = dir.to_string().into_bytes();
    }
    // A server that accepts `replaces` and `profile` reflects them in the order (RFC 9773
    // §5; Let's Encrypt's profiles), where pebble 2.4 drops them.
    let reflect = state.lock().unwrap().reflect;
    if let Some(sent) = echo.filter(|_| reflect && rparts.status == StatusCode::CREATED) {
        let mut order: serde_json::Value = serde_json::from_slice(&rbody).unwrap_or_default();
        for field in ["replaces", "profile"] {
            if let Some(v) = sent.get(field) {
                order[field] = v.clone();
            }
        }
        rbody = order.to_string().into_bytes();
    }
    let pem = rparts
        .headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| {
            v.as_bytes()
                .starts_with(b"application/pem-certificate-chain")
        });
    if pem {
        if let Some(seen) = identify(&rbody) {
            let mut s = state.lock().unwrap();
            if !s.seen.iter().any(|c| c.id == seen.id) {
                s.seen.push(seen);
            }
        }
    }
    Response::from_parts(rparts, Full::new(Bytes::from(rbody)))
}

fn renewal_info(state: &Mutex<State>, id: &str) -> Response<Full<Bytes>> {
    let mut s = state.lock().unwrap();
    s.renewal_info_requests += 1;
    if let Some(status) = s.status {
        let status = StatusCode::from_u16(status).unwrap();
        return reply(status, "text/plain", status.to_string().into_bytes());
    }
    let Some(cert) = s.seen.iter().find(|c| c.id == id).cloned() else {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            b"unknown certificate".to_vec(),
        );
    };
    let life = cert.not_after.saturating_sub(cert.not_before) as f64;
    let past = s.past.contains(&cert.id);
    let (start, end) = match past {
        true => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or(Duration::ZERO)
                .as_secs();
            (now - 120, now - 60)
        }
        false => (
            cert.not_before + (life * s.window.0) as u64,
            cert.not_before + (life * s.window.1) as u64,
        ),
    };
    let mut body =
        serde_json::json!({"suggestedWindow": {"start": rfc3339(start), "end": rfc3339(end)}});
    if past {
        body["explanationURL"] = serde_json::json!("https://ca.example/incident-2026-12");
    }
    let mut resp = reply(
        StatusCode::OK,
        "application/json",
        body.to_string().into_bytes(),
    );
    resp.headers_mut().insert(
        http::header::RETRY_AFTER,
        s.retry_after.to_string().parse().unwrap(),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_round_trips_and_matches_rfc_9773() {
        assert_eq!(base64url(&[0x00, 0x87, 0x65, 0x43, 0x21]), "AIdlQyE");
        assert_eq!(unbase64url("AIdlQyE"), [0x00, 0x87, 0x65, 0x43, 0x21]);
        assert_eq!(rfc3339(1_440_938_160), "2015-08-30T12:36:00Z");
    }
}
