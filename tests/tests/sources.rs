//! Domains from sources (`[[domain_sources]]`) on a real sidecar: a watched file's customer
//! domains are served, added and dropped while traffic to the others flows; a list that does
//! not read keeps the last good one, says so, and survives a restart.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use e2e::{
    backend::Backend,
    dev_agent, listener,
    load::{Caller, Load, Target},
    run_mesh, ChildGuard,
};
use http::StatusCode;

const APP: &str = "5005500550055005500550055005500550055005";

/// A sidecar serving one configured domain and a file source's domains, with the internal CA.
struct Sidecar {
    dir: tempfile::TempDir,
    config: PathBuf,
    list: PathBuf,
    guard: Option<ChildGuard>,
    inbound: SocketAddr,
    admin: SocketAddr,
    _agent: ChildGuard,
    _backend: Backend,
}

impl Sidecar {
    /// With a file source listing `list`.
    async fn start(list: &str) -> Self {
        Self::start_with(Some(list), |list| {
            format!("file = \"{}\"\ninterval = \"200ms\"\n", list.display())
        })
        .await
    }

    /// With a source whose kind `source` writes (given the list file's path); the list file
    /// holds `list`, if any.
    async fn start_with(list: Option<&str>, source: impl FnOnce(&Path) -> String) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (agent, sock) = dev_agent(d, "agent", APP, &d.join("state"));
        let backend = Backend::start().await;
        let list_path = d.join("domains.txt");
        if let Some(list) = list {
            std::fs::write(&list_path, list).unwrap();
        }
        let config = d.join("mesh.toml");
        std::fs::write(
            &config,
            format!(
                "[agent]\naddress = \"unix:{sock}\"\n\
                 [inbound]\nlisten = \"127.0.0.1:{port}\"\nbackend = \"{backend}\"\n\
                 [auth]\nenabled = false\n[client]\nenabled = false\n\
                 [admin]\nlisten = \"127.0.0.1:{admin}\"\n\
                 [acme]\nstore = \"{store}\"\nissuer = \"internal-ca\"\n\
                 [[domains]]\nnames = [\"configured.test\"]\nbackend = \"{backend}\"\n\
                 [[domain_sources]]\nname = \"customers\"\nbackend = \"{backend}\"\n{source}",
                sock = sock.display(),
                port = e2e::free_port(),
                admin = e2e::free_port(),
                backend = backend.addr,
                store = d.join("store").display(),
                source = source(&list_path),
            ),
        )
        .unwrap();
        let (guard, bound) = run_mesh(d, "mesh", &config);
        Self {
            inbound: listener(&bound, "inbound"),
            admin: listener(&bound, "admin"),
            config,
            list: list_path,
            guard: Some(guard),
            dir,
            _agent: agent,
            _backend: backend,
        }
    }

    fn root(&self) -> Vec<u8> {
        std::fs::read(self.dir.path().join("store/internal-ca/ca.pem")).unwrap_or_default()
    }

    /// Whether `name` is served with a certificate for it.
    async fn serves(&self, name: &str) -> bool {
        let root = self.root();
        !root.is_empty()
            && e2e::client::public_connect(self.inbound, name, &root, &[b"http/1.1"])
                .await
                .is_ok()
    }

    async fn admin_json(&self, path: &str) -> (StatusCode, serde_json::Value) {
        let (status, body) = e2e::client::http1_get(self.admin, path, &[]).await;
        (status, serde_json::from_slice(&body).unwrap_or_default())
    }

    async fn source(&self) -> serde_json::Value {
        self.admin_json("/sources").await.1[0].clone()
    }

    async fn metrics(&self) -> String {
        let (_, body) = e2e::client::http1_get(self.admin, "/metrics", &[]).await;
        String::from_utf8_lossy(&body).into_owned()
    }

    /// Wait for a read of the source to fail; its status, down, whose last error says `words`.
    async fn source_down(&self, words: &str) -> serde_json::Value {
        until("the source reported down", async || {
            self.source().await["last_error"].is_string()
        })
        .await;
        let source = self.source().await;
        assert_eq!(source["up"], false, "{source}");
        let error = source["last_error"].as_str().unwrap_or_default();
        assert!(error.contains(words), "{source}");
        source
    }

    fn log(&self) -> String {
        self.guard
            .as_ref()
            .map(ChildGuard::stderr)
            .unwrap_or_default()
    }

    /// Stop and start again on the same ports and store.
    fn restart(&mut self) {
        drop(self.guard.take());
        let (guard, bound) = run_mesh(self.dir.path(), "mesh-again", &self.config);
        assert_eq!(listener(&bound, "inbound"), self.inbound);
        self.guard = Some(guard);
    }
}

