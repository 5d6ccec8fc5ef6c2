//! Client for the dstack guest agent (`dstack.sock`).
//!
//! The agent speaks HTTP: `POST /<Method>` with a JSON body. The JSON content type is not
//! optional: without it the agent decodes the body as protobuf. Errors come back as `400` with
//! `{"error": "…"}`. Every call has a deadline and every error names the address and the method.

use std::{fmt, path::PathBuf, str::FromStr, time::Duration};

use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use hyperlocal::UnixConnector;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// The agent's socket in a dstack CVM.
pub const DEFAULT_SOCKET: &str = "/var/run/dstack.sock";
/// The socket of the legacy agent (tappd), tried last.
pub const LEGACY_SOCKET: &str = "/var/run/tappd.sock";
/// Environment variable that names the agent's address (`unix:/path` or `http://host:port`).
pub const ADDRESS_ENV: &str = "DSTACK_AGENT_ADDRESS";
/// Default deadline for one call, connection and body included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Responses larger than this are refused (a quote with its event log is about 45 kB).
pub const MAX_RESPONSE_BYTES: usize = 4 << 20;

/// Where the agent listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentAddress {
    /// A Unix socket (`unix:/path` or a bare absolute/relative path).
    Unix(PathBuf),
    /// An HTTP base URL (`http://host:port`), e.g. the simulator behind socat.
    Http(String),
}

impl fmt::Display for AgentAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
            Self::Http(u) => f.write_str(u),
        }
    }
}

impl FromStr for AgentAddress {
    type Err = AgentError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Some(path) = s.strip_prefix("unix:") {
            // `unix://path` and `unix:path` both occur in the wild.
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(AgentError::BadAddress(s.to_owned()));
            }
            Ok(Self::Unix(path.into()))
        } else if s.starts_with("http://") {
            let uri: http::Uri = s
                .parse()
                .map_err(|_| AgentError::BadAddress(s.to_owned()))?;
            if uri.host().is_none() {
                return Err(AgentError::BadAddress(s.to_owned()));
            }
            Ok(Self::Http(s.trim_end_matches('/').to_owned()))
        } else if !s.is_empty() && !s.contains("://") {
            Ok(Self::Unix(s.into()))
        } else {
            Err(AgentError::BadAddress(s.to_owned()))
        }
    }
}

impl AgentAddress {
    /// The addresses to try, in order: the configured one; else `DSTACK_AGENT_ADDRESS`; else the
    /// default socket, then the legacy one.
    pub fn candidates(
        configured: Option<&str>,
        env: Option<&str>,
    ) -> Result<Vec<AgentAddress>, AgentError> {
        let given = |s: &&str| !s.trim().is_empty();
        match configured.filter(given).or(env.filter(given)) {
            Some(addr) => Ok(vec![addr.parse()?]),
            None => Ok(vec![
                Self::Unix(DEFAULT_SOCKET.into()),
                Self::Unix(LEGACY_SOCKET.into()),
            ]),
        }
    }

    fn is_legacy(&self) -> bool {
        matches!(self, Self::Unix(p) if p.file_name().is_some_and(|n| n == "tappd.sock"))
    }
}

/// A failed agent call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The address is neither `unix:/path` nor `http://host:port`.
    #[error("invalid guest agent address {0:?} (expected unix:/path or http://host:port)")]
    BadAddress(String),
    /// No candidate address answered.
    #[error("no dstack guest agent reachable; tried: {}", .tried.join("; "))]
    NotFound {
        /// Each address with why it failed.
        tried: Vec<String>,
    },
    /// Connecting or sending failed.
    #[error("guest agent {address} {method}: {reason}")]
    Transport {
        /// The agent's address.
        address: String,
        /// The method called.
        method: String,
        /// What failed.
        reason: String,
    },
    /// No answer within the deadline.
    #[error("guest agent {address} {method}: no answer within {timeout:?}")]
    Timeout {
        /// The agent's address.
        address: String,
        /// The method called.
        method: String,
        /// The deadline.
        timeout: Duration,
    },
    /// The agent answered with an error.
    #[error("guest agent {address} {method}: HTTP {status}: {message}")]
    Agent {
        /// The agent's address.
        address: String,
        /// The method called.
        method: String,
        /// HTTP status.
        status: u16,
        /// The agent's `error` field, or the start of the body.
        message: String,
    },
    /// The answer is not the JSON expected.
    #[error("guest agent {address} {method}: unexpected response: {reason}")]
    BadResponse {
        /// The agent's address.
        address: String,
        /// The method called.
        method: String,
        /// What did not parse.
        reason: String,
    },
    /// The method does not exist on the legacy (tappd) agent.
    #[error("guest agent {address} is the legacy tappd agent, which has no {method}")]
    Unsupported {
        /// The agent's address.
        address: String,
        /// The method called.
        method: String,
    },
}

