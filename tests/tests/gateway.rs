//! The dstack gateway, for real: Debian's HAProxy routes by SNI as dstack's gateway does.
//! `<app>-<port>s.<base>` passes TLS through to the target CVM (mutual RA-TLS between the two
//! sidecars, end to end); `<app>-<port>.<base>` is terminated by the gateway itself with its
//! own (WebPKI) certificate. Sidecars are `dstack-mesh run` processes on development agents that
//! share one KMS root; the caller's outbound proxy dials HAProxy for every gateway name.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::{
    io::{Read, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use bytes::Bytes;
use e2e::{
    backend::{hex, Backend},
    client::{empty, ClientBody},
    dev_agent, free_port, listener, program, run_mesh, wait_until, ChildGuard,
};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The caller.
const A: &str = "aaaa2222aaaa2222aaaa2222aaaa2222aaaa2222";
/// The target, behind the gateway.
const B: &str = "bbbb3333bbbb3333bbbb3333bbbb3333bbbb3333";
/// An app under the same KMS root that B does not allow.
const C: &str = "cccc4444cccc4444cccc4444cccc4444cccc4444";
/// An app id the gateway (wrongly) routes to B.
const STRANGER: &str = "57a4e957a4e957a4e957a4e957a4e957a4e957a4";
/// The gateway's base domain.
const BASE: &str = "gw.test";
/// HAProxy's name for the passthrough backend (the concurrency test counts its sessions).
const PASSTHROUGH: &str = "to_b_inbound";

/// Two sidecars and the gateway between them: A's outbound → HAProxy → B's inbound → backend.
struct Mesh {
    dir: tempfile::TempDir,
    state: PathBuf,
    backend: Backend,
    gateway: Gateway,
    /// The test CA's certificate (`outbound.gateway_roots`).
    gateway_ca: PathBuf,
    /// Where A's outbound proxy listens.
    outbound: SocketAddr,
    /// A's admin listener.
    a_admin: SocketAddr,
    a_agent: PathBuf,
    processes: Vec<ChildGuard>,
}

impl Mesh {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let state = d.join("state");
        let (a_guard, a_agent) = dev_agent(d, "agent-a", A, &state);
        let (b_guard, b_agent) = dev_agent(d, "agent-b", B, &state);
        let backend = Backend::start().await;

        let b_config = d.join("b.toml");
        std::fs::write(
            &b_config,
            format!(
                "[agent]\naddress = \"unix:{sock}\"\n\n[inbound]\nlisten = \"127.0.0.1:0\"\nbackend = \"{backend}\"\nallowed_apps = \"{A}\"\n\n[auth]\nenabled = false\n\n[admin]\nlisten = \"127.0.0.1:0\"\n[client]\nenabled = false\n",
                sock = b_agent.display(),
                backend = backend.addr,
            ),
        )
        .unwrap();
        let (b, bound) = run_mesh(d, "sidecar-b", &b_config);
        let inbound = listener(&bound, "inbound");

        let gateway_ca = d.join("gateway-ca.pem");
        let gateway = Gateway::start(d, inbound, backend.addr, &gateway_ca);
        let (a, outbound, a_admin) =
            sidecar(d, "sidecar-a", &a_agent, gateway.addr, Some(&gateway_ca));
        Self {
            dir,
            state,
            backend,
            gateway,
            gateway_ca,
            outbound,
            a_admin,
            a_agent,
            processes: vec![a_guard, b_guard, b, a],
        }
    }

    /// Another app's sidecar (its own development agent, the same KMS root), calling through
    /// the same gateway; the guards live as long as the mesh.
    fn another_app(&mut self, app: &str, name: &str) -> SocketAddr {
        let (agent, socket) =
            dev_agent(self.dir.path(), &format!("agent-{name}"), app, &self.state);
        let (sidecar, outbound, _) = sidecar(
            self.dir.path(),
            &format!("sidecar-{name}"),
            &socket,
            self.gateway.addr,
            Some(&self.gateway_ca),
        );
        self.processes.extend([agent, sidecar]);
        outbound
    }
}

