//! Discovery without dstack-vpc's VPN: one sidecar runs the registry role on its mesh listener;
//! others register themselves through their outbound proxies (mutual RA-TLS, so the registry
//! knows each node's app and instance from its certificate) and discover each other with
//! dstack-vpc's `/api/discover/<node_type>`. Sidecars run in-process on development agents that
//! share one KMS root.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use dstack_mesh::{app::App, config::Config};
use e2e::{backend::Backend, client::full, instance_identity};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The registry's app.
const R: &str = "eeee0000eeee0000eeee0000eeee0000eeee0000";
/// The MongoDB nodes' app.
const M: &str = "dddd1111dddd1111dddd1111dddd1111dddd1111";
/// The etcd node's app.
const E: &str = "ffff2222ffff2222ffff2222ffff2222ffff2222";
/// An app the mesh admits but the registry does not.
const X: &str = "abab3333abab3333abab3333abab3333abab3333";
const M1: &str = "1111aaaa1111aaaa1111aaaa1111aaaa1111aaaa";
const M2: &str = "2222bbbb2222bbbb2222bbbb2222bbbb2222bbbb";
const E1: &str = "3333cccc3333cccc3333cccc3333cccc3333cccc";

fn config(text: &str) -> Config {
    Config::from_toml(text, &HashMap::<&str, &str>::new()).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// The registry sidecar: its mesh admits M, E and X; its registry only M and E.
async fn registry(
    dir: &Path,
    backend: SocketAddr,
    ttl: &str,
) -> (App, tokio::task::JoinHandle<()>) {
    registry_with(dir, backend, ttl, "nodes.json", "").await
}

/// [`registry`] with its state file named `file`, and `extra` appended to its configuration.
async fn registry_with(
    dir: &Path,
    backend: SocketAddr,
    ttl: &str,
    file: &str,
    extra: &str,
) -> (App, tokio::task::JoinHandle<()>) {
    let (id, agent) = instance_identity(dir, &dir.join("state"), R, None).await;
    let state = dir.join("registry").join(file);
    let app = App::start_with(
        config(&format!(
            "[inbound]\nlisten = \"127.0.0.1:0\"\nbackend = \"{backend}\"\nallowed_apps = [\"{M}\", \"{E}\", \"{X}\"]\n\
             [auth]\nenabled = false\n[admin]\nlisten = \"127.0.0.1:0\"\n[client]\nenabled = false\n\
             [registry]\nenabled = true\nallowed_apps = [\"{M}\", \"{E}\"]\nttl = \"{ttl}\"\nstate_file = \"{}\"\n{extra}",
            state.display()
        )),
        id,
    )
    .await
    .unwrap();
    (app, agent)
}

/// A node of `app`/`instance` that reaches the registry at `registry` and, with a node type,
/// registers as it (offering a `db` TCP service).
async fn node(
    dir: &Path,
    app: &str,
    instance: Option<&str>,
    registry: SocketAddr,
    node_type: Option<&str>,
) -> (App, tokio::task::JoinHandle<()>) {
    let (id, agent) = instance_identity(dir, &dir.join("state"), app, instance).await;
    let register = node_type
        .map(|t| {
            format!(
                "[registry]\nserver_app = \"{R}\"\nnode_type = \"{t}\"\ninterval = \"300ms\"\nlabels = {{ zone = \"z1\" }}\n\
                 [[inbound.tcp]]\nname = \"db\"\nlisten = \"127.0.0.1:0\"\nbackend = \"127.0.0.1:9\"\nallowed_apps = \"any\"\n"
            )
        })
        .unwrap_or_default();
    let app = App::start_with(
        config(&format!(
            "[inbound]\nenabled = false\n[auth]\nenabled = false\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [client]\naddress = \"127.0.0.1\"\nport = 0\n[dstack]\ngateway_domain = \"fixed/{registry}\"\n{register}"
        )),
        id,
    )
    .await
    .unwrap();
    (app, agent)
}

/// `method path` to the registry app through `via`'s outbound proxy: status and JSON.
async fn ask(via: &App, method: &str, path: &str, body: &str) -> (StatusCode, serde_json::Value) {
    let tcp = TcpStream::connect(via.addr("outbound").unwrap())
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "registry")
        .header("x-dstack-target-app", R)
        // A header cannot make the caller someone else.
        .header("x-dstack-app-id", M)
        .body(full(body.to_owned()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&bytes)));
    (status, json)
}

