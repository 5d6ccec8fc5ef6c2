//! An attested TCP service (`[[inbound.tcp]]`): a caller is verified like a mesh caller, then
//! its stream is spliced to a local backend. [`TcpService::connection`] is a connection's whole
//! path.

use std::{net::SocketAddr, sync::Arc};

use ratls::{identity::RotatingIdentity, PeerRole, Policy, VerifiedPeer};
use rustls::ServerConfig;
use rustls_pki_types::UnixTime;
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_rustls::{server::TlsStream, TlsAcceptor};

use super::Ready;
use crate::{
    config::{InboundConfig, TcpServiceConfig},
    inbound::{linger, log_handshake_failure, proxy_protocol},
    metrics::{Direction, Metrics},
    proxy::{self, Activity, Hold, IdleIo},
    trust::{self, TrustError},
};

/// Why a TCP service could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TcpServiceError {
    /// A trust anchor is unusable.
    #[error(transparent)]
    Trust(#[from] TrustError),
    /// The TLS configuration was refused.
    #[error("inbound.tcp {name}: TLS: {source}")]
    Tls {
        /// The service.
        name: String,
        /// Why.
        source: rustls::Error,
    },
    /// Binding its listener failed.
    #[error("inbound.tcp {name}: listen {addr}: {source}")]
    Bind {
        /// The service.
        name: String,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// One `[[inbound.tcp]]` listener.
pub struct TcpService {
    config: TcpServiceConfig,
    tls: Arc<ServerConfig>,
    policy: Arc<Policy>,
    connections: Arc<Semaphore>,
    drain: proxy::Drain,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for TcpService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpService")
            .field("name", &self.config.name)
            .field("listen", &self.config.listen)
            .field("backend", &self.config.backend)
            .finish_non_exhaustive()
    }
}

impl TcpService {
    /// The service `config`, trusting what the inbound listener trusts (`inbound`'s anchors)
    /// and admitting the apps `config` allows.
    pub fn new(
        config: TcpServiceConfig,
        inbound: &InboundConfig,
        identity: &RotatingIdentity,
        attestor: Option<Arc<ratls::attested::Attestor>>,
    ) -> Result<Self, TcpServiceError> {
        let own = identity.current().app_id.clone();
        let policy = Arc::new(
            Policy::new(trust::mesh_anchors(inbound, identity)?)
                .allow(config.allow.resolve(&own))
                .require_attestation(config.require_attestation)
                .attested(attestor),
        );
        let tls = ratls::tls::tunnel_server_config(identity.resolver(), policy.clone()).map_err(
            |source| TcpServiceError::Tls {
                name: config.name.clone(),
                source,
            },
        )?;
        Ok(Self {
            connections: Arc::new(Semaphore::new(config.max_connections)),
            tls: Arc::new(tls),
            policy,
            drain: proxy::Drain::default(),
            metrics: Arc::default(),
            config,
        })
    }

    /// Stop with `drain` (SIGTERM) instead of a private one.
    pub fn with_drain(mut self, drain: proxy::Drain) -> Self {
        self.drain = drain;
        self
    }

    /// Count connections and refusals into `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// The metrics it counts into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Its settings.
    pub fn config(&self) -> &TcpServiceConfig {
        &self.config
    }

    /// Tunnels open now.
    pub fn open_connections(&self) -> usize {
        self.config
            .max_connections
            .saturating_sub(self.connections.available_permits())
    }

    /// Bind the configured address.
    pub async fn bind(&self) -> Result<TcpListener, TcpServiceError> {
        TcpListener::bind(self.config.listen)
            .await
            .map_err(|source| TcpServiceError::Bind {
                name: self.config.name.clone(),
                addr: self.config.listen,
                source,
            })
    }

    /// Accept connections until the future is dropped or the drain starts.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        while let Some((tcp, remote, hold)) =
            proxy::accept(&listener, &self.connections, None, "tcp", &self.drain).await
        {
            tokio::spawn(self.clone().connection(tcp, remote, hold));
        }
    }

    /// One connection's whole path: PROXY header → handshake (the caller verified inside it,
    /// a resumed session checked again) → the backend → the caller told → splice.
    async fn connection(self: Arc<Self>, tcp: TcpStream, remote: SocketAddr, hold: Hold) {
        let name = self.config.name.as_str();
        let activity = Activity::new();
        let io = IdleIo::new(tcp, activity.clone());
        let Some((mut tls, remote, peer)) = Box::pin(self.handshake(io, remote)).await else {
            return;
        };
        let tunnel_alpn = tls.get_ref().1.alpn_protocol() == Some(ratls::tls::TUNNEL_ALPN);
        // The backend only now: a refused caller never caused a connection to it.
        let mut backend = match self.backend(remote, &peer).await {
            Ok(backend) => backend,
            Err(word) => {
                if tunnel_alpn {
                    let _ = tls.write_all(&[word as u8]).await;
                    let _ = tls.flush().await;
                }
                let _ = tokio::time::timeout(self.config.connect_timeout, tls.shutdown()).await;
                self.metrics
                    .tunnel(Direction::Inbound, name, "backend_unreachable");
                return;
            }
        };
        if tunnel_alpn {
            let sent = async {
                tls.write_all(&[Ready::Ready as u8]).await?;
                tls.flush().await
            };
            if let Err(e) = sent.await {
                tracing::debug!(service = name, %remote, error = %e, "tcp caller left before the splice");
                return;
            }
        }
        self.metrics.tunnel(Direction::Inbound, name, "ok");
        let ended =
            super::splice(&mut tls, &mut backend, &activity, self.config.idle_timeout).await;
        tracing::debug!(service = name, %remote, caller = %peer.app_id, ?ended, "tcp tunnel closed");
        drop(hold);
    }

    /// PROXY header (when configured) and the handshake, under one deadline. The stream, the
    /// client's address and its verified identity; `None` when refused (logged and counted).
    async fn handshake(
        &self,
        mut io: IdleIo<TcpStream>,
        peer_addr: SocketAddr,
    ) -> Option<(TlsStream<IdleIo<TcpStream>>, SocketAddr, VerifiedPeer)> {
        let name = self.config.name.as_str();
        let accept = self.config.proxy_protocol;
        let mut remote = peer_addr;
        let handshake = async {
            if accept != proxy_protocol::Accept::Off {
                match proxy_protocol::read(&mut io, accept).await {
                    Ok(client) => remote = client.unwrap_or(peer_addr),
                    Err(e) => return Err((e.to_string(), None)),
                }
            }
            TlsAcceptor::from(self.tls.clone())
                .accept(io)
                .into_fallible()
                .await
                .map_err(|(e, io)| (e.to_string(), Some((e, io))))
        };
        let tls = match tokio::time::timeout(self.config.handshake_timeout, handshake).await {
            Ok(Ok(tls)) => tls,
            Ok(Err((e, None))) => {
                self.metrics
                    .handshake_failure(Direction::Inbound, "proxy_protocol");
                tracing::warn!(service = name, %peer_addr, error = %e, "tcp connection refused: PROXY protocol");
                return None;
            }
            Ok(Err((_, Some((e, io))))) => {
                let reason = log_handshake_failure(remote, &e);
                self.metrics.handshake_failure(Direction::Inbound, reason);
                Box::pin(linger(io)).await;
                return None;
            }
            Err(_) => {
                self.metrics
                    .handshake_failure(Direction::Inbound, "timeout");
                tracing::debug!(service = name, %remote, "tcp handshake timed out");
                return None;
            }
        };
        // A resumed session skipped the verifier: its restored chain meets the policy now.
        let conn = tls.get_ref().1;
        match ratls::verifier::session_identity(
            conn,
            &self.policy,
            PeerRole::Client,
            UnixTime::now(),
        ) {
            Ok(peer) => {
                let resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
                if resumed {
                    self.metrics.tunnel(Direction::Inbound, name, "resumed");
                }
                tracing::debug!(service = name, %remote, caller = %peer.app_id, resumed, "tcp caller verified");
                Some((tls, remote, peer))
            }
            Err(rejection) => {
                self.metrics
                    .handshake_failure(Direction::Inbound, rejection.reason());
                tracing::warn!(service = name, %remote, reason = rejection.reason(), detail = %rejection, "tcp caller refused");
                None
            }
        }
    }

    /// The backend, under the connect deadline; what to tell the caller when it fails.
    async fn backend(&self, remote: SocketAddr, peer: &VerifiedPeer) -> Result<TcpStream, Ready> {
        let backend = &self.config.backend;
        let name = self.config.name.as_str();
        let dial = TcpStream::connect((backend.host.as_str(), backend.port));
        match tokio::time::timeout(self.config.connect_timeout, dial).await {
            Ok(Ok(tcp)) => {
                let _ = tcp.set_nodelay(true);
                Ok(tcp)
            }
            Ok(Err(e)) => {
                tracing::warn!(service = name, %remote, caller = %peer.app_id, %backend, error = %e, "tcp backend unreachable");
                Err(Ready::BackendUnreachable)
            }
            Err(_) => {
                tracing::warn!(service = name, %remote, caller = %peer.app_id, %backend, timeout = ?self.config.connect_timeout, "tcp backend connect timed out");
                Err(Ready::BackendTimeout)
            }
        }
    }
}
