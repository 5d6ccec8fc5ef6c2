//! Public domains in-process: SNI routing next to the mesh on one port, `http` and `tcp`
//! modes, the internal CA, renewal under load, restarts and a corrupt store. The ACME flows
//! against a real CA (pebble) are in `tests/tests/acme.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::HashMap, path::Path, time::Duration};

use dstack_mesh::{acme::Status, app::App, config::Config};
use e2e::{
    backend::Backend,
    client::{public_connect, MeshClient},
    identity,
};
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SERVER: &str = "5e77e75e77e75e77e75e77e75e77e75e77e75e77";
const CALLER: &str = "ca11e7ca11e7ca11e7ca11e7ca11e7ca11e7ca11";
const H2_H1: &[&[u8]] = &[b"h2", b"http/1.1"];

/// A TCP echo server (the `tcp` mode backend).
async fn echo_server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

struct Site {
    app: App,
    backend: Backend,
    caller: ratls::identity::RotatingIdentity,
    agents: Vec<tokio::task::JoinHandle<()>>,
    _sockets: tempfile::TempDir,
}

impl Drop for Site {
    fn drop(&mut self) {
        for agent in &self.agents {
            agent.abort();
        }
    }
}

/// The configuration [`start`] runs (`{backend}` in `domains` stands for `backend`).
fn site_config(
    dir: &Path,
    backend: std::net::SocketAddr,
    domains: &str,
    acme_extra: &str,
) -> Config {
    let text = format!(
        "[inbound]\nlisten = \"127.0.0.1:0\"\nbackend = \"{backend}\"\nallowed_apps = \"{CALLER}\"\n\
         [auth]\nenabled = false\n[admin]\nlisten = \"127.0.0.1:0\"\n[client]\nenabled = false\n\
         [acme]\nstore = \"{store}\"\nissuer = \"internal-ca\"\nretry_min = \"1s\"\n{acme_extra}\n{domains}",
        store = dir.join("store").display(),
    )
    .replace("{backend}", &backend.to_string());
    Config::from_toml(&text, &HashMap::<&str, &str>::new()).unwrap()
}

/// A sidecar with `domains` (`{backend}` stands for the test backend's address).
async fn start(dir: &Path, domains: &str, acme_extra: &str) -> Site {
    let state = dir.join("state");
    // Sockets apart for each start (a restart runs new agents); the CA state is shared.
    let sockets = tempfile::tempdir_in(dir).unwrap();
    let (server, a1) = identity(sockets.path(), &state, SERVER).await;
    let (caller, a2) = identity(sockets.path(), &state, CALLER).await;
    let backend = Backend::start().await;
    let config = site_config(dir, backend.addr, domains, acme_extra);
    let app = App::start_with(config, server).await.unwrap();
    Site {
        app,
        backend,
        caller,
        agents: vec![a1, a2],
        _sockets: sockets,
    }
}

fn status_of(app: &App, domain: &str) -> dstack_mesh::acme::CertStatus {
    app.acme
        .as_ref()
        .unwrap()
        .status()
        .into_iter()
        .find(|s| s.domain == domain)
        .unwrap()
}

/// Wait until `domain` has a valid certificate.
async fn wait_valid(app: &App, domain: &str) {
    wait_for(&format!("{domain} to be valid"), || {
        status_of(app, domain).status == Status::Valid
    })
    .await;
}

/// HTTP over TLS to `name` at `addr`, as a browser would (see [`public_connect`]).
async fn https(addr: std::net::SocketAddr, name: &str, root: &[u8], alpn: &[&[u8]]) -> MeshClient {
    MeshClient::over(public_connect(addr, name, root, alpn).await.unwrap())
        .await
        .unwrap()
}

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..500 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

fn internal_root(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("store/internal-ca/ca.pem")).unwrap()
}

async fn admin_get(app: &App, path: &str) -> (StatusCode, serde_json::Value) {
    let addr = app.addr("admin").unwrap().to_string();
    let (status, body) = dstack_mesh::status::request(&addr, http::Method::GET, path)
        .await
        .unwrap();
    (status, serde_json::from_slice(&body).unwrap())
}

