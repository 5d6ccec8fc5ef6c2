//! Pooled, verified connections to peers: hyper's client pool on top of the gateway-client
//! connector.
//!
//! hyper's pool keys connections by URI authority, so each [`Target`] gets a synthetic
//! authority that encodes it exactly ([`PoolKey`]); the connector decodes it and dials. One
//! pool multiplexes requests over h2 when the peer negotiates it (another dstack-mesh), and
//! keeps HTTP/1.1 connections alive otherwise (nginx). WebSocket upgrades need HTTP/1.1, so
//! they use a second pool that offers only `http/1.1`.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use arc_swap::ArcSwapOption;
use gateway_client::{ConnectError, Connected as PeerConnection, Connector, Target, Transport};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{
        connect::{Connected, Connection},
        Client,
    },
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use ratls::AppId;
use tokio::{net::TcpStream, sync::Semaphore};
use tokio_rustls::client::TlsStream;

use crate::proxy::{self, Body, UpstreamError};

/// How long an h2 PING may go unanswered before the connection is dropped.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Idle HTTP/1.1 connections kept per target.
const MAX_IDLE_PER_TARGET: usize = 64;
/// Requests in flight to all peers at once; more wait within the response deadline.
const MAX_IN_FLIGHT: usize = 8192;

/// Pool settings.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Response-head deadline after the upload.
    pub response_timeout: Duration,
    /// Idle connections close after this.
    pub idle_timeout: Duration,
    /// h2 PING interval.
    pub keepalive_interval: Duration,
}

/// The connector behind both pools; swapped in when gateway discovery succeeds late.
pub(crate) type SharedConnector = Arc<ArcSwapOption<Connector>>;

/// Connections to peers, pooled per target.
#[derive(Clone)]
pub struct PeerPool {
    multiplexed: Client<PoolConnector, Body>,
    upgrades: Client<PoolConnector, Body>,
    in_flight: Arc<Semaphore>,
    config: PoolConfig,
}

impl std::fmt::Debug for PeerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerPool")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl PeerPool {
    /// Pools over `multiplexed` (offers h2 and http/1.1) and `upgrades` (http/1.1 only).
    pub(crate) fn new(
        multiplexed: SharedConnector,
        upgrades: SharedConnector,
        config: PoolConfig,
    ) -> Self {
        let client = |connector: SharedConnector| {
            Client::builder(TokioExecutor::new())
                .timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(config.idle_timeout)
                .pool_max_idle_per_host(MAX_IDLE_PER_TARGET)
                // The gateway cuts idle connections: PINGs keep a pooled h2 connection alive
                // and find a dead one before a request does.
                .http2_keep_alive_interval(config.keepalive_interval)
                .http2_keep_alive_timeout(KEEPALIVE_TIMEOUT)
                .http2_keep_alive_while_idle(true)
                // A request that meets a pooled connection closed under it, before any byte
                // of it was written, goes again on another connection.
                .retry_canceled_requests(true)
                // The caller's Host goes through; the pool key is not a name anyone should see.
                .set_host(false)
                .build(PoolConnector { connector })
        };
        Self {
            multiplexed: client(multiplexed),
            upgrades: client(upgrades),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            config,
        }
    }

    /// Send `req` to `target`: its URI's path and query are kept, the authority becomes the
    /// target's pool key. `upgrade` picks the HTTP/1.1-only pool.
    pub async fn send(
        &self,
        target: &Target,
        mut req: Request<Body>,
        upgrade: bool,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let key = PoolKey::of(target);
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::builder()
            .scheme("http")
            .authority(key.0.as_str())
            .path_and_query(path)
            .build()
            .map_err(|e| UpstreamError::Failed {
                upstream: target.to_string(),
                reason: format!("request URI: {e}"),
            })?;
        *req.version_mut() = http::Version::HTTP_11;
        let client = if upgrade {
            &self.upgrades
        } else {
            &self.multiplexed
        };
        let name = target.to_string();
        proxy::exchange(
            client,
            &self.in_flight,
            req,
            self.config.response_timeout,
            &name,
            |e| classify(e, &name),
        )
        .await
    }
}

