//! The connector: from a [`Target`] to a TLS stream whose peer has been verified.
//!
//! For the mesh, the handshake presents this sidecar's RA-TLS certificate and accepts only a
//! server whose chain reaches the trust anchors and whose app id is the target's; a wrong peer
//! fails inside the handshake, before any request byte is written. For the gateway's own TLS
//! (`x-dstack-target-use-tls: false`) the server is verified as ordinary WebPKI and the
//! connection is marked unauthenticated.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use ratls::{tls::CertResolver, AppId, PeerRole, Policy, Rejection, TrustAnchors, VerifiedPeer};
use rustls::client::ClientSessionMemoryCache;
use rustls_pki_types::{ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::{
    address::{AddressError, Addressing, Route},
    target::{Target, Transport},
};

/// Deadline for the TCP connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline for the TLS handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A verified connection to a target.
#[derive(Debug)]
pub struct Connected {
    /// The TLS stream.
    pub stream: TlsStream<TcpStream>,
    /// The peer's verified identity; `None` over the gateway's own TLS.
    pub peer: Option<VerifiedPeer>,
    /// Whether the peer chose h2.
    pub h2: bool,
    /// Whether the session was resumed (the peer's chain was checked again after it).
    pub resumed: bool,
    /// Whether a resumed session failed first (its chain no longer passed) and this full
    /// handshake replaced it.
    pub replaced_stale: bool,
    /// Where it went.
    pub route: Route,
}

/// Which step of connecting failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// TCP connect (including name resolution).
    Connect,
    /// TLS handshake.
    Handshake,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Connect => "connect",
            Self::Handshake => "TLS handshake",
        })
    }
}

