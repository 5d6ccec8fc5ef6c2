//! The identity's schedule and self-check, on the simulator's real answers.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::{
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ratls::{
    agent::{InfoResponse, TlsKeyResponse},
    identity::{Identity, IdentityConfig, IdentityError, MIN_REFRESH_INTERVAL, MIN_VALIDITY},
    Rejection,
};

fn fixture<T: serde::de::DeserializeOwned>(rel: &str) -> T {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata/dstack-sim")
        .join(rel);
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn info() -> InfoResponse {
    fixture("api/app1/info_get.json")
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn an_identity_from_a_simulator_answer_with_app_info() {
    let resp: TlsKeyResponse = fixture("api/app1/tlskey_with_app_info.json");
    let id = Identity::from_response(&resp, &info()).unwrap();
    assert_eq!(
        id.app_id.to_string(),
        "5bb4ff9a3837357f19dc176407a5709c62eb6c56"
    );
    assert_eq!(
        id.instance_id.as_deref(),
        Some("1691ed1b47506cad7d08834668691d88246f5b1f")
    );
    assert_eq!(id.attestation, ratls::AttestationStatus::KeyBound);
    id.self_check().unwrap();
}

#[test]
fn an_identity_peers_would_refuse_is_not_usable() {
    // dstack-vpc's request: no app-info, so the simulator's certificate names no app.
    let resp: TlsKeyResponse = fixture("api/app1/tlskey_get_mesh_style.json");
    let id = Identity::from_response(&resp, &info()).unwrap();
    match id.self_check().unwrap_err() {
        IdentityError::Unusable { rejection, .. } => {
            assert_eq!(rejection, Rejection::MissingAppId)
        }
        other => panic!("{other}"),
    }
    // Only serverAuth: refused in the client role.
    let resp: TlsKeyResponse = fixture("api/app1/tlskey_no_ratls.json");
    assert!(Identity::from_response(&resp, &info())
        .unwrap()
        .self_check()
        .is_err());
}

#[test]
fn a_chain_without_its_root_is_refused() {
    let mut resp: TlsKeyResponse = fixture("api/app1/tlskey_with_app_info.json");
    resp.certificate_chain.truncate(1);
    let id = Identity::from_response(&resp, &info()).unwrap();
    assert!(matches!(
        id.self_check().unwrap_err(),
        IdentityError::NoRoot(_)
    ));
}

#[test]
fn a_key_that_does_not_match_the_leaf_is_refused() {
    let mut resp: TlsKeyResponse = fixture("api/app1/tlskey_with_app_info.json");
    let other: TlsKeyResponse = fixture("api/app1/tlskey_no_ratls.json");
    resp.key = other.key;
    let err = Identity::from_response(&resp, &info()).unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");
}

#[test]
fn info_with_a_bad_app_id_is_named() {
    let resp: TlsKeyResponse = fixture("api/app1/tlskey_get_mesh_style.json");
    let mut info = info();
    info.app_id = "zz".into();
    let err = Identity::from_response(&resp, &info).unwrap_err();
    assert!(
        err.to_string().starts_with("guest agent Info: app_id"),
        "{err}"
    );
}

#[test]
fn the_schedule_counts_from_the_fetch_not_from_1975() {
    // The simulator ignores nothing, but tappd does: not_before 1975, ten years ahead.
    let resp: TlsKeyResponse = fixture("api/app1/tlskey_with_app_info.json");
    let id = Identity::from_response(&resp, &info()).unwrap();
    assert_eq!(id.not_before, 157_766_400); // 1975-01-01
    let at = id
        .refresh_at(None)
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let lifetime = id.not_after as u64 - now();
    assert!(at > now() + lifetime / 2, "refresh at {at}, now {}", now());
    assert!(at < id.not_after as u64);

    // A margin as long as the lifetime still waits the minimum interval.
    let margin = Duration::from_secs(lifetime + 1000);
    let at = id
        .refresh_at(Some(margin))
        .duration_since(UNIX_EPOCH)
        .unwrap();
    assert!(at.as_secs() >= id.fetched_at as u64 + MIN_REFRESH_INTERVAL.as_secs());
}

#[test]
fn config_is_validated_before_use() {
    let ok = IdentityConfig::default();
    ok.validate().unwrap();
    // The shortest lifetime the rotation soak uses is allowed.
    IdentityConfig {
        validity: MIN_VALIDITY,
        ..ok.clone()
    }
    .validate()
    .unwrap();
    for bad in [
        IdentityConfig {
            refresh_margin: Some(ok.validity),
            ..ok.clone()
        },
        IdentityConfig {
            validity: MIN_VALIDITY - Duration::from_secs(1),
            ..ok.clone()
        },
        IdentityConfig {
            validity: Duration::from_secs(u64::MAX / 2),
            ..ok.clone()
        },
        IdentityConfig {
            retry_min: Duration::from_secs(10),
            retry_max: Duration::from_secs(1),
            ..ok.clone()
        },
    ] {
        assert!(
            matches!(bad.validate(), Err(IdentityError::Config(_))),
            "{bad:?}"
        );
    }
}
