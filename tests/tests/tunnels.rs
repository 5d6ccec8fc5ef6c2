//! Attested TCP tunnels with a real database: Debian's Redis behind app B's sidecar
//! (`[[inbound.tcp]]`), reached from app A through a `[[tunnels]]` port with `redis-cli` and
//! through `CONNECT` on A's outbound proxy, with Debian's HAProxy as the dstack gateway (TLS
//! passthrough by SNI, `<app>-<port>s.<base>`). Sidecars run in-process on development agents
//! that share one KMS root.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use dstack_mesh::{app::App, config::Config, metrics::Direction};
use e2e::{
    identity, program,
    redis::{cli, cli_with_input, Redis},
    wait_until, ChildGuard,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// The caller.
const A: &str = "aaaa5555aaaa5555aaaa5555aaaa5555aaaa5555";
/// The database's app.
const B: &str = "bbbb6666bbbb6666bbbb6666bbbb6666bbbb6666";
/// An app under the same KMS root that B's service does not allow.
const C: &str = "cccc7777cccc7777cccc7777cccc7777cccc7777";
/// An app id the gateway (wrongly) routes to B's service.
const STRANGER: &str = "57a5e957a5e957a5e957a5e957a5e957a5e957a5";
/// An instance of B that is not the one serving: the gateway (wrongly) routes it to B's service.
const WRONG_INSTANCE: &str = "1235e9571235e9571235e9571235e9571235e957";
/// The gateway's base domain.
const BASE: &str = "gw.test";
/// The port B's Redis service is known by (the gateway's `<app>-<port>s` name).
const REDIS_PORT: u16 = 6379;
/// A port whose target accepts TCP and never answers TLS.
const SILENT_PORT: u16 = 7000;
/// A port whose service's backend is down.
const DOWN_PORT: u16 = 7001;
/// A port whose service's backend reads to the end of its input, then answers.
const COUNTER_PORT: u16 = 7002;

fn config(text: &str) -> Config {
    Config::from_toml(text, &HashMap::<&str, &str>::new()).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// B's database, B's sidecar, the gateway, and A's sidecar with a tunnel to the database.
struct World {
    dir: tempfile::TempDir,
    state: PathBuf,
    redis: Redis,
    /// Our own `INFO` connections to Redis so far.
    asked: std::sync::atomic::AtomicU64,
    b: App,
    a: App,
    gateway: SocketAddr,
    _haproxy: ChildGuard,
    _silent: tokio::task::JoinHandle<()>,
    _counter: tokio::task::JoinHandle<()>,
    _agents: Vec<tokio::task::JoinHandle<()>>,
}

impl World {
    /// `b_services` is added to B's `[[inbound.tcp]]` "redis" entry; `a_extra` to A's file.
    async fn start(b_service: &str, a_extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let redis = Redis::start(&dir.path().join("redis"));
        let (b_id, b_agent) = identity(dir.path(), &state, B).await;
        let (a_id, a_agent) = identity(dir.path(), &state, A).await;
        let down = {
            // A port nothing listens on: bound, then released.
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let (counter, counter_task) = counter_backend().await;
        let b = App::start_with(
            config(&format!(
                "[inbound]\nenabled = false\n[auth]\nenabled = false\n[admin]\nlisten = \"127.0.0.1:0\"\n[client]\nenabled = false\n\
                 [[inbound.tcp]]\nname = \"redis\"\nlisten = \"127.0.0.1:0\"\nbackend = \"{redis}\"\nallowed_apps = [\"{A}\"]\n{b_service}\n\
                 [[inbound.tcp]]\nname = \"down\"\nlisten = \"127.0.0.1:0\"\nbackend = \"{down}\"\nallowed_apps = \"any\"\n\
                 [[inbound.tcp]]\nname = \"counter\"\nlisten = \"127.0.0.1:0\"\nbackend = \"{counter}\"\nallowed_apps = \"any\"\nidle_timeout = \"5s\"\nmax_connections = 1\n",
                redis = redis.addr,
            )),
            b_id,
        )
        .await
        .unwrap();
        let (silent, silent_task) = silent_target().await;
        let b_instance = b.identity.current().instance_id.clone().unwrap();
        let (gateway, haproxy) = gateway(
            dir.path(),
            &[
                (B, REDIS_PORT, b.addr("tcp:redis").unwrap()),
                (STRANGER, REDIS_PORT, b.addr("tcp:redis").unwrap()),
                (&b_instance, REDIS_PORT, b.addr("tcp:redis").unwrap()),
                (WRONG_INSTANCE, REDIS_PORT, b.addr("tcp:redis").unwrap()),
                (B, SILENT_PORT, silent),
                (B, DOWN_PORT, b.addr("tcp:down").unwrap()),
                (B, COUNTER_PORT, b.addr("tcp:counter").unwrap()),
            ],
        );
        let a = App::start_with(config(&caller(gateway, a_extra)), a_id)
            .await
            .unwrap();
        Self {
            dir,
            state,
            redis,
            asked: Default::default(),
            b,
            a,
            gateway,
            _haproxy: haproxy,
            _silent: silent_task,
            _counter: counter_task,
            _agents: vec![a_agent, b_agent],
        }
    }

    /// A's tunnel port `name`.
    fn tunnel(&self, name: &str) -> SocketAddr {
        self.a.addr(&format!("tunnel:{name}")).unwrap()
    }

    /// A's outbound proxy.
    fn outbound(&self) -> SocketAddr {
        self.a.addr("outbound").unwrap()
    }

    /// Connections Redis has accepted, not counting ours that asked.
    fn redis_connections(&self) -> u64 {
        use std::sync::atomic::Ordering;
        let asked = self.asked.fetch_add(1, Ordering::SeqCst) + 1;
        self.redis.stat("total_connections_received") - asked
    }
}

/// A caller's configuration: outbound proxy dialling `gateway` for every name of `BASE`, a
/// tunnel to B's Redis, plus `extra`.
fn caller(gateway: SocketAddr, extra: &str) -> String {
    format!(
        "[inbound]\nenabled = false\n[auth]\nenabled = false\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [client]\naddress = \"127.0.0.1\"\nport = 0\n[dstack]\ngateway_domain = \"{BASE}\"\n\
         [outbound]\ngateway_address = \"{gateway}\"\nhandshake_timeout = \"2s\"\n\
         [[tunnels]]\nname = \"redis\"\nlisten = \"127.0.0.1:0\"\ntarget_app = \"{B}\"\ntarget_port = {REDIS_PORT}\n{extra}"
    )
}

/// A target that accepts TCP and then says nothing, ever.
async fn silent_target() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp);
        }
    });
    (addr, task)
}

