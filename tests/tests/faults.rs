//! Fault injection with a counting load: an outbound → inbound pair of real sidecar processes
//! carries requests all along while one dependency fails, and the test asserts that no request
//! failed and that the sidecar recovered by itself. The guest agent of the inbound side sits
//! behind a proxy that can be down, slow or answer garbage.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use e2e::{
    backend::Backend,
    dev_agent, listener,
    load::{Caller, Load, Target},
    run_mesh, ChildGuard,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{UnixListener, UnixStream},
};

const A: &str = "a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1";
const B: &str = "b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2";

/// What the agent proxy does with each connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Mode {
    /// Pass it to the agent.
    Pass,
    /// Close it at once, as a crashed agent's socket would.
    Down,
    /// Read the request and answer nothing for 30 s.
    Slow,
    /// Answer `200 OK` with a body that is not JSON.
    Garbage,
    /// Pass it to another agent of the same app with another CA, as an agent restarted
    /// without its state would be.
    NewCa,
}

/// A Unix-socket proxy in front of a guest agent, with a switch.
struct FaultyAgent {
    socket: PathBuf,
    mode: Arc<AtomicU8>,
    /// Connections seen in each mode.
    seen: Arc<[AtomicUsize; 5]>,
    /// Pass-through connections, cut when the mode changes (a pooled connection must not
    /// carry a request past a fault).
    open: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    _task: tokio::task::JoinHandle<()>,
}

impl FaultyAgent {
    /// In front of `upstream`; `other` is the agent with another CA.
    fn start(dir: &Path, upstream: PathBuf, other: PathBuf) -> Self {
        let socket = dir.join("faulty-agent.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let mode = Arc::new(AtomicU8::new(Mode::Pass as u8));
        let seen: Arc<[AtomicUsize; 5]> = Arc::new(Default::default());
        let open = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let (mode, seen, open) = (mode.clone(), seen.clone(), open.clone());
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    let m = mode.load(Ordering::SeqCst);
                    seen[usize::from(m)].fetch_add(1, Ordering::SeqCst);
                    let upstream = match m {
                        m if m == Mode::NewCa as u8 => other.clone(),
                        _ => upstream.clone(),
                    };
                    let conn = tokio::spawn(async move {
                        match m {
                            m if m == Mode::Pass as u8 || m == Mode::NewCa as u8 => {
                                if let Ok(mut agent) = UnixStream::connect(&upstream).await {
                                    let _ = tokio::io::copy_bidirectional(&mut client, &mut agent)
                                        .await;
                                }
                            }
                            m if m == Mode::Down as u8 => drop(client),
                            m if m == Mode::Slow as u8 => {
                                let mut buf = [0u8; 4096];
                                let _ = client.read(&mut buf).await;
                                tokio::time::sleep(Duration::from_secs(30)).await;
                            }
                            _ => {
                                let mut buf = [0u8; 4096];
                                let _ = client.read(&mut buf).await;
                                let body = "{\"key\": \"-----BEGIN";
                                let _ = client
                                    .write_all(
                                        format!(
                                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                                             content-length: {}\r\nconnection: close\r\n\r\n{body}",
                                            body.len()
                                        )
                                        .as_bytes(),
                                    )
                                    .await;
                            }
                        }
                    });
                    open.lock().unwrap().push(conn);
                }
            }
        });
        Self {
            socket,
            mode,
            seen,
            open,
            _task: task,
        }
    }

    fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
        for conn in self.open.lock().unwrap().drain(..) {
            conn.abort();
        }
    }

    fn seen(&self, mode: Mode) -> usize {
        self.seen[mode as usize].load(Ordering::SeqCst)
    }
}

/// A's outbound in front of B's inbound, sidecar processes; B serves `backend`.
struct Pair {
    outbound: SocketAddr,
    b_admin: SocketAddr,
    _a: ChildGuard,
    b: ChildGuard,
}

