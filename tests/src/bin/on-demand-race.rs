//! A customer's first visits, many at once, to a name an on-demand TLS server has never seen,
//! against pebble: dstack-mesh (`[on_demand]`) or Caddy (`on_demand_tls`, Debian's package),
//! each asking the same `ask` endpoint and validated by the same pebble on loopback.
//!
//! For each burst size, a new name and that many TLS handshakes started at once; one JSON line
//! each: the handshakes that completed with a certificate for the name, the ones that failed
//! (and the first reason), the orders pebble saw for it, and the latencies from connect to a
//! completed handshake. `scripts/domains-bench` runs it for both servers.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a measurement tool: a failed setup aborts

use std::{net::SocketAddr, path::PathBuf, process::Command, time::Duration};

use clap::{Parser, ValueEnum};
use e2e::{
    backend::Backend,
    dev_agent, free_port,
    pebble::{Pebble, PebbleOptions},
    run_mesh, ChildGuard,
};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Server {
    Mesh,
    Caddy,
}

#[derive(Parser)]
struct Args {
    #[arg(long, value_enum)]
    server: Server,
    /// Handshakes at once for each new name.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    bursts: Vec<usize>,
    /// Caddy's binary.
    #[arg(long, default_value = "/usr/bin/caddy")]
    caddy: PathBuf,
    /// Where everything runs (kept for its logs); a temporary directory by default.
    #[arg(long)]
    dir: Option<PathBuf>,
}

const APP: &str = "0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d";

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let temp = tempfile::tempdir().unwrap();
    let dir = args.dir.clone().unwrap_or_else(|| temp.path().to_owned());
    std::fs::create_dir_all(&dir).unwrap();
    let (https, http) = (free_port(), free_port());
    let pebble_dir = dir.join("pebble");
    let pebble = tokio::task::spawn_blocking(move || {
        let options = PebbleOptions {
            tls_port: https,
            http_port: http,
            ..PebbleOptions::default()
        };
        Pebble::start(&pebble_dir, options)
    })
    .await
    .unwrap();
    let backend = Backend::start().await;
    // Allows every name under allowed.test.
    let ask = e2e::http_stand_in::serve(|req| async move {
        let allowed = e2e::http_stand_in::query_pairs(req.uri())
            .iter()
            .any(|(k, v)| k == "domain" && v.ends_with(".allowed.test"));
        let mut resp = http::Response::new(http_body_util::Full::new(bytes::Bytes::new()));
        if !allowed {
            *resp.status_mut() = http::StatusCode::NOT_FOUND;
        }
        resp
    })
    .await;
    let around = Around {
        dir: &dir,
        pebble: &pebble,
        https,
        http,
        ask,
        backend: backend.addr,
    };
    let (_server, _agent) = match args.server {
        Server::Mesh => start_mesh(&around),
        Server::Caddy => start_caddy(&args.caddy, &around),
    };
    let addr: SocketAddr = ([127, 0, 0, 1], https).into();
    for _ in 0..400 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let root = pebble.issuance_root_pem().into_bytes();
    for n in args.bursts {
        let name = format!("burst{n}.allowed.test");
        let orders = pebble.orders_seen();
        let mut visits = tokio::task::JoinSet::new();
        for _ in 0..n {
            let (name, root) = (name.clone(), root.clone());
            visits.spawn(async move {
                let started = std::time::Instant::now();
                let visit = e2e::client::public_connect(addr, &name, &root, &[b"http/1.1"]);
                match tokio::time::timeout(Duration::from_secs(90), visit).await {
                    Ok(Ok(_)) => Ok(started.elapsed()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("no handshake within 90 s".to_owned()),
                }
            });
        }
        let (mut took, mut failed) = (Vec::new(), Vec::new());
        while let Some(visit) = visits.join_next().await {
            match visit.unwrap() {
                Ok(t) => took.push(t.as_secs_f64() * 1000.0),
                Err(e) => failed.push(e),
            }
        }
        took.sort_by(f64::total_cmp);
        let at =
            |q: f64| took.get(((took.len() as f64 * q) as usize).min(took.len().saturating_sub(1)));
        println!(
            "{}",
            serde_json::json!({
                "server": match args.server { Server::Mesh => "dstack-mesh", Server::Caddy => "caddy" },
                "concurrent": n,
                "ok": took.len(),
                "failed": failed.len(),
                "first_failure": failed.first(),
                "orders": pebble.orders_seen() - orders,
                "min_ms": took.first(),
                "p50_ms": at(0.5),
                "max_ms": took.last(),
            })
        );
    }
}

