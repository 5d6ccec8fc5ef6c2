//! replicas-scale: many instances of one app sharing certificates through etcd, for
//! `scripts/replicas-scale` (BENCHMARKS.md's `replicas` section).
//!
//! Starts a three-member etcd cluster and `--instances` sidecars of one app (each with its own
//! development agent; the agents share a state directory, so every instance derives the same
//! keys), each configured with the same `--domains` domains on the internal CA and the etcd
//! store. Measures, from the first spawn, the time until every instance serves every domain
//! (its `/certs` shows a certificate for each); the orders placed (the sum of every instance's
//! `issued_total`, which must equal the domain count) and the certificates taken from the
//! fleet; the gRPC messages etcd received (`grpc_server_msg_received_total`, summed over the
//! members: every unary request and every message on a lease keep-alive or watch stream), in
//! total and per issuance, and per second once everything is served and idle; and the peak RSS
//! (`VmHWM`) of each sidecar and each etcd member.
//!
//! With `--hot-path`, instead: one sidecar on the etcd store and one on the file store, the
//! same domain on each, under `mesh-load --mode public` in interleaved rounds (keep-alive
//! requests, then a new handshake per request), with the gRPC messages etcd received while
//! the etcd one was loaded: the handshake and request path must not touch the store.
//!
//! Prints one JSON object.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark tool: a failure is a failed run

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use clap::Parser;
use e2e::{dev_agent, etcd::EtcdCluster, mesh_binary, ChildGuard};

const APP: &str = "5ca1e5ca1e5ca1e5ca1e5ca1e5ca1e5ca1e5ca1e";
/// A fleet that serves nothing by then has failed.
const LIMIT: Duration = Duration::from_secs(600);

#[derive(Parser)]
struct Args {
    /// Sidecar processes of the one app.
    #[arg(long, default_value_t = 10)]
    instances: usize,
    /// Domains each of them serves.
    #[arg(long, default_value_t = 200)]
    domains: usize,
    /// Seconds of idle traffic to measure once everything is served.
    #[arg(long, default_value_t = 10)]
    idle: u64,
    /// Measure the public http row on the etcd store against the file store instead.
    #[arg(long)]
    hot_path: bool,
    /// Rounds of the hot-path comparison.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds of each hot-path load run.
    #[arg(long, default_value_t = 10)]
    duration: u64,
}

