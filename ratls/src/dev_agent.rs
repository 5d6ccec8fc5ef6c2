//! A development guest agent: the dstack agent's JSON API on a Unix socket, backed by a local
//! CA instead of a TEE and a KMS.
//!
//! It issues the production chain shape `[leaf, per-app "Dstack App CA", root]` with the same
//! extensions the KMS writes (app id on leaf and App CA, usage `app:custom` / `app:ca`,
//! app-info when asked), so every code path that handles real certificates runs on a laptop.
//! Nothing it issues is attested: it never adds an attestation extension, its quotes are not
//! signed, and its `Info` says so. Several agents with different app ids and one state
//! directory share a root, so a multi-app mesh runs on one machine.

use std::{
    convert::Infallible,
    fs,
    io::Write,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use aws_lc_rs::{
    digest, hmac,
    rand::{SecureRandom, SystemRandom},
};
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use serde::Deserialize;
use tokio::net::UnixListener;

use crate::{
    agent::{
        InfoResponse, KeyResponse, QuoteResponse, TlsKeyRequest, TlsKeyResponse, VersionResponse,
    },
    ext::{self, oid, AppInfoFields, USAGE_APP, USAGE_APP_CA},
    AppId,
};

/// Printed at start and carried in responses where a field allows it.
pub const NOT_ATTESTED: &str =
    "dstack-mesh dev-agent: identities are NOT attested (local CA, no TEE); for development only";
/// Organization of every certificate the development agent issues.
pub const DEV_ORGANIZATION: &str = "Dstack dev-agent (NOT ATTESTED)";
/// Largest request body accepted.
const MAX_REQUEST_BYTES: usize = 64 << 10;
/// A client must send its request headers within this.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Lifetime of the root and of App CAs.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// How to run a development agent.
#[derive(Clone, Debug)]
pub struct DevAgentConfig {
    /// The app this agent speaks for.
    pub app_id: AppId,
    /// The instance id; default derived from the app id and the state directory.
    pub instance_id: Option<String>,
    /// The app name shown by `Info`.
    pub app_name: String,
    /// Where the shared root CA and the per-app CAs live.
    pub state_dir: PathBuf,
}

/// A failure to set up the development agent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DevAgentError {
    /// Reading or writing the state directory failed.
    #[error("dev-agent state {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A stored CA could not be used, or a certificate could not be made.
    #[error("dev-agent CA {what}: {reason}")]
    Ca {
        /// Which CA.
        what: String,
        /// Why.
        reason: String,
    },
}

/// The app id the development agent uses when none is given.
pub fn default_app_id() -> AppId {
    let d = digest::digest(&digest::SHA256, b"dstack-mesh dev-agent default app");
    AppId::from_bytes(&d.as_ref()[..20]).unwrap_or_else(|_| unreachable!("20 bytes"))
}

struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ca")
    }
}

/// A development agent: a local CA speaking the guest agent's API.
#[derive(Debug)]
pub struct DevAgent {
    app_id: AppId,
    instance_id: String,
    app_name: String,
    root: Ca,
    app_ca: Ca,
    key_secret: hmac::Key,
    rng: SystemRandom,
    /// A recorded `GetTlsKey` answer served instead of minting (real evidence in tests).
    recorded_tls_key: Option<TlsKeyResponse>,
}

