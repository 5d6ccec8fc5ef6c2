//! The one way the sidecar talks HTTPS to the outside world (an ACME CA, a DNS provider's API,
//! an evidence URL, the gateway's own TLS): the public WebPKI roots compiled in (CVM images
//! often carry no system store) plus the roots an operator adds, through the one crypto
//! provider.

use std::{path::Path, time::Duration};

use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use ratls::CertError;
use rustls_pki_types::CertificateDer;

/// Extra roots that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RootsError {
    /// The file cannot be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file holds no certificate.
    #[error("{}: {source}", path.display())]
    Parse {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: CertError,
    },
    /// A certificate cannot be a root, or rustls refused the settings.
    #[error(transparent)]
    Tls(#[from] rustls::Error),
}

/// The certificates in the PEM or DER file at `path`.
pub fn roots_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, RootsError> {
    let bytes = std::fs::read(path).map_err(|source| RootsError::Read {
        path: path.to_owned(),
        source,
    })?;
    ratls::cert::parse_chain(&bytes).map_err(|source| RootsError::Parse {
        path: path.to_owned(),
        source,
    })
}

/// A client configuration trusting the WebPKI roots and `extra`.
pub fn client_config(
    extra: &[CertificateDer<'static>],
) -> Result<rustls::ClientConfig, RootsError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for root in extra {
        roots.add(root.clone())?;
    }
    Ok(
        rustls::ClientConfig::builder_with_provider(ratls::crypto::provider())
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// A TCP dialler with a connect deadline that also dials `https` URLs.
pub fn dialer(connect_timeout: Duration) -> HttpConnector {
    let mut dial = HttpConnector::new();
    dial.set_connect_timeout(Some(connect_timeout));
    dial.enforce_http(false);
    dial
}

/// HTTPS over `dial` with `tls` (plain HTTP too, for local stand-ins of CAs and APIs).
pub fn connector<R>(
    tls: rustls::ClientConfig,
    dial: HttpConnector<R>,
) -> HttpsConnector<HttpConnector<R>> {
    HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(dial)
}
