//! The attestation policy in the handshake, on real evidence: two `dstack-mesh run` sidecars
//! whose identity is `sim-app1-signed-ratls` (the dstack simulator's certificate whose TDX quote
//! the mock PCK chain signed), served by `dstack-mesh dev-agent --tls-key-response` with the
//! simulator's recorded `GetTlsKey` answer. Each sidecar verifies the other's quote
//! against the mock PCCS collateral and pins its compose hash. The collateral's nextUpdate is
//! 2026-12-22, so the sidecars run under libfaketime at 2026-12-10 (the clock then advances).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use e2e::{backend::Backend, mesh_binary, start_mesh, ChildGuard};
use http::StatusCode;

const APP1: &str = "5bb4ff9a3837357f19dc176407a5709c62eb6c56";
const COMPOSE: &str = "c143116fef3940e7f776bfc0919c256232ae5338a6e948c96b711e0b2383483a";
/// Inside the collateral's validity.
const FAKE_NOW: &str = "@2026-12-10 00:00:00";
/// Debian's libfaketime (package `faketime`, installed by scripts/setup-test-deps).
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/dstack-sim")
}

/// The `[attestation]` section pinning `compose`.
fn attestation(compose: &str) -> String {
    let pccs = fixtures().join("mock-pccs");
    format!(
        "[attestation]\nrequired = true\ncollateral_dir = \"{}\"\ntdx_root = \"{}\"\ncompose_hashes = [\"{compose}\"]\n",
        pccs.display(),
        pccs.join("tdx-root-ca.pem").display()
    )
}

