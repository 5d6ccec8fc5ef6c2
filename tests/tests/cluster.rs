//! A three-member etcd cluster across three "CVMs" whose only way to each other is attested
//! tunnels, as dstack-vpc's VPN carried it. Each CVM is a network namespace with its own
//! loopback, holding one etcd member (on loopback only) and a `dstack-mesh run` sidecar:
//! `[[inbound.tcp]]` services for the member's peer and client ports, and `[[tunnels]]` at the
//! other members' addresses. Member k's URLs are 127.0.0.1:2380k / 2379k in every CVM: its own
//! listener in its CVM, a tunnel in the others. Debian's HAProxy on the host is the dstack
//! gateway (TLS passthrough by SNI); development agents share one KMS root.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use e2e::{dev_agent, mesh_binary, netns::Netns, program, start_mesh, wait_until, ChildGuard};

/// The three members' apps (one app per CVM, each allowing the others).
const APPS: [&str; 3] = [
    "a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0",
    "a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1",
    "a2a2a2a2a2a2a2a2a2a2a2a2a2a2a2a2a2a2a2a2",
];
const BASE: &str = "gw.test";
/// The service ports each CVM offers the gateway.
const PEER: u16 = 2380;
const CLIENT: u16 = 2379;

fn peer_url(k: usize) -> String {
    format!("http://127.0.0.1:2380{k}")
}

fn client_url(k: usize) -> String {
    format!("http://127.0.0.1:2379{k}")
}

