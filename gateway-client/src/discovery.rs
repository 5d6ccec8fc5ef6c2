//! Finding the gateway: its URLs from the CVM's sys-config, its base domain and external port
//! from `GET <url>/prpc/Info` on each until one answers.

use std::{path::Path, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use serde::Deserialize;

/// Where a dstack CVM finds its sys-config.
pub const DEFAULT_SYS_CONFIG: &str = "/dstack/.host-shared/.sys-config.json";
/// Deadline for one gateway's `/prpc/Info`, connection included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest `Info` answer read.
const MAX_INFO_BYTES: usize = 1 << 20;

/// What discovery needs from the gateway's `Info`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct GatewayInfo {
    /// The domain targets are named under (`<id>-<port>s.<base_domain>`).
    pub base_domain: String,
    /// The port the gateway listens on for passthrough.
    pub external_port: u16,
}

/// Why no gateway could be found.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    /// The sys-config file could not be read.
    #[error("sys-config {path}: {source}")]
    SysConfigRead {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The sys-config file is not the JSON expected.
    #[error("sys-config {path}: {source}")]
    SysConfigJson {
        /// The file.
        path: String,
        /// Why.
        source: serde_json::Error,
    },
    /// The sys-config names no gateway.
    #[error("sys-config {0} lists no gateway_urls")]
    NoUrls(String),
    /// Every gateway failed.
    #[error("no gateway answered /prpc/Info; tried: {}", describe(.tried))]
    NoneAnswered {
        /// Each URL with why it failed.
        tried: Vec<(String, InfoError)>,
    },
}

fn describe(tried: &[(String, InfoError)]) -> String {
    tried
        .iter()
        .map(|(url, e)| format!("{url} ({e})"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Why one gateway's `/prpc/Info` gave no answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InfoError {
    /// The URL does not parse, or is not `http://`/`https://` with a host.
    #[error("bad URL: {0}")]
    Url(String),
    /// Connecting failed.
    #[error("connect: {0}")]
    Connect(#[source] std::io::Error),
    /// The URL's host is not a TLS server name.
    #[error("server name: {0}")]
    ServerName(#[from] rustls_pki_types::InvalidDnsNameError),
    /// The TLS handshake failed.
    #[error("TLS: {0}")]
    Tls(#[source] std::io::Error),
    /// The HTTP exchange failed.
    #[error("{0}")]
    Http(#[from] hyper::Error),
    /// The request could not be built.
    #[error("{0}")]
    Request(#[from] http::Error),
    /// The answer's body broke off or was too long.
    #[error("reading Info: {0}")]
    Body(String),
    /// Not `200 OK`.
    #[error("HTTP {0}")]
    Status(StatusCode),
    /// The body is not `Info`.
    #[error("Info is not the JSON expected: {0}")]
    Json(#[from] serde_json::Error),
    /// No answer within the deadline.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

#[derive(Deserialize)]
struct SysConfig {
    #[serde(default)]
    gateway_urls: Vec<String>,
}

/// The gateway URLs listed in the sys-config file at `path`.
pub fn gateway_urls(path: &Path) -> Result<Vec<String>, DiscoveryError> {
    let text = std::fs::read(path).map_err(|source| DiscoveryError::SysConfigRead {
        path: path.display().to_string(),
        source,
    })?;
    let config: SysConfig =
        serde_json::from_slice(&text).map_err(|source| DiscoveryError::SysConfigJson {
            path: path.display().to_string(),
            source,
        })?;
    let urls: Vec<String> = config
        .gateway_urls
        .into_iter()
        .map(|u| u.trim().trim_end_matches('/').to_owned())
        .filter(|u| !u.is_empty())
        .collect();
    if urls.is_empty() {
        return Err(DiscoveryError::NoUrls(path.display().to_string()));
    }
    Ok(urls)
}

/// Ask each gateway for its `Info` until one answers. `tls` verifies `https://` gateways
/// (the dstack gateway serves its RPC with a KMS-issued certificate).
pub async fn discover(
    urls: &[String],
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<(String, GatewayInfo), DiscoveryError> {
    let mut tried = Vec::with_capacity(urls.len());
    for url in urls {
        match tokio::time::timeout(timeout, info(url, tls.clone())).await {
            Ok(Ok(info)) => return Ok((url.clone(), info)),
            Ok(Err(e)) => tried.push((url.clone(), e)),
            Err(_) => tried.push((url.clone(), InfoError::Timeout(timeout))),
        }
    }
    Err(DiscoveryError::NoneAnswered { tried })
}

/// One `GET <url>/prpc/Info`.
async fn info(url: &str, tls: Arc<rustls::ClientConfig>) -> Result<GatewayInfo, InfoError> {
    let uri: http::Uri = format!("{url}/prpc/Info")
        .parse()
        .map_err(|e: http::uri::InvalidUri| InfoError::Url(e.to_string()))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => {
            return Err(InfoError::Url(
                "only http:// and https:// gateway URLs are supported".into(),
            ))
        }
    };
    let host = uri
        .host()
        .ok_or_else(|| InfoError::Url("no host".into()))?
        .to_owned();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp =
        tokio::net::TcpStream::connect((host.trim_start_matches('[').trim_end_matches(']'), port))
            .await
            .map_err(InfoError::Connect)?;
    let req = Request::builder()
        .method(Method::GET)
        .uri(uri.path_and_query().map_or("/prpc/Info", |p| p.as_str()))
        .header(
            http::header::HOST,
            uri.authority().map_or(host.as_str(), |a| a.as_str()),
        )
        .header(http::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())?;
    let resp = if https {
        let name = ServerName::try_from(host.clone())?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(InfoError::Tls)?;
        send(TokioIo::new(stream), req).await?
    } else {
        send(TokioIo::new(tcp), req).await?
    };
    let (status, body) = resp;
    if status != StatusCode::OK {
        return Err(InfoError::Status(status));
    }
    Ok(serde_json::from_slice(&body)?)
}

async fn send<T>(
    io: TokioIo<T>,
    req: Request<Empty<Bytes>>,
) -> Result<(StatusCode, Bytes), InfoError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_INFO_BYTES)
        .collect()
        .await
        .map_err(|e| InfoError::Body(e.to_string()))?
        .to_bytes();
    Ok((status, body))
}

#[cfg(test)]
mod tests;