/// A backend that reads until its input ends (the caller's half-close), then answers how many
/// bytes it read and closes.
async fn counter_backend() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut n = 0usize;
                let mut buf = vec![0u8; 65536];
                loop {
                    match tcp.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(k) => n += k,
                        Err(_) => return,
                    }
                }
                let _ = tcp.write_all(format!("read {n} bytes").as_bytes()).await;
                let _ = tcp.shutdown().await;
            });
        }
    });
    (addr, task)
}

/// Debian's HAProxy as the dstack gateway: each `(app, port, to)` passes TLS for
/// `<app>-<port>s.<BASE>` through to `to`, untouched.
fn gateway(dir: &Path, routes: &[(&str, u16, SocketAddr)]) -> (SocketAddr, ChildGuard) {
    for attempt in 1.. {
        let port = e2e::free_port();
        let mut config = format!(
            "defaults\n    mode tcp\n    timeout connect 10s\n    timeout client 300s\n    timeout server 300s\n\n\
             frontend gateway\n    bind 127.0.0.1:{port}\n    tcp-request inspect-delay 5s\n    tcp-request content accept if {{ req_ssl_hello_type 1 }}\n"
        );
        for (i, (app, p, _)) in routes.iter().enumerate() {
            config += &format!("    use_backend r{i} if {{ req_ssl_sni -i {app}-{p}s.{BASE} }}\n");
        }
        for (i, (_, _, to)) in routes.iter().enumerate() {
            config += &format!("\nbackend r{i}\n    server s {to}\n");
        }
        let file = dir.join("haproxy.cfg");
        std::fs::write(&file, config).unwrap();
        let mut cmd = Command::new(program("haproxy"));
        cmd.arg("-db").arg("-f").arg(&file);
        let mut haproxy = ChildGuard::spawn("haproxy", cmd, dir).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut exited = None;
        wait_until("haproxy to listen", Duration::from_secs(20), || {
            exited = haproxy.exited();
            exited.is_some() || std::net::TcpStream::connect(addr).is_ok()
        });
        match exited {
            None => return (addr, haproxy),
            Some(_) if attempt < 5 && haproxy.stderr().contains("cannot bind socket") => {}
            Some(status) => panic!("haproxy exited ({status}): {}", haproxy.stderr()),
        }
    }
    unreachable!()
}

