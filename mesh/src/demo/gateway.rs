//! An SNI-passthrough gateway stand-in for the demo: what the dstack gateway does for
//! `<id>-<port>s.<base_domain>` names, in-process. It reads the ClientHello without
//! terminating TLS, picks the target by the server name, and splices the bytes through.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// Largest ClientHello record read before giving up.
const MAX_HELLO: usize = 16 << 10;
/// The ClientHello must arrive within this.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// The stand-in's routing table: app id (hex) → where its sidecar's inbound listens.
#[derive(Clone, Debug)]
pub struct SniGateway {
    base_domain: String,
    routes: Arc<HashMap<String, SocketAddr>>,
}

impl SniGateway {
    /// A gateway for `<id>-<port>s.<base_domain>` names.
    pub fn new(base_domain: &str, routes: HashMap<String, SocketAddr>) -> Self {
        Self {
            base_domain: base_domain.to_owned(),
            routes: Arc::new(routes),
        }
    }

    /// Where a server name goes: passthrough names (`s` suffix on the port) only.
    pub fn route(&self, server_name: &str) -> Option<SocketAddr> {
        let label = server_name
            .strip_suffix(&self.base_domain)?
            .strip_suffix('.')?;
        let (id, port) = label.rsplit_once('-')?;
        port.strip_suffix('s')?.parse::<u16>().ok()?;
        self.routes.get(id).copied()
    }

    /// Accept and splice until the future is dropped.
    pub async fn serve(self, listener: TcpListener) {
        while let Ok((tcp, _)) = listener.accept().await {
            let this = self.clone();
            tokio::spawn(async move {
                if let Err(e) = this.pass(tcp).await {
                    tracing::debug!(error = %e, "gateway stand-in dropped a connection");
                }
            });
        }
    }

    async fn pass(&self, mut client: TcpStream) -> std::io::Result<()> {
        let (hello, name) = tokio::time::timeout(HELLO_TIMEOUT, read_hello(&mut client))
            .await
            .map_err(|_| std::io::Error::other("no ClientHello in time"))??;
        let target = self
            .route(&name)
            .ok_or_else(|| std::io::Error::other(format!("no route for {name}")))?;
        let mut upstream = TcpStream::connect(target).await?;
        upstream.write_all(&hello).await?;
        tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
        Ok(())
    }
}

/// Read the first TLS record (the ClientHello) and the server name it asks for. The bytes are
/// returned to be sent on unchanged: the gateway never terminates the target's TLS.
async fn read_hello(tcp: &mut TcpStream) -> std::io::Result<(Vec<u8>, String)> {
    let mut buf = vec![0u8; 5];
    tcp.read_exact(&mut buf).await?;
    let len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if buf[0] != 0x16 || len > MAX_HELLO {
        return Err(std::io::Error::other("not a TLS handshake"));
    }
    buf.resize(5 + len, 0);
    tcp.read_exact(&mut buf[5..]).await?;
    let mut acceptor = rustls::server::Acceptor::default();
    acceptor.read_tls(&mut buf.as_slice())?;
    let accepted = acceptor
        .accept()
        .map_err(|(e, _)| std::io::Error::other(e))?
        .ok_or_else(|| std::io::Error::other("ClientHello spans records"))?;
    let name = accepted
        .client_hello()
        .server_name()
        .ok_or_else(|| std::io::Error::other("ClientHello without SNI"))?
        .to_owned();
    Ok((buf, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passthrough_names_route_by_id() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let gw = SniGateway::new("mesh.demo", HashMap::from([("ab12".to_owned(), addr)]));
        assert_eq!(gw.route("ab12-443s.mesh.demo"), Some(addr));
        assert_eq!(gw.route("ab12-443.mesh.demo"), None, "not passthrough");
        assert_eq!(gw.route("cd34-443s.mesh.demo"), None);
        assert_eq!(gw.route("ab12-443s.other.demo"), None);
        assert_eq!(gw.route("ab12-443s.xmesh.demo"), None);
    }
}