/// `dstack-mesh run` with `config` under the fake clock; its listeners.
fn sidecar(
    dir: &Path,
    name: &str,
    config: &str,
) -> (ChildGuard, Vec<(String, std::net::SocketAddr)>) {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).unwrap();
    // libfaketime preloaded, not the `faketime` wrapper: signals (SIGHUP) reach the sidecar.
    let mut cmd = Command::new(mesh_binary());
    cmd.env("LD_PRELOAD", LIBFAKETIME)
        .env("FAKETIME", FAKE_NOW)
        .args(["--log-format", "json", "run", "--config"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .env_remove("DSTACK_AGENT_ADDRESS");
    start_mesh(dir, name, cmd)
}

/// The dev agent serving the signed identity and B, which serves a backend and pins
/// `b_pin`; callers (A) are started against it.
struct Pair {
    dir: tempfile::TempDir,
    agent_section: String,
    _agent: ChildGuard,
    backend: Backend,
    b: ChildGuard,
    b_config: String,
    inbound: std::net::SocketAddr,
    b_admin: std::net::SocketAddr,
}

impl Pair {
    async fn start(b_pin: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let response = fixtures().join("certs/sim-app1-signed-ratls/response.json");
        let (agent, socket) = e2e::dev_agent_with(
            d,
            "agent",
            APP1,
            &d.join("state"),
            &["--tls-key-response".as_ref(), response.as_os_str()],
        );
        let backend = Backend::start().await;
        let agent_section = format!("[agent]\naddress = \"unix:{}\"\n", socket.display());
        let b_config = format!(
            "{agent_section}[inbound]\nlisten = \"127.0.0.1:0\"\nbackend = \"{}\"\n[auth]\nenabled = false\n[client]\nenabled = false\n[admin]\nlisten = \"127.0.0.1:0\"\n",
            backend.addr
        );
        let (b, b_bound) = sidecar(d, "sidecar-b", &format!("{b_config}{}", attestation(b_pin)));
        let inbound = e2e::listener(&b_bound, "inbound");
        let b_admin = e2e::listener(&b_bound, "admin");
        Self {
            dir,
            agent_section,
            _agent: agent,
            backend,
            b,
            b_config,
            inbound,
            b_admin,
        }
    }

    /// A new caller A pinning `a_pin` calls B once: A's answer.
    async fn call(&self, name: &str, a_pin: &str) -> (StatusCode, String) {
        let (_a, a_bound) = sidecar(
            self.dir.path(),
            name,
            &format!(
                "{}[inbound]\nenabled = false\n[auth]\nenabled = false\n[client]\naddress = \"127.0.0.1\"\nport = 0\n[admin]\nlisten = \"127.0.0.1:0\"\n[dstack]\ngateway_domain = \"fixed/{}\"\n{}",
                self.agent_section,
                self.inbound,
                attestation(a_pin)
            ),
        );
        let outbound = e2e::listener(&a_bound, "outbound");
        let (status, body) = e2e::client::http1_get(
            outbound,
            "/attested",
            &[("host", "b.internal"), ("x-dstack-target-app", APP1)],
        )
        .await;
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

/// B pins `b_pin`; A calls B with `a_pin`. A's answer and B's backend count.
async fn call(a_pin: &str, b_pin: &str) -> (StatusCode, String, usize) {
    let pair = Pair::start(b_pin).await;
    let (status, body) = pair.call("sidecar-a", a_pin).await;
    (status, body, pair.backend.count())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_port_shows_the_collateral_and_readiness_depends_on_it() {
    let pair = Pair::start(COMPOSE).await;
    let (status, body) = pair.call("sidecar-a", COMPOSE).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, metrics) = e2e::client::http1_get(pair.b_admin, "/metrics", &[]).await;
    assert_eq!(status, StatusCode::OK);
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.contains("dstack_mesh_attestation_collateral_next_update_timestamp_seconds{fmspc=\"000000000000\"} 1797946954"),
        "{metrics}"
    );
    assert!(
        metrics.contains("dstack_mesh_attestation_verdicts_cached 1"),
        "{metrics}"
    );
    assert_eq!(
        e2e::client::http1_get(pair.b_admin, "/ready", &[]).await.0,
        StatusCode::OK
    );
    // A sidecar whose collateral directory is empty refuses every peer: not ready, saying why.
    let empty = pair.dir.path().join("no-collateral");
    std::fs::create_dir(&empty).unwrap();
    let pccs = fixtures().join("mock-pccs");
    let (_c, c_bound) = sidecar(
        pair.dir.path(),
        "sidecar-c",
        &format!(
            "{}[inbound]\nlisten = \"127.0.0.1:0\"\nbackend = \"127.0.0.1:9\"\n[auth]\nenabled = false\n[client]\nenabled = false\n[admin]\nlisten = \"127.0.0.1:0\"\n[attestation]\nrequired = true\ncollateral_dir = \"{}\"\ntdx_root = \"{}\"\n",
            pair.agent_section,
            empty.display(),
            pccs.join("tdx-root-ca.pem").display()
        ),
    );
    let (status, body) =
        e2e::client::http1_get(e2e::listener(&c_bound, "admin"), "/ready", &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("attestation: no valid collateral"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn peers_that_run_the_pinned_compose_file_talk() {
    let (status, body, reached) = call(COMPOSE, COMPOSE).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(reached, 1);
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        seen["headers"]["x-dstack-app-id"],
        serde_json::json!([APP1])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_caller_running_another_compose_file_is_refused_in_the_handshake() {
    // B pins another compose hash: A (which runs COMPOSE) is refused by B.
    let (status, body, reached) = call(COMPOSE, &"00".repeat(32)).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(body.contains("peer refused this app"), "{body}");
    assert_eq!(reached, 0, "no byte reached B's app");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_running_another_compose_file_is_refused_before_any_byte() {
    // A pins another compose hash: A refuses B before sending the request.
    let (status, body, reached) = call(&"00".repeat(32), COMPOSE).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(body.contains("compose_hash_not_allowed"), "{body}");
    assert_eq!(reached, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_applies_a_new_pin_to_new_handshakes() {
    let pair = Pair::start(COMPOSE).await;
    let (status, body) = pair.call("sidecar-a1", COMPOSE).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // B now pins another compose file: from the reload on, A's next handshake is refused.
    std::fs::write(
        pair.dir.path().join("sidecar-b.toml"),
        format!("{}{}", pair.b_config, attestation(&"00".repeat(32))),
    )
    .unwrap();
    pair.b.signal("HUP");
    let end = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !pair.b.stderr().contains("configuration reloaded") {
        assert!(
            tokio::time::Instant::now() < end,
            "no reload: {}",
            pair.b.stderr()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let log = pair.b.stderr();
    let reloaded = log
        .lines()
        .find(|l| l.contains("configuration reloaded"))
        .unwrap();
    assert!(reloaded.contains("attestation"), "{reloaded}");
    let (status, body) = pair.call("sidecar-a2", COMPOSE).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(
        pair.backend.count(),
        1,
        "nothing reached B's app after the reload"
    );
    assert!(
        pair.b.stderr().contains("compose_hash_not_allowed"),
        "{}",
        pair.b.stderr()
    );
}