/// `Info`: who this CVM is. Hex ids; JSON documents embedded as strings.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct InfoResponse {
    /// Application id (hex).
    pub app_id: String,
    /// Instance id (hex).
    pub instance_id: String,
    /// A demo RA-TLS certificate chain (PEM).
    pub app_cert: String,
    /// TCB measurements (a JSON document as a string).
    pub tcb_info: String,
    /// The app's name from app-compose.
    pub app_name: String,
    /// Device id (hex).
    pub device_id: String,
    /// Aggregated measurement (hex).
    pub mr_aggregated: String,
    /// OS image hash (hex).
    pub os_image_hash: String,
    /// Key provider (a JSON document as a string).
    pub key_provider_info: String,
    /// App-compose hash (hex).
    pub compose_hash: String,
    /// VM configuration (a JSON document as a string).
    pub vm_config: String,
    /// Cloud vendor, when known.
    pub cloud_vendor: String,
    /// Cloud product, when known.
    pub cloud_product: String,
}

/// `GetTlsKey` request. `not_before`/`not_after` are unix seconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct TlsKeyRequest {
    /// Subject CN.
    pub subject: String,
    /// SANs (DNS names or IP literals).
    pub alt_names: Vec<String>,
    /// Embed an attestation bound to the key.
    pub usage_ra_tls: bool,
    /// EKU serverAuth.
    pub usage_server_auth: bool,
    /// EKU clientAuth.
    pub usage_client_auth: bool,
    /// Embed the app-info extension (carries the app id on simulator certificates).
    pub with_app_info: bool,
    /// Start of validity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_before: Option<u64>,
    /// End of validity. Without it the agent issues a ten-year certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_after: Option<u64>,
}

/// The legacy tappd agent's `DeriveKey` request (its `GetTlsKey`). Without `random_seed` tappd
/// derives the key from `path` alone: every refresh and every restart would get the same
/// private key, the one any other process on the CVM gets by asking with the same path.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct DeriveKeyRequest {
    /// Key derivation path (unused with `random_seed`).
    pub path: String,
    /// Subject CN.
    pub subject: String,
    /// SANs.
    pub alt_names: Vec<String>,
    /// Embed an attestation bound to the key.
    pub usage_ra_tls: bool,
    /// EKU serverAuth.
    pub usage_server_auth: bool,
    /// EKU clientAuth.
    pub usage_client_auth: bool,
    /// A fresh random key instead of the one derived from `path`.
    pub random_seed: bool,
}

impl DeriveKeyRequest {
    /// The `DeriveKey` request for `req`, asking for a fresh key.
    pub fn fresh(req: &TlsKeyRequest) -> Self {
        Self {
            path: "dstack-mesh/ra-tls".into(),
            subject: req.subject.clone(),
            alt_names: req.alt_names.clone(),
            usage_ra_tls: req.usage_ra_tls,
            usage_server_auth: req.usage_server_auth,
            usage_client_auth: req.usage_client_auth,
            random_seed: true,
        }
    }
}

/// `GetTlsKey` response: a PKCS#8 PEM key and the chain, leaf first, root last.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TlsKeyResponse {
    /// The private key (PEM).
    pub key: String,
    /// The certificates (PEM each), leaf first.
    pub certificate_chain: Vec<String>,
}

impl fmt::Debug for TlsKeyResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsKeyResponse")
            .field("key", &"<redacted>")
            .field("certificate_chain", &self.certificate_chain.len())
            .finish()
    }
}

/// `GetQuote` response.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct QuoteResponse {
    /// The TDX quote (hex).
    pub quote: String,
    /// The event log (a JSON document as a string).
    pub event_log: String,
    /// The report data as the quote carries it (hex, 64 bytes).
    pub report_data: String,
    /// VM configuration (a JSON document as a string).
    pub vm_config: String,
    /// The versioned attestation (hex), from newer agents.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attestation: Option<String>,
}

/// `GetKey` response: a key every instance of the app derives identically.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyResponse {
    /// The key (hex).
    pub key: String,
    /// Signatures chaining the key to the KMS (hex each).
    #[serde(default)]
    pub signature_chain: Vec<String>,
}

impl fmt::Debug for KeyResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyResponse")
            .field("key", &"<redacted>")
            .field("signature_chain", &self.signature_chain.len())
            .finish()
    }
}

