//! The `dstack-mesh` binary as a user runs it: exit codes, stdout and stderr of each subcommand
//! against the dstack simulator's certificates (`testdata/dstack-sim/certs`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::{
    fs::File,
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

const BIN: &str = env!("CARGO_BIN_EXE_dstack-mesh");
const CERTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/dstack-sim/certs");
const APP1_ID: &str = "5bb4ff9a3837357f19dc176407a5709c62eb6c56";
const APP2_ID: &str = "71cbb64614e7090669b2f0cb159295bd81804fa9";
/// Exit status for unreadable or unparsable input (`cli::EXIT_BAD_INPUT`).
const EXIT_BAD_INPUT: i32 = 65;
const EXIT_NO_INPUT: i32 = 66;
/// Exit status for a certificate that was read but refused (`cli::EXIT_REJECTED`).
const EXIT_REJECTED: i32 = 1;

fn cert(rel: &str) -> PathBuf {
    Path::new(CERTS).join(rel)
}

/// The binary, isolated from the caller's agent address and log settings.
fn mesh() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_remove("DSTACK_AGENT_ADDRESS")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    cmd
}

fn run(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    mesh()
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {BIN}: {e}"))
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_no_panic(out: &Output) {
    let (o, e) = (stdout(out), stderr(out));
    assert!(
        !o.contains("panicked") && !e.contains("panicked"),
        "stdout: {o}\nstderr: {e}"
    );
}

fn assert_exit(out: &Output, code: i32) {
    assert_no_panic(out);
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        stdout(out),
        stderr(out)
    );
}

/// Bad input: the bad-input status and one `error:` line on stderr.
fn assert_bad_input(out: &Output) {
    assert_failed_input(out, EXIT_BAD_INPUT);
}

fn assert_failed_input(out: &Output, code: i32) {
    assert_exit(out, code);
    let err = stderr(out);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "want one stderr line, got: {err}");
    assert!(lines[0].starts_with("error:"), "{err}");
    assert!(out.stdout.is_empty(), "stdout: {}", stdout(out));
}

fn inspect_json(out: &Output) -> serde_json::Value {
    assert_exit(out, 0);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", stdout(out)))
}

/// DER of each certificate of a fixture PEM, leaf first.
fn der_chain(rel: &str) -> Vec<Vec<u8>> {
    ratls::cert::parse_chain(&read(&cert(rel)))
        .unwrap_or_else(|e| panic!("fixture {rel}: {e}"))
        .into_iter()
        .map(|c| c.to_vec())
        .collect()
}

// ---- inspect-cert ----

#[test]
fn inspect_kms_chain() {
    let json = inspect_json(&run(&[&"inspect-cert", &cert("kms-app1-ratls/chain.pem")]));
    assert_eq!(json["app_id"], APP1_ID);
    assert_eq!(json["app_id_source"], "extension");
    assert_eq!(json["chain"].as_array().map(Vec::len), Some(3));
}

#[test]
fn inspect_simulator_app_info_chain() {
    let json = inspect_json(&run(&[
        &"inspect-cert",
        &cert("sim-app2-appinfo/chain.pem"),
    ]));
    assert_eq!(json["app_id"], APP2_ID);
    assert_eq!(json["app_id_source"], "app_info");
    assert_eq!(
        json["instance_id"],
        "30dd0ddbcd7bbe24f1a8598846ae67329d8073ae"
    );
    assert_eq!(json["chain"].as_array().map(Vec::len), Some(2));
}

