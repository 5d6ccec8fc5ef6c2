//! Several instances of one app behind one name (issue 15): three `dstack-mesh run` sidecars of
//! the same app (development agents sharing a state directory, so they derive the same keys)
//! and a three-member etcd cluster. One certificate for the fleet, whoever orders it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::{net::SocketAddr, path::Path, time::Duration};

use e2e::{backend::Backend, dev_agent, etcd::EtcdCluster, run_mesh, wait_until, ChildGuard};

const APP: &str = "3e9113e9113e9113e9113e9113e9113e9113e911";
const DOMAIN: &str = "shop.test";

/// One sidecar of the fleet on the internal CA, sharing through `endpoints`; its mesh backend
/// is `backend` too, with `caller` allowed in. Its processes and its inbound and admin
/// addresses.
fn replica(
    dir: &Path,
    i: usize,
    state: &Path,
    backend: SocketAddr,
    endpoints: &[String],
    caller: &str,
) -> (Vec<ChildGuard>, SocketAddr, SocketAddr) {
    let (agent, sock) = dev_agent(dir, &format!("agent-{i}"), APP, state);
    let config = dir.join(format!("replica-{i}.toml"));
    let endpoints: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    std::fs::write(
        &config,
        format!(
            "[agent]\naddress = \"unix:{sock}\"\n\n[inbound]\nlisten = \"127.0.0.1:0\"\nbackend = \"{backend}\"\nallowed_apps = \"{caller}\"\n\n[auth]\nenabled = false\n\n[client]\nenabled = false\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[acme]\nissuer = \"internal-ca\"\nstore = \"{store}\"\n\n[[domains]]\nnames = [\"{DOMAIN}\"]\nbackend = \"{backend}\"\n\n[store]\nbackend = \"etcd\"\nendpoints = [{endpoints}]\n",
            sock = sock.display(),
            store = dir.join(format!("store-{i}")).display(),
            endpoints = endpoints.join(", "),
        ),
    )
    .unwrap();
    let (mesh, bound) = run_mesh(dir, &format!("replica-{i}"), &config);
    (
        vec![agent, mesh],
        e2e::listener(&bound, "inbound"),
        e2e::listener(&bound, "admin"),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn three_replicas_share_one_certificate_ordered_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cluster = EtcdCluster::start(&d.join("etcd"), 3);
    let backend = Backend::start().await;
    let state = d.join("state");
    let replicas: Vec<(Vec<ChildGuard>, SocketAddr)> = (0..3)
        .map(|i| {
            let (processes, inbound, _) =
                replica(d, i, &state, backend.addr, &cluster.endpoints(), APP);
            (processes, inbound)
        })
        .collect();

    // Every instance serves the domain, and the same certificate: one issuance for the fleet
    // (each internal-CA issuance makes a new key, so two orders could not look alike).
    let mut leaves = Vec::new();
    wait_until(
        "every replica to serve the domain",
        Duration::from_secs(60),
        || {
            let roots: Vec<u8> = (0..3)
                .filter_map(|i| std::fs::read(d.join(format!("store-{i}/internal-ca/ca.pem"))).ok())
                .flatten()
                .collect();
            leaves = replicas
                .iter()
                .map(|(_, addr)| {
                    tokio::task::block_in_place(|| {
                        tokio::runtime::Handle::current().block_on(served(
                            *addr,
                            DOMAIN,
                            &String::from_utf8_lossy(&roots),
                        ))
                    })
                })
                .collect();
            leaves.iter().all(Option::is_some)
        },
    );
    assert!(
        leaves.iter().all(|l| l == &leaves[0]),
        "the replicas serve different certificates: {leaves:?}"
    );
    let logs: Vec<String> = replicas.iter().map(|(p, _)| p[1].stderr()).collect();
    let taken = logs
        .iter()
        .filter(|l| l.contains("the fleet's certificate taken"))
        .count();
    assert_eq!(
        taken, 2,
        "two replicas take the one the first ordered:\n{logs:?}"
    );

    // What etcd holds is sealed: no PEM, no domain name.
    let dump = cluster.etcdctl(&["get", "--prefix", "/dstack-mesh/"]);
    let text = String::from_utf8_lossy(&dump.stdout);
    assert!(!text.is_empty() && dump.status.success(), "{dump:?}");
    for plain in ["BEGIN", DOMAIN] {
        assert!(!text.contains(plain), "{plain} readable in etcd:\n{text}");
    }
}

/// etcd unreachable at start: the sidecar says so, naming the endpoint, serves the mesh, and
/// the domain waits (failed, retried) instead of ordering on its own.
#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_etcd_endpoint_is_named_and_the_mesh_still_serves() {
    const CALLER: &str = "ca11e7ca11e7ca11e7ca11e7ca11e7ca11e7ca11";
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let state = d.join("state");
    let backend = Backend::start().await;
    let nobody = format!("http://127.0.0.1:{}", e2e::free_port());
    let (processes, inbound, admin) = replica(
        d,
        0,
        &state,
        backend.addr,
        std::slice::from_ref(&nobody),
        CALLER,
    );
    let mesh = &processes[1];
    wait_until("the store error", Duration::from_secs(30), || {
        let log = mesh.stderr();
        log.contains("the fleet's store is unavailable") && log.contains(&nobody)
    });
    let (caller, _caller_agent) = e2e::identity(d, &state, CALLER).await;
    let mut client = e2e::client::MeshClient::connect(
        &caller,
        &APP.parse().unwrap(),
        inbound,
        Some(&[b"http/1.1"]),
    )
    .await
    .unwrap();
    let (status, _, _) = client
        .get("/mesh", &[("host", "app.internal")])
        .await
        .unwrap();
    assert_eq!(status, http::StatusCode::OK);
    assert_eq!(backend.count(), 1);
    assert!(
        !mesh.stderr().contains("certificate issued"),
        "ordered without the fleet's lock"
    );
    // /ready says why.
    let (status, body) = e2e::client::http1_get(admin, "/ready", &[]).await;
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, http::StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("store: ") && body.contains(&nobody), "{body}");
}

