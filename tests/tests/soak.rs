//! The rotation soak: an outbound → inbound pair of sidecar processes whose identities live a
//! few seconds, a public domain on the inbound whose certificates (pebble) live as long, and a
//! SIGHUP to both every few seconds, all under a constant mixed load: HTTP/1.1 and h2 callers
//! through the outbound, a direct mesh caller with its own rotating identity, browser-style
//! callers on the public domain, one long WebSocket and one long streaming upload. Nothing may
//! fail, the long streams must live to the end, connections must really be replaced at
//! expiry, and memory and file descriptors must stay flat.
//!
//! In the suite it runs for a few rotations. `scripts/soak` runs it for 100 rotations (the
//! rotation soak) or an hour (the long soak), through these variables:
//! - `SOAK_ROTATIONS`: rotations of each identity, and public renewals, to wait for (3);
//! - `SOAK_SECONDS`: and at least this long (40: past an expired caller's first connection
//!   plus the 30 s a drain would give its requests, so that a cut long stream shows);
//! - `SOAK_VALIDITY`: seconds an identity and a public certificate live (12; refreshed at
//!   two thirds);
//! - `SOAK_RELOAD_EVERY`, `SOAK_SAMPLE_EVERY`: seconds between reloads and samples (10, 2);
//! - `SOAK_CSV`: where the samples go (in the test's directory otherwise).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::{
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use e2e::{
    backend::Backend,
    dev_agent, free_port, identity_with, listener,
    load::{footprint, percentile, Caller, Load, Target},
    pebble::{Pebble, PebbleOptions},
    run_mesh, ChildGuard,
};
use http_body_util::BodyExt;
use ratls::{identity::IdentityConfig, tls::mesh_client_config, AppId, Policy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const A: &str = "a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1";
const B: &str = "b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2";
/// A third app calling B's mesh listener directly.
const C: &str = "c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3";
const DOMAIN: &str = "app.soak.test";

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v}: not a number"))
        })
        .unwrap_or(default)
}

struct Settings {
    rotations: usize,
    seconds: u64,
    validity: Duration,
    reload_every: Duration,
    sample_every: Duration,
}

impl Settings {
    fn from_env() -> Self {
        Self {
            rotations: setting("SOAK_ROTATIONS", 3) as usize,
            seconds: setting("SOAK_SECONDS", 40),
            validity: Duration::from_secs(setting("SOAK_VALIDITY", 12)),
            reload_every: Duration::from_secs(setting("SOAK_RELOAD_EVERY", 10)),
            sample_every: Duration::from_secs(setting("SOAK_SAMPLE_EVERY", 2)),
        }
    }
}

/// GET `path` on a sidecar's admin listener, as JSON.
async fn admin(addr: SocketAddr, path: &str) -> serde_json::Value {
    let (_, body) = dstack_mesh::status::request(&addr.to_string(), http::Method::GET, path)
        .await
        .unwrap();
    serde_json::from_slice(&body).unwrap()
}