/// A plain HTTP/1.1 GET; the body.
fn get(addr: SocketAddr, path: &str) -> String {
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    tcp.read_to_string(&mut reply).unwrap();
    reply
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

/// gRPC messages etcd's members have received so far, by method.
fn etcd_messages(cluster: &EtcdCluster) -> std::collections::BTreeMap<String, f64> {
    let mut by_method = std::collections::BTreeMap::new();
    for addr in cluster.clients() {
        for line in get(addr, "/metrics")
            .lines()
            .filter(|l| l.starts_with("grpc_server_msg_received_total"))
        {
            let method = line
                .split("grpc_method=\"")
                .nth(1)
                .and_then(|m| m.split('"').next())
                .unwrap_or("?");
            if let Some(n) = line.rsplit(' ').next().and_then(|n| n.parse::<f64>().ok()) {
                *by_method.entry(method.to_owned()).or_default() += n;
            }
        }
    }
    by_method
}

/// `after - before` by method (the ones that moved), and the total.
fn delta(
    before: &std::collections::BTreeMap<String, f64>,
    after: &std::collections::BTreeMap<String, f64>,
) -> (serde_json::Value, f64) {
    let mut moved = serde_json::Map::new();
    let mut total = 0.0;
    for (method, n) in after {
        let d = n - before.get(method).copied().unwrap_or(0.0);
        if d > 0.0 {
            moved.insert(method.clone(), d.into());
            total += d;
        }
    }
    (moved.into(), total)
}

/// One instance: its agent, its sidecar and its admin and inbound addresses, serving
/// `domains` (to `backend`) on the internal CA. `endpoints` empty: the file store.
fn instance(
    dir: &Path,
    i: usize,
    endpoints: &[String],
    domains: &[String],
    backend: SocketAddr,
) -> Instance {
    let (agent, sock) = dev_agent(dir, &format!("agent-{i}"), APP, &dir.join("state"));
    let store = match endpoints.is_empty() {
        true => String::new(),
        false => format!(
            "\n[store]\nbackend = \"etcd\"\nendpoints = [{}]\n",
            endpoints
                .iter()
                .map(|e| format!("\"{e}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut config = format!(
        "[agent]\naddress = \"unix:{sock}\"\n\n[inbound]\nlisten = \"127.0.0.1:0\"\nbackend = \"{backend}\"\n\n[auth]\nenabled = false\n\n[client]\nenabled = false\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[acme]\nissuer = \"internal-ca\"\nstore = \"{acme}\"\n{store}",
        sock = sock.display(),
        acme = dir.join(format!("store-{i}")).display(),
    );
    for name in domains {
        config.push_str(&format!(
            "\n[[domains]]\nnames = [\"{name}\"]\nbackend = \"{backend}\"\n"
        ));
    }
    let path = dir.join(format!("instance-{i}.toml"));
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new(mesh_binary());
    cmd.args(["--log-format", "json", "run", "--config"])
        .arg(&path)
        .env(
            "RUST_LOG",
            std::env::var("SCALE_LOG")
                .unwrap_or_else(|_| "warn,dstack_mesh::app=info,dstack_mesh::run=info".into()),
        )
        .env_remove("DSTACK_AGENT_ADDRESS");
    let (mesh, bound) = e2e::start_mesh(dir, &format!("instance-{i}"), cmd);
    Instance {
        _agent: agent,
        admin: e2e::listener(&bound, "admin"),
        inbound: e2e::listener(&bound, "inbound"),
        mesh,
    }
}

/// A running sidecar and its agent.
struct Instance {
    _agent: ChildGuard,
    mesh: ChildGuard,
    admin: SocketAddr,
    inbound: SocketAddr,
}

/// How many of an instance's domains have a certificate, and its `/certs`.
fn served(i: &Instance) -> (usize, serde_json::Value) {
    let certs: serde_json::Value =
        serde_json::from_str(&get(i.admin, "/certs")).unwrap_or_default();
    let n = certs.as_array().map_or(0, |a| {
        a.iter().filter(|d| !d["not_after"].is_null()).count()
    });
    (n, certs)
}

/// A program built beside this one (`mesh-load`).
fn sibling(name: &str) -> std::path::PathBuf {
    mesh_binary().with_file_name(name)
}

fn main() {
    let args = Args::parse();
    let report = match args.hot_path {
        true => hot_path(&args),
        false => scale(&args),
    };
    println!("{report}");
}

fn scale(args: &Args) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cluster = EtcdCluster::start(&d.join("etcd"), 3);
    let before = etcd_messages(&cluster);
    let domains: Vec<String> = (0..args.domains)
        .map(|i| format!("d{i}.scale.test"))
        .collect();
    let nowhere: SocketAddr = "127.0.0.1:9".parse().unwrap();

    let start = Instant::now();
    let fleet: Vec<Instance> = (0..args.instances)
        .map(|i| instance(d, i, &cluster.endpoints(), &domains, nowhere))
        .collect();
    let spawned = start.elapsed();
    let certs: Vec<serde_json::Value> = loop {
        let status: Vec<(usize, serde_json::Value)> = fleet.iter().map(served).collect();
        let n: usize = status.iter().map(|(n, _)| n).sum();
        if n == args.instances * args.domains {
            break status.into_iter().map(|(_, c)| c).collect();
        }
        assert!(
            start.elapsed() < LIMIT,
            "{n} of {} served after {LIMIT:?}",
            args.instances * args.domains
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let all_served = start.elapsed();
    let after = etcd_messages(&cluster);
    let sum = |field: &str| -> u64 {
        certs
            .iter()
            .flat_map(|c| c.as_array().cloned().unwrap_or_default())
            .map(|d| d[field].as_u64().unwrap_or(0))
            .sum()
    };
    let (orders, taken) = (sum("issued_total"), sum("from_fleet_total"));
    std::thread::sleep(Duration::from_secs(args.idle));
    let (idle_by_method, idle) = delta(&after, &etcd_messages(&cluster));
    let (by_method, messages) = delta(&before, &after);
    let sidecar_rss: Vec<u64> = fleet
        .iter()
        .map(|i| e2e::proc_status_kib(i.mesh.id(), "VmHWM"))
        .collect();
    let etcd_rss: Vec<u64> = cluster
        .pids()
        .into_iter()
        .map(|p| e2e::proc_status_kib(p, "VmHWM"))
        .collect();
    serde_json::json!({
        "instances": args.instances,
        "domains": args.domains,
        "orders": orders,
        "taken_from_fleet": taken,
        "spawn_s": spawned.as_secs_f64(),
        "all_served_s": all_served.as_secs_f64(),
        "etcd_messages": messages,
        "etcd_messages_per_issuance": messages / orders.max(1) as f64,
        "etcd_messages_by_method": by_method,
        "etcd_messages_per_s_idle": idle / args.idle as f64,
        "etcd_idle_messages_by_method": idle_by_method,
        "sidecar_peak_rss_kib_max": sidecar_rss.iter().max(),
        "sidecar_peak_rss_kib_mean": sidecar_rss.iter().sum::<u64>() / sidecar_rss.len().max(1) as u64,
        "etcd_peak_rss_kib_max": etcd_rss.iter().max(),
    })
}

/// `mesh-load run` against `i` for the bench domain; its JSON line.
fn load(i: &Instance, roots: &Path, args: &Args, extra: &[&str]) -> serde_json::Value {
    let out = Command::new(sibling("mesh-load"))
        .args([
            "run", "--name", "hot", "--mode", "public", "--sni", HOT_DOMAIN,
        ])
        .arg("--addr")
        .arg(i.inbound.to_string())
        .arg("--ca")
        .arg(roots)
        .args(["--duration", &args.duration.to_string()])
        .args(["--pid", &i.mesh.id().to_string()])
        .args(extra)
        .output()
        .expect("run mesh-load");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("mesh-load's JSON line")
}

/// The domain of the hot-path comparison.
const HOT_DOMAIN: &str = "bench.scale.test";

fn hot_path(args: &Args) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cluster = EtcdCluster::start(&d.join("etcd"), 3);
    let port = e2e::free_port();
    let backend: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut cmd = Command::new(sibling("mesh-load"));
    cmd.args(["backend", "--listen", &backend.to_string()]);
    let _backend = ChildGuard::spawn("backend", cmd, d).unwrap();
    let domains = [HOT_DOMAIN.to_owned()];
    let on_etcd = instance(d, 0, &cluster.endpoints(), &domains, backend);
    let on_file = instance(d, 1, &[], &domains, backend);
    let start = Instant::now();
    while served(&on_etcd).0 + served(&on_file).0 < 2 {
        assert!(start.elapsed() < LIMIT, "the bench domain is not served");
        std::thread::sleep(Duration::from_millis(50));
    }
    let roots = d.join("roots.pem");
    let pem: String = (0..2)
        .map(|i| std::fs::read_to_string(d.join(format!("store-{i}/internal-ca/ca.pem"))).unwrap())
        .collect();
    std::fs::write(&roots, pem).unwrap();
    let mut rows: std::collections::BTreeMap<String, Vec<serde_json::Value>> = Default::default();
    let mut etcd_during = 0.0;
    let mut requests_on_etcd = 0.0;
    for round in 0..args.rounds {
        // Each goes first every other round: whatever the order favours cancels out.
        let mut order = [("etcd", &on_etcd), ("file", &on_file)];
        if round % 2 == 1 {
            order.reverse();
        }
        for (store, i) in order {
            for (kind, extra) in [
                ("keep-alive", vec!["--connections", "64"]),
                (
                    "handshakes",
                    vec!["--connections", "16", "--new-connections"],
                ),
            ] {
                let before = etcd_messages(&cluster);
                let result = load(i, &roots, args, &extra);
                if store == "etcd" {
                    etcd_during += delta(&before, &etcd_messages(&cluster)).1;
                    requests_on_etcd += result["requests"].as_f64().unwrap_or(0.0);
                }
                rows.entry(format!("{store} {kind}"))
                    .or_default()
                    .push(result);
            }
        }
    }
    let median = |runs: &mut Vec<serde_json::Value>| -> serde_json::Value {
        runs.sort_by(|a, b| {
            a["rps"]
                .as_f64()
                .unwrap_or(0.0)
                .total_cmp(&b["rps"].as_f64().unwrap_or(0.0))
        });
        runs[runs.len() / 2].clone()
    };
    let medians: serde_json::Map<String, serde_json::Value> = rows
        .iter_mut()
        .map(|(k, runs)| (k.clone(), median(runs)))
        .collect();
    serde_json::json!({
        "rounds": args.rounds,
        "duration_s": args.duration,
        "medians": medians,
        "etcd_messages_while_loaded": etcd_during,
        "requests_on_etcd_instance": requests_on_etcd,
    })
}