/// A TCP balancer in front of the fleet for the CA's validation connections: each goes to an
/// instance that has placed no order when there is one (the CA reaching a replica that never
/// saw the order), else to any that answers. While `hold` is set, a connection waits for it to
/// clear after saying so on `arrived`.
struct Balancer {
    /// Connections sent to each replica.
    sent: std::sync::Arc<std::sync::Mutex<Vec<usize>>>,
    /// Where it listens.
    port: u16,
    /// Where validations go, with each replica's log.
    routes: std::sync::Arc<std::sync::Mutex<Vec<(SocketAddr, std::path::PathBuf)>>>,
    hold: tokio::sync::watch::Sender<bool>,
    arrived: tokio::sync::mpsc::Receiver<()>,
}

impl Balancer {
    /// Listening on `port` at once, holding every connection until [`Balancer::route`] gives
    /// it the replicas and the hold is lifted.
    async fn start(port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let sent = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let routes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (hold, held) = tokio::sync::watch::channel(true);
        let (arrive, arrived) = tokio::sync::mpsc::channel(16);
        let (counts, table) = (sent.clone(), routes.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let (counts, table) = (counts.clone(), table.clone());
                let (mut held, arrive) = (held.clone(), arrive.clone());
                tokio::spawn(async move {
                    if *held.borrow() {
                        let _ = arrive.try_send(());
                        let _ = held.wait_for(|h| !h).await;
                    }
                    let routes: Vec<(SocketAddr, std::path::PathBuf)> =
                        table.lock().unwrap().clone();
                    // Instances that placed no order first; one that does not answer (killed)
                    // is skipped.
                    let mut order: Vec<usize> = (0..routes.len()).collect();
                    order.sort_by_key(|&i| {
                        std::fs::read_to_string(&routes[i].1)
                            .unwrap_or_default()
                            .contains("ordering for the fleet")
                    });
                    for i in order {
                        if let Ok(mut server) = tokio::net::TcpStream::connect(routes[i].0).await {
                            counts.lock().unwrap()[i] += 1;
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                            return;
                        }
                    }
                });
            }
        });
        Self {
            port,
            sent,
            routes,
            hold,
            arrived,
        }
    }

    /// The replicas (address, log) to send validations to.
    fn route(&self, routes: Vec<(SocketAddr, std::path::PathBuf)>) {
        *self.sent.lock().unwrap() = vec![0; routes.len()];
        *self.routes.lock().unwrap() = routes;
    }
}

/// One replica of a fleet on pebble.
struct PebbleReplica {
    processes: Vec<ChildGuard>,
    inbound: SocketAddr,
    log: std::path::PathBuf,
}