/// Wait up to 20 s for `check`, failing with `what`.
async fn until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait for 20 more answers to `load`.
async fn flowing(load: &Load) {
    let before = load.ok();
    until("more requests answered", async || load.ok() > before + 20).await;
}

fn write(path: &Path, text: &str) {
    // Whole, at once, as an operator's tool would (rename over the old file).
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_sources_domains_come_and_go_under_load_and_a_bad_list_keeps_the_last_good_one() {
    let mut s = Sidecar::start("# customers\nold.customer.test\nsteady.customer.test\n").await;
    until("the listed domains served", async || {
        s.serves("old.customer.test").await && s.serves("steady.customer.test").await
    })
    .await;
    assert!(s.serves("configured.test").await);
    // Browser-style callers on a domain that stays listed throughout.
    let load = Load::start(
        Target::public(s.inbound, "steady.customer.test", &s.root()),
        &[Caller::Fresh, Caller::H1],
        Duration::from_millis(10),
    );

    // A new list: one domain dropped, one added (an IDN, listed in Unicode), bad entries
    // refused with their reasons.
    write(
        &s.list,
        r#"["steady.customer.test", "new.customer.test", "bücher.customer.test",
            "192.0.2.1", "steady.customer.test", "configured.test"]"#,
    );
    until("the new list served", async || {
        s.serves("new.customer.test").await
            && s.serves("xn--bcher-kva.customer.test").await
            && !s.serves("old.customer.test").await
    })
    .await;
    flowing(&load).await;
    // Thousands of customers must not mean thousands of series: a healthy sourced domain is
    // counted, a configured one has its own.
    let metrics = s.metrics().await;
    assert!(
        metrics.contains("dstack_mesh_domains{state=\"valid\"} 4"),
        "{metrics}"
    );
    assert!(metrics.contains("dstack_mesh_certificate_ready_status{domain=\"configured.test\""));
    assert!(
        !metrics.contains("domain=\"steady.customer.test\""),
        "{metrics}"
    );
    let source = s.source().await;
    assert_eq!(source["up"], true, "{source}");
    let rejected = source["rejected"].to_string();
    assert!(rejected.contains("is an IP address"), "{rejected}");
    assert!(rejected.contains("listed twice"), "{rejected}");
    // A configured domain is never taken over by a source.
    let (_, certs) = s.admin_json("/certs").await;
    let configured = certs
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["domain"] == "configured.test")
        .unwrap();
    assert!(configured.get("source").is_none(), "{configured}");
    let listed: Vec<&str> = certs
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["source"] == "customers")
        .map(|c| c["domain"].as_str().unwrap())
        .collect();
    assert_eq!(
        listed,
        [
            "steady.customer.test",
            "new.customer.test",
            "xn--bcher-kva.customer.test"
        ]
    );

    // Garbage: the last good list stays, and every place an operator looks says so.
    write(&s.list, "{\"domains\": \"oops");
    let source = s.source_down("not a domain list").await;
    assert_eq!(source["domains"], 3);
    let (status, ready) = s.admin_json("/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        ready["problems"]
            .to_string()
            .contains("domain source customers"),
        "{ready}"
    );
    let (_, certs) = s.admin_json("/certs").await;
    let steady = certs
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["domain"] == "steady.customer.test")
        .unwrap();
    assert!(steady["source_error"].is_string(), "{steady}");
    let metrics = s.metrics().await;
    assert!(
        metrics.contains("dstack_mesh_domain_source_up{source=\"customers\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("dstack_mesh_domain_source_domains{source=\"customers\"} 3"),
        "{metrics}"
    );
    assert!(s.serves("new.customer.test").await);
    flowing(&load).await;

    // 100,000 entries, past the default cap (max_domains = 20,000): refused whole with a
    // message, and the last good list stays.
    let flood: String = (0..100_000)
        .map(|i| format!("c{i}.customer.test\n"))
        .collect();
    write(&s.list, &flood);
    until("the flood refused", async || {
        s.source().await["last_error"].as_str().is_some_and(|e| {
            e.contains("lists 100000 domains, more than max_domains = 20000: refused whole")
        })
    })
    .await;
    let source = s.source().await;
    assert_eq!(source["up"], false, "{source}");
    assert_eq!(source["domains"], 3, "{source}");
    assert!(s.serves("new.customer.test").await);
    assert!(!s.serves("c7.customer.test").await);
    flowing(&load).await;
    let (ok, failed) = load.finish().await;
    eprintln!("{ok} requests to a listed domain while the list changed and broke, {failed} failed");
    assert_eq!(failed, 0);
    assert!(ok > 0);

    // A restart with the file gone serves the last good list, from the store.
    std::fs::remove_file(&s.list).unwrap();
    s.restart();
    until("the stored list served after a restart", async || {
        s.serves("new.customer.test").await && s.serves("steady.customer.test").await
    })
    .await;
    let source = s.source_down("No such file").await;
    assert_eq!(source["from_store"], true, "{source}");
    // Back: read again.
    write(&s.list, "steady.customer.test\n");
    until("the list read again", async || {
        s.source().await["up"] == true && !s.serves("new.customer.test").await
    })
    .await;
    assert!(s.serves("steady.customer.test").await);
    assert!(s.log().contains("domain source read"), "{}", s.log());
}