#[tokio::test]
async fn domains_share_the_mesh_port_by_sni() {
    let dir = tempfile::tempdir().unwrap();
    let echo = echo_server().await;
    let site = start(
        dir.path(),
        &format!(
            "[[domains]]\nnames = [\"web.example.test\", \"www.example.test\"]\nbackend = \"{{backend}}\"\n\
             [[domains]]\nnames = [\"raw.example.test\"]\nbackend = \"{echo}\"\nmode = \"tcp\"\n\
             [[domains]]\nnames = [\"down.example.test\"]\nbackend = \"127.0.0.1:9\"\nissuer = \"https://127.0.0.1:9/directory\"\n\
             [[domains]]\nnames = [\"*.wild.example.test\"]\nbackend = \"{echo}\"\nmode = \"tcp\"\n"
        ),
        "",
    )
    .await;
    let app = &site.app;
    let addr = app.addr("inbound").unwrap();
    wait_for("web and raw to be valid", || {
        status_of(app, "web.example.test").status == Status::Valid
            && status_of(app, "raw.example.test").status == Status::Valid
    })
    .await;
    let root = internal_root(dir.path());

    // tcp mode: any protocol, spliced after TLS.
    let mut tls = public_connect(addr, "raw.example.test", &root, &[])
        .await
        .unwrap();
    tls.write_all(b"ping over tls").await.unwrap();
    let mut got = [0u8; 13];
    tls.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"ping over tls");

    // A wildcard covers one label, no more.
    wait_valid(app, "*.wild.example.test").await;
    public_connect(addr, "a.wild.example.test", &root, &[])
        .await
        .unwrap();
    assert!(public_connect(addr, "a.b.wild.example.test", &root, &[])
        .await
        .is_err());

    // No certificate yet (its CA is down): a TLS alert, never another certificate.
    let err = public_connect(addr, "down.example.test", &root, H2_H1)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("alert"), "{err}");
    wait_for("the down domain to fail", || {
        status_of(app, "down.example.test").status == Status::Failed
    })
    .await;
    let down = status_of(app, "down.example.test");
    assert!(
        down.last_error
            .as_deref()
            .unwrap()
            .contains("CA unreachable"),
        "{down:?}"
    );
    assert!(down.next_attempt.is_some());

    // The mesh still works on the same port.
    let mut mesh = MeshClient::connect(&site.caller, &SERVER.parse().unwrap(), addr, None)
        .await
        .unwrap();
    let (status, _, _) = mesh.get("/hello", &[]).await.unwrap();
    assert_eq!(status, StatusCode::OK);

    // Admin: certs and readiness.
    let (status, certs) = admin_get(app, "/certs").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(certs.as_array().unwrap().len(), 4);
    // Routes: what the running listener serves, the same domain state as /certs.
    let (status, routes) = admin_get(app, "/routes").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(routes["identity"]["app_id"], SERVER);
    assert_eq!(routes["mesh"]["backend"], site.backend.addr.to_string());
    assert_eq!(routes["mesh"]["allowed_apps"]["apps"][0], CALLER);
    let names = |v: &serde_json::Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|d| d["domain"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&routes["domains"]), names(&certs));
    // Certificate and order series per domain.
    let admin = app.addr("admin").unwrap().to_string();
    let (_, body) = dstack_mesh::status::request(&admin, http::Method::GET, "/metrics")
        .await
        .unwrap();
    let metrics = String::from_utf8_lossy(&body);
    for line in [
        "dstack_mesh_acme_orders_total{domain=\"web.example.test\",issuer=\"internal-ca\",result=\"valid\"} 1",
        "dstack_mesh_certificate_expiration_timestamp_seconds{domain=\"web.example.test\",issuer=\"internal-ca\"} ",
        "dstack_mesh_certificate_ready_status{domain=\"down.example.test\",issuer=\"https://127.0.0.1:9/directory\"} 0",
    ] {
        assert!(metrics.contains(line), "{line}\n{metrics}");
    }
    assert!(!metrics.contains("domain=\"down.example.test\",issuer=\"https://127.0.0.1:9/directory\",result=\"failed\"} 0"), "{metrics}");
    let (status, ready) = admin_get(app, "/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        ready["problems"][0]
            .as_str()
            .unwrap()
            .contains("down.example.test: no certificate"),
        "{ready}"
    );
    let table = dstack_mesh::status::table(
        &app.acme.as_ref().unwrap().status(),
        std::time::SystemTime::now(),
    );
    assert!(
        table.contains("web.example.test")
            && table.contains("valid")
            && table.contains("internal-ca"),
        "{table}"
    );
    assert!(
        table.contains("down.example.test")
            && table.contains("failed")
            && table.contains("CA unreachable"),
        "{table}"
    );
}

#[tokio::test]
async fn http_mode_forwards_with_x_forwarded_headers() {
    let dir = tempfile::tempdir().unwrap();
    let site = start(
        dir.path(),
        "[[domains]]\nnames = [\"web.example.test\", \"www.example.test\"]\nbackend = \"{backend}\"\n",
        "",
    )
    .await;
    let backend = &site.backend;
    let app = &site.app;
    let addr = app.addr("inbound").unwrap();
    wait_valid(app, "web.example.test").await;
    let root = internal_root(dir.path());
    for alpn in [H2_H1, &[b"http/1.1".as_slice()][..]] {
        // No client certificate was asked for; the domain's own certificate was served.
        let mut client = https(addr, "www.example.test", &root, alpn).await;
        assert_eq!(client.is_h2(), alpn.len() == 2);
        let (status, _, body) = client
            .get_from(
                "www.example.test",
                "/page?q=1",
                &[
                    ("x-forwarded-for", "6.6.6.6"),
                    ("x-forwarded-host", "evil.example"),
                    ("x-dstack-app-id", CALLER),
                ],
            )
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
        let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let headers = &seen["headers"];
        assert_eq!(seen["path"], "/page?q=1");
        assert_eq!(
            headers["x-forwarded-for"],
            serde_json::json!(["127.0.0.1"]),
            "{headers}"
        );
        assert_eq!(headers["x-forwarded-proto"], serde_json::json!(["https"]));
        assert_eq!(
            headers["x-forwarded-host"],
            serde_json::json!(["www.example.test"])
        );
        assert!(headers.get("x-dstack-app-id").is_none(), "{headers}");
    }
    assert_eq!(backend.count(), 2);
}