impl DevAgent {
    /// Load or create the root (shared) and this app's CA in the state directory.
    pub fn new(config: DevAgentConfig) -> Result<Self, DevAgentError> {
        let dir = &config.state_dir;
        create_dir(dir)?;
        let root = load_or_create_ca(dir, "root-ca", root_params, None)?;
        let app_dir = dir.join("apps").join(config.app_id.to_string());
        create_dir(&app_dir)?;
        let app_ca = load_or_create_ca(
            &app_dir,
            "app-ca",
            || app_ca_params(&config.app_id),
            Some(&root.issuer),
        )?;
        let secret = load_or_create_secret(&dir.join("key-secret"))?;
        let app_ca_path = app_dir.join("app-ca.pem");
        let instance_id = match &config.instance_id {
            // Same rules as an app id: hex, 1 to 64 bytes.
            Some(given) => given
                .parse::<AppId>()
                .map_err(|e| DevAgentError::Ca {
                    what: "instance id".into(),
                    reason: e.to_string(),
                })?
                .to_string(),
            None => {
                let mut ctx = digest::Context::new(&digest::SHA256);
                ctx.update(config.app_id.as_bytes());
                ctx.update(dir.as_os_str().as_encoded_bytes());
                hex::encode(&ctx.finish().as_ref()[..20])
            }
        };
        let agent = Self {
            app_id: config.app_id,
            instance_id,
            app_name: config.app_name,
            root,
            app_ca,
            key_secret: hmac::Key::new(hmac::HMAC_SHA256, &secret),
            rng: SystemRandom::new(),
            recorded_tls_key: None,
        };
        agent.probe().map_err(|reason| DevAgentError::Ca {
            what: app_ca_path.display().to_string(),
            reason: format!("{reason} (a stale or mixed state directory? remove it to start over)"),
        })?;
        Ok(agent)
    }

    /// Issue one leaf and verify it as a peer would: catches a CA whose key does not match its
    /// certificate, or an App CA left from an earlier root.
    fn probe(&self) -> Result<(), String> {
        let resp = self.issue(&TlsKeyRequest {
            subject: "probe".into(),
            usage_server_auth: true,
            with_app_info: true,
            ..Default::default()
        })?;
        let chain =
            crate::cert::parse_pem_list(&resp.certificate_chain).map_err(|e| e.to_string())?;
        let anchors = crate::TrustAnchors::new(&chain[2..]).map_err(|e| e.to_string())?;
        crate::Policy::new(anchors)
            .expect(self.app_id.clone())
            .verify(
                &chain[0],
                &chain[1..2],
                crate::PeerRole::Server,
                rustls_pki_types::UnixTime::now(),
            )
            .map(drop)
            .map_err(|e| format!("issued certificate does not verify: {e}"))
    }

    /// The app id this agent speaks for.
    pub fn app_id(&self) -> &AppId {
        &self.app_id
    }

    /// The root certificate (PEM): the trust anchor of every agent sharing the state directory.
    pub fn root_pem(&self) -> &str {
        &self.root.cert_pem
    }

