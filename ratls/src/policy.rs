//! The RA-TLS verification policy: one routine for both directions of the mesh.
//!
//! Order matters: the chain is verified first (rustls-webpki, to a configured trust anchor, in
//! its validity period, EKU allowing the role), and only then are the dstack claims read, because
//! an app id is only as good as the issuer that signed it.

use std::{collections::BTreeSet, fmt, sync::Arc};

use rustls::{crypto::WebPkiSupportedAlgorithms, DistinguishedName};
use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use webpki::{EndEntityCert, KeyUsage};
use x509_parser::certificate::X509Certificate;

use crate::{
    attestation::AttestationStatus,
    cert::{self, AppIdSource, CertError, Claims},
    ext::USAGE_APP,
    AppId,
};

/// Which side of the handshake the peer being verified is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerRole {
    /// We dialled it: it must be allowed `serverAuth`.
    Server,
    /// It dialled us: it must be allowed `clientAuth`.
    Client,
}

impl fmt::Display for PeerRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Server => "server",
            Self::Client => "client",
        })
    }
}

/// Which app ids a listener accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllowList {
    /// Every app whose certificate chains to a trust anchor.
    Any,
    /// Only these apps.
    Only(BTreeSet<AppId>),
}

impl AllowList {
    /// Whether `id` is allowed.
    pub fn allows(&self, id: &AppId) -> bool {
        match self {
            Self::Any => true,
            Self::Only(ids) => ids.contains(id),
        }
    }
}

/// Certificates a chain must end in. A root with the same name but another key is another root.
/// Each root vouches for the apps in its scope: our own KMS for any, another cluster's KMS
/// (federation) only for the apps trusted from it, so it cannot mint our app ids.
#[derive(Clone)]
pub struct TrustAnchors {
    anchors: Arc<[TrustAnchor<'static>]>,
    subjects: Arc<[DistinguishedName]>,
    scopes: Arc<[AllowList]>,
}

impl fmt::Debug for TrustAnchors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustAnchors")
            .field("count", &self.anchors.len())
            .finish()
    }
}

