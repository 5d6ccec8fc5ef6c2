//! Collateral from a PCCS: the client and the keeper against `e2e::pccs`, a stand-in serving
//! the mock PCCS's recorded answers on the v4 paths.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::{path::PathBuf, sync::Arc, time::Duration};

use dstack_mesh::pccs::{self, Pccs as Client, PccsError};
use e2e::pccs::{Fault, Pccs};
use ratls::{
    attested::{Attestor, Rules},
    quote::{self, Collateral, TdxRoot},
};

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../testdata/dstack-sim"
    ))
}

/// 2026-12-01T00:00:00Z, inside the collateral's validity.
const BEFORE: u64 = 1_796_083_200;

fn attestation() -> ratls::attestation::Attestation {
    let pem = std::fs::read(fixtures().join("certs/sim-app1-signed-ratls/leaf.pem")).unwrap();
    let leaf = ratls::cert::parse_chain(&pem).unwrap().remove(0);
    ratls::cert::attestation_of(&leaf).unwrap().unwrap()
}

fn root() -> TdxRoot {
    TdxRoot::from_pem(&std::fs::read(fixtures().join("mock-pccs/tdx-root-ca.pem")).unwrap())
        .unwrap()
}

#[tokio::test]
async fn fetched_collateral_verifies_the_quote_and_is_cached_on_disk() {
    let pccs = Pccs::start(Fault::None);
    let url = &pccs.url;
    let responses = Client::new(url)
        .unwrap()
        .fetch("000000000000")
        .await
        .unwrap();
    let collateral = Collateral::from_pccs(&responses).unwrap();
    let facts = quote::verify(&attestation(), &collateral, &root(), BEFORE).unwrap();
    assert_eq!(facts.tcb_status, "UpToDate");
    // Cached as the directory an air-gapped setup provides, and read back alike.
    let dir = tempfile::tempdir().unwrap();
    pccs::write_dir(dir.path(), &responses).unwrap();
    let again = Collateral::from_dir(dir.path()).unwrap();
    assert_eq!(again.next_update, collateral.next_update);
    quote::verify(&attestation(), &again, &root(), BEFORE).unwrap();
}

#[tokio::test]
async fn a_failing_or_garbage_pccs_gives_a_reason_and_no_collateral() {
    let failing = Client::new(&Pccs::start(Fault::Error).url).unwrap();
    let e = failing.fetch("000000000000").await.unwrap_err();
    assert!(
        matches!(e, PccsError::Status { status, retry_after: None, .. } if status == 500),
        "{e}"
    );
    let garbage = Client::new(&Pccs::start(Fault::Garbage).url).unwrap();
    let responses = garbage.fetch("000000000000").await.unwrap();
    let e = Collateral::from_pccs(&responses).unwrap_err();
    assert_eq!(e.reason(), "collateral_unavailable", "{e}");
    // Nobody listens: a connection error, not a hang.
    let down = Client::new(&Pccs::start(Fault::Down).url).unwrap();
    let e = down.fetch("000000000000").await.unwrap_err();
    assert!(matches!(e, PccsError::Request { .. }), "{e}");
    // Rate-limited: the wait it asks for comes with the refusal.
    let limited = Client::new(&Pccs::start(Fault::TooMany(120)).url).unwrap();
    let e = limited.fetch("000000000000").await.unwrap_err();
    assert!(
        matches!(e, PccsError::Status { status, retry_after: Some(wait), .. }
            if status == 429 && wait == Duration::from_secs(120)),
        "{e:?}"
    );
}

/// Wait up to 20 s for `attestor` to hold collateral for the test platform; else fail saying
/// `what`.
async fn collateral_within(attestor: &Attestor, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while attestor.collateral_for("000000000000").is_none() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_keeper_swaps_fetched_collateral_in_and_writes_it_down() {
    let pccs = Pccs::start(Fault::None);
    let url = &pccs.url;
    let dir = tempfile::tempdir().unwrap();
    let attestor = Arc::new(Attestor::new(Rules::default(), root()));
    let keeper = tokio::spawn(pccs::keep(
        attestor.clone(),
        Client::new(url).unwrap(),
        "000000000000".into(),
        dir.path().to_owned(),
    ));
    collateral_within(&attestor, "no collateral fetched").await;
    keeper.abort();
    // Cached on disk, one directory per platform, which the directory loader reads back.
    assert!(
        Collateral::from_dir(&dir.path().join("000000000000")).is_ok(),
        "cached on disk"
    );
    let set = quote::CollateralSet::from_dir(dir.path()).unwrap();
    assert!(set.get("000000000000").is_some());
}

#[tokio::test]
async fn verify_cert_fetches_collateral_for_the_quotes_platform() {
    let certs = fixtures().join("certs/sim-app1-signed-ratls");
    let root = fixtures().join("mock-pccs/tdx-root-ca.pem");
    let run = |url: String| {
        let (certs, root) = (certs.clone(), root.clone());
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_dstack-mesh"))
                .arg("verify-cert")
                .arg(certs.join("chain.pem"))
                .arg("--ca")
                .arg(certs.join("ca.pem"))
                .args(["--pccs", &url, "--at", "2026-12-10T00:00:00Z", "--tdx-root"])
                .arg(&root)
                .output()
                .unwrap()
        })
    };
    let out = run(Pccs::start(Fault::None).url).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["quote"]["tcb_status"], "UpToDate", "{v}");
    // A PCCS answering 500: refused for want of collateral, saying so.
    let out = run(Pccs::start(Fault::Error).url).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("collateral_unavailable"), "{stderr}");
    assert!(out.stdout.is_empty());
}

#[tokio::test]
async fn a_keeper_whose_fetch_failed_tries_again_in_seconds_not_an_hour() {
    let pccs = Pccs::start(Fault::Error);
    let url = &pccs.url;
    let dir = tempfile::tempdir().unwrap();
    let attestor = Arc::new(Attestor::new(Rules::default(), root()));
    let keeper = tokio::spawn(pccs::keep(
        attestor.clone(),
        Client::new(url).unwrap(),
        "000000000000".into(),
        dir.path().to_owned(),
    ));
    // The PCCS is down for the first attempt, then back.
    while pccs.asked().is_empty() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pccs.set(Fault::None);
    collateral_within(&attestor, "no collateral 20 s after the PCCS came back").await;
    keeper.abort();
}
