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
    let r = replica_with(dir, i, state, backend, endpoints, caller, "", "");
    (r.processes, r.inbound, r.admin)
}

/// Write `<dir>/<name>.toml` for a sidecar of the app whose agent listens on `sock`: the mesh
/// inbound on an ephemeral port to `backend` (plus `inbound` lines), no auth service and no
/// outbound proxy, an admin port, then `[acme]` with `acme` and whatever `rest` adds.
fn sidecar_config(
    dir: &Path,
    name: &str,
    sock: &Path,
    backend: SocketAddr,
    inbound: &str,
    acme: &str,
    rest: &str,
) -> std::path::PathBuf {
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "[agent]\naddress = \"unix:{sock}\"\n\n[inbound]\nlisten = \"127.0.0.1:0\"\nbackend = \"{backend}\"\n{inbound}\n[auth]\nenabled = false\n\n[client]\nenabled = false\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[acme]\n{acme}\n{rest}",
            sock = sock.display(),
        ),
    )
    .unwrap();
    config
}

/// A running replica on the internal CA.
struct Replica {
    processes: Vec<ChildGuard>,
    inbound: SocketAddr,
    admin: SocketAddr,
}

/// [`replica`] with more `[acme]` and `[store]` settings (TOML lines).
#[allow(clippy::too_many_arguments)] // a test fixture: every argument is one setting
fn replica_with(
    dir: &Path,
    i: usize,
    state: &Path,
    backend: SocketAddr,
    endpoints: &[String],
    caller: &str,
    acme: &str,
    store: &str,
) -> Replica {
    let (agent, sock) = dev_agent(dir, &format!("agent-{i}"), APP, state);
    let endpoints: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    let config = sidecar_config(
        dir,
        &format!("replica-{i}"),
        &sock,
        backend,
        &format!("allowed_apps = \"{caller}\"\n"),
        &format!(
            "issuer = \"internal-ca\"\nstore = \"{}\"\n{acme}",
            dir.join(format!("store-{i}")).display()
        ),
        &format!(
            "[[domains]]\nnames = [\"{DOMAIN}\"]\nbackend = \"{backend}\"\n\n[store]\nbackend = \"etcd\"\nendpoints = [{}]\n{store}",
            endpoints.join(", ")
        ),
    );
    let (mesh, bound) = run_mesh(dir, &format!("replica-{i}"), &config);
    Replica {
        processes: vec![agent, mesh],
        inbound: e2e::listener(&bound, "inbound"),
        admin: e2e::listener(&bound, "admin"),
    }
}

/// Three replicas on the internal CA (see [`replica_with`]).
fn internal_fleet(
    d: &Path,
    cluster: &EtcdCluster,
    backend: SocketAddr,
    acme: &str,
    store: &str,
) -> Vec<Replica> {
    let state = d.join("state");
    (0..3)
        .map(|i| {
            replica_with(
                d,
                i,
                &state,
                backend,
                &cluster.endpoints(),
                APP,
                acme,
                store,
            )
        })
        .collect()
}

/// Every replica's internal CA root (each has its own; whichever ordered signed the leaf).
fn internal_roots(d: &Path) -> String {
    (0..3)
        .filter_map(|i| {
            std::fs::read_to_string(d.join(format!("store-{i}/internal-ca/ca.pem"))).ok()
        })
        .collect()
}

