//! dstack-vpc's deployment, for real: Debian's nginx terminates mTLS with a configuration from
//! `dstack-mesh nginx-config server` and asks a `dstack-mesh run` process (auth_request) who may
//! pass. The same callers then go to dstack-mesh's own inbound listener.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::{path::Path, process::Command, time::Duration};

use bytes::Bytes;
use e2e::{
    backend::Backend, client::MeshClient, dev_agent, free_port, identity, listener, program,
    run_mesh, wait_until, ChildGuard,
};
use http::StatusCode;
use http_body_util::BodyExt;
use ratls::{agent::AgentAddress, AppId};

/// What the rendered nginx configuration proves itself with to the auth service.
const NGINX_SECRET: &str = "nginx-secret-for-the-test-0123456789abcdef";
const SERVER: &str = "5e125e125e125e125e125e125e125e125e125e12";
const CALLER: &str = "ca11e2ca11e2ca11e2ca11e2ca11e2ca11e2ca11";
const STRANGER: &str = "57a2e257a2e257a2e257a2e257a2e257a2e257a2";

fn id(s: &str) -> AppId {
    s.parse().unwrap()
}

fn start_nginx(dir: &Path, server_conf: &str) -> ChildGuard {
    std::fs::write(dir.join("server.conf"), server_conf).unwrap();
    let main = format!(
        "worker_processes 1;\nerror_log {d}/nginx-error.log info;\npid {d}/nginx.pid;\nevents {{ worker_connections 1024; }}\nhttp {{\n    log_format connections '$connection $connection_requests $server_protocol $status $request_uri';\n    access_log {d}/access.log connections;\n    client_body_temp_path {d}/body;\n    proxy_temp_path {d}/proxy;\n    fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n    include {d}/server.conf;\n}}\n",
        d = dir.display()
    );
    std::fs::write(dir.join("nginx.conf"), main).unwrap();
    let test = Command::new(program("nginx"))
        .arg("-t")
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .output()
        .unwrap();
    assert!(
        test.status.success(),
        "nginx -t: {}",
        String::from_utf8_lossy(&test.stderr)
    );
    let mut cmd = Command::new(program("nginx"));
    cmd.arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .args(["-g", "daemon off;"]);
    ChildGuard::spawn("nginx", cmd, dir).unwrap()
}

/// The server side of dstack-vpc's deployment: SERVER's development agent, a backend, a
/// `dstack-mesh run` sidecar (auth service, inbound listener, outbound proxy) and nginx in
/// front, configured by `dstack-mesh nginx-config server`.
struct Site {
    dir: tempfile::TempDir,
    state: std::path::PathBuf,
    backend: Backend,
    /// dstack-mesh's own inbound listener.
    inbound: std::net::SocketAddr,
    /// nginx's mTLS listener.
    nginx_addr: std::net::SocketAddr,
    _processes: Vec<ChildGuard>,
}

impl Site {
    async fn start() -> Self {
        Self::start_with(false).await
    }

    /// With `http1_only`, nginx listens as dstack-vpc's template does (no `http2`).
    async fn start_with(http1_only: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let state = d.join("state");
        let (server_agent, server_sock) = dev_agent(d, "server-agent", SERVER, &state);
        let backend = Backend::start().await;
        e2e::write_nginx_identity(AgentAddress::Unix(server_sock.clone()), d).await;

        // The sidecar: auth service and inbound listener, on the dev agent's identity.
        let config = d.join("dstack-mesh.toml");
        std::fs::write(
            &config,
            format!(
                "[agent]\naddress = \"unix:{sock}\"\n\n[inbound]\nlisten = \"127.0.0.1:0\"\nbackend = \"{backend}\"\nallowed_apps = \"{CALLER}\"\n\n[auth]\naddress = \"127.0.0.1\"\nport = 0\nnginx_secret = \"{NGINX_SECRET}\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n[client]\naddress = \"127.0.0.1\"\nport = 0\n\n[tls]\ncert_file = \"{d}/server.crt\"\nkey_file = \"{d}/server.key\"\nca_file = \"{d}/ca.crt\"\n",
                sock = server_sock.display(),
                backend = backend.addr,
                d = d.display(),
            ),
        )
        .unwrap();
        let (mesh, bound) = run_mesh(d, "dstack-mesh", &config);
        let (inbound, auth) = (listener(&bound, "inbound"), listener(&bound, "auth"));

        // nginx, configured by `dstack-mesh nginx-config server`, pointed at that auth service.
        let auth_config = d.join("nginx-side.toml");
        std::fs::write(
            &auth_config,
            std::fs::read_to_string(&config).unwrap().replace(
                "[auth]\naddress = \"127.0.0.1\"\nport = 0",
                &format!("[auth]\naddress = \"127.0.0.1\"\nport = {}", auth.port()),
            ),
        )
        .unwrap();
        let (nginx, nginx_addr) = rendered_nginx(d, &auth_config, http1_only, |conf| {
            assert!(conf.contains("nginx-secret"), "{conf}");
        });
        Self {
            dir,
            state,
            backend,
            inbound,
            nginx_addr,
            _processes: vec![server_agent, mesh, nginx],
        }
    }
}

