//! The container image and the compose files in `deploy/`, as a dstack user runs them: the image
//! `scripts/test` builds from the Dockerfile (`DSTACK_MESH_TEST_IMAGE`, default
//! `dstack-mesh:test`), each CVM a compose project from `deploy/` with a development agent's
//! socket in place of `/var/run/dstack.sock`, HAProxy on the docker bridge as the dstack gateway
//! (TLS passthrough by SNI to the CVM's published port), and pebble as the CA.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use e2e::{
    backend::Backend, client::MeshClient, dev_agent, free_port, identity, program, wait_until,
    ChildGuard,
};
use http::StatusCode;

const A: &str = "a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1";
const B: &str = "b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2";
const GATEWAY: &str = "gateway.test";
/// The sidecar's drain (`lifecycle.drain_timeout`) and the compose files' grace period.
const GRACE: Duration = Duration::from_secs(15);

fn image() -> String {
    let image = std::env::var("DSTACK_MESH_TEST_IMAGE").unwrap_or("dstack-mesh:test".into());
    let found = Command::new("docker")
        .args(["image", "inspect", "--format", "{{.Id}}", &image])
        .output()
        .expect("docker is installed");
    assert!(
        found.status.success(),
        "no image {image}: scripts/test builds it from the Dockerfile (scripts/docker-bases, then docker build)"
    );
    image
}

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file)
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("start the command");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn docker(args: &[&str]) -> String {
    let out = run(Command::new("docker").args(args));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// The docker bridge's address on this host: containers reach the host (the gateway, pebble)
/// there.
fn bridge_ip() -> IpAddr {
    let ipam: serde_json::Value = serde_json::from_str(&docker(&[
        "network",
        "inspect",
        "bridge",
        "--format",
        "{{json (index .IPAM.Config 0)}}",
    ]))
    .unwrap();
    if let Some(gateway) = ipam["Gateway"].as_str() {
        return gateway.parse().unwrap();
    }
    // Engines that do not say: the bridge takes its subnet's first address.
    let subnet = ipam["Subnet"].as_str().unwrap();
    let base: std::net::Ipv4Addr = subnet.split('/').next().unwrap().parse().unwrap();
    std::net::Ipv4Addr::from(u32::from(base) + 1).into()
}

/// A free port on `ip`.
fn free_port_on(ip: IpAddr) -> u16 {
    e2e::free_port_where(|port| std::net::TcpListener::bind((ip, port)).is_ok())
}

/// One CVM: a compose project from a `deploy/` file and a test override, taken down (with its
/// volumes) on drop.
struct Project {
    name: String,
    files: Vec<PathBuf>,
    env: Vec<(String, String)>,
}

impl Project {
    fn up(name: &str, files: Vec<PathBuf>, env: Vec<(&str, String)>) -> Self {
        Self::up_with(name, files, env, &[])
    }

    /// [`Project::up`] with more `docker-compose up` arguments (`--scale etcd=0`).
    fn up_with(name: &str, files: Vec<PathBuf>, env: Vec<(&str, String)>, args: &[&str]) -> Self {
        let unique = format!(
            "{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        );
        let project = Self {
            name: unique,
            files,
            env: env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        };
        let mut up = vec!["up", "-d", "--no-build"];
        up.extend_from_slice(args);
        run(&mut project.compose(&up));
        project
    }

    fn compose(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("docker-compose");
        cmd.arg("-p").arg(&self.name);
        for file in &self.files {
            cmd.arg("-f").arg(file);
        }
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// The container of `service`.
    fn container(&self, service: &str) -> String {
        let out = run(&mut self.compose(&["ps", "-q", service]));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// Where the host reaches `service`'s `port`.
    fn port(&self, service: &str, port: u16) -> SocketAddr {
        let out = run(&mut self.compose(&["port", service, &port.to_string()]));
        String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    fn logs(&self) -> String {
        let out = self.compose(&["logs", "--no-color"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Wait for `service`'s HEALTHCHECK to say healthy.
    fn healthy(&self, service: &str) {
        healthy(&self.container(service), || self.logs());
    }
}

/// Wait for `container`'s HEALTHCHECK (`dstack-mesh health`) to say healthy.
fn healthy(container: &str, logs: impl Fn() -> String) {
    let mut status = String::new();
    let end = Instant::now() + Duration::from_secs(90);
    while Instant::now() < end {
        status = docker(&["inspect", "--format", "{{.State.Health.Status}}", container]);
        if status == "healthy" {
            return;
        }
        assert_ne!(status, "unhealthy", "{}", logs());
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("{container} is {status}, not healthy:\n{}", logs());
}

impl Drop for Project {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- {} ---\n{}", self.name, self.logs());
        }
        let _ = self
            .compose(&["down", "-v", "--remove-orphans", "-t", "1"])
            .output();
    }
}

/// HAProxy as the dstack gateway on the docker bridge: `<B>-443s.gateway.test` passes through
/// to `cvm_b`, B's published port, untouched.
fn gateway(dir: &Path, bind: SocketAddr, cvm_b: SocketAddr) -> ChildGuard {
    gateway_routes(dir, bind, &[(&format!("{B}-443s"), cvm_b)])
}

/// HAProxy as the dstack gateway on the docker bridge: each `(name, to)` passes
/// `<name>.gateway.test` through to `to` (a CVM's published port), untouched.
fn gateway_routes(dir: &Path, bind: SocketAddr, routes: &[(&str, SocketAddr)]) -> ChildGuard {
    let mut config = format!(
        "defaults
    mode tcp
    timeout connect 10s
    timeout client 60s
    timeout server 60s

frontend gateway
    bind {bind}
    tcp-request inspect-delay 5s
    tcp-request content accept if {{ req_ssl_hello_type 1 }}
"
    );
    for (i, (name, _)) in routes.iter().enumerate() {
        config += &format!("    use_backend cvm{i} if {{ req_ssl_sni -i {name}.{GATEWAY} }}\n");
    }
    for (i, (_, to)) in routes.iter().enumerate() {
        config += &format!("\nbackend cvm{i}\n    server s {to}\n");
    }
    let file = dir.join("haproxy.cfg");
    std::fs::write(&file, config).unwrap();
    let mut cmd = Command::new(program("haproxy"));
    cmd.arg("-db").arg("-f").arg(&file);
    let mut haproxy = ChildGuard::spawn("haproxy", cmd, dir).unwrap();
    wait_until("haproxy to listen", Duration::from_secs(20), || {
        assert!(haproxy.exited().is_none(), "haproxy: {}", haproxy.stderr());
        std::net::TcpStream::connect(bind).is_ok()
    });
    haproxy
}

/// The override that makes `app` the suite's echo backend (answers with what it received).
fn echo_app(dir: &Path, extra: &str) -> PathBuf {
    let file = dir.join(format!("override-{}.yaml", free_port()));
    std::fs::write(
        &file,
        format!(
            "services:\n  app:\n    image: dstack-mesh-runtime:local\n    entrypoint: [\"/echo-backend\", \"0.0.0.0:8080\"]\n    volumes:\n      - {echo}:/echo-backend:ro\n{extra}",
            echo = env!("CARGO_BIN_EXE_echo-backend"),
        ),
    )
    .unwrap();
    file
}

/// `deploy/mesh` twice, as two CVMs: app A calls app B through its sidecar, the gateway and B's
/// sidecar, and B's backend sees A's verified id. Both sidecars run as the image says (non-root,
/// read-only root, no capabilities), turn healthy, and stop cleanly within the grace period.
#[tokio::test(flavor = "multi_thread")]
async fn mesh_compose_carries_app_a_to_app_b_through_the_gateway() {
    let image = image();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let state = d.join("state");
    let (_agent_a, sock_a) = dev_agent(d, "agent-a", A, &state);
    let (_agent_b, sock_b) = dev_agent(d, "agent-b", B, &state);
    let bridge = bridge_ip();
    let gateway_addr = SocketAddr::new(bridge, free_port_on(bridge));
    let cvm_b: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _gateway = gateway(d, gateway_addr, cvm_b);

    let common = |sock: &Path, port: String| {
        vec![
            ("DSTACK_MESH_IMAGE", image.clone()),
            ("DSTACK_SOCKET", sock.display().to_string()),
            ("MESH_PORT", port),
            // dstack-vpc's form of the gateway: base domain and external port.
            (
                "DSTACK_GATEWAY_DOMAIN",
                format!("{GATEWAY}:{}", gateway_addr.port()),
            ),
        ]
    };
    let mut env_b = common(&sock_b, cvm_b.to_string());
    env_b.push(("VPC_ALLOWED_APPS", A.to_owned()));
    let b = Project::up(
        "cvm-b",
        vec![deploy("mesh/docker-compose.yaml"), echo_app(d, "")],
        env_b,
    );
    // A's app is the test: it reaches A's outbound port, published on loopback for it, and
    // the gateway's name for B resolves to the gateway, as the real wildcard record does.
    let a = Project::up(
        "cvm-a",
        vec![
            deploy("mesh/docker-compose.yaml"),
            echo_app(
                d,
                &format!("  dstack-mesh:\n    ports: [\"127.0.0.1::8091\"]\n    extra_hosts: [\"{B}-443s.{GATEWAY}:{bridge}\"]\n"),
            ),
        ],
        common(&sock_a, format!("127.0.0.1:{}", free_port())),
    );
    b.healthy("dstack-mesh");
    a.healthy("dstack-mesh");

    let outbound = a.port("dstack-mesh", 8091);
    let (status, body) = e2e::client::http1_get(
        outbound,
        "/from-a",
        &[
            ("host", "b.internal"),
            ("x-dstack-target-app", B),
            ("x-dstack-app-id", B),
        ],
    )
    .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "{}\n{}\n{}",
        String::from_utf8_lossy(&body),
        a.logs(),
        b.logs()
    );
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["path"], "/from-a");
    assert_eq!(seen["headers"]["x-dstack-app-id"], serde_json::json!([A]));

    // As the image and the compose file say: nothing but the socket and the config mounted.
    for project in [&a, &b] {
        let container = project.container("dstack-mesh");
        let inspect: serde_json::Value =
            serde_json::from_str(&docker(&["inspect", &container])).unwrap();
        let c = &inspect[0];
        assert_eq!(c["Config"]["User"], "65532:65532");
        assert_eq!(c["HostConfig"]["ReadonlyRootfs"], true);
        assert_eq!(c["HostConfig"]["Privileged"], false);
        assert_eq!(c["HostConfig"]["CapDrop"], serde_json::json!(["ALL"]));
        let mounts: Vec<&str> = c["Mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["Destination"].as_str().unwrap())
            .collect();
        assert_eq!(
            mounts.len(),
            2,
            "only the agent's socket and the config: {mounts:?}"
        );
        assert!(mounts.contains(&"/var/run/dstack.sock"), "{mounts:?}");
    }

    // docker stop: SIGTERM, the drain, exit 0 within the grace period (past it docker kills
    // the process, and the exit code is 137).
    let container = b.container("dstack-mesh");
    docker(&["stop", "-t", &GRACE.as_secs().to_string(), &container]);
    let exit = docker(&["inspect", "--format", "{{.State.ExitCode}}", &container]);
    assert_eq!(exit, "0", "{}", b.logs());
}

/// Without the guest agent's socket the container exits at once, naming the path it looked at.
#[test]
fn without_the_agent_socket_the_container_exits_naming_it() {
    let image = image();
    let out = Command::new("docker")
        .args(["run", "--rm", "--read-only", &image])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/var/run/dstack.sock"), "{stderr}");
}

/// A certificate store the container cannot write: the domain's certificate fails with a clear
/// error, and mesh traffic on the same port keeps flowing.
#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_store_fails_the_domain_not_the_mesh() {
    let image = image();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let state = d.join("state");
    let (_agent, sock) = dev_agent(d, "agent-b", B, &state);
    let (caller, _caller_agent) = identity(d, &state, A).await;
    let bridge = bridge_ip();
    let backend = Backend::start_on(SocketAddr::new(bridge, 0)).await;
    let store = d.join("store");
    std::fs::create_dir_all(&store).unwrap();
    let config = d.join("ro.toml");
    std::fs::write(
        &config,
        "[acme]\nissuer = \"internal-ca\"\n\n[[domains]]\nnames = [\"ro.test\"]\nbackend = \"127.0.0.1:9\"\n",
    )
    .unwrap();
    let port = free_port();
    let name = format!("ro-store-{}", std::process::id());
    docker(&[
        "run",
        "-d",
        "--name",
        &name,
        "--read-only",
        "-p",
        &format!("127.0.0.1:{port}:8443"),
        "-e",
        &format!("MESH_BACKEND={}", backend.addr),
        "-e",
        &format!("VPC_ALLOWED_APPS={A}"),
        "-v",
        &format!("{}:/var/run/dstack.sock", sock.display()),
        "-v",
        &format!("{}:/var/lib/dstack-mesh:ro", store.display()),
        "-v",
        &format!("{}:/etc/dstack-mesh/ro.toml:ro", config.display()),
        &image,
        "run",
        "--config",
        "/etc/dstack-mesh/ro.toml",
    ]);
    struct Remove(String);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = Command::new("docker").args(["rm", "-f", &self.0]).output();
        }
    }
    let _remove = Remove(name.clone());
    let logs = || {
        let out = Command::new("docker")
            .args(["logs", &name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    wait_until("the store error", Duration::from_secs(60), || {
        logs().contains("Read-only file system")
    });
    assert!(logs().contains("internal CA unavailable"), "{}", logs());

    // Healthy (the admin port answers): the mesh listener is serving.
    healthy(&name, logs);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let b: ratls::AppId = B.parse().unwrap();
    let mut client = MeshClient::connect(&caller, &b, addr, Some(&[b"http/1.1"]))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    let (status, _, body) = client
        .get("/mesh", &[("host", "b.internal")])
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(backend.count(), 1);
    let running = docker(&["inspect", "--format", "{{.State.Running}}", &name]);
    assert_eq!(running, "true", "{}", logs());
}

/// The override that points the sidecar at pebble instead of Let's Encrypt: a config file
/// with the directory and pebble's API root, mounted beside what the compose file mounts.
fn pebble_override(dir: &Path, service: &str, pebble: &e2e::pebble::Pebble) -> PathBuf {
    let config = dir.join("pebble.toml");
    std::fs::write(
        &config,
        format!(
            "[acme]\nissuer = \"{}\"\nca_roots = [\"/etc/dstack-mesh/pebble-ca.pem\"]\n",
            pebble.directory
        ),
    )
    .unwrap();
    echo_app(
        dir,
        &format!(
            "  {service}:\n    command: [\"run\", \"--config\", \"/etc/dstack-mesh/pebble.toml\"]\n    volumes:\n      - {config}:/etc/dstack-mesh/pebble.toml:ro\n      - {ca}:/etc/dstack-mesh/pebble-ca.pem:ro\n",
            config = config.display(),
            ca = pebble.ca_file.display(),
        ),
    )
}

/// pebble on the docker bridge's address (containers reach it there), validating TLS-ALPN-01
/// on `tls_port`.
async fn bridge_pebble(dir: &Path, bridge: IpAddr, tls_port: u16) -> e2e::pebble::Pebble {
    let pebble_dir = dir.join("pebble");
    tokio::task::spawn_blocking(move || {
        e2e::pebble::Pebble::start(
            &pebble_dir,
            e2e::pebble::PebbleOptions {
                tls_port,
                http_port: free_port(),
                listen_ip: Some(bridge),
                ..Default::default()
            },
        )
    })
    .await
    .unwrap()
}

/// `GET /shop` for `domain` at `addr` as a browser would (WebPKI against `root`), retried
/// until a certificate is served (two minutes, then a failure with `logs`): the served leaf,
/// the status and the body.
async fn get_when_served(
    addr: SocketAddr,
    domain: &str,
    root: &str,
    logs: impl Fn() -> String,
) -> (
    rustls_pki_types::CertificateDer<'static>,
    StatusCode,
    bytes::Bytes,
) {
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        match e2e::client::public_connect(addr, domain, root.as_bytes(), &[b"http/1.1"]).await {
            Ok(tls) => {
                let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
                let mut client = MeshClient::over(tls).await.unwrap();
                let (status, _, body) = client.get_from(domain, "/shop", &[]).await.unwrap();
                return (leaf, status, body);
            }
            Err(e) => assert!(
                Instant::now() < end,
                "no certificate for {domain} at {addr}: {e}\n{}",
                logs()
            ),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `deploy/<file>` with only dstack-ingress's variables: the certificate comes from pebble
/// (TLS-ALPN-01 on the published port) and a browser gets the app through it. With `mesh`, the
/// same port also admits app A's mesh calls.
async fn custom_domain_compose(file: &str, service: &str, port_var: &str, mesh: bool) {
    const DOMAIN: &str = "shop.test";
    let image = image();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_owned();
    let state = d.join("state");
    let (_agent, sock) = dev_agent(&d, "agent-b", B, &state);
    let bridge = bridge_ip();
    let port = free_port();
    let pebble = bridge_pebble(&d, bridge, port).await;
    let mut env = vec![
        ("DSTACK_MESH_IMAGE", image),
        ("DSTACK_SOCKET", sock.display().to_string()),
        (port_var, format!("127.0.0.1:{port}")),
        ("DOMAIN", DOMAIN.to_owned()),
        ("CERTBOT_EMAIL", format!("ops@{DOMAIN}")),
        ("TARGET_ENDPOINT", "http://app:8080".to_owned()),
    ];
    if mesh {
        env.push(("VPC_ALLOWED_APPS", A.to_owned()));
    }
    let project = Project::up(
        "custom-domain",
        vec![deploy(file), pebble_override(&d, service, &pebble)],
        env,
    );
    project.healthy(service);

    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let root = pebble.issuance_root_pem();
    let (_, status, body) = get_when_served(addr, DOMAIN, &root, || project.logs()).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["path"], "/shop");
    assert!(
        seen["headers"].get("x-dstack-app-id").is_none(),
        "a public caller has no app id"
    );
    assert_eq!(pebble.orders_seen(), 1, "{}", pebble.log());

    if mesh {
        let (caller, _caller_agent) = identity(&d, &state, A).await;
        let b: ratls::AppId = B.parse().unwrap();
        let mut client = MeshClient::connect(&caller, &b, addr, Some(&[b"http/1.1"]))
            .await
            .unwrap();
        let (status, _, body) = client
            .get("/from-a", &[("host", "b.internal")])
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(seen["headers"]["x-dstack-app-id"], serde_json::json!([A]));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ingress_compose_issues_from_pebble_and_serves_the_domain() {
    custom_domain_compose(
        "ingress/docker-compose.yaml",
        "dstack-ingress",
        "INGRESS_PORT",
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn both_compose_serves_the_domain_and_the_mesh_on_one_port() {
    custom_domain_compose("both/docker-compose.yaml", "dstack-mesh", "MESH_PORT", true).await;
}

/// `deploy/replicas` as two CVMs of one app: the first runs the compose file's etcd service
/// (Debian's etcd, `scripts/docker-bases`), the second reaches it over the first's network.
/// pebble validates TLS-ALPN-01 through the first's published port only, whichever instance
/// ordered; both serve the one certificate, and etcd holds no readable domain or PEM.
#[tokio::test(flavor = "multi_thread")]
async fn replicas_compose_shares_one_certificate_between_two_cvms() {
    const DOMAIN: &str = "shop.test";
    let image = image();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_owned();
    let state = d.join("state");
    let (_agent_1, sock_1) = dev_agent(&d, "agent-1", B, &state);
    let (_agent_2, sock_2) = dev_agent(&d, "agent-2", B, &state);
    let bridge = bridge_ip();
    let (port_1, port_2) = (free_port(), free_port());
    let pebble = bridge_pebble(&d, bridge, port_1).await;
    let env = |sock: &Path, port: u16| {
        vec![
            ("DSTACK_MESH_IMAGE", image.clone()),
            ("ETCD_IMAGE", "dstack-mesh-etcd:local".to_owned()),
            ("DSTACK_SOCKET", sock.display().to_string()),
            ("MESH_PORT", format!("127.0.0.1:{port}")),
            ("DOMAIN", DOMAIN.to_owned()),
            ("CERTBOT_EMAIL", format!("ops@{DOMAIN}")),
            ("TARGET_ENDPOINT", "http://app:8080".to_owned()),
        ]
    };
    let pebble_file = pebble_override(&d, "dstack-mesh", &pebble);
    let first = Project::up(
        "replicas-1",
        vec![deploy("replicas/docker-compose.yaml"), pebble_file.clone()],
        env(&sock_1, port_1),
    );
    let etcd = first.container("etcd");
    let network = docker(&[
        "inspect",
        "--format",
        "{{range $name, $_ := .NetworkSettings.Networks}}{{$name}}{{end}}",
        &etcd,
    ]);
    let joined = d.join("join.yaml");
    std::fs::write(
        &joined,
        format!("networks:\n  default:\n    external: true\n    name: {network}\n"),
    )
    .unwrap();
    let second = Project::up_with(
        "replicas-2",
        vec![deploy("replicas/docker-compose.yaml"), pebble_file, joined],
        env(&sock_2, port_2),
        &["--scale", "etcd=0"],
    );
    first.healthy("dstack-mesh");
    second.healthy("dstack-mesh");

    let root = pebble.issuance_root_pem();
    let mut leaves = Vec::new();
    for port in [port_1, port_2] {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let (leaf, status, _) =
            get_when_served(addr, DOMAIN, &root, || first.logs() + &second.logs()).await;
        assert_eq!(status, StatusCode::OK);
        leaves.push(leaf);
    }
    assert_eq!(leaves[0], leaves[1], "one certificate for both CVMs");
    assert_eq!(pebble.orders_seen(), 1, "{}", pebble.log());
    let logs = first.logs() + &second.logs();
    assert!(logs.contains("the fleet's certificate taken"), "{logs}");

    // What the etcd service holds: sealed values under hashed names.
    let ip = docker(&[
        "inspect",
        "--format",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        &etcd,
    ]);
    let dump = run(Command::new(program("etcdctl"))
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints=http://{ip}:2379"))
        .args(["get", "--prefix", "/dstack-mesh/"]));
    let text = String::from_utf8_lossy(&dump.stdout);
    assert!(text.contains(&format!("/dstack-mesh/{B}/cert/")), "{text}");
    for plain in ["BEGIN", DOMAIN] {
        assert!(!text.contains(plain), "{plain} readable in etcd:\n{text}");
    }
}

/// `deploy/database` as two CVMs: the app reaches Redis in the other CVM at its own
/// 127.0.0.1:6379 (a tunnel of its sidecar), through the gateway and the Redis CVM's TCP
/// service, which admits the app by its verified id; Redis publishes nothing and sees only the
/// sidecar's connections.
#[tokio::test(flavor = "multi_thread")]
async fn database_compose_carries_redis_between_two_cvms() {
    let image = image();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let state = d.join("state");
    let (_agent_a, sock_a) = dev_agent(d, "agent-a", A, &state);
    let (_agent_b, sock_b) = dev_agent(d, "agent-b", B, &state);
    let bridge = bridge_ip();
    let gateway_addr = SocketAddr::new(bridge, free_port_on(bridge));
    let redis_cvm: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _gateway = gateway_routes(d, gateway_addr, &[(&format!("{B}-6379s"), redis_cvm)]);
    // The deploy/ configurations with the ids filled in, as a user does.
    let fill = |file: &str, from: &str, to: &str| {
        let text = std::fs::read_to_string(deploy(&format!("database/{file}"))).unwrap();
        assert!(text.contains(from), "{file} has no {from}");
        let path = d.join(file);
        std::fs::write(&path, text.replace(from, to)).unwrap();
        path.display().to_string()
    };
    let redis_image = "dstack-mesh-redis:local".to_owned();

    let b = Project::up(
        "cvm-redis",
        vec![deploy("database/redis.yaml")],
        vec![
            ("DSTACK_MESH_IMAGE", image.clone()),
            ("DSTACK_SOCKET", sock_b.display().to_string()),
            ("MESH_CONFIG", fill("redis-mesh.toml", "<app id>", A)),
            ("REDIS_IMAGE", redis_image.clone()),
            ("REDIS_PORT", redis_cvm.to_string()),
        ],
    );
    // The app: Debian's redis-cli in a container sharing the sidecar's network, as the compose
    // file puts the app (a Redis on another port keeps the container running).
    let app = d.join("override-app.yaml");
    std::fs::write(
        &app,
        format!(
            "services:\n  app:\n    command: [\"redis-server\", \"--port\", \"7777\", \"--save\", \"\"]\n  dstack-mesh:\n    extra_hosts: [\"{B}-6379s.{GATEWAY}:{bridge}\"]\n"
        ),
    )
    .unwrap();
    let a = Project::up(
        "cvm-app",
        vec![deploy("database/app.yaml"), app],
        vec![
            ("DSTACK_MESH_IMAGE", image.clone()),
            ("DSTACK_SOCKET", sock_a.display().to_string()),
            ("MESH_CONFIG", fill("app-mesh.toml", "<redis app id>", B)),
            ("APP_IMAGE", redis_image),
            (
                "DSTACK_GATEWAY_DOMAIN",
                format!("{GATEWAY}:{}", gateway_addr.port()),
            ),
        ],
    );
    b.healthy("dstack-mesh");
    a.healthy("dstack-mesh");

    let app = a.container("app");
    let cli = |args: &[&str]| {
        let mut full = vec!["exec", app.as_str(), "redis-cli", "-p", "6379"];
        full.extend_from_slice(args);
        let out = Command::new("docker").args(&full).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(
        cli(&["SET", "greeting", "from another CVM"]),
        "OK",
        "{}\n{}",
        a.logs(),
        b.logs()
    );
    assert_eq!(cli(&["GET", "greeting"]), "from another CVM");

    // Redis publishes nothing, and saw only the two connections the sidecar made for the app
    // (plus the one asking).
    let redis = b.container("redis");
    assert_eq!(docker(&["port", &redis]), "", "Redis publishes no port");
    let info = docker(&["exec", &redis, "redis-cli", "INFO", "stats"]);
    let received: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("total_connections_received:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    assert_eq!(received, 3, "{info}");
}

/// `deploy/white-label` as a SaaS app's CVM: a customer's domain added to the Redis set (as the
/// app would, with `redis-cli` in the Redis container) is ordered from pebble and served to a
/// browser; one the app's `ask` endpoint allows is served at its first visit; removed from the
/// set (and not allowed by `ask`), a domain is served no more.
#[tokio::test(flavor = "multi_thread")]
async fn white_label_compose_serves_the_domains_its_redis_set_lists() {
    const CUSTOMER: &str = "careers.customer.test";
    let image = image();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_owned();
    let (_agent, sock) = dev_agent(&d, "agent", B, &d.join("state"));
    let bridge = bridge_ip();
    let port = free_port();
    let pebble = bridge_pebble(&d, bridge, port).await;
    // The configuration as shipped, pointed at pebble instead of Let's Encrypt.
    let text = std::fs::read_to_string(deploy("white-label/white-label.toml")).unwrap();
    assert!(text.contains("issuer = \"letsencrypt\""));
    let config = d.join("white-label.toml");
    // The app's ask endpoint (the echo app's /allowed) says yes to one walk-in customer only.
    assert!(text.contains("ask = \"http://app:8080/allowed\""));
    std::fs::write(
        &config,
        text.replace(
            "issuer = \"letsencrypt\"",
            &format!(
                "issuer = \"{}\"\nca_roots = [\"/etc/dstack-mesh/pebble-ca.pem\"]",
                pebble.directory
            ),
        )
        .replace(
            "ask = \"http://app:8080/allowed\"",
            "ask = \"http://app:8080/allowed?allow=walk-in.customer.test\"",
        ),
    )
    .unwrap();
    let ca = echo_app(
        &d,
        &format!(
            "  dstack-mesh:\n    volumes:\n      - {}:/etc/dstack-mesh/pebble-ca.pem:ro\n",
            pebble.ca_file.display()
        ),
    );
    let project = Project::up(
        "white-label",
        vec![deploy("white-label/docker-compose.yaml"), ca],
        vec![
            ("DSTACK_MESH_IMAGE", image),
            ("DSTACK_SOCKET", sock.display().to_string()),
            ("MESH_PORT", format!("127.0.0.1:{port}")),
            ("MESH_CONFIG", config.display().to_string()),
            ("REDIS_IMAGE", "dstack-mesh-redis:local".to_owned()),
        ],
    );
    project.healthy("dstack-mesh");
    let redis = project.container("redis");
    let cli = |args: &[&str]| {
        let mut all = vec!["exec", redis.as_str(), "redis-cli"];
        all.extend_from_slice(args);
        docker(&all)
    };
    cli(&["SADD", "customers", CUSTOMER, "shop.customer.test"]);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let root = pebble.issuance_root_pem();
    for customer in [CUSTOMER, "shop.customer.test"] {
        let (_, status, body) = get_when_served(addr, customer, &root, || project.logs()).await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    }
    assert_eq!(pebble.orders_seen(), 2, "{}", pebble.log());
    // A customer not in the set yet, at its first visit: the app's ask endpoint admits it,
    // and the visit is served with its new certificate.
    let (_, status, _) =
        get_when_served(addr, "walk-in.customer.test", &root, || project.logs()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(pebble.orders_seen(), 3, "{}", pebble.log());
    assert!(
        project.logs().contains("on demand: name admitted"),
        "{}",
        project.logs()
    );
    // One customer leaves (the set must not empty: Redis deletes an empty set, and a key that
    // vanished keeps the last list).
    cli(&["SREM", "customers", CUSTOMER]);
    let end = Instant::now() + Duration::from_secs(30);
    while e2e::client::public_connect(addr, CUSTOMER, root.as_bytes(), &[b"http/1.1"])
        .await
        .is_ok()
    {
        assert!(Instant::now() < end, "still served: {}", project.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    get_when_served(addr, "shop.customer.test", &root, || project.logs()).await;
}