impl TrustAnchors {
    /// Trust anchors from root certificates (DER), each vouching for any app.
    pub fn new(roots: &[CertificateDer<'_>]) -> Result<Self, CertError> {
        Self::scoped(&[(roots, AllowList::Any)])
    }

    /// Trust anchors from groups of roots, each group vouching only for the apps in its scope.
    pub fn scoped(groups: &[(&[CertificateDer<'_>], AllowList)]) -> Result<Self, CertError> {
        let count = groups.iter().map(|(roots, _)| roots.len()).sum();
        if count == 0 {
            return Err(CertError::Empty);
        }
        let mut anchors = Vec::with_capacity(count);
        let mut subjects = Vec::with_capacity(count);
        let mut scopes = Vec::with_capacity(count);
        let roots = groups
            .iter()
            .flat_map(|(roots, scope)| roots.iter().map(move |r| (r, scope)));
        for (index, (der, scope)) in roots.enumerate() {
            scopes.push(scope.clone());
            let anchor = webpki::anchor_from_trusted_cert(der).map_err(|e| CertError::Der {
                index,
                reason: format!("{e:?}"),
            })?;
            // webpki keeps the subject's contents; the CertificateRequest hint is the whole
            // DER Name (a SEQUENCE), which OpenSSL and Go clients decode.
            subjects.push(DistinguishedName::in_sequence(anchor.subject.as_ref()));
            anchors.push(anchor.to_owned());
        }
        Ok(Self {
            anchors: anchors.into(),
            subjects: subjects.into(),
            scopes: scopes.into(),
        })
    }

    /// The apps `anchor` vouches for.
    fn scope_of(&self, anchor: &TrustAnchor<'_>) -> &AllowList {
        self.anchors
            .iter()
            .position(|a| {
                a.subject == anchor.subject
                    && a.subject_public_key_info == anchor.subject_public_key_info
            })
            .map_or(&AllowList::Any, |i| &self.scopes[i])
    }

    /// Whether every root may vouch for `app` (a leaf whose root is not known to us).
    fn all_vouch_for(&self, app: &AppId) -> bool {
        self.scopes.iter().all(|s| s.allows(app))
    }

    /// The anchors' subjects, for the CertificateRequest's certificate authorities hint.
    pub fn subjects(&self) -> &[DistinguishedName] {
        &self.subjects
    }

    fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }
}

/// What a peer must prove.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Roots the chain must end in.
    pub anchors: TrustAnchors,
    /// App ids accepted (inbound).
    pub allow: AllowList,
    /// The one app id accepted (outbound: the target).
    pub expected: Option<AppId>,
    /// The one instance accepted (outbound: a target that names its instance).
    pub expected_instance: Option<AppId>,
    /// Refuse leaves without an attestation extension whose report data binds the leaf key.
    pub require_attestation: bool,
    /// Verify the quote and hold it to an attestation policy (implies `require_attestation`).
    pub attestor: Option<Arc<crate::attested::Attestor>>,
}

impl Policy {
    /// A policy that accepts any app under `anchors`.
    pub fn new(anchors: TrustAnchors) -> Self {
        Self {
            anchors,
            allow: AllowList::Any,
            expected: None,
            expected_instance: None,
            require_attestation: false,
            attestor: None,
        }
    }

    /// Only accept `id` (outbound: the target app).
    pub fn expect(mut self, id: AppId) -> Self {
        self.expected = Some(id);
        self
    }

    /// Only accept the instance `id` of the expected app (outbound: a target naming one).
    pub fn expect_instance(mut self, id: Option<AppId>) -> Self {
        self.expected_instance = id;
        self
    }

    /// Only accept apps in `allow` (inbound).
    pub fn allow(mut self, allow: AllowList) -> Self {
        self.allow = allow;
        self
    }

    /// Verify peers' quotes with `attestor` and hold them to its rules, inside the handshake.
    pub fn attested(mut self, attestor: Option<Arc<crate::attested::Attestor>>) -> Self {
        self.attestor = attestor;
        self
    }

    /// Require an attestation bound to the leaf key.
    pub fn require_attestation(mut self, on: bool) -> Self {
        self.require_attestation = on;
        self
    }

    /// Verify a peer's chain for `role` at `now`. Handshake signatures are not checked here:
    /// rustls does that with the key of the certificate this accepts.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        role: PeerRole,
        now: UnixTime,
    ) -> Result<VerifiedPeer, Rejection> {
        // 1-2. Chain to an anchor, validity, EKU (webpki checks EKU where present on every
        // element; the leaf's presence is required below).
        let ee = EndEntityCert::try_from(end_entity)
            .map_err(|e| Rejection::Malformed(Malformed::Webpki(e)))?;
        let usage = match role {
            PeerRole::Server => KeyUsage::server_auth(),
            PeerRole::Client => KeyUsage::client_auth(),
        };
        let path = ee
            .verify_for_usage(
                algorithms().all,
                self.anchors.anchors(),
                intermediates,
                now,
                usage,
                None,
                None,
            )
            .map_err(|e| Rejection::from_webpki(e, role))?;

        // From here on the chain is trusted, so its claims are the issuer's (within the root's
        // scope).
        let cas: Vec<CertificateDer<'_>> =
            path.intermediate_certificates().map(|c| c.der()).collect();
        let scope = self.anchors.scope_of(path.anchor());
        self.check_claims(end_entity, role, Proof::Chain(&cas, scope), now)
    }

    /// Check a leaf whose chain a TLS terminator verified but could not pass on (nginx hands
    /// `auth_request` the leaf only, never the App CA): validity, EKU, usage, app id, allowlist
    /// and attestation, everything but the signature chain. The app id must come from the
    /// `.1.3` extension (app-info alone is trusted only on leaves a root signs directly, which
    /// [`Policy::verify`] can check itself). Use it only behind a terminator that verified the
    /// chain against the same trust anchors.
    pub fn verify_leaf_vouched(
        &self,
        end_entity: &CertificateDer<'_>,
        role: PeerRole,
        now: UnixTime,
    ) -> Result<VerifiedPeer, Rejection> {
        let leaf = cert::parse_x509(0, end_entity).map_err(|e| Rejection::Malformed(e.into()))?;
        let at = secs(now);
        let validity = leaf.validity();
        if at < validity.not_before.timestamp() {
            return Err(Rejection::NotYetValid {
                not_before: validity.not_before.timestamp(),
                at,
            });
        }
        if at > validity.not_after.timestamp() {
            return Err(Rejection::Expired {
                not_after: validity.not_after.timestamp(),
                at,
            });
        }
        self.check_claims(end_entity, role, Proof::Vouched, now)
    }

    /// Steps 2-6 on a leaf whose chain is settled by `proof`.
    fn check_claims(
        &self,
        end_entity: &CertificateDer<'_>,
        role: PeerRole,
        proof: Proof<'_>,
        now: UnixTime,
    ) -> Result<VerifiedPeer, Rejection> {
        let leaf = cert::parse_x509(0, end_entity).map_err(|e| Rejection::Malformed(e.into()))?;
        match cert::eku_names(&leaf) {
            Some(names) if names.iter().any(|n| n == role_eku(role)) => {}
            _ => return Err(Rejection::WrongEku { role }),
        }
        let claims = Claims::read(0, &leaf).map_err(|e| Rejection::Malformed(e.into()))?;

        // 4. An application leaf, not an App CA or another special certificate.
        if let Some(usage) = &claims.usage {
            if usage != USAGE_APP {
                return Err(Rejection::NotAppLeaf(usage.clone()));
            }
        }

        // With an attestation policy, the quote first (verified once per certificate, then
        // from the cache): it may be what names the app.
        let mut claims = claims;
        let measured = match &self.attestor {
            None => None,
            Some(attestor) => {
                if claims.usage.is_none() {
                    return Err(Rejection::NotAppLeaf("none".into()));
                }
                let attestation = match &claims.attestation {
                    None => return Err(Rejection::AttestationMissing),
                    Some(Err(e)) => return Err(Rejection::Malformed(e.clone().into())),
                    Some(Ok(a)) => a,
                };
                if !attestation.binds_key(leaf.public_key().raw) {
                    return Err(Rejection::AttestationNotBound);
                }
                let named = claims.app_id.as_ref().map(|(id, _)| id);
                let not_after = leaf.validity().not_after.timestamp();
                let facts = attestor
                    .check(end_entity, not_after, attestation, named, secs(now))
                    .map_err(Rejection::Attestation)?;
                if claims.app_id.is_none() {
                    claims.app_id = attestor
                        .measured_app_id(&facts)
                        .map(|id| (id, AppIdSource::EventLog));
                }
                Some(facts)
            }
        };

        // 3. App id: from `.1.3`, else app-info (else, under a policy that allows it, the
        // attested event log); any App CA on the verified path must agree.
        let mut peer = identity_of(&leaf, &claims)?;
        if measured.is_some() {
            peer.attestation = AttestationStatus::QuoteVerified;
            peer.quote = measured;
        }
        let app_id = &peer.app_id;
        // App-info is written by the requesting CVM's agent; it names the app only where no App
        // CA could have (the simulator's root signs leaves directly). Under a KMS App CA the
        // `.1.3` extension the KMS wrote is the only claim that counts.
        let signed_by_root = matches!(proof, Proof::Chain(cas, _) if cas.is_empty());
        if peer.app_id_source == AppIdSource::AppInfo && (!signed_by_root || claims.usage.is_none())
        {
            return Err(Rejection::MissingAppId);
        }
        // The root vouches for this app; a terminator does not say which root it found, so
        // there every root must.
        let (cas, vouched) = match proof {
            Proof::Chain(cas, scope) => (cas, scope.allows(app_id)),
            Proof::Vouched => (&[][..], self.anchors.all_vouch_for(app_id)),
        };
        if !vouched {
            return Err(Rejection::RootNotTrustedForApp(app_id.clone()));
        }
        for (i, ca_der) in cas.iter().enumerate() {
            let ca = cert::parse_x509(i + 1, ca_der).map_err(|e| Rejection::Malformed(e.into()))?;
            let ca_claims = Claims::read(i + 1, &ca).map_err(|e| Rejection::Malformed(e.into()))?;
            if let Some((ca_id, _)) = ca_claims.app_id {
                if ca_id != *app_id {
                    return Err(Rejection::AppCaMismatch {
                        leaf: app_id.clone(),
                        ca: ca_id,
                    });
                }
            }
        }

        // 5. The app the caller wanted / the apps the listener admits.
        if let Some(expected) = &self.expected {
            if expected != app_id {
                return Err(Rejection::AppIdMismatch {
                    expected: expected.clone(),
                    found: app_id.clone(),
                });
            }
        }
        if let Some(expected) = &self.expected_instance {
            let found = peer.instance_id.as_deref().unwrap_or_default();
            if !found.eq_ignore_ascii_case(&expected.to_string()) {
                return Err(Rejection::InstanceMismatch {
                    expected: expected.clone(),
                    found: found.to_owned(),
                });
            }
        }
        if !self.allow.allows(app_id) {
            return Err(Rejection::AppIdNotAllowed(app_id.clone()));
        }

        // 6. Attestation bound to this very key.
        if self.require_attestation {
            match &claims.attestation {
                None => return Err(Rejection::AttestationMissing),
                Some(Err(e)) => return Err(Rejection::Malformed(e.clone().into())),
                Some(Ok(_)) if !peer.attestation.binds_key() => {
                    return Err(Rejection::AttestationNotBound)
                }
                Some(Ok(_)) => {}
            }
        }
        Ok(peer)
    }
}

/// How a leaf's issuer was established.
#[derive(Clone, Copy)]
enum Proof<'a> {
    /// webpki verified the path; these are its CAs between leaf and anchor, and the apps the
    /// anchor vouches for.
    Chain(&'a [CertificateDer<'a>], &'a AllowList),
    /// A TLS terminator verified it and passed on only the leaf.
    Vouched,
}

