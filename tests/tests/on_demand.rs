//! On-demand issuance (`[on_demand]`) against pebble: a customer's first visits, many at
//! once, wait on one order; `ask` decides which names get one, its answers cached both ways;
//! an `ask` that is down refuses new names and disturbs none already served.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use e2e::{
    backend::Backend,
    dev_agent, free_port,
    load::{Caller, Load, Target},
    pebble::{Pebble, PebbleOptions},
    run_mesh, ChildGuard,
};
use http::StatusCode;

const APP: &str = "0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d";

/// An `ask` endpoint: `200` for names under `allowed.test`, `404` otherwise; counts the
/// questions per name; `down` makes it hold every answer past the sidecar's deadline,
/// `failing` answer 503.
#[derive(Clone, Default)]
struct Ask {
    asked: Arc<Mutex<HashMap<String, usize>>>,
    down: Arc<AtomicBool>,
    failing: Arc<AtomicBool>,
}

impl Ask {
    async fn start() -> (Self, SocketAddr) {
        let ask = Self::default();
        let state = ask.clone();
        let addr = e2e::http_stand_in::serve(move |req| {
            let state = state.clone();
            async move {
                let query = e2e::http_stand_in::query_pairs(req.uri());
                let name = query
                    .iter()
                    .find(|(k, _)| k == "domain")
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default();
                *state.asked.lock().unwrap().entry(name.clone()).or_default() += 1;
                if state.down.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
                let status = match name.ends_with(".allowed.test") {
                    _ if state.failing.load(Ordering::SeqCst) => StatusCode::SERVICE_UNAVAILABLE,
                    true => StatusCode::OK,
                    false => StatusCode::NOT_FOUND,
                };
                let mut resp = http::Response::new(http_body_util::Full::new(bytes::Bytes::new()));
                *resp.status_mut() = status;
                resp
            }
        })
        .await;
        (ask, addr)
    }

    fn asked(&self, name: &str) -> usize {
        self.asked.lock().unwrap().get(name).copied().unwrap_or(0)
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    pebble: Pebble,
    ask: Ask,
    sidecar: ChildGuard,
    inbound: SocketAddr,
    admin: SocketAddr,
    _agent: ChildGuard,
    _backend: Backend,
}

impl Setup {
    /// The configured domain and `[on_demand]` asking [`Ask`].
    async fn start() -> Self {
        Self::start_with("", |_, ask, backend, _| {
            format!(
                "[on_demand]\nask = \"http://{ask}/check\"\nask_timeout = \"2s\"\n\
                 backend = \"{backend}\"\ndeadline = \"60s\"\n"
            )
        })
        .await
    }

    /// The configured domain, `acme` more `[acme]` lines, and what `tail` writes given
    /// pebble, the `ask` endpoint's address, the backend's and the inbound port.
    async fn start_with(
        acme: &str,
        tail: impl FnOnce(&Pebble, SocketAddr, SocketAddr, u16) -> String,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let inbound_port = free_port();
        let pebble_dir = dir.path().join("pebble");
        let pebble = tokio::task::spawn_blocking(move || {
            let options = PebbleOptions {
                tls_port: inbound_port,
                http_port: free_port(),
                ..PebbleOptions::default()
            };
            Pebble::start(&pebble_dir, options)
        })
        .await
        .unwrap();
        let (agent, sock) = dev_agent(dir.path(), "agent", APP, &dir.path().join("state"));
        let backend = Backend::start().await;
        let (ask, ask_addr) = Ask::start().await;
        let config = dir.path().join("mesh.toml");
        std::fs::write(
            &config,
            format!(
                "[agent]\naddress = \"unix:{sock}\"\n\
                 [inbound]\nlisten = \"127.0.0.1:{inbound_port}\"\nbackend = \"{backend}\"\n\
                 [auth]\nenabled = false\n[client]\nenabled = false\n[admin]\nlisten = \"127.0.0.1:0\"\n\
                 [acme]\nstore = \"{store}\"\nissuer = \"{directory}\"\nca_roots = [\"{ca}\"]\nretry_min = \"1s\"\n{acme}\n\
                 [[domains]]\nnames = [\"configured.allowed.test\"]\nbackend = \"{backend}\"\n\
                 {tail}",
                sock = sock.display(),
                backend = backend.addr,
                store = dir.path().join("store").display(),
                directory = pebble.directory,
                ca = pebble.ca_file.display(),
                tail = tail(&pebble, ask_addr, backend.addr, inbound_port),
            ),
        )
        .unwrap();
        let (sidecar, bound) = run_mesh(dir.path(), "mesh", &config);
        Self {
            inbound: e2e::listener(&bound, "inbound"),
            admin: e2e::listener(&bound, "admin"),
            _dir: dir,
            pebble,
            ask,
            sidecar,
            _agent: agent,
            _backend: backend,
        }
    }