    /// Serve the API on `listener` until this future is dropped; connections end with it.
    pub async fn serve(self: Arc<Self>, listener: UnixListener) {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning or exiting.
                        tracing::warn!(error = %e, "dev-agent accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                // Reap finished connections so the set does not grow without bound.
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            };
            let agent = self.clone();
            connections.spawn(async move {
                let service = service_fn(move |req| {
                    let agent = agent.clone();
                    async move { Ok::<_, Infallible>(agent.handle(req).await) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(error = %e, "dev-agent connection ended with an error");
                }
            });
        }
    }

    /// Bind `socket` and serve on a background task. A stale socket (nobody listening) is
    /// replaced; a live socket, or anything that is not a socket, is left alone.
    pub fn spawn(
        self: Arc<Self>,
        socket: &Path,
    ) -> Result<tokio::task::JoinHandle<()>, DevAgentError> {
        let in_use = |what: &str| DevAgentError::Io {
            path: socket.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::AddrInUse, what.to_owned()),
        };
        if let Ok(meta) = fs::symlink_metadata(socket) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(in_use("exists and is not a socket; not replacing it"));
            }
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                return Err(in_use("another agent is listening on this socket"));
            }
            fs::remove_file(socket).map_err(|source| DevAgentError::Io {
                path: socket.to_owned(),
                source,
            })?;
        }
        let listener = UnixListener::bind(socket).map_err(|source| DevAgentError::Io {
            path: socket.to_owned(),
            source,
        })?;
        // Like the guest agent's socket, for every container of the machine whatever its
        // user (the sidecar's image runs as a non-root one).
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(socket, fs::Permissions::from_mode(0o666)).map_err(|source| {
            DevAgentError::Io {
                path: socket.to_owned(),
                source,
            }
        })?;
        Ok(tokio::spawn(self.serve(listener)))
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let method_name = req.uri().path().trim_start_matches('/').to_owned();
        if method_name.is_empty() || method_name.contains('/') {
            return text(StatusCode::NOT_FOUND, "404: not found");
        }
        let args = match self.read_args(req).await {
            Ok(args) => args,
            Err(msg) => return error(msg),
        };
        let result = match method_name.as_str() {
            "Info" => json(&self.info()),
            "Version" => json(&VersionResponse {
                version: format!("dstack-mesh-dev-agent {}", env!("CARGO_PKG_VERSION")),
                rev: "not-attested".into(),
            }),
            "GetTlsKey" => parse::<TlsKeyRequest>(args).and_then(|r| self.get_tls_key(&r)),
            "GetQuote" => parse::<QuoteArgs>(args).and_then(|r| self.get_quote(&r.report_data)),
            "GetKey" => parse::<KeyArgs>(args).map(|r| self.get_key(&r)),
            other => Err(format!("Service not found: {other}")),
        };
        match result {
            Ok(resp) => resp,
            Err(msg) => error(msg),
        }
    }

    /// JSON body for POST (with the JSON content type), query parameters for GET.
    async fn read_args(&self, req: Request<Incoming>) -> Result<serde_json::Value, String> {
        match *req.method() {
            Method::GET => query_args(req.uri().query().unwrap_or("")),
            Method::POST => {
                let is_json = req
                    .headers()
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.starts_with("application/json"));
                if !is_json {
                    // The real agent would decode the body as protobuf; say what happened.
                    return Err(
                        "dev-agent only speaks JSON: send Content-Type: application/json".into(),
                    );
                }
                let body = Limited::new(req.into_body(), MAX_REQUEST_BYTES)
                    .collect()
                    .await
                    .map_err(|e| format!("reading request body: {e}"))?
                    .to_bytes();
                if body.iter().all(u8::is_ascii_whitespace) {
                    return Ok(serde_json::json!({}));
                }
                serde_json::from_slice(&body).map_err(|e| e.to_string())
            }
            _ => Err("method not allowed: use GET or POST".into()),
        }
    }

    fn info(&self) -> InfoResponse {
        let zero32 = "00".repeat(32);
        InfoResponse {
            app_id: self.app_id.to_string(),
            instance_id: self.instance_id.clone(),
            app_cert: String::new(),
            tcb_info: serde_json::json!({ "notice": NOT_ATTESTED }).to_string(),
            app_name: self.app_name.clone(),
            device_id: zero32.clone(),
            mr_aggregated: zero32.clone(),
            os_image_hash: zero32.clone(),
            key_provider_info: serde_json::json!({ "name": "dev-agent", "id": "not-attested" })
                .to_string(),
            compose_hash: zero32,
            vm_config: serde_json::json!({ "dev_agent": true, "attested": false }).to_string(),
            cloud_vendor: "dstack-mesh dev-agent".into(),
            cloud_product: "NOT ATTESTED".into(),
        }
    }

    fn get_tls_key(&self, req: &TlsKeyRequest) -> Result<Response<Full<Bytes>>, String> {
        match &self.recorded_tls_key {
            Some(recorded) => json(recorded),
            None => json(&self.issue(req)?),
        }
    }

    /// Answer every `GetTlsKey` with `recorded` (a real agent's answer, such as the
    /// simulator's certificate whose quote a mock PCK chain signed) instead of minting one.
    pub fn with_recorded_tls_key(mut self, recorded: TlsKeyResponse) -> Self {
        self.recorded_tls_key = Some(recorded);
        self
    }

    /// Mint a leaf under this app's CA: the `[leaf, App CA, root]` chain and its key.
    fn issue(&self, req: &TlsKeyRequest) -> Result<TlsKeyResponse, String> {
        if let (Some(nb), Some(na)) = (req.not_before, req.not_after) {
            if nb >= na {
                return Err("not_before must be earlier than not_after".into());
            }
        }
        if req.usage_ra_tls {
            tracing::debug!("usage_ra_tls requested: the dev-agent issues no attestation");
        }
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, req.subject.clone());
        params.serial_number = Some(self.serial()?);
        params.subject_alt_names = req
            .alt_names
            .iter()
            .map(|n| san(n))
            .collect::<Result<_, _>>()?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if req.usage_server_auth {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        if req.usage_client_auth {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        params.not_before = req
            .not_before
            .map(unix_time)
            .transpose()?
            .unwrap_or_else(|| rcgen::date_time_ymd(1975, 1, 1));
        params.not_after = req
            .not_after
            .map(unix_time)
            .transpose()?
            .unwrap_or_else(|| time::OffsetDateTime::now_utc() + CA_VALIDITY);
        params
            .custom_extensions
            .push(extension(oid::APP_ID, self.app_id.as_bytes()));
        if req.with_app_info {
            let instance = hex::decode(&self.instance_id).unwrap_or_default();
            let info = ext::encode_app_info(&AppInfoFields {
                app_id: self.app_id.as_bytes(),
                compose_hash: &[0u8; 32],
                instance_id: &instance,
                device_id: &[0u8; 32],
                key_provider_info: br#"{"name":"dev-agent","id":"not-attested"}"#,
            });
            params
                .custom_extensions
                .push(CustomExtension::from_oid_content(oid::APP_INFO, info));
        }
        params
            .custom_extensions
            .push(extension(oid::CERT_USAGE, USAGE_APP.as_bytes()));
        let cert = params
            .signed_by(&key, &self.app_ca.issuer)
            .map_err(|e| format!("signing the leaf: {e}"))?;
        Ok(TlsKeyResponse {
            key: key.serialize_pem(),
            certificate_chain: vec![
                cert.pem(),
                self.app_ca.cert_pem.clone(),
                self.root.cert_pem.clone(),
            ],
        })
    }

    fn get_quote(&self, report_data_hex: &str) -> Result<Response<Full<Bytes>>, String> {
        let data = hex::decode(report_data_hex).map_err(|e| format!("{e}"))?;
        if data.len() > 64 {
            return Err("Report data is too long".into());
        }
        let mut report_data = [0u8; 64];
        report_data[..data.len()].copy_from_slice(&data);
        // A TDX v4 quote shape (header + TD report body) with an empty signature section, so
        // parsers find the report data where they expect it. It proves nothing.
        let mut quote = vec![0u8; 632 + 4];
        quote[0..2].copy_from_slice(&4u16.to_le_bytes());
        quote[4..8].copy_from_slice(&0x81u32.to_le_bytes());
        quote[568..632].copy_from_slice(&report_data);
        json(&QuoteResponse {
            quote: hex::encode(&quote),
            event_log: serde_json::json!([{ "imr": 3, "event": "dev-agent", "event_payload": hex::encode(NOT_ATTESTED) }]).to_string(),
            report_data: hex::encode(report_data),
            vm_config: serde_json::json!({ "dev_agent": true, "attested": false }).to_string(),
            attestation: None,
        })
    }

    fn get_key(&self, args: &KeyArgs) -> Response<Full<Bytes>> {
        // Deterministic per (app, path, purpose), like the KMS-derived keys: every agent that
        // shares the state directory derives the same key for the same app.
        let mut msg = Vec::new();
        for part in [
            self.app_id.as_bytes(),
            args.path.as_bytes(),
            args.purpose.as_bytes(),
        ] {
            msg.extend_from_slice(&(part.len() as u32).to_be_bytes());
            msg.extend_from_slice(part);
        }
        let tag = hmac::sign(&self.key_secret, &msg);
        json(&KeyResponse {
            key: hex::encode(tag.as_ref()),
            // The KMS signs derived keys; a development agent has nothing to sign with.
            signature_chain: Vec::new(),
        })
        .unwrap_or_else(error)
    }

    fn serial(&self) -> Result<SerialNumber, String> {
        let mut bytes = [0u8; 20];
        self.rng
            .fill(&mut bytes)
            .map_err(|_| "random number generator failed")?;
        bytes[0] &= 0x7f; // positive
        Ok(SerialNumber::from_slice(&bytes))
    }
}

