//! `internal-ca`: a local CA kept in the store. No network, not publicly trusted: the demo's
//! issuer, and a way to serve a domain before its public CA is reachable.
//!
//! When instances of the app must agree (the etcd store, `key_source = "derived"`), the CA's
//! key is derived from the app's key instead of drawn at random, so every instance's CA has
//! the same key and name: a client that trusts one instance's `ca.pem` verifies a leaf any
//! instance issued.

use std::{sync::Arc, time::Duration};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use ratls::agent::AgentClient;

use super::{
    client::{app_secret, derive_internal_ca_key, Issued, INTERNAL_CA_KEY_PATH},
    store::{CertStore, StoreError},
};

const CA_CERT: &str = "internal-ca/ca.pem";
const CA_KEY: &str = "internal-ca/ca-key.pem";

/// The internal CA as an issuer: opened at start when the store allows, else at the next
/// issuance. A store that cannot hold it (read-only, full) fails those domains' issuance,
/// retried like a CA that is down, and never the sidecar's start or its other traffic.
pub struct InternalIssuer {
    store: Arc<dyn CertStore>,
    lifetime: Duration,
    ca: std::sync::Mutex<Option<Arc<InternalCa>>>,
    /// The agent the shared key comes from, when the CA's key is derived.
    derive_from: Option<AgentClient>,
}

impl std::fmt::Debug for InternalIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InternalIssuer")
            .field("store", &self.store.location())
            .finish_non_exhaustive()
    }
}

impl InternalIssuer {
    /// The issuer. With a random key the store is tried once now (a failure is logged, and
    /// tried again later); with `derive_from`, at the first issuance (the agent may answer
    /// later than the start).
    pub fn new(
        store: Arc<dyn CertStore>,
        lifetime: Duration,
        derive_from: Option<AgentClient>,
    ) -> Self {
        let issuer = Self {
            store,
            lifetime,
            ca: std::sync::Mutex::new(None),
            derive_from,
        };
        if issuer.derive_from.is_none() {
            if let Err(e) = issuer.ca(None) {
                tracing::error!(store = %issuer.store.location(), error = %e, "internal CA unavailable: its domains are not served until the store can hold it; other traffic is unaffected");
            }
        }
        issuer
    }

    /// The CA, opened (or created, with `derived` for its key) on first success.
    fn ca(&self, derived: Option<KeyPair>) -> Result<Arc<InternalCa>, InternalCaError> {
        let mut slot = self.ca.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ca) = slot.as_ref() {
            return Ok(ca.clone());
        }
        let ca = Arc::new(InternalCa::open(&self.store, self.lifetime, derived)?);
        *slot = Some(ca.clone());
        Ok(ca)
    }

    /// A certificate for `names`, for `key` (`None`: a new one).
    pub async fn issue(
        &self,
        names: &[String],
        key: Option<&KeyPair>,
    ) -> Result<Issued, InternalCaError> {
        let opened = self.ca.lock().map(|c| c.clone()).unwrap_or(None);
        let ca = match (opened, &self.derive_from) {
            (Some(ca), _) => ca,
            (None, None) => self.ca(None)?,
            (None, Some(agent)) => {
                let seed = app_secret(agent, INTERNAL_CA_KEY_PATH, "internal-ca")
                    .await
                    .map_err(|e| InternalCaError::SharedKey(e.to_string()))?;
                let der = derive_internal_ca_key(&seed)
                    .map_err(|e| InternalCaError::SharedKey(e.to_string()))?;
                self.ca(Some(KeyPair::try_from(der.secret_pkcs8_der())?))?
            }
        };
        ca.issue(names, key)
    }
}

/// The local CA.
pub struct InternalCa {
    issuer: Issuer<'static, KeyPair>,
    /// Its certificate (PEM), appended to every chain.
    pub ca_pem: String,
    lifetime: Duration,
}

impl std::fmt::Debug for InternalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InternalCa")
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

