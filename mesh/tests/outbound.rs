//! The outbound proxy, in-process: sidecar A's outbound port → sidecar B's inbound → B's
//! backend, with development-agent identities; plus the guest-agent passthrough.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use bytes::Bytes;
use dstack_mesh::{app::App, config::Config};
use e2e::{
    backend::Backend,
    client::{echo, empty, websocket_via},
    identity,
};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

const A: &str = "aaaa0000aaaa0000aaaa0000aaaa0000aaaa0000";
const B: &str = "bbbb1111bbbb1111bbbb1111bbbb1111bbbb1111";
const STRANGER: &str = "57a7e957a7e957a7e957a7e957a7e957a7e957a7";

struct Pair {
    a: App,
    b: App,
    backend: Backend,
    _dir: tempfile::TempDir,
    _agents: Vec<tokio::task::JoinHandle<()>>,
}

fn config(text: &str) -> Config {
    Config::from_toml(text, &HashMap::<&str, &str>::new()).unwrap()
}

impl Pair {
    /// B allows `b_allows`; A reaches B at a fixed address; `a_extra` is appended to A's config.
    async fn start(b_allows: &str, a_extra: &str) -> Self {
        Self::start_with(b_allows, "", a_extra).await
    }

    /// As [`Pair::start`], with `b_inbound` added to B's `[inbound]` section.
    async fn start_with(b_allows: &str, b_inbound: &str, a_extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let (a_id, a1) = identity(dir.path(), &state, A).await;
        let (b_id, a2) = identity(dir.path(), &state, B).await;
        let backend = Backend::start().await;
        let b = App::start_with(
            config(&format!(
                "[inbound]\nlisten = \"127.0.0.1:0\"\nbackend = \"{}\"\nallowed_apps = \"{b_allows}\"\n{b_inbound}[auth]\nenabled = false\n[admin]\nlisten = \"127.0.0.1:0\"\n[client]\nenabled = false\n",
                backend.addr
            )),
            b_id,
        )
        .await
        .unwrap();
        let a = App::start_with(
            config(&format!(
                "[inbound]\nenabled = false\n[auth]\nenabled = false\n[admin]\nlisten = \"127.0.0.1:0\"\n[client]\naddress = \"127.0.0.1\"\nport = 0\n[dstack]\ngateway_domain = \"fixed/{}\"\n{a_extra}",
                b.addr("inbound").unwrap()
            )),
            a_id,
        )
        .await
        .unwrap();
        Self {
            a,
            b,
            backend,
            _dir: dir,
            _agents: vec![a1, a2],
        }
    }

    fn outbound(&self) -> SocketAddr {
        self.a.addr("outbound").unwrap()
    }

    /// A's `/metrics`.
    async fn metrics(&self) -> String {
        metrics_of(&self.a).await
    }
}

/// `app`'s `/metrics`.
async fn metrics_of(app: &App) -> String {
    let admin = app.addr("admin").unwrap().to_string();
    let (_, body) = dstack_mesh::status::request(&admin, http::Method::GET, "/metrics")
        .await
        .unwrap();
    String::from_utf8_lossy(&body).into_owned()
}

/// One HTTP/1.1 request on a fresh connection to `addr`.
async fn send(addr: SocketAddr, req: Request<e2e::client::ClientBody>) -> Response<Incoming> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender.send_request(req).await.unwrap()
}