/// `redis-cli` through `addr`: its standard output, trimmed; panics on failure.
fn redis(addr: SocketAddr, args: &[&str]) -> String {
    let out = cli(addr, args);
    assert!(
        out.status.success(),
        "redis-cli {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim_end().to_owned()
}

/// `CONNECT` on `outbound` for `authority` with `headers`: the status, the head's text, and
/// the stream (tunnelled after a 200, else the error body follows in the text).
async fn connect(
    outbound: SocketAddr,
    authority: &str,
    headers: &[(&str, &str)],
) -> (u16, String, TcpStream) {
    let mut tcp = TcpStream::connect(outbound).await.unwrap();
    let mut head = format!("CONNECT {authority} HTTP/1.1\r\nhost: {authority}\r\n");
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    head += "\r\n";
    tcp.write_all(head.as_bytes()).await.unwrap();
    // Byte by byte: nothing past the head may be taken from the tunnel.
    let mut text = Vec::new();
    while !text.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(30), tcp.read(&mut b))
            .await
            .expect("a CONNECT answer within 30 s")
            .unwrap();
        assert_eq!(n, 1, "closed mid-head: {}", String::from_utf8_lossy(&text));
        text.push(b[0]);
    }
    let mut text = String::from_utf8(text).unwrap();
    let status: u16 = text[9..12].parse().unwrap();
    if status != 200 {
        let length = text
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap())
            })
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        tcp.read_exact(&mut body).await.unwrap();
        text += &String::from_utf8_lossy(&body);
    }
    (status, text, tcp)
}

/// Send one RESP command on `tcp` and read one reply (simple, error, integer or bulk).
async fn resp(tcp: &mut TcpStream, args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend(b"\r\n");
    }
    tcp.write_all(&out).await.unwrap();
    let mut line = Vec::new();
    while !line.ends_with(b"\r\n") {
        line.push(tcp.read_u8().await.unwrap());
    }
    line.truncate(line.len() - 2);
    match line[0] {
        b'$' => {
            let n: usize = std::str::from_utf8(&line[1..]).unwrap().parse().unwrap();
            let mut data = vec![0u8; n + 2];
            tcp.read_exact(&mut data).await.unwrap();
            data.truncate(n);
            data
        }
        _ => line,
    }
}

/// The app sends a Redis PING into the tunnel at `addr` (`what`): its connection must be
/// closed, the bytes going nowhere.
async fn refused_tunnel(addr: SocketAddr, what: &str) {
    let mut app = TcpStream::connect(addr).await.unwrap();
    app.write_all(b"*1\r\n$4\r\nPING\r\n").await.unwrap();
    assert!(closed(&mut app).await, "{what} is closed");
}

