//! The inbound listener, in-process, with development-agent identities and a real backend.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::{collections::HashMap, sync::Arc, time::Duration};

use bytes::Bytes;
use dstack_mesh::{app::App, config::Config};
use e2e::{
    backend::Backend,
    client::{channel, empty, tls_connect, MeshClient},
    identity, mint_under_app_ca,
};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use ratls::{identity::RotatingIdentity, AppId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SERVER: &str = "5e77e75e77e75e77e75e77e75e77e75e77e75e77";
const CALLER: &str = "ca11e7ca11e7ca11e7ca11e7ca11e7ca11e7ca11";
const STRANGER: &str = "57a7e957a7e957a7e957a7e957a7e957a7e957a7";

fn id(s: &str) -> AppId {
    s.parse().unwrap()
}

struct Mesh {
    app: App,
    backend: Backend,
    caller: RotatingIdentity,
    stranger: RotatingIdentity,
    dir: tempfile::TempDir,
    _agents: Vec<tokio::task::JoinHandle<()>>,
}

impl Mesh {
    async fn start() -> Self {
        Self::start_with("").await
    }

    async fn start_with(extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let (server, a1) = identity(dir.path(), &state, SERVER).await;
        let (caller, a2) = identity(dir.path(), &state, CALLER).await;
        let (stranger, a3) = identity(dir.path(), &state, STRANGER).await;
        let backend = Backend::start().await;
        let text = format!(
            "[inbound]\nlisten = \"127.0.0.1:0\"\nbackend = \"{}\"\nallowed_apps = \"{CALLER}\"\n{extra}\n[auth]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[client]\nenabled = false\n",
            backend.addr
        );
        let config = Config::from_toml(&text, &HashMap::<&str, &str>::new()).unwrap();
        let app = App::start_with(config, server).await.unwrap();
        Self {
            app,
            backend,
            caller,
            stranger,
            dir,
            _agents: vec![a1, a2, a3],
        }
    }

    fn addr(&self) -> std::net::SocketAddr {
        self.app.addr("inbound").unwrap()
    }

    async fn client(&self, alpn: Option<&[&[u8]]>) -> MeshClient {
        MeshClient::connect(&self.caller, &id(SERVER), self.addr(), alpn)
            .await
            .unwrap()
    }
}

fn json(body: &Bytes) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)))
}