#[test]
fn inspect_reads_stdin() {
    let leaf = read(&cert("sim-app1-appinfo/leaf.pem"));
    let mut child = mesh()
        .args(["inspect-cert", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Dropping stdin after the write closes it, so the command sees EOF.
    child.stdin.take().unwrap().write_all(&leaf).unwrap();
    let out = child.wait_with_output().unwrap();
    let json = inspect_json(&out);
    assert_eq!(json["app_id"], APP1_ID);
    assert_eq!(json["app_id_source"], "app_info");
    assert_eq!(json["chain"].as_array().map(Vec::len), Some(1));
}

#[test]
fn inspect_reads_concatenated_der() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chain.der");
    std::fs::write(&path, der_chain("kms-app2-ratls/chain.pem").concat()).unwrap();
    let json = inspect_json(&run(&[&"inspect-cert", &path]));
    assert_eq!(json["app_id"], APP2_ID);
    assert_eq!(json["chain"].as_array().map(Vec::len), Some(3));
}

// ---- verify-cert ----

fn verify(chain: &str, ca: &str, extra: &[&str]) -> Output {
    mesh()
        .arg("verify-cert")
        .arg(cert(chain))
        .arg("--ca")
        .arg(cert(ca))
        .args(extra)
        .output()
        .unwrap_or_else(|e| panic!("run {BIN}: {e}"))
}

fn assert_rejected(out: &Output, reason: &str) {
    assert_exit(out, EXIT_REJECTED);
    let err = stderr(out);
    assert!(err.contains(reason), "want {reason:?} in: {err}");
    assert!(out.stdout.is_empty(), "stdout: {}", stdout(out));
}

#[test]
fn verify_kms_chain_with_expected_app_id() {
    let out = verify(
        "kms-app1-ratls/chain.pem",
        "kms-app1-ratls/ca.pem",
        &["--expect-app-id", APP1_ID],
    );
    assert_exit(&out, 0);
    assert!(stdout(&out).contains(APP1_ID), "{}", stdout(&out));
}

#[test]
fn require_attestation_says_what_it_checked_and_no_more() {
    let out = verify(
        "kms-app1-ratls/chain.pem",
        "kms-app1-ratls/ca.pem",
        &["--require-attestation"],
    );
    assert_exit(&out, 0);
    let peer: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        peer["attestation"],
        "report data binds the key; quote not verified"
    );
    assert!(
        stderr(&out).contains("quote not verified"),
        "{}",
        stderr(&out)
    );
    assert!(!stdout(&out).contains("attested"), "{}", stdout(&out));
    // inspect-cert says the same of the quote.
    let out = mesh()
        .arg("inspect-cert")
        .arg(cert("kms-app1-ratls/chain.pem"))
        .output()
        .unwrap();
    let view = inspect_json(&out);
    assert_eq!(view["attestation"]["binds_key"], true, "{view}");
    assert_eq!(view["attestation"]["quote_verified"], false, "{view}");
}

#[test]
fn verify_rejects_another_app() {
    let out = verify(
        "kms-app1-ratls/chain.pem",
        "kms-app1-ratls/ca.pem",
        &["--expect-app-id", APP2_ID],
    );
    assert_rejected(&out, "app_id_mismatch");
}

#[test]
fn verify_rejects_a_server_only_cert_as_client() {
    let out = verify(
        "sim-app1-noratls/chain.pem",
        "sim-app1-noratls/ca.pem",
        &["--role", "client"],
    );
    assert_rejected(&out, "wrong_eku");
}

#[test]
fn verify_rejects_a_cert_without_app_id() {
    let out = verify("sim-app1-ratls/chain.pem", "sim-app1-ratls/ca.pem", &[]);
    assert_rejected(&out, "missing_app_id");
}

#[test]
fn verify_kms_leaf_without_its_app_ca_is_unknown_issuer() {
    let out = verify("kms-app1-ratls/leaf.pem", "kms-app1-ratls/ca.pem", &[]);
    assert_rejected(&out, "unknown_issuer");
}

#[test]
fn verify_simulator_leaf_issued_by_the_root() {
    let out = verify("sim-app1-appinfo/leaf.pem", "sim-app1-appinfo/ca.pem", &[]);
    assert_exit(&out, 0);
    assert!(stdout(&out).contains(APP1_ID), "{}", stdout(&out));
}

// ---- bad input ----