fn get(path: &str, headers: &[(&str, &str)]) -> Request<e2e::client::ClientBody> {
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

#[tokio::test]
async fn a_request_reaches_the_target_with_the_callers_identity() {
    let pair = Pair::start(A, "").await;
    let resp = send(
        pair.outbound(),
        get(
            "/hello?x=1",
            &[
                ("x-dstack-target-app", B),
                ("x-dstack-target-port", "8080"),
                ("x-dstack-app-id", STRANGER),
            ],
        ),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = json(resp).await;
    assert_eq!(seen["path"], "/hello?x=1");
    assert_eq!(seen["headers"]["x-dstack-app-id"][0], A);
    assert_eq!(seen["headers"]["host"][0], "app-b.internal");
    let names: Vec<&String> = seen["headers"].as_object().unwrap().keys().collect();
    assert!(
        !names.iter().any(|n| n.starts_with("x-dstack-target")),
        "routing headers reached the backend: {names:?}"
    );
    assert_eq!(pair.backend.count(), 1);
}

#[tokio::test]
async fn a_target_that_refuses_the_caller_is_a_502_and_the_app_sees_nothing() {
    let pair = Pair::start(STRANGER, "").await;
    let resp = send(pair.outbound(), get("/", &[("x-dstack-target-app", B)])).await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let body = json(resp).await;
    assert_eq!(body["error"], "peer refused this app", "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("allowlist"),
        "{body}"
    );
    assert_eq!(pair.backend.count(), 0);
    drop(pair.b);
}

#[tokio::test]
async fn a_peer_with_another_app_id_is_refused_in_the_handshake() {
    // A asks for STRANGER but the address answers as B: identity mismatch.
    let pair = Pair::start(A, "").await;
    let resp = send(
        pair.outbound(),
        get("/", &[("x-dstack-target-app", STRANGER)]),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let body = json(resp).await;
    assert_eq!(body["error"], "peer identity mismatch", "{body}");
    assert_eq!(pair.backend.count(), 0);
    let text = pair.metrics().await;
    for line in [
        format!("dstack_mesh_request_errors_total{{direction=\"outbound\",peer=\"{STRANGER}\"}} 1"),
        "dstack_mesh_handshake_failures_total{direction=\"outbound\",reason=\"app_id_mismatch\"} 1"
            .to_owned(),
    ] {
        assert!(text.contains(&line), "{line}\n{text}");
    }
}

#[tokio::test]
async fn bad_routing_headers_are_400s_naming_the_header_and_nothing_is_dialled() {
    let pair = Pair::start(A, "").await;
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("x-dstack-target-app", "not-hex")], "x-dstack-target-app"),
        (&[("x-dstack-target-app", "")], "x-dstack-target-app"),
        (
            &[("x-dstack-target-app", B), ("x-dstack-target-port", "0")],
            "x-dstack-target-port",
        ),
        (
            &[
                ("x-dstack-target-app", B),
                ("x-dstack-target-port", "70000"),
            ],
            "x-dstack-target-port",
        ),
        (
            &[("x-dstack-target-app", B), ("x-dstack-target-app", A)],
            "x-dstack-target-app",
        ),
        (
            &[
                ("x-dstack-target-app", B),
                ("x-dstack-target-use-tls", "maybe"),
            ],
            "x-dstack-target-use-tls",
        ),
        // Hex, but not a dstack id's 20 bytes: no app has it, so nothing may be dialled.
        (
            &[("x-dstack-target-app", "bbbb1111")],
            "x-dstack-target-app",
        ),
        (
            &[(
                "x-dstack-target-app",
                "bbbb1111bbbb1111bbbb1111bbbb1111bbbb111100",
            )],
            "x-dstack-target-app",
        ),
        (
            &[
                ("x-dstack-target-app", B),
                ("x-dstack-target-instance", "bbbb"),
            ],
            "x-dstack-target-instance",
        ),
    ];
    for (headers, named) in cases {
        let resp = send(pair.outbound(), get("/", headers)).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{headers:?}");
        let body = json(resp).await;
        assert_eq!(body["error"], "bad routing header");
        assert!(
            body["detail"].as_str().unwrap().contains(named),
            "{headers:?}: {body}"
        );
    }
    assert_eq!(pair.backend.count(), 0);
}