#[tokio::test]
async fn an_allowed_caller_reaches_the_backend_with_its_identity_only() {
    let mesh = Mesh::start().await;
    let mut client = mesh.client(Some(&[b"http/1.1"])).await;
    assert!(!client.is_h2());
    let (status, _, body) = client
        .get(
            "/hello?x=1",
            &[
                ("x-dstack-app-id", STRANGER),
                ("x-dstack-instance-id", "forged"),
                ("x-forwarded-for", "6.6.6.6"),
                ("x_dstack_app_id", STRANGER),
                ("forwarded", "for=6.6.6.6;host=evil.example"),
                ("x-forwarded-host", "evil.example"),
                ("connection", "x-secret"),
                ("x-secret", "hop"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let seen = json(&body);
    assert_eq!(seen["path"], "/hello?x=1");
    let headers = &seen["headers"];
    assert_eq!(headers["x-dstack-app-id"], serde_json::json!([CALLER]));
    let instance = mesh.caller.current().instance_id.clone().unwrap();
    assert_eq!(
        headers["x-dstack-instance-id"],
        serde_json::json!([instance])
    );
    assert_eq!(headers["x-forwarded-for"], serde_json::json!(["127.0.0.1"]));
    assert_eq!(headers["x-forwarded-proto"], serde_json::json!(["https"]));
    assert!(headers.get("x-secret").is_none(), "{headers}");
    for forged in ["x_dstack_app_id", "forwarded", "x-forwarded-host"] {
        assert!(
            headers.get(forged).is_none(),
            "{forged} reached the backend: {headers}"
        );
    }
}

#[tokio::test]
async fn h2_multiplexes_requests_on_one_connection() {
    let mesh = Mesh::start().await;
    let client = mesh.client(None).await;
    assert!(client.is_h2());
    let MeshClient::H2(send) = client else {
        unreachable!()
    };
    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut send = send.clone();
        tasks.push(tokio::spawn(async move {
            let req = Request::get(format!("https://mesh.test/r{i}"))
                .body(empty())
                .unwrap();
            let resp = send.send_request(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(
                json(&body)["headers"]["x-dstack-app-id"],
                serde_json::json!([CALLER])
            );
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(mesh.backend.count(), 20);
}

#[tokio::test]
async fn health_is_answered_without_the_backend() {
    let mesh = Mesh::start().await;
    let mut client = mesh.client(None).await;
    let (status, _, body) = client.get("/health", &[]).await.unwrap();
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"healthy\n"[..]));
    assert_eq!(mesh.backend.count(), 0);
}

#[tokio::test]
async fn a_down_backend_is_a_502_and_the_listener_stays_up() {
    let mut mesh = Mesh::start().await;
    let backend_addr = mesh.backend.addr;
    drop(std::mem::replace(&mut mesh.backend, Backend::start().await));
    // The replacement listens elsewhere; the configured address is now closed.
    let mut client = mesh.client(None).await;
    let (status, headers, body) = client.get("/x", &[]).await.unwrap();
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(
        json(&body),
        serde_json::json!({"error": "backend unavailable"})
    );
    // Health still answers, and once the backend is back, requests flow again.
    assert_eq!(client.get("/health", &[]).await.unwrap().0, StatusCode::OK);
    let _back = Backend::start_on(backend_addr).await;
    let (status, _, _) = client.get("/x", &[]).await.unwrap();
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn response_bodies_stream() {
    let mesh = Mesh::start().await;
    let mut client = mesh.client(Some(&[b"http/1.1"])).await;
    let resp = client
        .send(Request::get("/stream").body(empty()).unwrap())
        .await
        .unwrap();
    let mut body = resp.into_body();
    // The backend holds its second chunk until we have the first: buffering would hang here.
    let first = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("the first chunk must arrive before the body ends")
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "first\n");
    mesh.backend.release_stream.notify_one();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "second\n");
}

#[tokio::test]
async fn request_bodies_stream() {
    let mesh = Mesh::start().await;
    for alpn in [&[b"http/1.1" as &[u8]][..], &[b"h2"]] {
        let mut client = mesh.client(Some(alpn)).await;
        let (tx, body) = channel();
        let upload = Request::post("https://mesh.test/upload")
            .body(body)
            .unwrap();
        let started = mesh.backend.upload_started.clone();
        let send = tokio::spawn(async move { client.send(upload).await });
        tx.send(Bytes::from(vec![b'a'; 100_000])).await.unwrap();
        // The backend sees the first chunk while the rest is still unsent.
        tokio::time::timeout(Duration::from_secs(10), started.notified())
            .await
            .expect("the first chunk must reach the backend before the body ends");
        tx.send(Bytes::from(vec![b'b'; 50_000])).await.unwrap();
        drop(tx);
        let resp = send.await.unwrap().unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(json(&body)["received"], 150_000);
    }
}

#[tokio::test]
async fn websocket_upgrades_pass_through() {
    let mesh = Mesh::start().await;
    let mut client = mesh.client(Some(&[b"http/1.1"])).await;
    let req = Request::get("/ws")
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .body(empty())
        .unwrap();
    let resp = client.send(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let upgraded = hyper::upgrade::on(resp).await.unwrap();
    let mut io = hyper_util::rt::TokioIo::new(upgraded);
    io.write_all(b"ping over the upgrade").await.unwrap();
    let mut buf = [0u8; 21];
    tokio::time::timeout(Duration::from_secs(10), io.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"ping over the upgrade");
}

/// A caller the listener must refuse: the handshake fails (or the first exchange does, since in
/// TLS 1.3 the client may finish first), and the backend sees nothing.
async fn assert_refused(mesh: &Mesh, identity: &RotatingIdentity) {
    let outcome =
        match MeshClient::connect(identity, &id(SERVER), mesh.addr(), Some(&[b"http/1.1"])).await {
            Err(_) => None,
            Ok(mut client) => client.get("/secret", &[]).await.ok().map(|r| r.0),
        };
    assert_eq!(outcome, None, "the refused caller got an answer");
    assert_eq!(mesh.backend.count(), 0);
}

#[tokio::test]
async fn an_app_not_on_the_allowlist_is_refused() {
    let mesh = Mesh::start().await;
    assert_refused(&mesh, &mesh.stranger).await;
}

#[tokio::test]
async fn a_caller_from_another_root_is_refused_even_with_our_root_name() {
    let mesh = Mesh::start().await;
    // Another state directory: another root, named exactly like ours.
    let other = tempfile::tempdir().unwrap();
    let (foreign, _agent) = identity(other.path(), &other.path().join("state"), CALLER).await;
    let ours = ratls::ChainView::new(&mesh.caller.current().chain).unwrap();
    let theirs = ratls::ChainView::new(&foreign.current().chain).unwrap();
    assert_eq!(ours.chain[2].subject, theirs.chain[2].subject);
    // The foreign caller trusts our root, so only the server's verdict is tested.
    let anchors = mesh.caller.current().trust_anchors().unwrap();
    let policy = Arc::new(ratls::Policy::new(anchors).expect(id(SERVER)));
    let config = ratls::tls::mesh_client_config(foreign.resolver(), policy).unwrap();
    let tcp = tokio::net::TcpStream::connect(mesh.addr()).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("mesh.test").unwrap();
    if let Ok(tls) = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
    {
        let (mut send, conn) = hyper::client::conn::http1::handshake::<_, e2e::client::ClientBody>(
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let sent = send
            .send_request(Request::get("/").body(empty()).unwrap())
            .await;
        assert!(sent.is_err(), "a foreign caller got an answer");
    }
    assert_eq!(mesh.backend.count(), 0);
}

/// A caller from another cluster (another root) under `[[inbound.federation]]` trusting that
/// root for `vouches_for`.
async fn federated(vouches_for: &str) -> (Mesh, RotatingIdentity, tempfile::TempDir) {
    let other = tempfile::tempdir().unwrap();
    let (foreign, _agent) = identity(other.path(), &other.path().join("state"), CALLER).await;
    let root = other.path().join("their-kms-root.pem");
    std::fs::write(
        &root,
        e2e::to_pem(std::slice::from_ref(&foreign.current().root)),
    )
    .unwrap();
    let mesh = Mesh::start_with(&format!(
        "[[inbound.federation]]\nname = \"cluster-b\"\nroots = \"{}\"\nallowed_apps = [\"{vouches_for}\"]\n",
        root.display()
    ))
    .await;
    (mesh, foreign, other)
}

#[tokio::test]
async fn a_federated_root_vouches_for_its_own_apps_only() {
    // Their caller trusts our root, so only the server's verdict is tested.
    async fn call(mesh: &Mesh, foreign: &RotatingIdentity) -> Option<(StatusCode, Bytes)> {
        let ours = mesh.caller.current().trust_anchors().unwrap();
        let tls = e2e::client::tls_connect_trusting(
            foreign,
            ours,
            &id(SERVER),
            mesh.addr(),
            Some(&[b"http/1.1"]),
            &[],
            None,
        )
        .await
        .ok()?;
        let mut client = MeshClient::over(tls).await.ok()?;
        client.get("/fed", &[]).await.ok().map(|(s, _, b)| (s, b))
    }
    // Their KMS vouches for CALLER: their CALLER gets in.
    let (mesh, foreign, _dir) = federated(CALLER).await;
    let (status, body) = call(&mesh, &foreign).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        json(&body)["headers"]["x-dstack-app-id"],
        serde_json::json!([CALLER])
    );
    // Their KMS vouches only for STRANGER: their CALLER is refused though the listener allows
    // CALLER, and ours still gets in.
    let (mesh, foreign, _dir) = federated(STRANGER).await;
    assert_eq!(call(&mesh, &foreign).await, None);
    assert_eq!(mesh.backend.count(), 0);
    let mut ours = mesh.client(Some(&[b"http/1.1"])).await;
    assert_eq!(ours.get("/ours", &[]).await.unwrap().0, StatusCode::OK);
    let metrics = e2e::client::http1_get(mesh.app.addr("admin").unwrap(), "/metrics", &[]).await;
    let text = String::from_utf8_lossy(&metrics.1);
    assert!(text.contains("root_not_trusted_for_app"), "{text}");
}

/// A caller with `cert` (chain and PKCS#8 key), or none at all, must get no answer, and the
/// backend must see nothing.
async fn refused_with_cert(
    mesh: &Mesh,
    cert: Option<(Vec<rustls_pki_types::CertificateDer<'static>>, Vec<u8>)>,
) {
    let anchors = mesh.caller.current().trust_anchors().unwrap();
    let verifier = ratls::verifier::ServerVerifier::new(Arc::new(
        ratls::Policy::new(anchors).expect(id(SERVER)),
    ));
    let builder = rustls::ClientConfig::builder_with_provider(ratls::crypto::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let config = match cert {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, rustls_pki_types::PrivateKeyDer::Pkcs8(key.into()))
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(mesh.addr()).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("mesh.test").unwrap();
    if let Ok(mut tls) = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
    {
        let _ = tls.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
        let mut buf = Vec::new();
        let _ = tls.read_to_end(&mut buf).await;
        assert!(
            !String::from_utf8_lossy(&buf).starts_with("HTTP/1.1"),
            "refused caller got an answer"
        );
    }
    assert_eq!(mesh.backend.count(), 0);
}

#[tokio::test]
async fn expired_and_app_id_less_certificates_are_refused() {
    let mesh = Mesh::start().await;
    let state = mesh.dir.path().join("state");
    let (chain, key) = mint_under_app_ca(&state, CALLER, |p| {
        p.not_before = time::OffsetDateTime::now_utc() - Duration::from_secs(7200);
        p.not_after = time::OffsetDateTime::now_utc() - Duration::from_secs(3600);
    });
    refused_with_cert(&mesh, Some((chain, key))).await;
    let (chain, key) = mint_under_app_ca(&state, CALLER, |p| p.custom_extensions.clear());
    refused_with_cert(&mesh, Some((chain, key))).await;
    // The same minting, unbent, is accepted: the refusals above are about the bent property.
    let (chain_certs, key) = mint_under_app_ca(&state, CALLER, |_| {});
    let policy = mesh.app.inbound.as_ref().unwrap().policy();
    policy
        .verify(
            &chain_certs[0],
            &chain_certs[1..],
            ratls::PeerRole::Client,
            rustls_pki_types::UnixTime::now(),
        )
        .unwrap();
    let _ = key;
}

#[tokio::test]
async fn no_client_certificate_is_refused() {
    let mesh = Mesh::start().await;
    refused_with_cert(&mesh, None).await;
}

#[tokio::test]
async fn garbage_and_stalled_handshakes_do_not_hurt_other_callers() {
    let mesh = Mesh::start_with("handshake_timeout = \"1s\"").await;
    // Garbage instead of a ClientHello: closed.
    let mut garbage = tokio::net::TcpStream::connect(mesh.addr()).await.unwrap();
    garbage
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), garbage.read_to_end(&mut buf))
        .await
        .expect("garbage must be closed")
        .ok();
    // A client that never finishes: closed after the handshake deadline.
    let mut stalled = tokio::net::TcpStream::connect(mesh.addr()).await.unwrap();
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x00, 0x50])
        .await
        .unwrap();
    let n = tokio::time::timeout(Duration::from_secs(10), stalled.read(&mut [0u8; 16]))
        .await
        .expect("a stalled handshake must be closed by the deadline");
    assert!(matches!(n, Ok(0) | Err(_)));
    // Meanwhile a real caller is served.
    let mut client = mesh.client(None).await;
    assert_eq!(client.get("/ok", &[]).await.unwrap().0, StatusCode::OK);
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let mesh = Mesh::start_with("max_header_bytes = 16384").await;
    let tls = tls_connect(&mesh.caller, &id(SERVER), mesh.addr(), Some(&[b"http/1.1"]))
        .await
        .unwrap();
    let mut tls = tls;
    let big = "a".repeat(40_000);
    let req = format!("GET / HTTP/1.1\r\nhost: x\r\nx-big: {big}\r\n\r\n");
    let _ = tls.write_all(req.as_bytes()).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");
    assert_eq!(mesh.backend.count(), 0);
    // The listener keeps serving.
    let mut client = mesh.client(None).await;
    assert_eq!(client.get("/ok", &[]).await.unwrap().0, StatusCode::OK);
}

/// One HTTP/1.1 request whose head is exactly `size` bytes, sent in one write; the status.
async fn head_of(mesh: &Mesh, size: usize) -> String {
    let mut tls = tls_connect(&mesh.caller, &id(SERVER), mesh.addr(), Some(&[b"http/1.1"]))
        .await
        .unwrap();
    let bare = "GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-big: \r\n\r\n".len();
    let big = "a".repeat(size - bare);
    let req = format!("GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-big: {big}\r\n\r\n");
    assert_eq!(req.len(), size);
    // The head in two parts, the second sent once the sidecar has read the first: hyper then
    // takes the rest in one read, past its buffer limit (the case hyper alone let through).
    let cut = size.min(60 * 1024);
    tls.write_all(&req.as_bytes()[..cut]).await.unwrap();
    tls.flush().await.unwrap();
    let client_port = tls.get_ref().0.local_addr().unwrap().port();
    let mut waited = 0;
    while unread_by_server(mesh.addr().port(), client_port) != Some(0) {
        assert!(waited < 500, "the sidecar never read the first part");
        waited += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tls.write_all(&req.as_bytes()[cut..]).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Bytes waiting in the receive queue of the server's socket for the connection from
/// `client_port` (Linux's /proc/net/tcp), `None` until the kernel lists it.
fn unread_by_server(server_port: u16, client_port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let port = |addr: &str| {
        addr.rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
    };
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (local, remote, queues) = (f.get(1)?, f.get(2)?, f.get(4)?);
        (port(local)? == server_port && port(remote)? == client_port)
            .then(|| u64::from_str_radix(queues.split(':').nth(1)?, 16).ok())?
    })
}

#[tokio::test]
async fn the_header_limit_is_exact_whatever_the_reads() {
    // Over the limit in one write (hyper alone checked its buffer only between reads, so an
    // 80 KiB head passed a 64 KiB limit).
    let mesh = Mesh::start_with("max_header_bytes = 65536").await;
    assert!(head_of(&mesh, 80 * 1024).await.starts_with("HTTP/1.1 431"));
    assert!(head_of(&mesh, 65537).await.starts_with("HTTP/1.1 431"));
    assert_eq!(mesh.backend.count(), 0);
    // At the limit: served.
    assert!(head_of(&mesh, 65536).await.starts_with("HTTP/1.1 200"));
    assert_eq!(mesh.backend.count(), 1);
}

#[tokio::test]
async fn a_slow_backend_is_a_504() {
    // A backend that accepts and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = silent.accept().await {
            held.push(tcp);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (server, _a) = identity(dir.path(), &state, SERVER).await;
    let (caller, _b) = identity(dir.path(), &state, CALLER).await;
    let text = format!(
        "[inbound]\nlisten = \"127.0.0.1:0\"\nbackend = \"{silent_addr}\"\nallowed_apps = \"{CALLER}\"\nbackend_timeout = \"500ms\"\n[auth]\nenabled = false\n[admin]\nlisten = \"127.0.0.1:0\"\n[client]\nenabled = false\n"
    );
    let config = Config::from_toml(&text, &HashMap::<&str, &str>::new()).unwrap();
    let app = App::start_with(config, server).await.unwrap();
    let mut client = MeshClient::connect(&caller, &id(SERVER), app.addr("inbound").unwrap(), None)
        .await
        .unwrap();
    let (status, _, body) = client.get("/slow", &[]).await.unwrap();
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        json(&body),
        serde_json::json!({"error": "backend timed out"})
    );
}

#[tokio::test]
async fn h2c_upgrades_are_not_forwarded() {
    let mesh = Mesh::start().await;
    let mut client = mesh.client(Some(&[b"http/1.1"])).await;
    let (status, _, body) = client
        .get(
            "/h2c",
            &[
                ("connection", "upgrade, http2-settings"),
                ("upgrade", "h2c"),
                ("http2-settings", "AAMAAABkAAQAAP__"),
            ],
        )
        .await
        .unwrap();
    // Served as a plain request: the app never sees an upgrade it could accept.
    assert_eq!(status, StatusCode::OK);
    let seen = json(&body);
    for hop in ["upgrade", "connection", "http2-settings"] {
        assert!(
            seen["headers"].get(hop).is_none(),
            "{hop}: {}",
            seen["headers"]
        );
    }
}

#[tokio::test]
async fn an_idle_websocket_tunnel_is_closed() {
    let mesh = Mesh::start_with("idle_timeout = \"1s\"").await;
    let mut client = mesh.client(Some(&[b"http/1.1"])).await;
    let req = Request::get("/ws")
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .body(empty())
        .unwrap();
    let resp = client.send(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let mut io = hyper_util::rt::TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
    io.write_all(b"hi").await.unwrap();
    let mut buf = [0u8; 2];
    io.read_exact(&mut buf).await.unwrap();
    // Then silence: the tunnel is closed by the idle timer, not left open forever.
    let closed = tokio::time::timeout(Duration::from_secs(20), io.read(&mut [0u8; 8])).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
}

#[tokio::test]
async fn a_slow_upload_is_not_a_slow_backend() {
    let mesh = Mesh::start_with("backend_timeout = \"500ms\"").await;
    let mut client = mesh.client(Some(&[b"http/1.1"])).await;
    let (tx, body) = channel();
    let upload = Request::post("https://mesh.test/upload")
        .body(body)
        .unwrap();
    let send = tokio::spawn(async move { client.send(upload).await });
    tx.send(Bytes::from_static(b"slow ")).await.unwrap();
    // Three times the backend deadline passes while the caller is still uploading.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    tx.send(Bytes::from_static(b"upload")).await.unwrap();
    drop(tx);
    let resp = send.await.unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(json(&body)["received"], 11);
}

#[tokio::test]
async fn metrics_count_requests_per_caller_and_refusals_by_reason() {
    let mesh = Mesh::start().await;
    assert_refused(&mesh, &mesh.stranger).await;
    let mut client = mesh.client(Some(&[b"h2"])).await;
    for _ in 0..3 {
        assert_eq!(client.get("/x", &[]).await.unwrap().0, StatusCode::OK);
    }
    let admin = mesh.app.addr("admin").unwrap().to_string();
    // The refusal is counted after the handshake's alert: poll briefly for it.
    let mut text = String::new();
    for _ in 0..100 {
        let (status, body) = dstack_mesh::status::request(&admin, http::Method::GET, "/metrics")
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
        text = String::from_utf8_lossy(&body).into_owned();
        if text.contains("reason=\"app_id_not_allowed\"") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for line in [
        format!("dstack_mesh_requests_total{{direction=\"inbound\",peer=\"{CALLER}\"}} 3"),
        format!("dstack_mesh_request_errors_total{{direction=\"inbound\",peer=\"{CALLER}\"}} 0"),
        "dstack_mesh_request_duration_seconds_count{direction=\"inbound\"} 3".to_owned(),
        "dstack_mesh_handshake_failures_total{direction=\"inbound\",reason=\"app_id_not_allowed\"} 1".to_owned(),
        "dstack_mesh_open_connections{listener=\"inbound\"} ".to_owned(),
        "dstack_mesh_identity_expiration_timestamp_seconds ".to_owned(),
    ] {
        assert!(text.contains(&line), "{line}\n{text}");
    }
    // Health and readiness: up, identity loaded, listeners bound.
    let (status, body) = dstack_mesh::status::request(&admin, http::Method::GET, "/health")
        .await
        .unwrap();
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok\n"[..]));
    let (status, body) = dstack_mesh::status::request(&admin, http::Method::GET, "/ready")
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body)["ready"], true);
    // Every sample line parses as `name{labels} number`.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "{line}");
    }
}

/// A PROXY v2 header naming `client` (as the dstack gateway with `pp: true` writes it).
fn proxy_v2(client: &str) -> Vec<u8> {
    use ppp::v2::{Builder, Command, Protocol, Version};
    let pair: (std::net::SocketAddr, std::net::SocketAddr) =
        (client.parse().unwrap(), "10.0.0.1:443".parse().unwrap());
    Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, pair)
        .build()
        .unwrap()
}