#[derive(Deserialize)]
struct QuoteArgs {
    #[serde(default)]
    report_data: String,
}

#[derive(Deserialize)]
struct KeyArgs {
    #[serde(default)]
    path: String,
    #[serde(default)]
    purpose: String,
}

fn parse<T: serde::de::DeserializeOwned>(args: serde_json::Value) -> Result<T, String> {
    serde_json::from_value(args).map_err(|e| e.to_string())
}

/// GET query parameters as JSON: booleans must be exactly `true`/`false` and numbers decimal,
/// as the real agent wants; lists cannot be expressed.
fn query_args(query: &str) -> Result<serde_json::Value, String> {
    let mut map = serde_json::Map::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v)?;
        if map.contains_key(k) {
            return Err(format!("Multiple values for one key: {k}"));
        }
        let value = match k {
            "usage_ra_tls" | "usage_server_auth" | "usage_client_auth" | "with_app_info" => {
                match v.as_str() {
                    "true" => serde_json::Value::Bool(true),
                    "false" => serde_json::Value::Bool(false),
                    _ => return Err("provided string was not `true` or `false`".into()),
                }
            }
            "not_before" | "not_after" => {
                serde_json::Value::from(v.parse::<u64>().map_err(|e| format!("{k}: {e}"))?)
            }
            "alt_names" => return Err("alt_names: expected a sequence (use POST with JSON)".into()),
            _ => serde_json::Value::String(v),
        };
        map.insert(k.to_owned(), value);
    }
    Ok(serde_json::Value::Object(map))
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or("truncated percent escape")?;
                let hex = std::str::from_utf8(hex).map_err(|_| "bad percent escape")?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| "bad percent escape")?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| "query is not UTF-8".into())
}

