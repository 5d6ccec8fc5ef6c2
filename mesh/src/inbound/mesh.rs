//! The mesh branch: a caller whose certificate the handshake verified (chain to the mesh roots,
//! app id on the allowlist), served over HTTP to the mesh backend with its identity set.

use std::{net::SocketAddr, sync::Arc};

use ratls::verifier::peer_identity;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use super::{
    http::{self, Conn, Serving, Who},
    Inbound,
};
use crate::{
    metrics::Direction,
    proxy::{conn::Lifetime, Activity, CallerHeaders, Hold, IdleIo},
};

/// Set up HTTP for a verified caller: `None` when the connection carries no usable identity
/// (the verifier accepted it, so this is a resumed session or a bug; nothing is served).
pub(super) fn serve(
    inbound: &Inbound,
    tls: TlsStream<IdleIo<TcpStream>>,
    remote: SocketAddr,
    activity: Arc<Activity>,
    hold: Hold,
) -> Option<Serving> {
    let peer = match peer_identity(tls.get_ref().1) {
        Ok(peer) => peer,
        Err(e) => {
            tracing::warn!(%remote, reason = e.reason(), "mesh caller has no usable identity");
            return None;
        }
    };
    tracing::debug!(%remote, caller = %peer.app_id, "mesh connection");
    let config = &inbound.config;
    let conn = Conn {
        headers: CallerHeaders::new(
            Some(&peer.app_id.to_string()),
            peer.instance_id.as_deref(),
            remote.ip(),
            "https",
        ),
        metrics: inbound
            .metrics
            .peer(Direction::Inbound, &peer.app_id.to_string()),
        upstream: inbound.upstream.clone(),
        evidence: None,
        registry: inbound.registry.load_full(),
        lifetime: Lifetime {
            idle: Some((activity.clone(), config.idle_timeout)),
            reclaim: Some(inbound.reclaim.clone()),
            // The caller's certificate vouches for this connection only while it is valid.
            expires: http::remaining(peer.not_after),
            ..Lifetime::until_drain("inbound", remote, inbound.drain.clone())
        },
        who: Who::Peer(peer),
        activity,
        hold,
    };
    Some(http::serve(conn, tls, config))
}