/// The sidecar of CVM `i`: its member's two ports as services, the other members' as tunnels.
fn sidecar_config(dir: &Path, i: usize, agent: &Path, gateway: SocketAddr) -> PathBuf {
    let allowed = APPS.map(|a| format!("\"{a}\"")).join(", ");
    let mut text = format!(
        "[agent]\naddress = \"unix:{agent}\"\n[inbound]\nenabled = false\n[auth]\nenabled = false\n\
         [admin]\nlisten = \"127.0.0.1:8090\"\n[client]\naddress = \"127.0.0.1\"\nport = 8091\n\
         [dstack]\ngateway_domain = \"{BASE}\"\n[outbound]\ngateway_address = \"{gateway}\"\n\
         [[inbound.tcp]]\nname = \"peer\"\nlisten = \"0.0.0.0:{PEER}\"\nbackend = \"127.0.0.1:2380{i}\"\nallowed_apps = [{allowed}]\n\
         [[inbound.tcp]]\nname = \"client\"\nlisten = \"0.0.0.0:{CLIENT}\"\nbackend = \"127.0.0.1:2379{i}\"\nallowed_apps = [{allowed}]\n",
        agent = agent.display(),
    );
    for (k, app) in APPS.iter().enumerate().filter(|(k, _)| *k != i) {
        text += &format!(
            "[[tunnels]]\nname = \"peer-{k}\"\nlisten = \"127.0.0.1:2380{k}\"\ntarget_app = \"{app}\"\ntarget_port = {PEER}\n\
             [[tunnels]]\nname = \"client-{k}\"\nlisten = \"127.0.0.1:2379{k}\"\ntarget_app = \"{app}\"\ntarget_port = {CLIENT}\n"
        );
    }
    let path = dir.join(format!("sidecar-{i}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Debian's HAProxy as the dstack gateway, reachable from each CVM at its host address:
/// `<app>-<port>s.<BASE>` to that CVM's service port.
fn gateway(dir: &Path, cvms: &[Netns], port: u16) -> ChildGuard {
    let mut config = "defaults\n    mode tcp\n    timeout connect 10s\n    timeout client 1h\n    timeout server 1h\n\nfrontend gateway\n".to_owned();
    for cvm in cvms {
        config += &format!("    bind {}:{port}\n", cvm.host_ip);
    }
    config += "    tcp-request inspect-delay 5s\n    tcp-request content accept if { req_ssl_hello_type 1 }\n";
    for (i, app) in APPS.iter().enumerate() {
        for p in [PEER, CLIENT] {
            config +=
                &format!("    use_backend c{i}-{p} if {{ req_ssl_sni -i {app}-{p}s.{BASE} }}\n");
        }
    }
    for (i, cvm) in cvms.iter().enumerate() {
        for p in [PEER, CLIENT] {
            config += &format!("\nbackend c{i}-{p}\n    server s {}:{p}\n", cvm.ip);
        }
    }
    let file = dir.join("haproxy.cfg");
    std::fs::write(&file, config).unwrap();
    let mut cmd = Command::new(program("haproxy"));
    cmd.arg("-db").arg("-f").arg(&file);
    let mut haproxy = ChildGuard::spawn("haproxy", cmd, dir).unwrap();
    let addr = SocketAddr::from((cvms[0].host_ip, port));
    wait_until("haproxy to listen", Duration::from_secs(20), || {
        haproxy.assert_running();
        std::net::TcpStream::connect(addr).is_ok()
    });
    haproxy
}

/// etcd member `i` inside its CVM, on loopback only.
fn member(dir: &Path, cvm: &Netns, i: usize) -> ChildGuard {
    let initial = (0..3)
        .map(|k| format!("m{k}={}", peer_url(k)))
        .collect::<Vec<_>>()
        .join(",");
    let mut cmd = cvm.command(program("etcd"));
    cmd.args(["--name", &format!("m{i}")])
        .arg("--data-dir")
        .arg(dir.join(format!("m{i}")))
        .args(["--listen-peer-urls", &peer_url(i)])
        .args(["--initial-advertise-peer-urls", &peer_url(i)])
        .args(["--listen-client-urls", &client_url(i)])
        .args(["--advertise-client-urls", &client_url(i)])
        .args(["--initial-cluster", &initial])
        .args(["--initial-cluster-token", "tunnelled"])
        .args(["--initial-cluster-state", "new"])
        .args(["--logger", "zap", "--log-outputs", "stderr"]);
    ChildGuard::spawn(&format!("etcd-m{i}"), cmd, dir).expect("start etcd")
}

/// `etcdctl` inside `cvm` against `endpoints` (its own member directly, the others through its
/// tunnels).
fn etcdctl(cvm: &Netns, endpoints: &[String], args: &[&str]) -> Output {
    cvm.command(program("timeout"))
        .arg("20")
        .arg(program("etcdctl"))
        .arg("--endpoints")
        .arg(endpoints.join(","))
        .args(["--dial-timeout", "3s", "--command-timeout", "10s"])
        .args(args)
        .env("ETCDCTL_API", "3")
        .output()
        .unwrap()
}

fn all_clients() -> Vec<String> {
    (0..3).map(client_url).collect()
}

/// Start the sidecar of CVM `i`.
fn start_sidecar(dir: &Path, cvm: &Netns, name: &str, config: &Path) -> ChildGuard {
    let mut cmd = cvm.command(mesh_binary());
    cmd.args(["--log-format", "json", "run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info,dstack_mesh::tunnel=debug")
        .env_remove("DSTACK_AGENT_ADDRESS");
    start_mesh(dir, name, cmd).0
}

#[test]
fn an_etcd_cluster_forms_across_tunnels_and_survives_a_sidecar_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let state = d.join("state");
    let cvms: Vec<Netns> = (0..3).map(|i| Netns::create(i as u8)).collect();
    let gw_port = e2e::free_port();
    let _gateway = gateway(d, &cvms, gw_port);
    let mut agents = Vec::new();
    let mut sidecars = Vec::new();
    let mut configs = Vec::new();
    for (i, cvm) in cvms.iter().enumerate() {
        let (agent, socket) = dev_agent(d, &format!("agent-{i}"), APPS[i], &state);
        agents.push(agent);
        let config = sidecar_config(d, i, &socket, SocketAddr::from((cvm.host_ip, gw_port)));
        sidecars.push(Some(start_sidecar(
            d,
            cvm,
            &format!("sidecar-{i}"),
            &config,
        )));
        configs.push(config);
    }
    let _members: Vec<ChildGuard> = (0..3).map(|i| member(d, &cvms[i], i)).collect();

    // The cluster forms: every member healthy, seen from CVM 0 (its own directly, the others
    // through its tunnels), and a write in one CVM is read in another.
    let healthy = |from: usize| {
        wait_until(
            &format!("etcd healthy from CVM {from}"),
            Duration::from_secs(90),
            || {
                etcdctl(&cvms[from], &all_clients(), &["endpoint", "health"])
                    .status
                    .success()
            },
        );
    };
    healthy(0);
    let put = etcdctl(
        &cvms[1],
        &[client_url(1)],
        &["put", "/greeting", "across tunnels"],
    );
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    let got = etcdctl(
        &cvms[2],
        &[client_url(2)],
        &["get", "--print-value-only", "/greeting"],
    );
    assert_eq!(
        String::from_utf8_lossy(&got.stdout).trim(),
        "across tunnels"
    );
    let list = etcdctl(&cvms[0], &[client_url(0)], &["member", "list"]);
    assert_eq!(String::from_utf8_lossy(&list.stdout).lines().count(), 3);

    // CVM 1's sidecar restarts: its member is cut off meanwhile, the other two keep quorum
    // and take writes; afterwards member 1 catches up through the new sidecar's tunnels.
    sidecars[1] = None;
    // (If member 1 led, the others elect a new leader first.)
    wait_until("a write without CVM 1", Duration::from_secs(60), || {
        etcdctl(
            &cvms[0],
            &[client_url(0)],
            &["put", "/during", "sidecar 1 down"],
        )
        .status
        .success()
    });
    // No other path reaches member 1: it has not seen that write.
    let cut_off = etcdctl(
        &cvms[1],
        &[client_url(1)],
        &["get", "--consistency=s", "--print-value-only", "/during"],
    );
    assert_eq!(String::from_utf8_lossy(&cut_off.stdout).trim(), "");
    sidecars[1] = Some(start_sidecar(d, &cvms[1], "sidecar-1-again", &configs[1]));
    healthy(0);
    healthy(1);
    // Member 1's own copy (a serializable read answers from the local member alone).
    wait_until("member 1 to catch up", Duration::from_secs(60), || {
        let got = etcdctl(
            &cvms[1],
            &[client_url(1)],
            &["get", "--consistency=s", "--print-value-only", "/during"],
        );
        String::from_utf8_lossy(&got.stdout).trim() == "sidecar 1 down"
    });
    drop(agents);
}
