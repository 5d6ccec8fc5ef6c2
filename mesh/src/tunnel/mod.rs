//! TCP between CVMs: what dstack-vpc's VPN carried, inside mutual RA-TLS.
//!
//! The client side (a `[[tunnels]]` port, or `CONNECT` on the outbound proxy), [`open`]: dial
//! the target through the gateway or a static route → mutual RA-TLS with the target's app id
//! verified inside the handshake (a resumed session's chain checked again after it) → wait for
//! the service's word that its backend answered → splice the app's connection to it.
//!
//! The service side ([`TcpService`], `[[inbound.tcp]]`): PROXY header (when the gateway sends
//! one) → handshake verifying the caller against the service's allowlist → connect the backend
//! → tell the caller → splice. The backend receives nothing from a caller the handshake
//! refused, and the app's bytes go nowhere before both sides are verified.
//!
//! The service's word is one byte after the handshake, sent only when the client offered the
//! tunnel ALPN ([`ratls::tls::TUNNEL_ALPN`]): a plain TLS client gets the bare splice.

mod port;
mod service;

use std::{sync::Arc, time::Duration};

use gateway_client::{ConnectError, Connector, Target};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite},
    net::TcpStream,
};
use tokio_rustls::client::TlsStream;

pub use port::TunnelPort;
pub use service::{TcpService, TcpServiceError};

use crate::{
    metrics::{Direction, Metrics},
    outbound::received_alert,
    proxy::{Activity, UpstreamError},
};

/// What a TCP service says once the caller is verified and its backend was tried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Ready {
    /// The backend answered: the splice starts.
    Ready = 0,
    /// The backend refused or could not be reached.
    BackendUnreachable = 1,
    /// The backend did not answer within the service's connect deadline.
    BackendTimeout = 2,
}

impl Ready {
    fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(Self::Ready),
            1 => Some(Self::BackendUnreachable),
            2 => Some(Self::BackendTimeout),
            _ => None,
        }
    }
}

/// Buffer per direction of a splice: one TLS record, so a full record moves in one write.
const SPLICE_BUFFER: usize = 16 << 10;

/// Why a tunnel could not be opened. Nothing of the app's reached the target.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// No route, TCP, or the verified handshake (a wrong peer is refused inside it).
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The target's service refused this sidecar's certificate (its allowlist).
    #[error("the target refused this app ({0}): is it on the service's allowed_apps?")]
    Rejected(String),
    /// The target's service could not reach its backend.
    #[error("the target's service could not reach its backend ({0:?})")]
    Backend(Ready),
    /// The service said nothing in time.
    #[error("the target's service did not answer within {0:?} after the handshake")]
    Timeout(Duration),
    /// The service closed the connection or broke the protocol.
    #[error("the target's service failed: {0}")]
    Failed(String),
}

impl OpenError {
    /// As the outbound proxy's errors, so `CONNECT` answers as a request would.
    pub fn upstream(&self, target: &Target) -> UpstreamError {
        let (upstream, reason) = (target.to_string(), self.to_string());
        match self {
            Self::Connect(ConnectError::Timeout { .. }) | Self::Timeout(_) => {
                UpstreamError::ConnectTimeout { upstream, reason }
            }
            Self::Connect(ConnectError::Refused { rejection, .. }) => UpstreamError::Refused {
                upstream,
                rejection: rejection.clone(),
                reason,
            },
            Self::Connect(_) => UpstreamError::Connect { upstream, reason },
            Self::Rejected(_) => UpstreamError::Rejected { upstream, reason },
            Self::Backend(Ready::BackendTimeout) => {
                UpstreamError::ConnectTimeout { upstream, reason }
            }
            Self::Backend(_) | Self::Failed(_) => UpstreamError::Failed { upstream, reason },
        }
    }

    /// Count this failure of the tunnel `name` (and a peer refused in the handshake as a
    /// handshake failure).
    pub fn count(&self, metrics: &Metrics, name: &str) {
        metrics.tunnel(Direction::Outbound, name, self.outcome());
        if let Self::Connect(ConnectError::Refused { rejection, .. }) = self {
            metrics.handshake_failure(Direction::Outbound, rejection.reason());
        }
    }

    /// A bounded word for metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::Connect(ConnectError::Refused { .. }) => "peer_refused",
            Self::Connect(ConnectError::Timeout { .. }) | Self::Timeout(_) => "timeout",
            Self::Connect(_) => "peer_unreachable",
            Self::Rejected(_) => "rejected_by_peer",
            Self::Backend(_) => "backend_unreachable",
            Self::Failed(_) => "failed",
        }
    }
}