async fn client_after(mesh: &Mesh, preface: &[u8]) -> std::io::Result<MeshClient> {
    let tls = e2e::client::tls_connect_after(
        &mesh.caller,
        &id(SERVER),
        mesh.addr(),
        Some(&[b"http/1.1"]),
        preface,
        None,
    )
    .await?;
    MeshClient::over(tls).await
}

#[tokio::test]
async fn behind_a_proxy_protocol_gateway_the_client_address_is_the_headers() {
    let mesh = Mesh::start_with("proxy_protocol = \"any\"\nhandshake_timeout = \"2s\"").await;
    for preface in [
        proxy_v2("203.0.113.7:51234"),
        b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n".to_vec(),
    ] {
        let mut client = client_after(&mesh, &preface).await.unwrap();
        let (status, _, body) = client
            .get("/", &[("x-forwarded-for", "6.6.6.6")])
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
        let seen = json(&body);
        assert_eq!(
            seen["headers"]["x-forwarded-for"],
            serde_json::json!(["203.0.113.7"]),
            "{seen}"
        );
        assert_eq!(
            seen["headers"]["x-dstack-app-id"],
            serde_json::json!([CALLER])
        );
    }
    assert_eq!(mesh.backend.count(), 2);
    // Required and missing, or garbage: refused before TLS, nothing reaches the backend.
    assert!(client_after(&mesh, &[]).await.is_err());
    assert!(client_after(&mesh, b"PROXY TCP4 1.2.3 x y z\r\n")
        .await
        .is_err());
    // A header that stalls half-way is cut by the handshake deadline.
    let mut stalled = tokio::net::TcpStream::connect(mesh.addr()).await.unwrap();
    stalled
        .write_all(&proxy_v2("203.0.113.7:1")[..10])
        .await
        .unwrap();
    let n = tokio::time::timeout(Duration::from_secs(10), stalled.read(&mut [0u8; 16]))
        .await
        .expect("a stalled PROXY header must be closed by the deadline");
    assert!(matches!(n, Ok(0) | Err(_)));
    assert_eq!(mesh.backend.count(), 2);
    let text = dstack_mesh::status::request(
        &mesh.app.addr("admin").unwrap().to_string(),
        http::Method::GET,
        "/metrics",
    )
    .await
    .unwrap()
    .1;
    let text = String::from_utf8_lossy(&text);
    assert!(
        text.contains("dstack_mesh_handshake_failures_total{direction=\"inbound\",reason=\"proxy_protocol\"} 2"),
        "{text}"
    );
    // The listener is unharmed.
    let mut client = client_after(&mesh, &proxy_v2("198.51.100.1:1"))
        .await
        .unwrap();
    assert_eq!(client.get("/", &[]).await.unwrap().0, StatusCode::OK);
}

