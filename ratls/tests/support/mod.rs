//! Certificates minted for tests: a KMS-shaped PKI whose every property a test can bend.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test
#![allow(dead_code)]

use std::time::Duration;

use ratls::ext::{self, oid};
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

pub const APP_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
pub const APP_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

pub fn app(hex: &str) -> ratls::AppId {
    hex.parse().unwrap()
}

pub fn ext_of(oid: &[u64], payload: &[u8]) -> CustomExtension {
    CustomExtension::from_oid_content(oid, ext::wrap_octet_string(payload))
}

/// A CA: its certificate and a way to sign with it.
pub struct Ca {
    pub der: CertificateDer<'static>,
    pub issuer: Issuer<'static, KeyPair>,
}

fn ca_params(cn: &str, pathlen: u8) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name
        .push(DnType::OrganizationName, "Dstack");
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(pathlen));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

impl Ca {
    /// A self-signed root named `O=Dstack, CN=<cn>` with a fresh key.
    pub fn root(cn: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let params = ca_params(cn, 1);
        let cert = params.self_signed(&key).unwrap();
        Self {
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A per-app CA under this root, carrying `app_id` (if any) and usage `app:ca`.
    pub fn app_ca(&self, app_id: Option<&str>) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = ca_params("Dstack App CA", 0);
        if let Some(id) = app_id {
            params
                .custom_extensions
                .push(ext_of(oid::APP_ID, &hex::decode(id).unwrap()));
        }
        params
            .custom_extensions
            .push(ext_of(oid::CERT_USAGE, b"app:ca"));
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Ca {
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }
}

/// How to mint a leaf; the default is a valid KMS-style application leaf.
pub struct Leaf {
    pub app_id: Option<Vec<u8>>,
    pub app_info_id: Option<Vec<u8>>,
    pub usage: Option<&'static str>,
    pub eku: Vec<ExtendedKeyUsagePurpose>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub extra: Vec<CustomExtension>,
}

impl Leaf {
    pub fn new(app_id: &str) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            app_id: Some(hex::decode(app_id).unwrap()),
            app_info_id: None,
            usage: Some("app:custom"),
            eku: vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            not_before: now - Duration::from_secs(3600),
            not_after: now + Duration::from_secs(3600),
            extra: Vec::new(),
        }
    }

    pub fn params(&self) -> CertificateParams {
        let mut p = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, "localhost");
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = self.eku.clone();
        p.not_before = self.not_before;
        p.not_after = self.not_after;
        if let Some(id) = &self.app_id {
            p.custom_extensions.push(ext_of(oid::APP_ID, id));
        }
        if let Some(id) = &self.app_info_id {
            let info = ext::encode_app_info(&ext::AppInfoFields {
                app_id: id,
                instance_id: &[0x11; 20],
                ..Default::default()
            });
            p.custom_extensions
                .push(CustomExtension::from_oid_content(oid::APP_INFO, info));
        }
        if let Some(usage) = self.usage {
            p.custom_extensions
                .push(ext_of(oid::CERT_USAGE, usage.as_bytes()));
        }
        p.custom_extensions.extend(self.extra.iter().cloned());
        p
    }

    /// Sign with `ca`; returns the leaf and its key.
    pub fn signed_by(&self, ca: &Ca) -> (CertificateDer<'static>, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let cert = self.params().signed_by(&key, &ca.issuer).unwrap();
        (cert.der().clone(), key)
    }

    /// Self-signed (a forgery: it claims an app id no CA vouches for).
    pub fn self_signed(&self) -> (CertificateDer<'static>, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let cert = self.params().self_signed(&key).unwrap();
        (cert.der().clone(), key)
    }
}

/// A KMS-shaped PKI: root, and an App CA for each app on demand.
pub struct Pki {
    pub root: Ca,
}

impl Pki {
    pub fn new() -> Self {
        Self {
            root: Ca::root("Dstack KMS CA"),
        }
    }

    pub fn anchors(&self) -> ratls::TrustAnchors {
        ratls::TrustAnchors::new(std::slice::from_ref(&self.root.der)).unwrap()
    }

    /// `[leaf, app CA]` for a leaf spec, with the App CA carrying `ca_app_id`.
    pub fn chain(&self, leaf: &Leaf, ca_app_id: Option<&str>) -> Vec<CertificateDer<'static>> {
        let app_ca = self.root.app_ca(ca_app_id);
        let (leaf, _) = leaf.signed_by(&app_ca);
        vec![leaf, app_ca.der.clone()]
    }
}
