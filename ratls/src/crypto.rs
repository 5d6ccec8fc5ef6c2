//! The one crypto backend: ring. Every rustls config in the workspace is built from
//! [`provider`], so a second backend compiled in by accident changes nothing at run time.

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

/// The process's crypto provider (ring).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Install [`provider`] as the process default (for libraries that ask rustls for it).
/// Calling it twice is harmless.
pub fn install_default() {
    let _ = CryptoProvider::install_default((*provider()).clone());
}
