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
        Self::build(tempfile::tempdir().unwrap(), validity, eab_keys, None).await
    }

    /// pebble resolving (and validating DNS-01) against `dns`, in `dir`.
    async fn with_dns(dir: tempfile::TempDir, dns: SocketAddr) -> Self {
        Self::build(dir, None, Vec::new(), Some(dns)).await
    }

    async fn build(
        dir: tempfile::TempDir,
        validity: Option<Duration>,
        eab_keys: Vec<(String, String)>,
        dns_server: Option<SocketAddr>,
    ) -> Self {
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
                    dns_server,
                    listen_ip: None,
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
        let (directory, ca) = (self.pebble.directory.clone(), self.pebble.ca_file.clone());
        self.sidecar_at(name, domains, store, acme, (&directory, &ca))
    }

    /// The same with the CA at `directory`, its HTTPS rooted in `ca`.
    fn sidecar_at(
        &self,
        name: &str,
        domains: &str,
        store: &str,
        acme: &str,
        (directory, ca): (&str, &Path),
    ) -> Sidecar {
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
            ca = ca.display(),
            http = self.http_port,
        )
        .replace("{backend}", &self.backend.addr.to_string());
        std::fs::write(&config, text).unwrap();
        let (guard, bound) = run_mesh(self.path(), name, &config);
        Sidecar {
            inbound: e2e::listener(&bound, "inbound"),
            admin: e2e::listener(&bound, "admin"),
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
            dstack_mesh::status::request(&self.admin.to_string(), http::Method::GET, "/certs")
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
    let serial =
        e2e::backend::hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &cert).as_ref());
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
        dstack_mesh::status::request(&sidecar.admin.to_string(), http::Method::GET, "/ready")
            .await
            .unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains("app.acme.test: the certificate expired"),
        "{body}"
    );
    let (_, metrics) =
        dstack_mesh::status::request(&sidecar.admin.to_string(), http::Method::GET, "/metrics")
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

