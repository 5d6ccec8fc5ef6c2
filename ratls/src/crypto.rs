//! The one crypto backend: aws-lc-rs. Every rustls config in the workspace is built from
//! [`provider`], so the backend and its key exchange groups are chosen here and nowhere else.

use std::sync::{Arc, OnceLock};

use rustls::{
    crypto::{aws_lc_rs, CryptoProvider, SupportedKxGroup},
    pki_types::PrivateKeyDer,
};

/// Key exchange groups in order of preference: the post-quantum hybrid first (a harvested
/// session stays secret once large quantum computers exist), then the classical groups every
/// TLS 1.3 peer has. A client without ML-KEM offers X25519 and gets it, without a retry.
pub static KX_GROUPS: &[&dyn SupportedKxGroup] = &[
    aws_lc_rs::kx_group::X25519MLKEM768,
    aws_lc_rs::kx_group::X25519,
    aws_lc_rs::kx_group::SECP256R1,
    aws_lc_rs::kx_group::SECP384R1,
];

/// The process's crypto provider: aws-lc-rs's suites with [`KX_GROUPS`].
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            Arc::new(CryptoProvider {
                kx_groups: KX_GROUPS.to_vec(),
                ..aws_lc_rs::default_provider()
            })
        })
        .clone()
}

/// [`provider`] offering only `groups` (in its order): a peer standing for another TLS stack,
/// one without ML-KEM, say, in tests and benchmarks.
pub fn provider_with_groups(groups: &[rustls::NamedGroup]) -> Arc<CryptoProvider> {
    let ours = provider();
    Arc::new(CryptoProvider {
        kx_groups: ours
            .kx_groups
            .iter()
            .copied()
            .filter(|g| groups.contains(&g.name()))
            .collect(),
        ..(*ours).clone()
    })
}

/// A signing key from its DER. ECDSA is tried first, the kind every certificate we order or
/// mint has: the provider's general loader tries RSA first, and that parse checks an EC key in
/// full (a scalar multiplication) before refusing it, which doubled the start-up cost of each
/// stored certificate.
pub fn signing_key(
    der: PrivateKeyDer<'static>,
) -> Result<Arc<dyn rustls::sign::SigningKey>, rustls::Error> {
    match aws_lc_rs::sign::any_ecdsa_type(&der) {
        Ok(key) => Ok(key),
        Err(_) => provider().key_provider.load_private_key(der),
    }
}

/// Install [`provider`] as the process default (for libraries that ask rustls for it).
/// Calling it twice is harmless.
pub fn install_default() {
    let _ = CryptoProvider::install_default((*provider()).clone());
}

/// A session-ticket issuer with rotating keys, from the same backend.
pub fn ticketer() -> Result<Arc<dyn rustls::server::ProducesTickets>, rustls::Error> {
    aws_lc_rs::Ticketer::new()
}
