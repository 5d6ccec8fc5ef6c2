//! TDX quote verification on real material: `sim-app1-signed-ratls`, a certificate from the
//! dstack simulator whose quote the mock PCK chain signed, with the collateral the mock PCCS
//! served (`testdata/dstack-sim/mock-pccs`, nextUpdate 2026-12-22T13:42:34Z).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod support;

use std::path::PathBuf;

use ratls::{
    attestation::Attestation,
    quote::{self, Collateral, QuoteError, TdxRoot},
};

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../testdata/dstack-sim"
    ))
}

/// 2026-12-01T00:00:00Z: inside the collateral's validity.
const BEFORE: u64 = 1_796_083_200;
/// 2026-12-23T00:00:00Z: past its nextUpdate.
const AFTER: u64 = 1_797_984_000;

fn attestation() -> Attestation {
    let pem = std::fs::read(fixtures().join("certs/sim-app1-signed-ratls/leaf.pem")).unwrap();
    let leaf = ratls::cert::parse_chain(&pem).unwrap().remove(0);
    ratls::cert::attestation_of(&leaf)
        .unwrap()
        .expect("the fixture carries an attestation")
}

fn collateral() -> Collateral {
    Collateral::from_dir(&fixtures().join("mock-pccs")).unwrap()
}

fn root() -> TdxRoot {
    TdxRoot::from_pem(&std::fs::read(fixtures().join("mock-pccs/tdx-root-ca.pem")).unwrap())
        .unwrap()
}

#[test]
fn the_signed_fixture_verifies_and_its_event_log_names_app1() {
    let facts = quote::verify(&attestation(), &collateral(), &root(), BEFORE).unwrap();
    assert_eq!(facts.tcb_status, "UpToDate", "{facts:?}");
    assert_eq!(
        facts.app_id.as_deref(),
        Some("5bb4ff9a3837357f19dc176407a5709c62eb6c56")
    );
    assert_eq!(
        facts.instance_id.as_deref(),
        Some("1691ed1b47506cad7d08834668691d88246f5b1f")
    );
    assert_eq!(
        facts.compose_hash.as_deref(),
        Some("c143116fef3940e7f776bfc0919c256232ae5338a6e948c96b711e0b2383483a")
    );
    assert!(
        facts
            .key_provider
            .as_deref()
            .is_some_and(|k| k.contains("kms")),
        "{facts:?}"
    );
    assert_eq!(facts.valid_until, 1_797_946_954, "2026-12-22T13:42:34Z");
}

/// The signed simulator's `GetQuote` answer (report data `1234deadbeef`).
fn get_quote() -> ratls::agent::QuoteResponse {
    let body = std::fs::read(fixtures().join("api/app1-signed/get_quote_post.json")).unwrap();
    serde_json::from_slice(&body).unwrap()
}

#[test]
fn a_get_quote_answer_verifies_with_its_json_event_log_and_its_v1_attestation() {
    let answer = get_quote();
    let json = Attestation::from_get_quote(&answer.quote, &answer.event_log).unwrap();
    assert_eq!(json.event_log.len(), 33);
    let v1 = Attestation::parse(&hex::decode(answer.attestation.unwrap()).unwrap()).unwrap();
    assert_eq!(v1.format, ratls::attestation::Format::V1Msgpack);
    assert_eq!(v1.event_log, json.event_log, "one event log, two encodings");
    for attestation in [json, v1] {
        let facts = quote::verify(&attestation, &collateral(), &root(), BEFORE).unwrap();
        assert_eq!(
            facts.app_id.as_deref(),
            Some("5bb4ff9a3837357f19dc176407a5709c62eb6c56")
        );
        assert!(facts.report_data.starts_with("1234deadbeef"), "{facts:?}");
    }
    // A log that does not replay, bad hex and garbage: reasons, not panics.
    let mut changed = Attestation::from_get_quote(&answer.quote, &answer.event_log).unwrap();
    let last = changed.event_log.iter_mut().rfind(|e| e.imr == 3).unwrap();
    last.payload.push(0);
    assert_eq!(
        quote::verify(&changed, &collateral(), &root(), BEFORE).unwrap_err(),
        QuoteError::EventLogMismatch
    );
    assert!(Attestation::from_get_quote("zz", "[]").is_err());
    assert!(Attestation::from_get_quote(&answer.quote, "{not json").is_err());
    assert!(Attestation::from_get_quote(
        &answer.quote,
        r#"[{"imr":3,"event_type":1,"digest":"nothex","event":"x","event_payload":""}]"#
    )
    .is_err());
}