/// An outbound-only sidecar on the agent at `agent` that dials `gateway` for every gateway
/// name of `BASE`, trusting `roots` (if any) for the gateway's own TLS.
fn sidecar(
    dir: &Path,
    name: &str,
    agent: &Path,
    gateway: SocketAddr,
    roots: Option<&Path>,
) -> (ChildGuard, SocketAddr, SocketAddr) {
    let roots = roots
        .map(|r| format!("gateway_roots = \"{}\"\n", r.display()))
        .unwrap_or_default();
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "[agent]\naddress = \"unix:{sock}\"\n\n[inbound]\nenabled = false\n\n[auth]\nenabled = false\n\n[admin]\nlisten = \"127.0.0.1:0\"\n[client]\naddress = \"127.0.0.1\"\nport = 0\n\n[dstack]\ngateway_domain = \"{BASE}\"\n\n[outbound]\ngateway_address = \"{gateway}\"\n{roots}",
            sock = agent.display(),
        ),
    )
    .unwrap();
    let (guard, bound) = run_mesh(dir, name, &config);
    (
        guard,
        listener(&bound, "outbound"),
        listener(&bound, "admin"),
    )
}

/// Debian's HAProxy as the dstack gateway.
struct Gateway {
    /// The gateway's port (what dstack publishes as 443).
    addr: SocketAddr,
    stats: PathBuf,
    _haproxy: ChildGuard,
}

impl Gateway {
    /// Route `<B>-443s` (and, wrongly, `<STRANGER>-443s`) through to `inbound` untouched, and
    /// terminate `<B>-8080` with a `*.gw.test` certificate under a fresh CA (written to
    /// `ca_file`), forwarding plain HTTP to `backend` directly.
    fn start(dir: &Path, inbound: SocketAddr, backend: SocketAddr, ca_file: &Path) -> Self {
        let pem = dir.join("gateway.pem");
        write_gateway_certificate(&pem, ca_file);
        let stats = dir.join("haproxy.sock");
        // The gateway's TLS frontend sits behind a Unix socket: only one TCP port to find.
        let tls = dir.join("gateway-tls.sock");
        // `free_port` can race with other tests' listeners: on a lost race, another port.
        for attempt in 1.. {
            let port = free_port();
            let config = format!(
                "global
    stats socket {stats} mode 600 level admin
    maxconn 4096

defaults
    mode tcp
    timeout connect 30s
    timeout client 300s
    timeout server 300s
    timeout tunnel 1h

frontend gateway
    bind 127.0.0.1:{port}
    tcp-request inspect-delay 5s
    tcp-request content accept if {{ req_ssl_hello_type 1 }}
    use_backend {PASSTHROUGH} if {{ req_ssl_sni -i {B}-443s.{BASE} }}
    use_backend {PASSTHROUGH} if {{ req_ssl_sni -i {STRANGER}-443s.{BASE} }}
    use_backend to_gateway_tls if {{ req_ssl_sni -i {B}-8080.{BASE} }}

backend {PASSTHROUGH}
    server b {inbound} maxconn 10000

backend to_gateway_tls
    server tls unix@{tls}

frontend gateway_tls
    mode http
    bind unix@{tls} ssl crt {pem} alpn h2,http/1.1
    http-request set-header x-gateway terminated-by-haproxy
    default_backend app_b

backend app_b
    mode http
    server app {backend}
",
                stats = stats.display(),
                tls = tls.display(),
                pem = pem.display(),
            );
            let file = dir.join("haproxy.cfg");
            std::fs::write(&file, config).unwrap();
            let check = Command::new(program("haproxy"))
                .arg("-c")
                .arg("-f")
                .arg(&file)
                .output()
                .unwrap();
            assert!(
                check.status.success(),
                "haproxy -c: {}{}",
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr)
            );
            let mut cmd = Command::new(program("haproxy"));
            cmd.arg("-db").arg("-f").arg(&file);
            let mut haproxy = ChildGuard::spawn("haproxy", cmd, dir).unwrap();
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let mut exited = None;
            wait_until("haproxy to listen", Duration::from_secs(20), || {
                exited = haproxy.exited();
                exited.is_some()
                    || (stats.exists()
                        && tls.exists()
                        && std::net::TcpStream::connect(addr).is_ok())
            });
            match exited {
                None => {
                    return Self {
                        addr,
                        stats,
                        _haproxy: haproxy,
                    }
                }
                Some(_) if attempt < 5 && haproxy.stderr().contains("cannot bind socket") => {}
                Some(status) => panic!("haproxy exited ({status}): {}", haproxy.stderr()),
            }
        }
        unreachable!()
    }

    /// Total sessions HAProxy has sent to the passthrough backend (`stot` of `show stat`).
    fn passthrough_sessions(&self) -> u64 {
        let mut socket = std::os::unix::net::UnixStream::connect(&self.stats).unwrap();
        socket.write_all(b"show stat\n").unwrap();
        let mut csv = String::new();
        socket.read_to_string(&mut csv).unwrap();
        let mut lines = csv.lines();
        let header: Vec<&str> = lines
            .next()
            .and_then(|h| h.strip_prefix("# "))
            .unwrap_or_else(|| panic!("show stat: {csv}"))
            .split(',')
            .collect();
        let column = |name: &str| header.iter().position(|c| *c == name).unwrap();
        let (pxname, svname, stot) = (column("pxname"), column("svname"), column("stot"));
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .find(|row| {
                row.get(pxname) == Some(&PASSTHROUGH) && row.get(svname) == Some(&"BACKEND")
            })
            .and_then(|row| row.get(stot)?.parse().ok())
            .unwrap_or_else(|| panic!("no {PASSTHROUGH} BACKEND row in: {csv}"))
    }
}