impl Pair {
    /// `b_head` opens B's configuration (`[agent]`, and `[identity]` if any).
    fn start(dir: &Path, sock_a: &Path, b_head: &str, backend: SocketAddr) -> Self {
        let b_inbound = e2e::free_port();
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let b_config = write(
            "b.toml",
            format!(
                "{b_head}\
                 [inbound]\nlisten = \"127.0.0.1:{b_inbound}\"\nbackend = \"{backend}\"\nallowed_apps = [\"{A}\"]\n\
                 [auth]\nenabled = false\n[client]\nenabled = false\n[admin]\nlisten = \"127.0.0.1:0\"\n",
            ),
        );
        let a_config = write(
            "a.toml",
            format!(
                "[agent]\naddress = \"unix:{sock}\"\n\
                 [inbound]\nenabled = false\n[auth]\nenabled = false\n\
                 [client]\naddress = \"127.0.0.1\"\nport = {port}\n\
                 [dstack]\ngateway_domain = \"fixed/127.0.0.1:{b_inbound}\"\n\
                 [admin]\nlisten = \"127.0.0.1:0\"\n",
                sock = sock_a.display(),
                port = e2e::free_port(),
            ),
        );
        let (b, b_bound) = run_mesh(dir, "b", &b_config);
        let (a, a_bound) = run_mesh(dir, "a", &a_config);
        Self {
            outbound: listener(&a_bound, "outbound"),
            b_admin: listener(&b_bound, "admin"),
            _a: a,
            b,
        }
    }

    /// Callers sending `GET /` to B through A, every 10 ms each.
    fn load(&self, callers: &[Caller]) -> Load {
        Load::start(
            Target::plain(self.outbound, &[("x-dstack-target-app", B)]),
            callers,
            Duration::from_millis(10),
        )
    }
}

/// B's mesh certificate expiry, from its admin port.
async fn not_after(admin: SocketAddr) -> i64 {
    let (_, body) = dstack_mesh::status::request(&admin.to_string(), http::Method::GET, "/routes")
        .await
        .unwrap();
    let routes: serde_json::Value = serde_json::from_slice(&body).unwrap();
    routes["identity"]["not_after"].as_i64().unwrap()
}

async fn until(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// Multi-threaded: the agent proxy runs on this runtime while `run_mesh` blocks one worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_down_at_start_delays_the_sidecar_until_it_answers() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (_agent_a, sock_a) = dev_agent(dir.path(), "agent-a", A, &state);
    let (_agent_b, sock_b) = dev_agent(dir.path(), "agent-b", B, &state);
    let faulty = Arc::new(FaultyAgent::start(dir.path(), sock_b.clone(), sock_b));
    faulty.set(Mode::Down);
    // The agent comes back after B tried it three times.
    let revive = tokio::spawn({
        let faulty = faulty.clone();
        async move {
            while faulty.seen(Mode::Down) < 3 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            faulty.set(Mode::Pass);
        }
    });
    let backend = Backend::start().await;
    let pair = Pair::start(
        dir.path(),
        &sock_a,
        &format!("[agent]\naddress = \"unix:{}\"\n", faulty.socket.display()),
        backend.addr,
    );
    revive.await.unwrap();
    let waited = pair.b.stderr().matches("guest agent not answering").count();
    assert!(
        waited >= 2,
        "B did not wait for the agent: {}",
        pair.b.stderr()
    );
    let load = pair.load(&[Caller::H1, Caller::H2]);
    until("the load to flow", Duration::from_secs(20), async || {
        load.ok() > 100
    })
    .await;
    let (ok, failed) = load.finish().await;
    eprintln!("B waited through {waited} failed agent calls; then {ok} requests, {failed} failed");
    assert_eq!(failed, 0);
}