    fn root(&self) -> Vec<u8> {
        self.pebble.issuance_root_pem().into_bytes()
    }

    /// Visit `name` until a handshake completes with a certificate for it (30 s at most).
    async fn until_served(&self, name: &str) {
        for _ in 0..600 {
            if self.first_visits(name, 1).await == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{name} never served: {}", self.sidecar.stderr());
    }

    /// `n` browsers' first visits to `name`, all at once: how many completed a handshake with
    /// a certificate for it.
    async fn first_visits(&self, name: &str, n: usize) -> usize {
        let failures = self.refusals(name, n).await;
        failures
            .iter()
            .for_each(|e| eprintln!("{name}: a first visit failed: {e}"));
        n - failures.len()
    }

    /// `n` first visits to `name` at once: why each that failed did.
    async fn refusals(&self, name: &str, n: usize) -> Vec<String> {
        let mut visits = tokio::task::JoinSet::new();
        for _ in 0..n {
            let (inbound, name, root) = (self.inbound, name.to_owned(), self.root());
            visits.spawn(async move {
                e2e::client::public_connect(inbound, &name, &root, &[b"http/1.1"]).await
            });
        }
        let mut failed = Vec::new();
        while let Some(visit) = visits.join_next().await {
            if let Err(e) = visit.unwrap() {
                failed.push(e.to_string());
            }
        }
        failed
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_handshakes_wait_on_one_order_and_ask_decides_who_gets_one() {
    let s = Setup::start().await;
    // The configured domain is served first, so one order is already in pebble's count.
    let mut orders = 0;
    for _ in 0..600 {
        orders = s.pebble.orders_seen();
        if orders >= 1 && s.first_visits("configured.allowed.test", 1).await == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(orders, 1, "{}", s.sidecar.stderr());
    let load = Load::start(
        Target::public(s.inbound, "configured.allowed.test", &s.root()),
        &[Caller::Fresh, Caller::H1],
        Duration::from_millis(10),
    );

    // A single first visit, then 8, then 64 at once to a new name: all served, one order
    // each (their latencies, beside Caddy's: `BENCH_ONLY=domains scripts/bench`).
    for (name, n) in [
        ("one.allowed.test", 1),
        ("eight.allowed.test", 8),
        ("sixty-four.allowed.test", 64),
    ] {
        assert_eq!(s.first_visits(name, n).await, n, "{}", s.sidecar.stderr());
        orders += 1;
        assert_eq!(s.pebble.orders_seen(), orders, "{name}: one order");
        assert_eq!(s.ask.asked(name), 1, "{name}: asked once");
        // Later visits are served from what is held: no question, no order.
        assert_eq!(s.first_visits(name, 4).await, 4);
        assert_eq!(s.ask.asked(name), 1);
    }
    assert_eq!(s.pebble.orders_seen(), orders);

    // A name ask refuses: no order, refused, and the refusal remembered.
    assert_eq!(s.first_visits("stranger.example.test", 4).await, 0);
    assert_eq!(s.ask.asked("stranger.example.test"), 1);
    assert_eq!(s.first_visits("stranger.example.test", 4).await, 0);
    assert_eq!(
        s.ask.asked("stranger.example.test"),
        1,
        "the refusal is cached"
    );
    assert_eq!(
        s.pebble.orders_seen(),
        orders,
        "no order for a refused name"
    );

    // ask down: a new name is refused (fail closed); the names served keep being served.
    s.ask.down.store(true, Ordering::SeqCst);
    assert_eq!(s.first_visits("late.allowed.test", 2).await, 0);
    assert_eq!(s.pebble.orders_seen(), orders, "no order while ask is down");
    assert_eq!(s.first_visits("eight.allowed.test", 2).await, 2);
    assert!(
        s.sidecar.stderr().contains("ask did not answer in time"),
        "{}",
        s.sidecar.stderr()
    );

    // ask back: the name refused while it was down is admitted within seconds (no answer
    // stands 5 s, not refused_ttl's 5 minutes).
    s.ask.down.store(false, Ordering::SeqCst);
    s.until_served("late.allowed.test").await;
    assert_eq!(
        s.ask.asked("late.allowed.test"),
        2,
        "asked again once, not per visit"
    );
    let (ok, failed) = load.finish().await;
    eprintln!("{ok} requests to a configured domain beside the first visits, {failed} failed");
    assert_eq!(failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_new_domains_queues_behind_the_rate_limit_instead_of_failing() {
    let list = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(list.path(), "").unwrap();
    let path = list.path().to_owned();
    // Two certificates per registered domain every 8 s: the configured domain and the first
    // listed take the window; the other two wait their turn.
    let s = Setup::start_with("domain_limit = \"2/8s\"", move |_, _, backend, _| {
        format!(
            "[[domain_sources]]\nfile = \"{}\"\ninterval = \"200ms\"\nbackend = \"{backend}\"\n",
            path.display()
        )
    })
    .await;
    std::fs::write(
        list.path(),
        "one.allowed.test\ntwo.allowed.test\nthree.allowed.test\n",
    )
    .unwrap();
    let mut queued_seen = Vec::new();
    let mut certs = serde_json::Value::Null;
    for _ in 0..1200 {
        let (_, body) = e2e::client::http1_get(s.admin, "/certs", &[]).await;
        certs = serde_json::from_slice(&body).unwrap();
        for c in certs.as_array().unwrap() {
            if let Some(why) = c["queued"].as_str() {
                assert!(
                    why.contains("2 certificates per 8s for allowed.test"),
                    "{why}"
                );
                queued_seen.push(c["domain"].as_str().unwrap().to_owned());
            }
        }
        let valid = certs
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["status"] == "valid")
            .count();
        if valid == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for c in certs.as_array().unwrap() {
        assert_eq!(c["status"], "valid", "{certs}");
        assert_eq!(c["failures_total"], 0, "queued, never failed: {certs}");
    }
    queued_seen.sort();
    queued_seen.dedup();
    assert_eq!(queued_seen.len(), 2, "two waited: {queued_seen:?}");
    assert_eq!(s.pebble.orders_seen(), 4);
    assert!(s
        .sidecar
        .stderr()
        .contains("order queued by the rate limit"));
}

/// `domain`'s entry on `/certs`.
async fn cert(admin: SocketAddr, domain: &str) -> serde_json::Value {
    let (_, body) = e2e::client::http1_get(admin, "/certs", &[]).await;
    let certs: serde_json::Value = serde_json::from_slice(&body).unwrap();
    certs
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["domain"] == domain)
        .cloned()
        .unwrap_or_default()
}

/// Wait up to 30 s for `domain`'s `/certs` entry to satisfy `check`.
async fn until_cert(
    admin: SocketAddr,
    domain: &str,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    for _ in 0..600 {
        last = cert(admin, domain).await;
        if check(&last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{domain}: {what}: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_domain_whose_dns_moves_away_is_never_ordered_for_and_comes_back_by_itself() {
    let list = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(list.path(), "stays.customer.test\nmoves.customer.test\n").unwrap();
    let path = list.path().to_owned();
    // Every name resolves to 127.0.0.1 (challtestsrv's default), as the gateway does; the
    // sites are probed there, on the inbound port (the gateway's 443).
    let s = Setup::start_with("", move |pebble, _, backend, inbound| {
        format!(
            "[[domain_sources]]\nfile = \"{}\"\ninterval = \"200ms\"\nbackend = \"{backend}\"\n\
             [domain_health]\ngateway = \"_.gateway.test\"\ninterval = \"300ms\"\nresolvers = [\"{}\"]\n\
             probe = true\nprobe_port = {inbound}\nprobe_path = \"/healthz\"\n",
            path.display(),
            pebble.challtestsrv_dns,
        )
    })
    .await;
    for name in ["stays.customer.test", "moves.customer.test"] {
        let c = until_cert(s.admin, name, "valid and probed", |c| {
            c["status"] == "valid" && c["site_probe"].is_string()
        })
        .await;
        assert!(
            c["dns_health"].as_str().unwrap().contains("points here"),
            "{c}"
        );
        // The visit went through the listener to the backend with our certificate.
        let probe = c["site_probe"].as_str().unwrap();
        assert!(
            probe.starts_with("ok: our certificate, HTTP 200 for /healthz"),
            "{c}"
        );
    }
    let orders = s.pebble.orders_seen();

    // The customer points the name elsewhere: dns_moved, and a renewal asked for places no
    // order.
    s.pebble.challtestsrv(
        "/add-a",
        &serde_json::json!({"host": "moves.customer.test", "addresses": ["203.0.113.9"]}),
    );
    let moved = until_cert(s.admin, "moves.customer.test", "dns_moved", |c| {
        c["status"] == "dns_moved"
    })
    .await;
    let why = moved["dns_health"].as_str().unwrap();
    assert!(
        why.contains("203.0.113.9") && why.contains("not the gateway"),
        "{moved}"
    );
    let (status, _) = dstack_mesh::status::request(
        &s.admin.to_string(),
        http::Method::POST,
        "/certs/moves.customer.test/renew",
    )
    .await
    .unwrap();
    assert!(status.is_success(), "{status}");
    let held = until_cert(s.admin, "moves.customer.test", "the order held", |c| {
        c["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("DNS moved"))
    })
    .await;
    assert_eq!(held["status"], "dns_moved", "{held}");
    assert_eq!(
        s.pebble.orders_seen(),
        orders,
        "no order for a moved domain"
    );
    assert_eq!(
        cert(s.admin, "stays.customer.test").await["status"],
        "valid"
    );

    // The app behind the site fails (its route now leads to a closed port): the probe says
    // what a visitor meets.
    let closed = free_port();
    std::fs::write(
        list.path(),
        format!("stays.customer.test 127.0.0.1:{closed}\nmoves.customer.test\n"),
    )
    .unwrap();
    let failing = until_cert(s.admin, "stays.customer.test", "the probe failing", |c| {
        c["site_probe"]
            .as_str()
            .is_some_and(|p| p.starts_with("failed"))
    })
    .await;
    assert!(
        failing["site_probe"].as_str().unwrap().contains("HTTP 502"),
        "{failing}"
    );
    std::fs::write(list.path(), "stays.customer.test\nmoves.customer.test\n").unwrap();
    until_cert(s.admin, "stays.customer.test", "the probe ok again", |c| {
        c["site_probe"]
            .as_str()
            .is_some_and(|p| p.starts_with("ok"))
    })
    .await;

    // A CNAME to the gateway is pointing here too; back, the held renewal goes through.
    s.pebble.challtestsrv(
        "/clear-a",
        &serde_json::json!({"host": "moves.customer.test"}),
    );
    s.pebble.challtestsrv(
        "/set-cname",
        &serde_json::json!({"host": "moves.customer.test", "target": "app.gateway.test"}),
    );
    let back = until_cert(s.admin, "moves.customer.test", "back and renewed", |c| {
        c["status"] == "valid" && c["issued_total"] == 2
    })
    .await;
    assert!(
        back["dns_health"]
            .as_str()
            .unwrap()
            .contains("CNAME to app.gateway.test"),
        "{back}"
    );
    assert_eq!(s.pebble.orders_seen(), orders + 1);

    // A new customer whose DNS never pointed here costs no order at all.
    s.pebble.challtestsrv(
        "/set-cname",
        &serde_json::json!({"host": "elsewhere.customer.test", "target": "other-host.example"}),
    );
    std::fs::write(
        list.path(),
        "stays.customer.test\nmoves.customer.test\nelsewhere.customer.test\n",
    )
    .unwrap();
    until_cert(s.admin, "elsewhere.customer.test", "dns_moved", |c| {
        c["status"] == "dns_moved"
    })
    .await;
    assert_eq!(s.pebble.orders_seen(), orders + 1);

    // The app-address TXT decides over the CNAME: naming this app, the domain points here
    // (and is ordered for); naming another app, the domain moved to it.
    s.pebble.challtestsrv(
        "/set-txt",
        &serde_json::json!({"host": "_dstack-app-address.elsewhere.customer.test.", "value": format!("{APP}:443")}),
    );
    let here = until_cert(
        s.admin,
        "elsewhere.customer.test",
        "back through its TXT",
        |c| c["status"] == "valid",
    )
    .await;
    assert!(
        here["dns_health"]
            .as_str()
            .unwrap()
            .contains("TXT names this app"),
        "{here}"
    );
    assert_eq!(s.pebble.orders_seen(), orders + 2);
    s.pebble.challtestsrv(
        "/set-txt",
        &serde_json::json!({"host": "_dstack-app-address.stays.customer.test.", "value": "0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f:443"}),
    );
    let taken = until_cert(
        s.admin,
        "stays.customer.test",
        "moved to another app",
        |c| c["status"] == "dns_moved",
    )
    .await;
    assert!(
        taken["dns_health"]
            .as_str()
            .unwrap()
            .contains("another app"),
        "{taken}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_names_past_ask_rate_are_refused_without_asking_and_served_names_are_not_touched() {
    let s = Setup::start_with("", |_, ask, backend, _| {
        format!(
            "[on_demand]\nask = \"http://{ask}/check\"\nask_timeout = \"2s\"\n\
             backend = \"{backend}\"\nask_rate = \"3/1h\"\n"
        )
    })
    .await;
    s.until_served("configured.allowed.test").await;

    // Invented names, as a scanner sends them: three are asked about (and refused) ...
    for i in 0..3 {
        let name = format!("scan{i}.example.test");
        assert_eq!(s.first_visits(&name, 1).await, 0);
        assert_eq!(s.ask.asked(&name), 1, "{name}");
    }
    // ... past the rate, the rest are refused without a question.
    for i in 3..8 {
        let name = format!("scan{i}.example.test");
        assert_eq!(s.first_visits(&name, 1).await, 0);
        assert_eq!(s.ask.asked(&name), 0, "{name} asked past ask_rate");
    }
    assert!(
        s.sidecar
            .stderr()
            .contains("more new names than ask_rate allows"),
        "{}",
        s.sidecar.stderr()
    );
    // A cached answer costs nothing, and the domain served keeps being served.
    assert_eq!(s.first_visits("scan0.example.test", 1).await, 0);
    assert_eq!(s.ask.asked("scan0.example.test"), 1);
    assert_eq!(s.first_visits("configured.allowed.test", 4).await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_past_the_deadline_or_after_a_failed_order_end_with_an_alert() {
    let s = Setup::start_with("", |_, ask, backend, _| {
        format!(
            "[on_demand]\nask = \"http://{ask}/check\"\nask_timeout = \"2s\"\n\
             backend = \"{backend}\"\ndeadline = \"2s\"\n"
        )
    })
    .await;
    s.until_served("configured.allowed.test").await;
    // The customer's name leads the CA to a host that accepts and never answers: pebble's
    // TLS-ALPN-01 look hangs there, so the order outlives the 2 s deadline.
    let tarpit = tokio::net::TcpListener::bind(("127.0.0.5", s.inbound.port()))
        .await
        .unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let holding = held.clone();
    let pit = tokio::spawn(async move {
        while let Ok((conn, _)) = tarpit.accept().await {
            holding.lock().unwrap().push(conn);
        }
    });
    s.pebble.challtestsrv(
        "/add-a",
        &serde_json::json!({"host": "stalls.allowed.test", "addresses": ["127.0.0.5"]}),
    );
    let refused = s.refusals("stalls.allowed.test", 4).await;
    assert_eq!(
        refused.len(),
        4,
        "every waiting handshake ends: {refused:?}"
    );
    assert!(
        refused.iter().all(|e| e.contains("alert")),
        "a TLS alert: {refused:?}"
    );
    // The deadline ended them, not the order: it is still under way, and the only one.
    let pending = cert(s.admin, "stalls.allowed.test").await;
    assert_eq!(pending["status"], "issuing", "{pending}");
    assert!(pending["last_error"].is_null(), "{pending}");
    assert!(!held.lock().unwrap().is_empty(), "the CA is still looking");
    let orders = s.pebble.orders_seen();
    // The host goes away: the CA's look fails, so does the order; the next visit is refused
    // with an alert too, and the configured domain was never touched.
    pit.abort();
    held.lock().unwrap().clear();
    let failed = until_cert(s.admin, "stalls.allowed.test", "the order failed", |c| {
        !c["last_error"].is_null()
    })
    .await;
    assert_ne!(failed["status"], "valid", "{failed}");
    let again = s.refusals("stalls.allowed.test", 1).await;
    assert!(again.len() == 1 && again[0].contains("alert"), "{again:?}");
    assert_eq!(s.ask.asked("stalls.allowed.test"), 1, "admitted once");
    assert!(s.pebble.orders_seen() >= orders);
    assert_eq!(s.first_visits("configured.allowed.test", 2).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ask_endpoint_failing_or_unreachable_refuses_new_names_only() {
    // 503 from ask: fail closed for the new name, no order, said in the log.
    let s = Setup::start().await;
    s.until_served("configured.allowed.test").await;
    let orders = s.pebble.orders_seen();
    s.ask.failing.store(true, Ordering::SeqCst);
    assert_eq!(s.first_visits("new.allowed.test", 2).await, 0);
    assert_eq!(s.pebble.orders_seen(), orders, "no order while ask fails");
    assert_eq!(s.first_visits("configured.allowed.test", 2).await, 2);
    assert!(
        s.sidecar.stderr().contains("on demand: ask failed"),
        "{}",
        s.sidecar.stderr()
    );
    // Nothing listening where ask should be: the same.
    let closed = free_port();
    let s = Setup::start_with("", |_, _, backend, _| {
        format!(
            "[on_demand]\nask = \"http://127.0.0.1:{closed}/check\"\nask_timeout = \"2s\"\n\
             backend = \"{backend}\"\n"
        )
    })
    .await;
    s.until_served("configured.allowed.test").await;
    let orders = s.pebble.orders_seen();
    assert_eq!(s.first_visits("new.allowed.test", 2).await, 0);
    assert_eq!(s.pebble.orders_seen(), orders);
    assert!(
        s.sidecar.stderr().contains("on demand: ask unreachable"),
        "{}",
        s.sidecar.stderr()
    );
    assert_eq!(s.first_visits("configured.allowed.test", 2).await, 2);
}