/// The leaf digest each of `fleet` serves for the domain, once all serve one that `accept`s.
fn fleet_serves(d: &Path, fleet: &[Replica], what: &str, accept: impl Fn(&str) -> bool) -> String {
    let end = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let roots = internal_roots(d);
        let leaves: Vec<Option<String>> = fleet
            .iter()
            .map(|r| {
                tokio::task::block_in_place(|| {
                    tokio::runtime::Handle::current().block_on(served(r.inbound, DOMAIN, &roots))
                })
            })
            .collect();
        if leaves
            .iter()
            .all(|l| l.as_deref().is_some_and(&accept) && *l == leaves[0])
        {
            return leaves[0].clone().unwrap_or_default();
        }
        if std::time::Instant::now() > end {
            // What each replica serves and its last log lines: enough to tell a stuck watch
            // from an order that never happened.
            let logs: Vec<String> = fleet
                .iter()
                .flat_map(|r| &r.processes)
                .map(|p| {
                    let log = p.stderr();
                    let lines: Vec<&str> = log.lines().collect();
                    lines[lines.len().saturating_sub(30)..].join("\n")
                })
                .collect();
            panic!(
                "timed out after 60s waiting for {what}: serving {leaves:?}\n{}",
                logs.join("\n----\n")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The domain's state on a replica's admin port.
async fn cert_status(admin: SocketAddr) -> serde_json::Value {
    let (status, body) = e2e::client::http1_get(admin, "/certs", &[]).await;
    assert_eq!(status, http::StatusCode::OK);
    let all: serde_json::Value = serde_json::from_slice(&body).unwrap();
    all.as_array()
        .and_then(|a| a.iter().find(|c| c["domain"] == DOMAIN))
        .cloned()
        .unwrap_or_else(|| panic!("{DOMAIN} not in /certs: {all}"))
}

/// Orders the fleet placed: the sum of every replica's `issued_total`.
async fn fleet_orders(fleet: &[Replica]) -> u64 {
    let mut total = 0;
    for r in fleet {
        total += cert_status(r.admin).await["issued_total"].as_u64().unwrap();
    }
    total
}

/// A sample from a replica's metrics (`0` when absent).
async fn metric(admin: SocketAddr, series: &str) -> f64 {
    let (_, body) = e2e::client::http1_get(admin, "/metrics", &[]).await;
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Block on `f` from a synchronous `wait_until` check.
fn block<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
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
        .filter(|l| l.contains("certificate taken: no order"))
        .count();
    // Not three: the orderer never takes its own certificate back from its watch.
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
    // A short store deadline: etcd's client retries a refused endpoint until it passes.
    let r = replica_with(
        d,
        0,
        &state,
        backend.addr,
        std::slice::from_ref(&nobody),
        CALLER,
        "",
        "timeout = \"2s\"\n",
    );
    let (processes, inbound, admin) = (r.processes, r.inbound, r.admin);
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

/// How a fleet on pebble runs.
struct FleetOptions {
    /// `[store] lock_ttl`.
    lock_ttl: &'static str,
    /// Each replica's wall clock against the real one, in seconds.
    skew: [i32; 3],
    /// pebble's certificate lifetime (its default: years).
    validity: Option<Duration>,
}

impl FleetOptions {
    fn lock_ttl(lock_ttl: &'static str) -> Self {
        Self {
            lock_ttl,
            skew: [0; 3],
            validity: None,
        }
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
    async fn start(
        d: &Path,
        cluster: &EtcdCluster,
        backend: SocketAddr,
        opts: FleetOptions,
    ) -> Self {
        let FleetOptions {
            lock_ttl,
            skew,
            validity,
        } = opts;
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
                    validity,
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
        for (i, skew) in skew.into_iter().enumerate() {
            let (agent, sock) = dev_agent(d, &format!("agent-{i}"), APP, &state);
            let name = format!("pebble-replica-{i}");
            let config = sidecar_config(
                d,
                &name,
                &sock,
                backend,
                "",
                &format!(
                    "issuer = \"{dir}\"\nca_roots = [\"{ca}\"]\nstore = \"{store}\"\nhttp_listen = \"127.0.0.1:0\"\n",
                    dir = pebble.directory,
                    ca = pebble.ca_file.display(),
                    store = d.join(format!("pebble-store-{i}")).display(),
                ),
                &format!(
                    "[[domains]]\nnames = [\"alpn.test\"]\nbackend = \"{backend}\"\nchallenge = \"tls-alpn-01\"\n\n[[domains]]\nnames = [\"http.test\"]\nbackend = \"{backend}\"\nchallenge = \"http-01\"\n\n[store]\nbackend = \"etcd\"\nendpoints = [{}]\nlock_ttl = \"{lock_ttl}\"\n",
                    endpoints.join(", "),
                ),
            );
            let (mesh, bound) = match skew {
                0 => run_mesh(d, &name, &config),
                // libfaketime moves the wall clock only: timers and leases keep real time.
                s => {
                    let mut cmd = std::process::Command::new(e2e::program("faketime"));
                    cmd.args(["-f", &format!("{s:+}s")])
                        .arg(e2e::mesh_binary())
                        .args(["--log-format", "json", "run", "--config"])
                        .arg(&config)
                        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
                        .env("RUST_LOG", "info")
                        .env_remove("DSTACK_AGENT_ADDRESS");
                    e2e::start_mesh(d, &name, cmd)
                }
            };
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
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &leaf).as_ref(),
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
    let fleet = PebbleFleet::start(d, &cluster, backend.addr, FleetOptions::lock_ttl("15s")).await;
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
    let mut fleet =
        PebbleFleet::start(d, &cluster, backend.addr, FleetOptions::lock_ttl("3s")).await;
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

/// `certs renew` on a replica's admin port.
async fn renew(admin: SocketAddr) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(admin).await.unwrap();
    let req = format!(
        "POST /certs/{DOMAIN}/renew HTTP/1.1\r\nhost: admin\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut reply = String::new();
    tcp.read_to_string(&mut reply).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 202"), "{reply}");
}

/// Someone with write access to etcd flips one byte of the fleet's stored certificate: no
/// instance serves it (it does not open), they count and log the refusal, and the fleet
/// orders one replacement that every instance then serves.
#[tokio::test(flavor = "multi_thread")]
async fn a_tampered_certificate_is_refused_reported_and_replaced_once() {
    tampered_and_replaced_once("cert").await;
}

/// The same with the stored private key: refused when its change arrives, not at the next
/// renewal.
#[tokio::test(flavor = "multi_thread")]
async fn a_tampered_key_is_refused_reported_and_replaced_once() {
    tampered_and_replaced_once("key").await;
}

/// Flip a byte of the fleet's stored value of `kind` (`cert` or `key`, the label in etcd and
/// in `dstack_mesh_store_refused_total`); one replacement for the fleet.
async fn tampered_and_replaced_once(kind: &str) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cluster = EtcdCluster::start(&d.join("etcd"), 3);
    let backend = Backend::start().await;
    let fleet = internal_fleet(d, &cluster, backend.addr, "", "");
    let first = fleet_serves(d, &fleet, "the fleet to serve one certificate", |_| true);
    assert_eq!(fleet_orders(&fleet).await, 1);

    let prefix = format!("/dstack-mesh/{APP}/{kind}/");
    let keys = cluster.etcdctl(&["get", "--prefix", &prefix, "--keys-only"]);
    let keys: Vec<String> = String::from_utf8_lossy(&keys.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let get = cluster.etcdctl(&["get", &keys[0], "--print-value-only"]);
    let mut value = get.stdout.clone();
    assert_eq!(value.pop(), Some(b'\n'));
    let middle = value.len() / 2;
    value[middle] ^= 0x01;
    let put = cluster.etcdctl_put(&keys[0], &value);
    assert!(put.status.success(), "{put:?}");

    // One replacement for the fleet, served by every instance.
    let second = fleet_serves(d, &fleet, "the fleet to serve a replacement", |l| {
        l != first
    });
    wait_until("every instance to settle", Duration::from_secs(30), || {
        fleet.iter().all(|r| {
            let c = block(cert_status(r.admin));
            c["fleet"] == "shared" && c["status"] == "valid"
        })
    });
    assert_eq!(
        fleet_orders(&fleet).await,
        2,
        "one order for the replacement"
    );
    // The instance that re-ordered did so because it refused the value, and says so.
    let mut refused = 0.0;
    for r in &fleet {
        let series = format!("dstack_mesh_store_refused_total{{kind=\"{kind}\"}}");
        let n = metric(r.admin, &series).await;
        if n > 0.0 {
            assert!(r.processes[1]
                .stderr()
                .contains("refusing the fleet's stored certificate"));
        }
        refused += n;
    }
    assert!(refused >= 1.0, "nobody counted the refusal");
    // What etcd holds now opens: it is what they serve.
    let now = cluster.etcdctl(&["get", &keys[0], "--print-value-only"]);
    assert_ne!(now.stdout, get.stdout);
    assert_ne!(second, first);
}

/// Every etcd member stops: every instance keeps serving its certificate, `/ready` says why,
/// a renewal asked for meanwhile fails and waits; when etcd returns it completes once for the
/// fleet and `/ready` clears.
#[tokio::test(flavor = "multi_thread")]
async fn etcd_down_everywhere_keeps_the_fleet_serving_and_orders_resume() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut cluster = EtcdCluster::start(&d.join("etcd"), 3);
    let backend = Backend::start().await;
    let fleet = internal_fleet(
        d,
        &cluster,
        backend.addr,
        "retry_min = \"1s\"\n",
        "timeout = \"2s\"\n",
    );
    let first = fleet_serves(d, &fleet, "the fleet to serve one certificate", |_| true);
    // Browser-style callers on every replica, counted across the outage.
    let roots = internal_roots(d);
    let loads: Vec<_> = fleet
        .iter()
        .map(|r| {
            e2e::load::Load::start(
                e2e::load::Target::public(r.inbound, DOMAIN, roots.as_bytes()),
                &[e2e::load::Caller::Fresh, e2e::load::Caller::H2],
                Duration::from_millis(20),
            )
        })
        .collect();
    for i in 0..3 {
        cluster.stop_member(i);
    }
    wait_until(
        "every /ready to name the store",
        Duration::from_secs(60),
        || {
            fleet.iter().all(|r| {
                let (status, body) = block(e2e::client::http1_get(r.admin, "/ready", &[]));
                status == http::StatusCode::SERVICE_UNAVAILABLE
                    && String::from_utf8_lossy(&body).contains("store: ")
            })
        },
    );
    renew(fleet[0].admin).await;
    wait_until(
        "the renewal to fail on the store",
        Duration::from_secs(30),
        || {
            let c = block(cert_status(fleet[0].admin));
            c["consecutive_failures"].as_u64() >= Some(1)
                && c["fleet"]
                    .as_str()
                    .is_some_and(|f| f.starts_with("unreachable"))
        },
    );
    // Still serving what each holds.
    for r in &fleet {
        assert_eq!(
            served(r.inbound, DOMAIN, &roots).await.as_ref(),
            Some(&first)
        );
    }
    for r in &fleet {
        assert!(metric(r.admin, "dstack_mesh_store_up").await == 0.0);
    }

    for i in 0..3 {
        cluster.start_member(i);
    }
    cluster.wait_healthy(&[0, 1, 2]);
    fleet_serves(d, &fleet, "the renewal to land everywhere", |l| l != first);
    wait_until("every /ready to clear", Duration::from_secs(60), || {
        fleet.iter().all(|r| {
            block(e2e::client::http1_get(r.admin, "/ready", &[])).0 == http::StatusCode::OK
        })
    });
    assert_eq!(fleet_orders(&fleet).await, 2, "one order for the renewal");
    let (mut ok, mut failed) = (0, 0);
    for load in loads {
        let (o, f) = load.finish().await;
        (ok, failed) = (ok + o, failed + f);
    }
    eprintln!("etcd down everywhere and back: {ok} requests to the fleet, {failed} failed");
    assert_eq!(failed, 0, "requests failed while the store was down");
}

/// Nine-second certificates renewed by three replicas while a client keeps opening
/// connections to all of them: every request succeeds, and each renewal is one order for the
/// fleet (every certificate ordered is served by all three; none is ordered twice).
#[tokio::test(flavor = "multi_thread")]
async fn renewal_under_load_is_one_order_per_round_and_fails_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cluster = EtcdCluster::start(&d.join("etcd"), 3);
    let backend = Backend::start().await;
    let fleet = internal_fleet(
        d,
        &cluster,
        backend.addr,
        "internal_ca_lifetime = \"9s\"\n",
        "",
    );
    fleet_serves(d, &fleet, "the fleet to serve one certificate", |_| true);

    let (mut ok, mut serials) = (0usize, std::collections::BTreeSet::new());
    let end = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut i = 0;
    while tokio::time::Instant::now() < end {
        let r = &fleet[i % 3];
        i += 1;
        let roots = internal_roots(d);
        let tls = e2e::client::public_connect(r.inbound, DOMAIN, roots.as_bytes(), &[b"http/1.1"])
            .await
            .expect("a new connection during renewal");
        let cert = &tls.get_ref().1.peer_certificates().unwrap()[0];
        serials.insert(x509_serial(cert));
        let mut client = e2e::client::MeshClient::over(tls).await.unwrap();
        let (status, _, _) = client.get_from(DOMAIN, "/load", &[]).await.unwrap();
        assert_eq!(status, http::StatusCode::OK);
        ok += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(backend.count(), ok);

    // Each renewal round is one order: orders (whoever placed them) are a round apart, not
    // two in the same round.
    let logs: Vec<String> = fleet.iter().map(|r| r.processes[1].stderr()).collect();
    let mut orders: Vec<f64> = logs
        .iter()
        .flat_map(|l| l.lines())
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "ordering for the fleet (holding its lock)")
        .filter_map(|v| seconds_of(v["timestamp"].as_str()?))
        .collect();
    orders.sort_by(f64::total_cmp);
    assert!(
        orders.len() >= 3,
        "at least two renewals in 20 s of 9 s certificates: {orders:?}"
    );
    for pair in orders.windows(2) {
        assert!(
            pair[1] - pair[0] > 3.0,
            "two orders in one round: {orders:?}"
        );
    }
    // And every instance served the renewals (clients saw them change).
    assert!(serials.len() >= 3, "clients saw {serials:?}");
    for (i, log) in logs.iter().enumerate() {
        let renewed = log.matches("the fleet's newer certificate taken").count()
            + log.matches("certificate issued and served").count();
        assert!(renewed >= 3, "replica {i} served {renewed} certificates");
    }
}

/// Seconds since the start of the month of an RFC 3339 UTC timestamp (the tests last minutes).
fn seconds_of(rfc3339: &str) -> Option<f64> {
    let (date, time) = rfc3339.trim_end_matches('Z').split_once('T')?;
    let day: f64 = date.rsplit('-').next()?.parse().ok()?;
    let mut parts = time.split(':');
    let (h, m, s): (f64, f64, f64) = (
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
    );
    Some(day * 86400.0 + h * 3600.0 + m * 60.0 + s)
}

/// The serial of a DER certificate, hex.
fn x509_serial(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.raw_serial_as_string()
}

/// Replicas whose clocks are 30 s behind, right and 30 s ahead, on 90-second pebble
/// certificates: one order per domain at first, and when the one ahead finds the certificates
/// due (a third of a lifetime early by its clock), one order each that all three then serve.
#[tokio::test(flavor = "multi_thread")]
async fn clocks_thirty_seconds_apart_still_order_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cluster = EtcdCluster::start(&d.join("etcd"), 3);
    let backend = Backend::start().await;
    let opts = FleetOptions {
        lock_ttl: "15s",
        skew: [-30, 0, 30],
        validity: Some(Duration::from_secs(90)),
    };
    let fleet = PebbleFleet::start(d, &cluster, backend.addr, opts).await;
    fleet.release();
    let mut first = Vec::new();
    for domain in ["alpn.test", "http.test"] {
        let leaves = fleet.serving(domain, &[0, 1, 2]);
        assert!(
            leaves.iter().all(|l| l == &leaves[0]),
            "{domain}: {leaves:?}"
        );
        first.push(leaves[0].clone());
    }
    assert_eq!(fleet.pebble.orders_seen(), 2, "one order per domain");

    // The renewal: once per domain for the fleet, served by all three.
    for (domain, first) in ["alpn.test", "http.test"].iter().zip(&first) {
        let mut leaves = Vec::new();
        wait_until(
            &format!("{domain} renewed everywhere"),
            Duration::from_secs(90),
            || {
                leaves = fleet.serving(domain, &[0, 1, 2]);
                leaves.iter().all(|l| l != first && l == &leaves[0])
            },
        );
    }
    assert_eq!(
        fleet.pebble.orders_seen(),
        4,
        "one renewal order per domain"
    );
    let renewals: Vec<usize> = fleet
        .replicas
        .iter()
        .map(|r| renewal_orders(&std::fs::read_to_string(&r.log).unwrap_or_default()))
        .collect();
    assert_eq!(
        renewals,
        [0, 0, 2],
        "the replica ahead renews, for the fleet"
    );
}

/// Renewal orders in a replica's log: "ordering for the fleet" after "ordering a certificate"
/// with `renewal: true` for the same domain.
fn renewal_orders(log: &str) -> usize {
    let mut renewing = std::collections::HashMap::new();
    let mut orders = 0;
    for v in log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    {
        let f = &v["fields"];
        let domain = f["domain"].as_str().unwrap_or_default().to_owned();
        match f["message"].as_str() {
            Some("ordering a certificate") => {
                renewing.insert(domain, f["renewal"] == true);
            }
            Some("ordering for the fleet (holding its lock)")
                if renewing.get(&domain) == Some(&true) =>
            {
                orders += 1
            }
            _ => {}
        }
    }
    orders
}

/// The SHA-256 of the public key `addr` serves for `domain`, and the certificate's serial.
async fn served_key(addr: SocketAddr, domain: &str, roots: &str) -> Option<(String, String)> {
    let tls = e2e::client::public_connect(addr, domain, roots.as_bytes(), &[b"http/1.1"])
        .await
        .ok()?;
    let leaf = tls.get_ref().1.peer_certificates()?[0].clone();
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).ok()?;
    let spki = cert.public_key().raw;
    Some((
        e2e::backend::hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, spki).as_ref()),
        cert.raw_serial_as_string(),
    ))
}

/// `[acme] key_source = "derived"`: two instances of one app with no shared store, one on
/// pebble and one on the internal CA, present the same public key for the domain; a renewal
/// keeps it. (With random keys, two issuers could not agree on one.)
#[tokio::test(flavor = "multi_thread")]
async fn derived_keys_are_the_same_on_every_instance_without_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let state = d.join("state");
    let backend = Backend::start().await;
    let http_port = e2e::free_port();
    let pebble_dir = d.join("pebble");
    let pebble = tokio::task::spawn_blocking(move || {
        e2e::pebble::Pebble::start(
            &pebble_dir,
            e2e::pebble::PebbleOptions {
                http_port,
                ..Default::default()
            },
        )
    })
    .await
    .unwrap();
    let mut instances = Vec::new();
    for (i, issuer) in [
        format!("issuer = \"{}\"\nca_roots = [\"{}\"]\nhttp_listen = \"127.0.0.1:{http_port}\"\nchallenge = \"http-01\"", pebble.directory, pebble.ca_file.display()),
        "issuer = \"internal-ca\"".to_owned(),
    ]
    .iter()
    .enumerate()
    {
        let (agent, sock) = dev_agent(d, &format!("derived-agent-{i}"), APP, &state);
        let config = sidecar_config(
            d,
            &format!("derived-{i}"),
            &sock,
            backend.addr,
            "",
            &format!(
                "{issuer}\nstore = \"{}\"\nkey_source = \"derived\"\n",
                d.join(format!("derived-store-{i}")).display()
            ),
            &format!(
                "[[domains]]\nnames = [\"{DOMAIN}\"]\nbackend = \"{}\"\n",
                backend.addr
            ),
        );
        let (mesh, bound) = run_mesh(d, &format!("derived-{i}"), &config);
        instances.push((
            agent,
            mesh,
            e2e::listener(&bound, "inbound"),
            e2e::listener(&bound, "admin"),
        ));
    }
    let roots = || {
        let internal = std::fs::read_to_string(d.join("derived-store-1/internal-ca/ca.pem"));
        pebble.issuance_root_pem() + &internal.unwrap_or_default()
    };
    let mut keys = Vec::new();
    wait_until("both instances to serve", Duration::from_secs(60), || {
        keys = instances
            .iter()
            .map(|(_, _, inbound, _)| block(served_key(*inbound, DOMAIN, &roots())))
            .collect();
        keys.iter().all(Option::is_some)
    });
    let keys: Vec<(String, String)> = keys.into_iter().flatten().collect();
    assert_eq!(keys[0].0, keys[1].0, "one public key on both instances");
    assert_ne!(
        keys[0].1, keys[1].1,
        "two certificates, each instance's own"
    );
    assert_eq!(pebble.orders_seen(), 1);

    // A renewal gets a new certificate for the same key.
    renew(instances[1].3).await;
    let mut renewed = None;
    wait_until("the renewal", Duration::from_secs(30), || {
        renewed = block(served_key(instances[1].2, DOMAIN, &roots())).filter(|k| k.1 != keys[1].1);
        renewed.is_some()
    });
    assert_eq!(renewed.unwrap().0, keys[0].0);
}