// Multi-threaded: the agent proxy runs on this runtime while `run_mesh` blocks one worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_down_slow_garbled_or_under_a_new_ca_at_refresh_loses_no_request_and_rotation_resumes(
) {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (_agent_a, sock_a) = dev_agent(dir.path(), "agent-a", A, &state);
    let (_agent_b, sock_b) = dev_agent(dir.path(), "agent-b", B, &state);
    let (_agent_b2, sock_b2) = dev_agent(dir.path(), "agent-b2", B, &dir.path().join("state-2"));
    let faulty = FaultyAgent::start(dir.path(), sock_b, sock_b2);
    let backend = Backend::start().await;
    // B refreshes 6 s after each issue (a 60 s certificate, 54 s of margin) and gives the
    // agent 2 s per call: a fault costs retries at 1, 2, 4 s, far inside the margin.
    let pair = Pair::start(
        dir.path(),
        &sock_a,
        &format!(
            "[agent]\naddress = \"unix:{}\"\ntimeout = \"2s\"\n\
             [identity]\nvalidity = \"60s\"\nrefresh_margin = \"54s\"\n",
            faulty.socket.display()
        ),
        backend.addr,
    );
    let b_admin = pair.b_admin;
    let load = pair.load(&[Caller::H1]);
    until("the load to flow", Duration::from_secs(20), async || {
        load.ok() > 10
    })
    .await;

    // The agent's new CA is refused too: peers trust the root B started with.
    for fault in [Mode::Down, Mode::Slow, Mode::Garbage, Mode::NewCa] {
        let kept = not_after(b_admin).await;
        faulty.set(fault);
        // Two refresh attempts meet the fault: the identity is kept, traffic flows.
        until(
            &format!("two attempts while {fault:?}"),
            Duration::from_secs(30),
            // A kept-alive connection to the other agent carries every attempt: count them in
            // B's log.
            async || match fault {
                Mode::NewCa => pair.b.stderr().matches("chains to another root CA").count() >= 2,
                _ => faulty.seen(fault) >= 2,
            },
        )
        .await;
        assert_eq!(
            not_after(b_admin).await,
            kept,
            "{fault:?}: the identity changed"
        );
        let during = load.ok();
        faulty.set(Mode::Pass);
        // Rotation resumes by itself once the agent answers again.
        until(
            &format!("a refresh after {fault:?}"),
            Duration::from_secs(30),
            async || not_after(b_admin).await > kept,
        )
        .await;
        assert!(
            load.ok() > during,
            "{fault:?}: no request completed after the fault"
        );
        eprintln!(
            "{fault:?}: {} agent connections met the fault; identity kept, then rotated",
            faulty.seen(fault)
        );
    }
    let (ok, failed) = load.finish().await;
    eprintln!("{ok} requests through the faults, {failed} failed");
    assert_eq!(failed, 0, "requests failed while the agent was at fault");
}

/// A backend written on raw TCP, so that it can misbehave as no HTTP library would: `GET /`
/// answers `200 ok` on a kept-alive connection, which it closes after `idle` without a request
/// (shorter than the sidecar's pool keeps it); the other paths are faults.
struct FaultyBackend {
    addr: SocketAddr,
    /// Reset every connection, new or kept alive, as a crashed backend's port would.
    refuse: Arc<AtomicBool>,
    /// Connections still open that were stalled mid-body (`/stall`), and all such.
    stalled_open: Arc<AtomicUsize>,
    stalled: Arc<AtomicUsize>,
    /// Kept-alive connections the backend closed while they idled.
    idle_closed: Arc<AtomicUsize>,
    /// While set, idle connections are kept: a POST cannot be sent again when a close races
    /// it (RFC 9112 §9.3.1), so the single calls of the test run with no close to race.
    hold_idle: Arc<AtomicBool>,
    _task: tokio::task::JoinHandle<()>,
}

/// Request line, headers and body (de-chunked) of one request, or `None` at EOF.
async fn read_request(
    io: &mut tokio::io::BufReader<tokio::net::TcpStream>,
    idle: Duration,
    hold_idle: &AtomicBool,
) -> Option<(String, Vec<(String, String)>, Option<Vec<u8>>)> {
    use tokio::io::AsyncBufReadExt;
    // Wait for the next request with `fill_buf`, which loses nothing when the wait times out.
    loop {
        match tokio::time::timeout(idle, io.fill_buf()).await {
            Ok(Ok(buf)) if !buf.is_empty() => break,
            Err(_) if hold_idle.load(Ordering::SeqCst) => continue,
            _ => return None,
        }
    }
    let mut line = String::new();
    io.read_line(&mut line).await.ok()?;
    let path = line.split(' ').nth(1)?.to_owned();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        io.read_line(&mut h).await.ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    // The body is read by the caller of this function when it wants it (100-continue).
    let body = if header("expect").is_some() {
        None
    } else {
        Some(read_body(io, &headers).await?)
    };
    Some((path, headers, body))
}