/// Why the internal CA could not be opened or could not sign.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InternalCaError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored file (the CA's key or certificate) is unusable.
    #[error("{file}: {source}")]
    Stored {
        /// Which file.
        file: &'static str,
        /// Why.
        source: rcgen::Error,
    },
    /// Generating or signing failed.
    #[error(transparent)]
    Rcgen(#[from] rcgen::Error),
    /// The system's random number generator failed.
    #[error("random number generator failed")]
    Random,
    /// The shared CA key (derived from the app's key) could not be made.
    #[error("the internal CA's shared key: {0}")]
    SharedKey(String),
}

impl InternalCa {
    /// Load the CA from the store, or create and store one (with `derived` as its key when
    /// given; a stored CA with another key is replaced then, so the fleet's CAs agree).
    pub fn open(
        store: &Arc<dyn CertStore>,
        lifetime: Duration,
        derived: Option<KeyPair>,
    ) -> Result<Self, InternalCaError> {
        let read = |key: &str| -> Result<Option<String>, InternalCaError> {
            Ok(store.read(key)?.and_then(|b| String::from_utf8(b).ok()))
        };
        if let (Some(cert), Some(key)) = (read(CA_CERT)?, read(CA_KEY)?) {
            let pair = KeyPair::from_pem(&key).map_err(|source| InternalCaError::Stored {
                file: CA_KEY,
                source,
            })?;
            let other = derived
                .as_ref()
                .is_some_and(|d| d.public_key_pem() != pair.public_key_pem());
            if other {
                tracing::info!(store = %store.location(), "the stored internal CA has a key of its own: replacing it with the app's shared one");
                return Self::create(store, lifetime, derived);
            }
            let issuer = Issuer::from_ca_cert_pem(&cert, pair).map_err(|source| {
                InternalCaError::Stored {
                    file: CA_CERT,
                    source,
                }
            })?;
            return Ok(Self {
                issuer,
                ca_pem: cert,
                lifetime,
            });
        }
        Self::create(store, lifetime, derived)
    }

    /// A new CA on `key` (`None`: a random one), stored.
    fn create(
        store: &Arc<dyn CertStore>,
        lifetime: Duration,
        key: Option<KeyPair>,
    ) -> Result<Self, InternalCaError> {
        let key = match key {
            Some(key) => key,
            None => KeyPair::generate()?,
        };
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "dstack-mesh");
        dn.push(
            DnType::CommonName,
            "dstack-mesh internal CA (not publicly trusted)",
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - Duration::from_secs(3600);
        params.not_after = now + Duration::from_secs(10 * 365 * 86400);
        let cert = params.self_signed(&key)?;
        store.write(CA_KEY, key.serialize_pem().as_bytes(), true)?;
        store.write(CA_CERT, cert.pem().as_bytes(), false)?;
        Ok(Self {
            issuer: Issuer::new(params, key),
            ca_pem: cert.pem(),
            lifetime,
        })
    }

    /// Sign a certificate for `names`, for `key` (`None`: a new one).
    pub fn issue(
        &self,
        names: &[String],
        key: Option<&KeyPair>,
    ) -> Result<Issued, InternalCaError> {
        let fresh;
        let key = match key {
            Some(key) => key,
            None => {
                fresh = KeyPair::generate()?;
                &fresh
            }
        };
        let mut params = CertificateParams::new(names.to_vec())?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.distinguished_name = dn;
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let now = time::OffsetDateTime::now_utc();
        // A little slack for clocks behind ours, never more than a tenth of the lifetime.
        params.not_before = now - (self.lifetime / 10).min(Duration::from_secs(300));
        params.not_after = now + self.lifetime;
        let mut serial = [0u8; 16];
        aws_lc_rs::rand::SecureRandom::fill(&aws_lc_rs::rand::SystemRandom::new(), &mut serial)
            .map_err(|_| InternalCaError::Random)?;
        serial[0] &= 0x7f;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let cert = params.signed_by(key, &self.issuer)?;
        Ok(Issued {
            chain_pem: format!("{}{}", cert.pem(), self.ca_pem),
            key_pem: key.serialize_pem(),
        })
    }
}
