//! Collateral from a PCCS: a stand-in serving the mock PCCS's recorded answers (bodies and the
//! issuer-chain headers, as `dstack-mock-attestation serve` answered) on the v4 paths.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::{convert::Infallible, path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use dstack_mesh::pccs::{self, Pccs, PccsError};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
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

#[derive(Clone, Copy)]
enum Mode {
    Recorded,
    Failing,
    Garbage,
}

/// A PCCS stand-in on loopback.
async fn pccs(mode: Mode) -> String {
    pccs_switchable(Arc::new(std::sync::Mutex::new(mode)), Arc::default()).await
}

/// A PCCS stand-in answering as `mode` says at each request, counting them in `asked`.
async fn pccs_switchable(
    mode: Arc<std::sync::Mutex<Mode>>,
    asked: Arc<std::sync::atomic::AtomicUsize>,
) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (mode, asked) = (mode.clone(), asked.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let mode = *mode.lock().unwrap();
                    asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    async move {
                        let file = match req.uri().path() {
                            "/tdx/certification/v4/tcb" => "tcb.json",
                            "/tdx/certification/v4/qe/identity" => "qe_identity.json",
                            "/sgx/certification/v4/pckcrl" => "pckcrl.der",
                            "/sgx/certification/v4/rootcacrl" => "rootcacrl.hex",
                            _ => "",
                        };
                        let dir = fixtures().join("mock-pccs");
                        let mut resp = Response::new(Full::new(Bytes::new()));
                        match (mode, file) {
                            (_, "") | (Mode::Failing, _) => {
                                *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                            }
                            (Mode::Garbage, _) => {
                                *resp.body_mut() =
                                    Full::new(Bytes::from_static(b"<html>maintenance</html>"));
                                resp.headers_mut()
                                    .insert("TCB-Info-Issuer-Chain", "x".parse().unwrap());
                                resp.headers_mut().insert(
                                    "SGX-Enclave-Identity-Issuer-Chain",
                                    "x".parse().unwrap(),
                                );
                                resp.headers_mut()
                                    .insert("SGX-PCK-CRL-Issuer-Chain", "x".parse().unwrap());
                            }
                            (Mode::Recorded, file) => {
                                *resp.body_mut() =
                                    Full::new(Bytes::from(std::fs::read(dir.join(file)).unwrap()));
                                let head =
                                    std::fs::read_to_string(dir.join(format!("{file}.headers")))
                                        .unwrap();
                                for line in head.lines().skip(1) {
                                    if let Some((k, v)) = line.split_once(':') {
                                        let k = k.trim();
                                        if k.to_ascii_lowercase().contains("issuer-chain") {
                                            resp.headers_mut().insert(
                                                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                                                v.trim().parse().unwrap(),
                                            );
                                        }
                                    }
                                }
                            }
                        }
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

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
    let url = pccs(Mode::Recorded).await;
    let responses = Pccs::new(&url)
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
    let failing = Pccs::new(&pccs(Mode::Failing).await).unwrap();
    let e = failing.fetch("000000000000").await.unwrap_err();
    assert!(
        matches!(e, PccsError::Status { status, .. } if status == 500),
        "{e}"
    );
    let garbage = Pccs::new(&pccs(Mode::Garbage).await).unwrap();
    let responses = garbage.fetch("000000000000").await.unwrap();
    let e = Collateral::from_pccs(&responses).unwrap_err();
    assert_eq!(e.reason(), "collateral_unavailable", "{e}");
    // Nobody listens: a connection error, not a hang.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let e = Pccs::new(&format!("http://{closed}"))
        .unwrap()
        .fetch("000000000000")
        .await
        .unwrap_err();
    assert!(matches!(e, PccsError::Request { .. }), "{e}");
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
    let url = pccs(Mode::Recorded).await;
    let dir = tempfile::tempdir().unwrap();
    let attestor = Arc::new(Attestor::new(Rules::default(), root()));
    let keeper = tokio::spawn(pccs::keep(
        attestor.clone(),
        Pccs::new(&url).unwrap(),
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
    let out = run(pccs(Mode::Recorded).await).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["quote"]["tcb_status"], "UpToDate", "{v}");
    // A PCCS answering 500: refused for want of collateral, saying so.
    let out = run(pccs(Mode::Failing).await).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("collateral_unavailable"), "{stderr}");
    assert!(out.stdout.is_empty());
}

#[tokio::test]
async fn a_keeper_whose_fetch_failed_tries_again_in_seconds_not_an_hour() {
    let mode = Arc::new(std::sync::Mutex::new(Mode::Failing));
    let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let url = pccs_switchable(mode.clone(), asked.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let attestor = Arc::new(Attestor::new(Rules::default(), root()));
    let keeper = tokio::spawn(pccs::keep(
        attestor.clone(),
        Pccs::new(&url).unwrap(),
        "000000000000".into(),
        dir.path().to_owned(),
    ));
    // The PCCS is down for the first attempt, then back.
    while asked.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    *mode.lock().unwrap() = Mode::Recorded;
    collateral_within(&attestor, "no collateral 20 s after the PCCS came back").await;
    keeper.abort();
}