#[tokio::test]
async fn with_proxy_protocol_off_a_header_is_garbage_and_the_listener_is_unharmed() {
    let mesh = Mesh::start().await;
    assert!(client_after(&mesh, &proxy_v2("203.0.113.7:51234"))
        .await
        .is_err());
    assert_eq!(mesh.backend.count(), 0);
    let mut client = mesh.client(None).await;
    assert_eq!(client.get("/", &[]).await.unwrap().0, StatusCode::OK);
}

/// Debian's HAProxy in front of `inbound`, as the dstack gateway with `pp: true`: one frontend
/// sending PROXY v2 (`send-proxy-v2`), one sending v1 (`send-proxy`). Their addresses.
fn haproxy_sending_proxy(
    dir: &std::path::Path,
    inbound: std::net::SocketAddr,
) -> (e2e::ChildGuard, [std::net::SocketAddr; 2]) {
    for attempt in 1.. {
        let ports = [e2e::free_port(), e2e::free_port()];
        let config = format!(
            "global\n    maxconn 256\n\ndefaults\n    mode tcp\n    timeout connect 10s\n    timeout client 60s\n    timeout server 60s\n\n\
             frontend v2\n    bind 127.0.0.1:{}\n    default_backend v2\n\nbackend v2\n    server mesh {inbound} send-proxy-v2\n\n\
             frontend v1\n    bind 127.0.0.1:{}\n    default_backend v1\n\nbackend v1\n    server mesh {inbound} send-proxy\n",
            ports[0], ports[1]
        );
        let file = dir.join("haproxy.cfg");
        std::fs::write(&file, config).unwrap();
        let mut cmd = std::process::Command::new(e2e::program("haproxy"));
        cmd.arg("-db").arg("-f").arg(&file);
        let mut haproxy = e2e::ChildGuard::spawn("haproxy", cmd, dir).unwrap();
        let addrs = ports.map(|p| std::net::SocketAddr::from(([127, 0, 0, 1], p)));
        let mut exited = None;
        e2e::wait_until("haproxy to listen", Duration::from_secs(20), || {
            exited = haproxy.exited();
            exited.is_some()
                || addrs
                    .iter()
                    .all(|a| std::net::TcpStream::connect(a).is_ok())
        });
        match exited {
            None => return (haproxy, addrs),
            Some(_) if attempt < 5 && haproxy.stderr().contains("cannot bind socket") => {}
            Some(status) => panic!("haproxy exited ({status}): {}", haproxy.stderr()),
        }
    }
    unreachable!()
}

#[tokio::test]
async fn haproxy_send_proxy_v1_and_v2_carry_the_client_address_to_the_backend() {
    let mesh = Mesh::start_with("proxy_protocol = \"any\"").await;
    let (_haproxy, gateways) = haproxy_sending_proxy(mesh.dir.path(), mesh.addr());
    // The client dials the gateway from 127.0.0.2; the sidecar's TCP peer is HAProxy
    // (127.0.0.1), so only the header can tell the backend where the client was.
    for gateway in gateways {
        let tls = e2e::client::tls_connect_after(
            &mesh.caller,
            &id(SERVER),
            gateway,
            Some(&[b"http/1.1"]),
            &[],
            Some([127, 0, 0, 2].into()),
        )
        .await
        .unwrap();
        let mut client = MeshClient::over(tls).await.unwrap();
        let (status, _, body) = client.get("/", &[]).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        let seen = json(&body);
        assert_eq!(
            seen["headers"]["x-forwarded-for"],
            serde_json::json!(["127.0.0.2"]),
            "via {gateway}: {seen}"
        );
    }
    // A client that skips the gateway sends no header: refused.
    assert!(client_after(&mesh, &[]).await.is_err());
}
