//! Every certificate the dstack simulator (and the KMS logic) produced parses, shows the app id
//! the fixture README states, and verifies (or is refused) as the policy says.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::path::PathBuf;

use ratls::{AppIdSource, ChainView, PeerRole, Policy, Rejection, TrustAnchors};
use rustls_pki_types::UnixTime;

const APP1: &str = "5bb4ff9a3837357f19dc176407a5709c62eb6c56";
const APP2: &str = "71cbb64614e7090669b2f0cb159295bd81804fa9";

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/dstack-sim")
}

fn read(rel: &str) -> Vec<u8> {
    std::fs::read(dir().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// A fixture directory, its app id and source per the fixture README, and whether its
/// attestation binds the leaf key (`None`: no attestation).
type Expected = (
    &'static str,
    Option<&'static str>,
    Option<AppIdSource>,
    Option<bool>,
);

const EXPECTED: &[Expected] = &[
    (
        "kms-app1-mesh-get-equiv",
        Some(APP1),
        Some(AppIdSource::Extension),
        None,
    ),
    (
        "kms-app1-ratls",
        Some(APP1),
        Some(AppIdSource::Extension),
        Some(true),
    ),
    (
        "kms-app2-mesh-get-equiv",
        Some(APP2),
        Some(AppIdSource::Extension),
        None,
    ),
    (
        "kms-app2-ratls",
        Some(APP2),
        Some(AppIdSource::Extension),
        Some(true),
    ),
    (
        "sim-app1-appinfo",
        Some(APP1),
        Some(AppIdSource::AppInfo),
        Some(true),
    ),
    ("sim-app1-mesh-get", None, None, None),
    ("sim-app1-noratls", None, None, None),
    ("sim-app1-ratls", None, None, Some(true)),
    (
        "sim-app1-signed-ratls",
        Some(APP1),
        Some(AppIdSource::AppInfo),
        Some(true),
    ),
    (
        "sim-app2-appinfo",
        Some(APP2),
        Some(AppIdSource::AppInfo),
        Some(true),
    ),
    ("sim-app2-ratls", None, None, Some(true)),
];

#[test]
fn the_table_covers_every_fixture_directory() {
    let mut dirs: Vec<String> = std::fs::read_dir(dir().join("certs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    let table: Vec<String> = EXPECTED.iter().map(|e| e.0.to_owned()).collect();
    assert_eq!(dirs, table);
}

#[test]
fn every_fixture_certificate_parses_with_the_stated_app_id() {
    for (name, app_id, source, binds) in EXPECTED {
        for file in ["chain.pem", "leaf.pem"] {
            let view = ChainView::from_bytes(&read(&format!("certs/{name}/{file}")))
                .unwrap_or_else(|e| panic!("{name}/{file}: {e}"));
            assert_eq!(
                view.app_id.as_ref().map(|a| a.to_string()).as_deref(),
                *app_id,
                "{name}/{file}"
            );
            assert_eq!(view.app_id_source, *source, "{name}/{file}");
            assert_eq!(
                view.attestation.as_ref().map(|a| a.binds_key),
                *binds,
                "{name}/{file}"
            );
            assert_eq!(view.usage.as_deref(), Some("app:custom"), "{name}");
        }
        // Every element of the chain, including the roots and App CAs, parses on its own.
        let chain = ratls::cert::parse_chain(&read(&format!("certs/{name}/chain.pem"))).unwrap();
        for cert in &chain {
            ChainView::new(std::slice::from_ref(cert)).unwrap();
        }
        // response.json is what GetTlsKey returned: the same chain.
        let resp: ratls::agent::TlsKeyResponse =
            serde_json::from_slice(&read(&format!("certs/{name}/response.json"))).unwrap();
        assert_eq!(
            ratls::cert::parse_pem_list(&resp.certificate_chain).unwrap(),
            chain
        );
    }
}

#[test]
fn kms_chains_show_the_app_ca() {
    let view = ChainView::from_bytes(&read("certs/kms-app1-ratls/chain.pem")).unwrap();
    assert_eq!(view.chain.len(), 3);
    assert_eq!(view.chain[1].subject, "O=Dstack, CN=Dstack App CA");
    assert_eq!(view.chain[1].usage.as_deref(), Some("app:ca"));
    assert_eq!(view.chain[1].app_id.as_ref().unwrap().to_string(), APP1);
    assert_eq!(view.chain[2].subject, "O=Dstack, CN=Dstack KMS CA");
    assert_eq!(
        view.leaf.sans,
        ["app1.dstack.internal", "localhost", "127.0.0.1"]
    );
    assert_eq!(view.leaf.eku, ["serverAuth", "clientAuth"]);
    assert_eq!(view.leaf.key_algorithm, "ECDSA P-256");
    assert_eq!(
        view.leaf.sha256_fingerprint,
        "0d2204763d00e3a22b5c11d747b9a0ae0abb9cfcdc33264e208949a16d1548ae"
    );
    let sim = ChainView::from_bytes(&read("certs/sim-app2-appinfo/chain.pem")).unwrap();
    assert_eq!(
        sim.instance_id.as_deref(),
        Some("30dd0ddbcd7bbe24f1a8598846ae67329d8073ae")
    );
    assert_eq!(sim.chain.len(), 2);
}

fn verify(
    name: &str,
    role: PeerRole,
    policy: impl FnOnce(Policy) -> Policy,
) -> Result<ratls::VerifiedPeer, Rejection> {
    let chain = ratls::cert::parse_chain(&read(&format!("certs/{name}/chain.pem"))).unwrap();
    let root = ratls::cert::parse_chain(&read(&format!("certs/{name}/ca.pem"))).unwrap();
    let policy = policy(Policy::new(TrustAnchors::new(&root).unwrap()));
    policy.verify(&chain[0], &chain[1..], role, UnixTime::now())
}

#[test]
fn fixture_chains_verify_as_the_policy_says() {
    for (name, app_id, _, binds) in EXPECTED {
        for role in [PeerRole::Server, PeerRole::Client] {
            let result = verify(name, role, |p| p);
            match (app_id, *name, role) {
                // serverAuth only: refused as a client before the app id is even looked at.
                (_, "sim-app1-noratls", PeerRole::Client) => {
                    assert_eq!(result.unwrap_err(), Rejection::WrongEku { role });
                }
                (None, ..) => assert_eq!(result.unwrap_err(), Rejection::MissingAppId, "{name}"),
                (Some(id), ..) => {
                    let peer = result.unwrap_or_else(|e| panic!("{name}: {e}"));
                    assert_eq!(peer.app_id.to_string(), *id);
                    assert_eq!(
                        peer.attestation.binds_key(),
                        binds.unwrap_or(false),
                        "{name}"
                    );
                }
            }
        }
    }
    // Attestation required: the RA-TLS fixtures carry a bound one, the mesh-get ones none.
    assert!(verify("kms-app1-ratls", PeerRole::Server, |p| p
        .require_attestation(true))
    .is_ok());
    assert_eq!(
        verify("kms-app1-mesh-get-equiv", PeerRole::Server, |p| p
            .require_attestation(true))
        .unwrap_err(),
        Rejection::AttestationMissing
    );
    // Another app's chain under the same root is refused by the expectation.
    let err = verify("kms-app2-ratls", PeerRole::Server, |p| {
        p.expect(APP1.parse().unwrap())
    })
    .unwrap_err();
    assert_eq!(err.reason(), "app_id_mismatch");
}

#[test]
fn every_fixture_root_is_the_same_kms_root() {
    let fingerprint = "3f29aec2e5e6213259099357bed403bb4e45963988bd33132cdde9caaf9b89c2";
    for (name, ..) in EXPECTED {
        let view = ChainView::from_bytes(&read(&format!("certs/{name}/ca.pem"))).unwrap();
        assert_eq!(view.leaf.sha256_fingerprint, fingerprint, "{name}");
        assert!(view.leaf.is_ca);
    }
}

#[test]
fn the_info_app_cert_parses() {
    let info: ratls::agent::InfoResponse =
        serde_json::from_slice(&read("api/app1/info_get.json")).unwrap();
    let view = ChainView::from_bytes(info.app_cert.as_bytes()).unwrap();
    assert_eq!(view.leaf.subject, "CN=demo-cert");
    assert_eq!(view.leaf.eku, ["clientAuth"]);
}
