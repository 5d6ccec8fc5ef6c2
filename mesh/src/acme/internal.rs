//! `internal-ca`: a local CA kept in the store. No network, not publicly trusted: the demo's
//! issuer, and a way to serve a domain before its public CA is reachable.

use std::{sync::Arc, time::Duration};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use super::{client::Issued, store::CertStore};

const CA_CERT: &str = "internal-ca/ca.pem";
const CA_KEY: &str = "internal-ca/ca-key.pem";

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

impl InternalCa {
    /// Load the CA from the store, or create and store one.
    pub fn open(store: &Arc<dyn CertStore>, lifetime: Duration) -> Result<Self, String> {
        let read = |key: &str| {
            store
                .read(key)
                .map_err(|e| e.to_string())
                .map(|b| b.and_then(|b| String::from_utf8(b).ok()))
        };
        if let (Some(cert), Some(key)) = (read(CA_CERT)?, read(CA_KEY)?) {
            let pair = KeyPair::from_pem(&key).map_err(|e| format!("{CA_KEY}: {e}"))?;
            let issuer =
                Issuer::from_ca_cert_pem(&cert, pair).map_err(|e| format!("{CA_CERT}: {e}"))?;
            return Ok(Self {
                issuer,
                ca_pem: cert,
                lifetime,
            });
        }
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
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
        let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
        store
            .write(CA_KEY, key.serialize_pem().as_bytes(), true)
            .map_err(|e| e.to_string())?;
        store
            .write(CA_CERT, cert.pem().as_bytes(), false)
            .map_err(|e| e.to_string())?;
        Ok(Self {
            issuer: Issuer::new(params, key),
            ca_pem: cert.pem(),
            lifetime,
        })
    }

    /// Sign a certificate for `names`.
    pub fn issue(&self, names: &[String]) -> Result<Issued, String> {
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let mut params = CertificateParams::new(names.to_vec()).map_err(|e| e.to_string())?;
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
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut serial)
            .map_err(|_| "random number generator failed".to_owned())?;
        serial[0] &= 0x7f;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| e.to_string())?;
        Ok(Issued {
            chain_pem: format!("{}{}", cert.pem(), self.ca_pem),
            key_pem: key.serialize_pem(),
        })
    }
}