async fn read_body(
    io: &mut tokio::io::BufReader<tokio::net::TcpStream>,
    headers: &[(String, String)],
) -> Option<Vec<u8>> {
    use tokio::io::AsyncBufReadExt;
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let mut body = Vec::new();
    if header("transfer-encoding") == Some("chunked") {
        loop {
            let mut size = String::new();
            io.read_line(&mut size).await.ok()?;
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            let mut chunk = vec![0u8; n + 2];
            io.read_exact(&mut chunk).await.ok()?;
            if n == 0 {
                return Some(body);
            }
            body.extend_from_slice(&chunk[..n]);
        }
    }
    let n: usize = header("content-length").map_or(Some(0), |v| v.parse().ok())?;
    body.resize(n, 0);
    io.read_exact(&mut body).await.ok()?;
    Some(body)
}

impl FaultyBackend {
    async fn start(idle: Duration) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let refuse = Arc::new(AtomicBool::new(false));
        let stalled_open = Arc::new(AtomicUsize::new(0));
        let stalled = Arc::new(AtomicUsize::new(0));
        let idle_closed = Arc::new(AtomicUsize::new(0));
        let hold_idle = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let (refuse, stalled_open, stalled, idle_closed, hold_idle) = (
                refuse.clone(),
                stalled_open.clone(),
                stalled.clone(),
                idle_closed.clone(),
                hold_idle.clone(),
            );
            async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    if refuse.load(Ordering::SeqCst) {
                        let _ = tcp.set_zero_linger();
                        drop(tcp);
                        continue;
                    }
                    let (refuse, stalled_open, stalled, idle_closed, hold_idle) = (
                        refuse.clone(),
                        stalled_open.clone(),
                        stalled.clone(),
                        idle_closed.clone(),
                        hold_idle.clone(),
                    );
                    tokio::spawn(async move {
                        let mut io = tokio::io::BufReader::new(tcp);
                        let mut served = 0;
                        while let Some((path, headers, body)) =
                            read_request(&mut io, idle, &hold_idle).await
                        {
                            if refuse.load(Ordering::SeqCst) {
                                let _ = io.get_ref().set_zero_linger();
                                return;
                            }
                            served += 1;
                            let stalls = (&*stalled_open, &*stalled);
                            if !serve(&mut io, &path, &headers, body, stalls).await {
                                return;
                            }
                        }
                        if served > 0 {
                            idle_closed.fetch_add(1, Ordering::SeqCst);
                        }
                    });
                }
            }
        });
        Self {
            addr,
            refuse,
            stalled_open,
            stalled,
            idle_closed,
            hold_idle,
            _task: task,
        }
    }
}

