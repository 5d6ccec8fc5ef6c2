//! Reading certificates into an RA-TLS view.
//!
//! [`parse_chain`] accepts PEM or DER (one certificate or several, leaf first) and [`ChainView`]
//! shows what dstack put in each certificate. A view is a description, not a verdict: the app id
//! it shows is an issuer claim that only [`crate::Policy::verify`] makes trustworthy.

use rustls_pki_types::{pem::PemObject, CertificateDer};
use x509_parser::{
    certificate::X509Certificate, extensions::GeneralName, oid_registry, prelude::FromDer,
    public_key::PublicKey,
};

use crate::{
    attestation::{Attestation, AttestationError, Format},
    ext::{self, AppInfo, ExtensionError, Kind},
    AppId,
};

/// Why bytes could not be read as a certificate chain.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// No certificate at all (empty input, or PEM without a CERTIFICATE block).
    #[error("no certificate found")]
    Empty,
    /// Neither PEM (no `-----BEGIN` line) nor DER (does not start with a SEQUENCE).
    #[error("not a certificate: neither PEM (no -----BEGIN CERTIFICATE----- line) nor DER")]
    NotCertificate,
    /// The PEM armour is broken.
    #[error("invalid PEM: {0}")]
    Pem(String),
    /// A certificate's DER could not be parsed.
    #[error("certificate {index}: invalid DER: {reason}")]
    Der {
        /// Position in the chain, 0 = leaf.
        index: usize,
        /// What the parser said.
        reason: String,
    },
    /// A dstack extension is present but malformed.
    #[error("certificate {index}: {source}")]
    Extension {
        /// Position in the chain, 0 = leaf.
        index: usize,
        /// What was wrong with it.
        source: ExtensionError,
    },
    /// The leaf carries two different app ids (`.1.3` and app-info disagree).
    #[error("certificate {index}: app id extension says {ext} but app-info says {info}")]
    ConflictingAppIds {
        /// Position in the chain, 0 = leaf.
        index: usize,
        /// From `.1.3`.
        ext: AppId,
        /// From app-info.
        info: AppId,
    },
    /// The attestation extension is present but cannot be read.
    #[error("certificate {index}: {source}")]
    Attestation {
        /// Position in the chain, 0 = leaf.
        index: usize,
        /// What was wrong with it.
        source: AttestationError,
    },
}

/// The attestation extension of `leaf`, read: `None` when it carries none.
pub fn attestation_of(leaf: &CertificateDer<'_>) -> Result<Option<Attestation>, CertError> {
    let cert = parse_x509(0, leaf)?;
    Claims::read(0, &cert)?
        .attestation
        .transpose()
        .map_err(|source| CertError::Attestation { index: 0, source })
}

/// Parse PEM (any number of CERTIFICATE blocks) or DER (one or more concatenated certificates).
pub fn parse_chain(input: &[u8]) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let trimmed = trim_ascii_start(input);
    if trimmed.is_empty() {
        return Err(CertError::Empty);
    }
    let certs = if trimmed.starts_with(b"-----BEGIN") {
        CertificateDer::pem_slice_iter(input)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CertError::Pem(e.to_string()))?
    } else if trimmed[0] != 0x30 {
        return Err(CertError::NotCertificate);
    } else {
        split_der(input)?
    };
    if certs.is_empty() {
        return Err(CertError::Empty);
    }
    // Fail early and by position, rather than at first use.
    for (index, cert) in certs.iter().enumerate() {
        X509Certificate::from_der(cert).map_err(|e| CertError::Der {
            index,
            reason: e.to_string(),
        })?;
    }
    Ok(certs)
}

/// Parse PEM chain strings as the guest agent returns them (`certificate_chain`).
pub fn parse_pem_list<S: AsRef<str>>(
    pems: &[S],
) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let mut out = Vec::with_capacity(pems.len());
    for pem in pems {
        out.extend(parse_chain(pem.as_ref().as_bytes())?);
    }
    if out.is_empty() {
        return Err(CertError::Empty);
    }
    Ok(out)
}

fn trim_ascii_start(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    &b[start..]
}

fn split_der(mut input: &[u8]) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let mut out = Vec::new();
    while !input.is_empty() {
        let index = out.len();
        let (rest, _) = X509Certificate::from_der(input).map_err(|e| CertError::Der {
            index,
            reason: e.to_string(),
        })?;
        let used = input.len() - rest.len();
        out.push(CertificateDer::from(input[..used].to_vec()));
        input = rest;
    }
    Ok(out)
}

/// Where an app id was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AppIdSource {
    /// The app id extension `1.3.6.1.4.1.62397.1.3` (KMS certificates).
    Extension,
    /// The first field of the app-info extension `…62397.1.9` (simulator certificates).
    AppInfo,
    /// The `app-id` event of the attested event log (a verified quote, no app id extension).
    EventLog,
}

/// The dstack claims of one certificate, read from its extensions.
#[derive(Clone, Debug, Default)]
pub(crate) struct Claims {
    pub(crate) app_id: Option<(AppId, AppIdSource)>,
    pub(crate) usage: Option<String>,
    pub(crate) app_info: Option<AppInfo>,
    pub(crate) attestation: Option<Result<Attestation, AttestationError>>,
}

