//! `dstack-mesh certs revoke`: the CA revokes a domain's certificate, which then stops being
//! served at once and is moved aside in the store (`<file>.revoked-<serial>`); a configured
//! domain orders a new one, a domain no longer configured is only cleaned up. The evidence is
//! rewritten without it.

use rustls_pki_types::{pem::PemObject, CertificateDer};

use super::{
    cert,
    client::IssueError,
    store::{domain_key, CertStore},
    Acme, Domain, IssuerRuntime, Status,
};

/// Why a certificate is revoked: the RFC 5280 reason codes Let's Encrypt accepts from a
/// subscriber.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Reason {
    /// 0: no reason given.
    Unspecified,
    /// 1: the private key may be known to someone else.
    KeyCompromise,
    /// 3: the names are no longer ours.
    AffiliationChanged,
    /// 4: replaced by another certificate.
    Superseded,
    /// 5: the site is gone.
    CessationOfOperation,
}

impl Reason {
    const ALL: [Self; 5] = [
        Self::Unspecified,
        Self::KeyCompromise,
        Self::AffiliationChanged,
        Self::Superseded,
        Self::CessationOfOperation,
    ];

    /// Its RFC 5280 name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::KeyCompromise => "keyCompromise",
            Self::AffiliationChanged => "affiliationChanged",
            Self::Superseded => "superseded",
            Self::CessationOfOperation => "cessationOfOperation",
        }
    }

    /// Its RFC 5280 code.
    pub fn code(self) -> u8 {
        match self {
            Self::Unspecified => 0,
            Self::KeyCompromise => 1,
            Self::AffiliationChanged => 3,
            Self::Superseded => 4,
            Self::CessationOfOperation => 5,
        }
    }

    pub(super) fn acme(self) -> instant_acme::RevocationReason {
        use instant_acme::RevocationReason as R;
        match self {
            Self::Unspecified => R::Unspecified,
            Self::KeyCompromise => R::KeyCompromise,
            Self::AffiliationChanged => R::AffiliationChanged,
            Self::Superseded => R::Superseded,
            Self::CessationOfOperation => R::CessationOfOperation,
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Reason {
    type Err = String;

    /// `keyCompromise`, `key-compromise`, `key_compromise` or the code `1`.
    fn from_str(s: &str) -> Result<Self, String> {
        let folded: String = s
            .trim()
            .chars()
            .filter(|c| !matches!(c, '-' | '_'))
            .collect::<String>()
            .to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|r| r.as_str().to_ascii_lowercase() == folded || r.code().to_string() == folded)
            .ok_or_else(|| {
                format!(
                    "{s:?} is not a revocation reason a subscriber may give: use {}",
                    Self::ALL.map(Self::as_str).join(", ")
                )
            })
    }
}

/// What a revocation did (the admin API's answer).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Revoked {
    /// The domain (its primary name).
    pub domain: String,
    /// The revoked certificate's serial (hex).
    pub serial: String,
    /// The reason given.
    pub reason: Reason,
    /// The CA had already revoked it.
    pub already: bool,
    /// A new certificate is being ordered (the domain is configured).
    pub reordering: bool,
    /// The store files moved aside.
    pub set_aside: Vec<String>,
}

/// Why nothing was revoked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RevokeError {
    /// Not configured, and nothing stored under that name.
    #[error("{0} is neither a configured domain nor one with a stored certificate")]
    NoSuchDomain(String),
    /// Configured, but holding no certificate.
    #[error("{0} has no certificate to revoke")]
    NoCertificate(String),
    /// The stored certificate does not parse.
    #[error("{0}: the stored certificate does not parse")]
    Unreadable(String),
    /// Issued by the internal CA, which publishes no revocation.
    #[error("{0}: its certificate is from the internal CA, which publishes no revocation: `dstack-mesh certs renew {0}` replaces it")]
    InternalCa(String),
    /// Issued through an account this configuration no longer has.
    #[error("{domain}: its certificate came from {issuer}, which this configuration has no account with")]
    UnknownIssuer {
        /// The domain.
        domain: String,
        /// The issuer its metadata names.
        issuer: String,
    },
    /// The CA refused or could not be reached: the certificate is still served.
    #[error("{domain}: {source} (the certificate is still served)")]
    Ca {
        /// The domain.
        domain: String,
        /// The CA's answer.
        source: IssueError,
    },
}

impl RevokeError {
    /// The admin API's status for it.
    pub fn status(&self) -> http::StatusCode {
        match self {
            Self::NoSuchDomain(_) => http::StatusCode::NOT_FOUND,
            Self::Ca { .. } => http::StatusCode::BAD_GATEWAY,
            _ => http::StatusCode::CONFLICT,
        }
    }
}

/// The certificate to revoke: its leaf (DER), serial and the issuer label it came from.
struct Target {
    leaf: Vec<u8>,
    serial: String,
    issuer: Option<String>,
}