/// A customer-domain API: a JSON list under an ETag, answering `304` to a request that names
/// it, `401` without the token; switchable to failing (`500`) or garbage.
#[derive(Clone, Default)]
struct Api {
    state: std::sync::Arc<std::sync::Mutex<ApiState>>,
}

#[derive(Default)]
struct ApiState {
    list: String,
    version: u32,
    failing: bool,
    requests: usize,
    not_modified: usize,
    unauthorized: usize,
}

impl Api {
    async fn start(list: &str) -> (Self, SocketAddr) {
        let api = Self::default();
        api.set(list);
        let state = api.state.clone();
        let addr = e2e::http_stand_in::serve(move |req| {
            let state = state.clone();
            async move {
                let mut s = state.lock().unwrap();
                s.requests += 1;
                let etag = format!("\"v{}\"", s.version);
                let mut resp = http::Response::new(http_body_util::Full::new(bytes::Bytes::new()));
                if req
                    .headers()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    != Some("Bearer customer-token")
                {
                    s.unauthorized += 1;
                    *resp.status_mut() = StatusCode::UNAUTHORIZED;
                } else if s.failing {
                    *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                    *resp.body_mut() = http_body_util::Full::new("database down".into());
                } else if req
                    .headers()
                    .get("if-none-match")
                    .and_then(|v| v.to_str().ok())
                    == Some(etag.as_str())
                {
                    s.not_modified += 1;
                    *resp.status_mut() = StatusCode::NOT_MODIFIED;
                } else {
                    resp.headers_mut().insert("etag", etag.parse().unwrap());
                    *resp.body_mut() = http_body_util::Full::new(s.list.clone().into());
                }
                resp
            }
        })
        .await;
        (api, addr)
    }

    fn set(&self, list: &str) {
        let mut s = self.state.lock().unwrap();
        s.list = list.to_owned();
        s.version += 1;
    }

    fn fail(&self, failing: bool) {
        self.state.lock().unwrap().failing = failing;
    }