#[tokio::test]
async fn renewal_under_load_fails_no_request() {
    let dir = tempfile::tempdir().unwrap();
    // Six-second certificates: renewed when a third of the lifetime remains.
    let site = start(
        dir.path(),
        "[[domains]]\nnames = [\"web.example.test\"]\nbackend = \"{backend}\"\n",
        "internal_ca_lifetime = \"6s\"\n",
    )
    .await;
    let backend = &site.backend;
    let app = &site.app;
    let addr = app.addr("inbound").unwrap();
    wait_valid(app, "web.example.test").await;
    let first = status_of(app, "web.example.test").serial.unwrap();
    let root = internal_root(dir.path());
    // One long-lived connection and a new connection per round, for ten seconds.
    let mut kept = https(addr, "web.example.test", &root, H2_H1).await;
    let (mut ok, mut serials) = (0, std::collections::BTreeSet::new());
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < end {
        let (status, _, _) = kept
            .get_from("web.example.test", "/kept", &[])
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
        let tls = public_connect(addr, "web.example.test", &root, H2_H1)
            .await
            .expect("a new connection during renewal");
        let serial = {
            let cert = &tls.get_ref().1.peer_certificates().unwrap()[0];
            let (_, parsed) = x509_parser::parse_x509_certificate(cert).unwrap();
            parsed.raw_serial_as_string()
        };
        serials.insert(serial);
        let mut fresh = MeshClient::over(tls).await.unwrap();
        let (status, _, _) = fresh
            .get_from("web.example.test", "/new", &[])
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
        ok += 2;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let now = status_of(app, "web.example.test");
    assert!(now.issued_total >= 3, "{now:?}");
    assert_ne!(now.serial.unwrap(), first);
    assert!(serials.len() >= 2, "clients saw {serials:?}");
    assert_eq!(backend.count(), ok);
}

#[tokio::test]
async fn restart_serves_the_stored_certificate_and_bad_files_are_reissued() {
    let dir = tempfile::tempdir().unwrap();
    let domains = "[[domains]]\nnames = [\"a.example.test\"]\nbackend = \"{backend}\"\n\
         [[domains]]\nnames = [\"b.example.test\"]\nbackend = \"{backend}\"\n\
         [[domains]]\nnames = [\"c.example.test\"]\nbackend = \"{backend}\"\n\
         [[domains]]\nnames = [\"d.example.test\"]\nbackend = \"{backend}\"\n";
    let site = start(dir.path(), domains, "").await;
    for d in ["a", "b", "c", "d"] {
        wait_valid(&site.app, &format!("{d}.example.test")).await;
    }
    let serial = |app: &App, d: &str| status_of(app, &format!("{d}.example.test")).serial.unwrap();
    let before: Vec<String> = ["a", "b", "c", "d"]
        .iter()
        .map(|d| serial(&site.app, d))
        .collect();
    drop(site);

    // Damage three of them: garbage PEM, a certificate without its key, another domain's key.
    let certs = dir.path().join("store/certs");
    std::fs::write(
        certs.join("b.example.test/chain.pem"),
        b"-----BEGIN CERTIFICATE-----\ngarbage\n",
    )
    .unwrap();
    std::fs::remove_file(certs.join("c.example.test/key.pem")).unwrap();
    std::fs::copy(
        certs.join("a.example.test/key.pem"),
        certs.join("d.example.test/key.pem"),
    )
    .unwrap();
    let key_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(certs.join("a.example.test/key.pem"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(key_mode & 0o777, 0o600);

    let site = start(dir.path(), domains, "").await;
    // Served from the store at once: no order for a.
    let a = status_of(&site.app, "a.example.test");
    assert_eq!(a.serial.as_deref(), Some(before[0].as_str()));
    assert_eq!(a.issued_total, 0);
    for (i, d) in ["b", "c", "d"].iter().enumerate() {
        let name = format!("{d}.example.test");
        wait_valid(&site.app, &name).await;
        let now = status_of(&site.app, &name);
        assert_ne!(
            now.serial.as_deref(),
            Some(before[i + 1].as_str()),
            "{name} was served from a bad store"
        );
        assert_eq!(now.issued_total, 1, "{now:?}");
    }
    assert!(certs.join("b.example.test/chain.pem.corrupt").exists());
    assert!(certs.join("d.example.test/key.pem.corrupt").exists());
    let root = internal_root(dir.path());
    let addr = site.app.addr("inbound").unwrap();
    let mut client = https(addr, "d.example.test", &root, H2_H1).await;
    let (status, _, _) = client.get_from("d.example.test", "/", &[]).await.unwrap();
    assert_eq!(status, StatusCode::OK);
}

/// A stand-in ACME CA answering the way a broken or busy one does: `broken` answers every
/// request with an HTML 500 (a proxy error page); otherwise the directory and nonces work and
/// every signed request gets RFC 8555's `rateLimited` problem with HTTP 429.
async fn fake_ca(broken: bool) -> std::net::SocketAddr {
    use http_body_util::Full;
    use hyper::{body::Incoming, service::service_fn, Request, Response};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let base = format!("http://{addr}");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let base = base.clone();
            let service = service_fn(move |req: Request<Incoming>| {
                let base = base.clone();
                async move {
                    let resp = if broken {
                        Response::builder()
                            .status(500)
                            .header("content-type", "text/html")
                            .body(Full::new(bytes::Bytes::from("<html>upstream error</html>")))
                    } else {
                        match req.uri().path() {
                            "/dir" => Response::builder()
                                .header("content-type", "application/json")
                                .body(Full::new(bytes::Bytes::from(
                                    serde_json::json!({
                                        "newNonce": format!("{base}/nonce"),
                                        "newAccount": format!("{base}/account"),
                                        "newOrder": format!("{base}/order"),
                                        "revokeCert": format!("{base}/revoke"),
                                        "keyChange": format!("{base}/key"),
                                    })
                                    .to_string(),
                                ))),
                            "/nonce" => Response::builder()
                                .header("replay-nonce", "bm9uY2U")
                                .header("cache-control", "no-store")
                                .body(Full::new(bytes::Bytes::new())),
                            _ => Response::builder()
                                .status(429)
                                .header("content-type", "application/problem+json")
                                .header("replay-nonce", "bm9uY2U")
                                .header("retry-after", "3600")
                                .body(Full::new(bytes::Bytes::from(
                                    serde_json::json!({
                                        "type": "urn:ietf:params:acme:error:rateLimited",
                                        "detail": "too many new accounts from this address",
                                        "status": 429,
                                    })
                                    .to_string(),
                                ))),
                        }
                    };
                    Ok::<_, std::convert::Infallible>(resp.unwrap())
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service),
            );
        }
    });
    addr
}

#[tokio::test]
async fn ca_errors_and_rate_limits_fail_one_domain_only() {
    let dir = tempfile::tempdir().unwrap();
    let broken = fake_ca(true).await;
    let limited = fake_ca(false).await;
    let site = start(
        dir.path(),
        &format!(
            "[[domains]]\nnames = [\"err.example.test\"]\nbackend = \"{{backend}}\"\nissuer = \"http://{broken}/dir\"\n\
             [[domains]]\nnames = [\"limited.example.test\"]\nbackend = \"{{backend}}\"\nissuer = \"http://{limited}/dir\"\n\
             [[domains]]\nnames = [\"ok.example.test\"]\nbackend = \"{{backend}}\"\n"
        ),
        "",
    )
    .await;
    let app = &site.app;
    wait_for("both CAs to fail", || {
        status_of(app, "err.example.test").status == Status::Failed
            && status_of(app, "limited.example.test").status == Status::Failed
    })
    .await;
    let err = status_of(app, "err.example.test");
    let message = err.last_error.clone().unwrap();
    assert!(
        message.starts_with("CA error:") && message.contains("not ACME"),
        "{message}"
    );
    let limited_status = status_of(app, "limited.example.test");
    let message = limited_status.last_error.clone().unwrap();
    assert!(
        message.starts_with("rate limited by the CA") && message.contains("too many new accounts"),
        "{message}"
    );
    // A rate limit waits longer than a plain failure before trying again.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        limited_status.next_attempt.unwrap() >= now + 3,
        "{limited_status:?}"
    );

    // The other domain and the mesh are unaffected.
    assert_eq!(status_of(app, "ok.example.test").status, Status::Valid);
    let root = internal_root(dir.path());
    let addr = app.addr("inbound").unwrap();
    let mut client = https(addr, "ok.example.test", &root, H2_H1).await;
    let (status, _, _) = client.get_from("ok.example.test", "/", &[]).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let mut mesh = MeshClient::connect(&site.caller, &SERVER.parse().unwrap(), addr, None)
        .await
        .unwrap();
    assert_eq!(mesh.get("/", &[]).await.unwrap().0, StatusCode::OK);

    // It keeps retrying with backoff: the broken CA's domain fails again within seconds.
    wait_for("a second attempt", || {
        status_of(app, "err.example.test").consecutive_failures >= 2
    })
    .await;
    assert_eq!(
        status_of(app, "limited.example.test").consecutive_failures,
        1
    );
}

