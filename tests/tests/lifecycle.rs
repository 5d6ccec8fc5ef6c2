//! The process lifecycle of `dstack-mesh run`: SIGTERM drains (no new connections, requests in
//! flight finish, exit 0); SIGHUP reloads the allowlist without dropping connections and keeps
//! the running configuration when the new one is broken.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use e2e::{
    backend::Backend,
    client::{empty, MeshClient},
    dev_agent, identity, mesh_binary, run_mesh, run_mesh_logging, start_mesh,
};
use http::{Request, StatusCode};
use http_body_util::BodyExt;

const SERVER: &str = "5e77e75e77e75e77e75e77e75e77e75e77e75e77";
const CALLER: &str = "ca11e7ca11e7ca11e7ca11e7ca11e7ca11e7ca11";
const OTHER: &str = "07e407e407e407e407e407e407e407e407e407e4";

/// A `dstack-mesh run` config: inbound to `backend`, allowing `allowed`.
fn config(socket: &std::path::Path, backend: std::net::SocketAddr, allowed: &str) -> String {
    format!(
        "[agent]\naddress = \"unix:{}\"\n\
         [inbound]\nlisten = \"127.0.0.1:0\"\nbackend = \"{backend}\"\nallowed_apps = \"{allowed}\"\n\
         [auth]\nenabled = false\n[client]\nenabled = false\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [lifecycle]\ndrain_timeout = \"20s\"\n",
        socket.display()
    )
}

/// An agent for [`SERVER`], a caller's identity, a backend, and a config file allowing the
/// caller. Bind `_guards` when taking it apart: the agents stop when they are dropped.
struct Stage {
    dir: tempfile::TempDir,
    state: std::path::PathBuf,
    caller: ratls::identity::RotatingIdentity,
    backend: Backend,
    socket: std::path::PathBuf,
    file: std::path::PathBuf,
    _guards: (e2e::ChildGuard, tokio::task::JoinHandle<()>),
}