/// A failure as the caller should see it: connect failures by their typed cause, and a peer
/// that refused our certificate (with TLS 1.3 the client learns that only after its
/// handshake, from the peer's alert) as a refusal, not a broken peer.
fn classify(e: &hyper_util::client::legacy::Error, target: &str) -> Option<UpstreamError> {
    let upstream = target.to_owned();
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(connect) = err.downcast_ref::<ConnectError>() {
            let reason = connect.to_string();
            return Some(match connect {
                ConnectError::Timeout { .. } => UpstreamError::ConnectTimeout { upstream, reason },
                ConnectError::Refused { .. } => UpstreamError::Refused { upstream, reason },
                _ => UpstreamError::Connect { upstream, reason },
            });
        }
        // h2 keeps its io cause out of `source()`.
        let io = err
            .downcast_ref::<std::io::Error>()
            .or_else(|| err.downcast_ref::<h2::Error>().and_then(h2::Error::get_io));
        if let Some(alert) = io.and_then(received_alert) {
            return Some(UpstreamError::Rejected {
                upstream,
                reason: format!(
                    "the peer refused this sidecar's certificate ({alert}): is this app on the target's allowlist, under a root it trusts?"
                ),
            });
        }
        source = err.source();
    }
    e.is_connect().then(|| UpstreamError::Connect {
        upstream,
        reason: crate::error_chain(e),
    })
}

/// The alert a peer ended the connection with. tokio-rustls hands it over as text only
/// (`InvalidData`, rustls's `Display` of `AlertReceived`), so the text is what there is.
fn received_alert(io: &std::io::Error) -> Option<String> {
    if let Some(rustls::Error::AlertReceived(alert)) =
        io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        return Some(format!("TLS alert {alert:?}"));
    }
    let text = io.get_ref()?.to_string();
    (io.kind() == std::io::ErrorKind::InvalidData && text.starts_with("received fatal alert"))
        .then_some(text)
}

/// A [`Target`] written as a URI authority, and read back by the connector: hyper pools by
/// authority, so two requests share connections exactly when they share a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PoolKey(String);

/// Label marking the gateway's own TLS (no mTLS).
const GATEWAY_TLS: &str = "gw";
/// Label marking the mesh (mTLS, verified peer).
const MESH: &str = "mesh";
/// Label for "any instance".
const ANY: &str = "any";

impl PoolKey {
    /// `<app>.<port>.<instance|any>.<mesh|gw>`.
    pub(crate) fn of(target: &Target) -> Self {
        let instance = target
            .instance
            .as_ref()
            .map_or_else(|| ANY.to_owned(), AppId::to_string);
        let transport = match target.transport {
            Transport::Mesh => MESH,
            Transport::GatewayTls => GATEWAY_TLS,
        };
        Self(format!(
            "{}.{}.{instance}.{transport}",
            target.app_id, target.port
        ))
    }

    /// The target a URI's authority names.
    pub(crate) fn target(uri: &Uri) -> Option<Target> {
        let mut labels = uri.host()?.split('.');
        let app_id = labels.next()?.parse().ok()?;
        let port = labels.next()?.parse().ok()?;
        let instance = match labels.next()? {
            ANY => None,
            id => Some(id.parse().ok()?),
        };
        let transport = match labels.next()? {
            MESH => Transport::Mesh,
            GATEWAY_TLS => Transport::GatewayTls,
            _ => return None,
        };
        if labels.next().is_some() {
            return None;
        }
        Some(Target {
            app_id,
            port,
            instance,
            transport,
        })
    }
}