/// Files that are not certificates, each with a name for failure messages.
fn bad_files(dir: &Path) -> Vec<(&'static str, PathBuf)> {
    let mut files = Vec::new();
    let mut add = |name: &'static str, bytes: &[u8]| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        files.push((name, path));
    };
    add(
        "text",
        b"this is not a certificate, just some text\nover two lines\n",
    );
    let leaf = der_chain("kms-app1-ratls/leaf.pem").remove(0);
    add("truncated.der", &leaf[..100]);
    add("empty", b"");
    add(
        "garbage.pem",
        b"-----BEGIN CERTIFICATE-----\n!!!! not base64 @@@@\n-----END CERTIFICATE-----\n",
    );
    add("key-only.pem", &read(&cert("kms-app1-ratls/key.pem")));
    files.push(("missing", dir.join("does-not-exist.pem")));
    files
}

/// A file that cannot be opened is EX_NOINPUT; one that is not a certificate, EX_DATAERR.
fn expected_exit(name: &str) -> i32 {
    if name == "missing" {
        EXIT_NO_INPUT
    } else {
        EXIT_BAD_INPUT
    }
}

#[test]
fn inspect_bad_files_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    for (name, path) in bad_files(dir.path()) {
        let out = run(&[&"inspect-cert", &path]);
        assert_failed_input(&out, expected_exit(name));
        if name == "text" {
            assert!(
                stderr(&out).contains("not a certificate"),
                "{}",
                stderr(&out)
            );
        }
        assert!(
            stderr(&out).contains(&path.display().to_string()),
            "{name}: the error names the file: {}",
            stderr(&out)
        );
    }
}

#[test]
fn verify_bad_files_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let ca = cert("kms-app1-ratls/ca.pem");
    let chain = cert("kms-app1-ratls/chain.pem");
    for (name, path) in bad_files(dir.path()) {
        let as_chain = run(&[&"verify-cert", &path, &"--ca", &ca]);
        assert_failed_input(&as_chain, expected_exit(name));
        let as_ca = run(&[&"verify-cert", &chain, &"--ca", &path]);
        assert_failed_input(&as_ca, expected_exit(name));
        assert!(
            stderr(&as_ca).contains(&path.display().to_string()),
            "{name}: the error names the file: {}",
            stderr(&as_ca)
        );
    }
}

#[test]
fn bad_stdin_fails_cleanly() {
    let out = mesh()
        .args(["inspect-cert", "-"])
        .stdin(Stdio::from(File::open("/dev/null").unwrap()))
        .output()
        .unwrap();
    assert_bad_input(&out);
}

// ---- demo, identity, dev-agent ----

#[test]
fn demo_runs_verified_calls_through_the_outbound_proxies_and_the_gateway() {
    let out = run(&[&"demo"]);
    assert_exit(&out, 0);
    let text = stdout(&out);
    assert!(text.contains("app id"), "{text}");
    assert!(text.contains("NO (no attestation"), "{text}");
    // B's demo app saw A's verified id, not the forged one A sent.
    assert!(
        text.contains("app A -> B: 200 OK: hello from the demo app; the sidecar says you are app a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0"),
        "{text}"
    );
    // B's public domain, from the internal CA, on the same port.
    assert!(
        text.contains("https://app-b.demo.test/ -> 200 OK: hello from the demo app; the sidecar says you are app (none)"),
        "{text}"
    );
    // C is not on B's allowlist. B's alert usually reaches C's sidecar ("peer refused this
    // app"); about one run in twenty the h2 client reports only the close that follows it.
    assert!(
        text.contains("app C -> B: 502 Bad Gateway")
            && (text.contains("peer refused this app")
                || text.contains("closed a new connection after the handshake")),
        "{text}"
    );
    assert!(stderr(&out).contains("NOT attested"));
}

#[test]
fn identity_without_an_agent_names_the_socket() {
    let out = run(&[&"identity", &"--agent", &"unix:/nonexistent.sock"]);
    assert_no_panic(&out);
    assert!(!out.status.success(), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains("/nonexistent.sock"), "{err}");
}