#[tokio::test]
async fn empty_optional_routing_headers_are_absent_as_in_dstack_vpc() {
    let pair = Pair::start(A, "").await;
    let resp = send(
        pair.outbound(),
        get(
            "/",
            &[
                ("x-dstack-target-app", B),
                ("x-dstack-target-instance", ""),
                ("x-dstack-target-port", ""),
            ],
        ),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(json(resp).await["headers"]["x-dstack-app-id"][0], A);
    assert_eq!(pair.backend.count(), 1);
}

#[tokio::test]
async fn keep_alive_requests_share_one_h2_connection() {
    let pair = Pair::start(A, "").await;
    let tcp = TcpStream::connect(pair.outbound()).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    for _ in 0..3 {
        let resp = sender
            .send_request(get("/", &[("x-dstack-target-app", B)]))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let seen = json(resp).await;
        assert_eq!(seen["headers"]["x-dstack-app-id"][0], A);
    }
    assert_eq!(pair.backend.count(), 3);
    let text = pair.metrics().await;
    for line in [
        format!("dstack_mesh_requests_total{{direction=\"outbound\",peer=\"{B}\"}} 3"),
        "dstack_mesh_pool_connections{protocol=\"h2\"} 1".to_owned(),
        "dstack_mesh_open_connections{listener=\"outbound\"} ".to_owned(),
        // One connection, and both sidecars agreed on the post-quantum hybrid.
        "dstack_mesh_tls_handshakes_total{side=\"outbound\",group=\"X25519MLKEM768\"} 1".to_owned(),
    ] {
        assert!(text.contains(&line), "{line}\n{text}");
    }
    let b = metrics_of(&pair.b).await;
    let line = "dstack_mesh_tls_handshakes_total{side=\"mesh\",group=\"X25519MLKEM768\"} 1";
    assert!(b.contains(line), "{line}\n{b}");
    assert_eq!(
        b.matches("dstack_mesh_tls_handshakes_total{").count(),
        1,
        "{b}"
    );
}

#[tokio::test]
async fn a_websocket_upgrade_is_spliced_end_to_end() {
    let pair = Pair::start(A, "").await;
    let mut tcp = websocket_via(pair.outbound(), B).await;
    assert_eq!(
        echo(&mut tcp, b"ping through the mesh").await,
        b"ping through the mesh"
    );
}

#[tokio::test]
async fn the_agent_passthrough_answers_read_only_methods_and_refuses_keys_and_quotes() {
    let pair = Pair::start(A, "").await;
    let resp = send(pair.outbound(), get("/info", &[])).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(json(resp).await["app_id"], A);

    let resp = send(pair.outbound(), get("/gateway", &[])).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let domain = json(resp).await["gateway_domain"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(domain.starts_with("fixed/127.0.0.1:"), "{domain}");

    for path in ["/get_key", "/GetTlsKey", "/sign"] {
        let resp = send(pair.outbound(), get(path, &[])).await;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{path}");
        let body = json(resp).await;
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .contains("agent_key_methods"),
            "{body}"
        );
    }
    // A quote over report data the caller picks is attestation of anything: not by default.
    for path in ["/get_quote?report_data=00", "/Attest?report_data=00"] {
        let resp = send(pair.outbound(), get(path, &[])).await;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{path}");
        let body = json(resp).await;
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .contains("agent_quote_methods"),
            "{body}"
        );
    }
}

