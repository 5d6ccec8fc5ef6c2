//! Whom the mesh trusts, decided in one place for the inbound listener, the outbound proxy and
//! the auth service: the roots peers must chain to, the policy callers are held to, and whether
//! nginx (for the auth service) checks chains against those same roots.

use std::{path::Path, sync::Arc};

use ratls::{
    attested::Attestor,
    identity::RotatingIdentity,
    quote::{CollateralSet, TdxRoot},
    AllowList, CertError, Policy, TrustAnchors,
};
use rustls_pki_types::CertificateDer;

use crate::{
    config::{attestation::AttestationConfig, Allow, InboundConfig},
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
    /// `[attestation]` cannot be set up (its TDX root).
    #[error("attestation: {0}")]
    Attestation(String),
}

/// The roots mesh peers may chain to, each with the apps it vouches for: our KMS root and the
/// configured anchors for any app, each federated cluster's roots for its own apps.
fn scoped_roots(
    config: &InboundConfig,
    identity: &RotatingIdentity,
) -> Result<Vec<(Vec<CertificateDer<'static>>, AllowList)>, TrustError> {
    let mut any = vec![identity.current().root.clone()];
    for path in &config.trust_anchors {
        any.extend(roots_file(path)?);
    }
    let mut groups = vec![(any, AllowList::Any)];
    for cluster in &config.federation {
        groups.push((
            roots_file(&cluster.roots)?,
            AllowList::Only(cluster.apps.clone()),
        ));
    }
    Ok(groups)
}

/// Every root mesh peers may chain to.
pub fn mesh_roots(
    config: &InboundConfig,
    identity: &RotatingIdentity,
) -> Result<Vec<CertificateDer<'static>>, TrustError> {
    Ok(scoped_roots(config, identity)?
        .into_iter()
        .flat_map(|(roots, _)| roots)
        .collect())
}

/// [`mesh_roots`] as trust anchors, each scoped to the apps it vouches for.
pub fn mesh_anchors(
    config: &InboundConfig,
    identity: &RotatingIdentity,
) -> Result<TrustAnchors, TrustError> {
    let groups = scoped_roots(config, identity)?;
    let groups: Vec<(&[CertificateDer<'_>], AllowList)> = groups
        .iter()
        .map(|(roots, scope)| (roots.as_slice(), scope.clone()))
        .collect();
    TrustAnchors::scoped(&groups).map_err(TrustError::Anchors)
}

/// The policy callers are held to: the mesh roots, `allow`, the attestation requirement, and
/// the attestation policy (`[attestation]`) when there is one.
pub fn mesh_policy(
    config: &InboundConfig,
    allow: &Allow,
    identity: &RotatingIdentity,
    attestor: Option<&Arc<Attestor>>,
) -> Result<Policy, TrustError> {
    Ok(Policy::new(mesh_anchors(config, identity)?)
        .allow(allow.resolve(&identity.current().app_id))
        .require_attestation(config.require_attestation)
        .attested(attestor.cloned()))
}

/// The attestor of `[attestation]`: its rules, its TDX root, the collateral its directory
/// holds now (a directory that does not load yet is logged; peers are then refused as
/// `collateral_unavailable` until [`keep_collateral`] loads it).
pub fn attestor(config: &AttestationConfig) -> Result<Arc<Attestor>, TrustError> {
    let root = match &config.tdx_root {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| TrustError::Attestation(format!("{}: {e}", path.display())))?;
            TdxRoot::from_pem(&pem)
                .map_err(|e| TrustError::Attestation(format!("{}: {e}", path.display())))?
        }
        None => TdxRoot::intel(),
    };
    let attestor = Arc::new(Attestor::new(config.rules.clone(), root));
    match CollateralSet::from_dir(&config.collateral_dir) {
        Ok(collateral) => attestor.replace_collateral(collateral),
        Err(e) => {
            tracing::error!(dir = %config.collateral_dir.display(), error = %e, "attestation: no collateral yet: every peer is refused (collateral_unavailable) until it loads")
        }
    }
    Ok(attestor)
}

/// Reload the collateral directory every minute: an operator's refresh (new files before the
/// old `nextUpdate`) takes effect without a restart; a directory that stops loading keeps the
/// collateral already in use.
pub async fn keep_collateral(attestor: Arc<Attestor>, dir: std::path::PathBuf) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
    loop {
        tick.tick().await;
        let current = updates(&attestor.collateral());
        match CollateralSet::from_dir(&dir) {
            Ok(fresh) if updates(&fresh) != current => {
                tracing::info!(dir = %dir.display(), platforms = ?updates(&fresh), "attestation: collateral loaded");
                attestor.replace_collateral(fresh);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "attestation: collateral not reloaded; the loaded one stays")
            }
        }
    }
}

/// Each platform's collateral by when it is next updated: what tells a reloaded directory from
/// the one in use.
fn updates(set: &CollateralSet) -> Vec<(String, i64)> {
    set.iter()
        .map(|c| (c.fmspc.clone(), c.next_update))
        .collect()
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