/// Whether the peer closed `tcp` (end of stream or reset) within 15 s.
async fn closed(tcp: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(15), tcp.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

fn random_text(len: usize) -> Vec<u8> {
    use aws_lc_rs::rand::SecureRandom;
    let mut bytes = vec![0u8; len];
    aws_lc_rs::rand::SystemRandom::new()
        .fill(&mut bytes)
        .unwrap();
    // Letters only, so redis-cli's raw output is the value itself.
    bytes.iter().map(|b| b'a' + b % 26).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_commands_and_a_10_mib_value_cross_two_sidecars() {
    let w = World::start("", "").await;
    let before = w.redis_connections();

    // A static tunnel: redis-cli against A's local port, as if Redis were local.
    let tunnel = w.tunnel("redis");
    assert_eq!(redis(tunnel, &["PING"]), "PONG");
    assert_eq!(
        redis(tunnel, &["SET", "greeting", "hello over the mesh"]),
        "OK"
    );
    assert_eq!(redis(tunnel, &["GET", "greeting"]), "hello over the mesh");
    // 10 MiB in, 10 MiB out, byte for byte.
    let big = random_text(10 << 20);
    let file = w.dir.path().join("big");
    std::fs::write(&file, &big).unwrap();
    let out = cli_with_input(tunnel, &["-x", "SET", "big"], Some(&file));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(tunnel, &["GET", "big"]);
    assert!(out.status.success());
    assert_eq!(
        out.stdout.len(),
        big.len() + 1,
        "the value and redis-cli's newline"
    );
    assert!(
        out.stdout[..big.len()] == big[..],
        "the 10 MiB value changed on the way"
    );
    assert_eq!(redis(tunnel, &["STRLEN", "big"]), (10 << 20).to_string());

    // CONNECT with the routing headers, then with `<app>.dstack:<port>`.
    let port = REDIS_PORT.to_string();
    let (status, head, mut tcp) = connect(
        w.outbound(),
        "redis.internal:6379",
        &[("x-dstack-target-app", B), ("x-dstack-target-port", &port)],
    )
    .await;
    assert_eq!(status, 200, "{head}");
    assert_eq!(
        resp(&mut tcp, &[b"GET", b"greeting"]).await,
        b"hello over the mesh"
    );
    assert_eq!(resp(&mut tcp, &[b"STRLEN", b"big"]).await, b":10485760");
    let (status, head, mut tcp2) =
        connect(w.outbound(), &format!("{B}.dstack:{REDIS_PORT}"), &[]).await;
    assert_eq!(status, 200, "{head}");
    let value = resp(&mut tcp2, &[b"GET", b"big"]).await;
    assert!(
        value == big,
        "the 10 MiB value changed on the CONNECT tunnel"
    );
    // One instance by name: the gateway routes by it, the handshake checks it.
    let instance = w.b.identity.current().instance_id.clone().unwrap();
    let (status, head, mut tcp3) = connect(
        w.outbound(),
        &format!("{instance}.{B}.dstack:{REDIS_PORT}"),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{head}");
    assert_eq!(
        resp(&mut tcp3, &[b"GET", b"greeting"]).await,
        b"hello over the mesh"
    );
    drop((tcp, tcp2, tcp3));

    // redis-cli made 6 connections, CONNECT 3: every one came through a verified handshake,
    // and nothing else reached Redis.
    assert_eq!(w.redis_connections() - before, 9);
    let metrics = w.a.outbound.as_ref().unwrap().metrics();
    assert_eq!(metrics.tunnel_count(Direction::Outbound, "redis", "ok"), 6);
    assert_eq!(
        metrics.tunnel_count(Direction::Outbound, "connect", "ok"),
        3
    );
    // The admin port shows both ends.
    let routes = |app: &App| {
        let admin = app.addr("admin").unwrap().to_string();
        async move {
            let (_, body) = dstack_mesh::status::request(&admin, http::Method::GET, "/routes")
                .await
                .unwrap();
            serde_json::from_slice::<serde_json::Value>(&body).unwrap()
        }
    };
    let a_routes = routes(&w.a).await;
    assert_eq!(a_routes["tunnels"][0]["name"], "redis");
    assert_eq!(
        a_routes["tunnels"][0]["target"],
        format!("{B}:{REDIS_PORT}")
    );
    let b_routes = routes(&w.b).await;
    assert_eq!(b_routes["tcp"][0]["backend"], w.redis.addr.to_string());
    assert_eq!(b_routes["tcp"][0]["allowed"], A);
    let service = &w.b.tcp_services[0];
    assert_eq!(service.config().name, "redis");
    assert_eq!(
        service
            .metrics()
            .tunnel_count(Direction::Inbound, "redis", "ok"),
        9
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_tunnels_close_the_apps_connection_and_reach_no_backend() {
    let w = World::start(
        "",
        &format!(
            "[[tunnels]]\nname = \"stranger\"\nlisten = \"127.0.0.1:0\"\ntarget_app = \"{STRANGER}\"\ntarget_port = {REDIS_PORT}\n\
             [[tunnels]]\nname = \"silent\"\nlisten = \"127.0.0.1:0\"\ntarget_app = \"{B}\"\ntarget_port = {SILENT_PORT}\n\
             [[tunnels]]\nname = \"down\"\nlisten = \"127.0.0.1:0\"\ntarget_app = \"{B}\"\ntarget_port = {DOWN_PORT}\n\
             [[tunnels]]\nname = \"other-instance\"\nlisten = \"127.0.0.1:0\"\ntarget_app = \"{B}\"\ntarget_instance = \"{WRONG_INSTANCE}\"\ntarget_port = {REDIS_PORT}\n"
        ),
    )
    .await;
    // C: under the same root, not on the Redis service's allowlist.
    let (c_id, c_agent) = identity(w.dir.path(), &w.state, C).await;
    let c = App::start_with(config(&caller(w.gateway, "")), c_id)
        .await
        .unwrap();
    let before = w.redis_connections();

    // A wrong peer (the gateway routes STRANGER's name to B): refused inside the handshake.
    refused_tunnel(w.tunnel("stranger"), "a tunnel to the wrong peer").await;
    let (status, body, _) = connect(
        w.outbound(),
        &format!("{STRANGER}.dstack:{REDIS_PORT}"),
        &[],
    )
    .await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("peer identity mismatch"), "{body}");

    // The right app, another instance than the one named: refused inside the handshake too.
    refused_tunnel(w.tunnel("other-instance"), "a tunnel to another instance").await;
    let (status, body, _) = connect(
        w.outbound(),
        &format!("{WRONG_INSTANCE}.{B}.dstack:{REDIS_PORT}"),
        &[],
    )
    .await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("instance"), "{body}");

    // A caller the service does not allow: its tunnel closes, its CONNECT gets 502.
    refused_tunnel(c.addr("tunnel:redis").unwrap(), "a refused caller's tunnel").await;
    let (status, body, _) = connect(
        c.addr("outbound").unwrap(),
        &format!("{B}.dstack:{REDIS_PORT}"),
        &[],
    )
    .await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("peer refused this app"), "{body}");

    // A target that accepts TCP and never finishes TLS: closed at the handshake deadline,
    // CONNECT answered 504.
    let mut app = TcpStream::connect(w.tunnel("silent")).await.unwrap();
    assert!(
        closed(&mut app).await,
        "a tunnel to a silent target is closed"
    );
    let (status, body, _) = connect(w.outbound(), &format!("{B}.dstack:{SILENT_PORT}"), &[]).await;
    assert_eq!(status, 504, "{body}");

    // A service whose backend is down says so: the tunnel closes, CONNECT gets 502.
    let mut app = TcpStream::connect(w.tunnel("down")).await.unwrap();
    assert!(
        closed(&mut app).await,
        "a tunnel to a down backend is closed"
    );
    let (status, body, _) = connect(w.outbound(), &format!("{B}.dstack:{DOWN_PORT}"), &[]).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("could not reach its backend"), "{body}");

    // CONNECT without a target, or with a malformed one: 400, nothing dialled.
    let (status, body, _) = connect(w.outbound(), "example.com:443", &[]).await;
    assert_eq!(status, 400, "{body}");

    // Nothing of any of that reached Redis.
    assert_eq!(w.redis_connections(), before);
    let metrics = w.a.outbound.as_ref().unwrap().metrics();
    assert_eq!(
        metrics.tunnel_count(Direction::Outbound, "stranger", "peer_refused"),
        1
    );
    assert_eq!(
        metrics.tunnel_count(Direction::Outbound, "other-instance", "peer_refused"),
        1
    );
    assert_eq!(
        metrics.tunnel_count(Direction::Outbound, "silent", "timeout"),
        1
    );
    assert_eq!(
        metrics.tunnel_count(Direction::Outbound, "down", "backend_unreachable"),
        1
    );
    assert_eq!(metrics.tunnel_count(Direction::Outbound, "redis", "ok"), 0);
    let c_metrics = c.outbound.as_ref().unwrap().metrics();
    assert_eq!(
        c_metrics.tunnel_count(Direction::Outbound, "redis", "rejected_by_peer"),
        1
    );
    drop(c_agent);
}

#[tokio::test(flavor = "multi_thread")]
async fn half_close_idle_timeout_and_the_connection_cap() {
    let w = World::start("", "").await;
    let counter = format!("{B}.dstack:{COUNTER_PORT}");

    // Half-close: the app ends its input and still reads the backend's answer.
    let (status, head, mut tcp) = connect(w.outbound(), &counter, &[]).await;
    assert_eq!(status, 200, "{head}");
    let data = vec![7u8; 300_000];
    tcp.write_all(&data).await.unwrap();
    tcp.shutdown().await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(15), tcp.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer, "read 300000 bytes");

    // The service takes one connection at a time: a second waits in the backlog (CONNECT
    // answers 504 at the handshake deadline) until the first ends.
    let (status, head, mut first) = connect(w.outbound(), &counter, &[]).await;
    assert_eq!(status, 200, "{head}");
    let (status, body, _) = connect(w.outbound(), &counter, &[]).await;
    assert_eq!(status, 504, "{body}");
    // The first is idle: the service closes it after its 5 s idle limit.
    assert!(closed(&mut first).await, "an idle tunnel is closed");
    drop(first);
    let (status, head, _third) = connect(w.outbound(), &counter, &[]).await;
    assert_eq!(status, 200, "the slot came back: {head}");
}