/// `dstack-mesh evidence verify ARGS`: success and what it printed.
async fn verify(args: Vec<String>) -> (bool, String) {
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_dstack-mesh"))
            .args(["evidence", "verify"])
            .args(&args)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evidence_is_served_on_the_domain_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let site = start(
        dir.path(),
        "[[domains]]\nnames = [\"web.example.test\"]\nbackend = \"{backend}\"\n",
        "",
    )
    .await;
    let app = &site.app;
    let addr = app.addr("inbound").unwrap();
    wait_valid(app, "web.example.test").await;
    let root = internal_root(dir.path());
    let files = [
        "acme-account.json",
        "cert-web.example.test.pem",
        "sha256sum.txt",
        "quote.json",
    ];

    // The listing, over the public domain, names the four files; the backend never sees it.
    let mut client = https(addr, "web.example.test", &root, H2_H1).await;
    // Written right after the certificate is served, so it may trail the status by a moment.
    let mut page = String::new();
    for _ in 0..250 {
        let (status, _, body) = client
            .get_from("web.example.test", "/evidences/", &[])
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
        page = String::from_utf8_lossy(&body).into_owned();
        if page.contains("quote.json") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for f in files {
        assert!(page.contains(&format!("href=\"{f}\"")), "{page}");
    }
    // The admin port lists the same files.
    let admin = app.addr("admin").unwrap().to_string();
    let (status, listing) = dstack_mesh::status::request(&admin, http::Method::GET, "/evidences/")
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let listing = String::from_utf8_lossy(&listing);
    assert!(files.iter().all(|f| listing.contains(f)), "{listing}");
    let (status, _, _) = client
        .get_from(
            "web.example.test",
            "/evidences/../store/internal-ca/ca-key.pem",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(site.backend.count(), 0);

    // verify, over HTTPS as a user would, and on a copy whose certificate was altered.
    let url = format!("https://web.example.test:{}/evidences/", addr.port());
    let ca = dir
        .path()
        .join("store/internal-ca/ca.pem")
        .display()
        .to_string();
    let (ok, text) = verify(vec![
        url,
        "--ca".into(),
        ca,
        "--connect-to".into(),
        addr.to_string(),
    ])
    .await;
    assert!(ok, "{text}");
    assert!(
        text.contains(
            "ok           quote.json: the quote's report data is the SHA-256 of sha256sum.txt"
        ),
        "{text}"
    );
    assert!(
        text.contains("not checked  the quote carries no signature"),
        "{text}"
    );
    let copy = dir.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    for f in files {
        let (status, _, body) = client
            .get_from("web.example.test", &format!("/evidences/{f}"), &[])
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK, "{f}");
        std::fs::write(copy.join(f), &body).unwrap();
    }
    let (ok, text) = verify(vec![copy.display().to_string()]).await;
    assert!(ok, "{text}");
    let cert = copy.join("cert-web.example.test.pem");
    let mut pem = std::fs::read(&cert).unwrap();
    pem.extend_from_slice(b"\n");
    std::fs::write(&cert, pem).unwrap();
    let (ok, text) = verify(vec![copy.display().to_string()]).await;
    assert!(!ok, "{text}");
    assert!(
        text.contains("FAILED       cert-web.example.test.pem: SHA-256 differs from sha256sum.txt"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_gets_the_post_quantum_hybrid_and_openssl_without_ml_kem_gets_x25519() {
    let dir = tempfile::tempdir().unwrap();
    let site = start(
        dir.path(),
        "[[domains]]\nnames = [\"web.example.test\"]\nbackend = \"{backend}\"\n",
        "",
    )
    .await;
    let app = &site.app;
    wait_valid(app, "web.example.test").await;
    let port = app.addr("inbound").unwrap().port();

    // Chromium as a visitor: the name mapped to the listener (the internal CA is not in its
    // store, so certificate errors are waved through; the key exchange is what is looked at).
    let profile = dir.path().join("chromium");
    let url = format!("https://web.example.test:{port}/from-chromium");
    let dom = tokio::task::spawn_blocking(move || {
        e2e::chromium::dump_dom_with(
            &profile,
            &url,
            &[
                "--host-resolver-rules=MAP web.example.test 127.0.0.1",
                "--ignore-certificate-errors",
            ],
        )
    })
    .await
    .unwrap();
    assert!(dom.contains("/from-chromium"), "{dom}");

    // Debian 12's OpenSSL 3.0 has no ML-KEM: it offers X25519 and gets it.
    let out = tokio::process::Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-servername", "web.example.test", "-tls1_3"])
        .stdin(std::process::Stdio::null())
        .output();
    let out = tokio::time::timeout(Duration::from_secs(20), out)
        .await
        .unwrap()
        .expect("openssl is installed by scripts/setup-test-deps");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("Server Temp Key: X25519"), "{stdout}");

    let admin = app.addr("admin").unwrap().to_string();
    let (_, body) = dstack_mesh::status::request(&admin, http::Method::GET, "/metrics")
        .await
        .unwrap();
    let metrics = String::from_utf8_lossy(&body);
    assert!(
        metrics.contains(
            "dstack_mesh_tls_handshakes_total{side=\"public\",group=\"X25519MLKEM768\"} "
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("dstack_mesh_tls_handshakes_total{side=\"public\",group=\"x25519\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_renders_routes_and_pills_in_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let site = start(
        dir.path(),
        "[[domains]]\nnames = [\"web.example.test\", \"www.example.test\"]\nbackend = \"{backend}\"\n\
         [[domains]]\nnames = [\"down.example.test\"]\nbackend = \"127.0.0.1:9\"\nissuer = \"https://127.0.0.1:9/directory\"\n",
        "",
    )
    .await;
    let app = &site.app;
    wait_valid(app, "web.example.test").await;
    wait_for("the down domain to fail", || {
        status_of(app, "down.example.test").status == Status::Failed
    })
    .await;
    let url = format!("http://{}/", app.addr("admin").unwrap());
    let profile = dir.path().join("chromium");
    let (dom, shots) = {
        let (url, profile) = (url.clone(), profile.clone());
        tokio::task::spawn_blocking(move || {
            let dom = e2e::chromium::dump_dom(&profile, &url);
            // Into the test output (target/tmp), for a person to look at.
            let out = Path::new(env!("CARGO_TARGET_TMPDIR"));
            let shots = [
                (out.join("status-page.png"), (1200, 700)),
                (out.join("status-page-phone.png"), (390, 844)),
            ];
            for (path, size) in &shots {
                e2e::chromium::screenshot(&profile, &url, path, *size);
            }
            (dom, shots)
        })
        .await
        .unwrap()
    };
    // One row per domain, with its pill; the failed one carries the CA's message.
    let row = |domain: &str| {
        let start = dom
            .find(&format!("data-domain=\"{domain}\""))
            .unwrap_or_else(|| panic!("no row for {domain}: {dom}"));
        let end = dom[start..].find("</tr>").unwrap() + start;
        dom[start..end].to_owned()
    };
    let web = row("web.example.test");
    assert!(
        web.contains("<span class=\"pill pill-valid\">valid</span>"),
        "{web}"
    );
    assert!(
        web.contains("internal-ca") && web.contains("www.example.test"),
        "{web}"
    );
    let down = row("down.example.test");
    assert!(
        down.contains("<span class=\"pill pill-failed\">failed</span>"),
        "{down}"
    );
    assert!(down.contains("CA unreachable"), "{down}");
    assert!(dom.contains(SERVER), "the identity is shown");
    assert!(
        dom.contains(&site.backend.addr.to_string()),
        "the mesh route is shown"
    );
    for (path, _) in &shots {
        assert!(
            std::fs::metadata(path).unwrap().len() > 10_000,
            "{}",
            path.display()
        );
    }

    // `dstack-mesh status` prints the same in a terminal.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_dstack-mesh"))
        .args(["status", "--admin"])
        .arg(app.addr("admin").unwrap().to_string())
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(SERVER) && text.contains(&site.backend.addr.to_string()),
        "{text}"
    );
    let line = |d: &str| {
        text.lines()
            .find(|l| l.starts_with(d))
            .unwrap_or_default()
            .to_owned()
    };
    assert!(line("web.example.test").contains("valid"), "{text}");
    assert!(
        line("down.example.test").contains("failed")
            && line("down.example.test").contains("CA unreachable"),
        "{text}"
    );
}

#[tokio::test]
async fn a_reload_adds_and_removes_domains_without_dropping_connections() {
    let dir = tempfile::tempdir().unwrap();
    let web = "[[domains]]\nnames = [\"web.example.test\"]\nbackend = \"{backend}\"\n";
    let new = "[[domains]]\nnames = [\"new.example.test\"]\nbackend = \"{backend}\"\n";
    let mut site = start(dir.path(), web, "").await;
    wait_valid(&site.app, "web.example.test").await;
    let addr = site.app.addr("inbound").unwrap();
    let root = internal_root(dir.path());
    let mut kept = https(addr, "web.example.test", &root, H2_H1).await;
    assert_eq!(get(&mut kept, "web.example.test").await, StatusCode::OK);
    let serial = status_of(&site.app, "web.example.test").serial;

    // Added: issued and served; the stored one is served again, not reissued.
    let both = site_config(dir.path(), site.backend.addr, &format!("{web}{new}"), "");
    let report = site.app.reload(both).unwrap();
    assert_eq!(report.applied, ["domains"], "{report:?}");
    assert!(report.needs_restart.is_empty(), "{report:?}");
    wait_valid(&site.app, "new.example.test").await;
    assert_eq!(status_of(&site.app, "web.example.test").serial, serial);
    let mut fresh = https(addr, "new.example.test", &root, H2_H1).await;
    assert_eq!(get(&mut fresh, "new.example.test").await, StatusCode::OK);
    assert_eq!(get(&mut kept, "web.example.test").await, StatusCode::OK);
    let admin = site.app.addr("admin").unwrap().to_string();
    let (_, certs) = dstack_mesh::status::request(&admin, http::Method::GET, "/certs")
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&certs).contains("new.example.test"));

    // Removed: the name is not served any more (an unknown name gets the mesh's own
    // certificate, which no browser trusts); the connection opened before keeps working.
    let only_new = site_config(dir.path(), site.backend.addr, new, "");
    site.app.reload(only_new).unwrap();
    assert!(public_connect(addr, "web.example.test", &root, H2_H1)
        .await
        .is_err());
    assert_eq!(get(&mut kept, "web.example.test").await, StatusCode::OK);
    assert_eq!(get(&mut fresh, "new.example.test").await, StatusCode::OK);
}

async fn get(client: &mut MeshClient, host: &str) -> StatusCode {
    client.get_from(host, "/", &[]).await.unwrap().0
}

/// A tcp-mode backend that reads the PROXY header the sidecar sends and answers the client
/// address it names, then echoes.
async fn proxy_reading_server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                use dstack_mesh::inbound::proxy_protocol::{read, Accept};
                let client = read(&mut tcp, Accept::V2).await;
                let answer = match client {
                    Ok(Some(a)) => format!("{a}\n"),
                    other => format!("{other:?}\n"),
                };
                let _ = tcp.write_all(answer.as_bytes()).await;
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn tcp_mode_can_send_the_backend_a_proxy_header_with_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let backend = proxy_reading_server().await;
    let site = start(
        dir.path(),
        &format!(
            "[[domains]]\nnames = [\"pp.example.test\"]\nbackend = \"{backend}\"\nmode = \"tcp\"\nsend_proxy_protocol = true\n"
        ),
        "",
    )
    .await;
    let addr = site.app.addr("inbound").unwrap();
    wait_valid(&site.app, "pp.example.test").await;
    let root = internal_root(dir.path());
    let mut tls = public_connect(addr, "pp.example.test", &root, &[])
        .await
        .unwrap();
    let client = tls.get_ref().0.local_addr().unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        tls.read_exact(&mut byte).await.unwrap();
        line.push(byte[0]);
    }
    assert_eq!(String::from_utf8_lossy(&line).trim(), client.to_string());
    // The stream after the header is the client's own.
    tls.write_all(b"after the header").await.unwrap();
    let mut got = [0u8; 16];
    tls.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"after the header");
}