/// What a pooled connection carries besides its bytes (copied into each response's
/// extensions by hyper).
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// The verified app id (`None` over the gateway's own TLS).
    pub app_id: Option<AppId>,
    /// The verified instance id, when the certificate names one.
    pub instance: Option<String>,
    /// Where the connection went.
    pub address: String,
}

/// Adapts the gateway-client connector to hyper's pool.
#[derive(Clone)]
struct PoolConnector {
    connector: SharedConnector,
}

impl tower::Service<Uri> for PoolConnector {
    type Response = PeerIo;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<PeerIo, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connector = self.connector.load_full();
        Box::pin(async move {
            let target = PoolKey::target(&uri)
                .ok_or_else(|| ConnectError::Config(format!("not a pool key: {uri}")))?;
            let connector = connector.ok_or_else(|| {
                ConnectError::Config(
                    "no gateway is known yet (discovery has not succeeded; set dstack.gateway_domain)"
                        .into(),
                )
            })?;
            let PeerConnection {
                stream,
                peer,
                h2,
                route,
            } = connector.connect(&target).await?;
            if target.transport == Transport::GatewayTls {
                tracing::warn!(target = %target, address = %route.connect, "unauthenticated connection through the gateway's own TLS (x-dstack-target-use-tls: false): the peer's identity is not verified");
            } else {
                tracing::debug!(target = %target, address = %route.connect, h2, "peer connection verified");
            }
            Ok(PeerIo {
                io: TokioIo::new(stream),
                h2,
                info: PeerInfo {
                    app_id: peer.as_ref().map(|p| p.app_id.clone()),
                    instance: peer.and_then(|p| p.instance_id),
                    address: route.connect.to_string(),
                },
            })
        })
    }
}

/// A verified peer connection, as hyper's pool holds it.
pub(crate) struct PeerIo {
    io: TokioIo<TlsStream<TcpStream>>,
    h2: bool,
    info: PeerInfo,
}

impl Connection for PeerIo {
    fn connected(&self) -> Connected {
        let connected = Connected::new().extra(self.info.clone());
        if self.h2 {
            connected.negotiated_h2()
        } else {
            connected
        }
    }
}

impl hyper::rt::Read for PeerIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for PeerIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(instance: Option<&str>, transport: Transport) -> Target {
        Target {
            app_id: "ea549f02e1a25fabd1cb788380e033ec5461b2ff".parse().unwrap(),
            port: 8080,
            instance: instance.map(|i| i.parse().unwrap()),
            transport,
        }
    }

    #[test]
    fn pool_keys_round_trip() {
        for t in [
            target(None, Transport::Mesh),
            target(
                Some("0123456789abcdef0123456789abcdef01234567"),
                Transport::Mesh,
            ),
            target(None, Transport::GatewayTls),
        ] {
            let key = PoolKey::of(&t);
            let uri: Uri = format!("http://{}/x", key.0).parse().unwrap();
            assert_eq!(PoolKey::target(&uri), Some(t));
        }
    }

    #[test]
    fn distinct_targets_get_distinct_keys() {
        let a = PoolKey::of(&target(None, Transport::Mesh));
        let b = PoolKey::of(&target(None, Transport::GatewayTls));
        let mut c = target(None, Transport::Mesh);
        c.port = 443;
        assert_ne!(a, b);
        assert_ne!(a, PoolKey::of(&c));
    }

    #[test]
    fn foreign_authorities_are_not_keys() {
        for uri in [
            "http://example.com/",
            "http://zz.443.any.mesh/",
            "http://ea549f02e1a25fabd1cb788380e033ec5461b2ff.0x.any.mesh/",
            "http://ea549f02e1a25fabd1cb788380e033ec5461b2ff.443.any.tcp/",
            "http://ea549f02e1a25fabd1cb788380e033ec5461b2ff.443.any.mesh.extra/",
        ] {
            assert_eq!(PoolKey::target(&uri.parse().unwrap()), None, "{uri}");
        }
    }
}