#[test]
fn expired_collateral_is_refused_as_such() {
    let e = quote::verify(&attestation(), &collateral(), &root(), AFTER).unwrap_err();
    assert!(matches!(e, QuoteError::CollateralExpired(_)), "{e}");
    assert_eq!(e.reason(), "collateral_expired");
}

#[test]
fn tampering_is_refused_with_its_reason() {
    // A flipped byte in the signed TD report.
    let mut a = attestation();
    a.quote[200] ^= 1;
    let e = quote::verify(&a, &collateral(), &root(), BEFORE).unwrap_err();
    assert_eq!(e.reason(), "quote_signature", "{e}");
    // An event the quote did not measure.
    let mut a = attestation();
    let compose = a
        .event_log
        .iter_mut()
        .find(|e| e.event == "compose-hash")
        .unwrap();
    compose.payload[0] ^= 1;
    let e = quote::verify(&a, &collateral(), &root(), BEFORE).unwrap_err();
    assert_eq!(e, QuoteError::EventLogMismatch);
    // Another root.
    let intel =
        quote::verify(&attestation(), &collateral(), &TdxRoot::intel(), BEFORE).unwrap_err();
    assert_eq!(intel.reason(), "quote_signature", "{intel}");
    // Collateral for another platform.
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(fixtures().join("mock-pccs")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), dir.path().join(f.file_name())).unwrap();
    }
    let tcb = std::fs::read_to_string(dir.path().join("tcb.json")).unwrap();
    std::fs::write(
        dir.path().join("tcb.json"),
        tcb.replace("\"fmspc\":\"000000000000\"", "\"fmspc\":\"00906ed50000\""),
    )
    .unwrap();
    let other = Collateral::from_dir(dir.path()).unwrap();
    let e = quote::verify(&attestation(), &other, &root(), BEFORE).unwrap_err();
    assert!(
        matches!(e, QuoteError::Collateral(_) | QuoteError::Signature(_)),
        "{e}"
    );
    // Several platforms: the quote's PCK certificate picks its own collateral, and a set
    // without it says which platform it lacks.
    assert_eq!(
        quote::fmspc_of(&attestation().quote).unwrap(),
        "000000000000"
    );
    let mut set = quote::CollateralSet::default();
    set.insert(other.clone());
    let e = set.for_quote(&attestation().quote).unwrap_err();
    assert_eq!(e.reason(), "collateral_unavailable", "{e}");
    assert!(e.to_string().contains("FMSPC 000000000000"), "{e}");
    // A directory with one platform at its top and another in a subdirectory holds both.
    let real = dir.path().join("000000000000");
    std::fs::create_dir(&real).unwrap();
    for f in std::fs::read_dir(fixtures().join("mock-pccs")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), real.join(f.file_name())).unwrap();
    }
    let set = quote::CollateralSet::from_dir(dir.path()).unwrap();
    assert!(set.get("00906ed50000").is_some());
    let picked = set.for_quote(&attestation().quote).unwrap();
    quote::verify(&attestation(), picked, &root(), BEFORE).unwrap();
    assert_eq!(
        quote::fmspc_of(b"not a quote").unwrap_err().reason(),
        "quote_malformed"
    );
    // Garbage collateral is an error, not a panic.
    std::fs::write(dir.path().join("tcb.json"), b"{not json").unwrap();
    assert_eq!(
        Collateral::from_dir(dir.path()).unwrap_err().reason(),
        "collateral_unavailable"
    );
}

mod policy {
    use std::sync::Arc;

    use ratls::{
        attested::{AppRules, Attestor, Rules},
        AttestationStatus, PeerRole, Policy, Rejection, TrustAnchors,
    };
    use rustls_pki_types::UnixTime;

    use super::*;

    const COMPOSE: &str = "c143116fef3940e7f776bfc0919c256232ae5338a6e948c96b711e0b2383483a";

