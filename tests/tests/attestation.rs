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
    sync::Arc,
    time::Duration,
};

use e2e::{
    backend::Backend,
    load::{Caller, Load, Target},
    mesh_binary,
    pccs::{Fault, Pccs},
    start_mesh, ChildGuard,
};
use http::StatusCode;
use ratls::{
    agent::{AgentAddress, AgentClient},
    identity::RotatingIdentity,
};

const APP1: &str = "5bb4ff9a3837357f19dc176407a5709c62eb6c56";
const COMPOSE: &str = "c143116fef3940e7f776bfc0919c256232ae5338a6e948c96b711e0b2383483a";
/// Inside the collateral's validity.
const FAKE_NOW: &str = "@2026-12-10 00:00:00";
/// Debian's libfaketime (package `faketime`, installed by scripts/setup-test-deps).
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/dstack-sim")
}

/// The `[attestation]` section pinning `compose`, with the recorded collateral.
fn attestation(compose: &str) -> String {
    attestation_from(compose, &fixtures().join("mock-pccs"))
}

/// The `[attestation]` section pinning `compose`, with the collateral in `dir`.
fn attestation_from(compose: &str, dir: &Path) -> String {
    format!(
        "[attestation]\nrequired = true\ncollateral_dir = \"{}\"\ntdx_root = \"{}\"\ncompose_hashes = [\"{compose}\"]\n",
        dir.display(),
        fixtures().join("mock-pccs/tdx-root-ca.pem").display()
    )
}

/// `dstack-mesh run` with `config` under the fake clock; its listeners.
fn sidecar(
    dir: &Path,
    name: &str,
    config: &str,
) -> (ChildGuard, Vec<(String, std::net::SocketAddr)>) {
    sidecar_at(dir, name, config, FAKE_NOW)
}

/// [`sidecar`] with its clock starting at `fake_now` (libfaketime's `@YYYY-MM-DD hh:mm:ss`).
fn sidecar_at(
    dir: &Path,
    name: &str,
    config: &str,
    fake_now: &str,
) -> (ChildGuard, Vec<(String, std::net::SocketAddr)>) {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).unwrap();
    // libfaketime preloaded, not the `faketime` wrapper: signals (SIGHUP) reach the sidecar.
    let mut cmd = Command::new(mesh_binary());
    cmd.env("LD_PRELOAD", LIBFAKETIME)
        .env("FAKETIME", fake_now)
        .env("TZ", "UTC")
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
    fake_now: &'static str,
    agent_section: String,
    agent: PathBuf,
    _agent: ChildGuard,
    backend: Backend,
    b: ChildGuard,
    b_config: String,
    inbound: std::net::SocketAddr,
    b_admin: std::net::SocketAddr,
}

impl Pair {
    async fn start(b_pin: &str) -> Self {
        Self::start_with(tempfile::tempdir().unwrap(), &attestation(b_pin), FAKE_NOW).await
    }

    /// B with the section `b_attestation`, its clock and its callers' starting at `fake_now`.
    async fn start_with(
        dir: tempfile::TempDir,
        b_attestation: &str,
        fake_now: &'static str,
    ) -> Self {
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
        let (b, b_bound) = sidecar_at(
            d,
            "sidecar-b",
            &format!("{b_config}{b_attestation}"),
            fake_now,
        );
        let inbound = e2e::listener(&b_bound, "inbound");
        let b_admin = e2e::listener(&b_bound, "admin");
        Self {
            dir,
            fake_now,
            agent_section,
            agent: socket,
            _agent: agent,
            backend,
            b,
            b_config,
            inbound,
            b_admin,
        }
    }

    /// A caller A pinning `a_pin`, whose outbound reaches B: A and its outbound listener.
    fn caller(&self, name: &str, a_pin: &str) -> (ChildGuard, std::net::SocketAddr) {
        let (a, a_bound) = sidecar_at(
            self.dir.path(),
            name,
            &format!(
                "{}[inbound]\nenabled = false\n[auth]\nenabled = false\n[client]\naddress = \"127.0.0.1\"\nport = 0\n[admin]\nlisten = \"127.0.0.1:0\"\n[dstack]\ngateway_domain = \"fixed/{}\"\n{}",
                self.agent_section,
                self.inbound,
                attestation(a_pin)
            ),
            self.fake_now,
        );
        (a, e2e::listener(&a_bound, "outbound"))
    }