impl Claims {
    pub(crate) fn read(index: usize, cert: &X509Certificate<'_>) -> Result<Self, CertError> {
        let wrap = |source| CertError::Extension { index, source };
        let mut claims = Claims::default();
        let mut ext_app_id = None;
        for e in cert.extensions() {
            match ext::kind(e.oid.as_bytes()) {
                Kind::AppId => ext_app_id = Some(ext::app_id(e.value).map_err(wrap)?),
                Kind::Usage => claims.usage = Some(ext::usage(e.value).map_err(wrap)?),
                Kind::AppInfo => claims.app_info = Some(ext::app_info(e.value).map_err(wrap)?),
                Kind::Attestation => {
                    let raw = ext::unwrap_octet_string("attestation", e.value).map_err(wrap)?;
                    claims.attestation = Some(Attestation::parse(raw));
                }
                Kind::Legacy | Kind::Other => {}
            }
        }
        let info_app_id = claims.app_info.as_ref().map(|i| i.app_id.clone());
        claims.app_id = match (ext_app_id, info_app_id) {
            (Some(ext), Some(info)) if ext != info => {
                return Err(CertError::ConflictingAppIds { index, ext, info })
            }
            (Some(ext), _) => Some((ext, AppIdSource::Extension)),
            (None, Some(info)) => Some((info, AppIdSource::AppInfo)),
            (None, None) => None,
        };
        Ok(claims)
    }

    pub(crate) fn instance_id(&self) -> Option<&str> {
        self.app_info
            .as_ref()
            .and_then(|i| i.instance_id.as_deref())
    }
}

/// The RA-TLS view of a chain (leaf first): what `dstack-mesh inspect-cert` prints.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ChainView {
    /// The leaf's app id (lowercase hex), if it carries one. Unverified.
    pub app_id: Option<AppId>,
    /// Where the app id came from.
    pub app_id_source: Option<AppIdSource>,
    /// The instance id from app-info, when present.
    pub instance_id: Option<String>,
    /// The leaf's usage extension (`app:custom` for application leaves).
    pub usage: Option<String>,
    /// The leaf's attestation extension, if any.
    pub attestation: Option<AttestationView>,
    /// The leaf's app-info extension, if any.
    pub app_info: Option<AppInfo>,
    /// Details of the leaf.
    pub leaf: CertSummary,
    /// Every certificate in order, leaf first.
    pub chain: Vec<ChainElement>,
}

/// What the attestation extension holds.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AttestationView {
    /// The encoding, when it could be read.
    pub format: Option<Format>,
    /// Length of the TDX quote in bytes.
    pub quote_len: Option<usize>,
    /// The quote's report data (hex).
    pub report_data: Option<String>,
    /// Whether the report data is `sha512("ratls-cert:" || leaf SPKI)`.
    pub binds_key: bool,
    /// Whether the quote's signature and TCB were verified: never, yet; `binds_key` is all
    /// that was checked.
    pub quote_verified: bool,
    /// Why it could not be read, if it could not.
    pub error: Option<String>,
}

/// Details of one certificate.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CertSummary {
    /// Subject DN (RFC 4514 style).
    pub subject: String,
    /// Issuer DN.
    pub issuer: String,
    /// Serial number (hex).
    pub serial: String,
    /// Subject alternative names (DNS names and IP addresses).
    pub sans: Vec<String>,
    /// Start of validity (RFC 3339).
    pub not_before: String,
    /// End of validity (RFC 3339).
    pub not_after: String,
    /// End of validity (unix seconds).
    pub not_after_unix: i64,
    /// Extended key usages (`serverAuth`, `clientAuth`, or dotted OIDs); empty when absent.
    pub eku: Vec<String>,
    /// Public key algorithm, e.g. `ECDSA P-256`.
    pub key_algorithm: String,
    /// Whether basicConstraints says CA.
    pub is_ca: bool,
    /// SHA-256 of the DER (hex).
    pub sha256_fingerprint: String,
}

/// One certificate of a chain.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ChainElement {
    /// Subject DN.
    pub subject: String,
    /// Issuer DN.
    pub issuer: String,
    /// App id claimed by this certificate, if any.
    pub app_id: Option<AppId>,
    /// Usage extension, if any.
    pub usage: Option<String>,
    /// Whether basicConstraints says CA.
    pub is_ca: bool,
    /// End of validity (RFC 3339).
    pub not_after: String,
}

