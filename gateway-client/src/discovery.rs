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
    /// The sys-config file could not be read or parsed.
    #[error("sys-config {path}: {reason}")]
    SysConfig {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The sys-config names no gateway.
    #[error("sys-config {0} lists no gateway_urls")]
    NoUrls(String),
    /// Every gateway failed.
    #[error("no gateway answered /prpc/Info; tried: {}", .tried.join("; "))]
    NoneAnswered {
        /// Each URL with why it failed.
        tried: Vec<String>,
    },
}

#[derive(Deserialize)]
struct SysConfig {
    #[serde(default)]
    gateway_urls: Vec<String>,
}

/// The gateway URLs listed in the sys-config file at `path`.
pub fn gateway_urls(path: &Path) -> Result<Vec<String>, DiscoveryError> {
    let err = |reason: String| DiscoveryError::SysConfig {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let config: SysConfig = serde_json::from_slice(&text).map_err(|e| err(e.to_string()))?;
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
            Ok(Err(e)) => tried.push(format!("{url} ({e})")),
            Err(_) => tried.push(format!("{url} (no answer within {timeout:?})")),
        }
    }
    Err(DiscoveryError::NoneAnswered { tried })
}

/// One `GET <url>/prpc/Info`.
async fn info(url: &str, tls: Arc<rustls::ClientConfig>) -> Result<GatewayInfo, String> {
    let uri: http::Uri = format!("{url}/prpc/Info")
        .parse()
        .map_err(|e| format!("bad URL: {e}"))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err("only http:// and https:// gateway URLs are supported".into()),
    };
    let host = uri.host().ok_or("URL without a host")?.to_owned();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp =
        tokio::net::TcpStream::connect((host.trim_start_matches('[').trim_end_matches(']'), port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
    let req = Request::builder()
        .method(Method::GET)
        .uri(uri.path_and_query().map_or("/prpc/Info", |p| p.as_str()))
        .header(
            http::header::HOST,
            uri.authority().map_or(host.as_str(), |a| a.as_str()),
        )
        .header(http::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = if https {
        let name = ServerName::try_from(host.clone()).map_err(|e| format!("server name: {e}"))?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        send(TokioIo::new(stream), req).await?
    } else {
        send(TokioIo::new(tcp), req).await?
    };
    let (status, body) = resp;
    if status != StatusCode::OK {
        return Err(format!("HTTP {status}"));
    }
    serde_json::from_slice(&body).map_err(|e| format!("Info is not the JSON expected: {e}"))
}

async fn send<T>(io: TokioIo<T>, req: Request<Empty<Bytes>>) -> Result<(StatusCode, Bytes), String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_INFO_BYTES)
        .collect()
        .await
        .map_err(|e| format!("reading Info: {e}"))?
        .to_bytes();
    Ok((status, body))
}

#[cfg(test)]
mod tests;
