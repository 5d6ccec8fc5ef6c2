//! Public domains in `tcp` mode (the decrypted stream spliced to the backend, any protocol, as
//! HAProxy's TCP mode does) and TLS-ALPN-01 validation connections.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{io::AsyncWriteExt, net::TcpStream};
use tokio_rustls::server::TlsStream;

use crate::{
    acme::Domain,
    config::InboundConfig,
    proxy::{Activity, IdleIo},
};

/// A validator only reads the certificate: say goodbye properly and close.
pub(super) async fn close_validation(mut tls: TlsStream<IdleIo<TcpStream>>, remote: SocketAddr) {
    let name = tls.get_ref().1.server_name().unwrap_or_default().to_owned();
    tracing::info!(%remote, %name, "TLS-ALPN-01 validation connection");
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.shutdown()).await;
}

/// Splice `tls` to the domain's backend until either side closes or the connection idles.
pub(super) async fn splice(
    config: &InboundConfig,
    domain: &Arc<Domain>,
    mut tls: TlsStream<IdleIo<TcpStream>>,
    remote: SocketAddr,
    activity: Arc<Activity>,
) {
    let backend = &domain.config.backend;
    let dial = TcpStream::connect((backend.host.as_str(), backend.port));
    let mut upstream = match tokio::time::timeout(config.backend_connect_timeout, dial).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            tracing::warn!(%remote, domain = %domain.name(), %backend, error = %e, "tcp backend unreachable");
            return;
        }
        Err(_) => {
            tracing::warn!(%remote, domain = %domain.name(), %backend, timeout = ?config.backend_connect_timeout, "tcp backend connect timed out");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    tokio::select! {
        result = tokio::io::copy_bidirectional(&mut tls, &mut upstream) => {
            if let Err(e) = result {
                tracing::debug!(%remote, domain = %domain.name(), error = %e, "tcp splice ended with an error");
            }
        }
        _ = activity.idle_for(config.idle_timeout) => {
            tracing::debug!(%remote, domain = %domain.name(), "tcp splice idle: closing");
        }
    }
}