/// nginx with the configuration `dstack-mesh nginx-config server --config <config>` renders
/// (`http1_only`: without `http2`, as dstack-vpc's template listens), after `check` has looked
/// at it; on a free port, another one if a race with other tests' listeners is lost.
fn rendered_nginx(
    d: &Path,
    config: &Path,
    http1_only: bool,
    check: impl Fn(&str),
) -> (ChildGuard, std::net::SocketAddr) {
    (1..=5)
        .find_map(|attempt| {
            let nginx_port = free_port();
            let rendered = Command::new(e2e::mesh_binary())
                .args([
                    "nginx-config",
                    "server",
                    "--port",
                    &nginx_port.to_string(),
                    "--config",
                ])
                .arg(config)
                .env_remove("DSTACK_MESH_NGINX_SECRET")
                .output()
                .unwrap();
            assert!(
                rendered.status.success(),
                "{}",
                String::from_utf8_lossy(&rendered.stderr)
            );
            let mut conf = String::from_utf8(rendered.stdout).unwrap();
            check(&conf);
            if http1_only {
                assert!(conf.contains(" ssl http2;"), "{conf}");
                conf = conf.replace(" ssl http2;", " ssl;");
            }
            let mut nginx = start_nginx(d, &conf);
            let nginx_addr: std::net::SocketAddr =
                format!("127.0.0.1:{nginx_port}").parse().unwrap();
            let mut exited = None;
            wait_until("nginx to listen", Duration::from_secs(20), || {
                exited = nginx.exited();
                exited.is_some() || std::net::TcpStream::connect(nginx_addr).is_ok()
            });
            match exited {
                None => Some((nginx, nginx_addr)),
                Some(_) if attempt < 5 && nginx.stderr().contains("Address already in use") => None,
                Some(status) => panic!("nginx exited ({status}): {}", nginx.stderr()),
            }
        })
        .unwrap()
}

/// CALLER's sidecar (`dstack-mesh run`, outbound only) whose gateway is `gateway`; its agent,
/// itself, and its outbound proxy's address.
fn caller_sidecar(
    d: &Path,
    state: &Path,
    gateway: std::net::SocketAddr,
) -> (Vec<ChildGuard>, std::net::SocketAddr) {
    let (agent, caller_sock) = dev_agent(d, "caller-agent", CALLER, state);
    let config = d.join("caller.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\naddress = \"unix:{sock}\"\n\n[inbound]\nenabled = false\n\n[auth]\nenabled = false\n\n[admin]\nlisten = \"127.0.0.1:0\"\n[client]\naddress = \"127.0.0.1\"\nport = 0\n\n[dstack]\ngateway_domain = \"fixed/{gateway}\"\n",
            sock = caller_sock.display(),
        ),
    )
    .unwrap();
    let (caller, bound) = run_mesh(d, "caller-sidecar", &config);
    (vec![agent, caller], listener(&bound, "outbound"))
}