#[tokio::test]
async fn a_domain_with_hsts_and_added_headers_sets_them_and_others_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let site = start(
        dir.path(),
        "[[domains]]\nnames = [\"strict.example.test\"]\nbackend = \"{backend}\"\nhsts = \"max-age=31536000; includeSubDomains\"\n\
         [domains.response_headers]\nX-Content-Type-Options = \"nosniff\"\nReferrer-Policy = \"no-referrer\"\n\
         [[domains]]\nnames = [\"plain.example.test\"]\nbackend = \"{backend}\"\n",
        "",
    )
    .await;
    let addr = site.app.addr("inbound").unwrap();
    wait_valid(&site.app, "strict.example.test").await;
    wait_valid(&site.app, "plain.example.test").await;
    let root = internal_root(dir.path());
    for alpn in [H2_H1, &[b"http/1.1".as_slice()][..]] {
        for (name, expected) in [
            (
                "strict.example.test",
                Some("max-age=31536000; includeSubDomains"),
            ),
            ("plain.example.test", None),
        ] {
            let mut client = https(addr, name, &root, alpn).await;
            let (status, headers, _) = client.get_from(name, "/", &[]).await.unwrap();
            assert_eq!(status, StatusCode::OK);
            let sts = headers
                .get(http::header::STRICT_TRANSPORT_SECURITY)
                .map(|v| v.to_str().unwrap());
            assert_eq!(sts, expected, "{name} over {alpn:?}");
            let added = ["x-content-type-options", "referrer-policy"]
                .map(|h| headers.get(h).map(|v| v.to_str().unwrap().to_owned()));
            let want = match expected {
                Some(_) => [Some("nosniff".to_owned()), Some("no-referrer".to_owned())],
                None => [None, None],
            };
            assert_eq!(added, want, "{name} over {alpn:?}");
        }
    }
}