/// Sum of the counter samples named `name` whose labels contain `labels`.
async fn counter(addr: SocketAddr, name: &str, labels: &str) -> u64 {
    let (_, body) = dstack_mesh::status::request(&addr.to_string(), http::Method::GET, "/metrics")
        .await
        .unwrap();
    String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Counts the distinct values a polled number takes (rotations of an identity, renewals of a
/// certificate), in a task.
struct Changes {
    seen: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Changes {
    fn watch(
        admin_addr: SocketAddr,
        read: fn(&serde_json::Value) -> Option<i64>,
        path: &'static str,
    ) -> Self {
        let seen = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn({
            let seen = seen.clone();
            async move {
                let mut last = None;
                loop {
                    let now = read(&admin(admin_addr, path).await);
                    if now.is_some() && now != last {
                        if last.is_some() {
                            seen.fetch_add(1, Ordering::SeqCst);
                        }
                        last = now;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        });
        Self { seen, task }
    }

    fn count(&self) -> usize {
        self.seen.load(Ordering::SeqCst)
    }
}

impl Drop for Changes {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn identity_expiry(routes: &serde_json::Value) -> Option<i64> {
    routes["identity"]["not_after"].as_i64()
}

fn served_expiry(certs: &serde_json::Value) -> Option<i64> {
    certs
        .as_array()?
        .iter()
        .find(|c| c["domain"] == DOMAIN && c["status"] == "valid")?["not_after"]
        .as_i64()
}

/// A WebSocket through the outbound to B's backend, echoing a numbered message every 200 ms
/// until stopped; the echoes that came back right, or the first failure.
fn long_websocket(
    outbound: SocketAddr,
    stop: Arc<AtomicBool>,
    echoes: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<Result<(), String>> {
    tokio::spawn(async move {
        let mut ws = e2e::client::websocket_via(outbound, B).await;
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let message = format!("message {n:>12}\n");
            ws.write_all(message.as_bytes())
                .await
                .map_err(|e| format!("WebSocket write {n}: {e}"))?;
            let mut back = vec![0u8; message.len()];
            tokio::time::timeout(Duration::from_secs(10), ws.read_exact(&mut back))
                .await
                .map_err(|_| format!("WebSocket echo {n}: none within 10 s"))?
                .map_err(|e| format!("WebSocket echo {n}: {e}"))?;
            if back != message.as_bytes() {
                return Err(format!(
                    "WebSocket echo {n}: {:?}",
                    String::from_utf8_lossy(&back)
                ));
            }
            n += 1;
            echoes.store(n, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    })
}

/// One POST through the outbound to B's `/upload`, 16 KiB every 100 ms until stopped; at the
/// end the backend's count and SHA-256 must be those of what was sent.
fn long_upload(
    outbound: SocketAddr,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<Result<(), String>> {
    tokio::spawn(async move {
        let tcp = tokio::net::TcpStream::connect(outbound)
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let (tx, body) = e2e::client::channel();
        let req = http::Request::post("/upload")
            .header("host", "b")
            .header("x-dstack-target-app", B)
            .body(body)
            .unwrap();
        let response = tokio::spawn(send.send_request(req));
        let mut digest = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        let mut total = 0u64;
        let mut chunk = vec![0u8; 16 * 1024];
        while !stop.load(Ordering::SeqCst) {
            chunk.fill(total.to_le_bytes()[1]);
            digest.update(&chunk);
            total += chunk.len() as u64;
            tx.send(Bytes::copy_from_slice(&chunk))
                .await
                .map_err(|_| format!("the upload was cut after {total} bytes"))?;
            sent.store(total, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop(tx);
        let resp = tokio::time::timeout(Duration::from_secs(10), response)
            .await
            .map_err(|_| "no answer to the upload within 10 s".to_owned())?
            .unwrap()
            .map_err(|e| format!("upload: {e}"))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let answer: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|_| format!("upload: {status} {}", String::from_utf8_lossy(&body)))?;
        let expected = e2e::backend::hex(digest.finish().as_ref());
        if answer["received"] != total || answer["sha256"] != expected.as_str() {
            return Err(format!(
                "upload: sent {total} bytes ({expected}), backend saw {answer}"
            ));
        }
        Ok(())
    })
}

/// One row of the samples.
struct Sample {
    t: f64,
    a: (u64, usize),
    b: (u64, usize),
}

/// The columns of the CSV.
const HEADER: &str = "t_s,a_rss_kib,a_fds,b_rss_kib,b_fds,\
outbound_ok,outbound_failed,outbound_p99_us,mesh_ok,mesh_failed,mesh_p99_us,\
public_ok,public_failed,public_p99_us,retried,a_rotations,b_rotations,renewals,reloads,\
ws_echoes,upload_bytes";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotations_renewals_and_reloads_under_mixed_load_lose_nothing() {
    let settings = Settings::from_env();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (_agent_a, sock_a) = dev_agent(dir.path(), "agent-a", A, &state);
    let (_agent_b, sock_b) = dev_agent(dir.path(), "agent-b", B, &state);
    let backend = Backend::start().await;
    let (b_inbound, b_http) = (free_port(), free_port());
    let pebble = {
        let (pebble_dir, validity) = (dir.path().join("pebble"), settings.validity);
        tokio::task::spawn_blocking(move || {
            Pebble::start(
                &pebble_dir,
                PebbleOptions {
                    tls_port: b_inbound,
                    http_port: b_http,
                    validity: Some(validity),
                    ..Default::default()
                },
            )
        })
        .await
        .unwrap()
    };
    let validity = format!("{}s", settings.validity.as_secs());
    let write = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let b_config = write(
        "b.toml",
        format!(
            "[agent]\naddress = \"unix:{sock}\"\n[identity]\nvalidity = \"{validity}\"\n\
             [inbound]\nlisten = \"127.0.0.1:{b_inbound}\"\nbackend = \"{backend}\"\nallowed_apps = [\"{A}\", \"{C}\"]\n\
             [auth]\nenabled = false\n[client]\nenabled = false\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [acme]\nstore = \"{store}\"\nissuer = \"{directory}\"\nca_roots = [\"{ca}\"]\n\
             http_listen = \"127.0.0.1:{b_http}\"\nretry_min = \"1s\"\nemail = \"ops@example.test\"\n\
             [[domains]]\nnames = [\"{DOMAIN}\"]\nbackend = \"{backend}\"\n",
            sock = sock_b.display(),
            backend = backend.addr,
            store = dir.path().join("store").display(),
            directory = pebble.directory,
            ca = pebble.ca_file.display(),
        ),
    );
    let a_config = write(
        "a.toml",
        format!(
            "[agent]\naddress = \"unix:{sock}\"\n[identity]\nvalidity = \"{validity}\"\n\
             [inbound]\nenabled = false\n[auth]\nenabled = false\n\
             [client]\naddress = \"127.0.0.1\"\nport = {port}\n\
             [dstack]\ngateway_domain = \"fixed/127.0.0.1:{b_inbound}\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n",
            sock = sock_a.display(),
            port = free_port(),
        ),
    );
    let (mut b, b_bound) = run_mesh(dir.path(), "b", &b_config);
    let (mut a, a_bound) = run_mesh(dir.path(), "a", &a_config);
    let (a_admin, b_admin) = (listener(&a_bound, "admin"), listener(&b_bound, "admin"));
    let outbound = listener(&a_bound, "outbound");
    let deadline = Instant::now() + Duration::from_secs(60);
    while served_expiry(&admin(b_admin, "/certs").await).is_none() {
        assert!(
            Instant::now() < deadline,
            "no certificate for {DOMAIN}: {}",
            b.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The callers.
    let outbound_load = Load::start(
        Target::plain(outbound, &[("x-dstack-target-app", B)]),
        &[Caller::H1, Caller::H1, Caller::H2, Caller::H2],
        Duration::from_millis(10),
    );
    let (c_identity, _c_agent) = identity_with(
        dir.path(),
        &state,
        C,
        None,
        IdentityConfig {
            validity: settings.validity,
            ..Default::default()
        },
    )
    .await;
    let policy = Policy::new(c_identity.current().trust_anchors().unwrap())
        .expect(B.parse::<AppId>().unwrap());
    let mesh_tls = mesh_client_config(c_identity.resolver(), Arc::new(policy)).unwrap();
    let b_addr: SocketAddr = format!("127.0.0.1:{b_inbound}").parse().unwrap();
    let mesh_load = Load::start(
        Target {
            addr: b_addr,
            tls: Some((Arc::new(mesh_tls), "b.mesh".try_into().unwrap())),
            host: "b.mesh".to_owned(),
            headers: Vec::new(),
        },
        &[Caller::H1, Caller::H2],
        Duration::from_millis(10),
    );
    let public_load = Load::start(
        Target::public(b_addr, DOMAIN, pebble.issuance_root_pem().as_bytes()),
        &[Caller::Fresh, Caller::Fresh, Caller::H2, Caller::H1],
        Duration::from_millis(20),
    );
    let stop_streams = Arc::new(AtomicBool::new(false));
    let (echoes, uploaded) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let websocket = long_websocket(outbound, stop_streams.clone(), echoes.clone());
    let upload = long_upload(outbound, stop_streams.clone(), uploaded.clone());

    let a_rotations = Changes::watch(a_admin, identity_expiry, "/routes");
    let b_rotations = Changes::watch(b_admin, identity_expiry, "/routes");
    let renewals = Changes::watch(b_admin, served_expiry, "/certs");
    let mesh_handshakes = || counter(b_admin, "dstack_mesh_tls_handshakes_total", "side=\"mesh\"");

    // Warm-up: one rotation on each side, so that the first sample holds a steady state.
    let started = Instant::now();
    let warm_up = settings.validity * 3;
    while a_rotations.count() < 1 || b_rotations.count() < 1 {
        assert!(
            started.elapsed() < warm_up,
            "no rotation within {warm_up:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (a0, b0) = (a_rotations.count(), b_rotations.count());
    let handshakes0 = mesh_handshakes().await;

    let csv_path =
        std::env::var_os("SOAK_CSV").map_or_else(|| dir.path().join("soak.csv"), Into::into);
    let mut csv = format!("{HEADER}\n");
    let mut samples: Vec<Sample> = Vec::new();
    let (mut reloads, mut next_reload) = (0usize, Instant::now() + settings.reload_every);
    let t0 = Instant::now();
    let counts = [
        outbound_load.counts(),
        mesh_load.counts(),
        public_load.counts(),
    ];
    // A rotation every two thirds of the lifetime, and time for a slow one.
    let limit = settings.validity * 2 * u32::try_from(settings.rotations + 2).unwrap()
        + Duration::from_secs(settings.seconds);
    loop {
        tokio::time::sleep(settings.sample_every).await;
        a.assert_running();
        b.assert_running();
        if Instant::now() >= next_reload {
            a.signal("HUP");
            b.signal("HUP");
            reloads += 1;
            next_reload += settings.reload_every;
        }
        let sample = Sample {
            t: t0.elapsed().as_secs_f64(),
            a: footprint(a.id()),
            b: footprint(b.id()),
        };
        let mut row = format!(
            "{:.1},{},{},{},{}",
            sample.t, sample.a.0, sample.a.1, sample.b.0, sample.b.1
        );
        for c in &counts {
            let p99 = percentile(&c.take_latencies(), 99.0);
            write!(row, ",{},{},{p99}", c.ok(), c.failed()).unwrap();
        }
        let retried: usize = counts.iter().map(|c| c.retried()).sum();
        writeln!(
            row,
            ",{retried},{},{},{},{reloads},{},{}",
            a_rotations.count(),
            b_rotations.count(),
            renewals.count(),
            echoes.load(Ordering::SeqCst),
            uploaded.load(Ordering::SeqCst)
        )
        .unwrap();
        eprint!("{row}");
        csv.push_str(&row);
        std::fs::write(&csv_path, &csv).unwrap();
        samples.push(sample);
        let done = a_rotations.count() >= a0 + settings.rotations
            && b_rotations.count() >= b0 + settings.rotations
            && renewals.count() >= settings.rotations
            && t0.elapsed().as_secs() >= settings.seconds
            && reloads >= 1;
        if done {
            break;
        }
        assert!(
            t0.elapsed() < limit,
            "not done within {limit:?}: {} and {} rotations, {} renewals",
            a_rotations.count(),
            b_rotations.count(),
            renewals.count()
        );
    }

    stop_streams.store(true, Ordering::SeqCst);
    let websocket = websocket.await.unwrap();
    let upload = upload.await.unwrap();
    let replaced = mesh_handshakes().await - handshakes0;
    let rotated = a_rotations.count() - a0;
    let retried = [&outbound_load, &mesh_load, &public_load].map(|l| l.counts().retried());
    let (outbound_ok, outbound_failed) = outbound_load.finish().await;
    let (mesh_ok, mesh_failed) = mesh_load.finish().await;
    let (public_ok, public_failed) = public_load.finish().await;
    let (first, last) = (samples.first().unwrap(), samples.last().unwrap());
    eprintln!(
        "soak: {:.0} s, {rotated} rotations of A and {} of B (after warm-up), {} renewals, {reloads} reloads; \
         requests ok/failed: outbound {outbound_ok}/{outbound_failed}, mesh {mesh_ok}/{mesh_failed}, \
         public {public_ok}/{public_failed}; sent again after a server close: {retried:?}; \
         {replaced} mesh handshakes on B; WebSocket {} echoes, upload {} bytes; \
         A RSS {} → {} KiB, fds {} → {}; B RSS {} → {} KiB, fds {} → {}; samples in {}",
        last.t,
        b_rotations.count() - b0,
        renewals.count(),
        echoes.load(Ordering::SeqCst),
        uploaded.load(Ordering::SeqCst),
        first.a.0,
        last.a.0,
        first.a.1,
        last.a.1,
        first.b.0,
        last.b.0,
        first.b.1,
        last.b.1,
        csv_path.display(),
    );
    websocket.expect("the long WebSocket");
    upload.expect("the long upload");
    assert_eq!(
        (outbound_failed, mesh_failed, public_failed),
        (0, 0, 0),
        "failed requests (outbound, mesh, public)"
    );
    assert_eq!(
        retried[0], 0,
        "the outbound closed a kept-alive connection under a caller"
    );
    assert!(outbound_ok > 0 && mesh_ok > 0 && public_ok > 0);
    // Each of A's identities expires under the pooled connection it dialled, and C's likewise:
    // B ends those connections at expiry, and the callers dial again.
    assert!(
        replaced >= rotated as u64,
        "{replaced} new mesh connections on B across {rotated} rotations of A"
    );
    flat("A", first.a, last.a);
    flat("B", first.b, last.b);
    reload_logged(&a, reloads);
    reload_logged(&b, reloads);
    drop(pebble);
}

/// Memory and descriptors at the end against the start: what a leak per rotation, renewal,
/// reload or connection would show.
fn flat(who: &str, (rss0, fds0): (u64, usize), (rss1, fds1): (u64, usize)) {
    assert!(
        fds1 <= fds0 + 16,
        "{who}: file descriptors grew from {fds0} to {fds1}"
    );
    assert!(
        rss1 <= rss0 + rss0 / 2 + 8 * 1024,
        "{who}: resident memory grew from {rss0} to {rss1} KiB"
    );
}

/// Every SIGHUP was taken as a reload.
fn reload_logged(sidecar: &ChildGuard, reloads: usize) {
    let log = sidecar.stderr();
    let seen = log.matches("configuration reloaded").count();
    assert!(seen >= reloads, "{seen} reloads logged of {reloads}: {log}");
}