/// Answer one request; `false` when the connection is done with.
async fn serve(
    io: &mut tokio::io::BufReader<tokio::net::TcpStream>,
    path: &str,
    headers: &[(String, String)],
    body: Option<Vec<u8>>,
    (stalled_open, stalled): (&AtomicUsize, &AtomicUsize),
) -> bool {
    let tcp = io.get_mut();
    let answer = |status: &str, body: &str| {
        format!(
            "HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    match path {
        "/reset" => {
            // Promise 100,000 bytes, send 1,000, then reset.
            let _ = tcp
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n")
                .await;
            let _ = tcp.write_all(&[b'r'; 1000]).await;
            let _ = tcp.set_zero_linger();
            false
        }
        "/stall" => {
            let _ = tcp
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n")
                .await;
            let _ = tcp.write_all(&[b's'; 1000]).await;
            stalled_open.fetch_add(1, Ordering::SeqCst);
            stalled.fetch_add(1, Ordering::SeqCst);
            // Nothing more, ever: wait for the peer to give up (EOF or reset).
            let mut buf = [0u8; 1024];
            while matches!(tcp.read(&mut buf).await, Ok(n) if n > 0) {}
            stalled_open.fetch_sub(1, Ordering::SeqCst);
            false
        }
        // 100-continue answered oddly: never, twice, or refused with 417 without reading.
        "/continue-never" | "/continue-twice" | "/continue-refused" => {
            if path == "/continue-refused" {
                let _ = tcp
                    .write_all(answer("417 Expectation Failed", "no").as_bytes())
                    .await;
                return false;
            }
            if path == "/continue-twice" {
                let _ = tcp
                    .write_all(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n")
                    .await;
            }
            let body = match body {
                Some(b) => b,
                None => match read_body(io, headers).await {
                    Some(b) => b,
                    None => return false,
                },
            };
            let n = body.len().to_string();
            io.get_mut()
                .write_all(answer("200 OK", &n).as_bytes())
                .await
                .is_ok()
        }
        _ => tcp
            .write_all(answer("200 OK", "ok").as_bytes())
            .await
            .is_ok(),
    }
}

/// One request through A's outbound to B on a connection of its own: the status and the body,
/// or where it broke.
async fn call(
    outbound: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &'static [u8],
) -> Result<(http::StatusCode, Vec<u8>), String> {
    let tcp = tokio::net::TcpStream::connect(outbound)
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = http::Request::post(path)
        .header("host", "b")
        .header("x-dstack-target-app", B);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = send
        .send_request(req.body(e2e::client::full(body)).unwrap())
        .await
        .map_err(|e| format!("head: {e}"))?;
    let status = resp.status();
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok((status, body.to_vec()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misbehaving_backend_fails_only_the_requests_it_breaks() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (_agent_a, sock_a) = dev_agent(dir.path(), "agent-a", A, &state);
    let (_agent_b, sock_b) = dev_agent(dir.path(), "agent-b", B, &state);
    // The backend closes kept-alive connections after 10 ms idle, as long as the callers
    // pause: requests meet connections the backend is closing.
    let backend = FaultyBackend::start(Duration::from_millis(10)).await;
    let pair = Pair::start(
        dir.path(),
        &sock_a,
        &format!("[agent]\naddress = \"unix:{}\"\n", sock_b.display()),
        backend.addr,
    );
    let load = pair.load(&[Caller::H1, Caller::H2]);
    until("the load to flow", Duration::from_secs(20), async || {
        load.ok() > 20
    })
    .await;

    // The single calls below are POSTs, which no proxy may send again when an idle close
    // races them: the backend keeps its connections until they are done.
    backend.hold_idle.store(true, Ordering::SeqCst);

    // Reset mid-response: the caller sees a broken response (a cut body, a connection closed
    // before the head, or a 502 when the reset overtakes the head between the sidecars),
    // never a short body passed as whole.
    let reset = call(pair.outbound, "/reset", &[], b"").await;
    assert!(
        !matches!(&reset, Ok((s, _)) if s.is_success()),
        "a reset backend: {reset:?}"
    );

    // Stalled mid-body: the caller gets what was sent; when it gives up, the backend's
    // connection is closed too (nothing held for a caller that left).
    let stall = tokio::time::timeout(
        Duration::from_secs(2),
        call(pair.outbound, "/stall", &[], b""),
    )
    .await;
    assert!(stall.is_err(), "a stalled body ended: {stall:?}");
    assert_eq!(
        backend.stalled.load(Ordering::SeqCst),
        1,
        "the backend stalled"
    );
    until(
        "the stalled backend connection to close",
        Duration::from_secs(10),
        async || backend.stalled_open.load(Ordering::SeqCst) == 0,
    )
    .await;

    // 100-continue: never answered, answered twice, refused.
    let body: &'static [u8] = &[b'x'; 5000];
    let expect = [("expect", "100-continue")];
    let never = call(pair.outbound, "/continue-never", &expect, body).await;
    assert_eq!(never, Ok((http::StatusCode::OK, b"5000".to_vec())));
    let twice = call(pair.outbound, "/continue-twice", &expect, body).await;
    assert_eq!(twice, Ok((http::StatusCode::OK, b"5000".to_vec())));
    let refused = call(pair.outbound, "/continue-refused", &expect, body).await;
    assert!(
        matches!(&refused, Ok((s, _)) if *s == http::StatusCode::EXPECTATION_FAILED),
        "{refused:?}"
    );
    backend.hold_idle.store(false, Ordering::SeqCst);

    // Kept-alive connections closed by the backend cost no request.
    until(
        "idle closes by the backend",
        Duration::from_secs(20),
        async || backend.idle_closed.load(Ordering::SeqCst) >= 20,
    )
    .await;
    let (ok, failed) = (load.ok(), load.counts().failed());
    eprintln!(
        "{ok} requests through a reset, a stall, three odd 100-continues and {} idle closes; {failed} failed",
        backend.idle_closed.load(Ordering::SeqCst)
    );
    assert_eq!(failed, 0, "requests failed that the faults did not touch");

    // Refused: those requests fail fast with the proxy's 502; once the backend is back,
    // nothing fails.
    backend.refuse.store(true, Ordering::SeqCst);
    let started = std::time::Instant::now();
    let refused = call(pair.outbound, "/", &[], b"").await;
    assert!(
        matches!(&refused, Ok((s, _)) if *s == http::StatusCode::BAD_GATEWAY),
        "{refused:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    until(
        "callers to meet the refusal",
        Duration::from_secs(10),
        async || load.counts().failed() > failed,
    )
    .await;
    backend.refuse.store(false, Ordering::SeqCst);
    let after = load.counts().failed();
    let ok_then = load.ok();
    until(
        "traffic after the refusal",
        Duration::from_secs(20),
        async || load.ok() > ok_then + 50,
    )
    .await;
    let (_, failed_end) = load.finish().await;
    // A request already on its way when the backend came back may still have met the refusal.
    assert!(
        failed_end <= after + 2,
        "{} requests failed after the backend came back",
        failed_end - after
    );
}

/// Third app: A's unrelated peer while B fails.
const C: &str = "c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3";

/// The configuration of an inbound-only sidecar for the agent at `sock`, on `port`, allowing
/// A; `inbound` adds lines to `[inbound]`. Written to `<dir>/<name>.toml`.
fn inbound_config(
    dir: &Path,
    name: &str,
    sock: &Path,
    port: u16,
    backend: SocketAddr,
    inbound: &str,
) -> PathBuf {
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "[agent]\naddress = \"unix:{sock}\"\n\
             [inbound]\nlisten = \"127.0.0.1:{port}\"\nbackend = \"{backend}\"\nallowed_apps = [\"{A}\"]\n{inbound}\
             [auth]\nenabled = false\n[client]\nenabled = false\n[admin]\nlisten = \"127.0.0.1:0\"\n",
            sock = sock.display(),
        ),
    )
    .unwrap();
    config
}

/// An inbound-only sidecar for `app`'s agent at `sock`, on `port`, allowing A.
fn inbound_sidecar(
    dir: &Path,
    name: &str,
    sock: &Path,
    port: u16,
    backend: SocketAddr,
) -> ChildGuard {
    let config = inbound_config(dir, name, sock, port, backend, "");
    run_mesh(dir, name, &config).0
}

/// `GET /stream` on B through A (HTTP/1.1, or h2 with prior knowledge): the body, once its
/// first chunk came, for the test to read on.
async fn open_stream(outbound: SocketAddr, h2: bool) -> hyper::body::Incoming {
    let tcp = tokio::net::TcpStream::connect(outbound).await.unwrap();
    let io = hyper_util::rt::TokioIo::new(tcp);
    let req = http::Request::get("http://b/stream")
        .header("x-dstack-target-app", B)
        .body(e2e::client::empty())
        .unwrap();
    let resp = if h2 {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .unwrap();
        tokio::spawn(conn);
        send.send_request(req).await.unwrap()
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        send.send_request(req).await.unwrap()
    };
    assert_eq!(resp.status(), http::StatusCode::OK);
    let mut body = resp.into_body();
    let first = http_body_util::BodyExt::frame(&mut body)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "first\n");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_killed_mid_stream_fails_only_its_own_requests_and_is_dialled_again_when_back() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (_agent_a, sock_a) = dev_agent(dir.path(), "agent-a", A, &state);
    let (_agent_b, sock_b) = dev_agent(dir.path(), "agent-b", B, &state);
    let (_agent_c, sock_c) = dev_agent(dir.path(), "agent-c", C, &state);
    let (backend_b, backend_c) = (Backend::start().await, Backend::start().await);
    let (b_port, c_port) = (e2e::free_port(), e2e::free_port());
    let mut b = inbound_sidecar(dir.path(), "b", &sock_b, b_port, backend_b.addr);
    let _c = inbound_sidecar(dir.path(), "c", &sock_c, c_port, backend_c.addr);
    let a_config = dir.path().join("a.toml");
    std::fs::write(
        &a_config,
        format!(
            "[agent]\naddress = \"unix:{sock}\"\n\
             [inbound]\nenabled = false\n[auth]\nenabled = false\n\
             [client]\naddress = \"127.0.0.1\"\nport = {port}\n\
             [dstack]\ngateway_domain = \"fixed/127.0.0.1:{b_port}\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n\
             [outbound.routes]\n\"{C}\" = \"127.0.0.1:{c_port}\"\n",
            sock = sock_a.display(),
            port = e2e::free_port(),
        ),
    )
    .unwrap();
    let (_a, a_bound) = run_mesh(dir.path(), "a", &a_config);
    let outbound = listener(&a_bound, "outbound");
    let callers = [Caller::H1, Caller::H2];
    let pause = Duration::from_millis(10);
    let to_b = Load::start(
        Target::plain(outbound, &[("x-dstack-target-app", B)]),
        &callers,
        pause,
    );
    let to_c = Load::start(
        Target::plain(outbound, &[("x-dstack-target-app", C)]),
        &callers,
        pause,
    );
    until("the load to flow", Duration::from_secs(20), async || {
        to_b.ok() > 20 && to_c.ok() > 20
    })
    .await;

    // Two streams in flight to B, over HTTP/1.1 and h2 from the app, multiplexed on A's h2
    // connection to B; then B is killed.
    let mut streams = [
        open_stream(outbound, false).await,
        open_stream(outbound, true).await,
    ];
    b.signal("KILL");
    b.wait_exit(Duration::from_secs(10));
    // Each ends with an error, promptly: neither hangs nor passes for a complete body.
    for (stream, proto) in streams.iter_mut().zip(["HTTP/1.1", "h2"]) {
        let end = tokio::time::timeout(
            Duration::from_secs(10),
            http_body_util::BodyExt::frame(stream),
        )
        .await
        .unwrap_or_else(|_| panic!("{proto}: the stream hung after its peer died"));
        assert!(
            matches!(end, Some(Err(_))),
            "{proto}: the stream ended without an error: {end:?}"
        );
    }
    until(
        "callers of B to see it down",
        Duration::from_secs(10),
        async || to_b.counts().failed() > 0,
    )
    .await;

    // B back on its port: A dials it again by itself.
    let _b = inbound_sidecar(dir.path(), "b-again", &sock_b, b_port, backend_b.addr);
    let back = to_b.ok();
    until("traffic to B again", Duration::from_secs(20), async || {
        to_b.ok() > back + 50
    })
    .await;
    let failed_when_back = to_b.counts().failed();
    let ok_when_back = to_b.ok();
    until("more traffic to B", Duration::from_secs(20), async || {
        to_b.ok() > ok_when_back + 200
    })
    .await;
    let (b_ok, b_failed) = to_b.finish().await;
    let (c_ok, c_failed) = to_c.finish().await;
    eprintln!(
        "to B: {b_ok} ok, {b_failed} failed (while it was down); to C: {c_ok} ok, {c_failed} failed"
    );
    assert_eq!(
        b_failed, failed_when_back,
        "requests to B failed after it came back"
    );
    assert_eq!(c_failed, 0, "requests to C failed while B was down");
}

/// A mesh caller (app A, in-process identity) of an inbound at `addr`.
fn mesh_target(identity: &ratls::identity::RotatingIdentity, addr: SocketAddr) -> Target {
    let policy =
        ratls::Policy::new(identity.current().trust_anchors().unwrap()).expect(B.parse().unwrap());
    let tls = ratls::tls::mesh_client_config(identity.resolver(), Arc::new(policy)).unwrap();
    Target {
        addr,
        tls: Some((Arc::new(tls), "b.mesh".try_into().unwrap())),
        host: "b.mesh".to_owned(),
        headers: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_accept_backs_off_serves_what_it_holds_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (_agent_b, sock_b) = dev_agent(dir.path(), "agent-b", B, &state);
    let backend = Backend::start().await;
    let port = e2e::free_port();
    let config = inbound_config(dir.path(), "b", &sock_b, port, backend.addr, "");
    // B may hold 128 descriptors, ~30 of them its own.
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", "ulimit -n 128 && exec \"$0\" \"$@\""])
        .arg(e2e::mesh_binary())
        .args(["--log-format", "json", "run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info");
    let (b, _) = e2e::start_mesh(dir.path(), "b", cmd);
    let limit = std::fs::read_to_string(format!("/proc/{}/limits", b.id())).unwrap();
    assert!(
        limit
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains(" 128 ")),
        "{limit}"
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (caller, _agent_a) = e2e::identity(dir.path(), &state, A).await;
    // One kept-alive h2 connection, accepted before the descriptors run out.
    let held = Load::start(
        mesh_target(&caller, addr),
        &[Caller::H2],
        Duration::from_millis(10),
    );
    until(
        "the held connection to serve",
        Duration::from_secs(20),
        async || held.ok() > 20,
    )
    .await;

    // 300 connections that say nothing: B accepts until it has no descriptor left.
    let mut flood = Vec::new();
    for _ in 0..300 {
        flood.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    until(
        "accept to fail for want of descriptors",
        Duration::from_secs(10),
        async || b.stderr().contains("Too many open files"),
    )
    .await;
    let during = held.ok();
    until(
        "the held connection to keep serving",
        Duration::from_secs(10),
        async || held.ok() > during + 100,
    )
    .await;
    let backoffs = b.stderr().matches("accept failed").count();

    // The flood leaves: B accepts again, new handshakes included.
    drop(flood);
    let fresh = Load::start(
        mesh_target(&caller, addr),
        &[Caller::Fresh],
        Duration::from_millis(10),
    );
    until(
        "new connections to be served again",
        Duration::from_secs(20),
        async || fresh.ok() > 20,
    )
    .await;
    let (held_ok, held_failed) = held.finish().await;
    let (fresh_ok, fresh_failed) = fresh.finish().await;
    eprintln!(
        "{backoffs} accept back-offs; held connection {held_ok} ok / {held_failed} failed; \
         new connections after: {fresh_ok} ok / {fresh_failed} failed"
    );
    assert_eq!(
        held_failed, 0,
        "the held connection failed while accept was starved"
    );
    assert!(backoffs > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_on_an_expired_callers_connection_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (_agent_b, sock_b) = dev_agent(dir.path(), "agent-b", B, &state);
    let backend = Backend::start().await;
    let port = e2e::free_port();
    let config = inbound_config(
        dir.path(),
        "b",
        &sock_b,
        port,
        backend.addr,
        "idle_timeout = \"2s\"\n",
    );
    let (_b, _) = run_mesh(dir.path(), "b", &config);
    // A caller whose certificate lives 10 s.
    let (caller, _agent_a) = e2e::identity_with(
        dir.path(),
        &state,
        A,
        None,
        ratls::identity::IdentityConfig {
            validity: ratls::identity::MIN_VALIDITY,
            ..Default::default()
        },
    )
    .await;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut client = e2e::client::MeshClient::connect(&caller, &B.parse().unwrap(), addr, None)
        .await
        .unwrap();
    // `/stream` sends its first chunk, then nothing until the gate opens (never here) or 20 s
    // pass, when it ends cleanly. Past the certificate's expiry the quiet stream is a stall.
    let resp = client
        .send(
            http::Request::get("https://b.mesh/stream")
                .body(e2e::client::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = resp.into_body();
    let first = http_body_util::BodyExt::frame(&mut body)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "first\n");
    let end = tokio::time::timeout(
        Duration::from_secs(40),
        http_body_util::BodyExt::frame(&mut body),
    )
    .await
    .expect("the stream neither ended nor was cut");
    assert!(
        matches!(end, Some(Err(_))),
        "the stalled stream was not cut: {end:?}"
    );
}