#[test]
fn hsts_and_added_headers_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    for domain in [
        "hsts = \"includeSubDomains\"\n",
        "hsts = \"max-age=ten\"\n",
        "mode = \"tcp\"\nhsts = \"max-age=60\"\n",
        "[domains.response_headers]\nContent-Length = \"0\"\n",
        "[domains.response_headers]\n\"bad name\" = \"x\"\n",
    ] {
        let text = format!(
            "[acme]\nstore = \"{}\"\nissuer = \"internal-ca\"\n\
             [[domains]]\nnames = [\"web.example.test\"]\nbackend = \"127.0.0.1:1\"\n{domain}",
            dir.path().display()
        );
        let err = Config::from_toml(&text, &HashMap::<&str, &str>::new()).unwrap_err();
        let field = match domain.contains("response_headers") {
            true => "domains[0].response_headers",
            false => "domains[0].hsts",
        };
        assert!(err.to_string().contains(field), "{domain}: {err}");
    }
}

#[test]
fn send_proxy_protocol_is_for_tcp_mode_only() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[acme]\nstore = \"{}\"\nissuer = \"internal-ca\"\n\
         [[domains]]\nnames = [\"web.example.test\"]\nbackend = \"127.0.0.1:1\"\nsend_proxy_protocol = true\n",
        dir.path().display()
    );
    let err = Config::from_toml(&text, &HashMap::<&str, &str>::new()).unwrap_err();
    assert!(
        err.to_string().contains("domains[0].send_proxy_protocol"),
        "{err}"
    );
    // SEND_PROXY_PROTOCOL turns it on for tcp-mode domains and leaves http-mode ones alone.
    let text = format!(
        "[acme]\nstore = \"{}\"\nissuer = \"internal-ca\"\n\
         [[domains]]\nnames = [\"web.example.test\"]\nbackend = \"127.0.0.1:1\"\n\
         [[domains]]\nnames = [\"raw.example.test\"]\nbackend = \"127.0.0.1:2\"\nmode = \"tcp\"\n",
        dir.path().display()
    );
    let env = HashMap::from([("SEND_PROXY_PROTOCOL", "true")]);
    let config = Config::from_toml(&text, &env).unwrap();
    let sends: Vec<bool> = config
        .public
        .domains
        .iter()
        .map(|d| d.send_proxy_protocol)
        .collect();
    assert_eq!(sends, [false, true]);
}

