//! rustls configurations for the mesh, built on a rotating identity and a [`Policy`].
//!
//! Session resumption is off on both sides of the mesh: a resumed session skips the verifier,
//! and the allowlist, the expected app id or the peer's validity may have changed since.
//! Connections are pooled, so full handshakes are rare anyway. Tunnels are not pooled (one TLS
//! connection per TCP connection), so theirs resume, and the peer's restored chain is checked
//! again after every resumed handshake ([`crate::verifier::session_identity`]).

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::{
    client::{ClientSessionStore, ResolvesClientCert, Resumption},
    server::{ClientHello, NoServerSessionStorage, ResolvesServerCert, ServerSessionMemoryCache},
    sign::CertifiedKey,
    ClientConfig, ServerConfig, SignatureScheme,
};

use crate::{
    identity::Identity,
    verifier::{ClientVerifier, ServerVerifier},
    Policy,
};

/// ALPN protocols the mesh offers: h2 first (multiplexing between sidecars), then HTTP/1.1.
pub const MESH_ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// ALPN of a sidecar-to-sidecar TCP tunnel: the server says whether its backend answered before
/// the stream is spliced (a client without it gets the bare splice).
pub const TUNNEL_ALPN: &[u8] = b"dstack-tunnel/1";

/// Sessions a tunnel listener remembers for resumption.
pub const TUNNEL_SESSIONS: usize = 4096;

/// Serves whatever certificate is current; swapping it affects only later handshakes.
#[derive(Debug, Clone)]
pub struct CertResolver {
    source: Source,
}

#[derive(Debug, Clone)]
enum Source {
    Key(Arc<ArcSwap<CertifiedKey>>),
    Identity(Arc<ArcSwap<Identity>>),
}

impl CertResolver {
    /// A resolver that reads `current` at every handshake.
    pub fn new(current: Arc<ArcSwap<CertifiedKey>>) -> Self {
        Self {
            source: Source::Key(current),
        }
    }

    /// A resolver that presents the key of the current identity.
    pub fn identity(current: Arc<ArcSwap<Identity>>) -> Self {
        Self {
            source: Source::Identity(current),
        }
    }

    /// A resolver for one fixed certificate.
    pub fn fixed(key: CertifiedKey) -> Self {
        Self::new(Arc::new(ArcSwap::from_pointee(key)))
    }

    /// Expiry (Unix seconds) of the rotating identity presented now; `None` for a fixed key.
    /// A connection dialled under one value is the old identity's once it changes.
    pub fn identity_not_after(&self) -> Option<i64> {
        match &self.source {
            Source::Key(_) => None,
            Source::Identity(id) => Some(id.load().not_after),
        }
    }

    fn current(&self) -> Arc<CertifiedKey> {
        match &self.source {
            Source::Key(k) => k.load_full(),
            Source::Identity(id) => id.load().key.clone(),
        }
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ResolvesClientCert for CertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A server config that presents `resolver`'s certificate and requires a client certificate
/// accepted by `policy`; the server's cipher-suite order, rustls's defaults otherwise.
fn verifying_server_config(
    resolver: CertResolver,
    policy: Arc<Policy>,
) -> Result<ServerConfig, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(crate::crypto::provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(ClientVerifier::new(policy)))
        .with_cert_resolver(Arc::new(resolver));
    config.ignore_client_order = SERVER_ORDER;
    Ok(config)
}

/// Every listener picks the suite by its own order (AES-128-GCM, AES-256-GCM, ChaCha20, each
/// with ECDHE): every suite offered is strong, but a client that lists a weaker-for-it suite
/// first does not choose for the server, and scanners (testssl's `cipher_order`) rate a
/// server without an order as a finding.
pub const SERVER_ORDER: bool = true;

/// A server config that presents `resolver`'s certificate and requires a client certificate
/// accepted by `policy`.
pub fn mesh_server_config(
    resolver: CertResolver,
    policy: Arc<Policy>,
) -> Result<ServerConfig, rustls::Error> {
    let mut config = verifying_server_config(resolver, policy)?;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.alpn_protocols = MESH_ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Why a mesh TLS config could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsConfigError {
    /// rustls refused the settings.
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
    /// An outbound policy without an expected app id would accept any app under the root.
    #[error("outbound TLS needs the target's app id (Policy::expect)")]
    NoTarget,
}

/// A client config that presents `resolver`'s certificate and accepts only the server
/// `policy` expects. The server name is not checked, so the policy must name the target.
pub fn mesh_client_config(
    resolver: CertResolver,
    policy: Arc<Policy>,
) -> Result<ClientConfig, TlsConfigError> {
    if policy.expected.is_none() {
        return Err(TlsConfigError::NoTarget);
    }
    let mut config = ClientConfig::builder_with_provider(crate::crypto::provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerVerifier::new(policy)))
        .with_client_cert_resolver(Arc::new(resolver));
    config.resumption = Resumption::disabled();
    config.alpn_protocols = MESH_ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A tunnel listener's server config: a client certificate accepted by `policy` is required,
/// as on the mesh listener, and sessions resume (reconnect storms skip the signatures). The
/// session cache belongs to this config, so a new policy (a reload) starts with none.
pub fn tunnel_server_config(
    resolver: CertResolver,
    policy: Arc<Policy>,
) -> Result<ServerConfig, rustls::Error> {
    let mut config = verifying_server_config(resolver, policy)?;
    config.session_storage = ServerSessionMemoryCache::new(TUNNEL_SESSIONS);
    config.send_tls13_tickets = 1;
    config.alpn_protocols = vec![TUNNEL_ALPN.to_vec()];
    Ok(config)
}

/// A tunnel's client config: [`mesh_client_config`] offering [`TUNNEL_ALPN`] and resuming
/// sessions kept in `sessions`. The store must hold only sessions with this policy's target:
/// rustls keys them by server name, which a fixed address shares between apps.
pub fn tunnel_client_config(
    resolver: CertResolver,
    policy: Arc<Policy>,
    sessions: Arc<dyn ClientSessionStore>,
) -> Result<ClientConfig, TlsConfigError> {
    let mut config = mesh_client_config(resolver, policy)?;
    config.resumption = Resumption::store(sessions);
    config.alpn_protocols = vec![TUNNEL_ALPN.to_vec()];
    Ok(config)
}