impl Acme {
    /// Revoke the certificate of `name` (a configured domain's served one, else the one a
    /// removed domain left in the store) for `reason`; then stop serving it, move its files
    /// aside, order a new one if the domain is configured, and rewrite the evidence.
    pub async fn revoke(&self, name: &str, reason: Reason) -> Result<Revoked, RevokeError> {
        let name = name.trim().trim_end_matches('.').to_ascii_lowercase();
        let domain = self.lookup(&name);
        let primary = domain
            .as_ref()
            .map_or_else(|| name.clone(), |d| d.name().to_owned());
        let target = self.target(&primary, domain.as_deref())?;
        let label = target
            .issuer
            .clone()
            .or_else(|| domain.as_ref().map(|d| d.config.issuer.label()))
            .unwrap_or_default();
        let client = match self.issuers.iter().find(|(i, _)| i.label() == label) {
            Some((_, IssuerRuntime::Acme(client))) => client.clone(),
            Some((_, IssuerRuntime::Internal(_))) => return Err(RevokeError::InternalCa(primary)),
            None => {
                return Err(RevokeError::UnknownIssuer {
                    domain: primary,
                    issuer: label,
                })
            }
        };
        let already = client
            .revoke(&target.leaf, reason)
            .await
            .map_err(|source| RevokeError::Ca {
                domain: primary.clone(),
                source,
            })?;
        tracing::warn!(domain = %primary, serial = %target.serial, reason = %reason, already, "certificate revoked: no longer served");
        if let Some(d) = &domain {
            d.set(|s| {
                s.revoked.push(target.serial.clone());
                s.stale = true;
                s.status = Some(Status::Issuing);
            });
            d.serve(None);
        }
        let set_aside = set_aside(self.store.as_ref(), &primary, &target.serial);
        if let Some(d) = &domain {
            d.renew_now.notify_one();
        }
        self.refresh_evidence().await;
        Ok(Revoked {
            domain: primary,
            serial: target.serial,
            reason,
            already,
            reordering: domain.is_some(),
            set_aside,
        })
    }

    /// What `certs revoke` acts on: the served certificate, else the stored one.
    fn target(&self, name: &str, domain: Option<&Domain>) -> Result<Target, RevokeError> {
        let meta = self
            .store
            .read(&domain_key(name, "meta.json"))
            .ok()
            .flatten()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
        let issuer = meta
            .as_ref()
            .and_then(|m| m["issuer"].as_str())
            .map(str::to_owned);
        if let Some(served) = domain.and_then(|d| d.served.load_full()) {
            let leaf = served
                .key
                .cert
                .first()
                .map(|c| c.as_ref().to_vec())
                .ok_or_else(|| RevokeError::NoCertificate(name.to_owned()))?;
            return Ok(Target {
                leaf,
                serial: served.serial.clone(),
                issuer,
            });
        }
        let chain = match self.store.read(&domain_key(name, "chain.pem")) {
            Ok(Some(chain)) => chain,
            _ if domain.is_some() => return Err(RevokeError::NoCertificate(name.to_owned())),
            _ => return Err(RevokeError::NoSuchDomain(name.to_owned())),
        };
        let leaf = CertificateDer::pem_slice_iter(&chain)
            .next()
            .and_then(Result::ok)
            .ok_or_else(|| RevokeError::Unreadable(name.to_owned()))?;
        let (_, serial) =
            cert::leaf_summary(&chain).ok_or_else(|| RevokeError::Unreadable(name.to_owned()))?;
        Ok(Target {
            leaf: leaf.as_ref().to_vec(),
            serial,
            issuer,
        })
    }
}

/// Move `domain`'s stored files aside as revoked; the keys moved.
fn set_aside(store: &dyn CertStore, domain: &str, serial: &str) -> Vec<String> {
    let why = format!("revoked-{serial}");
    ["chain.pem", "key.pem", "meta.json"]
        .into_iter()
        .filter_map(|file| {
            let key = domain_key(domain, file);
            match store.read(&key) {
                Ok(Some(_)) => {}
                _ => return None,
            }
            match store.set_aside(&key, &why) {
                Ok(()) => Some(format!("{key}.{why}")),
                Err(e) => {
                    tracing::error!(domain = %domain, error = %e, "a revoked certificate's file could not be moved aside");
                    None
                }
            }
        })
        .collect()
}

impl Domain {
    /// Whether `serial` was revoked here (never served again, whoever offers it).
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))] // only the fleet offers one back
    pub(super) fn revoked(&self, serial: &str) -> bool {
        self.state
            .lock()
            .is_ok_and(|s| s.revoked.iter().any(|r| r == serial))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_read_in_every_spelling_and_unknown_ones_are_named() {
        for (text, reason) in [
            ("keyCompromise", Reason::KeyCompromise),
            ("key-compromise", Reason::KeyCompromise),
            ("KEY_COMPROMISE", Reason::KeyCompromise),
            ("1", Reason::KeyCompromise),
            ("cessation-of-operation", Reason::CessationOfOperation),
            ("0", Reason::Unspecified),
            ("superseded", Reason::Superseded),
        ] {
            assert_eq!(text.parse::<Reason>(), Ok(reason), "{text}");
        }
        // caCompromise (2) and the rest are the CA's to give, not a subscriber's.
        for bad in ["caCompromise", "2", "hold", ""] {
            let e = bad.parse::<Reason>().unwrap_err();
            assert!(e.contains("keyCompromise, affiliationChanged"), "{e}");
        }
        assert_eq!(
            serde_json::to_string(&Reason::CessationOfOperation).unwrap(),
            "\"cessationOfOperation\""
        );
    }
}
