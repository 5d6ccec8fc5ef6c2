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

/// A client for `GET`s (no request body) under the WebPKI roots, dialling within `timeout`:
/// the PCCS, domain sources, the on-demand `ask` endpoint.
pub type GetClient = hyper_util::client::legacy::Client<
    HttpsConnector<HttpConnector>,
    http_body_util::Empty<bytes::Bytes>,
>;

/// A [`GetClient`] whose connections are dialled within `timeout`.
pub fn get_client(timeout: Duration) -> Result<GetClient, RootsError> {
    let connector = connector(client_config(&[])?, dialer(timeout));
    Ok(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(connector),
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::{HandshakeKind, NamedGroup};
    use rustls_pki_types::{PrivateKeyDer, ServerName};

    use super::*;

    /// A handshake of [`client_config`] against a server offering `groups`: the group it
    /// negotiated and whether it took one flight.
    async fn handshake(groups: &[NamedGroup]) -> (Option<NamedGroup>, Option<HandshakeKind>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["ca.example".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let provider = ratls::crypto::provider_with_groups(groups);
        let server = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        let client = client_config(&[cert.der().clone()]).unwrap();
        let (c, s) = tokio::io::duplex(1 << 16);
        let name = ServerName::try_from("ca.example").unwrap();
        let (accepted, connected) = tokio::join!(
            tokio_rustls::TlsAcceptor::from(Arc::new(server)).accept(s),
            tokio_rustls::TlsConnector::from(Arc::new(client)).connect(name, c),
        );
        let (_server, client) = (accepted.unwrap(), connected.unwrap());
        let conn = client.get_ref().1;
        (
            conn.negotiated_key_exchange_group().map(|g| g.name()),
            conn.handshake_kind(),
        )
    }

    #[tokio::test]
    async fn outside_https_offers_the_post_quantum_hybrid_and_falls_back_in_one_flight() {
        // A CA or DNS API with ML-KEM gets the hybrid.
        let all = [
            NamedGroup::X25519MLKEM768,
            NamedGroup::X25519,
            NamedGroup::secp256r1,
        ];
        assert_eq!(
            handshake(&all).await,
            (Some(NamedGroup::X25519MLKEM768), Some(HandshakeKind::Full))
        );
        // One without (an older OpenSSL or Go): X25519, from the share sent beside the
        // hybrid's, so no HelloRetryRequest round trip.
        assert_eq!(
            handshake(&[NamedGroup::X25519]).await,
            (Some(NamedGroup::X25519), Some(HandshakeKind::Full))
        );
        // P-256 only: a retry, then P-256.
        assert_eq!(
            handshake(&[NamedGroup::secp256r1]).await,
            (
                Some(NamedGroup::secp256r1),
                Some(HandshakeKind::FullWithHelloRetryRequest)
            )
        );
    }
}