fn san(name: &str) -> Result<rcgen::SanType, String> {
    Ok(match name.parse::<std::net::IpAddr>() {
        Ok(ip) => rcgen::SanType::IpAddress(ip),
        Err(_) => rcgen::SanType::DnsName(
            name.to_owned()
                .try_into()
                .map_err(|e| format!("alt name {name:?}: {e}"))?,
        ),
    })
}

fn unix_time(secs: u64) -> Result<time::OffsetDateTime, String> {
    i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .ok_or_else(|| format!("timestamp {secs} out of range"))
}

fn extension(oid: &[u64], payload: &[u8]) -> CustomExtension {
    CustomExtension::from_oid_content(oid, ext::wrap_octet_string(payload))
}

fn json<T: serde::Serialize>(value: &T) -> Result<Response<Full<Bytes>>, String> {
    let body = serde_json::to_vec(value).map_err(|e| e.to_string())?;
    Ok(response(StatusCode::OK, "application/json", body))
}

/// Errors as the real agent writes them: 400, pretty-printed `{"error": …}`.
fn error(message: String) -> Response<Full<Bytes>> {
    let body = serde_json::to_string_pretty(&serde_json::json!({ "error": message }))
        .unwrap_or_else(|_| "{}".into());
    response(
        StatusCode::BAD_REQUEST,
        "application/json",
        body.into_bytes(),
    )
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    response(status, "text/plain", body.as_bytes().to_vec())
}

fn response(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_str(content_type)
            .unwrap_or(http::HeaderValue::from_static("application/octet-stream")),
    );
    resp.headers_mut().insert(
        header::SERVER,
        http::HeaderValue::from_static("dstack-mesh dev-agent"),
    );
    resp
}

fn root_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = dn("Dstack KMS CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
    ];
    params.not_before = time::OffsetDateTime::now_utc() - Duration::from_secs(3600);
    params.not_after = time::OffsetDateTime::now_utc() + CA_VALIDITY;
    params
}

