//! Whom the mesh trusts, decided in one place for the inbound listener, the outbound proxy and
//! the auth service: the roots peers must chain to, the policy callers are held to, and whether
//! nginx (for the auth service) checks chains against those same roots.

use std::path::Path;

use ratls::{identity::RotatingIdentity, CertError, Policy, TrustAnchors};
use rustls_pki_types::CertificateDer;

use crate::{
    config::{Allow, InboundConfig},
    https::{roots_file, RootsError},
};

/// A configured trust anchor that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// A file in `inbound.trust_anchors` cannot be read or holds no certificate.
    #[error("inbound.trust_anchors: {0}")]
    File(#[from] RootsError),
    /// The roots cannot be trust anchors.
    #[error("trust anchors: {0}")]
    Anchors(CertError),
}

/// The roots mesh peers must chain to: our KMS root, plus configured anchors (federation).
pub fn mesh_roots(
    config: &InboundConfig,
    identity: &RotatingIdentity,
) -> Result<Vec<CertificateDer<'static>>, TrustError> {
    let mut roots = vec![identity.current().root.clone()];
    for path in &config.trust_anchors {
        roots.extend(roots_file(path)?);
    }
    Ok(roots)
}

/// [`mesh_roots`] as trust anchors.
pub fn mesh_anchors(
    config: &InboundConfig,
    identity: &RotatingIdentity,
) -> Result<TrustAnchors, TrustError> {
    TrustAnchors::new(&mesh_roots(config, identity)?).map_err(TrustError::Anchors)
}

/// The policy callers are held to: the mesh roots, `allow`, and the attestation requirement.
pub fn mesh_policy(
    config: &InboundConfig,
    allow: &Allow,
    identity: &RotatingIdentity,
) -> Result<Policy, TrustError> {
    Ok(Policy::new(mesh_anchors(config, identity)?)
        .allow(allow.resolve(&identity.current().app_id))
        .require_attestation(config.require_attestation))
}

/// Whether nginx's `ssl_client_certificate` holds only roots the mesh trusts: the auth service
/// relies on nginx for the chain of a lone leaf, so nginx must check it against the same roots.
/// Anything that cannot be read proves nothing: nginx's word is then not taken.
pub fn nginx_roots_are_trusted(
    ca_file: &Path,
    config: &InboundConfig,
    identity: &RotatingIdentity,
) -> bool {
    let refused = "lone leaves from nginx will be refused";
    let bytes = match std::fs::read(ca_file) {
        Ok(bytes) => bytes,
        Err(e) => {
            tracing::error!(ca_file = %ca_file.display(), error = %e, "cannot read nginx's CA file (tls.ca_file) to confirm it trusts only the mesh roots: {refused} (mount the file, or set auth.trust_nginx_chain = false to say so)");
            return false;
        }
    };
    let ours = match mesh_roots(config, identity) {
        Ok(roots) => roots,
        Err(e) => {
            tracing::error!(error = %e, "the mesh roots cannot be read: {refused}");
            return false;
        }
    };
    match ratls::cert::parse_chain(&bytes) {
        Ok(roots) if roots.iter().all(|r| ours.contains(r)) => true,
        Ok(_) => {
            tracing::error!(ca_file = %ca_file.display(), "nginx's CA file holds roots the mesh does not trust: {refused}");
            false
        }
        Err(e) => {
            tracing::error!(ca_file = %ca_file.display(), error = %e, "nginx's CA file is unreadable as certificates: {refused}");
            false
        }
    }
}