/// A running `dev-agent`, killed and reaped on drop.
#[derive(Debug)]
struct DevAgentProcess {
    child: Child,
}

impl Drop for DevAgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn identity_from_a_dev_agent() {
    let app_id = "00112233445566778899aabbccddeeff00c0ffee";
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("a.sock");
    let agent_log = dir.path().join("agent.stderr");
    let mut agent = DevAgentProcess {
        child: mesh()
            .arg("dev-agent")
            .arg("--socket")
            .arg(&socket)
            .args(["--app-id", app_id])
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .stdout(Stdio::null())
            .stderr(File::create(&agent_log).unwrap())
            .spawn()
            .unwrap(),
    };

    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if let Some(status) = agent.child.try_wait().unwrap() {
            panic!(
                "dev-agent exited with {status}: {}",
                std::fs::read_to_string(&agent_log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "dev-agent did not create {} within 10s",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let address = format!("unix:{}", socket.display());
    let out = run(&[&"identity", &"--agent", &address]);
    assert_exit(&out, 0);
    let text = stdout(&out);
    assert!(text.contains(app_id), "{text}");
    assert!(text.contains("NO (no attestation"), "{text}");

    drop(agent);
    let log = std::fs::read_to_string(&agent_log).unwrap();
    assert!(log.contains("NOT attested"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// An admin listener stand-in that answers every request with `status_line` until dropped;
/// its address.
fn admin_answering(status_line: &'static str) -> std::net::SocketAddr {
    use std::io::Read;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut head = [0u8; 1024];
            let _ = conn.read(&mut head);
            let body = "{\"ready\":false,\"problems\":[\"identity: expired\"]}";
            let _ = write!(
                conn,
                "HTTP/1.1 {status_line}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    addr
}

#[test]
fn health_is_the_exit_status_of_one_admin_request() {
    let ok = admin_answering("200 OK").to_string();
    let out = run(&[&"health", &"--admin", &ok]);
    assert_exit(&out, 0);
    assert!(stdout(&out).contains("/health: ok"), "{}", stdout(&out));

    let not_ready = admin_answering("503 Service Unavailable").to_string();
    let out = run(&[&"health", &"--ready", &"--admin", &not_ready]);
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains("/ready answered 503") && stderr(&out).contains("identity: expired"),
        "{}",
        stderr(&out)
    );

    // Nothing listening: unhealthy, with where it looked.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let out = run(&[&"health", &"--admin", &closed]);
    assert_exit(&out, 1);
    assert!(stderr(&out).contains(&closed), "{}", stderr(&out));
}

#[test]
fn health_finds_the_admin_listener_the_environment_gives_the_sidecar() {
    // In a container the sidecar may listen on every interface; the HEALTHCHECK, in the same
    // environment, asks it on loopback.
    let addr = admin_answering("200 OK");
    let out = mesh()
        .arg("health")
        .env_remove("DSTACK_MESH_ADMIN")
        .env(
            "DSTACK_MESH_ADMIN_LISTEN",
            format!("0.0.0.0:{}", addr.port()),
        )
        .output()
        .unwrap();
    assert_exit(&out, 0);
}

#[test]
fn dstack_vpc_form_takes_no_subcommand_and_nothing_at_all_is_help() {
    let out = run(&[]);
    assert_exit(&out, 2);
    assert!(stderr(&out).contains("Usage"), "{}", stderr(&out));
    let out = run(&[&"--config", &"/nonexistent.toml", &"run"]);
    assert_exit(&out, 2);
    assert!(
        stderr(&out).contains("dstack-mesh run --config FILE"),
        "{}",
        stderr(&out)
    );
    // dstack-vpc's form reads the file like `run` does: a missing one is a config error.
    let out = run(&[&"--config", &"/nonexistent.toml"]);
    assert_exit(&out, 64);
    assert!(
        stderr(&out).contains("/nonexistent.toml"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn verify_cert_checks_the_quote_with_collateral() {
    let pccs = Path::new(CERTS).join("../mock-pccs");
    let root = pccs.join("tdx-root-ca.pem");
    let with = |at: &str| {
        verify(
            "sim-app1-signed-ratls/chain.pem",
            "sim-app1-signed-ratls/ca.pem",
            &[
                "--collateral",
                pccs.to_str().unwrap(),
                "--tdx-root",
                root.to_str().unwrap(),
                "--at",
                at,
            ],
        )
    };
    let out = with("2026-12-10T00:00:00Z");
    assert_exit(&out, 0);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["quote"]["tcb_status"], "UpToDate", "{v}");
    assert_eq!(v["quote"]["app_id"], APP1_ID);
    assert_eq!(
        v["quote"]["compose_hash"],
        "c143116fef3940e7f776bfc0919c256232ae5338a6e948c96b711e0b2383483a"
    );
    // Past the collateral's nextUpdate (2026-12-22T13:42:34Z): refused, saying why.
    assert_rejected(&with("2026-12-23T00:00:00Z"), "collateral_expired");
    // The production root does not vouch for the mock PCK chain.
    let out = verify(
        "sim-app1-signed-ratls/chain.pem",
        "sim-app1-signed-ratls/ca.pem",
        &[
            "--collateral",
            pccs.to_str().unwrap(),
            "--at",
            "2026-12-10T00:00:00Z",
        ],
    );
    assert_rejected(&out, "quote_signature");
}

#[test]
fn verify_cert_holds_the_quote_to_a_policy_file() {
    let pccs = Path::new(CERTS).join("../mock-pccs");
    let dir = tempfile::tempdir().unwrap();
    let compose = "c143116fef3940e7f776bfc0919c256232ae5338a6e948c96b711e0b2383483a";
    let policy = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    // The policy names its collateral and TDX root itself, as a sidecar's [attestation] does.
    let sidecar_table = |pin: &str| {
        format!(
            "[attestation]\nrequired = true\ncollateral_dir = \"{}\"\ntdx_root = \"{}\"\ncompose_hashes = [\"{pin}\"]\n",
            pccs.display(),
            pccs.join("tdx-root-ca.pem").display()
        )
    };
    let with = |path: &Path, extra: &[&str]| {
        let mut args = vec![
            "--policy",
            path.to_str().unwrap(),
            "--at",
            "2026-12-10T00:00:00Z",
        ];
        args.extend_from_slice(extra);
        verify(
            "sim-app1-signed-ratls/chain.pem",
            "sim-app1-signed-ratls/ca.pem",
            &args,
        )
    };
    let out = with(&policy("good.toml", sidecar_table(compose)), &[]);
    assert_exit(&out, 0);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["quote"]["compose_hash"], compose, "{v}");
    assert_eq!(v["peer"]["attestation"], "quote verified", "{v}");
    let pinned_elsewhere = policy("bad.toml", sidecar_table(&"00".repeat(32)));
    assert_rejected(&with(&pinned_elsewhere, &[]), "compose_hash_not_allowed");
    // The keys alone, with the collateral on the command line; a per-app pin and a TCB rule.
    let keys_only = policy(
        "keys.toml",
        format!(
            "tcb_statuses = [\"OutOfDate\"]\n[apps.{APP1_ID}]\ncompose_hashes = [\"{compose}\"]\n"
        ),
    );
    let root = pccs.join("tdx-root-ca.pem");
    let flags = [
        "--collateral",
        pccs.to_str().unwrap(),
        "--tdx-root",
        root.to_str().unwrap(),
    ];
    assert_rejected(&with(&keys_only, &flags), "tcb_status");
    // A policy without collateral anywhere, or with a mistake, is bad input naming it.
    let no_collateral = policy("none.toml", "compose_hashes = []\n".into());
    let out = with(&no_collateral, &[]);
    assert_exit(&out, EXIT_BAD_INPUT);
    assert!(stderr(&out).contains("--collateral"), "{}", stderr(&out));
    let typo = policy("typo.toml", "compose_hash = []\n".into());
    let out = with(&typo, &flags);
    assert_exit(&out, EXIT_BAD_INPUT);
    assert!(stderr(&out).contains("compose_hash"), "{}", stderr(&out));
}

// ---- evidence verify ----

#[test]
fn evidence_verify_checks_the_quote_with_collateral_and_a_policy() {
    // A bundle whose quote.json is the signed simulator's GetQuote answer: its report data is
    // 1234deadbeef, not the sums' hash (only a TEE can quote the sums), so the bundle as a
    // whole fails; what is tested here is the quote's own verification.
    let fixtures = Path::new(CERTS).join("..");
    let pccs = fixtures.join("mock-pccs");
    let dir = tempfile::tempdir().unwrap();
    let account = b"{}";
    std::fs::write(dir.path().join("acme-account.json"), account).unwrap();
    let sum = hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, account).as_ref());
    std::fs::write(
        dir.path().join("sha256sum.txt"),
        format!("{sum}  acme-account.json\n"),
    )
    .unwrap();
    std::fs::copy(
        fixtures.join("api/app1-signed/get_quote_post.json"),
        dir.path().join("quote.json"),
    )
    .unwrap();
    let run = |extra: &[&str]| {
        mesh()
            .args(["evidence", "verify"])
            .arg(dir.path())
            .args(extra)
            .output()
            .unwrap()
    };
    let root = pccs.join("tdx-root-ca.pem");
    let collateral = [
        "--collateral",
        pccs.to_str().unwrap(),
        "--tdx-root",
        root.to_str().unwrap(),
    ];
    let line = |out: &Output, start: &str| {
        stdout(out)
            .lines()
            .find(|l| {
                l.starts_with(start) && l.contains("quote.json: ") && !l.contains("report data")
            })
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no {start:?} quote line: {}", stdout(out)))
    };
    let mut args = collateral.to_vec();
    args.extend(["--at", "2026-12-10T00:00:00Z"]);
    let out = run(&args);
    let verified = line(&out, "ok");
    assert!(verified.contains("TCB UpToDate"), "{verified}");
    assert!(
        verified.contains("app 5bb4ff9a3837357f19dc176407a5709c62eb6c56"),
        "{verified}"
    );
    assert!(stdout(&out).contains("FAILED       quote.json: the quote's report data"));
    // A policy pinning another compose file refuses the quote, naming the rule.
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!("compose_hashes = [\"{}\"]\n", "00".repeat(32)),
    )
    .unwrap();
    let mut pinned = args.clone();
    pinned.extend(["--policy", policy.to_str().unwrap()]);
    let out = run(&pinned);
    assert_exit(&out, EXIT_REJECTED);
    assert!(
        line(&out, "FAILED").contains("refused (compose_hash_not_allowed)"),
        "{}",
        stdout(&out)
    );
    // Past the collateral's nextUpdate.
    let mut late = collateral.to_vec();
    late.extend(["--at", "2026-12-23T00:00:00Z"]);
    assert!(line(&run(&late), "FAILED").contains("collateral_expired"));
    // Without collateral the quote is not checked, and the output says how to check it.
    let out = run(&[]);
    assert!(
        stdout(&out).contains("give --collateral DIR or --pccs URL"),
        "{}",
        stdout(&out)
    );
}

/// The binary's aws-lc seeds from the OS, not from a CPU-jitter collector (`.cargo/config.toml`):
/// the collector's code is not in it at all.
#[test]
fn aws_lc_is_built_without_the_cpu_jitter_entropy_collector() {
    let binary = std::fs::read(BIN).unwrap();
    let aws_lc = binary.windows(7).any(|w| w == b"aws_lc_");
    assert!(aws_lc, "no aws-lc symbols: the check would prove nothing");
    let jitter = binary.windows(13).any(|w| w == b"jent_entropy_");
    assert!(
        !jitter,
        "jitterentropy is compiled in: AWS_LC_SYS_NO_JITTER_ENTROPY did not reach aws-lc-sys's build"
    );
}
