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

/// Peak resident memory of `pid`, KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// One instance: its agent, its sidecar and its admin address.
fn instance(
    dir: &Path,
    i: usize,
    endpoints: &[String],
    domains: usize,
) -> (ChildGuard, ChildGuard, SocketAddr) {
    let (agent, sock) = dev_agent(dir, &format!("agent-{i}"), APP, &dir.join("state"));
    let mut config = format!(
        "[agent]\naddress = \"unix:{sock}\"\n\n[inbound]\nlisten = \"127.0.0.1:0\"\nbackend = \"127.0.0.1:9\"\n\n[auth]\nenabled = false\n\n[client]\nenabled = false\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[acme]\nissuer = \"internal-ca\"\nstore = \"{store}\"\n\n[store]\nbackend = \"etcd\"\nendpoints = [{endpoints}]\n",
        sock = sock.display(),
        store = dir.join(format!("store-{i}")).display(),
        endpoints = endpoints.iter().map(|e| format!("\"{e}\"")).collect::<Vec<_>>().join(", "),
    );
    for d in 0..domains {
        config.push_str(&format!(
            "\n[[domains]]\nnames = [\"d{d}.scale.test\"]\nbackend = \"127.0.0.1:9\"\n"
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
    (agent, mesh, e2e::listener(&bound, "admin"))
}

fn main() {
    let args = Args::parse();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cluster = EtcdCluster::start(&d.join("etcd"), 3);
    let before = etcd_messages(&cluster);

    let start = Instant::now();
    let fleet: Vec<_> = (0..args.instances)
        .map(|i| instance(d, i, &cluster.endpoints(), args.domains))
        .collect();
    let spawned = start.elapsed();
    let certs: Vec<serde_json::Value> = loop {
        let certs: Vec<serde_json::Value> = fleet
            .iter()
            .map(|(_, _, admin)| serde_json::from_str(&get(*admin, "/certs")).unwrap_or_default())
            .collect();
        let served = certs
            .iter()
            .map(|c| {
                c.as_array().map_or(0, |a| {
                    a.iter().filter(|d| !d["not_after"].is_null()).count()
                })
            })
            .sum::<usize>();
        if served == args.instances * args.domains {
            break certs;
        }
        assert!(
            start.elapsed() < LIMIT,
            "{served} of {} served after {LIMIT:?}",
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
    let sidecar_rss: Vec<u64> = fleet.iter().map(|(_, m, _)| peak_rss_kib(m.id())).collect();
    let etcd_rss: Vec<u64> = cluster.pids().into_iter().map(peak_rss_kib).collect();
    let issued = messages / orders.max(1) as f64;
    // The same idle window with every sidecar gone: what etcd receives on its own.
    drop(fleet);
    let quiet = etcd_messages(&cluster);
    std::thread::sleep(Duration::from_secs(args.idle));
    let (alone_by_method, _) = delta(&quiet, &etcd_messages(&cluster));
    println!(
        "{}",
        serde_json::json!({
            "instances": args.instances,
            "domains": args.domains,
            "orders": orders,
            "taken_from_fleet": taken,
            "spawn_s": spawned.as_secs_f64(),
            "all_served_s": all_served.as_secs_f64(),
            "etcd_messages": messages,
            "etcd_messages_by_method": by_method,
            "etcd_idle_messages_by_method": idle_by_method,
            "etcd_without_clients_by_method": alone_by_method,
            "etcd_messages_per_issuance": issued,
            "etcd_messages_per_s_idle": idle / args.idle as f64,
            "sidecar_peak_rss_kib_max": sidecar_rss.iter().max(),
            "sidecar_peak_rss_kib_mean": sidecar_rss.iter().sum::<u64>() / sidecar_rss.len().max(1) as u64,
            "etcd_peak_rss_kib_max": etcd_rss.iter().max(),
        })
    );
}