    fn chain() -> Vec<rustls_pki_types::CertificateDer<'static>> {
        let pem = std::fs::read(fixtures().join("certs/sim-app1-signed-ratls/chain.pem")).unwrap();
        ratls::cert::parse_chain(&pem).unwrap()
    }

    fn policy(rules: Rules) -> (Policy, Arc<Attestor>) {
        let ca = std::fs::read(fixtures().join("certs/sim-app1-signed-ratls/ca.pem")).unwrap();
        let anchors = TrustAnchors::new(&ratls::cert::parse_chain(&ca).unwrap()).unwrap();
        let attestor = Arc::new(Attestor::new(rules, root()));
        attestor.set_collateral(collateral());
        (
            Policy::new(anchors).attested(Some(attestor.clone())),
            attestor,
        )
    }

    fn at(secs: u64) -> UnixTime {
        UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs))
    }

    fn verify(policy: &Policy) -> Result<ratls::VerifiedPeer, Rejection> {
        let c = chain();
        policy.verify(&c[0], &c[1..], PeerRole::Client, at(BEFORE))
    }

    #[test]
    fn a_pinned_compose_hash_admits_the_peer_and_another_refuses_it() {
        let pinned = Rules {
            compose_hashes: [COMPOSE.to_owned()].into(),
            ..Rules::default()
        };
        let peer = verify(&policy(pinned).0).unwrap();
        assert_eq!(peer.attestation, AttestationStatus::QuoteVerified);
        assert_eq!(
            peer.quote.as_ref().unwrap().compose_hash.as_deref(),
            Some(COMPOSE)
        );

        let other = Rules {
            compose_hashes: ["00".repeat(32)].into(),
            ..Rules::default()
        };
        let e = verify(&policy(other).0).unwrap_err();
        assert_eq!(e.reason(), "compose_hash_not_allowed", "{e}");
        // Per-app pins win over the global list.
        let app: ratls::AppId = "5bb4ff9a3837357f19dc176407a5709c62eb6c56".parse().unwrap();
        let per_app = Rules {
            compose_hashes: ["00".repeat(32)].into(),
            apps: [(
                app,
                AppRules {
                    compose_hashes: [COMPOSE.to_owned()].into(),
                    ..AppRules::default()
                },
            )]
            .into(),
            ..Rules::default()
        };
        verify(&policy(per_app).0).unwrap();
    }

    #[test]
    fn tcb_status_measurements_and_missing_collateral_are_reasons() {
        let strict = Rules {
            tcb_statuses: ["OutOfDate".to_owned()].into(),
            ..Rules::default()
        };
        assert_eq!(
            verify(&policy(strict).0).unwrap_err().reason(),
            "tcb_status"
        );
        let mrtd = Rules {
            mrtd: ["ab".repeat(48)].into(),
            ..Rules::default()
        };
        assert_eq!(
            verify(&policy(mrtd).0).unwrap_err().reason(),
            "mrtd_not_allowed"
        );
        let (p, _) = policy(Rules::default());
        let fresh = Policy::new(p.anchors.clone())
            .attested(Some(Arc::new(Attestor::new(Rules::default(), root()))));
        assert_eq!(
            verify(&fresh).unwrap_err().reason(),
            "collateral_unavailable"
        );
    }

    /// The fixture's key and evidence on a leaf that names no app (what the simulator issues
    /// without app-info), signed by a root of the test's own.
    fn leaf_naming_no_app() -> (TrustAnchors, rustls_pki_types::CertificateDer<'static>) {
        use ratls::ext::oid;
        let pem = std::fs::read(fixtures().join("certs/sim-app1-signed-ratls/leaf.pem")).unwrap();
        let der = ratls::cert::parse_chain(&pem).unwrap().remove(0);
        let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
        let mut leaf = support::Leaf::new(support::APP_A);
        leaf.app_id = None;
        let start = time::OffsetDateTime::from_unix_timestamp(BEFORE as i64).unwrap();
        leaf.not_before = start - std::time::Duration::from_secs(86_400);
        leaf.not_after = start + std::time::Duration::from_secs(86_400);
        for e in x509.extensions() {
            let id: Vec<u64> = e.oid.iter().unwrap().collect();
            if [oid::ATTESTATION, oid::LEGACY_QUOTE, oid::LEGACY_EVENT_LOG].contains(&&id[..]) {
                leaf.extra.push(rcgen::CustomExtension::from_oid_content(
                    &id,
                    e.value.to_vec(),
                ));
            }
        }
        assert!(!leaf.extra.is_empty(), "the fixture carries its evidence");
        let key = std::fs::read_to_string(fixtures().join("certs/sim-app1-signed-ratls/key.pem"))
            .unwrap();
        let key = rcgen::KeyPair::from_pem(&key).unwrap();
        let root = support::Ca::root("Test KMS CA");
        let cert = leaf.params().signed_by(&key, &root.issuer).unwrap();
        let anchors = TrustAnchors::new(std::slice::from_ref(&root.der)).unwrap();
        (anchors, cert.der().clone())
    }

    #[test]
    fn the_app_id_comes_from_the_event_log_only_when_the_policy_says_so() {
        let (anchors, leaf) = leaf_naming_no_app();
        let check = |rules: Rules| {
            let attestor = Arc::new(Attestor::new(rules, root()));
            attestor.set_collateral(collateral());
            Policy::new(anchors.clone())
                .attested(Some(attestor))
                .verify(&leaf, &[], PeerRole::Client, at(BEFORE))
        };
        assert_eq!(
            check(Rules::default()).unwrap_err(),
            Rejection::MissingAppId
        );
        let peer = check(Rules {
            app_id_from_event_log: true,
            ..Rules::default()
        })
        .unwrap();
        assert_eq!(
            peer.app_id.to_string(),
            "5bb4ff9a3837357f19dc176407a5709c62eb6c56"
        );
        assert_eq!(peer.app_id_source, ratls::AppIdSource::EventLog);
        assert_eq!(peer.attestation, AttestationStatus::QuoteVerified);
        // Per-app pins apply to the measured app too.
        let pinned_elsewhere = Rules {
            app_id_from_event_log: true,
            apps: [(
                peer.app_id.clone(),
                AppRules {
                    compose_hashes: ["00".repeat(32)].into(),
                    ..AppRules::default()
                },
            )]
            .into(),
            ..Rules::default()
        };
        assert_eq!(
            check(pinned_elsewhere).unwrap_err().reason(),
            "compose_hash_not_allowed"
        );
        // Without a verified quote nothing vouches for a measured app id.
        let no_attestor =
            Policy::new(anchors.clone()).verify(&leaf, &[], PeerRole::Client, at(BEFORE));
        assert_eq!(no_attestor.unwrap_err(), Rejection::MissingAppId);
    }

    #[test]
    fn a_bad_quote_is_verified_once_until_new_collateral_arrives() {
        let attestor = Attestor::new(Rules::default(), root());
        attestor.set_collateral(collateral());
        let mut bad = attestation();
        bad.quote[200] ^= 1;
        for _ in 0..3 {
            let e = attestor.check_evidence(&bad, BEFORE as i64).unwrap_err();
            assert_eq!(e.reason(), "quote_signature");
        }
        assert_eq!(attestor.cached(), 1, "one verdict for the bad quote");
        attestor
            .check_evidence(&attestation(), BEFORE as i64)
            .unwrap();
        assert_eq!(attestor.cached(), 2);
        // New collateral: the failure gets another chance, the success stands.
        attestor.set_collateral(collateral());
        assert_eq!(attestor.cached(), 1);
        // An expired collateral is not the quote's fault: nothing is kept.
        let fresh = Attestor::new(Rules::default(), root());
        fresh.set_collateral(collateral());
        let e = fresh
            .check_evidence(&attestation(), AFTER as i64)
            .unwrap_err();
        assert_eq!(e.reason(), "collateral_expired");
        assert_eq!(fresh.cached(), 0);
    }

    #[test]
    fn the_verdict_is_cached_by_the_certificate() {
        let (policy, attestor) = policy(Rules::default());
        verify(&policy).unwrap();
        // Collateral that could verify nothing: the cached verdict stands until it expires.
        let mut broken = collateral();
        broken.next_update = 0;
        attestor.set_collateral(broken);
        verify(&policy).unwrap();
    }
}
