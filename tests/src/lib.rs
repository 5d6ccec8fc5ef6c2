//! Harness for end-to-end tests: processes owned by guards that kill and reap them on drop,
//! bounded polling instead of sleeps, and the path of the `dstack-mesh` binary under test.

// Only tests use this crate; a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

pub mod ari;
pub mod backend;
pub mod bind;
pub mod chromium;
pub mod client;
pub mod cloudflare;
pub mod digitalocean;
pub mod etcd;
pub mod gcloud;
pub mod hetzner;
pub mod http_stand_in;
pub mod linode;
pub mod load;
pub mod namecheap;
pub mod netns;
pub mod ovh;
pub mod pccs;
pub mod pebble;
pub mod porkbun;
pub mod redis;
pub mod route53;
pub mod unbound;

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// The `dstack-mesh` binary built for this test run (cargo builds it before the tests because
/// this crate depends on the `dstack-mesh` package).
pub fn mesh_binary() -> PathBuf {
    let mut dir = std::env::current_exe().expect("test executable path");
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join("dstack-mesh")
}

/// A child process killed and reaped when dropped, so no test leaks a process.
#[derive(Debug)]
pub struct ChildGuard {
    name: String,
    child: Child,
    // Where stderr goes (and stdout too, for `spawn_with_stdout`).
    log: PathBuf,
}

impl ChildGuard {
    /// Start `cmd` with stderr captured to a file in `log_dir`.
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> std::io::Result<Self> {
        let log = log_dir.join(format!("{name}.stderr"));
        let file = std::fs::File::create(&log)?;
        Self::start(name, cmd.stdout(Stdio::null()).stderr(file), log)
    }

    /// Start `cmd` with stdout and stderr both appended to `<name>.log` in `log_dir`, for
    /// programs that log to stdout (pebble). A later guard with the same name appends to the
    /// same file, so a restarted process keeps one log.
    pub fn spawn_with_stdout(
        name: &str,
        mut cmd: Command,
        log_dir: &Path,
    ) -> std::io::Result<Self> {
        let log = log_dir.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        Self::start(name, cmd.stdout(file.try_clone()?).stderr(file), log)
    }