/// On the internal CA, the fleet shares one CA key (derived from the app's key): each replica
/// asked to renew orders with its own CA, yet every CA has the same public key and name, so a
/// client trusting one replica's `ca.pem` verifies every leaf the fleet serves.
#[tokio::test(flavor = "multi_thread")]
async fn the_fleet_shares_one_internal_ca() {
    use rustls_pki_types::pem::PemObject;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cluster = EtcdCluster::start(&d.join("etcd"), 3);
    let backend = Backend::start().await;
    let fleet = internal_fleet(d, &cluster, backend.addr, "", "");
    let mut leaf = fleet_serves(d, &fleet, "the fleet to serve one certificate", |_| true);
    // Each replica orders once (a renewal asked of it), so each has a CA of its own making.
    for r in &fleet {
        renew(r.admin).await;
        leaf = fleet_serves(d, &fleet, "the renewal to land everywhere", |l| l != leaf);
    }
    assert_eq!(fleet_orders(&fleet).await, 4);
    let keys: Vec<Vec<u8>> = (0..3)
        .map(|i| {
            let pem = std::fs::read(d.join(format!("store-{i}/internal-ca/ca.pem"))).unwrap();
            let der = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
                .next()
                .unwrap()
                .unwrap();
            let (_, ca) = x509_parser::parse_x509_certificate(&der).unwrap();
            ca.public_key().raw.to_vec()
        })
        .collect();
    assert!(keys.iter().all(|k| k == &keys[0]), "three CA keys");
    // One replica's root verifies what each serves.
    let root = std::fs::read_to_string(d.join("store-0/internal-ca/ca.pem")).unwrap();
    for r in &fleet {
        assert!(served(r.inbound, DOMAIN, &root).await.is_some());
    }
}

