//! Which TLS configuration a connection gets, decided from its ClientHello alone.
//!
//! One port carries three kinds of traffic. The decision is a pure function so every case can
//! be tested as a table; the I/O around it only peeks at the ClientHello.

use crate::acme::challenge::ACME_TLS_ALPN;

/// What the listener needs from a ClientHello.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hello {
    /// SNI, lowercased, without a trailing dot.
    pub server_name: Option<String>,
    /// ALPN protocols offered, in the client's order.
    pub alpn: Vec<Vec<u8>>,
}

impl Hello {
    /// Read the parts of a rustls ClientHello the router uses.
    pub fn from_rustls(hello: &rustls::server::ClientHello<'_>) -> Self {
        Self {
            server_name: hello
                .server_name()
                .map(|n| n.trim_end_matches('.').to_ascii_lowercase()),
            alpn: hello
                .alpn()
                .map(|protocols| protocols.map(<[u8]>::to_vec).collect())
                .unwrap_or_default(),
        }
    }
}

/// Where a connection goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// An ACME TLS-ALPN-01 validation for a name with a pending challenge.
    AcmeChallenge(String),
    /// A public custom domain: its ACME certificate, no client certificate.
    PublicDomain(String),
    /// Everything else: the mesh, with a client certificate required.
    Mesh,
}

/// The public names this listener serves; the ACME subsystem implements it.
pub trait PublicNames: Send + Sync {
    /// Whether `name` has a TLS-ALPN-01 challenge pending.
    fn has_challenge(&self, name: &str) -> bool;
    /// The configured domain that serves `name` (exact, alias or wildcard), if any.
    fn domain_for(&self, name: &str) -> Option<String>;
}

/// No public domains (the mesh only).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoPublicNames;

impl PublicNames for NoPublicNames {
    fn has_challenge(&self, _name: &str) -> bool {
        false
    }

    fn domain_for(&self, _name: &str) -> Option<String> {
        None
    }
}

/// Decide where a connection goes.
pub fn route(hello: &Hello, names: &dyn PublicNames) -> Route {
    let Some(name) = hello.server_name.as_deref() else {
        return Route::Mesh;
    };
    // A validation server offers only acme-tls/1; never hand it anything but the challenge.
    if hello.alpn.iter().any(|p| p == ACME_TLS_ALPN) && names.has_challenge(name) {
        return Route::AcmeChallenge(name.to_owned());
    }
    match names.domain_for(name) {
        Some(domain) => Route::PublicDomain(domain),
        None => Route::Mesh,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Names;

    impl PublicNames for Names {
        fn has_challenge(&self, name: &str) -> bool {
            name == "new.example.com"
        }

        fn domain_for(&self, name: &str) -> Option<String> {
            match name {
                "app.example.com" | "www.example.com" => Some("app.example.com".into()),
                n if n.ends_with(".wild.example.com") => Some("*.wild.example.com".into()),
                _ => None,
            }
        }
    }

    fn hello(sni: Option<&str>, alpn: &[&[u8]]) -> Hello {
        Hello {
            server_name: sni.map(str::to_owned),
            alpn: alpn.iter().map(|p| p.to_vec()).collect(),
        }
    }

    #[test]
    fn routes() {
        let acme: &[&[u8]] = &[ACME_TLS_ALPN];
        let web: &[&[u8]] = &[b"h2", b"http/1.1"];
        let table = [
            (hello(None, web), Route::Mesh),
            (hello(None, acme), Route::Mesh),
            (hello(Some("app1-443s.gw.example"), web), Route::Mesh),
            (
                hello(Some("new.example.com"), acme),
                Route::AcmeChallenge("new.example.com".into()),
            ),
            // No pending challenge: acme-tls/1 alone earns nothing.
            (
                hello(Some("app.example.com"), acme),
                Route::PublicDomain("app.example.com".into()),
            ),
            (hello(Some("new.example.com"), web), Route::Mesh),
            (
                hello(Some("www.example.com"), web),
                Route::PublicDomain("app.example.com".into()),
            ),
            (
                hello(Some("a.wild.example.com"), &[]),
                Route::PublicDomain("*.wild.example.com".into()),
            ),
        ];
        for (h, want) in table {
            assert_eq!(route(&h, &Names), want, "{h:?}");
        }
        assert_eq!(
            route(&hello(Some("app.example.com"), web), &NoPublicNames),
            Route::Mesh
        );
    }
}