    fn start(name: &str, cmd: &mut Command, log: PathBuf) -> std::io::Result<Self> {
        // Its own process group, so that drop ends what it started too (nginx's workers).
        let child = cmd.stdin(Stdio::null()).process_group(0).spawn()?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log,
        })
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// What the process wrote to stderr so far (stdout and stderr interleaved for a guard from
    /// [`ChildGuard::spawn_with_stdout`]).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How the process ended, if it has.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Send `signal` (`TERM`, `HUP`, ...) with kill(1).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg("-s")
            .arg(signal)
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -s {signal} {}", self.name);
    }

    /// Wait up to `limit` for the process to exit; its status, or a panic with its log.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let end = Instant::now() + limit;
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            assert!(
                Instant::now() < end,
                "{} did not exit within {limit:?}: {}",
                self.name,
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Fail with the process's stderr if it has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited ({status}): {}", self.name, self.stderr());
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // The whole group: killing the leader alone leaves its children (nginx workers keep
        // listening after their master is gone).
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Poll `check` every 20 ms until it holds or `limit` passes; panics naming `what`.
pub fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

/// An in-process development agent for `app` (state shared through `state`) and an identity
/// from it. Keep the returned task alive as long as the identity should refresh.
pub async fn identity(
    dir: &Path,
    state: &Path,
    app: &str,
) -> (
    ratls::identity::RotatingIdentity,
    tokio::task::JoinHandle<()>,
) {
    instance_identity(dir, state, app, None).await
}

/// [`identity`] for one instance of `app` (hex instance id; `None`: derived from the app).
pub async fn instance_identity(
    dir: &Path,
    state: &Path,
    app: &str,
    instance: Option<&str>,
) -> (
    ratls::identity::RotatingIdentity,
    tokio::task::JoinHandle<()>,
) {
    identity_with(dir, state, app, instance, Default::default()).await
}

/// [`instance_identity`] with `config` (a short validity, say).
pub async fn identity_with(
    dir: &Path,
    state: &Path,
    app: &str,
    instance: Option<&str>,
    config: ratls::identity::IdentityConfig,
) -> (
    ratls::identity::RotatingIdentity,
    tokio::task::JoinHandle<()>,
) {
    use ratls::{
        agent::{AgentAddress, AgentClient},
        dev_agent::{DevAgent, DevAgentConfig},
        identity::RotatingIdentity,
    };
    let agent = std::sync::Arc::new(
        DevAgent::new(DevAgentConfig {
            app_id: app.parse().unwrap(),
            instance_id: instance.map(str::to_owned),
            app_name: format!("app-{}", &app[..4]),
            state_dir: state.to_owned(),
        })
        .unwrap(),
    );
    // Unique per agent: a restarted sidecar's agent must not find the old socket in its way.
    static AGENTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let socket = dir.join(format!(
        "{}-{}-{}-{}.sock",
        &app[..8],
        instance.map_or("app", |i| &i[..8]),
        std::process::id(),
        AGENTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let task = agent.spawn(&socket).unwrap();
    let (client, info) =
        AgentClient::discover(vec![AgentAddress::Unix(socket)], Duration::from_secs(5))
            .await
            .unwrap();
    let id = RotatingIdentity::start(client, info, config).await.unwrap();
    (id, task)
}

/// Start `dstack-mesh dev-agent` for `app_id` on `<dir>/<name>.sock` and wait for the socket.
pub fn dev_agent(dir: &Path, name: &str, app_id: &str, state_dir: &Path) -> (ChildGuard, PathBuf) {
    dev_agent_with(dir, name, app_id, state_dir, &[])
}

/// [`dev_agent`] with more arguments (`--tls-key-response FILE`).
pub fn dev_agent_with(
    dir: &Path,
    name: &str,
    app_id: &str,
    state_dir: &Path,
    extra: &[&std::ffi::OsStr],
) -> (ChildGuard, PathBuf) {
    let socket = dir.join(format!("{name}.sock"));
    let mut cmd = Command::new(mesh_binary());
    cmd.arg("dev-agent")
        .arg("--socket")
        .arg(&socket)
        .arg("--app-id")
        .arg(app_id)
        .arg("--state-dir")
        .arg(state_dir)
        .args(extra);
    let mut guard = ChildGuard::spawn(name, cmd, dir).expect("start dev-agent");
    wait_until(&format!("{name} socket"), Duration::from_secs(20), || {
        guard.assert_running();
        socket.exists()
    });
    (guard, socket)
}

/// A memory field of `pid`'s `/proc/<pid>/status` in KiB (`VmRSS`: resident now, `VmHWM`: its
/// peak); 0 when the process or the field is gone.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A free loopback port for a process the test starts later.
///
/// Taken from outside the kernel's ephemeral range: a port from `bind(0)` is released before the
/// child binds it, and in that gap any outgoing connection on the machine may be given it as its
/// source port (CI lost a run to exactly that). Ports outside the range are only ever taken by
/// an explicit bind, so the race left is with another test picking the same random port, which
/// the bind check and the per-process set make rare.
pub fn free_port() -> u16 {
    free_port_where(|port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
}

/// A port outside the ephemeral range (see [`free_port`]) for which `free` holds right now.
pub fn free_port_where(free: impl Fn(u16) -> bool) -> u16 {
    use std::collections::HashSet;
    use std::hash::{BuildHasher, Hasher};
    use std::sync::Mutex;
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

    let (lo, hi) = ephemeral_range();
    // Below the range when there is room (Linux default 32768..=60999), above it otherwise.
    let (first, last) = if lo >= 12_000 {
        (10_000, lo - 1)
    } else {
        (hi.saturating_add(1).max(10_000), u16::MAX)
    };
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    for attempt in 0u32..1000 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.write_u32(attempt);
        let port = first + (h.finish() % u64::from(last - first + 1)) as u16;
        if !given.contains(&port) && free(port) {
            given.insert(port);
            return port;
        }
    }
    panic!("no free port in {first}..={last}");
}

/// The kernel's ephemeral port range (`/proc/sys/net/ipv4/ip_local_port_range`).
fn ephemeral_range() -> (u16, u16) {
    let text =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut it = text
        .split_whitespace()
        .filter_map(|v| v.parse::<u16>().ok());
    match (it.next(), it.next()) {
        (Some(lo), Some(hi)) if lo <= hi => (lo, hi),
        _ => (32_768, 60_999),
    }
}

/// A program from Debian's packages; setup-test-deps installs it, so absence is a failure.
pub fn program(name: &str) -> PathBuf {
    for dir in [
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
        "/usr/local/bin",
        "/usr/local/sbin",
    ] {
        let path = Path::new(dir).join(name);
        if path.is_file() {
            return path;
        }
    }
    panic!("{name} is not installed: run scripts/setup-test-deps");
}

/// `dstack-mesh run` with `config`; returns the guard and the bound addresses it logged
/// (`inbound`, `auth`).
pub fn run_mesh(
    dir: &Path,
    name: &str,
    config: &Path,
) -> (ChildGuard, Vec<(String, std::net::SocketAddr)>) {
    run_mesh_logging(dir, name, config, "info")
}

/// [`run_mesh`] with `RUST_LOG=filter`.
pub fn run_mesh_logging(
    dir: &Path,
    name: &str,
    config: &Path,
    filter: &str,
) -> (ChildGuard, Vec<(String, std::net::SocketAddr)>) {
    let mut cmd = Command::new(mesh_binary());
    cmd.args(["--log-format", "json", "run", "--config"])
        .arg(config)
        .env("RUST_LOG", filter)
        .env_remove("DSTACK_AGENT_ADDRESS");
    start_mesh(dir, name, cmd)
}

/// The address of the listener `what` (`inbound`, `admin`, `outbound`, ...) among those a
/// sidecar said it bound.
pub fn listener(bound: &[(String, std::net::SocketAddr)], what: &str) -> std::net::SocketAddr {
    bound
        .iter()
        .find(|(w, _)| w == what)
        .map(|(_, a)| *a)
        .unwrap_or_else(|| panic!("no {what} listener in {bound:?}"))
}

/// Start `cmd`, a sidecar invocation that logs JSON, and wait until it runs; the guard and
/// the listeners it bound (`listening` log lines).
pub fn start_mesh(
    dir: &Path,
    name: &str,
    cmd: Command,
) -> (ChildGuard, Vec<(String, std::net::SocketAddr)>) {
    let mut guard = ChildGuard::spawn(name, cmd, dir).expect("start dstack-mesh");
    let mut bound = Vec::new();
    wait_until(
        &format!("{name} to listen"),
        Duration::from_secs(30),
        || {
            guard.assert_running();
            // One read: the listeners and the line that ends start-up from the same text (two
            // reads could miss the first and see the second).
            let log = guard.stderr();
            bound = log
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|v| v["fields"]["message"] == "listening")
                .filter_map(|v| {
                    let what = v["fields"]["listener"].as_str()?.to_owned();
                    let addr = v["fields"]["addr"].as_str()?.parse().ok()?;
                    Some((what, addr))
                })
                .collect();
            log.contains("dstack-mesh running")
        },
    );
    (guard, bound)
}

/// A client certificate under a development agent's App CA for `app`, minted with rcgen so a
/// test can bend one property (`spec` edits the parameters; they start as a valid clientAuth
/// leaf with the app id extension). Returns `[leaf, App CA]` and the leaf's PKCS#8 key.
pub fn mint_under_app_ca(
    state: &Path,
    app: &str,
    spec: impl FnOnce(&mut rcgen::CertificateParams),
) -> (Vec<rustls_pki_types::CertificateDer<'static>>, Vec<u8>) {
    let bundle = std::fs::read_to_string(state.join("apps").join(app).join("app-ca.pem")).unwrap();
    let key_at = bundle.find("-----BEGIN PRIVATE KEY-----").unwrap();
    let ca_key = rcgen::KeyPair::from_pem(&bundle[key_at..]).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&bundle[..key_at], ca_key).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params
        .custom_extensions
        .push(rcgen::CustomExtension::from_oid_content(
            ratls::ext::oid::APP_ID,
            ratls::ext::wrap_octet_string(&hex_bytes(app)),
        ));
    spec(&mut params);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let ca = ratls::cert::parse_chain(&bundle.as_bytes()[..key_at])
        .unwrap()
        .remove(0);
    (vec![cert.der().clone(), ca], key.serialize_der())
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

/// PEM text of DER certificates (as nginx would hold them).
pub fn to_pem(certs: &[rustls_pki_types::CertificateDer<'_>]) -> String {
    let mut out = String::new();
    for cert in certs {
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in base64(cert).as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).unwrap());
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

// Standard base64 with padding (RFC 4648 section 4), for PEM and TSIG secrets; the crate has
// no base64 dependency for these few bytes.
pub(crate) fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                T[((n >> (18 - 6 * i)) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    out
}

/// The key, chain and root of a fresh identity from the agent at `socket`, written where nginx
/// reads them (`server.key`, `server.crt`, `ca.crt` in `dir`), as dstack-vpc's mesh-serve.sh
/// does with GetTlsKey.
pub async fn write_nginx_identity(agent: ratls::agent::AgentAddress, dir: &Path) {
    let resp = ratls::agent::AgentClient::new(agent)
        .get_tls_key(&ratls::agent::TlsKeyRequest {
            subject: "localhost".into(),
            usage_server_auth: true,
            usage_client_auth: true,
            with_app_info: true,
            ..Default::default()
        })
        .await
        .unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("server.key"), &resp.key).unwrap();
    std::fs::write(dir.join("server.crt"), resp.certificate_chain.concat()).unwrap();
    std::fs::write(dir.join("ca.crt"), resp.certificate_chain.last().unwrap()).unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `pid` is still running (a zombie waiting for init counts as ended).
    fn alive(pid: &str) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| !stat.rsplit(") ").next().unwrap_or("").starts_with('Z'))
    }

    #[test]
    fn dropping_a_guard_ends_what_the_process_started() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("grandchild.pid");
        let mut cmd = Command::new("sh");
        // A leader that starts a worker and waits, as nginx's master does.
        cmd.arg("-c")
            .arg(format!("sleep 300 & echo $! > {}; wait", pidfile.display()));
        let guard = ChildGuard::spawn("leader", cmd, dir.path()).unwrap();
        wait_until("the worker's pid", Duration::from_secs(10), || {
            std::fs::read_to_string(&pidfile).is_ok_and(|p| p.ends_with('\n'))
        });
        let worker = std::fs::read_to_string(&pidfile).unwrap().trim().to_owned();
        assert!(alive(&worker));
        drop(guard);
        wait_until("the worker to end", Duration::from_secs(10), || {
            !alive(&worker)
        });
    }
}
