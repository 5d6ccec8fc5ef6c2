//! An mTLS HTTP client with a sidecar identity: what another dstack-mesh (or the original
//! client proxy) does when it calls this one.

use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use ratls::{identity::RotatingIdentity, tls::mesh_client_config, AppId, Policy};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

use crate::backend::ChannelBody;

/// The request body type of [`MeshClient`].
pub type ClientBody = BoxBody<Bytes, std::convert::Infallible>;

/// An empty body.
pub fn empty() -> ClientBody {
    Full::new(Bytes::new()).boxed()
}

/// A complete body.
pub fn full(bytes: impl Into<Bytes>) -> ClientBody {
    Full::new(bytes.into()).boxed()
}

/// A chunk-by-chunk body and its sender.
pub fn channel() -> (tokio::sync::mpsc::Sender<Bytes>, ClientBody) {
    let (tx, body) = ChannelBody::pair();
    (tx, body.boxed())
}

/// One HTTP connection over mTLS, HTTP/1.1 or h2 as ALPN decided.
pub enum MeshClient {
    /// HTTP/1.1.
    H1(hyper::client::conn::http1::SendRequest<ClientBody>),
    /// h2.
    H2(hyper::client::conn::http2::SendRequest<ClientBody>),
}

impl std::fmt::Debug for MeshClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::H1(_) => "MeshClient::H1",
            Self::H2(_) => "MeshClient::H2",
        })
    }
}

/// Dial `addr` with `identity`'s certificate, expecting `target`; `alpn` overrides the offer.
pub async fn tls_connect(
    identity: &RotatingIdentity,
    target: &AppId,
    addr: SocketAddr,
    alpn: Option<&[&[u8]]>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    tls_connect_after(identity, target, addr, alpn, &[], None).await
}

/// [`tls_connect`], writing `preface` (a PROXY protocol header, as a gateway does) first, from
/// the local address `source` when given (another loopback address than the gateway's).
pub async fn tls_connect_after(
    identity: &RotatingIdentity,
    target: &AppId,
    addr: SocketAddr,
    alpn: Option<&[&[u8]]>,
    preface: &[u8],
    source: Option<std::net::IpAddr>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let anchors = identity
        .current()
        .trust_anchors()
        .map_err(std::io::Error::other)?;
    tls_connect_trusting(identity, anchors, target, addr, alpn, preface, source).await
}

/// [`tls_connect_after`], trusting `anchors` for the server (a caller from another cluster,
/// whose own roots are not the server's).
pub async fn tls_connect_trusting(
    identity: &RotatingIdentity,
    anchors: ratls::TrustAnchors,
    target: &AppId,
    addr: SocketAddr,
    alpn: Option<&[&[u8]]>,
    preface: &[u8],
    source: Option<std::net::IpAddr>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let policy = Arc::new(Policy::new(anchors).expect(target.clone()));
    let mut config =
        mesh_client_config(identity.resolver(), policy).map_err(std::io::Error::other)?;
    if let Some(alpn) = alpn {
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    }
    let mut tcp = match source {
        None => TcpStream::connect(addr).await?,
        Some(ip) => {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(ip, 0))?;
            socket.connect(addr).await?
        }
    };
    if !preface.is_empty() {
        tokio::io::AsyncWriteExt::write_all(&mut tcp, preface).await?;
    }
    let name = ServerName::try_from(format!("{target}-443s.dstack.test"))
        .map_err(std::io::Error::other)?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

/// One plain HTTP/1.1 GET of `path` to `addr` (an outbound proxy, a backend), on its own
/// connection, with `headers`: the status and the body.
pub async fn http1_get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (http::StatusCode, Bytes) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = Request::get(path);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let resp = send.send_request(req.body(empty()).unwrap()).await.unwrap();
    let status = resp.status();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

/// Dial `addr` as a browser would for `name`: WebPKI verification against `roots` (PEM),
/// no client certificate, ALPN `alpn`.
pub async fn public_connect(
    addr: SocketAddr,
    name: &str,
    roots_pem: &[u8],
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in ratls::cert::parse_chain(roots_pem).map_err(std::io::Error::other)? {
        roots.add(cert).map_err(std::io::Error::other)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(ratls::crypto::provider())
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)
        .map_err(std::io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(name.to_owned()).map_err(std::io::Error::other)?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

impl MeshClient {
    /// Connect and start HTTP on the negotiated protocol.
    pub async fn connect(
        identity: &RotatingIdentity,
        target: &AppId,
        addr: SocketAddr,
        alpn: Option<&[&[u8]]>,
    ) -> std::io::Result<Self> {
        let tls = tls_connect(identity, target, addr, alpn).await?;
        Self::over(tls).await
    }

    /// Start HTTP on an established TLS connection (the protocol ALPN chose).
    pub async fn over(tls: tokio_rustls::client::TlsStream<TcpStream>) -> std::io::Result<Self> {
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let io = TokioIo::new(tls);
        if h2 {
            let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(std::io::Error::other)?;
            tokio::spawn(conn);
            Ok(Self::H2(send))
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(std::io::Error::other)?;
            tokio::spawn(conn.with_upgrades());
            Ok(Self::H1(send))
        }
    }

    /// Whether h2 was negotiated.
    pub fn is_h2(&self) -> bool {
        matches!(self, Self::H2(_))
    }

    /// Send a request (the URI needs only a path for HTTP/1.1; h2 wants an authority).
    pub async fn send(&mut self, req: Request<ClientBody>) -> hyper::Result<Response<Incoming>> {
        match self {
            Self::H1(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
            Self::H2(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
        }
    }

    /// GET `path` with extra headers; the response body collected.
    pub async fn get(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> hyper::Result<(http::StatusCode, http::HeaderMap, Bytes)> {
        self.get_from("mesh.test", path, headers).await
    }

    /// GET `https://{host}{path}`; the response body collected.
    pub async fn get_from(
        &mut self,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> hyper::Result<(http::StatusCode, http::HeaderMap, Bytes)> {
        let mut req = Request::get(format!("https://{host}{path}"));
        let has_host = headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host"));
        if !self.is_h2() && !has_host {
            req = req.header(http::header::HOST, host);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self.send(req.body(empty()).expect("request")).await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, headers, body))
    }
}

/// Ask the outbound proxy at `outbound` for a WebSocket to `/ws` on app `target` (raw
/// HTTP/1.1, as a browser library would) and return the stream after a `101`.
pub async fn websocket_via(outbound: SocketAddr, target: &str) -> TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = TcpStream::connect(outbound).await.unwrap();
    tcp.write_all(
        format!(
            "GET /ws HTTP/1.1\r\nhost: b\r\nx-dstack-target-app: {target}\r\nconnection: upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tcp.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    tcp
}

/// Write `message` on `tcp` and read the same number of bytes back (within 10 s).
pub async fn echo(tcp: &mut TcpStream, message: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(message).await.unwrap();
    let mut echoed = vec![0u8; message.len()];
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tcp.read_exact(&mut echoed),
    )
    .await
    .unwrap()
    .unwrap();
    echoed
}

/// The connections each thread of the sidecar at `admin` accepted on `listener` (`inbound`,
/// `outbound`), from `dstack_mesh_accepted_connections_total`: one entry per thread that took any.
pub async fn accepted_per_thread(admin: SocketAddr, listener: &str) -> Vec<u64> {
    let (_, metrics) = http1_get(admin, "/metrics", &[]).await;
    let prefix = format!("dstack_mesh_accepted_connections_total{{listener=\"{listener}\"");
    String::from_utf8_lossy(&metrics)
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect()
}
