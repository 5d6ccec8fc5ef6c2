//! The PROXY protocol header a load balancer (the dstack gateway with `pp: true` in the app's
//! port policy, HAProxy's `send-proxy`/`send-proxy-v2`) writes before the client's first byte:
//! read exactly its bytes, nothing of the TLS that follows, and take the client's address from
//! it. The parsing itself is the `ppp` crate's; the policy (which versions, what a LOCAL or an
//! UNSPEC header means, limits) is ours.

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt};

pub use crate::config::ProxyProtocol as Accept;

/// The v2 signature (12 bytes).
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 header, CRLF included (the specification's bound).
const V1_MAX: usize = 107;
/// Longest v2 address block and TLVs accepted (a gateway sends addresses and a few TLVs).
const V2_MAX_BODY: usize = 1024;

/// Why a connection's PROXY header was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The connection does not start with a PROXY header of an accepted version.
    #[error("no PROXY protocol header (expected {0:?})")]
    Missing(Accept),
    /// The header does not parse.
    #[error("malformed PROXY header: {0}")]
    Malformed(String),
    /// Longer than the protocol allows (v1) or than we accept (v2).
    #[error("PROXY header longer than {0} bytes")]
    TooLong(usize),
    /// A PROXY command whose addresses are not TCP over IP (UNIX sockets): no client address.
    #[error("PROXY header with a {0} address: no client IP address to use")]
    NotIp(&'static str),
    /// The connection ended or failed inside the header.
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

/// Read the header `accept` requires from `io`; the client address it names, or `None` when it
/// names none (a LOCAL command, `PROXY UNKNOWN`, an UNSPEC address): the connection's own
/// peer then stands.
pub async fn read<IO: AsyncRead + Unpin>(
    io: &mut IO,
    accept: Accept,
) -> Result<Option<SocketAddr>, ProxyError> {
    // 12 bytes tell the versions apart and are never more than a header: the shortest v1
    // header (`PROXY UNKNOWN\r\n`) has 15.
    let mut head = [0u8; 12];
    io.read_exact(&mut head).await?;
    if &head == V2_SIGNATURE && matches!(accept, Accept::V2 | Accept::Any) {
        let mut fixed = [0u8; 4];
        io.read_exact(&mut fixed).await?;
        let len = usize::from(u16::from_be_bytes([fixed[2], fixed[3]]));
        if len > V2_MAX_BODY {
            return Err(ProxyError::TooLong(16 + V2_MAX_BODY));
        }
        let mut header = Vec::with_capacity(16 + len);
        header.extend_from_slice(&head);
        header.extend_from_slice(&fixed);
        header.resize(16 + len, 0);
        io.read_exact(&mut header[16..]).await?;
        return v2(&header);
    }
    if head.starts_with(b"PROXY ") && matches!(accept, Accept::V1 | Accept::Any) {
        let mut header = head.to_vec();
        while !header.ends_with(b"\r\n") {
            if header.len() >= V1_MAX {
                return Err(ProxyError::TooLong(V1_MAX));
            }
            let mut byte = [0u8; 1];
            io.read_exact(&mut byte).await?;
            header.push(byte[0]);
        }
        return v1(&header);
    }
    Err(ProxyError::Missing(accept))
}

/// [`read`] over bytes already in memory (fuzzing, tests): `input` is advanced past the header.
pub fn read_slice(input: &mut &[u8], accept: Accept) -> Result<Option<SocketAddr>, ProxyError> {
    use std::{
        future::Future,
        task::{Context, Poll, Waker},
    };
    // Reading from a slice never waits: one poll finishes it.
    let mut read = std::pin::pin!(read(input, accept));
    match read.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(result) => result,
        Poll::Pending => Err(ProxyError::Io(std::io::ErrorKind::WouldBlock.into())),
    }
}

fn v2(header: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
    use ppp::v2::{Addresses, Command, Header};
    let parsed = Header::try_from(header).map_err(|e| ProxyError::Malformed(e.to_string()))?;
    if parsed.command == Command::Local {
        // The proxy's own connection (a health check): its address is the real one.
        return Ok(None);
    }
    match parsed.addresses {
        Addresses::IPv4(a) => Ok(Some(SocketAddr::from((a.source_address, a.source_port)))),
        Addresses::IPv6(a) => Ok(Some(SocketAddr::from((a.source_address, a.source_port)))),
        // The specification: an unspecified family carries no address to use.
        Addresses::Unspecified => Ok(None),
        Addresses::Unix(_) => Err(ProxyError::NotIp("UNIX")),
    }
}

fn v1(header: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
    use ppp::v1::{Addresses, Header};
    let parsed = Header::try_from(header).map_err(|e| ProxyError::Malformed(e.to_string()))?;
    match parsed.addresses {
        Addresses::Tcp4(a) => Ok(Some(SocketAddr::from((a.source_address, a.source_port)))),
        Addresses::Tcp6(a) => Ok(Some(SocketAddr::from((a.source_address, a.source_port)))),
        Addresses::Unknown => Ok(None),
    }
}

#[cfg(test)]
mod tests;
