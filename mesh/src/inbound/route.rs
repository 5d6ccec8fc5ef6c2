//! Which TLS configuration a connection gets, decided from its ClientHello alone.
//!
//! One port carries three kinds of traffic. The decision is a pure function so every case can
//! be tested as a table; the I/O around it only peeks at the ClientHello.

use crate::acme::challenge::ACME_TLS_ALPN;

/// What the listener needs from a ClientHello, borrowed from it: reading it allocates nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hello<'a> {
    /// SNI: rustls has lowercased it and taken off a trailing dot.
    pub server_name: Option<&'a str>,
    /// Whether `acme-tls/1` is among the ALPN protocols offered.
    pub offers_acme_tls: bool,
}

impl<'a> Hello<'a> {
    /// Read the parts of a rustls ClientHello the router uses.
    pub fn from_rustls(hello: &'a rustls::server::ClientHello<'_>) -> Self {
        Self {
            server_name: hello.server_name(),
            offers_acme_tls: hello
                .alpn()
                .is_some_and(|mut offered| offered.any(|p| p == ACME_TLS_ALPN)),
        }
    }
}

/// Where a connection goes; `D` is the public side's handle on a domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route<D> {
    /// An ACME TLS-ALPN-01 validation for a name with a pending challenge.
    AcmeChallenge,
    /// A public custom domain: its ACME certificate, no client certificate.
    PublicDomain(D),
    /// Everything else: the mesh, with a client certificate required.
    Mesh,
}

/// The public names this listener serves; the ACME subsystem implements it.
pub trait PublicNames: Send + Sync {
    /// What a lookup finds: cheap to hand on (an `Arc`), so the hot path copies no name.
    type Domain;
    /// Whether `name` has a TLS-ALPN-01 challenge pending.
    fn has_challenge(&self, name: &str) -> bool;
    /// The configured domain that serves `name` (exact, alias or wildcard), if any.
    fn domain_for(&self, name: &str) -> Option<Self::Domain>;
}

/// No public domains (the mesh only).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoPublicNames;

impl PublicNames for NoPublicNames {
    type Domain = std::convert::Infallible;

    fn has_challenge(&self, _name: &str) -> bool {
        false
    }

    fn domain_for(&self, _name: &str) -> Option<Self::Domain> {
        None
    }
}

/// Decide where a connection goes.
pub fn route<N: PublicNames + ?Sized>(hello: &Hello<'_>, names: &N) -> Route<N::Domain> {
    let Some(name) = hello.server_name else {
        return Route::Mesh;
    };
    // A validation server offers only acme-tls/1; never hand it anything but the challenge.
    if hello.offers_acme_tls && names.has_challenge(name) {
        return Route::AcmeChallenge;
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
        type Domain = String;

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

    fn hello<'a>(sni: Option<&'a str>, alpn: &[&[u8]]) -> Hello<'a> {
        Hello {
            server_name: sni,
            offers_acme_tls: alpn.contains(&ACME_TLS_ALPN),
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
            (hello(Some("new.example.com"), acme), Route::AcmeChallenge),
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
            Route::<std::convert::Infallible>::Mesh
        );
    }
}