fn app_ca_params(app_id: &AppId) -> CertificateParams {
    let mut params = root_params();
    params.distinguished_name = dn("Dstack App CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.custom_extensions = vec![
        extension(oid::APP_ID, app_id.as_bytes()),
        extension(oid::CERT_USAGE, USAGE_APP_CA.as_bytes()),
    ];
    params
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, DEV_ORGANIZATION);
    dn.push(DnType::CommonName, cn);
    dn
}

fn create_dir(dir: &Path) -> Result<(), DevAgentError> {
    fs::create_dir_all(dir).map_err(|source| DevAgentError::Io {
        path: dir.to_owned(),
        source,
    })
}

/// Load `<name>.pem` + `<name>.key`, or create them. Creation publishes the pair with one
/// atomic rename of a directory-free bundle, so agents starting together agree on one CA.
fn load_or_create_ca(
    dir: &Path,
    name: &str,
    params: impl FnOnce() -> CertificateParams,
    signer: Option<&Issuer<'static, KeyPair>>,
) -> Result<Ca, DevAgentError> {
    let bundle = dir.join(format!("{name}.pem"));
    let ca_err = |reason: String| DevAgentError::Ca {
        what: bundle.display().to_string(),
        reason,
    };
    if !bundle.exists() {
        let key = KeyPair::generate().map_err(|e| ca_err(e.to_string()))?;
        let params = params();
        let cert = match signer {
            Some(issuer) => params.signed_by(&key, issuer),
            None => params.self_signed(&key),
        }
        .map_err(|e| ca_err(e.to_string()))?;
        let contents = format!("{}{}", cert.pem(), key.serialize_pem());
        publish_once(&bundle, contents.as_bytes())?;
    }
    let contents = fs::read_to_string(&bundle).map_err(|source| DevAgentError::Io {
        path: bundle.clone(),
        source,
    })?;
    let key_start = contents
        .find("-----BEGIN PRIVATE KEY-----")
        .ok_or_else(|| ca_err("no private key in bundle".into()))?;
    let (cert_pem, key_pem) = contents.split_at(key_start);
    let key = KeyPair::from_pem(key_pem).map_err(|e| ca_err(e.to_string()))?;
    let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| ca_err(e.to_string()))?;
    Ok(Ca {
        cert_pem: cert_pem.to_owned(),
        issuer,
    })
}

fn load_or_create_secret(path: &Path) -> Result<Vec<u8>, DevAgentError> {
    if !path.exists() {
        let mut secret = [0u8; 32];
        SystemRandom::new()
            .fill(&mut secret)
            .map_err(|_| DevAgentError::Ca {
                what: path.display().to_string(),
                reason: "random number generator failed".into(),
            })?;
        publish_once(path, hex::encode(secret).as_bytes())?;
    }
    let text = fs::read_to_string(path).map_err(|source| DevAgentError::Io {
        path: path.to_owned(),
        source,
    })?;
    hex::decode(text.trim()).map_err(|e| DevAgentError::Ca {
        what: path.display().to_string(),
        reason: format!("corrupt key secret: {e}"),
    })
}

/// Write `contents` to `path` unless it exists: a private temp file (0600, fsync) in the same
/// directory, linked into place without replacing; if another agent won the race, its file is
/// what everyone reads.
fn publish_once(path: &Path, contents: &[u8]) -> Result<(), DevAgentError> {
    let io = |source| DevAgentError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    // tempfile creates the file 0600 under a unique name.
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    tmp.write_all(contents).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    match tmp.persist_noclobber(path) {
        Ok(_) => Ok(()),
        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io(e.error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_rules_match_the_agent() {
        let args = query_args("subject=local%20host&usage_server_auth=true&not_after=5").unwrap();
        assert_eq!(args["subject"], "local host");
        assert_eq!(args["usage_server_auth"], true);
        assert_eq!(args["not_after"], 5);
        assert_eq!(
            query_args("usage_ra_tls=1").unwrap_err(),
            "provided string was not `true` or `false`"
        );
        assert!(query_args("subject=a&subject=b").is_err());
        assert!(query_args("alt_names=a").is_err());
        assert!(query_args("subject=%zz").is_err());
    }
}