/// pebble's word on `serial` (hex): `Valid` or `Revoked`.
fn cert_status(pebble: &Pebble, serial: &str) -> String {
    let url = format!("{}/cert-status-by-serial/{serial}", pebble.management);
    let reply = e2e::pebble::https(&pebble.ca_file, "GET", &url, None).unwrap();
    assert_eq!(reply.status, 200, "GET {url}");
    let status: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    status["Status"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certs_revoke_stops_serving_at_once_reorders_and_cleans_up_a_removed_domain() {
    let setup = Setup::new(None).await;
    let both = "[[domains]]\nnames = [\"app.acme.test\"]\nbackend = \"{backend}\"\n\n\
                [[domains]]\nnames = [\"other.acme.test\"]\nbackend = \"{backend}\"\n";
    let mut sidecar = setup.sidecar("sidecar", both);
    sidecar
        .wait("issuance", Duration::from_secs(30), |c| {
            valid("app.acme.test")(c) && valid("other.acme.test")(c)
        })
        .await;
    let root = setup.root();
    let first = sidecar.cert("app.acme.test").await.serial.unwrap();
    let (_, served_before) = fetch(sidecar.inbound, "app.acme.test", &root)
        .await
        .unwrap();
    assert_eq!(cert_status(&setup.pebble, &first), "Valid");

    // The new order fails until the name resolves again: what is served in between shows.
    setup.pebble.challtestsrv(
        "/set-servfail",
        &serde_json::json!({"host": "app.acme.test"}),
    );
    let (ok, text) = sidecar.cli(&["revoke", "app.acme.test", "--reason", "key-compromise"]);
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!(
            "app.acme.test: certificate {first} revoked (keyCompromise)"
        )),
        "{text}"
    );
    assert!(text.contains("a new one is being ordered"), "{text}");
    assert_eq!(cert_status(&setup.pebble, &first), "Revoked");
    // From the moment the command returns, the revoked certificate is never presented.
    sidecar
        .wait("the new order failing", Duration::from_secs(30), |c| {
            c.iter()
                .any(|c| c.domain == "app.acme.test" && c.status == Status::Failed)
        })
        .await;
    let refused = fetch(sidecar.inbound, "app.acme.test", &root).await;
    assert!(refused.is_err(), "served while revoked: {refused:?}");
    assert_ne!(
        sidecar.cert("app.acme.test").await.serial.as_deref(),
        Some(first.as_str())
    );
    setup.pebble.challtestsrv(
        "/clear-servfail",
        &serde_json::json!({"host": "app.acme.test"}),
    );
    let store = setup.path().join("store/certs/app.acme.test");
    for file in ["chain.pem", "key.pem", "meta.json"] {
        assert!(
            store.join(format!("{file}.revoked-{first}")).exists(),
            "{file} not moved aside: {text}"
        );
    }
    let certs = sidecar
        .wait("a new certificate", Duration::from_secs(30), |c| {
            c.iter().any(|c| {
                c.domain == "app.acme.test"
                    && c.status == Status::Valid
                    && c.serial.as_deref().is_some_and(|s| s != first)
            })
        })
        .await;
    let second = certs
        .iter()
        .find(|c| c.domain == "app.acme.test")
        .and_then(|c| c.serial.clone())
        .unwrap();
    let (status, served) = fetch(sidecar.inbound, "app.acme.test", &root)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_ne!(served, served_before);
    // The evidence names the new certificate, and the other domain was never touched.
    let evidence =
        std::fs::read(setup.path().join("store/evidences/cert-app.acme.test.pem")).unwrap();
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut evidence_serial = dstack_mesh::acme::cert::leaf_summary(&evidence).unwrap().1;
    while evidence_serial != second && tokio::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let pem =
            std::fs::read(setup.path().join("store/evidences/cert-app.acme.test.pem")).unwrap();
        evidence_serial = dstack_mesh::acme::cert::leaf_summary(&pem).unwrap().1;
    }
    assert_eq!(evidence_serial, second, "evidence not rewritten");
    assert_eq!(sidecar.cert("other.acme.test").await.issued_total, 1);

    // Refusals name the problem.
    let (ok, text) = sidecar.cli(&["revoke", "nope.acme.test"]);
    assert!(
        !ok && text.contains("neither a configured domain nor one with a stored certificate"),
        "{text}"
    );
    let (ok, text) = sidecar.cli(&["revoke", "app.acme.test", "--reason", "caCompromise"]);
    assert!(
        !ok && text.contains("not a revocation reason a subscriber may give"),
        "{text}"
    );
    assert_eq!(cert_status(&setup.pebble, &second), "Valid");

    // The domain is removed from the configuration: its stored certificate can still be
    // revoked, and nothing is ordered for it.
    drop(sidecar);
    let only_other = "[[domains]]\nnames = [\"other.acme.test\"]\nbackend = \"{backend}\"\n";
    let sidecar = setup.sidecar("sidecar-after", only_other);
    let (ok, text) = sidecar.cli(&[
        "revoke",
        "app.acme.test",
        "--reason",
        "cessationOfOperation",
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains("the domain is not configured, so none is ordered"),
        "{text}"
    );
    assert_eq!(cert_status(&setup.pebble, &second), "Revoked");
    assert!(store.join(format!("chain.pem.revoked-{second}")).exists());
    assert!(!store.join("chain.pem").exists());
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

// ---------------------------------------------------------------------------------------------
// DNS-01: RFC 2136 against BIND, Cloudflare's v4 API against its stand-in, the dstack records.

use e2e::{
    bind::{Bind, BindOptions, Tsig, Zone},
    cloudflare::{CloudflareStandIn, Fault},
};

/// A CAA identity for pebble, whose directory lists none.
const PEBBLE_CAA: &str = "pebble.test";

/// BIND serving `example.test` (plus `records`), updatable with a fresh key; pebble resolving
/// against it.
async fn bind_setup(records: &[&str]) -> (Setup, Bind) {
    let dir = tempfile::tempdir().unwrap();
    let named_dir = dir.path().join("named");
    let zone = Zone {
        name: "example.test".into(),
        records: records.iter().map(|r| (*r).to_owned()).collect(),
        read_only: false,
    };
    let bind = tokio::task::spawn_blocking(move || {
        Bind::start(
            &named_dir,
            BindOptions {
                zones: vec![zone],
                tsig: Tsig::generate("mesh-key"),
            },
        )
    })
    .await
    .unwrap();
    let setup = Setup::with_dns(dir, bind.addr).await;
    (setup, bind)
}

fn rfc2136(bind: &Bind, secret: &str, extra: &str) -> String {
    format!(
        "\n[dns]\nprovider = \"rfc2136\"\nserver = \"{}\"\ntsig_key = \"{}\"\ntsig_secret = \"{secret}\"\n\
         caa_identities = [\"{PEBBLE_CAA}\"]\n{extra}\n",
        bind.addr, bind.tsig.name
    )
}

fn dns01_domain(names: &str) -> String {
    format!("[[domains]]\nnames = [{names}]\nbackend = \"{{backend}}\"\nchallenge = \"dns-01\"\n\n")
}

fn records_in_place(domains: &'static [&'static str]) -> impl FnMut(&[CertStatus]) -> bool {
    move |certs| {
        domains.iter().all(|d| {
            certs
                .iter()
                .any(|c| c.domain == *d && c.dns_records.as_deref() == Some("in place"))
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc2136_issues_a_wildcard_through_bind_and_writes_the_dstack_records_once() {
    let (setup, bind) = bind_setup(&[]).await;
    let domains = format!(
        "{}{}",
        dns01_domain("\"*.example.test\""),
        dns01_domain("\"www.example.test\"")
    );
    let dns = rfc2136(
        &bind,
        &bind.tsig.secret,
        "gateway_domain = \"gw.example.net\"\nset_caa = true\napp_port = 8443\n",
    );
    let mut a = setup.sidecar_with("a", &format!("{dns}{domains}"), "store", "");
    a.wait("both certificates", Duration::from_secs(60), |c| {
        valid("*.example.test")(c) && valid("www.example.test")(c)
    })
    .await;
    a.wait(
        "the dstack records",
        Duration::from_secs(30),
        records_in_place(&["*.example.test", "www.example.test"]),
    )
    .await;

    // The wildcard serves any one label under it, verified against pebble's root.
    let root = setup.root();
    for host in ["foo.example.test", "www.example.test"] {
        let (status, _) = fetch(a.inbound, host, &root).await.unwrap();
        assert_eq!(status, StatusCode::OK, "{host}");
    }

    // The records, as any resolver sees them.
    assert_eq!(bind.dig("www.example.test", "CNAME"), ["gw.example.net."]);
    assert_eq!(bind.dig("*.example.test", "CNAME"), ["gw.example.net."]);
    let address = format!("\"{SERVER}:8443\"");
    assert_eq!(
        bind.dig("_dstack-app-address.www.example.test", "TXT"),
        [address.as_str()]
    );
    assert_eq!(
        bind.dig("_dstack-app-address-wildcard.example.test", "TXT"),
        [address.as_str()]
    );
    let account = stored_account(&setup.path().join("store"));
    let caa = bind.dig("example.test", "CAA");
    assert_eq!(
        caa,
        [format!(
            "0 issuewild \"{PEBBLE_CAA}; validationmethods=dns-01; accounturi={account}\""
        )],
        "the wildcard's CAA pin names the shared account"
    );
    // www is a CNAME: no CAA can sit there, and the sidecar says so rather than fail.
    assert!(bind
        .dig("www.example.test", "CAA")
        .iter()
        .all(|l| !l.contains("issue")));
    // The challenge records are gone (the wildcard CNAME now covers those names: dig shows
    // its target, never a TXT value).
    for name in [
        "_acme-challenge.example.test",
        "_acme-challenge.www.example.test",
    ] {
        let lines = bind.dig(name, "TXT");
        assert!(
            lines.iter().all(|l| !l.starts_with('"')),
            "{name}: {lines:?}"
        );
    }

    // A second run finds everything in place and changes nothing.
    let serial = bind.serial("example.test");
    drop(a);
    let mut b = setup.sidecar_with("b", &format!("{dns}{domains}"), "store", "");
    b.wait(
        "the dstack records again",
        Duration::from_secs(30),
        records_in_place(&["*.example.test", "www.example.test"]),
    )
    .await;
    assert_eq!(
        bind.serial("example.test"),
        serial,
        "the second run changed the zone"
    );
    assert!(
        !b.guard.stderr().contains(&bind.tsig.secret),
        "the TSIG secret was logged"
    );
    assert!(
        b.guard
            .stderr()
            .contains("dstack DNS records already in place"),
        "{}",
        b.guard.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_faults_fail_the_domain_with_the_reason_and_disturb_nothing_else() {
    let (setup, bind) = bind_setup(&[
        "plain IN A 127.0.0.1",
        "caa IN CAA 0 issue \"other-ca.example\"",
        "method IN CAA 0 issue \"pebble.test; validationmethods=http-01\"",
    ])
    .await;
    let root = setup.root();
    let plain = "[[domains]]\nnames = [\"plain.example.test\"]\nbackend = \"{backend}\"\n\n";

    // A wrong TSIG key: BIND refuses the update; the tls-alpn-01 domain next to it is issued.
    let wrong = Tsig::generate("mesh-key").secret;
    let config = format!(
        "{}{}{plain}",
        rfc2136(&bind, &wrong, ""),
        dns01_domain("\"key.example.test\"")
    );
    let mut a = setup.sidecar_with("wrong-key", &config, "store-a", "");
    let certs = a
        .wait(
            "the wrong key to fail twice",
            Duration::from_secs(60),
            |c| {
                valid("plain.example.test")(c)
                    && c.iter()
                        .any(|c| c.domain == "key.example.test" && c.consecutive_failures >= 2)
            },
        )
        .await;
    let key = certs
        .iter()
        .find(|c| c.domain == "key.example.test")
        .unwrap();
    assert_eq!(key.status, Status::Failed);
    let error = key.last_error.as_deref().unwrap();
    assert!(
        error.contains("rfc2136") && error.contains("NOTAUTH") && error.contains("TSIG"),
        "{error}"
    );
    assert!(key.next_attempt.is_some());
    // The next refused update, under browser-style load on the domain beside it.
    let load = e2e::load::Load::start(
        e2e::load::Target::public(a.inbound, "plain.example.test", &root),
        &[e2e::load::Caller::Fresh, e2e::load::Caller::H2],
        Duration::from_millis(10),
    );
    let failures = key.consecutive_failures;
    a.wait("one more refused update", Duration::from_secs(30), |c| {
        c.iter()
            .any(|c| c.domain == "key.example.test" && c.consecutive_failures > failures)
    })
    .await;
    let (ok, failed) = load.finish().await;
    eprintln!("DNS provider refusing: {ok} requests to the domain beside it, {failed} failed");
    assert!(ok > 0);
    assert_eq!(failed, 0);
    drop(a);

    // A resolver that never sees the record (a split-horizon view): failed, and cleaned up.
    // CAA forbidding the CA or the method: failed before any order, naming the record.
    let orders = setup.pebble.order_requests();
    let resolvers = format!(
        "resolvers = [\"{}\", \"{}\"]\npropagation_timeout = \"2s\"\n",
        bind.addr, setup.pebble.challtestsrv_dns
    );
    let config = format!(
        "{}{}{}{}",
        rfc2136(&bind, &bind.tsig.secret, &resolvers),
        dns01_domain("\"late.example.test\""),
        dns01_domain("\"caa.example.test\""),
        dns01_domain("\"method.example.test\"")
    );
    let mut b = setup.sidecar_with("faults", &config, "store-b", "");
    let certs = b
        .wait("three failures", Duration::from_secs(60), |c| {
            c.iter()
                .filter(|c| c.status == Status::Failed && c.last_error.is_some())
                .count()
                == 3
        })
        .await;
    let error = |d: &str| {
        certs
            .iter()
            .find(|c| c.domain == d)
            .and_then(|c| c.last_error.clone())
            .unwrap()
    };
    let late = error("late.example.test");
    assert!(
        late.contains("_acme-challenge.late.example.test")
            && late.contains(&setup.pebble.challtestsrv_dns.to_string())
            && late.contains("DNS_RESOLVERS"),
        "{late}"
    );
    assert!(
        bind.dig("_acme-challenge.late.example.test", "TXT")
            .is_empty(),
        "challenge record left behind"
    );
    let caa = error("caa.example.test");
    assert!(
        caa.contains("caa.example.test. CAA 0 issue \"other-ca.example\"")
            && caa.contains("another CA"),
        "{caa}"
    );
    let method = error("method.example.test");
    assert!(
        method.contains("allows only http-01") && method.contains("method.example.test. CAA"),
        "{method}"
    );
    // Only `late` reached the CA: the CAA checks stop before ordering.
    let late_orders = setup.pebble.order_requests() - orders;
    let late_failures = certs
        .iter()
        .find(|c| c.domain == "late.example.test")
        .unwrap()
        .failures_total;
    assert!(
        late_orders as u64 <= late_failures + 1,
        "{late_orders} orders for {late_failures} attempts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudflare_api_issues_writes_records_and_survives_refusals_errors_throttling_garbage_and_slowness(
) {
    let setup = Setup::new(None).await;
    const TOKEN: &str = "cf-token-e2e";
    let cf = CloudflareStandIn::start(
        TOKEN,
        &["other.test", "example.test"],
        Some(setup.pebble.challtestsrv_management.clone()),
    );
    // Someone else's records: an A record where our CNAME would go, and an old app address.
    cf.insert("example.test", "A", "legacy.example.test", "192.0.2.1");
    cf.insert(
        "example.test",
        "TXT",
        "_dstack-app-address.shop.example.test",
        "0ld0ld:443",
    );
    let dns = format!(
        "\n[dns]\nprovider = \"cloudflare\"\napi_token = \"{TOKEN}\"\napi_url = \"{}\"\n\
         resolvers = [\"{}\"]\ngateway_domain = \"gw.example.net\"\nset_caa = true\napp_port = 443\n\
         caa_identities = [\"{PEBBLE_CAA}\"]\n",
        cf.base, setup.pebble.challtestsrv_dns
    );
    let domains = format!(
        "{}{}{}",
        dns01_domain("\"*.apps.example.test\""),
        dns01_domain("\"shop.example.test\""),
        dns01_domain("\"legacy.example.test\"")
    );
    let config = format!("{dns}{domains}");
    let mut a = setup.sidecar_with("cf", &config, "store", "");
    a.wait("three certificates", Duration::from_secs(60), |c| {
        valid("*.apps.example.test")(c)
            && valid("shop.example.test")(c)
            && valid("legacy.example.test")(c)
    })
    .await;
    a.wait(
        "the records",
        Duration::from_secs(30),
        records_in_place(&["*.apps.example.test", "shop.example.test"]),
    )
    .await;
    let root = setup.root();
    assert_eq!(
        fetch(a.inbound, "x.apps.example.test", &root)
            .await
            .unwrap()
            .0,
        StatusCode::OK
    );

    // Every request carried the token; the bodies are the documented ones.
    let requests = cf.requests();
    assert!(requests
        .iter()
        .all(|r| r.authorization.as_deref() == Some(&format!("Bearer {TOKEN}") as &str)));
    let posted = |kind: &str, name: &str| {
        requests
            .iter()
            .filter(|r| r.method == "POST" && r.body["type"] == kind && r.body["name"] == name)
            .map(|r| r.body.clone())
            .collect::<Vec<_>>()
    };
    let challenge = posted("TXT", "_acme-challenge.apps.example.test");
    assert_eq!(challenge.len(), 1, "{requests:#?}");
    assert_eq!(challenge[0]["ttl"], 60);
    assert_eq!(
        challenge[0]["content"].as_str().unwrap().len(),
        43,
        "base64url SHA-256"
    );
    let cname = posted("CNAME", "shop.example.test");
    assert_eq!(cname[0]["content"], "gw.example.net");
    assert_eq!(cname[0]["proxied"], false);
    let account = stored_account(&setup.path().join("store"));
    let caa = posted("CAA", "apps.example.test");
    assert_eq!(caa[0]["data"]["tag"], "issuewild");
    assert_eq!(
        caa[0]["data"]["value"],
        format!("{PEBBLE_CAA}; validationmethods=dns-01; accounturi={account}")
    );
    assert!(
        requests.iter().any(|r| r.method == "DELETE"),
        "challenge records deleted"
    );
    let records = cf.records();
    let named = |name: &str| {
        records
            .iter()
            .filter(|r| r["name"] == name)
            .cloned()
            .collect::<Vec<_>>()
    };
    assert!(
        records
            .iter()
            .all(|r| !r["name"].as_str().unwrap().starts_with("_acme-challenge")),
        "{records:#?}"
    );
    // Our old app address was replaced; someone else's A record was left alone and reported.
    let address = named("_dstack-app-address.shop.example.test");
    assert_eq!(address.len(), 1, "{address:#?}");
    assert_eq!(address[0]["content"], format!("{SERVER}:443"));
    assert_eq!(named("legacy.example.test")[0]["content"], "192.0.2.1");
    let legacy = a.cert("legacy.example.test").await;
    let report = legacy.dns_records.unwrap_or_default();
    assert!(
        report.contains("legacy.example.test. A 192.0.2.1") && report.contains("does not remove"),
        "{report}"
    );

    // The provider refuses (403), breaks (500), throttles (429), answers a maintenance page,
    // then answers too late: the renewing domain fails with its words each time, keeps its
    // certificate, backs off and retries, while browser-style callers on another domain of
    // the same sidecar lose nothing.
    let load = e2e::load::Load::start(
        e2e::load::Target::public(a.inbound, "y.apps.example.test", &root),
        &[e2e::load::Caller::Fresh, e2e::load::Caller::H2],
        Duration::from_millis(10),
    );
    // Each fault replaces the last in one step: a retry the backoff starts in between meets
    // one or the other, never a working API that would renew and reset the count.
    let faults = [
        (Fault::Status(403), "Authentication error"),
        (Fault::Status(500), "HTTP 500"),
        (Fault::Status(429), "HTTP 429"),
        (Fault::Garbage, "not the API's JSON"),
        (Fault::Slow(Duration::from_secs(12)), "no answer within 10s"),
        (Fault::Unreachable, "client error ("),
    ];
    for (fault, words) in faults {
        let start = a.cert("shop.example.test").await;
        let (before, mut issued) = (start.failures_total, start.issued_total);
        cf.fault(Some(fault));
        let (ok, out) = a.cli(&["renew", "shop.example.test"]);
        assert!(ok, "{out}");
        let end = tokio::time::Instant::now() + Duration::from_secs(40);
        let shop = loop {
            a.guard.assert_running();
            let shop = a.cert("shop.example.test").await;
            if shop.failures_total > before
                && shop
                    .last_error
                    .as_deref()
                    .is_some_and(|e| e.contains(words))
            {
                break shop;
            }
            // A renewal the CA let through on an authorization still valid asked the API
            // nothing: ask again, so the next one meets the fault.
            if shop.issued_total > issued {
                issued = shop.issued_total;
                let (ok, out) = a.cli(&["renew", "shop.example.test"]);
                assert!(ok, "{out}");
            }
            assert!(
                tokio::time::Instant::now() < end,
                "timed out waiting for {fault:?} to fail the renewal: {shop:#?}\n{}",
                a.guard.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(
            shop.not_after.is_some(),
            "the old certificate keeps serving"
        );
        if let Fault::Status(429) = fault {
            // The API's Retry-After (30 s), not the 1 s backoff, sets the next attempt.
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            assert!(
                shop.next_attempt.unwrap_or(0) >= now + 20,
                "next attempt {:?} at {now}: the Retry-After was not honoured",
                shop.next_attempt
            );
        }
        eprintln!(
            "{fault:?}: {}",
            shop.last_error.as_deref().unwrap_or_default()
        );
    }
    cf.fault(None);
    let (ok, failed) = load.finish().await;
    eprintln!("DNS provider faults: {ok} requests to another domain, {failed} failed");
    assert_eq!(failed, 0);
    assert_eq!(
        fetch(a.inbound, "shop.example.test", &root)
            .await
            .unwrap()
            .0,
        StatusCode::OK
    );
    // Six failures in a row have backed the next attempt off past half a minute: ask now.
    let (ok, out) = a.cli(&["renew", "shop.example.test"]);
    assert!(ok, "{out}");
    a.wait("recovery", Duration::from_secs(30), |c| {
        c.iter().any(|c| {
            c.domain == "shop.example.test" && c.status == Status::Valid && c.last_error.is_none()
        })
    })
    .await;
    assert!(cf
        .records()
        .iter()
        .all(|r| !r["name"].as_str().unwrap().starts_with("_acme-challenge")));

    // A second run writes nothing.
    let writes =
        |cf: &CloudflareStandIn| cf.requests().iter().filter(|r| r.method != "GET").count();
    let before = writes(&cf);
    drop(a);
    let mut b = setup.sidecar_with("cf2", &config, "store", "");
    b.wait(
        "the records again",
        Duration::from_secs(30),
        records_in_place(&["*.apps.example.test", "shop.example.test"]),
    )
    .await;
    assert_eq!(writes(&cf), before, "the second run wrote to the API");
    assert!(
        !b.guard.stderr().contains(TOKEN),
        "the API token was logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ari_windows_schedule_renewal_and_a_window_moved_earlier_renews_now_replacing_the_old() {
    use e2e::ari::AriFront;
    // An hour's certificates: without ARI, renewal would be 40 minutes away.
    let setup = Setup::new(Some(Duration::from_secs(3600))).await;
    let front = AriFront::start(
        setup.path(),
        &setup.pebble.directory,
        &setup.pebble.ca_file,
        Some(&["classic", "tlsserver", "shortlived"]),
    )
    .await;
    let domains = "[[domains]]\nnames = [\"app.acme.test\"]\nbackend = \"{backend}\"\n";
    let mut sidecar = setup.sidecar_at(
        "sidecar",
        domains,
        "store",
        "profile = \"shortlived\"",
        (&front.directory, &front.ca_file),
    );
    let certs = sidecar
        .wait(
            "a certificate and its window",
            Duration::from_secs(30),
            |c| {
                c[0].status == Status::Valid
                    && c[0]
                        .renewal_info
                        .as_deref()
                        .is_some_and(|r| r.starts_with("window"))
            },
        )
        .await;
    let (nb, na) = (certs[0].not_before.unwrap(), certs[0].not_after.unwrap());
    let renew_at = certs[0].renew_at.unwrap();
    let life = na - nb;
    assert!(
        renew_at >= nb + life / 2 && renew_at <= nb + life * 55 / 100 + 1,
        "renewal at {renew_at} is not inside the CA's window ({nb}..{na})"
    );
    let orders = front.orders();
    assert_eq!(orders.len(), 1);
    assert_eq!(orders[0]["profile"], "shortlived", "{orders:?}");
    assert!(orders[0].get("replaces").is_none(), "{orders:?}");
    let first = front.seen()[0].id.clone();
    let first_serial = certs[0].serial.clone().unwrap();
    // The ACME client (the real process) offered the post-quantum hybrid first: every
    // connection to the CA agreed on it.
    let groups = front.groups();
    assert!(
        !groups.is_empty()
            && groups
                .iter()
                .all(|g| *g == rustls::NamedGroup::X25519MLKEM768),
        "{groups:?}"
    );

    // The CA moves the window into the past (a revocation ahead): renewal at once.
    front.move_windows_into_the_past();
    let certs = sidecar
        .wait("the early renewal", Duration::from_secs(30), |c| {
            c[0].status == Status::Valid && c[0].serial.as_deref() != Some(first_serial.as_str())
        })
        .await;
    let orders = front.orders();
    assert_eq!(orders.len(), 2, "{orders:?}");
    assert_eq!(orders[1]["replaces"], first.as_str(), "{orders:?}");
    assert_eq!(orders[1]["profile"], "shortlived");
    // The new certificate has a window of its own: asked about, and no further order.
    let asked = front.renewal_info_requests();
    let end = tokio::time::Instant::now() + Duration::from_secs(20);
    while front.renewal_info_requests() < asked + 2 {
        assert!(
            tokio::time::Instant::now() < end,
            "the new certificate's window was not asked for"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        front.orders().len(),
        2,
        "renewed again: {:?}",
        front.orders()
    );
    assert!(
        sidecar.cert("app.acme.test").await.renew_at.unwrap() > certs[0].not_before.unwrap(),
        "{certs:?}"
    );

    // A CA that takes `replaces` without reflecting it: the order is made again without.
    front.stop_reflecting();
    front.move_windows_into_the_past();
    let second_serial = certs[0].serial.clone().unwrap();
    sidecar
        .wait("a renewal without replaces", Duration::from_secs(30), |c| {
            c[0].status == Status::Valid && c[0].serial.as_deref() != Some(second_serial.as_str())
        })
        .await;
    let orders = front.orders();
    assert_eq!(orders.len(), 4, "{orders:?}");
    assert!(orders[2].get("replaces").is_some(), "{orders:?}");
    assert!(orders[3].get("replaces").is_none(), "{orders:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_the_renewal_moment_and_waits_for_the_cas_retry_after() {
    use e2e::ari::AriFront;
    let setup = Setup::new(Some(Duration::from_secs(3600))).await;
    let front = AriFront::start(
        setup.path(),
        &setup.pebble.directory,
        &setup.pebble.ca_file,
        None,
    )
    .await;
    front.set_retry_after(3600);
    let domains = "[[domains]]\nnames = [\"app.acme.test\"]\nbackend = \"{backend}\"\n";
    let with_window = |c: &[CertStatus]| {
        c[0].status == Status::Valid
            && c[0]
                .renewal_info
                .as_deref()
                .is_some_and(|r| r.starts_with("window"))
    };
    let on_one_store = |name| {
        let ca = (front.directory.as_str(), front.ca_file.as_path());
        setup.sidecar_at(name, domains, "store", "", ca)
    };
    let mut first = on_one_store("first");
    let certs = first
        .wait("a window", Duration::from_secs(30), with_window)
        .await;
    let (serial, renew_at) = (certs[0].serial.clone(), certs[0].renew_at);
    let asked = front.renewal_info_requests();
    assert_eq!(asked, 1);
    drop(first);

    // The same store, a new process: the window and the moment picked in it come from the
    // store; the CA said to ask again in an hour, so it is not asked now.
    let mut second = on_one_store("second");
    let certs = second
        .wait("the stored window", Duration::from_secs(30), with_window)
        .await;
    assert_eq!(certs[0].serial, serial);
    assert_eq!(certs[0].renew_at, renew_at);
    assert_eq!(
        front.renewal_info_requests(),
        asked,
        "asked again after a restart"
    );
    assert_eq!(front.orders().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_whose_renewal_info_fails_falls_back_to_the_lifetime_and_an_unoffered_profile_is_refused(
) {
    use e2e::ari::AriFront;
    let setup = Setup::new(Some(Duration::from_secs(3600))).await;
    let front = AriFront::start(
        setup.path(),
        &setup.pebble.directory,
        &setup.pebble.ca_file,
        Some(&["classic", "tlsserver"]),
    )
    .await;
    front.answer_status(Some(500));
    let domains = "[[domains]]\nnames = [\"app.acme.test\"]\nbackend = \"{backend}\"\n";
    let mut sidecar = setup.sidecar_at(
        "sidecar",
        domains,
        "store",
        "",
        (&front.directory, &front.ca_file),
    );
    let certs = sidecar
        .wait(
            "a certificate without a window",
            Duration::from_secs(30),
            |c| {
                c[0].status == Status::Valid
                    && c[0]
                        .renewal_info
                        .as_deref()
                        .is_some_and(|r| r.contains("500"))
            },
        )
        .await;
    let (nb, na) = (certs[0].not_before.unwrap(), certs[0].not_after.unwrap());
    let renew_at = certs[0].renew_at.unwrap();
    let by_lifetime = na - (na - nb) / 3;
    assert!(
        renew_at.abs_diff(by_lifetime) <= 1,
        "{renew_at} is not two thirds into {nb}..{na}"
    );
    assert!(certs[0].last_error.is_none(), "{certs:?}");
    // A server error is asked again soon (backing off); a 404 is a long-term answer.
    let end = tokio::time::Instant::now() + Duration::from_secs(20);
    while front.renewal_info_requests() < 3 {
        assert!(tokio::time::Instant::now() < end, "no retry after a 500");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    front.answer_status(Some(404));
    let certs = sidecar
        .wait("the 404", Duration::from_secs(30), |c| {
            c[0].renewal_info
                .as_deref()
                .is_some_and(|r| r.contains("404"))
        })
        .await;
    assert_eq!(certs[0].status, Status::Valid);
    assert_eq!(certs[0].renew_at, Some(renew_at));
    assert_eq!(front.orders().len(), 1);

    // A profile the CA does not offer fails the domain, naming what it offers; no order.
    drop(sidecar);
    let other = "[[domains]]\nnames = [\"other.acme.test\"]\nbackend = \"{backend}\"\n";
    let mut refused = setup.sidecar_at(
        "refused",
        other,
        "store-refused",
        "profile = \"shortlived\"",
        (&front.directory, &front.ca_file),
    );
    let certs = refused
        .wait("the refusal", Duration::from_secs(30), |c| {
            c[0].last_error.is_some()
        })
        .await;
    let error = certs[0].last_error.clone().unwrap();
    assert!(
        error.contains(
            "does not offer the ACME profile \"shortlived\": it offers classic, tlsserver"
        ),
        "{error}"
    );
    assert_eq!(front.orders().len(), 1, "an order went out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_down_slow_garbled_or_rate_limiting_fails_only_the_renewal_not_one_request() {
    use e2e::{
        ari::{AriFront, CaFault},
        load::{Caller, Load, Target},
    };
    use std::sync::Arc;
    let setup = Setup::new(None).await;
    let front = AriFront::start(
        setup.path(),
        &setup.pebble.directory,
        &setup.pebble.ca_file,
        None,
    )
    .await;
    let domains = "[[domains]]\nnames = [\"app.acme.test\"]\nbackend = \"{backend}\"\n";
    let mut sidecar = setup.sidecar_at(
        "sidecar",
        domains,
        "store",
        "ca_timeout = \"3s\"",
        (&front.directory, &front.ca_file),
    );
    sidecar
        .wait("issuance", Duration::from_secs(30), valid("app.acme.test"))
        .await;
    // Browser-style callers on the domain, and a mesh caller on the same listener.
    let public = Load::start(
        Target::public(sidecar.inbound, "app.acme.test", &setup.root()),
        &[Caller::Fresh, Caller::H2, Caller::H1],
        Duration::from_millis(10),
    );
    let (caller, _agent) = identity(setup.path(), &setup.path().join("state"), CALLER).await;
    let policy = ratls::Policy::new(caller.current().trust_anchors().unwrap())
        .expect(SERVER.parse().unwrap());
    let mesh_tls = ratls::tls::mesh_client_config(caller.resolver(), Arc::new(policy)).unwrap();
    let mesh = Load::start(
        Target {
            addr: sidecar.inbound,
            tls: Some((Arc::new(mesh_tls), "mesh.test".try_into().unwrap())),
            host: "mesh.test".to_owned(),
            headers: Vec::new(),
        },
        &[Caller::H1, Caller::H2],
        Duration::from_millis(10),
    );

    let faults = [
        (CaFault::Down, "CA unreachable"),
        (CaFault::Slow(Duration::from_secs(10)), "within 3s"),
        (CaFault::Garbage, "no nonce"),
        (CaFault::RateLimited(7), "rateLimited"),
    ];
    for (fault, says) in faults {
        let before = sidecar.cert("app.acme.test").await;
        front.set_fault(Some(fault));
        let (ok, text) = sidecar.cli(&["renew", "app.acme.test"]);
        assert!(ok, "{text}");
        let failed = sidecar
            .wait(
                &format!("{fault:?} to fail the renewal"),
                Duration::from_secs(30),
                |c| c[0].failures_total > before.failures_total,
            )
            .await
            .remove(0);
        let error = failed.last_error.clone().unwrap_or_default();
        assert!(error.contains(says), "{fault:?}: {failed:?}");
        assert_eq!(
            failed.serial, before.serial,
            "{fault:?}: the certificate in use changed"
        );
        if let CaFault::RateLimited(secs) = fault {
            // The CA's Retry-After is the earliest next attempt.
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            assert!(
                failed.next_attempt.unwrap() + 1 >= now + secs,
                "next attempt {:?} is before the CA's Retry-After ({secs} s from {now})",
                failed.next_attempt
            );
        }
        front.set_fault(None);
        let (ok, text) = sidecar.cli(&["renew", "app.acme.test"]);
        assert!(ok, "{text}");
        sidecar
            .wait(
                &format!("a renewal after {fault:?}"),
                Duration::from_secs(30),
                |c| c[0].status == Status::Valid && c[0].issued_total > before.issued_total,
            )
            .await;
        eprintln!("{fault:?}: {error}");
    }
    assert!(front.faulted() >= 4);
    let (public_ok, public_failed) = public.finish().await;
    let (mesh_ok, mesh_failed) = mesh.finish().await;
    eprintln!(
        "through four CA faults: public {public_ok} ok / {public_failed} failed, mesh {mesh_ok} ok / {mesh_failed} failed"
    );
    assert_eq!((public_failed, mesh_failed), (0, 0));
    sidecar.guard.assert_running();
}

/// A tmpfs of `size` at `path`, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Self {
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new(e2e::program("mount"))
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount a tmpfs (the test runs as root, as CI does): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(path.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Every file under `dir` and its bytes.
fn files(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut all = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else {
                all.insert(path.clone(), std::fs::read(&path).unwrap());
            }
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_keeps_the_store_whole_says_so_and_serves_on() {
    use e2e::load::{Caller, Load, Target};
    let setup = Setup::new(None).await;
    let store = setup.path().join("store");
    let _tmpfs = Tmpfs::mount(&store, "512k");
    let domains = "[[domains]]\nnames = [\"app.acme.test\"]\nbackend = \"{backend}\"\n";
    let mut sidecar = setup.sidecar("sidecar", domains);
    let issued = sidecar
        .wait("issuance", Duration::from_secs(30), valid("app.acme.test"))
        .await
        .remove(0);
    let load = Load::start(
        Target::public(sidecar.inbound, "app.acme.test", &setup.root()),
        &[Caller::Fresh, Caller::H2],
        Duration::from_millis(10),
    );
    // The disk fills up.
    let before = files(&store);
    let filler = store.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        while f.write_all(&[0u8; 4096]).is_ok() {}
    }
    // The renewal is served from memory (the old certificate would do too, but the new one is
    // fresher) and says it is not stored; the store keeps the old pair, whole.
    let (ok, text) = sidecar.cli(&["renew", "app.acme.test"]);
    assert!(ok, "{text}");
    let unstored = sidecar
        .wait("a renewal on a full disk", Duration::from_secs(30), |c| {
            c[0].issued_total > issued.issued_total
        })
        .await
        .remove(0);
    assert_eq!(unstored.status, Status::Valid);
    let said = unstored.last_error.clone().unwrap_or_default();
    assert!(
        said.contains("not stored: ") && said.contains("No space left"),
        "{unstored:?}"
    );
    let mut after = files(&store);
    after.remove(&filler);
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>(),
        "files appeared or went (a temporary file left behind?)"
    );
    assert!(after == before, "a stored file changed on a full disk");
    let (_, served) = fetch(sidecar.inbound, "app.acme.test", &setup.root())
        .await
        .unwrap();

    // Space again: the next renewal goes through.
    std::fs::remove_file(&filler).unwrap();
    let (ok, text) = sidecar.cli(&["renew", "app.acme.test"]);
    assert!(ok, "{text}");
    sidecar
        .wait("a renewal with space", Duration::from_secs(30), |c| {
            c[0].status == Status::Valid && c[0].issued_total > issued.issued_total
        })
        .await;
    let (status, now_served) = fetch(sidecar.inbound, "app.acme.test", &setup.root())
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_ne!(now_served, served);
    assert_ne!(files(&store), before, "nothing stored with space again");
    assert!(sidecar.cert("app.acme.test").await.last_error.is_none());
    let (ok_n, failed_n) = load.finish().await;
    eprintln!("full disk: {said}; {ok_n} requests, {failed_n} failed");
    assert_eq!(failed_n, 0);
}