/// Why a target could not be reached.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The target has no address.
    #[error(transparent)]
    NoRoute(#[from] AddressError),
    /// A step did not finish in time.
    #[error("{stage} to {addr} timed out after {timeout:?}")]
    Timeout {
        /// The step.
        stage: Stage,
        /// Where.
        addr: String,
        /// The deadline.
        timeout: Duration,
    },
    /// Connecting or the handshake failed.
    #[error("{stage} to {addr} failed: {reason}")]
    Failed {
        /// The step.
        stage: Stage,
        /// Where.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The peer is not who the target names: refused in the handshake.
    #[error("peer at {addr} refused: {rejection}")]
    Refused {
        /// Where.
        addr: String,
        /// What the verification said.
        rejection: Rejection,
    },
    /// Our own TLS settings could not be built.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Settings of a [`Connector`].
#[derive(Clone, Debug)]
pub struct ConnectorConfig {
    /// TCP connect deadline.
    pub connect_timeout: Duration,
    /// TLS handshake deadline.
    pub handshake_timeout: Duration,
    /// ALPN offered to mesh peers (h2 first, so sidecars multiplex).
    pub alpn: Vec<Vec<u8>>,
    /// Resume TLS sessions with mesh peers (tunnels: one connection per stream, no pool).
    pub resume: bool,
    /// Verify peers' quotes and hold them to an attestation policy, in the handshake.
    pub attestor: Option<Arc<ratls::attested::Attestor>>,
}

impl Default for ConnectorConfig {
    fn default() -> Self {
        Self {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            alpn: ratls::tls::MESH_ALPN.iter().map(|p| p.to_vec()).collect(),
            resume: false,
            attestor: None,
        }
    }
}

/// Most targets whose sessions are remembered; past it the memory starts afresh.
const MAX_RESUMED_TARGETS: usize = 1024;
/// Sessions remembered per target (rustls keeps a few tickets per server name in each).
const SESSIONS_PER_TARGET: usize = 32;
/// A target's sessions start afresh this long after its first full handshake: each resumed
/// session carries the certificates of that handshake forward, and certificates live a day
/// (refreshed at two thirds), so the chains a resumption restores are never near expiry.
const MAX_SESSION_AGE: Duration = Duration::from_secs(3600);

/// One TLS config per target app and instance, for resumption: rustls resumes only with the
/// config (verifier and certificate resolver) that made the session, and a per-target config
/// expects that target, so a session one app issued is never offered when another is the target
/// (a fixed or static address is one server name for many apps).
#[derive(Default)]
struct Resumable(Mutex<HashMap<TargetKey, (TargetTls, Instant)>>);

/// A target app and, when named, its instance.
type TargetKey = (AppId, Option<AppId>);

/// A target's policy and the config built on it.
type TargetTls = (Arc<Policy>, Arc<rustls::ClientConfig>);

impl Resumable {
    fn of(
        &self,
        target: &Target,
        build: impl FnOnce() -> Result<TargetTls, ConnectError>,
    ) -> Result<TargetTls, ConnectError> {
        let mut configs = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let key = (target.app_id.clone(), target.instance.clone());
        match configs.get(&key) {
            Some((found, made)) if made.elapsed() < MAX_SESSION_AGE => return Ok(found.clone()),
            _ => {}
        }
        if configs.len() >= MAX_RESUMED_TARGETS {
            configs.clear();
        }
        let built = build()?;
        configs.insert(key, (built.clone(), Instant::now()));
        Ok(built)
    }

    fn forget(&self, target: &Target) {
        let mut configs = self.0.lock().unwrap_or_else(|p| p.into_inner());
        configs.remove(&(target.app_id.clone(), target.instance.clone()));
    }
}

/// Dials targets and verifies them. Cheap to clone.
#[derive(Clone)]
pub struct Connector {
    inner: Arc<Inner>,
}

struct Inner {
    addressing: Addressing,
    resolver: CertResolver,
    anchors: TrustAnchors,
    /// For the gateway's own TLS: public roots.
    webpki: Option<Arc<rustls::ClientConfig>>,
    config: ConnectorConfig,
    /// With [`ConnectorConfig::resume`]: configs by target.
    resumable: Option<Resumable>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("addressing", &self.inner.addressing)
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// A connector presenting `resolver`'s certificate, trusting `anchors` for mesh peers and
    /// `webpki` (if given) for the gateway's own TLS.
    pub fn new(
        addressing: Addressing,
        resolver: CertResolver,
        anchors: TrustAnchors,
        webpki: Option<Arc<rustls::ClientConfig>>,
        config: ConnectorConfig,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                addressing,
                resolver,
                anchors,
                webpki,
                resumable: config.resume.then(Resumable::default),
                config,
            }),
        }
    }

    /// Where `target` would be dialled.
    pub fn route(&self, target: &Target) -> Result<Route, AddressError> {
        self.inner.addressing.route(target)
    }

    /// Dial `target` and complete the verified handshake. A resumed session whose restored
    /// chain no longer passes (a certificate expired since the session began) is forgotten and
    /// replaced by one full handshake.
    pub async fn connect(&self, target: &Target) -> Result<Connected, ConnectError> {
        match self.attempt(target).await {
            Err((_, true)) => {
                self.forget(target);
                let mut connected = self.attempt(target).await.map_err(|(e, _)| e)?;
                connected.replaced_stale = true;
                Ok(connected)
            }
            result => result.map_err(|(e, _)| e),
        }
    }

    /// Drop the sessions kept for `target`: its next connection makes a full handshake (a
    /// resumed one failed after the handshake, at the peer).
    pub fn forget(&self, target: &Target) {
        if let Some(resumable) = &self.inner.resumable {
            resumable.forget(target);
        }
    }

    /// One dial and handshake; on failure, whether the session was resumed.
    // Long on purpose: dial, then the verified handshake, each under its deadline, with the
    // typed error each step can give.
    async fn attempt(&self, target: &Target) -> Result<Connected, (ConnectError, bool)> {
        let inner = &self.inner;
        let fail = |e: ConnectError| (e, false);
        let route = inner.addressing.route(target).map_err(|e| fail(e.into()))?;
        let addr = route.connect.to_string();
        // A policy per target: the expected app id is what makes the peer the target.
        let (policy, tls) = match target.transport {
            Transport::Mesh => match &inner.resumable {
                Some(resumable) => resumable.of(target, || inner.mesh_config(target)),
                None => inner.mesh_config(target),
            }
            .map_err(fail)?,
            Transport::GatewayTls => {
                let webpki = inner.webpki.clone().ok_or_else(|| {
                    fail(ConnectError::Config(
                        "no public roots configured for the gateway's own TLS".into(),
                    ))
                })?;
                (Arc::new(Policy::new(inner.anchors.clone())), webpki)
            }
        };
        let name = ServerName::try_from(route.server_name.clone()).map_err(|e| {
            fail(ConnectError::Config(format!(
                "server name {}: {e}",
                route.server_name
            )))
        })?;

        let connect = TcpStream::connect((route.connect.host.as_str(), route.connect.port));
        let tcp = match tokio::time::timeout(inner.config.connect_timeout, connect).await {
            Err(_) => {
                return Err(fail(ConnectError::Timeout {
                    stage: Stage::Connect,
                    addr,
                    timeout: inner.config.connect_timeout,
                }))
            }
            Ok(Err(e)) => {
                return Err(fail(ConnectError::Failed {
                    stage: Stage::Connect,
                    addr,
                    reason: e.to_string(),
                }))
            }
            Ok(Ok(tcp)) => tcp,
        };
        let _ = tcp.set_nodelay(true);
        let handshake = tokio_rustls::TlsConnector::from(tls).connect(name, tcp);
        let stream = match tokio::time::timeout(inner.config.handshake_timeout, handshake).await {
            Err(_) => {
                return Err(fail(ConnectError::Timeout {
                    stage: Stage::Handshake,
                    addr,
                    timeout: inner.config.handshake_timeout,
                }))
            }
            Ok(Err(e)) => {
                let rejection = e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                    .and_then(Rejection::from_tls_error);
                return Err(fail(match rejection {
                    Some(rejection) => ConnectError::Refused { addr, rejection },
                    None => ConnectError::Failed {
                        stage: Stage::Handshake,
                        addr,
                        reason: e.to_string(),
                    },
                }));
            }
            Ok(Ok(stream)) => stream,
        };
        let conn = stream.get_ref().1;
        let h2 = conn.alpn_protocol() == Some(b"h2");
        let resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        let peer = match target.transport {
            // A resumed session's restored chain is held to the policy again, before any byte.
            Transport::Mesh => Some(
                ratls::verifier::session_identity(conn, &policy, PeerRole::Server, UnixTime::now())
                    .map_err(|rejection| {
                        let refused = ConnectError::Refused {
                            addr: addr.clone(),
                            rejection,
                        };
                        (refused, resumed)
                    })?,
            ),
            Transport::GatewayTls => None,
        };
        Ok(Connected {
            stream,
            peer,
            h2,
            resumed,
            replaced_stale: false,
            route,
        })
    }
}

impl Inner {
    /// The mesh TLS config for `target`: a policy expecting it, this sidecar's certificate,
    /// the configured ALPN; with resumption, a session store of its own.
    fn mesh_config(&self, target: &Target) -> Result<TargetTls, ConnectError> {
        let policy = Arc::new(
            Policy::new(self.anchors.clone())
                .expect(target.app_id.clone())
                .expect_instance(target.instance.clone())
                .attested(self.config.attestor.clone()),
        );
        let resolver = self.resolver.clone();
        let mut config = match self.resumable {
            Some(_) => {
                let sessions = Arc::new(ClientSessionMemoryCache::new(SESSIONS_PER_TARGET));
                ratls::tls::tunnel_client_config(resolver, policy.clone(), sessions)
            }
            None => ratls::tls::mesh_client_config(resolver, policy.clone()),
        }
        .map_err(|e| ConnectError::Config(e.to_string()))?;
        config.alpn_protocols = self.config.alpn.clone();
        Ok((policy, Arc::new(config)))
    }
}

impl tower::Service<Target> for Connector {
    type Response = Connected;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Connected, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, target: Target) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.connect(&target).await })
    }
}

#[cfg(test)]
mod tests;