/// The identity a leaf claims. Callers must have verified the chain first.
pub(crate) fn identity_of(
    leaf: &X509Certificate<'_>,
    claims: &Claims,
) -> Result<VerifiedPeer, Rejection> {
    let (app_id, app_id_source) = claims.app_id.clone().ok_or(Rejection::MissingAppId)?;
    let attestation = AttestationStatus::from_binding(
        matches!(&claims.attestation, Some(Ok(att)) if att.binds_key(leaf.public_key().raw)),
    );
    Ok(VerifiedPeer {
        instance_id: claims.instance_id().map(str::to_owned),
        app_id,
        app_id_source,
        attestation,
        not_after: leaf.validity().not_after.timestamp(),
        quote: None,
    })
}

fn role_eku(role: PeerRole) -> &'static str {
    match role {
        PeerRole::Server => "serverAuth",
        PeerRole::Client => "clientAuth",
    }
}

/// The signature algorithms of the one crypto provider.
pub(crate) fn algorithms() -> WebPkiSupportedAlgorithms {
    crate::crypto::provider().signature_verification_algorithms
}

/// A peer that passed [`Policy::verify`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct VerifiedPeer {
    /// The peer's app id.
    pub app_id: AppId,
    /// Where it was read from.
    pub app_id_source: AppIdSource,
    /// The peer's instance id, when its certificate carries app-info.
    pub instance_id: Option<String>,
    /// What its attestation showed (the quote verified only under an attestation policy).
    pub attestation: AttestationStatus,
    /// End of the leaf's validity (unix seconds).
    pub not_after: i64,
    /// What its verified quote proves, under an attestation policy.
    #[serde(skip)]
    pub quote: Option<Arc<crate::quote::QuoteFacts>>,
}