async fn stage() -> Stage {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (agent, socket) = dev_agent(dir.path(), "agent", SERVER, &state);
    let (caller, caller_agent) = identity(dir.path(), &state, CALLER).await;
    let backend = Backend::start().await;
    let file = dir.path().join("mesh.toml");
    std::fs::write(&file, config(&socket, backend.addr, CALLER)).unwrap();
    Stage {
        dir,
        state,
        caller,
        backend,
        socket,
        file,
        _guards: (agent, caller_agent),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_refuses_new_connections_and_finishes_requests_in_flight() {
    let Stage {
        dir,
        caller,
        backend,
        file,
        _guards,
        ..
    } = stage().await;
    let (mut mesh, bound) = run_mesh(dir.path(), "mesh", &file);
    let inbound = e2e::listener(&bound, "inbound");
    let server = SERVER.parse().unwrap();

    // A slow response in flight (the backend holds its second chunk), and an idle h2
    // connection that must not hold the exit up.
    let mut slow = MeshClient::connect(&caller, &server, inbound, Some(&[b"http/1.1"]))
        .await
        .unwrap();
    let resp = slow
        .send(Request::get("/stream").body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "first\n");
    let mut idle = MeshClient::connect(&caller, &server, inbound, Some(&[b"h2"]))
        .await
        .unwrap();
    assert_eq!(idle.get("/x", &[]).await.unwrap().0, StatusCode::OK);

    mesh.signal("TERM");

    // New connections are refused soon after.
    refused_soon(inbound, &mesh).await;
    mesh.assert_running();

    // The request in flight completes, then the process exits 0 well before the deadline.
    backend.release_stream.notify_one();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "second\n");
    let status = tokio::task::block_in_place(|| mesh.wait_exit(Duration::from_secs(10)));
    assert!(status.success(), "{status}: {}", mesh.stderr());
    let log = mesh.stderr();
    assert!(log.contains("drained: every connection finished"), "{log}");
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_allowlist_keeps_connections_and_refuses_a_broken_config() {
    let Stage {
        dir,
        state,
        caller,
        backend,
        socket,
        file,
        _guards,
        ..
    } = stage().await;
    let (other, _other_agent) = identity(dir.path(), &state, OTHER).await;
    let (mut mesh, bound) = run_mesh_logging(dir.path(), "mesh", &file, "dstack_mesh=debug,info");
    let inbound = e2e::listener(&bound, "inbound");
    let server = SERVER.parse().unwrap();
    // Before: the caller is in, the other app is refused.
    let mut kept = MeshClient::connect(&caller, &server, inbound, Some(&[b"http/1.1"]))
        .await
        .unwrap();
    assert_eq!(get(&mut kept).await, StatusCode::OK);
    let refused = async {
        match MeshClient::connect(&other, &server, inbound, None).await {
            Err(_) => true,
            Ok(mut c) => c.get("/x", &[]).await.is_err(),
        }
    };
    assert!(refused.await, "the other app got in before the reload");
    // Logs: JSON, one debug line per request naming the caller, one warning per refusal
    // with the reason.
    let lines = || -> Vec<serde_json::Value> {
        mesh.stderr()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    };
    // The sidecar writes its line as it answers: the client can see the answer first.
    let find = |message: &str| {
        let has = || {
            lines()
                .into_iter()
                .find(|l| l["fields"]["message"] == message)
        };
        e2e::wait_until(
            &format!("a {message:?} log line"),
            Duration::from_secs(10),
            || has().is_some(),
        );
        has().unwrap_or_else(|| panic!("no {message:?} line: {}", mesh.stderr()))
    };
    let request = find("inbound request");
    assert_eq!(request["level"], "DEBUG");
    assert_eq!(request["fields"]["caller"], CALLER);
    assert_eq!(request["fields"]["status"], 200);
    let refusal = find("mesh caller refused");
    assert_eq!(refusal["level"], "WARN");
    assert_eq!(refusal["fields"]["reason"], "app_id_not_allowed");

    // A new allowlist entry takes effect; the connection opened before keeps working.
    std::fs::write(
        &file,
        config(&socket, backend.addr, &format!("{CALLER},{OTHER}")),
    )
    .unwrap();
    mesh.signal("HUP");
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut c) = MeshClient::connect(&other, &server, inbound, None).await {
            if c.get("/x", &[]).await.map(|r| r.0).ok() == Some(StatusCode::OK) {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < end,
            "the new entry never took effect: {}",
            mesh.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(get(&mut kept).await, StatusCode::OK);
    assert!(
        mesh.stderr().contains("configuration reloaded"),
        "{}",
        mesh.stderr()
    );

    // A broken configuration is refused with a log line; the running one stays.
    std::fs::write(&file, "[inbound]\nallowed_apps = \"not-an-app-id\"\n").unwrap();
    mesh.signal("HUP");
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    while !mesh.stderr().contains("configuration reload rejected") {
        assert!(
            tokio::time::Instant::now() < end,
            "no rejection logged: {}",
            mesh.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    mesh.assert_running();
    let mut again = MeshClient::connect(&other, &server, inbound, None)
        .await
        .unwrap();
    assert_eq!(get(&mut again).await, StatusCode::OK);
    assert_eq!(get(&mut kept).await, StatusCode::OK);
}

/// Wait (up to 5 s) until `inbound` refuses connections: after SIGTERM, no socket listens.
async fn refused_soon(inbound: std::net::SocketAddr, mesh: &e2e::ChildGuard) {
    let end = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::net::TcpStream::connect(inbound).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
            _ if tokio::time::Instant::now() > end => {
                panic!("still accepting after SIGTERM: {}", mesh.stderr())
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

async fn get(client: &mut MeshClient) -> StatusCode {
    client.get("/x", &[]).await.unwrap().0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_one_core_the_sidecar_runs_one_thread_serves_both_protocols_and_drains() {
    // `taskset -c 0`: one core, so one thread and no work stealing (runtime::Flavor).
    let mut cmd = std::process::Command::new("taskset");
    cmd.args(["-c", "0"]).arg(mesh_binary());
    let accepted = serves_both_protocols_and_drains(
        cmd,
        None,
        "\"runtime\":\"current-thread\",\"cores\":1,\"workers\":0",
    )
    .await;
    assert_eq!(accepted, vec![34], "one thread accepts every connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_workers_each_accept_connections_serve_both_protocols_and_drain() {
    // Two workers, each with its own SO_REUSEPORT socket: the kernel spreads the connections
    // (34 of them all on one socket: a chance of 2^-33).
    let accepted = serves_both_protocols_and_drains(
        std::process::Command::new(mesh_binary()),
        Some(("per-core", "2")),
        "\"runtime\":\"per-core\"",
    )
    .await;
    assert_eq!(accepted.len(), 2, "{accepted:?}");
    assert!(accepted.iter().all(|n| *n > 0), "{accepted:?}");
    assert_eq!(accepted.iter().sum::<u64>(), 34, "{accepted:?}");
}

/// Run the sidecar with `cmd` (its runtime chosen by `runtime`: `DSTACK_MESH_RUNTIME` and
/// `TOKIO_WORKER_THREADS`), check its log names the runtime, serve h1, h2 and 32 connections
/// at once, and drain with a stream in flight. The inbound connections each worker accepted.
async fn serves_both_protocols_and_drains(
    mut cmd: std::process::Command,
    runtime: Option<(&str, &str)>,
    logged: &str,
) -> Vec<u64> {
    let Stage {
        dir,
        caller,
        backend,
        file,
        _guards,
        ..
    } = stage().await;
    cmd.args(["--log-format", "json", "run", "--config"])
        .arg(&file)
        .env("RUST_LOG", "info,dstack_mesh::runtime=debug")
        .env_remove("DSTACK_MESH_RUNTIME")
        .env_remove("TOKIO_WORKER_THREADS")
        .env_remove("DSTACK_AGENT_ADDRESS");
    if let Some((flavor, workers)) = runtime {
        cmd.env("DSTACK_MESH_RUNTIME", flavor)
            .env("TOKIO_WORKER_THREADS", workers);
    }
    let (mut mesh, bound) = start_mesh(dir.path(), "runtime", cmd);
    let log = mesh.stderr();
    assert!(log.contains(logged), "{log}");
    let inbound = e2e::listener(&bound, "inbound");
    let server = SERVER.parse().unwrap();
    let mut h1 = MeshClient::connect(&caller, &server, inbound, Some(&[b"http/1.1"]))
        .await
        .unwrap();
    let mut h2 = MeshClient::connect(&caller, &server, inbound, Some(&[b"h2"]))
        .await
        .unwrap();
    // Many at once, and a stream in flight across the drain.
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let (caller, server) = (caller.clone(), server.clone());
        calls.spawn(async move {
            let mut c = MeshClient::connect(&caller, &server, inbound, None)
                .await
                .unwrap();
            get(&mut c).await
        });
    }
    while let Some(status) = calls.join_next().await {
        assert_eq!(status.unwrap(), StatusCode::OK);
    }
    assert_eq!(get(&mut h1).await, StatusCode::OK);
    assert_eq!(get(&mut h2).await, StatusCode::OK);
    let admin = e2e::listener(&bound, "admin");
    let accepted = e2e::client::accepted_per_thread(admin, "inbound").await;
    let resp = h2
        .send(Request::get("/stream").body(empty()).unwrap())
        .await
        .unwrap();
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "first\n");
    mesh.signal("TERM");
    // Every worker's socket closes: a refused connection means none is left listening.
    refused_soon(inbound, &mesh).await;
    backend.release_stream.notify_one();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "second\n");
    let status = tokio::task::block_in_place(|| mesh.wait_exit(Duration::from_secs(10)));
    assert!(status.success(), "{status}: {}", mesh.stderr());
    accepted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_another_sidecar_listens_on_fails_the_start_with_a_thread_per_core() {
    // Both with SO_REUSEPORT sockets: the second must not join the first's group and take half
    // of its connections.
    let Stage {
        dir,
        socket,
        backend,
        _guards,
        ..
    } = stage().await;
    let per_core = |file: &std::path::Path| {
        let mut cmd = std::process::Command::new(mesh_binary());
        cmd.args(["run", "--config"])
            .arg(file)
            .env("DSTACK_MESH_RUNTIME", "per-core")
            .env("TOKIO_WORKER_THREADS", "2")
            .env_remove("DSTACK_AGENT_ADDRESS");
        cmd
    };
    let first = dir.path().join("first.toml");
    std::fs::write(&first, config(&socket, backend.addr, CALLER)).unwrap();
    let (mut running, bound) = start_mesh(dir.path(), "first", per_core(&first));
    let taken = e2e::listener(&bound, "inbound");

    let second = dir.path().join("second.toml");
    let text = config(&socket, backend.addr, CALLER).replacen(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"{taken}\""),
        1,
    );
    std::fs::write(&second, text).unwrap();
    let mut refused = e2e::ChildGuard::spawn("second", per_core(&second), dir.path()).unwrap();
    let status = tokio::task::block_in_place(|| refused.wait_exit(Duration::from_secs(20)));
    assert_eq!(status.code(), Some(69), "{}", refused.stderr());
    let log = refused.stderr();
    assert!(log.contains(&format!("inbound.listen {taken}")), "{log}");
    assert!(log.contains("in use"), "{log}");
    running.assert_running();
}