#[tokio::test]
async fn a_wildcard_routes_names_to_their_own_backends_with_the_alpn_set() {
    // dstack-ingress's variables: one wildcard certificate, a name under it routed apart,
    // HTTP/1.1 only on the wire.
    let dir = tempfile::tempdir().unwrap();
    let sockets = tempfile::tempdir_in(dir.path()).unwrap();
    let (server, agent) = identity(sockets.path(), &dir.path().join("state"), SERVER).await;
    let (web, api) = (Backend::start().await, Backend::start().await);
    let text = format!(
        "[inbound]\nlisten = \"127.0.0.1:0\"\nbackend = \"{web}\"\n[auth]\nenabled = false\n\
         [admin]\nenabled = false\n[client]\nenabled = false\n\
         [acme]\nstore = \"{store}\"\nissuer = \"internal-ca\"\n",
        web = web.addr,
        store = dir.path().join("store").display(),
    );
    let (web_addr, api_addr) = (
        web.addr.to_string(),
        format!("api.example.test={}", api.addr),
    );
    let env = HashMap::from([
        ("DOMAINS", "*.example.test"),
        ("TARGET_ENDPOINT", web_addr.as_str()),
        ("ROUTING_MAP", api_addr.as_str()),
        ("ALPN", "http/1.1"),
    ]);
    let app = App::start_with(Config::from_toml(&text, &env).unwrap(), server)
        .await
        .unwrap();
    wait_valid(&app, "*.example.test").await;
    let root = internal_root(dir.path());
    let addr = app.addr("inbound").unwrap();
    let mut client = https(addr, "api.example.test", &root, H2_H1).await;
    assert!(
        !client.is_h2(),
        "h2 offered though ALPN names HTTP/1.1 only"
    );
    let (status, _, _) = client
        .get("/", &[("host", "api.example.test")])
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (api.count(), web.count()),
        (1, 0),
        "api.example.test went to its own backend"
    );
    let mut client = https(addr, "www.example.test", &root, H2_H1).await;
    let (status, _, _) = client
        .get("/", &[("host", "www.example.test")])
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (api.count(), web.count()),
        (1, 1),
        "the rest of the wildcard went to TARGET_ENDPOINT"
    );
    agent.abort();
}