    /// A new caller A pinning `a_pin` calls B once: A's answer.
    async fn call(&self, name: &str, a_pin: &str) -> (StatusCode, String) {
        let (_a, outbound) = self.caller(name, a_pin);
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
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    while !pair.b.stderr().contains("configuration reloaded") {
        assert!(
            tokio::time::Instant::now() < end,
            "no reload: {}",
            pair.b.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
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

/// Fourteen seconds before the recorded collateral comes due for a refresh (a day before its
/// nextUpdate, 2026-12-22T13:42:34Z).
const DUE_SOON: &str = "@2026-12-21 13:42:20";

/// B's log lines saying a fetch failed.
fn failed_fetches(b: &ChildGuard) -> Vec<String> {
    b.stderr()
        .lines()
        .filter(|l| l.contains("collateral not fetched"))
        .map(str::to_owned)
        .collect()
}

/// Wait up to `limit` for `check`, failing with `what`.
async fn until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pccs_down_rate_limiting_garbled_or_slow_when_collateral_comes_due_loses_no_request() {
    let pccs = Pccs::start(Fault::Down);
    let dir = tempfile::tempdir().unwrap();
    // B keeps its collateral fresh from the PCCS, cached in a directory of its own.
    let collateral = dir.path().join("collateral");
    std::fs::create_dir(&collateral).unwrap();
    for entry in std::fs::read_dir(fixtures().join("mock-pccs")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), collateral.join(entry.file_name())).unwrap();
    }
    let b_attestation = format!(
        "{}pccs_url = \"{}\"\nfmspc = \"000000000000\"\n",
        attestation_from(COMPOSE, &collateral),
        pccs.url
    );
    let pair = Pair::start_with(dir, &b_attestation, DUE_SOON).await;
    let (_a, outbound) = pair.caller("sidecar-a", COMPOSE);
    // Through A (kept-alive connections to B), and straight to B's mesh listener with a new
    // attested handshake for every request.
    let through_a = Load::start(
        Target::plain(outbound, &[("x-dstack-target-app", APP1)]),
        &[Caller::H1, Caller::H2],
        Duration::from_millis(10),
    );
    let (client, info) = AgentClient::discover(
        vec![AgentAddress::Unix(pair.agent.clone())],
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let identity = RotatingIdentity::start(client, info, Default::default())
        .await
        .unwrap();
    let policy = ratls::Policy::new(identity.current().trust_anchors().unwrap())
        .expect(APP1.parse().unwrap());
    let tls = ratls::tls::mesh_client_config(identity.resolver(), Arc::new(policy)).unwrap();
    let direct = Load::start(
        Target {
            addr: pair.inbound,
            tls: Some((Arc::new(tls), "b.mesh".try_into().unwrap())),
            host: "b.mesh".to_owned(),
            headers: Vec::new(),
        },
        &[Caller::Fresh],
        Duration::from_millis(10),
    );
    let flowing = || through_a.ok() > 0 && direct.ok() > 0;
    until("the load to flow", Duration::from_secs(20), flowing).await;
    let ready =
        async || e2e::client::http1_get(pair.b_admin, "/ready", &[]).await.0 == StatusCode::OK;

    // Down when the collateral comes due: refused connections, tried again 5 s later.
    until(
        "a fetch from the PCCS that is down",
        Duration::from_secs(40),
        || !failed_fetches(&pair.b).is_empty(),
    )
    .await;
    let down = &failed_fetches(&pair.b)[0];
    assert!(down.contains("refused"), "{down}");
    assert!(ready().await, "B not ready while its collateral is valid");
    // Rate-limited: the next try waits the 15 s asked, not the 10 s of the backoff.
    let rate_limited = Fault::TooMany(15);
    pccs.set(rate_limited);
    until("a fetch meeting 429", Duration::from_secs(20), || {
        pccs.seen(rate_limited) > 0 && failed_fetches(&pair.b).len() >= 2
    })
    .await;
    let refused_at = pccs.asked().last().unwrap().0;
    let logged = &failed_fetches(&pair.b)[1];
    assert!(
        logged.contains("429") && logged.contains("\"retry_after_secs\":15"),
        "{logged}"
    );
    // Garbage: 200s that make no collateral.
    pccs.set(Fault::Garbage);
    until("a fetch meeting garbage", Duration::from_secs(30), || {
        pccs.seen(Fault::Garbage) > 0 && failed_fetches(&pair.b).len() >= 3
    })
    .await;
    let retried_at = pccs
        .asked()
        .iter()
        .find(|(_, f)| *f == Fault::Garbage)
        .unwrap()
        .0;
    let waited = retried_at - refused_at;
    assert!(
        waited >= Duration::from_secs(15),
        "tried again {waited:?} after a 429 asking for 15 s"
    );
    assert!(ready().await, "B not ready while its collateral is valid");
    // Slow, 2 s an answer, but whole: the fetch lands and is cached for the next start.
    let slow = Fault::Slow(Duration::from_secs(2));
    pccs.set(slow);
    until(
        "the slow PCCS's collateral",
        Duration::from_secs(60),
        || pair.b.stderr().contains("collateral fetched"),
    )
    .await;
    assert_eq!(pccs.seen(slow), 4, "one fetch: four answers");
    ratls::quote::Collateral::from_dir(&collateral.join("000000000000")).unwrap();
    assert!(ready().await, "B not ready after the refresh");

    // Traffic flowed throughout: callers kept going after the last fault, and none failed.
    let (a_ok, b_ok) = (through_a.ok(), direct.ok());
    until(
        "more requests after the refresh",
        Duration::from_secs(20),
        || through_a.ok() > a_ok && direct.ok() > b_ok,
    )
    .await;
    let (ok_a, failed_a) = through_a.finish().await;
    let (ok_direct, failed_direct) = direct.finish().await;
    eprintln!(
        "PCCS down, 429, garbage, slow at the due time: {} fetches failed, then one landed; \
         {ok_a} requests through A ({failed_a} failed), {ok_direct} new attested handshakes \
         to B ({failed_direct} failed); the 429's retry came {waited:?} later",
        failed_fetches(&pair.b).len()
    );
    assert_eq!(
        failed_a, 0,
        "requests through A failed while the PCCS was at fault"
    );
    assert_eq!(
        failed_direct, 0,
        "attested handshakes failed while the PCCS was at fault"
    );
}