/// A customer domain added to a list every replica reads (`[[domain_sources]]`, one file for
/// the fleet) is issued once, and served by all with the same certificate.
#[tokio::test(flavor = "multi_thread")]
async fn a_domain_a_source_adds_is_issued_once_for_the_fleet() {
    const NEW: &str = "new.customer.test";
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cluster = EtcdCluster::start(&d.join("etcd"), 3);
    let backend = Backend::start().await;
    let state = d.join("state");
    let list = d.join("customers.txt");
    std::fs::write(&list, "# no customers yet\n").unwrap();
    let endpoints: Vec<String> = cluster
        .endpoints()
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect();
    let fleet: Vec<(Vec<ChildGuard>, SocketAddr, SocketAddr)> = (0..3)
        .map(|i| {
            let (agent, sock) = dev_agent(d, &format!("agent-{i}"), APP, &state);
            let config = sidecar_config(
                d,
                &format!("replica-{i}"),
                &sock,
                backend.addr,
                "",
                &format!(
                    "issuer = \"internal-ca\"\nstore = \"{}\"\n",
                    d.join(format!("store-{i}")).display()
                ),
                &format!(
                    "[[domain_sources]]\nfile = \"{}\"\ninterval = \"200ms\"\nbackend = \"{}\"\n\n\
                     [store]\nbackend = \"etcd\"\nendpoints = [{}]\n",
                    list.display(),
                    backend.addr,
                    endpoints.join(", ")
                ),
            );
            let (mesh, bound) = run_mesh(d, &format!("replica-{i}"), &config);
            let (inbound, admin) = (
                e2e::listener(&bound, "inbound"),
                e2e::listener(&bound, "admin"),
            );
            (vec![agent, mesh], inbound, admin)
        })
        .collect();
    std::fs::write(&list, format!("{NEW}\n")).unwrap();
    let mut leaves: Vec<Option<String>> = Vec::new();
    wait_until(
        "every replica to serve the new domain",
        Duration::from_secs(60),
        || {
            let roots = internal_roots(d);
            leaves = fleet
                .iter()
                .map(|(_, addr, _)| block(served(*addr, NEW, &roots)))
                .collect();
            leaves.iter().all(Option::is_some)
        },
    );
    assert!(
        leaves.iter().all(|l| l == &leaves[0]),
        "the replicas serve different certificates: {leaves:?}"
    );
    // Orders placed: each replica's count of certificates it ordered itself.
    let mut ordered = 0;
    for (_, _, admin) in &fleet {
        let (_, body) = e2e::client::http1_get(*admin, "/certs", &[]).await;
        let certs: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let new = certs
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["domain"] == NEW)
            .unwrap();
        assert_eq!(new["source"], format!("file:{}", list.display()));
        ordered += new["issued_total"].as_u64().unwrap();
    }
    let logs: Vec<String> = fleet.iter().map(|(p, _, _)| p[1].stderr()).collect();
    assert_eq!(ordered, 1, "one order for the fleet:\n{logs:?}");
}