/// Why a peer certificate was refused. Each variant is one rule of the policy.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Rejection {
    /// The chain does not lead to a trust anchor (unknown root, or a signature that does not
    /// verify, as with a root of the same name but another key).
    #[error("certificate is not issued by a trusted root")]
    UnknownIssuer,
    /// A certificate of the chain has expired.
    #[error("certificate expired at {}", cert::rfc3339(*.not_after))]
    Expired {
        /// End of validity (unix seconds).
        not_after: i64,
        /// The time of the check (unix seconds).
        at: i64,
    },
    /// A certificate of the chain is not valid yet.
    #[error("certificate is not valid before {}", cert::rfc3339(*.not_before))]
    NotYetValid {
        /// Start of validity (unix seconds).
        not_before: i64,
        /// The time of the check (unix seconds).
        at: i64,
    },
    /// The leaf's extended key usage does not allow the role.
    #[error("certificate is not allowed for TLS {role} authentication (extended key usage)")]
    WrongEku {
        /// The role the peer played.
        role: PeerRole,
    },
    /// The leaf's dstack usage extension is not `app:custom`.
    #[error("certificate usage is {0:?}, not an application leaf (\"app:custom\")")]
    NotAppLeaf(String),
    /// The leaf carries no app id (neither `.1.3` nor app-info).
    #[error("certificate carries no app id")]
    MissingAppId,
    /// The App CA on the path names another app than the leaf.
    #[error("leaf app id {leaf} differs from its App CA's {ca}")]
    AppCaMismatch {
        /// Leaf's app id.
        leaf: AppId,
        /// App CA's app id.
        ca: AppId,
    },
    /// Outbound: the peer is another app than the target.
    #[error("peer app id {found} is not the expected {expected}")]
    AppIdMismatch {
        /// The target.
        expected: AppId,
        /// What the peer presented.
        found: AppId,
    },
    /// Outbound: the peer is another instance than the one the target names.
    #[error("peer instance {found:?} is not the expected {expected}")]
    InstanceMismatch {
        /// The instance named.
        expected: AppId,
        /// What the peer presented (empty: none).
        found: String,
    },
    /// The attestation policy refused the peer's quote (or could not verify it).
    #[error("attestation: {0}")]
    Attestation(crate::attested::AttestationRejection),
    /// Inbound: the caller's app is not on the allowlist.
    #[error("app {0} is not allowed")]
    AppIdNotAllowed(AppId),
    /// The chain ends in a root trusted only for other apps (another cluster's KMS).
    #[error("app {0} is not one the root this chain ends in is trusted for")]
    RootNotTrustedForApp(AppId),
    /// The policy requires attestation and the leaf has none.
    #[error("certificate carries no attestation")]
    AttestationMissing,
    /// The attestation's report data does not bind the leaf's key.
    #[error("attestation does not bind the certificate key")]
    AttestationNotBound,
    /// The certificate could not be parsed or is structurally invalid.
    #[error("malformed certificate: {0}")]
    Malformed(Malformed),
    /// Any other chain failure (a CA used as leaf, path length, …).
    #[error("invalid certificate chain: {0}")]
    Chain(webpki::Error),
    /// The connection presented no certificate.
    #[error("no peer certificate")]
    NoCertificate,
    /// A resumed TLS session: its certificate was verified in an earlier handshake, not this
    /// one, so nothing here vouches for it.
    #[error("resumed session: the peer certificate was not verified in this handshake")]
    ResumedSession,
}