/// Three replicas on pebble (a TLS-ALPN-01 and an HTTP-01 domain) and the balancers pebble
/// validates through.
struct PebbleFleet {
    pebble: e2e::pebble::Pebble,
    replicas: Vec<PebbleReplica>,
    tls: Balancer,
    http: Balancer,
}

impl PebbleFleet {
    /// The fleet, its validations held at the balancers until [`PebbleFleet::release`].
    async fn start(d: &Path, cluster: &EtcdCluster, backend: SocketAddr, lock_ttl: &str) -> Self {
        let state = d.join("state");
        // The balancers listen first: pebble is configured with their ports, and a replica may
        // order as soon as it starts.
        let (tls, http) = (Balancer::start(0).await, Balancer::start(0).await);
        let (tls_port, http_port) = (tls.port, http.port);
        let pebble_dir = d.join("pebble");
        let pebble = tokio::task::spawn_blocking(move || {
            e2e::pebble::Pebble::start(
                &pebble_dir,
                e2e::pebble::PebbleOptions {
                    tls_port,
                    http_port,
                    ..Default::default()
                },
            )
        })
        .await
        .unwrap();
        let endpoints: Vec<String> = cluster
            .endpoints()
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect();
        let mut replicas = Vec::new();
        let mut http_targets = Vec::new();
        for i in 0..3 {
            let (agent, sock) = dev_agent(d, &format!("agent-{i}"), APP, &state);
            let config = d.join(format!("pebble-replica-{i}.toml"));
            std::fs::write(
                &config,
                format!(
                    "[agent]\naddress = \"unix:{sock}\"\n\n[inbound]\nlisten = \"127.0.0.1:0\"\nbackend = \"{backend}\"\n\n[auth]\nenabled = false\n\n[client]\nenabled = false\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[acme]\nissuer = \"{dir}\"\nca_roots = [\"{ca}\"]\nstore = \"{store}\"\nhttp_listen = \"127.0.0.1:0\"\n\n[[domains]]\nnames = [\"alpn.test\"]\nbackend = \"{backend}\"\nchallenge = \"tls-alpn-01\"\n\n[[domains]]\nnames = [\"http.test\"]\nbackend = \"{backend}\"\nchallenge = \"http-01\"\n\n[store]\nbackend = \"etcd\"\nendpoints = [{endpoints}]\nlock_ttl = \"{lock_ttl}\"\n",
                    sock = sock.display(),
                    dir = pebble.directory,
                    ca = pebble.ca_file.display(),
                    store = d.join(format!("pebble-store-{i}")).display(),
                    endpoints = endpoints.join(", "),
                ),
            )
            .unwrap();
            let (mesh, bound) = run_mesh(d, &format!("pebble-replica-{i}"), &config);
            http_targets.push(e2e::listener(&bound, "http"));
            replicas.push(PebbleReplica {
                processes: vec![agent, mesh],
                inbound: e2e::listener(&bound, "inbound"),
                log: d.join(format!("pebble-replica-{i}.stderr")),
            });
        }
        tls.route(
            replicas
                .iter()
                .map(|r| (r.inbound, r.log.clone()))
                .collect(),
        );
        http.route(
            http_targets
                .into_iter()
                .zip(replicas.iter().map(|r| r.log.clone()))
                .collect(),
        );
        Self {
            tls,
            http,
            pebble,
            replicas,
        }
    }

    /// Let validations through once every replica follows the fleet's challenges (all three
    /// start at once, so one may order before another has joined; a later joiner reads what
    /// was published when it starts following).
    fn release(&self) {
        wait_until(
            "every replica to join the fleet",
            Duration::from_secs(30),
            || {
                self.replicas.iter().all(|r| {
                    std::fs::read_to_string(&r.log)
                        .unwrap_or_default()
                        .contains("answering the fleet's challenges")
                })
            },
        );
        self.tls.hold.send_replace(false);
        self.http.hold.send_replace(false);
    }

    /// Which replicas have ordered `domain` for the fleet (any domain: `None`).
    fn orderers(&self, domain: Option<&str>) -> Vec<bool> {
        self.replicas
            .iter()
            .map(|r| {
                std::fs::read_to_string(&r.log)
                    .unwrap_or_default()
                    .lines()
                    .any(|l| {
                        l.contains("ordering for the fleet")
                            && domain.is_none_or(|d| l.contains(&format!("\"{d}\"")))
                    })
            })
            .collect()
    }

