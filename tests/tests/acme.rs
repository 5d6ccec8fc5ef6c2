//! ACME against a real CA: Debian's pebble (with pebble-challtestsrv resolving every name to
//! loopback) and a `dstack-mesh run` process. TLS-ALPN-01 is answered on the shared inbound
//! port while mesh traffic flows on it; HTTP-01 on the `:80` listener; restarts reuse the
//! stored certificate; a restarted pebble (which forgets every account) and an unreachable CA
//! are recovered from without an operator; short-lived certificates renew under load; an
//! expired certificate is reported on `/ready` and `/metrics`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use dstack_mesh::acme::{CertStatus, Status};
use e2e::{
    backend::Backend,
    client::{public_connect, MeshClient},
    dev_agent, free_port, identity, mesh_binary,
    pebble::{Pebble, PebbleOptions},
    run_mesh, ChildGuard,
};
use http::StatusCode;

const SERVER: &str = "5e77e75e77e75e77e75e77e75e77e75e77e75e77";
const CALLER: &str = "ca11e7ca11e7ca11e7ca11e7ca11e7ca11e7ca11";
const H2_H1: &[&[u8]] = &[b"h2", b"http/1.1"];

/// A sidecar process with public domains issued by `pebble`.
struct Sidecar {
    guard: ChildGuard,
    inbound: SocketAddr,
    admin: SocketAddr,
}

struct Setup {
    dir: tempfile::TempDir,
    pebble: Pebble,
    backend: Backend,
    inbound_port: u16,
    http_port: u16,
    _agent: ChildGuard,
    socket: PathBuf,
}

impl Setup {
    /// pebble validating against ports a sidecar will listen on.
    async fn new(validity: Option<Duration>) -> Self {
        Self::with(validity, Vec::new()).await
    }

