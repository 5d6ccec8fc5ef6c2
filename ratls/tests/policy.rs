//! Every rule of the verification policy, one rejection reason at a time, on certificates the
//! tests mint themselves.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod support;

use std::{collections::BTreeSet, time::Duration};

use ratls::{AllowList, AppIdSource, PeerRole, Policy, Rejection};
use rcgen::ExtendedKeyUsagePurpose;
use rustls_pki_types::{CertificateDer, UnixTime};
use support::{app, ext_of, Ca, Leaf, Pki, APP_A, APP_B};
use time::OffsetDateTime;

fn verify(
    policy: &Policy,
    chain: &[CertificateDer<'static>],
    role: PeerRole,
) -> Result<ratls::VerifiedPeer, Rejection> {
    policy.verify(&chain[0], &chain[1..], role, UnixTime::now())
}

#[test]
fn a_valid_kms_style_chain_is_accepted_in_both_roles() {
    let pki = Pki::new();
    let chain = pki.chain(&Leaf::new(APP_A), Some(APP_A));
    let policy = Policy::new(pki.anchors());
    for role in [PeerRole::Server, PeerRole::Client] {
        let peer = verify(&policy, &chain, role).unwrap();
        assert_eq!(peer.app_id, app(APP_A));
        assert_eq!(peer.app_id_source, AppIdSource::Extension);
        assert_eq!(peer.attestation, ratls::AttestationStatus::Absent);
    }
}

#[test]
fn app_id_from_app_info_is_accepted_when_the_leaf_has_no_app_id_extension() {
    let pki = Pki::new();
    let mut leaf = Leaf::new(APP_A);
    leaf.app_id = None;
    leaf.app_info_id = Some(hex::decode(APP_B).unwrap());
    // Simulator shape: the root signs the leaf directly.
    let (leaf, _) = leaf.signed_by(&pki.root);
    let peer = verify(&Policy::new(pki.anchors()), &[leaf], PeerRole::Server).unwrap();
    assert_eq!(peer.app_id, app(APP_B));
    assert_eq!(peer.app_id_source, AppIdSource::AppInfo);
    assert_eq!(peer.instance_id.as_deref(), Some(&*"11".repeat(20)));
}

#[test]
fn unknown_issuer_another_ca() {
    let pki = Pki::new();
    let other = Pki::new();
    let chain = other.chain(&Leaf::new(APP_A), Some(APP_A));
    let err = verify(&Policy::new(pki.anchors()), &chain, PeerRole::Server).unwrap_err();
    assert_eq!(err, Rejection::UnknownIssuer);
}

#[test]
fn unknown_issuer_same_root_name_other_key() {
    let pki = Pki::new();
    // Same subject "O=Dstack, CN=Dstack KMS CA", different key.
    let impostor = Pki {
        root: Ca::root("Dstack KMS CA"),
    };
    let chain = impostor.chain(&Leaf::new(APP_A), Some(APP_A));
    let err = verify(&Policy::new(pki.anchors()), &chain, PeerRole::Client).unwrap_err();
    assert_eq!(err, Rejection::UnknownIssuer);
}

#[test]
fn unknown_issuer_self_signed_leaf_with_plausible_app_id() {
    let pki = Pki::new();
    let (leaf, _) = Leaf::new(APP_A).self_signed();
    let err = verify(&Policy::new(pki.anchors()), &[leaf], PeerRole::Server).unwrap_err();
    assert_eq!(err, Rejection::UnknownIssuer);
}

#[test]
fn unknown_issuer_when_the_app_ca_is_not_sent() {
    let pki = Pki::new();
    let chain = pki.chain(&Leaf::new(APP_A), Some(APP_A));
    let err = verify(&Policy::new(pki.anchors()), &chain[..1], PeerRole::Server).unwrap_err();
    assert_eq!(err, Rejection::UnknownIssuer);
}

#[test]
fn expired() {
    let pki = Pki::new();
    let mut leaf = Leaf::new(APP_A);
    leaf.not_before = OffsetDateTime::now_utc() - Duration::from_secs(7200);
    leaf.not_after = OffsetDateTime::now_utc() - Duration::from_secs(60);
    let chain = pki.chain(&leaf, Some(APP_A));
    let err = verify(&Policy::new(pki.anchors()), &chain, PeerRole::Server).unwrap_err();
    assert!(matches!(err, Rejection::Expired { .. }), "{err:?}");
    assert_eq!(err.reason(), "expired");
}

#[test]
fn not_yet_valid() {
    let pki = Pki::new();
    let mut leaf = Leaf::new(APP_A);
    leaf.not_before = OffsetDateTime::now_utc() + Duration::from_secs(3600);
    leaf.not_after = OffsetDateTime::now_utc() + Duration::from_secs(7200);
    let chain = pki.chain(&leaf, Some(APP_A));
    let err = verify(&Policy::new(pki.anchors()), &chain, PeerRole::Server).unwrap_err();
    assert!(matches!(err, Rejection::NotYetValid { .. }), "{err:?}");
}

#[test]
fn wrong_eku_for_the_role() {
    let pki = Pki::new();
    let mut leaf = Leaf::new(APP_A);
    leaf.eku = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let chain = pki.chain(&leaf, Some(APP_A));
    let policy = Policy::new(pki.anchors());
    assert!(verify(&policy, &chain, PeerRole::Server).is_ok());
    assert_eq!(
        verify(&policy, &chain, PeerRole::Client).unwrap_err(),
        Rejection::WrongEku {
            role: PeerRole::Client
        }
    );

    // No EKU at all: RFC 5280 would allow any use; a mesh identity must name its role.
    leaf.eku = Vec::new();
    let chain = pki.chain(&leaf, Some(APP_A));
    assert_eq!(
        verify(&policy, &chain, PeerRole::Server).unwrap_err(),
        Rejection::WrongEku {
            role: PeerRole::Server
        }
    );
}

#[test]
fn a_special_usage_is_not_an_application_leaf() {
    let pki = Pki::new();
    let mut leaf = Leaf::new(APP_A);
    leaf.usage = Some("app:ca");
    let chain = pki.chain(&leaf, Some(APP_A));
    let err = verify(&Policy::new(pki.anchors()), &chain, PeerRole::Server).unwrap_err();
    assert_eq!(err, Rejection::NotAppLeaf("app:ca".into()));
}

#[test]
fn missing_app_id() {
    let pki = Pki::new();
    let mut leaf = Leaf::new(APP_A);
    leaf.app_id = None;
    let chain = pki.chain(&leaf, None);
    let err = verify(&Policy::new(pki.anchors()), &chain, PeerRole::Server).unwrap_err();
    assert_eq!(err, Rejection::MissingAppId);
}

#[test]
fn app_id_mismatch_outbound() {
    let pki = Pki::new();
    let chain = pki.chain(&Leaf::new(APP_A), Some(APP_A));
    let policy = Policy::new(pki.anchors()).expect(app(APP_B));
    assert_eq!(
        verify(&policy, &chain, PeerRole::Server).unwrap_err(),
        Rejection::AppIdMismatch {
            expected: app(APP_B),
            found: app(APP_A)
        }
    );
    // Case does not matter.
    let policy = Policy::new(pki.anchors()).expect(app(&APP_A.to_uppercase()));
    assert!(verify(&policy, &chain, PeerRole::Server).is_ok());
}

#[test]
fn app_id_not_allowed_inbound() {
    let pki = Pki::new();
    let chain = pki.chain(&Leaf::new(APP_A), Some(APP_A));
    let policy = Policy::new(pki.anchors()).allow(AllowList::Only(BTreeSet::from([app(APP_B)])));
    assert_eq!(
        verify(&policy, &chain, PeerRole::Client).unwrap_err(),
        Rejection::AppIdNotAllowed(app(APP_A))
    );
    let policy =
        Policy::new(pki.anchors()).allow(AllowList::Only(BTreeSet::from([app(APP_B), app(APP_A)])));
    assert!(verify(&policy, &chain, PeerRole::Client).is_ok());
}

#[test]
fn app_ca_must_agree_with_the_leaf() {
    let pki = Pki::new();
    let chain = pki.chain(&Leaf::new(APP_A), Some(APP_B));
    let err = verify(&Policy::new(pki.anchors()), &chain, PeerRole::Server).unwrap_err();
    assert_eq!(
        err,
        Rejection::AppCaMismatch {
            leaf: app(APP_A),
            ca: app(APP_B)
        }
    );
}

#[test]
fn malformed_certificates() {
    let pki = Pki::new();
    let policy = Policy::new(pki.anchors());
    let garbage = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
    assert!(matches!(
        verify(&policy, &[garbage], PeerRole::Server).unwrap_err(),
        Rejection::Malformed(_)
    ));

    // A validly signed leaf whose app id extension is not an OCTET STRING.
    let mut leaf = Leaf::new(APP_A);
    leaf.app_id = None;
    leaf.extra.push(rcgen::CustomExtension::from_oid_content(
        ratls::ext::oid::APP_ID,
        vec![0x0c, 0x01, b'x'],
    ));
    let chain = pki.chain(&leaf, None);
    let err = verify(&policy, &chain, PeerRole::Server).unwrap_err();
    assert!(matches!(err, Rejection::Malformed(_)), "{err:?}");
    assert_eq!(err.reason(), "malformed");
}

#[test]
fn attestation_required() {
    let pki = Pki::new();
    let chain = pki.chain(&Leaf::new(APP_A), Some(APP_A));
    let policy = Policy::new(pki.anchors()).require_attestation(true);
    assert_eq!(
        verify(&policy, &chain, PeerRole::Server).unwrap_err(),
        Rejection::AttestationMissing
    );

    // A real attestation lifted from another certificate binds that certificate's key.
    let fixture = std::fs::read(fixture("certs/kms-app1-ratls/leaf.pem")).unwrap();
    let donor = ratls::cert::parse_chain(&fixture).unwrap();
    let (_, donor) = x509_parser::parse_x509_certificate(&donor[0]).unwrap();
    let att = donor
        .extensions()
        .iter()
        .find(|e| e.oid.to_id_string() == "1.3.6.1.4.1.62397.1.8")
        .unwrap();
    let mut leaf = Leaf::new(APP_A);
    leaf.extra.push(rcgen::CustomExtension::from_oid_content(
        ratls::ext::oid::ATTESTATION,
        att.value.to_vec(),
    ));
    let chain = pki.chain(&leaf, Some(APP_A));
    assert_eq!(
        verify(&policy, &chain, PeerRole::Server).unwrap_err(),
        Rejection::AttestationNotBound
    );
    // Without the requirement it is accepted, and reported as not attested.
    let peer = verify(&Policy::new(pki.anchors()), &chain, PeerRole::Server).unwrap();
    assert_eq!(peer.attestation, ratls::AttestationStatus::Absent);
}

#[test]
fn rejection_survives_the_trip_through_rustls() {
    let err: rustls::Error = Rejection::AppIdNotAllowed(app(APP_A)).into();
    assert_eq!(
        Rejection::from_tls_error(&err),
        Some(Rejection::AppIdNotAllowed(app(APP_A)))
    );
    assert_eq!(
        Rejection::from_tls_error(&rustls::Error::DecryptError),
        None
    );
}

#[test]
fn chain_failures_travel_as_rustls_variants_so_the_alert_is_right() {
    use rustls::{AlertDescription as A, CertificateError};
    let cases = [
        (Rejection::UnknownIssuer, A::UnknownCA),
        (
            Rejection::Expired {
                not_after: 100,
                at: 200,
            },
            A::CertificateExpired,
        ),
        (
            Rejection::NotYetValid {
                not_before: 300,
                at: 200,
            },
            A::CertificateExpired,
        ),
        (
            Rejection::WrongEku {
                role: PeerRole::Client,
            },
            A::UnsupportedCertificate,
        ),
        (
            Rejection::AppIdNotAllowed(app(APP_A)),
            A::CertificateUnknown,
        ),
    ];
    for (rejection, alert) in cases {
        let err: rustls::Error = rejection.clone().into();
        let rustls::Error::InvalidCertificate(cert_err) = &err else {
            panic!("{err:?}")
        };
        assert_eq!(A::from(cert_err.clone()), alert, "{rejection:?}");
        // And the reason survives the trip, with its details.
        assert_eq!(Rejection::from_tls_error(&err), Some(rejection));
    }
    let malformed: rustls::Error = Rejection::Malformed(ratls::Malformed::Encoding).into();
    assert_eq!(
        malformed,
        rustls::Error::InvalidCertificate(CertificateError::BadEncoding)
    );
}

#[test]
fn client_ca_hints_are_whole_der_names() {
    use x509_parser::prelude::FromDer;
    let pki = Pki::new();
    let anchors = pki.anchors();
    let hint = &anchors.subjects()[0];
    let (rest, name) = x509_parser::x509::X509Name::from_der(hint.as_ref()).unwrap();
    assert!(rest.is_empty());
    assert_eq!(name.to_string(), "O=Dstack, CN=Dstack KMS CA");
}

#[test]
fn app_info_counts_only_on_leaves_the_root_signs_directly() {
    let pki = Pki::new();
    let mut leaf = Leaf::new(APP_A);
    leaf.app_id = None;
    leaf.app_info_id = Some(hex::decode(APP_B).unwrap());
    // Under an App CA (KMS shape) only `.1.3`, which the KMS writes, names the app.
    let chain = pki.chain(&leaf, None);
    assert_eq!(
        verify(&Policy::new(pki.anchors()), &chain, PeerRole::Server).unwrap_err(),
        Rejection::MissingAppId
    );
    // And without the usage extension the leaf is not an application leaf of the simulator.
    leaf.usage = None;
    let (direct, _) = leaf.signed_by(&pki.root);
    assert_eq!(
        verify(&Policy::new(pki.anchors()), &[direct], PeerRole::Server).unwrap_err(),
        Rejection::MissingAppId
    );
}

#[test]
fn every_reason_label_is_distinct() {
    let all = [
        Rejection::UnknownIssuer,
        Rejection::Expired {
            not_after: 0,
            at: 1,
        },
        Rejection::NotYetValid {
            not_before: 1,
            at: 0,
        },
        Rejection::WrongEku {
            role: PeerRole::Server,
        },
        Rejection::NotAppLeaf(String::new()),
        Rejection::MissingAppId,
        Rejection::AppCaMismatch {
            leaf: app(APP_A),
            ca: app(APP_B),
        },
        Rejection::AppIdMismatch {
            expected: app(APP_A),
            found: app(APP_B),
        },
        Rejection::AppIdNotAllowed(app(APP_A)),
        Rejection::RootNotTrustedForApp(app(APP_A)),
        Rejection::AttestationMissing,
        Rejection::AttestationNotBound,
        Rejection::Malformed(ratls::Malformed::Encoding),
        Rejection::Chain(webpki::Error::CaUsedAsEndEntity),
        Rejection::NoCertificate,
        Rejection::ResumedSession,
    ];
    let labels: BTreeSet<_> = all.iter().map(Rejection::reason).collect();
    assert_eq!(labels.len(), all.len());
}

#[test]
fn an_extension_helper_round_trips() {
    // The support module's extension encoding is the one the library reads.
    let e = ext_of(ratls::ext::oid::CERT_USAGE, b"app:custom");
    assert_eq!(e.content(), b"\x04\x0aapp:custom");
}

pub fn fixture(rel: &str) -> String {
    format!(
        "{}/../testdata/dstack-sim/{rel}",
        env!("CARGO_MANIFEST_DIR")
    )
}

#[test]
fn a_leaf_vouched_for_by_a_terminator_gets_every_other_check() {
    let pki = Pki::new();
    let policy = Policy::new(pki.anchors()).allow(AllowList::Only(BTreeSet::from([app(APP_A)])));
    let vouched = |leaf: &Leaf| {
        let chain = pki.chain(leaf, Some(APP_A));
        policy.verify_leaf_vouched(&chain[0], PeerRole::Client, UnixTime::now())
    };
    // The KMS shape: the App CA is missing, `.1.3` names the app.
    assert_eq!(vouched(&Leaf::new(APP_A)).unwrap().app_id, app(APP_A));
    assert_eq!(
        vouched(&Leaf::new(APP_B)).unwrap_err(),
        Rejection::AppIdNotAllowed(app(APP_B))
    );
    let mut expired = Leaf::new(APP_A);
    expired.not_after = OffsetDateTime::now_utc() - Duration::from_secs(1);
    assert_eq!(vouched(&expired).unwrap_err().reason(), "expired");
    let mut future = Leaf::new(APP_A);
    future.not_before = OffsetDateTime::now_utc() + Duration::from_secs(600);
    assert_eq!(vouched(&future).unwrap_err().reason(), "not_yet_valid");
    let mut server_only = Leaf::new(APP_A);
    server_only.eku = vec![ExtendedKeyUsagePurpose::ServerAuth];
    assert_eq!(vouched(&server_only).unwrap_err().reason(), "wrong_eku");
    // App-info is the requester's own word: never enough without a verified chain.
    let mut info_only = Leaf::new(APP_A);
    info_only.app_id = None;
    info_only.app_info_id = Some(hex::decode(APP_A).unwrap());
    assert_eq!(vouched(&info_only).unwrap_err(), Rejection::MissingAppId);
}

#[test]
fn a_federated_root_vouches_only_for_its_own_apps() {
    // Ours vouches for any app; the other cluster's KMS (same name, other key) only for B.
    let ours = Pki::new();
    let theirs = Pki::new();
    let anchors = ratls::TrustAnchors::scoped(&[
        (std::slice::from_ref(&ours.root.der), AllowList::Any),
        (
            std::slice::from_ref(&theirs.root.der),
            AllowList::Only(BTreeSet::from([app(APP_B)])),
        ),
    ])
    .unwrap();
    let policy = Policy::new(anchors);
    let their_b = theirs.chain(&Leaf::new(APP_B), Some(APP_B));
    assert_eq!(
        verify(&policy, &their_b, PeerRole::Client).unwrap().app_id,
        app(APP_B)
    );
    // Their KMS minting one of our app ids is refused; ours may issue both.
    let their_a = theirs.chain(&Leaf::new(APP_A), Some(APP_A));
    let e = verify(&policy, &their_a, PeerRole::Client).unwrap_err();
    assert_eq!(e, Rejection::RootNotTrustedForApp(app(APP_A)));
    assert_eq!(e.reason(), "root_not_trusted_for_app");
    for id in [APP_A, APP_B] {
        let chain = ours.chain(&Leaf::new(id), Some(id));
        verify(&policy, &chain, PeerRole::Server).unwrap();
    }
    // A terminator does not say which root it found: every root must vouch for the app.
    assert_eq!(
        policy
            .verify_leaf_vouched(&their_a[0], PeerRole::Client, UnixTime::now())
            .unwrap_err(),
        Rejection::RootNotTrustedForApp(app(APP_A))
    );
    policy
        .verify_leaf_vouched(&their_b[0], PeerRole::Client, UnixTime::now())
        .unwrap();
}