    /// Wait until every live replica serves `domain`; the served leaves' digests.
    fn serving(&self, domain: &str, live: &[usize]) -> Vec<String> {
        let root = self.pebble.issuance_root_pem();
        let mut leaves: Vec<Option<String>> = Vec::new();
        wait_until(
            &format!("every replica to serve {domain}"),
            Duration::from_secs(90),
            || {
                leaves = live
                    .iter()
                    .map(|&i| {
                        tokio::task::block_in_place(|| {
                            tokio::runtime::Handle::current().block_on(served(
                                self.replicas[i].inbound,
                                domain,
                                &root,
                            ))
                        })
                    })
                    .collect();
                leaves.iter().all(Option::is_some)
            },
        );
        leaves.into_iter().flatten().collect()
    }
}

/// The SHA-256 of the leaf `addr` serves for `domain`, checked against `roots`.
async fn served(addr: SocketAddr, domain: &str, roots: &str) -> Option<String> {
    let tls = e2e::client::public_connect(addr, domain, roots.as_bytes(), &[b"http/1.1"])
        .await
        .ok()?;
    let leaf = tls.get_ref().1.peer_certificates()?[0].clone();
    Some(e2e::backend::hex(
        ring::digest::digest(&ring::digest::SHA256, &leaf).as_ref(),
    ))
}

/// pebble validates through a balancer that never picks the instance that placed the order:
/// TLS-ALPN-01 and HTTP-01 both succeed because every instance answers the fleet's published
/// challenges. One order per domain for the fleet; every instance serves the same certificate.
#[tokio::test(flavor = "multi_thread")]
async fn the_ca_may_validate_through_any_replica() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cluster = EtcdCluster::start(&d.join("etcd"), 3);
    let backend = Backend::start().await;
    let fleet = PebbleFleet::start(d, &cluster, backend.addr, "15s").await;
    fleet.release();
    for domain in ["alpn.test", "http.test"] {
        let leaves = fleet.serving(domain, &[0, 1, 2]);
        assert!(
            leaves.iter().all(|l| l == &leaves[0]),
            "{domain}: {leaves:?}"
        );
    }
    let why: Vec<String> = fleet
        .replicas
        .iter()
        .flat_map(|r| {
            std::fs::read_to_string(&r.log)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("ordering") || l.contains("failed") || l.contains("not"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(
        fleet.pebble.orders_seen(),
        2,
        "one order per domain for the fleet:\n{}",
        why.join("\n")
    );
    // The validations really went to instances that did not order.
    let orderers = fleet.orderers(None);
    for (what, balancer) in [("TLS-ALPN-01", &fleet.tls), ("HTTP-01", &fleet.http)] {
        let sent = balancer.sent.lock().unwrap().clone();
        assert!(sent.iter().sum::<usize>() > 0, "{what}: no validation came");
        for (i, n) in sent.iter().enumerate() {
            assert!(
                *n == 0 || !orderers[i],
                "{what} reached the orderer {i}: {sent:?}"
            );
        }
    }
}

/// The instance holding the fleet's lock is killed (SIGKILL) while the CA validates: its lease
/// ends, another instance takes the lock, orders, and the fleet ends up serving one
/// certificate.
#[tokio::test(flavor = "multi_thread")]
async fn a_lock_holder_killed_mid_order_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cluster = EtcdCluster::start(&d.join("etcd"), 3);
    let backend = Backend::start().await;
    let mut fleet = PebbleFleet::start(d, &cluster, backend.addr, "3s").await;
    // The first validation of the TLS-ALPN-01 domain is held until its orderer is dead.
    tokio::time::timeout(Duration::from_secs(60), fleet.tls.arrived.recv())
        .await
        .expect("pebble validates")
        .unwrap();
    let orderers = fleet.orderers(Some("alpn.test"));
    let victim = orderers
        .iter()
        .position(|o| *o)
        .expect("someone is ordering");
    fleet.replicas[victim].processes.clear(); // SIGKILL, agent and sidecar
    fleet.http.hold.send_replace(false);
    fleet.tls.hold.send_replace(false);

    let live: Vec<usize> = (0..3).filter(|&i| i != victim).collect();
    let leaves = fleet.serving("alpn.test", &live);
    assert!(leaves.iter().all(|l| l == &leaves[0]), "{leaves:?}");
    let survivors_ordered = fleet
        .orderers(Some("alpn.test"))
        .iter()
        .enumerate()
        .filter(|(i, o)| *i != victim && **o)
        .count();
    assert!(survivors_ordered >= 1, "a survivor finished the order");
}