#[tokio::test]
async fn nginx_with_our_auth_service_and_our_own_listener_agree() {
    let site = Site::start().await;
    let (d, backend) = (site.dir.path(), &site.backend);
    let (caller, _a) = identity(d, &site.state, CALLER).await;
    let (stranger, _b) = identity(d, &site.state, STRANGER).await;
    let (inbound, nginx_addr) = (site.inbound, site.nginx_addr);

    for (front, addr) in [("nginx", nginx_addr), ("dstack-mesh", inbound)] {
        // The allowed app gets through, named by its verified id, whatever it claims.
        let mut client = MeshClient::connect(&caller, &id(SERVER), addr, Some(&[b"http/1.1"]))
            .await
            .unwrap_or_else(|e| panic!("{front}: {e}"));
        let (status, _, body) = client
            .get(
                "/hello",
                &[("x-dstack-app-id", STRANGER), ("host", "mesh.test")],
            )
            .await
            .unwrap();
        assert_eq!(
            status,
            StatusCode::OK,
            "{front}: {}",
            String::from_utf8_lossy(&body)
        );
        let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            seen["headers"]["x-dstack-app-id"],
            serde_json::json!([CALLER]),
            "{front}"
        );
        let (status, _, body) = client
            .get("/health", &[("host", "mesh.test")])
            .await
            .unwrap();
        assert_eq!(
            (status, body),
            (StatusCode::OK, Bytes::from_static(b"healthy\n")),
            "{front}"
        );
    }
    let served = backend.count();
    assert_eq!(served, 2);

    // A disallowed app: nginx answers 403 (from our auth service); our listener refuses it in
    // the handshake. Either way the backend sees nothing.
    let status =
        match MeshClient::connect(&stranger, &id(SERVER), nginx_addr, Some(&[b"http/1.1"])).await {
            Ok(mut c) => c.get("/secret", &[("host", "mesh.test")]).await.unwrap().0,
            Err(e) => panic!("nginx should complete the handshake and answer 403: {e}"),
        };
    assert_eq!(status, StatusCode::FORBIDDEN);
    let refused =
        match MeshClient::connect(&stranger, &id(SERVER), inbound, Some(&[b"http/1.1"])).await {
            Ok(mut c) => c.get("/secret", &[("host", "mesh.test")]).await.is_err(),
            Err(_) => true,
        };
    assert!(refused, "dstack-mesh answered a disallowed app");

    // No client certificate: 401 from nginx + auth service, a refused handshake from us.
    let status = no_cert_get(nginx_addr).await;
    assert_eq!(status.as_deref(), Some("401"));
    assert_eq!(no_cert_get(inbound).await, None);
    assert_eq!(backend.count(), served);
}

