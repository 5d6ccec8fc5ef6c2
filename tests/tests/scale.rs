//! Thousands of customer domains on one sidecar (a file source, the internal CA): all issued
//! and served; a restart serves every one from the store with no order; memory per domain and
//! the start-up time are printed (`SCALE_DOMAINS`, default 2,000; BENCHMARKS.md has 10,000 on a
//! release build).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::{net::SocketAddr, time::Duration};

use e2e::{backend::Backend, dev_agent, listener, run_mesh};

const APP: &str = "5ca1e5ca1e5ca1e5ca1e5ca1e5ca1e5ca1e5ca1e";

/// How many domains (`SCALE_DOMAINS`).
fn domains() -> usize {
    std::env::var("SCALE_DOMAINS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

/// The sidecar's count of valid domains, from its metrics.
async fn valid(admin: SocketAddr) -> usize {
    let (_, body) = e2e::client::http1_get(admin, "/metrics", &[]).await;
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix("dstack_mesh_domains{state=\"valid\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Wait (up to `limit`) until `n` domains are valid; how long it took.
async fn all_valid(admin: SocketAddr, n: usize, limit: Duration) -> Duration {
    let start = tokio::time::Instant::now();
    loop {
        let now = valid(admin).await;
        if now >= n {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{now} of {n} valid after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_customer_domains_are_served_and_a_restart_loads_them_all_from_the_store() {
    let n = domains();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_agent, sock) = dev_agent(d, "agent", APP, &d.join("state"));
    let backend = Backend::start().await;
    let names: Vec<String> = (0..n)
        .map(|i| format!("c{i}.customer{}.test", i % 97))
        .collect();
    let list = d.join("customers.txt");
    std::fs::write(&list, names.join("\n")).unwrap();
    let config = d.join("mesh.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\naddress = \"unix:{sock}\"\n\
             [inbound]\nlisten = \"127.0.0.1:{port}\"\nbackend = \"{backend}\"\n\
             [auth]\nenabled = false\n[client]\nenabled = false\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [acme]\nstore = \"{store}\"\nissuer = \"internal-ca\"\n\
             [[domain_sources]]\nfile = \"{list}\"\nbackend = \"{backend}\"\n",
            sock = sock.display(),
            port = e2e::free_port(),
            backend = backend.addr,
            store = d.join("store").display(),
            list = list.display(),
        ),
    )
    .unwrap();
    let (mesh, bound) = run_mesh(d, "mesh", &config);
    let admin = listener(&bound, "admin");
    let before = e2e::proc_status_kib(mesh.id(), "VmRSS");
    let issued = all_valid(admin, n, Duration::from_secs(150)).await;
    let after = e2e::proc_status_kib(mesh.id(), "VmRSS");
    let root = std::fs::read(d.join("store/internal-ca/ca.pem")).unwrap();
    let inbound = listener(&bound, "inbound");
    for name in [&names[0], &names[n / 2], &names[n - 1]] {
        e2e::client::public_connect(inbound, name, &root, &[b"http/1.1"])
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    drop(mesh);

    // A restart: every certificate from the store, none ordered.
    let started = tokio::time::Instant::now();
    let (again, bound) = run_mesh(d, "mesh-again", &config);
    let admin = listener(&bound, "admin");
    all_valid(admin, n, Duration::from_secs(60)).await;
    let loaded = started.elapsed();
    let rss = e2e::proc_status_kib(again.id(), "VmRSS");
    let log = again.stderr();
    assert!(!log.contains("certificate issued and served"), "{log}");
    let inbound = listener(&bound, "inbound");
    for name in [&names[1], &names[n - 2]] {
        e2e::client::public_connect(inbound, name, &root, &[b"http/1.1"])
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    eprintln!(
        "{n} domains: issued in {issued:?} ({:.1} KiB each while issuing: {before} -> {after} KiB); \
         restart: all served in {loaded:?} (process start included), {rss} KiB resident, {:.1} KiB per domain",
        after.saturating_sub(before) as f64 / n as f64,
        rss as f64 / n as f64,
    );
}