    async fn with(validity: Option<Duration>, eab_keys: Vec<(String, String)>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (inbound_port, http_port) = (free_port(), free_port());
        let pebble_dir = dir.path().join("pebble");
        let pebble = tokio::task::spawn_blocking(move || {
            Pebble::start(
                &pebble_dir,
                PebbleOptions {
                    tls_port: inbound_port,
                    http_port,
                    validity,
                    env: Vec::new(),
                    eab_keys,
                },
            )
        })
        .await
        .unwrap();
        let state = dir.path().join("state");
        let (agent, socket) = dev_agent(dir.path(), "agent", SERVER, &state);
        Self {
            backend: Backend::start().await,
            dir,
            pebble,
            inbound_port,
            http_port,
            _agent: agent,
            socket,
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Start `dstack-mesh run` with `domains` (`{backend}` is the test backend).
    fn sidecar(&self, name: &str, domains: &str) -> Sidecar {
        self.sidecar_with(name, domains, "store", "")
    }

    /// The same with its own store directory and extra `[acme]` lines.
    fn sidecar_with(&self, name: &str, domains: &str, store: &str, acme: &str) -> Sidecar {
        let config = self.path().join(format!("{name}.toml"));
        let text = format!(
            "[agent]\naddress = \"unix:{sock}\"\n\n\
             [inbound]\nlisten = \"127.0.0.1:{inbound}\"\nbackend = \"{backend}\"\nallowed_apps = \"{CALLER}\"\n\n\
             [auth]\nenabled = false\n\n[client]\nenabled = false\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
             [acme]\nstore = \"{store}\"\nissuer = \"{directory}\"\nca_roots = [\"{ca}\"]\n\
             http_listen = \"127.0.0.1:{http}\"\nretry_min = \"1s\"\nemail = \"ops@example.test\"\n{acme}\n\n{domains}",
            sock = self.socket.display(),
            inbound = self.inbound_port,
            backend = self.backend.addr,
            store = self.path().join(store).display(),
            directory = self.pebble.directory,
            ca = self.pebble.ca_file.display(),
            http = self.http_port,
        )
        .replace("{backend}", &self.backend.addr.to_string());
        std::fs::write(&config, text).unwrap();
        let (guard, bound) = run_mesh(self.path(), name, &config);
        let find = |what: &str| {
            bound
                .iter()
                .find(|(w, _)| w == what)
                .map(|(_, a)| *a)
                .unwrap()
        };
        Sidecar {
            inbound: find("inbound"),
            admin: find("admin"),
            guard,
        }
    }

    fn root(&self) -> Vec<u8> {
        self.pebble.issuance_root_pem().into_bytes()
    }
}

impl Sidecar {
    async fn certs(&self) -> Vec<CertStatus> {
        let (status, body) =
            dstack_mesh::admin::cli::request(&self.admin.to_string(), http::Method::GET, "/certs")
                .await
                .unwrap();
        assert_eq!(status, StatusCode::OK);
        serde_json::from_slice(&body).unwrap()
    }

    async fn cert(&self, domain: &str) -> CertStatus {
        self.certs()
            .await
            .into_iter()
            .find(|c| c.domain == domain)
            .unwrap()
    }

    async fn wait(
        &mut self,
        what: &str,
        limit: Duration,
        mut check: impl FnMut(&[CertStatus]) -> bool,
    ) -> Vec<CertStatus> {
        let end = tokio::time::Instant::now() + limit;
        loop {
            self.guard.assert_running();
            let certs = self.certs().await;
            if check(&certs) {
                return certs;
            }
            if tokio::time::Instant::now() > end {
                panic!(
                    "timed out waiting for {what}: {certs:#?}\n{}",
                    self.guard.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn cli(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(mesh_binary())
            .arg("certs")
            .args(args)
            .arg("--admin")
            .arg(self.admin.to_string())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}

fn valid(domain: &'static str) -> impl FnMut(&[CertStatus]) -> bool {
    move |certs| {
        certs
            .iter()
            .any(|c| c.domain == domain && c.status == Status::Valid)
    }
}

/// GET `/` on `domain` through the sidecar, verifying against `root`; the status and the
/// serial of the certificate served.
async fn fetch(
    addr: SocketAddr,
    domain: &str,
    root: &[u8],
) -> Result<(StatusCode, String), String> {
    let tls = public_connect(addr, domain, root, H2_H1)
        .await
        .map_err(|e| e.to_string())?;
    let cert = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    // The certificate's digest tells certificates apart as well as its serial.
    let serial = e2e::backend::hex(ring::digest::digest(&ring::digest::SHA256, &cert).as_ref());
    let mut client = MeshClient::over(tls).await.map_err(|e| e.to_string())?;
    let (status, _, _) = client
        .get_from(domain, "/", &[])
        .await
        .map_err(|e| e.to_string())?;
    Ok((status, serial))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn_and_http01_issue_next_to_mesh_traffic_and_survive_a_restart() {
    let setup = Setup::new(None).await;
    // Mesh traffic on the same port throughout issuance, from a caller of the same mesh.
    let (caller, _caller_agent) = identity(setup.path(), &setup.path().join("state"), CALLER).await;
    let domains = "[[domains]]\nnames = [\"app.acme.test\", \"www.acme.test\"]\nbackend = \"{backend}\"\nchallenge = \"tls-alpn-01\"\n\n\
                   [[domains]]\nnames = [\"web.acme.test\"]\nbackend = \"{backend}\"\nchallenge = \"http-01\"\n";
    let mut sidecar = setup.sidecar("sidecar", domains);
    let addr = sidecar.inbound;
    let mesh_calls = tokio::spawn(async move {
        let mut ok = 0;
        let end = tokio::time::Instant::now() + Duration::from_secs(2);
        while tokio::time::Instant::now() < end {
            let mut client = MeshClient::connect(&caller, &SERVER.parse().unwrap(), addr, None)
                .await
                .expect("mesh connection during issuance");
            let (status, _, _) = client.get("/mesh", &[]).await.unwrap();
            assert_eq!(status, StatusCode::OK);
            ok += 1;
        }
        ok
    });
    sidecar
        .wait("both domains valid", Duration::from_secs(30), |c| {
            valid("app.acme.test")(c) && valid("web.acme.test")(c)
        })
        .await;
    assert!(mesh_calls.await.unwrap() > 0);
    let root = setup.root();
    for name in ["app.acme.test", "www.acme.test", "web.acme.test"] {
        let (status, _) = fetch(addr, name, &root).await.unwrap();
        assert_eq!(status, StatusCode::OK, "{name}");
    }
    // The :80 listener sends everything but challenges to https.
    let mut http = tokio::net::TcpStream::connect(("127.0.0.1", setup.http_port))
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut http,
        b"GET /path?q=1 HTTP/1.1\r\nHost: web.acme.test\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut http, &mut answer)
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 301"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("location: https://web.acme.test/path?q=1"),
        "{answer}"
    );
    let app = sidecar.cert("app.acme.test").await;
    assert!(
        app.issued_by.as_deref().unwrap().contains("Pebble"),
        "{app:?}"
    );
    let log = setup.pebble.log();
    assert!(
        log.contains("tls-alpn-01") || setup.pebble.orders_seen() >= 2,
        "{log}"
    );

    // `certs list` and `certs renew` against the admin port.
    let (ok, table) = sidecar.cli(&["list"]);
    assert!(ok, "{table}");
    assert!(
        table.contains("app.acme.test")
            && table.contains("valid")
            && table.contains(&setup.pebble.directory),
        "{table}"
    );
    let (ok, text) = sidecar.cli(&["renew", "nope.acme.test"]);
    assert!(!ok && text.contains("not a configured domain"), "{text}");

    // Restart: the stored certificates are served at once and pebble sees no new order.
    let orders = setup.pebble.orders_seen();
    let serial_before = fetch(addr, "app.acme.test", &root).await.unwrap().1;
    drop(sidecar);
    let sidecar = setup.sidecar("sidecar-again", domains);
    let (status, serial) = fetch(sidecar.inbound, "app.acme.test", &root)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(serial, serial_before);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        setup.pebble.orders_seen(),
        orders,
        "a restart ordered again"
    );
    assert_eq!(sidecar.cert("web.acme.test").await.issued_total, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_from_a_forgotten_account_and_an_unreachable_ca_without_an_operator() {
    let mut setup = Setup::new(None).await;
    let domains = "[[domains]]\nnames = [\"app.acme.test\"]\nbackend = \"{backend}\"\n";
    let mut sidecar = setup.sidecar("sidecar", domains);
    sidecar
        .wait("issuance", Duration::from_secs(30), valid("app.acme.test"))
        .await;
    let first = sidecar.cert("app.acme.test").await.serial.unwrap();

    // A restarted pebble has forgotten every account: the same derived key registers again.
    tokio::task::block_in_place(|| setup.pebble.restart());
    let (ok, text) = sidecar.cli(&["renew", "app.acme.test"]);
    assert!(ok, "{text}");
    sidecar
        .wait("renewal with a new account", Duration::from_secs(30), |c| {
            c.iter()
                .any(|c| c.serial.as_deref() != Some(first.as_str()) && c.status == Status::Valid)
        })
        .await;
    assert!(
        sidecar.guard.stderr().contains("does not know our account"),
        "{}",
        sidecar.guard.stderr()
    );
    let second = sidecar.cert("app.acme.test").await.serial.unwrap();

    // CA down: the renewal fails with a clear state, the old certificate keeps serving.
    tokio::task::block_in_place(|| setup.pebble.stop());
    let (ok, text) = sidecar.cli(&["renew", "app.acme.test"]);
    assert!(ok, "{text}");
    let certs = sidecar
        .wait("the failure to show", Duration::from_secs(30), |c| {
            c[0].status == Status::Failed
        })
        .await;
    let failed = &certs[0];
    assert!(
        failed
            .last_error
            .as_deref()
            .unwrap()
            .contains("CA unreachable"),
        "{failed:?}"
    );
    assert!(failed.next_attempt.is_some());
    assert_eq!(
        failed.serial.as_deref(),
        Some(second.as_str()),
        "the old certificate stays"
    );
    let (ok, table) = sidecar.cli(&["list"]);
    assert!(
        ok && table.contains("failed") && table.contains("CA unreachable"),
        "{table}"
    );

    // The CA comes back: the directory probe notices within seconds, no operator needed.
    tokio::task::block_in_place(|| setup.pebble.restart());
    let started = tokio::time::Instant::now();
    sidecar
        .wait("recovery", Duration::from_secs(20), |c| {
            c[0].status == Status::Valid && c[0].serial.as_deref() != Some(second.as_str())
        })
        .await;
    eprintln!("recovered {:?} after the CA came back", started.elapsed());
    let (status, _) = fetch(sidecar.inbound, "app.acme.test", &setup.root())
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_certificates_renew_under_load_and_expiry_is_never_silent() {
    // pebble's certificates live 12 s here: renewal is due at 8 s.
    let mut setup = Setup::new(Some(Duration::from_secs(12))).await;
    let domains = "[[domains]]\nnames = [\"app.acme.test\"]\nbackend = \"{backend}\"\n";
    let mut sidecar = setup.sidecar("sidecar", domains);
    sidecar
        .wait("issuance", Duration::from_secs(30), valid("app.acme.test"))
        .await;
    let first = sidecar.cert("app.acme.test").await;
    let root = setup.root();

    // Keep requests flowing (a new connection each) across the renewal: none may fail.
    let (mut ok, mut serials) = (0, std::collections::BTreeSet::new());
    let end = tokio::time::Instant::now() + Duration::from_secs(12);
    while tokio::time::Instant::now() < end {
        let (status, serial) = fetch(sidecar.inbound, "app.acme.test", &root)
            .await
            .expect("a request during renewal");
        assert_eq!(status, StatusCode::OK);
        serials.insert(serial);
        ok += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        serials.len() >= 2,
        "no renewal seen by clients: {serials:?}"
    );
    assert!(sidecar.cert("app.acme.test").await.issued_total >= 1);
    assert!(ok > 10);
    let _ = first;

    // Now the CA goes away for good: the certificate expires, loudly.
    tokio::task::block_in_place(|| setup.pebble.stop());
    let certs = sidecar
        .wait("expiry", Duration::from_secs(30), |c| c[0].expired)
        .await;
    assert_eq!(certs[0].status, Status::Failed);
    let (status, body) =
        dstack_mesh::admin::cli::request(&sidecar.admin.to_string(), http::Method::GET, "/ready")
            .await
            .unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains("app.acme.test: the certificate expired"),
        "{body}"
    );
    let (_, metrics) =
        dstack_mesh::admin::cli::request(&sidecar.admin.to_string(), http::Method::GET, "/metrics")
            .await
            .unwrap();
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.contains("dstack_mesh_certificate_expired{domain=\"app.acme.test\""),
        "{metrics}"
    );
    let expired_line = metrics
        .lines()
        .find(|l| l.starts_with("dstack_mesh_certificate_expired{"))
        .unwrap();
    assert!(expired_line.ends_with(" 1"), "{expired_line}");
    // Each attempt after expiry logs an error saying an expired certificate is being served.
    let logged = |g: &ChildGuard| {
        g.stderr()
            .lines()
            .filter(|l| l.contains("certificate order failed") && l.contains("EXPIRED"))
            .count()
    };
    let end = tokio::time::Instant::now() + Duration::from_secs(30);
    while logged(&sidecar.guard) < 1 {
        assert!(
            tokio::time::Instant::now() < end,
            "{}",
            sidecar.guard.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The account URL a sidecar stored for pebble's directory.
fn stored_account(store: &Path) -> String {
    let dir = store.join("accounts");
    let file = std::fs::read_dir(&dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let record: serde_json::Value = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
    record["url"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_one_account_with_external_account_binding() {
    // pebble requires EAB here, as ZeroSSL does; the key is base64url as CAs hand it out.
    let hmac = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";
    let mut setup = Setup::with(None, vec![("kid-1".into(), hmac.into())]).await;
    let domains = "[[domains]]\nnames = [\"app.acme.test\"]\nbackend = \"{backend}\"\n";
    let eab = format!("eab_kid = \"kid-1\"\neab_hmac_key = \"{hmac}\"\n");
    let mut first = setup.sidecar_with("replica-1", domains, "store-1", &eab);
    first
        .wait(
            "issuance with EAB",
            Duration::from_secs(30),
            valid("app.acme.test"),
        )
        .await;
    let (status, _) = fetch(first.inbound, "app.acme.test", &setup.root())
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    drop(first);

    // A second replica of the same app, with a store of its own (or the first's store lost):
    // the key the agent derives is the same, so the CA finds the same account.
    let mut second = setup.sidecar_with("replica-2", domains, "store-2", &eab);
    second
        .wait("issuance", Duration::from_secs(30), valid("app.acme.test"))
        .await;
    let (a, b) = (
        stored_account(&setup.path().join("store-1")),
        stored_account(&setup.path().join("store-2")),
    );
    assert!(
        a.starts_with(&setup.pebble.directory.replace("/dir", "/")),
        "{a}"
    );
    assert_eq!(a, b, "two replicas, two accounts");
    // The evidence names that account and its key (what a CAA accounturi pin will name); it is
    // written just after the certificate is served.
    let file = setup.path().join("store-2/evidences/acme-account.json");
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    while !file.exists() {
        assert!(tokio::time::Instant::now() < end, "no evidence written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let evidence: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(evidence["uri"], serde_json::json!(a), "{evidence}");
    assert_eq!(evidence["key"]["kty"], "EC", "{evidence}");
    drop(second);

    // A wrong HMAC key is refused by a CA that does not know the account yet (a restarted
    // pebble forgets every account), with the CA's message.
    tokio::task::block_in_place(|| setup.pebble.restart());
    let wrong =
        "eab_kid = \"kid-1\"\neab_hmac_key = \"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\"\n";
    let mut third = setup.sidecar_with("replica-3", domains, "store-3", wrong);
    let certs = third
        .wait("the refusal", Duration::from_secs(30), |c| {
            c[0].status == Status::Failed
        })
        .await;
    let error = certs[0].last_error.clone().unwrap();
    assert!(error.starts_with("CA refused"), "{error}");
}