#[tokio::test]
async fn quote_methods_pass_only_with_their_own_setting() {
    let pair = Pair::start(A, "[outbound]\nagent_quote_methods = true\n").await;
    let resp = send(pair.outbound(), get("/get_quote?report_data=00", &[])).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(json(resp).await["quote"].is_string());
    // Quotes do not open the keys.
    let resp = send(pair.outbound(), get("/get_key", &[])).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn key_methods_pass_when_allowed_and_the_passthrough_can_be_off() {
    let pair = Pair::start(A, "[outbound]\nagent_key_methods = true\n").await;
    let req = Request::post("/get_key")
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(e2e::client::full(Bytes::from_static(
            br#"{"path":"test","purpose":"x"}"#,
        )))
        .unwrap();
    let resp = send(pair.outbound(), req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(json(resp).await["key"].is_string());

    let off = Pair::start(A, "[outbound]\nagent_passthrough = false\n").await;
    let resp = send(off.outbound(), get("/info", &[])).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(json(resp).await["error"], "no target");
}

#[tokio::test]
async fn static_routes_by_app_and_port_and_the_gateway_for_the_rest() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    // The table names STRANGER (every port) and B's port 8443, both at a closed port; the
    // gateway (fixed to B) serves everything else.
    let pair = Pair::start(
        A,
        &format!("[outbound.routes]\n\"{STRANGER}\" = \"{closed}\"\n\"{B}:8443\" = \"{closed}\"\n"),
    )
    .await;
    let to = |app: &'static str, port: &'static str| {
        get(
            "/",
            &[("x-dstack-target-app", app), ("x-dstack-target-port", port)],
        )
    };
    let resp = send(pair.outbound(), to(B, "443")).await;
    assert_eq!(resp.status(), StatusCode::OK, "B:443 through the gateway");
    // Through the gateway these would be 200 (B) and an identity mismatch (STRANGER): the
    // unreachable address says the table was used.
    for (app, port) in [(B, "8443"), (STRANGER, "443"), (STRANGER, "8080")] {
        let resp = send(pair.outbound(), to(app, port)).await;
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY, "{app}:{port}");
        assert_eq!(
            json(resp).await["error"],
            "peer unreachable",
            "{app}:{port}"
        );
    }
    assert_eq!(pair.backend.count(), 1);
}

/// A sidecar A whose gateway is `gateway` (nothing behind it, or something that never talks).
async fn lone_a(gateway: SocketAddr, extra: &str) -> (App, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (a_id, _agent) = identity(dir.path(), &state, A).await;
    let a = App::start_with(
        config(&format!(
            "[inbound]\nenabled = false\n[auth]\nenabled = false\n[admin]\nlisten = \"127.0.0.1:0\"\n[client]\naddress = \"127.0.0.1\"\nport = 0\n[dstack]\ngateway_domain = \"fixed/{gateway}\"\n{extra}"
        )),
        a_id,
    )
    .await
    .unwrap();
    (a, dir)
}

#[tokio::test]
async fn a_target_that_is_down_is_a_502_and_the_proxy_stays_healthy() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (a, _dir) = lone_a(closed, "").await;
    let outbound = a.addr("outbound").unwrap();
    let resp = send(outbound, get("/", &[("x-dstack-target-app", B)])).await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let body = json(resp).await;
    assert_eq!(body["error"], "peer unreachable", "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("connect"),
        "{body}"
    );
    let resp = send(outbound, get("/info", &[])).await;
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_peer_that_never_answers_the_handshake_is_a_504_within_the_deadline() {
    // Accepts TCP and then says nothing, holding every socket open.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            sockets.push(s);
        }
    });
    let (a, _dir) = lone_a(silent_addr, "[outbound]\nhandshake_timeout = \"300ms\"\n").await;
    let outbound = a.addr("outbound").unwrap();
    let resp = tokio::time::timeout(
        Duration::from_secs(20),
        send(outbound, get("/", &[("x-dstack-target-app", B)])),
    )
    .await
    .expect("the handshake deadline holds");
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    let body = json(resp).await;
    assert_eq!(body["error"], "peer did not answer in time", "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("handshake"),
        "{body}"
    );
    let resp = send(outbound, get("/gateway", &[])).await;
    assert_eq!(resp.status(), StatusCode::OK);
    held.abort();
}

#[tokio::test]
async fn a_pooled_connection_the_peer_closed_is_replaced_transparently() {
    // B closes idle connections after a second.
    let pair = Pair::start_with(A, "idle_timeout = \"1s\"\n", "").await;
    let outbound = pair.outbound();
    for round in 0..3 {
        let resp = send(outbound, get("/", &[("x-dstack-target-app", B)])).await;
        assert_eq!(resp.status(), StatusCode::OK, "round {round}");
        let _ = json(resp).await;
        // Past B's idle limit: the pooled connection is closed under the pool.
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    assert_eq!(pair.backend.count(), 3);
}