/// The instance ids `discover` lists for `node_type`, asked through `via`.
async fn discovered(via: &App, node_type: &str) -> BTreeSet<String> {
    let (status, json) = ask(via, "GET", &format!("/api/discover/{node_type}"), "").await;
    if status == StatusCode::NOT_FOUND {
        return BTreeSet::new();
    }
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["count"], json["nodes"].as_array().unwrap().len());
    assert_eq!(json["node_type"], node_type);
    (json["nodes"].as_array().unwrap().iter())
        .map(|n| n["instance_id"].as_str().unwrap().to_owned())
        .collect()
}

/// Poll `discover` until it lists exactly `want` (20 s at most).
async fn until_discovered(via: &App, node_type: &str, want: &[&str]) {
    let want: BTreeSet<String> = want.iter().map(|s| (*s).to_owned()).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = discovered(via, node_type).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{node_type}: {got:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn nodes_register_discover_each_other_and_expire_without_heartbeats() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let backend = Backend::start().await;
    let (r, _r_agent) = registry(d, backend.addr, "2s").await;
    let at = r.addr("inbound").unwrap();
    let (m1, _a1) = node(d, M, Some(M1), at, Some("mongodb")).await;
    let (m2, _a2) = node(d, M, Some(M2), at, Some("mongodb")).await;
    let (e1, _a3) = node(d, E, Some(E1), at, Some("etcd")).await;

    until_discovered(&m1, "mongodb", &[M1, M2]).await;
    until_discovered(&m1, "etcd", &[E1]).await;
    // What a node learns: the proved app and instance, and how to reach each service.
    let (_, json) = ask(&e1, "GET", "/api/discover/mongodb", "").await;
    let entry = (json["nodes"].as_array().unwrap().iter())
        .find(|n| n["instance_id"] == M1)
        .unwrap();
    assert_eq!(entry["app_id"], M);
    assert_eq!(entry["uuid"], M1);
    assert_eq!(entry["labels"]["zone"], "z1");
    assert!(entry["tailscale_ip"].is_null());
    let port = m1.addr("tcp:db").unwrap().port();
    assert_eq!(entry["ports"][0]["port"], port);
    assert_eq!(
        entry["ports"][0]["connect"],
        format!("{M1}.{M}.dstack:{port}")
    );

    // The body cannot claim another identity: the entry stays M1's.
    let (status, json) = ask(
        &m1,
        "POST",
        "/api/nodes/update",
        &format!("{{\"node_type\": \"mongodb\", \"app_id\": \"{E}\", \"instance_id\": \"{M2}\"}}"),
    )
    .await;
    assert_eq!(
        (status, json["status"].as_str()),
        (StatusCode::OK, Some("updated"))
    );
    until_discovered(&m1, "mongodb", &[M1, M2]).await;
    // Nor take another node's name.
    let (status, json) = ask(
        &e1,
        "POST",
        &format!("/api/nodes/update?uuid={M1}&node_type=mongodb"),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{json}");
    until_discovered(&m1, "mongodb", &[M1, M2]).await;
    // dstack-vpc's form: query parameters, no body.
    let (status, json) = ask(
        &e1,
        "POST",
        "/api/nodes/update?uuid=pg-0&node_type=postgres&hostname=pg-0.internal",
        "",
    )
    .await;
    assert_eq!(
        (status, json["status"].as_str()),
        (StatusCode::OK, Some("created")),
        "{json}"
    );
    let (_, json) = ask(&m2, "GET", "/api/discover/postgres", "").await;
    assert_eq!(json["nodes"][0]["hostname"], "pg-0.internal");
    assert_eq!(json["nodes"][0]["instance_id"], E1);
    let (status, json) = ask(&m2, "GET", "/api/discover/cassandra", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(json["error"], "No cassandra nodes found");
    // Nor fill the registry: a caller holds a bounded number of entries.
    let mut refused = None;
    for i in 0..40 {
        let path = format!("/api/nodes/update?node_type=type-{i}");
        let (status, _) = ask(&e1, "POST", &path, "").await;
        if status != StatusCode::OK {
            refused = Some((i, status));
            break;
        }
    }
    let (index, status) = refused.expect("a cap on one caller's entries");
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    // E1's etcd and postgres entries and 14 new types make its 16.
    assert_eq!(index, 14);

    // An app the mesh admits but the registry does not: 403, however it dresses up.
    let (x, _a4) = node(d, X, None, at, None).await;
    let (status, json) = ask(&x, "GET", "/api/discover/mongodb", "").await;
    assert_eq!(
        (status, json["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("Forbidden"))
    );
    let (status, _) = ask(&x, "POST", "/api/nodes/update?node_type=mongodb&uuid=x", "").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // The registry's paths never reached the backend; other paths do.
    assert_eq!(backend.count(), 0);
    let (status, _) = ask(&m1, "GET", "/echo", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(backend.count(), 1);

    // M2 stops (no more heartbeats): gone after the 2 s ttl; the others stay.
    drop(m2);
    until_discovered(&m1, "mongodb", &[M1]).await;
    until_discovered(&m1, "etcd", &[E1]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn registrations_survive_a_registry_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let backend = Backend::start().await;
    let (r, r_agent) = registry(d, backend.addr, "60s").await;
    let (m1, a1) = node(d, M, Some(M1), r.addr("inbound").unwrap(), Some("mongodb")).await;
    until_discovered(&m1, "mongodb", &[M1]).await;
    // The node and the registry stop; the state file outlives them.
    drop((m1, a1));
    let file = d.join("registry").join("nodes.json");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&file).is_ok_and(|s| s.contains(M1)) {
        assert!(Instant::now() < deadline, "the state file never named {M1}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    drop((r, r_agent));

    let (r, _r_agent) = registry(d, backend.addr, "60s").await;
    // A caller that never registered asks the new registry: M1 is still there.
    let (e1, _a) = node(d, E, Some(E1), r.addr("inbound").unwrap(), None).await;
    assert_eq!(
        discovered(&e1, "mongodb").await,
        BTreeSet::from([M1.to_owned()])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn with_an_etcd_store_the_entries_live_in_etcd_sealed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cluster = e2e::etcd::EtcdCluster::start(&d.join("etcd"), 1);
    let store = format!(
        "[store]\nbackend = \"etcd\"\nendpoints = [\"{}\"]\n",
        cluster.endpoints()[0]
    );
    let backend = Backend::start().await;
    let (r, r_agent) = registry_with(d, backend.addr, "60s", "first.json", &store).await;
    let (m1, a1) = node(d, M, Some(M1), r.addr("inbound").unwrap(), Some("mongodb")).await;
    until_discovered(&m1, "mongodb", &[M1]).await;
    drop((m1, a1));
    // In etcd, sealed: neither the node's ids nor its type are readable there.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = cluster.etcdctl(&["get", "--prefix", "/dstack-mesh", "--print-value-only"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !text.trim().is_empty() {
            assert!(
                !text.contains(M1) && !text.contains("mongodb"),
                "plaintext in etcd: {text}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "nothing was stored in etcd");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !d.join("registry").join("first.json").exists(),
        "etcd, not the file"
    );
    drop((r, r_agent));

    // Another registry instance of the app, with a state file of its own, starts from etcd.
    let (r, _r_agent) = registry_with(d, backend.addr, "60s", "second.json", &store).await;
    let (e1, _a) = node(d, E, Some(E1), r.addr("inbound").unwrap(), None).await;
    until_discovered(&e1, "mongodb", &[M1]).await;
}
