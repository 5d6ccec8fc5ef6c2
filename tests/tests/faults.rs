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

use e2e::{backend::Backend, dev_agent, listener, run_mesh};
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
}

/// A Unix-socket proxy in front of a guest agent, with a switch.
struct FaultyAgent {
    socket: PathBuf,
    mode: Arc<AtomicU8>,
    /// Connections seen in each mode.
    seen: Arc<[AtomicUsize; 4]>,
    /// Pass-through connections, cut when the mode changes (a pooled connection must not
    /// carry a request past a fault).
    open: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    _task: tokio::task::JoinHandle<()>,
}

impl FaultyAgent {
    fn start(dir: &Path, upstream: PathBuf) -> Self {
        let socket = dir.join("faulty-agent.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let mode = Arc::new(AtomicU8::new(Mode::Pass as u8));
        let seen: Arc<[AtomicUsize; 4]> = Arc::new(Default::default());
        let open = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let (mode, seen, open) = (mode.clone(), seen.clone(), open.clone());
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    let m = mode.load(Ordering::SeqCst);
                    seen[usize::from(m)].fetch_add(1, Ordering::SeqCst);
                    let upstream = upstream.clone();
                    let conn = tokio::spawn(async move {
                        match m {
                            m if m == Mode::Pass as u8 => {
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

/// Requests through A's outbound to B, one after another on a keep-alive connection (a new one
/// after any failure), counted.
struct Load {
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(outbound: SocketAddr) -> Self {
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let (ok, failed, stop) = (ok.clone(), failed.clone(), stop.clone());
            async move {
                let mut send = None;
                while !stop.load(Ordering::SeqCst) {
                    if send.is_none() {
                        if let Ok(tcp) = tokio::net::TcpStream::connect(outbound).await {
                            if let Ok((s, conn)) = hyper::client::conn::http1::handshake(
                                hyper_util::rt::TokioIo::new(tcp),
                            )
                            .await
                            {
                                tokio::spawn(conn);
                                send = Some(s);
                            }
                        }
                    }
                    let req = http::Request::get("/")
                        .header("host", "b")
                        .header("x-dstack-target-app", B)
                        .header("x-dstack-target-port", "443")
                        .body(e2e::client::empty())
                        .unwrap();
                    let status = match send.as_mut() {
                        Some(s) => match s.send_request(req).await {
                            // Read to the end: the connection carries the next request.
                            Ok(resp) => {
                                let status = resp.status();
                                http_body_util::BodyExt::collect(resp.into_body())
                                    .await
                                    .map(|_| status)
                                    .map_err(|e| e.to_string())
                            }
                            Err(e) => Err(e.to_string()),
                        },
                        None => Err("no connection to the outbound".to_owned()),
                    };
                    match status {
                        Ok(http::StatusCode::OK) => {
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        other => {
                            eprintln!("load: request failed: {other:?}");
                            failed.fetch_add(1, Ordering::SeqCst);
                            send = None;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        });
        Self {
            ok,
            failed,
            stop,
            task,
        }
    }

    fn ok(&self) -> usize {
        self.ok.load(Ordering::SeqCst)
    }

    async fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap();
        (
            self.ok.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
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
async fn the_agent_down_slow_or_garbled_at_refresh_loses_no_request_and_rotation_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (_agent_a, sock_a) = dev_agent(dir.path(), "agent-a", A, &state);
    let (_agent_b, sock_b) = dev_agent(dir.path(), "agent-b", B, &state);
    let faulty = FaultyAgent::start(dir.path(), sock_b);
    let backend = Backend::start().await;
    let b_inbound = e2e::free_port();
    let write = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    // B refreshes 6 s after each issue (a 60 s certificate, 54 s of margin) and gives the
    // agent 2 s per call: a fault costs retries at 1, 2, 4 s, far inside the margin.
    let b_config = write(
        "b.toml",
        format!(
            "[agent]\naddress = \"unix:{sock}\"\ntimeout = \"2s\"\n\
             [identity]\nvalidity = \"60s\"\nrefresh_margin = \"54s\"\n\
             [inbound]\nlisten = \"127.0.0.1:{b_inbound}\"\nbackend = \"{backend}\"\nallowed_apps = [\"{A}\"]\n\
             [auth]\nenabled = false\n[client]\nenabled = false\n[admin]\nlisten = \"127.0.0.1:0\"\n",
            sock = faulty.socket.display(),
            backend = backend.addr,
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
    let (_b, b_bound) = run_mesh(dir.path(), "b", &b_config);
    let (_a, a_bound) = run_mesh(dir.path(), "a", &a_config);
    let b_admin = listener(&b_bound, "admin");
    let load = Load::start(listener(&a_bound, "outbound"));
    until("the load to flow", Duration::from_secs(20), async || {
        load.ok() > 10
    })
    .await;

    for fault in [Mode::Down, Mode::Slow, Mode::Garbage] {
        let kept = not_after(b_admin).await;
        faulty.set(fault);
        // Two refresh attempts meet the fault: the identity is kept, traffic flows.
        until(
            &format!("two attempts while {fault:?}"),
            Duration::from_secs(30),
            async || faulty.seen(fault) >= 2,
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
