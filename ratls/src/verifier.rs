//! rustls verifiers that enforce a [`Policy`] inside the handshake.
//!
//! Only the identity step is ours; handshake signatures are delegated to rustls with the same
//! algorithms, so a peer that does not hold the certificate's key never gets past this.
//! Host names are not checked: a mesh peer is named by its app id, which the policy checks, and
//! the TLS name is the gateway's routing label.

use std::sync::Arc;

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    server::danger::{ClientCertVerified, ClientCertVerifier},
    CommonState, DigitallySignedStruct, DistinguishedName, HandshakeKind, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::{
    cert::parse_x509,
    cert::Claims,
    policy::{algorithms, identity_of, PeerRole, Policy, Rejection, VerifiedPeer},
};

/// Verifies the server we dialled (outbound).
#[derive(Debug)]
pub struct ServerVerifier {
    policy: Arc<Policy>,
}

impl ServerVerifier {
    /// A verifier enforcing `policy` on servers (usually with [`Policy::expect`]).
    pub fn new(policy: Arc<Policy>) -> Self {
        Self { policy }
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let peer = self
            .policy
            .verify(end_entity, intermediates, PeerRole::Server, now)?;
        tracing::trace!(app_id = %peer.app_id, "server certificate accepted");
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// Verifies the client that dialled us (inbound). A client certificate is mandatory.
#[derive(Debug)]
pub struct ClientVerifier {
    policy: Arc<Policy>,
}

impl ClientVerifier {
    /// A verifier enforcing `policy` (usually with an allowlist) on clients.
    pub fn new(policy: Arc<Policy>) -> Self {
        Self { policy }
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.policy.anchors.subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let peer = self
            .policy
            .verify(end_entity, intermediates, PeerRole::Client, now)?;
        tracing::trace!(app_id = %peer.app_id, "client certificate accepted");
        Ok(ClientCertVerified::assertion())
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// The identity of the peer of a connection whose handshake one of our verifiers accepted.
///
/// rustls keeps the peer's certificates, not the verifier's verdict, so the claims are read again
/// from the leaf with the code the verifier used. A resumed session skipped the verifier, so it
/// is refused here; the mesh configs in [`crate::tls`] never resume (tunnels do, and use
/// [`session_identity`]).
pub fn peer_identity(conn: &CommonState) -> Result<VerifiedPeer, Rejection> {
    if conn.handshake_kind() == Some(HandshakeKind::Resumed) {
        return Err(Rejection::ResumedSession);
    }
    let leaf_der = conn
        .peer_certificates()
        .and_then(<[_]>::first)
        .ok_or(Rejection::NoCertificate)?;
    let leaf = parse_x509(0, leaf_der).map_err(|e| Rejection::Malformed(e.into()))?;
    let claims = Claims::read(0, &leaf).map_err(|e| Rejection::Malformed(e.into()))?;
    identity_of(&leaf, &claims)
}

/// The identity of the peer of a connection that may have been resumed (tunnels): a full
/// handshake was verified inside it; a resumed one skipped the verifier, so the chain rustls
/// restored from the session is held to `policy` now, at `now`, before any byte is relayed. An
/// allowlist, an expected app id or a validity that changed since the first handshake is
/// therefore enforced exactly as on a full handshake.
pub fn session_identity(
    conn: &CommonState,
    policy: &Policy,
    role: PeerRole,
    now: UnixTime,
) -> Result<VerifiedPeer, Rejection> {
    // Anything but a full handshake (resumed, or a kind rustls may add) is checked again.
    if matches!(
        conn.handshake_kind(),
        Some(HandshakeKind::Full | HandshakeKind::FullWithHelloRetryRequest)
    ) {
        return peer_identity(conn);
    }
    let (leaf, intermediates) = conn
        .peer_certificates()
        .and_then(<[_]>::split_first)
        .ok_or(Rejection::NoCertificate)?;
    policy.verify(leaf, intermediates, role, now)
}