/// GET / with TLS but no client certificate; the status code, if an HTTP answer came.
async fn no_cert_get(addr: std::net::SocketAddr) -> Option<String> {
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    #[derive(Debug)]
    struct AnyServer;
    impl rustls::client::danger::ServerCertVerifier for AnyServer {
        fn verify_server_cert(
            &self,
            _: &rustls_pki_types::CertificateDer<'_>,
            _: &[rustls_pki_types::CertificateDer<'_>],
            _: &rustls_pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls_pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &rustls_pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &rustls_pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            ratls::crypto::provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
    // Test-only: this client checks nothing about the server; it only probes what an
    // anonymous caller gets.
    let config = rustls::ClientConfig::builder_with_provider(ratls::crypto::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer))
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("mesh.test").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .ok()?;
    tls.write_all(b"GET /secret HTTP/1.1\r\nhost: mesh.test\r\nconnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    text.strip_prefix("HTTP/1.1 ")
        .map(|rest| rest[..3].to_owned())
}

/// dstack-mesh's outbound proxy as nginx's client: the app's plain HTTP/1.1 goes out as mTLS
/// with the sidecar's identity, nginx asks the auth service, and the backend learns who called.
#[tokio::test]
async fn our_outbound_proxy_calls_through_nginx_over_h2_and_reuses_its_connection() {
    outbound_through_nginx(false).await;
}

#[tokio::test]
async fn our_outbound_proxy_calls_through_an_http1_nginx_and_keeps_it_alive() {
    outbound_through_nginx(true).await;
}

async fn outbound_through_nginx(http1_only: bool) {
    let site = Site::start_with(http1_only).await;
    let d = site.dir.path();
    let (_caller, outbound) = caller_sidecar(d, &site.state, site.nginx_addr);

    // Two requests in a row on one keep-alive connection from the app.
    let tcp = tokio::net::TcpStream::connect(outbound).await.unwrap();
    let (mut app, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    for path in ["/first", "/second"] {
        let req = http::Request::get(path)
            .header("host", "server.internal")
            .header("x-dstack-target-app", SERVER)
            .header("x-dstack-app-id", STRANGER)
            .body(e2e::client::empty())
            .unwrap();
        let resp = app.send_request(req).await.unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_11);
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            status,
            StatusCode::OK,
            "{path}: {}\n{}",
            String::from_utf8_lossy(&body),
            std::fs::read_to_string(d.join("nginx-error.log"))
                .unwrap_or_default()
                .lines()
                .filter(|l| !l.contains("[notice]"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(seen["path"], path);
        assert_eq!(
            seen["headers"]["x-dstack-app-id"],
            serde_json::json!([CALLER])
        );
        let names: Vec<&String> = seen["headers"].as_object().unwrap().keys().collect();
        assert!(
            !names.iter().any(|n| n.starts_with("x-dstack-target")),
            "routing headers reached the backend: {names:?}"
        );
    }
    assert_eq!(site.backend.count(), 2);

    // nginx logged both with one connection serial number ($connection): the sidecar reused
    // its pooled connection.
    let log = d.join("access.log");
    let mut lines = Vec::new();
    wait_until(
        "nginx to log both requests",
        Duration::from_secs(10),
        || {
            lines = std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .map(|l| l.split(' ').map(str::to_owned).collect::<Vec<_>>())
                .collect();
            lines.len() >= 2
        },
    );
    assert_eq!(lines.len(), 2, "{lines:?}");
    let (first, second) = (&lines[0], &lines[1]);
    assert_eq!(
        (&first[3][..], &first[4][..]),
        ("200", "/first"),
        "{lines:?}"
    );
    assert_eq!(
        (&second[3][..], &second[4][..]),
        ("200", "/second"),
        "{lines:?}"
    );
    assert_eq!(first[0], second[0], "two connections: {lines:?}");
    let protocol = if http1_only { "HTTP/1.1" } else { "HTTP/2.0" };
    assert_eq!(
        (&first[2][..], &second[2][..]),
        (protocol, protocol),
        "{lines:?}"
    );
}

/// The file dstack-vpc's `mesh-serve.sh` writes, as it writes it; the test changes only the
/// ports (0: tests share the machine) and the certificate paths (its temporary directory).
const DSTACK_VPC_CONFIG: &str = r#"[client]
enabled = true
address = "0.0.0.0"
port = 8091

[auth]
enabled = true
address = "0.0.0.0"
port = 8092

[dstack]
gateway_domain = "${DSTACK_GATEWAY_DOMAIN}"

[tls]
cert_file = "/etc/ssl/certs/server.crt"
key_file = "/etc/ssl/private/server.key"
ca_file = "/etc/ssl/certs/ca.crt"
"#;

/// dstack-vpc's image with our binary in place of its own: supervisord's command line
/// (`dstack-mesh --config FILE`, no subcommand), the file its script writes, the certificates
/// it takes from the agent, and nginx on the port in front with its template (auth on
/// loopback, no secret). Its client proxy and another app's sidecar both call through that
/// nginx, and callers in no allowlist are admitted, as dstack-vpc admitted them.
#[tokio::test]
async fn dstack_vpc_image_with_our_binary_serves_its_nginx_and_client_proxy_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let state = d.join("state");
    let (_server_agent, server_sock) = dev_agent(d, "server-agent", SERVER, &state);
    let backend = Backend::start().await;
    e2e::write_nginx_identity(AgentAddress::Unix(server_sock.clone()), d).await;

    // nginx first, as dstack-vpc's template sets it up: mTLS with the agent's files, HTTP/1.1,
    // auth_request to 127.0.0.1 on the auth port, and no secret. The file's gateway is this
    // nginx (the app's own instances reach each other through the gateway).
    let auth_port = free_port();
    let side = d.join("nginx-side.toml");
    std::fs::write(
        &side,
        format!(
            "[auth]\naddress = \"127.0.0.1\"\nport = {auth_port}\n[inbound]\nbackend = \"{}\"\n[tls]\ncert_file = \"{d}/server.crt\"\nkey_file = \"{d}/server.key\"\nca_file = \"{d}/ca.crt\"\n",
            backend.addr,
            d = d.display()
        ),
    )
    .unwrap();
    let (_nginx, nginx_addr) = rendered_nginx(d, &side, true, |conf| {
        assert!(!conf.contains("nginx-secret"), "{conf}");
    });

    let config = d.join("dstack-mesh.toml");
    std::fs::write(
        &config,
        DSTACK_VPC_CONFIG
            .replace("port = 8091", "port = 0")
            .replace("port = 8092", &format!("port = {auth_port}"))
            .replace("${DSTACK_GATEWAY_DOMAIN}", &format!("fixed/{nginx_addr}"))
            .replace("/etc/ssl/certs/", &format!("{}/", d.display()))
            .replace("/etc/ssl/private/", &format!("{}/", d.display())),
    )
    .unwrap();
    let mut cmd = Command::new(e2e::mesh_binary());
    cmd.args(["--log-format", "json", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        // What the container would have at /var/run/dstack.sock and on loopback only.
        .env(
            "DSTACK_AGENT_ADDRESS",
            format!("unix:{}", server_sock.display()),
        )
        .env("DSTACK_MESH_ADMIN_LISTEN", "127.0.0.1:0")
        .env_remove("VPC_ALLOWED_APPS")
        .env_remove("DSTACK_MESH_ALLOWED_APPS")
        .env_remove("DSTACK_MESH_NGINX_SECRET");
    let (mesh, bound) = e2e::start_mesh(d, "dstack-vpc-mesh", cmd);
    let names: Vec<&str> = bound.iter().map(|(w, _)| w.as_str()).collect();
    assert!(
        !names.contains(&"inbound"),
        "nginx holds the port: no inbound listener unless configured ({names:?})"
    );
    let (auth, outbound) = (listener(&bound, "auth"), listener(&bound, "outbound"));
    assert!(auth.ip().is_unspecified() && outbound.ip().is_unspecified());
    // Each default is said once, at start.
    let log = mesh.stderr();
    let notes: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("dstack-vpc default"))
        .collect();
    assert_eq!(notes.len(), 3, "{log}");

    // 1. The image's own client proxy (dstack-vpc's [client] on 8091): out through nginx to
    //    another instance of the app, which nginx's auth_request admits.
    // 2. Another app's dstack-mesh sidecar, in no allowlist, through the same nginx.
    let (_caller, caller_outbound) = caller_sidecar(d, &state, nginx_addr);
    let own_outbound = std::net::SocketAddr::new([127, 0, 0, 1].into(), outbound.port());
    for (proxy, expected) in [(own_outbound, SERVER), (caller_outbound, CALLER)] {
        let (status, body) = e2e::client::http1_get(
            proxy,
            "/via-dstack-vpc",
            &[("host", "server.internal"), ("x-dstack-target-app", SERVER)],
        )
        .await;
        assert_eq!(
            status,
            StatusCode::OK,
            "{expected}: {}\n{}",
            String::from_utf8_lossy(&body),
            mesh.stderr()
        );
        let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            seen["headers"]["x-dstack-app-id"],
            serde_json::json!([expected])
        );
    }
    assert_eq!(backend.count(), 2);
    // dstack-vpc's image health-checks its client proxy: `wget http://localhost:8091/health`.
    let (status, body) = e2e::client::http1_get(own_outbound, "/health", &[]).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"healthy\n"[..]));

    // Still no admission without a client certificate.
    assert_eq!(no_cert_get(nginx_addr).await.as_deref(), Some("401"));
    assert_eq!(backend.count(), 2);
}
