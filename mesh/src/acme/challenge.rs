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
    /// The app's other instances, when they answer the CA too (replicas).
    fleet: std::sync::OnceLock<Arc<dyn ShareChallenges>>,
}

/// One challenge response as the fleet shares it: enough for any instance to answer.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Response {
    /// TLS-ALPN-01 for `name`: the key authorization's SHA-256 (hex).
    TlsAlpn01 {
        /// The name validated.
        name: String,
        /// The digest the certificate carries.
        digest: String,
    },
    /// HTTP-01: the key authorization served for `token`.
    Http01 {
        /// The token in the URL.
        token: String,
        /// The body to answer with.
        key_authorization: String,
    },
}

/// A future the fleet's side returns.
pub type FleetFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Where an order's responses go so that every instance of the app can answer the CA.
pub trait ShareChallenges: Send + Sync + std::fmt::Debug {
    /// Give `response` to every instance; done when they have it (or a deadline passed).
    fn publish<'a>(&'a self, response: &'a Response) -> FleetFuture<'a, Result<(), String>>;
    /// Take `response` back (the order is over).
    fn withdraw<'a>(&'a self, response: &'a Response) -> FleetFuture<'a, ()>;
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
        // rcgen asserts the length: a published challenge with another one (a replica's bug,
        // a garbled store) panicked the task that applies the fleet's challenges (found by the
        // stored_state fuzz target).
        if digest.len() != 32 {
            return Err(ChallengeError {
                name: name.to_owned(),
                reason: format!("the digest is {} bytes, not SHA-256's 32", digest.len()),
            });
        }
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
        let signing = ratls::crypto::signing_key(der).map_err(|e| ChallengeError {
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

    /// Share responses with the app's other instances from now on.
    pub fn share_with(&self, fleet: Arc<dyn ShareChallenges>) {
        let _ = self.fleet.set(fleet);
    }

    /// Answer `response` here (what another instance published).
    pub fn apply(&self, response: &Response) -> Result<(), ChallengeError> {
        match response {
            Response::TlsAlpn01 { name, digest } => {
                let digest = hex::decode(digest).map_err(|e| ChallengeError {
                    name: name.clone(),
                    reason: format!("digest is not hex: {e}"),
                })?;
                self.add_tls_alpn(name, &digest)
            }
            Response::Http01 {
                token,
                key_authorization,
            } => {
                self.add_http(token, key_authorization);
                Ok(())
            }
        }
    }

    /// Stop answering `response`.
    pub fn forget(&self, response: &Response) {
        match response {
            Response::TlsAlpn01 { name, .. } => self.remove(std::slice::from_ref(name), &[]),
            Response::Http01 { token, .. } => self.remove(&[], std::slice::from_ref(token)),
        }
    }

    /// Give `response` to the app's other instances, when there are any, before the CA is
    /// told to look.
    pub async fn publish(&self, response: &Response) -> Result<(), String> {
        match self.fleet.get() {
            Some(fleet) => fleet.publish(response).await,
            None => Ok(()),
        }
    }

    /// Take `response` back from the other instances.
    pub async fn withdraw(&self, response: &Response) {
        if let Some(fleet) = self.fleet.get() {
            fleet.withdraw(response).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_published_tls_alpn_digest_of_the_wrong_length_is_refused_not_a_panic() {
        let challenges = Challenges::default();
        let published = |digest: &str| Response::TlsAlpn01 {
            name: "app.example.com".into(),
            digest: digest.into(),
        };
        let err = challenges.apply(&published(&"ab".repeat(20))).unwrap_err();
        assert!(err.to_string().contains("20 bytes"), "{err}");
        assert!(!challenges.has_tls_alpn("app.example.com"));
        challenges.apply(&published(&"ab".repeat(32))).unwrap();
        assert!(challenges.has_tls_alpn("app.example.com"));
    }
}