#[tokio::test]
async fn an_alias_shares_its_domains_certificate_and_route() {
    // DOMAINS with `domain=alias` (dstack-ingress's ALIAS_DOMAIN, per domain).
    let dir = tempfile::tempdir().unwrap();
    let sockets = tempfile::tempdir_in(dir.path()).unwrap();
    let (server, agent) = identity(sockets.path(), &dir.path().join("state"), SERVER).await;
    let (shop, api) = (Backend::start().await, Backend::start().await);
    let text = format!(
        "[inbound]\nlisten = \"127.0.0.1:0\"\nbackend = \"{}\"\n[auth]\nenabled = false\n\
         [admin]\nenabled = false\n[client]\nenabled = false\n\
         [acme]\nstore = \"{}\"\nissuer = \"internal-ca\"\n",
        shop.addr,
        dir.path().join("store").display(),
    );
    let domains = "shop.example.test=www.shop.example.test\napi.example.test";
    let routes = format!(
        "shop.example.test={}\napi.example.test={}",
        shop.addr, api.addr
    );
    let env = HashMap::from([("DOMAINS", domains), ("ROUTING_MAP", routes.as_str())]);
    let app = App::start_with(Config::from_toml(&text, &env).unwrap(), server)
        .await
        .unwrap();
    wait_valid(&app, "shop.example.test").await;
    let root = internal_root(dir.path());
    let addr = app.addr("inbound").unwrap();
    // The alias is a name on the shop's certificate (verified by the client) and its route.
    let mut client = https(addr, "www.shop.example.test", &root, H2_H1).await;
    let (status, _, _) = client
        .get("/", &[("host", "www.shop.example.test")])
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!((shop.count(), api.count()), (1, 0));
    let names = status_of(&app, "shop.example.test").names;
    assert_eq!(names, ["shop.example.test", "www.shop.example.test"]);
    // The evidence covers the alias: served under it, its checksummed and quoted certificate
    // names it.
    let file = dstack_mesh::acme::evidence::cert_file("shop.example.test");
    let mut sums = String::new();
    for _ in 0..250 {
        let (status, _, body) = client
            .get_from("www.shop.example.test", "/evidences/sha256sum.txt", &[])
            .await
            .unwrap();
        sums = String::from_utf8_lossy(&body).into_owned();
        if status == StatusCode::OK && sums.contains(&file) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(sums.contains(&file), "{sums}");
    let (status, _, pem) = client
        .get_from("www.shop.example.test", &format!("/evidences/{file}"), &[])
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let der = ratls::cert::parse_chain(&pem).unwrap().remove(0);
    let (_, leaf) = x509_parser::parse_x509_certificate(&der).unwrap();
    let sans: Vec<String> = leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(
        sans.iter().any(|n| n.contains("www.shop.example.test")),
        "{sans:?}"
    );
    agent.abort();
}