/// A test CA and a `*.gw.test` leaf under it: the leaf with its key for HAProxy at `pem`, the
/// CA's certificate at `ca_file`.
fn write_gateway_certificate(pem: &Path, ca_file: &Path) {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "dstack-mesh test gateway CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let mut leaf = CertificateParams::new(vec![format!("*.{BASE}")]).unwrap();
    leaf.distinguished_name
        .push(DnType::CommonName, format!("*.{BASE}"));
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &ca).unwrap();
    std::fs::write(pem, cert.pem() + &ca.pem() + &key.serialize_pem()).unwrap();
    std::fs::write(ca_file, ca.pem()).unwrap();
}

/// One HTTP/1.1 request on a fresh connection to `addr`.
async fn send(addr: SocketAddr, req: Request<ClientBody>) -> Response<Incoming> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender.send_request(req).await.unwrap()
}

fn get(path: &str, headers: &[(&str, &str)]) -> Request<ClientBody> {
    let mut req = Request::get(path).header("host", "app-b.internal");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.body(empty()).unwrap()
}

async fn json(resp: Response<Incoming>) -> serde_json::Value {
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&body)))
}

/// Status and JSON body of one request.
async fn call(addr: SocketAddr, req: Request<ClientBody>) -> (StatusCode, serde_json::Value) {
    let resp = send(addr, req).await;
    (resp.status(), json(resp).await)
}

