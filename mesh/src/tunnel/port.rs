//! A tunnel port (`[[tunnels]]`): the app connects to a local address as if the target's
//! service were local; [`TunnelPort::connection`] is a connection's whole path.

use std::{net::SocketAddr, sync::Arc};

use gateway_client::{Target, Transport};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};

use crate::{
    config::TunnelConfig,
    metrics::Direction,
    outbound::Outbound,
    proxy::{self, Activity, Hold, IdleIo},
};

/// One `[[tunnels]]` listener, dialling through `outbound`'s gateway and routes.
pub struct TunnelPort {
    config: TunnelConfig,
    target: Target,
    outbound: Arc<Outbound>,
    connections: Arc<Semaphore>,
    drain: proxy::Drain,
}

impl std::fmt::Debug for TunnelPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelPort")
            .field("name", &self.config.name)
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl TunnelPort {
    /// The tunnel `config`, dialled with `outbound`'s tunnel connector.
    pub fn new(config: TunnelConfig, outbound: Arc<Outbound>) -> Self {
        let target = Target {
            app_id: config.target_app.clone(),
            port: config.target_port,
            instance: config.target_instance.clone(),
            transport: Transport::Mesh,
        };
        Self {
            connections: Arc::new(Semaphore::new(config.max_connections)),
            drain: proxy::Drain::default(),
            config,
            target,
            outbound,
        }
    }

    /// Stop with `drain` (SIGTERM) instead of a private one.
    pub fn with_drain(mut self, drain: proxy::Drain) -> Self {
        self.drain = drain;
        self
    }

    /// Its settings.
    pub fn config(&self) -> &TunnelConfig {
        &self.config
    }

    /// Where its connections go.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Tunnels open now.
    pub fn open_connections(&self) -> usize {
        self.config
            .max_connections
            .saturating_sub(self.connections.available_permits())
    }

    /// Bind the configured address.
    pub async fn bind(&self) -> std::io::Result<TcpListener> {
        TcpListener::bind(self.config.listen).await
    }

    /// Accept the app's connections until the future is dropped or the drain starts.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        while let Some((tcp, remote, hold)) =
            proxy::accept(&listener, &self.connections, None, "tunnel", &self.drain).await
        {
            tokio::spawn(self.clone().connection(tcp, remote, hold));
        }
    }

    /// One connection's whole path: open the tunnel (the target verified inside the
    /// handshake, its service's backend answered) → splice. On any failure the app's
    /// connection is closed and none of its bytes left this sidecar.
    async fn connection(self: Arc<Self>, tcp: TcpStream, remote: SocketAddr, hold: Hold) {
        let (name, target) = (self.config.name.as_str(), &self.target);
        let metrics = self.outbound.metrics();
        let Some(connector) = self.outbound.tunnel_connector() else {
            metrics.tunnel(Direction::Outbound, name, "no_route");
            tracing::warn!(tunnel = name, %target, "tunnel refused: the gateway is not known yet (discovery has not succeeded; set dstack.gateway_domain)");
            return;
        };
        let deadline = self.outbound.tunnel_deadline();
        let opened = match Box::pin(super::open(&connector, target, deadline)).await {
            Ok(opened) => opened,
            Err(e) => {
                e.count(metrics, name);
                tracing::warn!(tunnel = name, %target, %remote, error = %e, "tunnel failed: the app's connection is closed");
                return;
            }
        };
        opened.count(metrics, name);
        tracing::debug!(tunnel = name, %target, %remote, resumed = opened.resumed, "tunnel open");
        let activity = Activity::new();
        let mut app = IdleIo::new(tcp, activity.clone());
        let mut stream = opened.stream;
        let ended = super::splice(&mut app, &mut stream, &activity, self.config.idle_timeout).await;
        tracing::debug!(tunnel = name, %target, ?ended, "tunnel closed");
        drop(hold);
    }
}