/// What either server is started with: its directory, the CA, its ports (HTTPS, where pebble
/// validates TLS-ALPN-01, and HTTP for HTTP-01), the `ask` endpoint and the backend.
struct Around<'a> {
    dir: &'a std::path::Path,
    pebble: &'a Pebble,
    https: u16,
    http: u16,
    ask: SocketAddr,
    backend: SocketAddr,
}

/// dstack-mesh with `[on_demand]`, its inbound listener on `https`, HTTP-01 on `http`.
fn start_mesh(a: &Around<'_>) -> (ChildGuard, Option<ChildGuard>) {
    let Around {
        dir,
        pebble,
        https,
        http,
        ask,
        backend,
    } = *a;
    let (agent, sock) = dev_agent(dir, "agent", APP, &dir.join("state"));
    let config = dir.join("mesh.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\naddress = \"unix:{sock}\"\n\
             [inbound]\nlisten = \"127.0.0.1:{https}\"\nbackend = \"{backend}\"\n\
             [auth]\nenabled = false\n[client]\nenabled = false\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [acme]\nstore = \"{store}\"\nissuer = \"{directory}\"\nca_roots = [\"{ca}\"]\n\
             http_listen = \"127.0.0.1:{http}\"\n\
             [on_demand]\nask = \"http://{ask}/check\"\nbackend = \"{backend}\"\n",
            sock = sock.display(),
            store = dir.join("store").display(),
            directory = pebble.directory,
            ca = pebble.ca_file.display(),
        ),
    )
    .unwrap();
    let (mesh, _) = run_mesh(dir, "mesh", &config);
    (mesh, Some(agent))
}

/// Caddy with `on_demand_tls` asking the same endpoint, pebble as its CA, HTTPS on `https` and
/// HTTP (for HTTP-01) on `http`; nothing written outside `dir`.
fn start_caddy(caddy: &std::path::Path, a: &Around<'_>) -> (ChildGuard, Option<ChildGuard>) {
    let Around {
        dir,
        pebble,
        https,
        http,
        ask,
        backend,
    } = *a;
    let home = dir.join("caddy");
    std::fs::create_dir_all(&home).unwrap();
    let caddyfile = home.join("Caddyfile");
    std::fs::write(
        &caddyfile,
        format!(
            "{{\n\tadmin off\n\thttp_port {http}\n\thttps_port {https}\n\
             \tacme_ca {directory}\n\tacme_ca_root {ca}\n\
             \tstorage file_system {{\n\t\troot {storage}\n\t}}\n\
             \ton_demand_tls {{\n\t\task http://{ask}/check\n\t}}\n}}\n\
             https:// {{\n\ttls {{\n\t\ton_demand\n\t}}\n\treverse_proxy {backend}\n}}\n",
            directory = pebble.directory,
            ca = pebble.ca_file.display(),
            storage = home.join("data").display(),
        ),
    )
    .unwrap();
    let mut cmd = Command::new(caddy);
    cmd.args(["run", "--adapter", "caddyfile", "--config"])
        .arg(&caddyfile)
        .env("HOME", &home)
        .env("XDG_DATA_HOME", home.join("data"))
        .env("XDG_CONFIG_HOME", home.join("config"));
    (ChildGuard::spawn("caddy", cmd, dir).unwrap(), None)
}
