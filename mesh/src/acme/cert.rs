//! A certificate and its key, checked before they are ever served.

use std::{sync::Arc, time::SystemTime};

use rustls::sign::CertifiedKey;
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};

/// Why a certificate or key cannot be served.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CertError {
    /// No certificate in the PEM.
    #[error("no certificate in the PEM")]
    NoCertificate,
    /// The PEM is not readable.
    #[error("unreadable PEM: {0}")]
    Pem(String),
    /// The key is not usable.
    #[error("unusable private key: {0}")]
    Key(String),
    /// The key belongs to another certificate.
    #[error("the private key does not match the certificate")]
    KeyMismatch,
    /// The certificate is not parseable.
    #[error("unparseable certificate: {0}")]
    Parse(String),
    /// A configured name is not on the certificate.
    #[error("the certificate does not cover {0}")]
    Names(String),
}

/// A certificate ready to serve, with what status pages show about it.
#[derive(Clone, Debug)]
pub struct Loaded {
    /// The chain and signing key rustls serves.
    pub key: Arc<CertifiedKey>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Serial number (hex).
    pub serial: String,
    /// The issuer's common name or full DN.
    pub issuer: String,
}

impl Loaded {
    /// Whether it is expired at `now`.
    pub fn expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }
}

fn to_system(t: x509_parser::time::ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    match u64::try_from(secs) {
        Ok(s) => SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s),
        Err(_) => SystemTime::UNIX_EPOCH,
    }
}

/// Parse and check a chain (leaf first) and key, both PEM, against the names it must cover.
pub fn load(chain_pem: &[u8], key_pem: &[u8], names: &[String]) -> Result<Loaded, CertError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::Pem(e.to_string()))?;
    let leaf = chain.first().ok_or(CertError::NoCertificate)?.clone();
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| CertError::Key(e.to_string()))?;
    let signing = ratls::crypto::signing_key(key).map_err(|e| CertError::Key(e.to_string()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|_| CertError::KeyMismatch)?;

    let (_, cert) =
        x509_parser::parse_x509_certificate(&leaf).map_err(|e| CertError::Parse(e.to_string()))?;
    let sans: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => {
                        Some(d.to_ascii_lowercase())
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if let Some(missing) = names.iter().find(|n| !sans.contains(n)) {
        return Err(CertError::Names(missing.clone()));
    }
    let issuer = cert
        .issuer()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map_or_else(|| cert.issuer().to_string(), str::to_owned);
    Ok(Loaded {
        key: Arc::new(certified),
        not_before: to_system(cert.validity().not_before),
        not_after: to_system(cert.validity().not_after),
        serial: cert.raw_serial_as_string().replace(':', ""),
        issuer,
    })
}

/// The end of validity and the serial (as [`Loaded::serial`]) of the first certificate in
/// `chain_pem`, if it parses: a cheap look before loading the pair.
pub fn leaf_summary(chain_pem: &[u8]) -> Option<(SystemTime, String)> {
    let leaf = CertificateDer::pem_slice_iter(chain_pem).next()?.ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).ok()?;
    Some((
        to_system(cert.validity().not_after),
        cert.raw_serial_as_string().replace(':', ""),
    ))
}

impl Loaded {
    /// Whether a certificate ending at `not_after` with `serial` replaces this one: it ends
    /// later, or at the same second and is another certificate (a renewal within a second).
    pub fn superseded_by(&self, not_after: SystemTime, serial: &str) -> bool {
        not_after > self.not_after || (not_after == self.not_after && serial != self.serial)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
    }

    #[test]
    fn checks_pairs() {
        let (cert, key) = pair(&["a.example.com", "www.a.example.com"]);
        let names = vec!["a.example.com".to_owned(), "www.a.example.com".to_owned()];
        let loaded = load(cert.as_bytes(), key.as_bytes(), &names).unwrap();
        assert!(loaded.not_after > loaded.not_before);
        assert_eq!(
            leaf_summary(cert.as_bytes()),
            Some((loaded.not_after, loaded.serial.clone()))
        );
        assert_eq!(leaf_summary(b"garbage"), None);
        assert!(!loaded.superseded_by(loaded.not_after, &loaded.serial));
        assert!(loaded.superseded_by(loaded.not_after, "another"));
        assert!(!loaded.superseded_by(loaded.not_before, "another"));
        assert!(!loaded.serial.is_empty());

        let (_, other_key) = pair(&["a.example.com"]);
        assert_eq!(
            load(cert.as_bytes(), other_key.as_bytes(), &names).unwrap_err(),
            CertError::KeyMismatch
        );
        assert_eq!(
            load(cert.as_bytes(), key.as_bytes(), &["b.example.com".into()]).unwrap_err(),
            CertError::Names("b.example.com".into())
        );
        assert_eq!(
            load(b"", key.as_bytes(), &names).unwrap_err(),
            CertError::NoCertificate
        );
        let truncated = &cert.as_bytes()[..cert.len() / 2];
        assert!(load(truncated, key.as_bytes(), &names).is_err());
        assert!(matches!(
            load(cert.as_bytes(), b"garbage", &names).unwrap_err(),
            CertError::Key(_)
        ));
        // Garbage between PEM blocks never panics.
        assert!(load(
            b"-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
            key.as_bytes(),
            &names
        )
        .is_err());
    }
}