    fn counts(&self) -> (usize, usize, usize) {
        let s = self.state.lock().unwrap();
        (s.requests, s.not_modified, s.unauthorized)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_source_is_polled_with_its_etag_and_a_failing_endpoint_keeps_the_list() {
    let (api, addr) = Api::start(r#"{"domains": [{"domain": "shop.customer.test"}]}"#).await;
    let s = Sidecar::start_with(None, |_| {
        format!(
            "url = \"http://{addr}/domains\"\ninterval = \"100ms\"\n\
             [domain_sources.headers]\nAuthorization = \"Bearer customer-token\"\n"
        )
    })
    .await;
    until("the listed domain served", async || {
        s.serves("shop.customer.test").await
    })
    .await;
    // Unchanged lists are not sent again: the poll names the ETag it has.
    until("a poll answered 304", async || api.counts().1 >= 3).await;
    let (requests, not_modified, unauthorized) = api.counts();
    assert_eq!(unauthorized, 0, "the token is sent with every poll");
    assert!(
        requests - not_modified <= 2,
        "{requests} polls, {not_modified} answered 304"
    );
    api.set(r#"{"domains": ["shop.customer.test", "blog.customer.test"]}"#);
    until("the added domain served", async || {
        s.serves("blog.customer.test").await
    })
    .await;
    // The endpoint fails: both domains stay, the source says why.
    api.fail(true);
    s.source_down("500 Internal Server Error: database down")
        .await;
    assert!(s.serves("shop.customer.test").await && s.serves("blog.customer.test").await);
    api.fail(false);
    until("the source back up", async || {
        s.source().await["up"] == true
    })
    .await;
    assert!(s.log().contains("domain source failed"), "{}", s.log());
}

/// `redis-cli` against `redis`, which must answer.
fn redis(redis: &e2e::redis::Redis, args: &[&str]) {
    let out = e2e::redis::cli(redis.addr, args);
    assert!(out.status.success(), "{args:?}: {out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_set_drives_the_domains_through_keyspace_notifications_and_a_redis_outage_drops_none(
) {
    let scratch = tempfile::tempdir().unwrap();
    let store = e2e::redis::Redis::start(&scratch.path().join("redis"));
    redis(&store, &["CONFIG", "SET", "notify-keyspace-events", "KA"]);
    redis(
        &store,
        &["SADD", "customers", "a.customer.test", "b.customer.test"],
    );
    // Polled once an hour: only the notifications can bring the changes in time.
    let addr = store.addr;
    let s = Sidecar::start_with(None, |_| {
        format!("redis = \"redis://{addr}/0\"\nkey = \"customers\"\ninterval = \"1h\"\n")
    })
    .await;
    until("the set's domains served", async || {
        s.serves("a.customer.test").await && s.serves("b.customer.test").await
    })
    .await;
    let load = Load::start(
        Target::public(s.inbound, "b.customer.test", &s.root()),
        &[Caller::Fresh, Caller::H1],
        Duration::from_millis(10),
    );
    // Add, remove, rename while the load runs.
    redis(&store, &["SADD", "customers", "c.customer.test"]);
    until("an added member served", async || {
        s.serves("c.customer.test").await
    })
    .await;
    redis(&store, &["SREM", "customers", "a.customer.test"]);
    redis(&store, &["SREM", "customers", "c.customer.test"]);
    redis(&store, &["SADD", "customers", "c2.customer.test"]);
    until("the removed and renamed members", async || {
        s.serves("c2.customer.test").await
            && !s.serves("c.customer.test").await
            && !s.serves("a.customer.test").await
    })
    .await;
    flowing(&load).await;
    // The key gone (a flushed database): nothing dropped, and said so.
    redis(&store, &["DEL", "customers"]);
    s.source_down("does not exist").await;
    assert!(s.serves("c2.customer.test").await);
    // Redis itself gone: the same.
    redis(
        &store,
        &["SADD", "customers", "b.customer.test", "c2.customer.test"],
    );
    until("the source back", async || s.source().await["up"] == true).await;
    drop(store);
    s.source_down("127.0.0.1").await;
    flowing(&load).await;
    assert!(s.serves("b.customer.test").await && s.serves("c2.customer.test").await);
    let (ok, failed) = load.finish().await;
    eprintln!("{ok} requests while the set changed and Redis went away, {failed} failed");
    assert_eq!(failed, 0);
}

/// `domain`'s entry on `/certs` (null when absent).
async fn cert_of(s: &Sidecar, domain: &str) -> serde_json::Value {
    let (_, certs) = s.admin_json("/certs").await;
    certs
        .as_array()
        .and_then(|all| all.iter().find(|c| c["domain"] == domain))
        .cloned()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_domain_is_served_through_its_sources_grace_then_goes() {
    const DROPPED: &str = "dropped.customer.test";
    let s = Sidecar::start_with(
        Some("kept.customer.test\ndropped.customer.test\n"),
        |list| {
            format!(
                "file = \"{}\"\ninterval = \"200ms\"\ngrace = \"3s\"\n",
                list.display()
            )
        },
    )
    .await;
    until("both served", async || {
        s.serves("kept.customer.test").await && s.serves(DROPPED).await
    })
    .await;
    // Dropped: served on, saying until when.
    write(&s.list, "kept.customer.test\n");
    until("the removal time shown", async || {
        cert_of(&s, DROPPED).await["removing_at"].is_u64()
    })
    .await;
    assert!(s.serves(DROPPED).await, "served through the grace");
    // Listed again within the grace: it stays, the removal called off.
    write(&s.list, "kept.customer.test\ndropped.customer.test\n");
    until("the removal called off", async || {
        cert_of(&s, DROPPED).await["removing_at"].is_null()
    })
    .await;
    // Dropped for good: gone once the grace is over.
    write(&s.list, "kept.customer.test\n");
    until("gone after the grace", async || !s.serves(DROPPED).await).await;
    assert!(cert_of(&s, DROPPED).await.is_null());
    assert!(s.serves("kept.customer.test").await);
    assert!(
        s.log().contains("served until its grace ends"),
        "{}",
        s.log()
    );
}
