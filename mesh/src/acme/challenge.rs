//! Challenge responses while an order is open: TLS-ALPN-01 certificates served on the shared
//! listener and HTTP-01 key authorizations served on `:80`.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

/// ALPN protocol of the ACME TLS-ALPN-01 challenge (RFC 8737): validation connections offer
/// only this, and get only the challenge certificate.
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// The responses the CA may ask for right now.
#[derive(Debug, Default)]
pub struct Challenges {
    tls_alpn: RwLock<HashMap<String, Arc<CertifiedKey>>>,
    http: RwLock<HashMap<String, String>>,
}

/// Why a challenge response could not be prepared.
#[derive(Debug, thiserror::Error)]
#[error("challenge certificate for {name}: {reason}")]
pub struct ChallengeError {
    name: String,
    reason: String,
}

impl Challenges {
    /// Whether `name` has a TLS-ALPN-01 response.
    pub fn has_tls_alpn(&self, name: &str) -> bool {
        self.tls_alpn.read().is_ok_and(|m| m.contains_key(name))
    }

    /// The key authorization for an HTTP-01 `token`.
    pub fn http_response(&self, token: &str) -> Option<String> {
        self.http.read().ok()?.get(token).cloned()
    }

    /// Answer TLS-ALPN-01 for `name`: a self-signed certificate carrying the digest (RFC 8737).
    pub fn add_tls_alpn(&self, name: &str, digest: &[u8]) -> Result<(), ChallengeError> {
        let fail = |e: rcgen::Error| ChallengeError {
            name: name.to_owned(),
            reason: e.to_string(),
        };
        let key = rcgen::KeyPair::generate().map_err(fail)?;
        let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).map_err(fail)?;
        params
            .custom_extensions
            .push(rcgen::CustomExtension::new_acme_identifier(digest));
        let cert = params.self_signed(&key).map_err(fail)?;
        let der = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let signing = ratls::crypto::provider()
            .key_provider
            .load_private_key(der)
            .map_err(|e| ChallengeError {
                name: name.to_owned(),
                reason: e.to_string(),
            })?;
        let certified = Arc::new(CertifiedKey::new(vec![cert.der().clone()], signing));
        if let Ok(mut m) = self.tls_alpn.write() {
            m.insert(name.to_owned(), certified);
        }
        Ok(())
    }

    /// Answer HTTP-01 for `token`.
    pub fn add_http(&self, token: &str, key_authorization: &str) {
        if let Ok(mut m) = self.http.write() {
            m.insert(token.to_owned(), key_authorization.to_owned());
        }
    }

    /// Forget the responses of a finished order.
    pub fn remove(&self, names: &[String], tokens: &[String]) {
        if let Ok(mut m) = self.tls_alpn.write() {
            for n in names {
                m.remove(n);
            }
        }
        if let Ok(mut m) = self.http.write() {
            for t in tokens {
                m.remove(t);
            }
        }
    }

    /// The certificates validation connections get (the listener offers them with ALPN
    /// [`ACME_TLS_ALPN`] only).
    pub fn resolver(self: &Arc<Self>) -> Arc<dyn ResolvesServerCert> {
        Arc::new(TlsAlpnResolver(self.clone()))
    }
}

#[derive(Debug)]
struct TlsAlpnResolver(Arc<Challenges>);

impl ResolvesServerCert for TlsAlpnResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello
            .server_name()?
            .trim_end_matches('.')
            .to_ascii_lowercase();
        self.0.tls_alpn.read().ok()?.get(&name).cloned()
    }
}
