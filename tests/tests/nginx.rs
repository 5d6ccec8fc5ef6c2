//! dstack-vpc's deployment, for real: Debian's nginx terminates mTLS with a configuration from
//! `dstack-mesh nginx-config server` and asks a `dstack-mesh run` process (auth_request) who may
//! pass. The same callers then go to dstack-mesh's own inbound listener.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::{path::Path, process::Command, time::Duration};

use bytes::Bytes;
use e2e::{
    backend::Backend, client::MeshClient, dev_agent, free_port, identity, program, run_mesh,
    wait_until, ChildGuard,
};
use http::StatusCode;
use ratls::{agent::AgentAddress, AppId};

const SERVER: &str = "5e125e125e125e125e125e125e125e125e125e12";
const CALLER: &str = "ca11e2ca11e2ca11e2ca11e2ca11e2ca11e2ca11";
const STRANGER: &str = "57a2e257a2e257a2e257a2e257a2e257a2e257a2";

fn id(s: &str) -> AppId {
    s.parse().unwrap()
}

fn start_nginx(dir: &Path, server_conf: &str) -> ChildGuard {
    std::fs::write(dir.join("server.conf"), server_conf).unwrap();
    let main = format!(
        "worker_processes 1;\nerror_log {d}/nginx-error.log info;\npid {d}/nginx.pid;\nevents {{ worker_connections 1024; }}\nhttp {{\n    access_log off;\n    client_body_temp_path {d}/body;\n    proxy_temp_path {d}/proxy;\n    fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n    include {d}/server.conf;\n}}\n",
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

#[tokio::test]
async fn nginx_with_our_auth_service_and_our_own_listener_agree() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let state = d.join("state");
    let (_server_agent, server_sock) = dev_agent(d, "server-agent", SERVER, &state);
    let (caller, _a) = identity(d, &state, CALLER).await;
    let (stranger, _b) = identity(d, &state, STRANGER).await;
    let backend = Backend::start().await;
    e2e::write_nginx_identity(AgentAddress::Unix(server_sock.clone()), d).await;

    // The sidecar: auth service and inbound listener, on the dev agent's identity.
    let config = d.join("dstack-mesh.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\naddress = \"unix:{sock}\"\n\n[inbound]\nlisten = \"127.0.0.1:0\"\nbackend = \"{backend}\"\nallowed_apps = \"{CALLER}\"\n\n[auth]\naddress = \"127.0.0.1\"\nport = 0\n\n[client]\naddress = \"127.0.0.1\"\nport = 0\n\n[tls]\ncert_file = \"{d}/server.crt\"\nkey_file = \"{d}/server.key\"\nca_file = \"{d}/ca.crt\"\n",
            sock = server_sock.display(),
            backend = backend.addr,
            d = d.display(),
        ),
    )
    .unwrap();
    let (_mesh, bound) = run_mesh(d, "dstack-mesh", &config);
    let addr_of = |what: &str| {
        bound
            .iter()
            .find(|(w, _)| w == what)
            .map(|(_, a)| *a)
            .unwrap()
    };
    let (inbound, auth) = (addr_of("inbound"), addr_of("auth"));

    // nginx, configured by `dstack-mesh nginx-config server`, pointed at that auth service.
    let nginx_port = free_port();
    let auth_config = d.join("nginx-side.toml");
    std::fs::write(
        &auth_config,
        std::fs::read_to_string(&config).unwrap().replace(
            "address = \"127.0.0.1\"\nport = 0",
            &format!("address = \"127.0.0.1\"\nport = {}", auth.port()),
        ),
    )
    .unwrap();
    let rendered = Command::new(e2e::mesh_binary())
        .args([
            "nginx-config",
            "server",
            "--port",
            &nginx_port.to_string(),
            "--config",
        ])
        .arg(&auth_config)
        .output()
        .unwrap();
    assert!(
        rendered.status.success(),
        "{}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    let mut nginx = start_nginx(d, &String::from_utf8(rendered.stdout).unwrap());
    let nginx_addr: std::net::SocketAddr = format!("127.0.0.1:{nginx_port}").parse().unwrap();
    wait_until("nginx to listen", Duration::from_secs(20), || {
        nginx.assert_running();
        std::net::TcpStream::connect(nginx_addr).is_ok()
    });

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
