//! The headers nginx's `auth_request` subrequest carries, as dstack-vpc's config sets them.

use std::fmt;

use rustls_pki_types::CertificateDer;

/// Header with the client certificate: nginx's `$ssl_client_escaped_cert` (URL-escaped PEM).
pub const CLIENT_CERT: &str = "x-client-cert";
/// Header with nginx's verdict: `$ssl_client_verify` (`SUCCESS`, `NONE`, `FAILED:reason`).
pub const CLIENT_VERIFY: &str = "x-client-verify";
/// Header with the per-deployment secret that the rendered nginx configuration sends with every
/// auth subrequest: the proof that the request comes from our nginx, whose word on a lone
/// leaf's chain the service may then take.
pub const NGINX_SECRET: &str = "x-dstack-mesh-nginx-secret";
/// Response header with the caller's app id, which nginx forwards to the backend.
pub const APP_ID: &str = "x-dstack-app-id";
/// Response header with the caller's instance id, when its certificate carries one.
pub const INSTANCE_ID: &str = "x-dstack-instance-id";

/// nginx's `$ssl_client_verify`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientVerify {
    /// The chain verified against `ssl_client_certificate`.
    Success,
    /// No client certificate was sent.
    None,
    /// Verification failed (the text after `FAILED:`), or an unknown value.
    Failed(String),
}

impl ClientVerify {
    /// Read the header value; a missing header reads as [`ClientVerify::None`].
    pub fn parse(value: Option<&str>) -> Self {
        match value.map(str::trim) {
            None | Some("") | Some("NONE") => Self::None,
            Some("SUCCESS") => Self::Success,
            Some(other) => Self::Failed(other.strip_prefix("FAILED:").unwrap_or(other).to_owned()),
        }
    }
}

impl fmt::Display for ClientVerify {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Success => f.write_str("SUCCESS"),
            Self::None => f.write_str("NONE"),
            Self::Failed(why) => write!(f, "FAILED:{why}"),
        }
    }
}

/// Why the certificate header could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CertHeaderError {
    /// The header is absent or empty.
    #[error("no client certificate in {CLIENT_CERT}")]
    Missing,
    /// A `%` escape is broken.
    #[error("{CLIENT_CERT}: bad percent escape at byte {0}")]
    BadEscape(usize),
    /// The unescaped text is not a PEM certificate chain.
    #[error("{CLIENT_CERT}: {0}")]
    Cert(#[from] ratls::CertError),
}

/// Largest header value accepted (a chain with an attestation is about 11 kB of PEM, ~15 kB
/// escaped).
pub const MAX_CERT_HEADER: usize = 64 << 10;

/// Undo nginx's URL escaping. `+` stays `+`: nginx escapes it as `%2B`, and base64 uses it.
pub fn unescape(value: &str) -> Result<Vec<u8>, CertHeaderError> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or(CertHeaderError::BadEscape(i))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// Escape a PEM as nginx's `$ssl_client_escaped_cert` does (for tests and tools): everything
/// but unreserved characters becomes `%XX`.
pub fn escape(pem: &str) -> String {
    let mut out = String::with_capacity(pem.len() * 3 / 2);
    for b in pem.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The certificates in the header, leaf first (nginx sends only the leaf; other proxies may
/// send the chain).
pub fn client_certs(value: Option<&str>) -> Result<Vec<CertificateDer<'static>>, CertHeaderError> {
    let value = value
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or(CertHeaderError::Missing)?;
    if value.len() > MAX_CERT_HEADER {
        return Err(CertHeaderError::Cert(ratls::CertError::Pem(format!(
            "header longer than {MAX_CERT_HEADER} bytes"
        ))));
    }
    Ok(ratls::cert::parse_chain(&unescape(value)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_values() {
        assert_eq!(ClientVerify::parse(Some("SUCCESS")), ClientVerify::Success);
        assert_eq!(ClientVerify::parse(Some("NONE")), ClientVerify::None);
        assert_eq!(ClientVerify::parse(None), ClientVerify::None);
        assert_eq!(
            ClientVerify::parse(Some("FAILED:certificate has expired")),
            ClientVerify::Failed("certificate has expired".into())
        );
        assert_eq!(
            ClientVerify::parse(Some("success")),
            ClientVerify::Failed("success".into())
        );
    }

    #[test]
    fn escape_round_trips_and_keeps_plus() {
        let pem = "-----BEGIN CERTIFICATE-----\nMII+/a=\n-----END CERTIFICATE-----\n";
        let escaped = escape(pem);
        assert!(escaped.contains("%2B") && escaped.contains("%0A") && !escaped.contains('+'));
        assert_eq!(unescape(&escaped).unwrap(), pem.as_bytes());
        assert_eq!(unescape("a+b").unwrap(), b"a+b");
        assert_eq!(unescape("%zz"), Err(CertHeaderError::BadEscape(0)));
        assert_eq!(unescape("ab%4"), Err(CertHeaderError::BadEscape(2)));
    }

    #[test]
    fn missing_and_garbage_headers() {
        assert_eq!(client_certs(None), Err(CertHeaderError::Missing));
        assert_eq!(client_certs(Some("  ")), Err(CertHeaderError::Missing));
        assert!(matches!(
            client_certs(Some("hello")),
            Err(CertHeaderError::Cert(_))
        ));
        assert!(client_certs(Some(&"A".repeat(MAX_CERT_HEADER + 1))).is_err());
    }
}