#[tokio::test(flavor = "multi_thread")]
async fn reconnects_resume_the_tls_session_and_are_checked_again() {
    let w = World::start("", "").await;
    let tunnel = w.tunnel("redis");
    for _ in 0..5 {
        assert_eq!(redis(tunnel, &["PING"]), "PONG");
    }
    let a = w.a.outbound.as_ref().unwrap().metrics();
    assert_eq!(a.tunnel_count(Direction::Outbound, "redis", "ok"), 5);
    let resumed = a.tunnel_count(Direction::Outbound, "redis", "resumed");
    assert!(resumed >= 4, "the reconnections resumed: {resumed} of 4");
    // The service saw the same resumptions, and checked each caller's chain again.
    let b =
        w.b.tcp_services
            .iter()
            .find(|s| s.config().name == "redis")
            .unwrap();
    let b_resumed = b
        .metrics()
        .tunnel_count(Direction::Inbound, "redis", "resumed");
    assert_eq!(b_resumed, resumed);
    // A session B issued is never offered to another target: STRANGER's name reaches the
    // same service, and is refused in a full handshake.
    let (status, body, _) = connect(
        w.outbound(),
        &format!("{STRANGER}.dstack:{REDIS_PORT}"),
        &[],
    )
    .await;
    assert_eq!(status, 502, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resumed_session_past_its_certificates_is_replaced_by_a_full_handshake() {
    // Both sides on one-minute certificates, refreshed every ten seconds: a resumed session
    // carries the chains of its first full handshake, which expire after a minute while the
    // sidecars go on resuming. Each side checks the restored chain again; the one that finds it
    // expired refuses, and the dialling side forgets the session and makes a full handshake.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let state = d.join("state");
    let db = Redis::start(&d.join("redis"));
    let short = || ratls::identity::IdentityConfig {
        validity: Duration::from_secs(60),
        refresh_margin: Some(Duration::from_secs(50)),
        ..Default::default()
    };
    let (b_id, _b_agent) = e2e::identity_with(d, &state, B, None, short()).await;
    let (a_id, _a_agent) = e2e::identity_with(d, &state, A, None, short()).await;
    let b = App::start_with(
        config(&format!(
            "[inbound]\nenabled = false\n[auth]\nenabled = false\n[admin]\nenabled = false\n[client]\nenabled = false\n\
             [[inbound.tcp]]\nname = \"redis\"\nlisten = \"127.0.0.1:0\"\nbackend = \"{}\"\nallowed_apps = [\"{A}\"]\n",
            db.addr
        )),
        b_id,
    )
    .await
    .unwrap();
    let a = App::start_with(
        config(&format!(
            "[inbound]\nenabled = false\n[auth]\nenabled = false\n[admin]\nenabled = false\n\
             [client]\naddress = \"127.0.0.1\"\nport = 0\n[dstack]\ngateway_domain = \"fixed/{}\"\n\
             [[tunnels]]\nname = \"redis\"\nlisten = \"127.0.0.1:0\"\ntarget_app = \"{B}\"\ntarget_port = {REDIS_PORT}\n",
            b.addr("tcp:redis").unwrap()
        )),
        a_id,
    )
    .await
    .unwrap();
    let tunnel = a.addr("tunnel:redis").unwrap();
    // The first certificates of both sides, which the first full handshake carries.
    let first_expiry = a
        .identity
        .current()
        .not_after
        .max(b.identity.current().not_after);
    let mut pings = 0;
    while dstack_mesh::clock::unix_now() <= first_expiry + 2 {
        assert_eq!(redis(tunnel, &["PING"]), "PONG", "ping {pings} failed");
        pings += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let a_metrics = a.outbound.as_ref().unwrap().metrics();
    let b_metrics = b.tcp_services[0].metrics();
    assert_eq!(
        a_metrics.tunnel_count(Direction::Outbound, "redis", "ok"),
        pings
    );
    assert!(a_metrics.tunnel_count(Direction::Outbound, "redis", "resumed") > pings / 2);
    // A restored chain was refused once expired, and a full handshake replaced the session.
    let stale = a_metrics.tunnel_count(Direction::Outbound, "redis", "stale_session");
    assert!(stale >= 1, "no resumed session met an expired chain");
    let b_resumed = b_metrics.tunnel_count(Direction::Inbound, "redis", "resumed");
    assert!(b_resumed > 0);
}