#[tokio::test]
async fn a_request_crosses_the_gateway_with_the_callers_verified_identity() {
    let mesh = Mesh::start().await;
    let (status, seen) = call(
        mesh.outbound,
        get(
            "/hello?via=gateway",
            &[("x-dstack-target-app", B), ("x-dstack-app-id", STRANGER)],
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{seen}");
    assert_eq!(seen["path"], "/hello?via=gateway");
    assert_eq!(seen["headers"]["x-dstack-app-id"], serde_json::json!([A]));
    assert_eq!(
        seen["headers"]["host"],
        serde_json::json!(["app-b.internal"])
    );
    let names: Vec<&String> = seen["headers"].as_object().unwrap().keys().collect();
    assert!(
        !names.iter().any(|n| n.starts_with("x-dstack-target")),
        "routing headers reached the backend: {names:?}"
    );
    // Passthrough: the gateway's own TLS frontend (which would add x-gateway) was not used.
    assert!(seen["headers"].get("x-gateway").is_none(), "{seen}");
    assert_eq!(mesh.backend.count(), 1);
}

/// Chunk `i` of the upload: 1 MiB from a xorshift generator seeded by `i`.
fn chunk(i: u64) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15_u64 ^ (i + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let mut out = Vec::with_capacity(1 << 20);
    while out.len() < 1 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mib_streamed_upload_arrives_intact() {
    const CHUNKS: u64 = 100;
    let mesh = Mesh::start().await;
    let (tx, body) = e2e::client::channel();
    let producer = tokio::spawn(async move {
        let mut digest = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        for i in 0..CHUNKS {
            let chunk = chunk(i);
            digest.update(&chunk);
            tx.send(Bytes::from(chunk)).await.unwrap();
        }
        hex(digest.finish().as_ref())
    });
    // No content-length: the app sends it chunked, as a stream of unknown length.
    let req = Request::post("/upload")
        .header("host", "app-b.internal")
        .header("x-dstack-target-app", B)
        .body(body)
        .unwrap();
    let (status, seen) = call(mesh.outbound, req).await;
    let sent = producer.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{seen}");
    assert_eq!(seen["received"], CHUNKS << 20, "{seen}");
    assert_eq!(seen["sha256"], sent, "{seen}");
}

#[tokio::test]
async fn a_websocket_is_spliced_through_the_gateway() {
    let mesh = Mesh::start().await;
    let mut tcp = e2e::client::websocket_via(mesh.outbound, B).await;
    for message in [&b"ping through the gateway"[..], b"and a second frame"] {
        assert_eq!(e2e::client::echo(&mut tcp, message).await, message);
    }
    assert_eq!(mesh.backend.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_one_h2_connection_through_the_gateway() {
    const REQUESTS: usize = 64;
    let mesh = Mesh::start().await;
    // A cold pool: the burst of first requests must not open a connection each.
    let before = mesh.gateway.passthrough_sessions();
    assert_eq!(before, 0, "no connection through the gateway yet");

    let mut requests = tokio::task::JoinSet::new();
    for i in 0..REQUESTS {
        let outbound = mesh.outbound;
        requests.spawn(async move {
            let path = format!("/concurrent/{i}");
            call(outbound, get(&path, &[("x-dstack-target-app", B)])).await
        });
    }
    while let Some(done) = requests.join_next().await {
        let (status, seen) = done.unwrap();
        assert_eq!(status, StatusCode::OK, "{seen}");
        assert_eq!(seen["headers"]["x-dstack-app-id"], serde_json::json!([A]));
    }
    assert_eq!(mesh.backend.count(), REQUESTS);
    // 64 app connections, 64 concurrent requests: over h2 they ride the pooled connection;
    // over HTTP/1.1 each would need a connection of its own. Each worker thread keeps its own
    // pool (the per-core runtime), so one connection per worker that took app connections.
    let after = mesh.gateway.passthrough_sessions();
    let accepted = e2e::client::accepted_per_thread(mesh.a_admin, "outbound").await;
    let workers = accepted.len() as u64;
    assert!(workers >= 1, "{accepted:?}");
    assert!(
        after - before <= workers,
        "{REQUESTS} concurrent requests on {workers} workers opened {} connections through the gateway",
        after - before
    );
}

#[tokio::test]
async fn wrong_peers_and_refused_callers_are_502s_and_the_backend_sees_nothing() {
    let mut mesh = Mesh::start().await;
    // The route itself works.
    let (status, seen) = call(mesh.outbound, get("/", &[("x-dstack-target-app", B)])).await;
    assert_eq!(status, StatusCode::OK, "{seen}");
    let served = mesh.backend.count();

    // The gateway sends STRANGER's name to B: A's handshake refuses B.
    let (status, body) = call(
        mesh.outbound,
        get("/secret", &[("x-dstack-target-app", STRANGER)]),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(body["error"], "peer identity mismatch", "{body}");

    // C is under the same root but not on B's allowlist: B refuses C. With TLS 1.3, C learns
    // that only from B's alert after its own handshake ended; when C's first write races the
    // gateway closing the connection, the alert is lost (TLS 1.3 through a TCP proxy) and the
    // proxy can only say that the peer closed a new connection after the handshake. Each
    // attempt must be a 502 that reaches nothing; the refusal must be recognised at least once.
    let c_outbound = mesh.another_app(C, "c");
    let mut refused = Vec::new();
    for _ in 0..5 {
        let (status, body) = call(c_outbound, get("/secret", &[("x-dstack-target-app", B)])).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
        match body["error"].as_str() {
            Some("peer refused this app") => {
                assert!(
                    body["detail"].as_str().unwrap().contains("allowlist"),
                    "{body}"
                );
                refused.push(body);
                break;
            }
            Some("peer failed") => {
                assert!(
                    body["detail"]
                        .as_str()
                        .unwrap()
                        .contains("closed a new connection after the handshake"),
                    "{body}"
                );
                refused.push(body)
            }
            _ => panic!("{body}"),
        }
    }
    assert_eq!(
        refused.last().unwrap()["error"],
        "peer refused this app",
        "{refused:?}"
    );
    assert_eq!(mesh.backend.count(), served);
}

#[tokio::test]
async fn use_tls_false_goes_through_the_gateways_own_verified_tls() {
    let mesh = Mesh::start().await;
    let gateway_tls = [
        ("x-dstack-target-app", B),
        ("x-dstack-target-port", "8080"),
        ("x-dstack-target-use-tls", "false"),
    ];
    let (status, seen) = call(mesh.outbound, get("/plain", &gateway_tls)).await;
    assert_eq!(status, StatusCode::OK, "{seen}");
    assert_eq!(seen["path"], "/plain");
    // HAProxy's TLS frontend served it, straight to the backend: no sidecar named the caller.
    assert_eq!(
        seen["headers"]["x-gateway"],
        serde_json::json!(["terminated-by-haproxy"])
    );
    assert!(seen["headers"].get("x-dstack-app-id").is_none(), "{seen}");
    let names: Vec<&String> = seen["headers"].as_object().unwrap().keys().collect();
    assert!(
        !names.iter().any(|n| n.starts_with("x-dstack-target")),
        "routing headers reached the backend: {names:?}"
    );
    assert_eq!(mesh.backend.count(), 1);

    // The gateway's certificate is verified: a sidecar without the test CA refuses it.
    let (_sidecar, untrusting, _) = sidecar(
        mesh.dir.path(),
        "sidecar-a-public-roots",
        &mesh.a_agent,
        mesh.gateway.addr,
        None,
    );
    let (status, body) = call(untrusting, get("/plain", &gateway_tls)).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("not issued by a trusted root"),
        "{body}"
    );
    assert_eq!(mesh.backend.count(), 1);
}

#[tokio::test]
async fn a_gateway_that_is_down_is_a_502_and_the_proxy_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_agent, socket) = dev_agent(d, "agent-a", A, &d.join("state"));
    // A port bound but not listening: connections are refused, and no other test can take it.
    let reserved = tokio::net::TcpSocket::new_v4().unwrap();
    reserved.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let closed = reserved.local_addr().unwrap();
    let (mut sidecar, outbound, _) = sidecar(d, "sidecar-a", &socket, closed, None);

    for _ in 0..2 {
        let (status, body) = call(outbound, get("/", &[("x-dstack-target-app", B)])).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
        assert_eq!(body["error"], "peer unreachable", "{body}");
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .contains(&closed.to_string()),
            "{body}"
        );
    }
    let (status, info) = call(outbound, get("/info", &[])).await;
    assert_eq!(status, StatusCode::OK, "{info}");
    assert_eq!(info["app_id"], A);
    sidecar.assert_running();
}