/// `Version` response.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct VersionResponse {
    /// Agent version.
    pub version: String,
    /// Source revision.
    pub rev: String,
}

#[derive(Clone, Debug)]
enum Transport {
    Unix(Client<UnixConnector, Full<Bytes>>, PathBuf),
    Http(Client<HttpConnector, Full<Bytes>>, String),
}

/// A guest-agent client bound to one address. Cheap to clone (pooled connections are shared).
#[derive(Clone, Debug)]
pub struct AgentClient {
    address: AgentAddress,
    transport: Transport,
    timeout: Duration,
}

impl AgentClient {
    /// A client for `address` with the default deadline.
    pub fn new(address: AgentAddress) -> Self {
        let transport = match &address {
            AgentAddress::Unix(path) => Transport::Unix(
                Client::builder(TokioExecutor::new()).build(UnixConnector),
                path.clone(),
            ),
            AgentAddress::Http(base) => {
                let mut connector = HttpConnector::new();
                connector.set_connect_timeout(Some(DEFAULT_TIMEOUT));
                Transport::Http(
                    Client::builder(TokioExecutor::new()).build(connector),
                    base.clone(),
                )
            }
        };
        Self {
            address,
            transport,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Change the per-call deadline.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The address this client talks to.
    pub fn address(&self) -> &AgentAddress {
        &self.address
    }

    /// Try each candidate with `Info` and keep the first that answers.
    pub async fn discover(
        candidates: Vec<AgentAddress>,
        timeout: Duration,
    ) -> Result<(Self, InfoResponse), AgentError> {
        let mut tried = Vec::with_capacity(candidates.len());
        for address in candidates {
            if let AgentAddress::Unix(path) = &address {
                if !path.exists() {
                    tried.push(format!("{address} (no such socket)"));
                    continue;
                }
            }
            let client = Self::new(address.clone()).with_timeout(timeout);
            match client.info().await {
                Ok(info) => return Ok((client, info)),
                Err(e) => tried.push(format!("{address} ({e})")),
            }
        }
        Err(AgentError::NotFound { tried })
    }

    /// `Info`.
    pub async fn info(&self) -> Result<InfoResponse, AgentError> {
        self.call("Info", &serde_json::json!({})).await
    }

    /// `Version`.
    pub async fn version(&self) -> Result<VersionResponse, AgentError> {
        self.call("Version", &serde_json::json!({})).await
    }

    /// `GetTlsKey`.
    pub async fn get_tls_key(&self, req: &TlsKeyRequest) -> Result<TlsKeyResponse, AgentError> {
        if self.address.is_legacy() {
            if req.not_before.is_some() || req.not_after.is_some() {
                tracing::warn!(
                    address = %self.address,
                    "the legacy tappd agent ignores the requested validity: its certificates keep tappd's own lifetime"
                );
            }
            return self.call("DeriveKey", &DeriveKeyRequest::fresh(req)).await;
        }
        self.call("GetTlsKey", req).await
    }

    /// `GetQuote` with up to 64 bytes of report data (the agent zero-pads it).
    pub async fn get_quote(&self, report_data: &[u8]) -> Result<QuoteResponse, AgentError> {
        let body = serde_json::json!({ "report_data": hex::encode(report_data) });
        if self.address.is_legacy() {
            return self.call("RawQuote", &body).await;
        }
        self.call("GetQuote", &body).await
    }

    /// `GetKey`: the app's deterministic key for `path` and `purpose`.
    pub async fn get_key(&self, path: &str, purpose: &str) -> Result<KeyResponse, AgentError> {
        if self.address.is_legacy() {
            return Err(AgentError::Unsupported {
                address: self.address.to_string(),
                method: "GetKey".into(),
            });
        }
        self.call(
            "GetKey",
            &serde_json::json!({ "path": path, "purpose": purpose }),
        )
        .await
    }

    /// Call `method` with a JSON body and decode the JSON answer.
    pub async fn call<Req: Serialize + ?Sized, Resp: DeserializeOwned>(
        &self,
        method: &str,
        body: &Req,
    ) -> Result<Resp, AgentError> {
        let (status, bytes) = self.call_raw(method, body).await?;
        let bad = |reason: String| AgentError::BadResponse {
            address: self.address.to_string(),
            method: method.to_owned(),
            reason,
        };
        if status != StatusCode::OK {
            return Err(AgentError::Agent {
                address: self.address.to_string(),
                method: method.to_owned(),
                status: status.as_u16(),
                message: error_message(&bytes),
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))
    }

    /// Pass a request through to `method` as it came: `GET` with its query, or `POST` with its
    /// body and content type. Returns the status, content type and body as the agent sent them.
    /// The legacy agent (tappd) names its methods `/prpc/Tappd.<Method>`.
    pub async fn passthrough(
        &self,
        http_method: Method,
        method: &str,
        query: Option<&str>,
        content_type: Option<http::HeaderValue>,
        body: Bytes,
    ) -> Result<(StatusCode, Option<http::HeaderValue>, Bytes), AgentError> {
        let transport_err = |reason: String| AgentError::Transport {
            address: self.address.to_string(),
            method: method.to_owned(),
            reason,
        };
        let mut path = if self.address.is_legacy() {
            format!("/prpc/Tappd.{method}")
        } else {
            format!("/{method}")
        };
        if let Some(q) = query.filter(|q| !q.is_empty()) {
            path.push('?');
            path.push_str(q);
        }
        let mut builder = Request::builder().method(http_method);
        if let Some(ct) = content_type {
            builder = builder.header(header::CONTENT_TYPE, ct);
        }
        let fut = async {
            let resp = match &self.transport {
                Transport::Unix(client, socket) => {
                    let uri: http::Uri = hyperlocal::Uri::new(socket, &path).into();
                    let req = builder
                        .uri(uri)
                        .body(Full::from(body))
                        .map_err(|e| transport_err(e.to_string()))?;
                    client.request(req).await
                }
                Transport::Http(client, base) => {
                    let req = builder
                        .uri(format!("{base}{path}"))
                        .body(Full::from(body))
                        .map_err(|e| transport_err(e.to_string()))?;
                    client.request(req).await
                }
            }
            .map_err(|e| transport_err(crate::error_chain(&e)))?;
            let status = resp.status();
            let content_type = resp.headers().get(header::CONTENT_TYPE).cloned();
            let bytes = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| transport_err(format!("reading body: {e}")))?
                .to_bytes();
            Ok((status, content_type, bytes))
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| AgentError::Timeout {
                address: self.address.to_string(),
                method: method.to_owned(),
                timeout: self.timeout,
            })?
    }

    /// Call `method` and return the status and body as they came.
    pub async fn call_raw<Req: Serialize + ?Sized>(
        &self,
        method: &str,
        body: &Req,
    ) -> Result<(StatusCode, Bytes), AgentError> {
        let body = serde_json::to_vec(body).map_err(|e| AgentError::Transport {
            address: self.address.to_string(),
            method: method.to_owned(),
            reason: e.to_string(),
        })?;
        // tappd answers JSON only when asked with `?json`.
        let query = self.address.is_legacy().then_some("json");
        let json = http::HeaderValue::from_static("application/json");
        let (status, _, bytes) = self
            .passthrough(Method::POST, method, query, Some(json), body.into())
            .await?;
        Ok((status, bytes))
    }
}

/// The agent's words in an error answer: its `{"error": …}`, or the start of the body.
pub(crate) fn error_message(bytes: &[u8]) -> String {
    #[derive(Deserialize)]
    struct ErrorBody {
        error: String,
    }
    serde_json::from_slice::<ErrorBody>(bytes)
        .map(|e| e.error)
        .unwrap_or_else(|_| snippet(bytes))
}

fn snippet(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]);
    let text = text.trim();
    if text.is_empty() {
        "(empty body)".to_owned()
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blank_setting_does_not_hide_the_environment() {
        let env = Some("unix:/run/env.sock");
        for blank in [Some(""), Some("  "), None] {
            assert_eq!(
                AgentAddress::candidates(blank, env).unwrap(),
                [AgentAddress::Unix("/run/env.sock".into())]
            );
        }
        assert_eq!(
            AgentAddress::candidates(Some(" "), Some("")).unwrap(),
            [
                AgentAddress::Unix(DEFAULT_SOCKET.into()),
                AgentAddress::Unix(LEGACY_SOCKET.into())
            ]
        );
    }

    #[test]
    fn addresses_parse() {
        assert_eq!(
            "unix:///var/run/dstack.sock"
                .parse::<AgentAddress>()
                .unwrap(),
            AgentAddress::Unix("/var/run/dstack.sock".into())
        );
        assert_eq!(
            "http://127.0.0.1:8090/".parse::<AgentAddress>().unwrap(),
            AgentAddress::Http("http://127.0.0.1:8090".into())
        );
        for bad in ["unix:", "https://x", "http://", ""] {
            assert!(bad.parse::<AgentAddress>().is_err(), "{bad}");
        }
    }
}