impl ChainView {
    /// Build the view of a parsed chain (leaf first).
    pub fn new(chain: &[CertificateDer<'_>]) -> Result<Self, CertError> {
        let leaf_der = chain.first().ok_or(CertError::Empty)?;
        let mut elements = Vec::with_capacity(chain.len());
        let mut leaf = None;
        for (index, der) in chain.iter().enumerate() {
            let cert = parse_x509(index, der)?;
            let claims = Claims::read(index, &cert)?;
            elements.push(ChainElement {
                subject: cert.subject().to_string(),
                issuer: cert.issuer().to_string(),
                app_id: claims.app_id.as_ref().map(|(id, _)| id.clone()),
                usage: claims.usage.clone(),
                is_ca: cert.is_ca(),
                not_after: rfc3339(cert.validity().not_after.timestamp()),
            });
            if index == 0 {
                leaf = Some((
                    summary(&cert, leaf_der),
                    claims,
                    cert.public_key().raw.to_vec(),
                ));
            }
        }
        let (leaf, claims, spki) = leaf.ok_or(CertError::Empty)?;
        let attestation = claims.attestation.as_ref().map(|a| match a {
            Ok(att) => AttestationView {
                format: Some(att.format),
                quote_len: Some(att.quote.len()),
                report_data: att.report_data().map(hex::encode),
                binds_key: att.binds_key(&spki),
                quote_verified: false,
                error: None,
            },
            Err(e) => AttestationView {
                format: None,
                quote_len: None,
                report_data: None,
                binds_key: false,
                quote_verified: false,
                error: Some(e.to_string()),
            },
        });
        Ok(Self {
            instance_id: claims.instance_id().map(str::to_owned),
            app_id: claims.app_id.as_ref().map(|(id, _)| id.clone()),
            app_id_source: claims.app_id.as_ref().map(|(_, src)| *src),
            usage: claims.usage,
            attestation,
            app_info: claims.app_info,
            leaf,
            chain: elements,
        })
    }

    /// Unix seconds as RFC 3339 (UTC), as the view prints times.
    pub fn format_time(unix: i64) -> String {
        rfc3339(unix)
    }

    /// Parse bytes (PEM or DER) and build the view.
    pub fn from_bytes(input: &[u8]) -> Result<Self, CertError> {
        Self::new(&parse_chain(input)?)
    }
}

pub(crate) fn parse_x509<'a>(
    index: usize,
    der: &'a CertificateDer<'_>,
) -> Result<X509Certificate<'a>, CertError> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(CertError::Der {
            index,
            reason: "trailing bytes after certificate".into(),
        }),
        Err(e) => Err(CertError::Der {
            index,
            reason: e.to_string(),
        }),
    }
}

fn summary(cert: &X509Certificate<'_>, der: &CertificateDer<'_>) -> CertSummary {
    let validity = cert.validity();
    CertSummary {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        serial: cert.raw_serial_as_string().replace(':', ""),
        sans: sans(cert),
        not_before: rfc3339(validity.not_before.timestamp()),
        not_after: rfc3339(validity.not_after.timestamp()),
        not_after_unix: validity.not_after.timestamp(),
        eku: eku_names(cert).unwrap_or_default(),
        key_algorithm: key_algorithm(cert),
        is_ca: cert.is_ca(),
        sha256_fingerprint: hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der)),
    }
}

fn sans(cert: &X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .map(|name| match name {
            GeneralName::DNSName(n) => (*n).to_owned(),
            GeneralName::IPAddress(b) => ip_string(b),
            other => other.to_string(),
        })
        .collect()
}

fn ip_string(b: &[u8]) -> String {
    match b.len() {
        4 => std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string(),
        16 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(b);
            std::net::Ipv6Addr::from(a).to_string()
        }
        _ => hex::encode(b),
    }
}

/// The EKU names, `None` when the extension is absent (or unreadable).
pub(crate) fn eku_names(cert: &X509Certificate<'_>) -> Option<Vec<String>> {
    let eku = cert.extended_key_usage().ok()??.value;
    let mut names = Vec::new();
    for (set, name) in [
        (eku.server_auth, "serverAuth"),
        (eku.client_auth, "clientAuth"),
        (eku.code_signing, "codeSigning"),
        (eku.email_protection, "emailProtection"),
        (eku.time_stamping, "timeStamping"),
        (eku.ocsp_signing, "OCSPSigning"),
        (eku.any, "anyExtendedKeyUsage"),
    ] {
        if set {
            names.push(name.to_owned());
        }
    }
    names.extend(eku.other.iter().map(|oid| oid.to_id_string()));
    Some(names)
}

fn key_algorithm(cert: &X509Certificate<'_>) -> String {
    let spki = cert.public_key();
    match spki.parsed() {
        Ok(PublicKey::EC(point)) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok());
            match curve {
                Some(c) if c == oid_registry::OID_EC_P256 => "ECDSA P-256".into(),
                Some(c) if c == oid_registry::OID_NIST_EC_P384 => "ECDSA P-384".into(),
                Some(c) => format!("EC {}", c.to_id_string()),
                None => format!("EC {} bits", point.key_size()),
            }
        }
        Ok(PublicKey::RSA(rsa)) => format!("RSA {}", rsa.key_size()),
        Ok(_) if spki.algorithm.algorithm == oid_registry::OID_SIG_ED25519 => "Ed25519".into(),
        _ => spki.algorithm.algorithm.to_id_string(),
    }
}

/// Unix seconds as RFC 3339 (UTC); out-of-range values print as the number.
pub(crate) fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}