/// An open tunnel to a verified target whose backend answered.
#[derive(Debug)]
pub struct Opened {
    /// The stream.
    pub stream: TlsStream<TcpStream>,
    /// Whether the TLS session was resumed.
    pub resumed: bool,
    /// Whether a resumed session failed first (a chain that no longer passed, on either side)
    /// and a full handshake replaced it.
    pub replaced_stale: bool,
    /// The peer's verified app id and instance.
    pub peer: Option<ratls::VerifiedPeer>,
}

impl Opened {
    /// Count this opening of the tunnel `name`: `ok`, and `resumed` or `stale_session` besides.
    pub fn count(&self, metrics: &Metrics, name: &str) {
        metrics.tunnel(Direction::Outbound, name, "ok");
        if self.resumed {
            metrics.tunnel(Direction::Outbound, name, "resumed");
        }
        if self.replaced_stale {
            metrics.tunnel(Direction::Outbound, name, "stale_session");
        }
    }
}

/// Dial `target` with `connector` (a tunnel connector: tunnel ALPN, resumption) and wait up to
/// `deadline` for its service's word. A resumed session the service refused after the handshake
/// (a certificate that expired since the session began) is forgotten and replaced by one full
/// handshake.
pub async fn open(
    connector: &Connector,
    target: &Target,
    deadline: Duration,
) -> Result<Opened, OpenError> {
    match attempt(connector, target, deadline).await {
        Err((OpenError::Rejected(_) | OpenError::Failed(_), true)) => {
            connector.forget(target);
            let mut opened = attempt(connector, target, deadline)
                .await
                .map_err(|(e, _)| e)?;
            opened.replaced_stale = true;
            Ok(opened)
        }
        result => result.map_err(|(e, _)| e),
    }
}

/// One connection and the service's word; on failure, whether the session was resumed.
async fn attempt(
    connector: &Connector,
    target: &Target,
    deadline: Duration,
) -> Result<Opened, (OpenError, bool)> {
    let connected = connector
        .connect(target)
        .await
        .map_err(|e| (e.into(), false))?;
    let resumed = connected.resumed;
    let mut stream = connected.stream;
    if stream.get_ref().1.alpn_protocol() == Some(ratls::tls::TUNNEL_ALPN) {
        let mut word = [0u8; 1];
        let failed = match tokio::time::timeout(deadline, stream.read(&mut word)).await {
            Err(_) => Some(OpenError::Timeout(deadline)),
            Ok(Ok(0)) => Some(OpenError::Failed(
                "closed before saying whether its backend answered".into(),
            )),
            Ok(Ok(_)) => match Ready::from_byte(word[0]) {
                Some(Ready::Ready) => None,
                Some(refused) => Some(OpenError::Backend(refused)),
                None => Some(OpenError::Failed(format!("unknown status {}", word[0]))),
            },
            // TLS 1.3: a client learns that its certificate was refused only now.
            Ok(Err(e)) => Some(match received_alert(&e) {
                Some(alert) => OpenError::Rejected(alert),
                None => OpenError::Failed(e.to_string()),
            }),
        };
        if let Some(e) = failed {
            return Err((e, resumed));
        }
    }
    Ok(Opened {
        stream,
        resumed,
        replaced_stale: connected.replaced_stale,
        peer: connected.peer,
    })
}

/// How a splice ended.
#[derive(Debug)]
pub enum Ended {
    /// Both directions ended; the bytes moved (a → b, b → a).
    Done(u64, u64),
    /// A side failed (reset, TLS error).
    Failed(std::io::Error),
    /// Nothing moved for the idle limit.
    Idle(Duration),
}

/// Copy both ways between `a` and `b` until both directions have ended (an end of stream on
/// one side is passed on as a half-close, and the other direction goes on), either fails, or
/// nothing moves for `idle`. Bytes are relayed as they arrive, never gathered.
pub async fn splice<A, B>(a: &mut A, b: &mut B, activity: &Arc<Activity>, idle: Duration) -> Ended
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::select! {
        result = tokio::io::copy_bidirectional_with_sizes(a, b, SPLICE_BUFFER, SPLICE_BUFFER) => {
            match result {
                Ok((up, down)) => Ended::Done(up, down),
                Err(e) => Ended::Failed(e),
            }
        }
        _ = activity.idle_for(idle) => Ended::Idle(idle),
    }
}