/// What could not be read in a certificate.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Malformed {
    /// Our parser refused it (DER, a dstack extension, conflicting app ids).
    #[error(transparent)]
    Cert(#[from] CertError),
    /// webpki refused its structure.
    #[error("{0}")]
    Webpki(webpki::Error),
    /// Its attestation extension cannot be read.
    #[error("attestation: {0}")]
    Attestation(#[from] crate::attestation::AttestationError),
    /// rustls reported a bad encoding (the cause is not known here).
    #[error("bad encoding")]
    Encoding,
}

impl Rejection {
    /// A short, bounded label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::UnknownIssuer => "unknown_issuer",
            Self::Expired { .. } => "expired",
            Self::NotYetValid { .. } => "not_yet_valid",
            Self::WrongEku { .. } => "wrong_eku",
            Self::NotAppLeaf(_) => "not_app_leaf",
            Self::MissingAppId => "missing_app_id",
            Self::AppCaMismatch { .. } => "app_ca_mismatch",
            Self::AppIdMismatch { .. } => "app_id_mismatch",
            Self::InstanceMismatch { .. } => "instance_mismatch",
            Self::Attestation(a) => a.reason(),
            Self::AppIdNotAllowed(_) => "app_id_not_allowed",
            Self::RootNotTrustedForApp(_) => "root_not_trusted_for_app",
            Self::AttestationMissing => "attestation_missing",
            Self::AttestationNotBound => "attestation_not_bound",
            Self::Malformed(_) => "malformed",
            Self::Chain(_) => "invalid_chain",
            Self::NoCertificate => "no_certificate",
            Self::ResumedSession => "resumed_session",
        }
    }

    fn from_webpki(e: webpki::Error, role: PeerRole) -> Self {
        use webpki::Error as E;
        match e {
            E::UnknownIssuer
            | E::InvalidSignatureForPublicKey
            | E::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => Self::UnknownIssuer,
            E::CertExpired { not_after, time } => Self::Expired {
                not_after: secs(not_after),
                at: secs(time),
            },
            E::CertNotValidYet { not_before, time } => Self::NotYetValid {
                not_before: secs(not_before),
                at: secs(time),
            },
            E::RequiredEkuNotFoundContext(_) | E::EmptyEkuExtension => Self::WrongEku { role },
            E::BadDer
            | E::BadDerTime
            | E::TrailingData(_)
            | E::ExtensionValueInvalid
            | E::UnsupportedCriticalExtension => Self::Malformed(Malformed::Webpki(e)),
            other => Self::Chain(other),
        }
    }

    /// The rejection a rustls error stands for, if one of our verifiers produced it.
    ///
    /// Chain, validity, EKU and encoding failures travel as rustls's own variants so the peer
    /// gets the right alert (`unknown_ca`, `certificate_expired`, ...); identity failures travel
    /// as the typed rejection itself, with the ids that did not match.
    pub fn from_tls_error(err: &rustls::Error) -> Option<Rejection> {
        use rustls::{CertificateError as C, ExtendedKeyPurpose as P};
        let rustls::Error::InvalidCertificate(e) = err else {
            return None;
        };
        Some(match e {
            C::Other(other) => return other.0.downcast_ref::<Rejection>().cloned(),
            C::UnknownIssuer => Self::UnknownIssuer,
            C::ExpiredContext { time, not_after } => Self::Expired {
                not_after: secs(*not_after),
                at: secs(*time),
            },
            C::NotValidYetContext { time, not_before } => Self::NotYetValid {
                not_before: secs(*not_before),
                at: secs(*time),
            },
            C::InvalidPurposeContext { required, .. } => Self::WrongEku {
                role: match required {
                    P::ClientAuth => PeerRole::Client,
                    _ => PeerRole::Server,
                },
            },
            C::BadEncoding => Self::Malformed(Malformed::Encoding),
            _ => return None,
        })
    }
}

fn secs(t: UnixTime) -> i64 {
    i64::try_from(t.as_secs()).unwrap_or(i64::MAX)
}

fn unix(secs: i64) -> UnixTime {
    UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs.max(0) as u64))
}

impl From<Rejection> for rustls::Error {
    fn from(r: Rejection) -> Self {
        use rustls::{CertificateError as C, ExtendedKeyPurpose as P};
        rustls::Error::InvalidCertificate(match r {
            Rejection::UnknownIssuer => C::UnknownIssuer,
            Rejection::Expired { not_after, at } => C::ExpiredContext {
                time: unix(at),
                not_after: unix(not_after),
            },
            Rejection::NotYetValid { not_before, at } => C::NotValidYetContext {
                time: unix(at),
                not_before: unix(not_before),
            },
            Rejection::WrongEku { role } => C::InvalidPurposeContext {
                required: match role {
                    PeerRole::Server => P::ServerAuth,
                    PeerRole::Client => P::ClientAuth,
                },
                presented: Vec::new(),
            },
            Rejection::Malformed(_) => C::BadEncoding,
            other => C::Other(rustls::OtherError(Arc::new(other))),
        })
    }
}
