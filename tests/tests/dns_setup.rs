//! `DNS_SETUP_MODE`: DNS without credentials in the CVM, as a dstack-ingress deployment sets it
//! (its environment variables), against pebble (TLS-ALPN-01) and pebble-challtestsrv's DNS.
//! The operator's side is played by a webhook receiver that checks the HMAC and the quote,
//! then creates the records through challtestsrv's API; the public's view is a DNS-over-HTTPS
//! JSON endpoint (Google's `/resolve` shape) answering from challtestsrv.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::{
    net::SocketAddr,
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use aws_lc_rs::{digest, hmac};
use dstack_mesh::acme::{
    dns01::{wire, Data, Rtype},
    CertStatus, Status,
};
use e2e::{
    backend::Backend,
    bind::{Bind, BindOptions, Tsig, Zone},
    dev_agent, free_port,
    http_stand_in::{json_response, serve},
    mesh_binary,
    pebble::{Pebble, PebbleOptions},
    start_mesh, ChildGuard,
};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

const SERVER: &str = "5e77e75e77e75e77e75e77e75e77e75e77e75e77";
const DOMAIN: &str = "app.example.test";
const GATEWAY: &str = "gw.example.net";
const TOKEN: &str = "webhook-secret";

/// A DoH JSON endpoint answering from the DNS server `dns` (challtestsrv), in the shape
/// dns.google/resolve answers: `Status`, and `Answer` entries with presentation-form `data`.
async fn doh(dns: SocketAddr) -> String {
    let addr = serve(move |req: Request<Incoming>| resolve_json(dns, req)).await;
    format!("http://{addr}/resolve")
}

/// A DoH endpoint whose cache is behind while `behind` holds: it still answers the old
/// gateway and app address for [`DOMAIN`], then answers as [`doh`] does.
async fn doh_lagging(dns: SocketAddr, behind: Arc<std::sync::atomic::AtomicBool>) -> String {
    let addr = serve(move |req: Request<Incoming>| {
        let behind = behind.load(std::sync::atomic::Ordering::SeqCst);
        async move {
            let query = req.uri().query().unwrap_or_default().to_owned();
            let stale = |t: u16, data: &str, name: &str| {
                json_response(
                    StatusCode::OK,
                    serde_json::json!({"Status": 0, "Answer": [{"name": name, "type": t, "TTL": 300, "data": data}]}),
                )
            };
            match behind {
                true if query.contains(&format!("name={DOMAIN}&type=5")) => {
                    stale(5, "old-gw.example.net.", &format!("{DOMAIN}."))
                }
                // The old gateway's address, cached with it.
                true if query.contains(&format!("name={DOMAIN}&type=1")) => {
                    stale(1, "192.0.2.1", &format!("{DOMAIN}."))
                }
                true if query.contains(&format!("name=_dstack-app-address.{DOMAIN}&type=16")) => {
                    stale(16, "\"0ld0ld:443\"", &format!("_dstack-app-address.{DOMAIN}."))
                }
                _ => resolve_json(dns, req).await,
            }
        }
    })
    .await;
    format!("http://{addr}/resolve")
}

/// One DoH JSON answer from the DNS server `dns`.
async fn resolve_json(
    dns: SocketAddr,
    req: Request<Incoming>,
) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    {
        let query: Vec<(String, String)> = req
            .uri()
            .query()
            .unwrap_or_default()
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let get = |k: &str| query.iter().find(|(q, _)| q == k).map(|(_, v)| v.clone());
        let (Some(name), Some(code)) = (get("name"), get("type")) else {
            return json_response(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": "name and type"}),
            );
        };
        let rtype = match code.as_str() {
            "1" => Rtype::A,
            "5" => Rtype::Cname,
            "16" => Rtype::Txt,
            "28" => Rtype::Aaaa,
            "257" => Rtype::Caa,
            _ => {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"error": "type"}),
                )
            }
        };
        match wire::query(dns, &name, rtype, Duration::from_secs(3)).await {
            Ok(answer) => {
                let records: Vec<serde_json::Value> = answer
                    .records
                    .iter()
                    .map(|r| {
                        let (t, data) = match &r.data {
                            Data::Txt(v) => (16, format!("\"{v}\"")),
                            Data::Cname(t) => (5, format!("{t}.")),
                            Data::Caa {
                                critical,
                                tag,
                                value,
                            } => (257, format!("{} {tag} \"{value}\"", u8::from(*critical) * 128)),
                            Data::Other(Rtype::Aaaa, v) => (28, v.clone()),
                            Data::Other(_, v) => (1, v.clone()),
                        };
                        serde_json::json!({"name": format!("{}.", r.name), "type": t, "TTL": r.ttl, "data": data})
                    })
                    .collect();
                json_response(
                    StatusCode::OK,
                    serde_json::json!({"Status": 0, "Answer": records}),
                )
            }
            Err(_) => json_response(StatusCode::OK, serde_json::json!({"Status": 2})),
        }
    }
}

/// What the receiver saw.
#[derive(Default)]
struct Received {
    posts: usize,
    records: Vec<serde_json::Value>,
    /// Each post's `challenge` and records, in order.
    payloads: Vec<serde_json::Value>,
    problems: Vec<String>,
}

/// What the operator's webhook does with a post it checked.
#[derive(Clone, Copy, PartialEq)]
enum Hook {
    /// Makes the records and answers 200.
    Creates,
    /// Answers 500, makes nothing.
    Fails,
    /// Answers nothing for this long, makes nothing.
    Stalls(Duration),
}

/// The operator's webhook: checks the HMAC and that the quote's report data is the payload's
/// SHA-256, then does as `hook` says (makes the records through challtestsrv's API, fails,
/// or stalls).
async fn receiver(challtestsrv: String, hook: Hook) -> (String, Arc<Mutex<Received>>) {
    let seen = Arc::new(Mutex::new(Received::default()));
    let state = seen.clone();
    let addr = serve(move |req: Request<Incoming>| {
        let (seen, challtestsrv) = (state.clone(), challtestsrv.clone());
        async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let envelope: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let payload = envelope["payload"].as_str().unwrap_or_default().to_owned();
            let mut problems = Vec::new();
            let key = hmac::Key::new(hmac::HMAC_SHA256, TOKEN.as_bytes());
            let mac = hex::decode(envelope["hmac_sha256"].as_str().unwrap_or_default())
                .unwrap_or_default();
            if hmac::verify(&key, payload.as_bytes(), &mac).is_err() {
                problems.push("HMAC does not verify".to_owned());
            }
            let sha = hex::encode(digest::digest(&digest::SHA256, payload.as_bytes()));
            if envelope["attestation"]["report_data"] != sha {
                problems.push(format!("report_data {}", envelope["attestation"]["report_data"]));
            }
            // The quote itself carries it: bytes 568..600 of a TDX v4 quote.
            let quote = hex::decode(envelope["attestation"]["quote"].as_str().unwrap_or_default())
                .unwrap_or_default();
            if quote.get(568..600).map(hex::encode) != Some(sha.clone()) {
                problems.push("the quote's report data is not the payload's SHA-256".into());
            }
            let payload: serde_json::Value = serde_json::from_str(&payload).unwrap();
            let records = payload["records"].as_array().cloned().unwrap_or_default();
            {
                let mut s = seen.lock().unwrap();
                s.posts += 1;
                s.records = records.clone();
                s.payloads.push(payload.clone());
                s.problems.extend(problems);
            }
            if let Hook::Stalls(time) = hook {
                tokio::time::sleep(time).await;
            }
            if hook != Hook::Creates {
                return json_response(StatusCode::INTERNAL_SERVER_ERROR, serde_json::json!({"error": "down"}));
            }
            for r in &records {
                let (name, value) = (r["name"].as_str().unwrap(), r["value"].as_str().unwrap());
                let (path, body) = match r["type"].as_str().unwrap() {
                    "CNAME" => ("/set-cname", serde_json::json!({"host": format!("{name}."), "target": format!("{value}.")})),
                    "TXT" => ("/set-txt", serde_json::json!({"host": format!("{name}."), "value": value})),
                    other => panic!("unexpected record type {other}"),
                };
                let base = challtestsrv.clone();
                let reply = tokio::task::spawn_blocking(move || {
                    e2e::pebble::post_json(&base, path, &body).map(|r| r.status)
                })
                .await
                .unwrap();
                assert_eq!(reply.unwrap(), 200, "{path}");
            }
            json_response(StatusCode::OK, serde_json::json!({"ok": true}))
        }
    })
    .await;
    (format!("http://{addr}/dns-hook"), seen)
}

/// pebble, a dev agent, and `dstack-mesh run` configured the dstack-ingress way.
struct Deployment {
    dir: tempfile::TempDir,
    pebble: Pebble,
    _agent: ChildGuard,
    socket: std::path::PathBuf,
    inbound_port: u16,
    backend: Backend,
}

impl Deployment {
    async fn start() -> Self {
        Self::resolving_with(tempfile::tempdir().unwrap(), None).await
    }

    /// pebble resolving with `dns` (default: challtestsrv), in `dir`.
    async fn resolving_with(dir: tempfile::TempDir, dns: Option<SocketAddr>) -> Self {
        let inbound_port = free_port();
        let pebble_dir = dir.path().join("pebble");
        let pebble = tokio::task::spawn_blocking(move || {
            Pebble::start(
                &pebble_dir,
                PebbleOptions {
                    tls_port: inbound_port,
                    http_port: free_port(),
                    validity: None,
                    env: Vec::new(),
                    eab_keys: Vec::new(),
                    dns_server: dns,
                    listen_ip: None,
                },
            )
        })
        .await
        .unwrap();
        let (agent, socket) = dev_agent(dir.path(), "agent", SERVER, &dir.path().join("state"));
        Self {
            dir,
            pebble,
            _agent: agent,
            socket,
            inbound_port,
            backend: Backend::start().await,
        }
    }

    /// The sidecar with `env` (dstack-ingress's variables) beside a file naming pebble.
    fn sidecar(&self, name: &str, env: &[(&str, String)]) -> (ChildGuard, SocketAddr) {
        self.sidecar_with(name, env, "")
    }

    /// [`Deployment::sidecar`] with `extra` TOML after the file's own tables.
    fn sidecar_with(
        &self,
        name: &str,
        env: &[(&str, String)],
        extra: &str,
    ) -> (ChildGuard, SocketAddr) {
        let config = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "[agent]\naddress = \"unix:{}\"\n[inbound]\nlisten = \"127.0.0.1:{}\"\nbackend = \"{}\"\n\
                 [auth]\nenabled = false\n[client]\nenabled = false\n[admin]\nlisten = \"127.0.0.1:0\"\n\
                 [acme]\nstore = \"{}\"\nissuer = \"{}\"\nca_roots = [\"{}\"]\nretry_min = \"1s\"\n{extra}",
                self.socket.display(),
                self.inbound_port,
                self.backend.addr,
                self.dir.path().join(format!("{name}-store")).display(),
                self.pebble.directory,
                self.pebble.ca_file.display(),
            ),
        )
        .unwrap();
        let mut cmd = Command::new(mesh_binary());
        cmd.args(["--log-format", "json", "run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .env_remove("DSTACK_AGENT_ADDRESS");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let (guard, bound) = start_mesh(self.dir.path(), name, cmd);
        (guard, e2e::listener(&bound, "admin"))
    }
}

async fn certs(admin: SocketAddr) -> Vec<CertStatus> {
    let (status, body) =
        dstack_mesh::status::request(&admin.to_string(), http::Method::GET, "/certs")
            .await
            .unwrap();
    assert_eq!(status, StatusCode::OK);
    serde_json::from_slice(&body).unwrap()
}

async fn wait_for(
    what: &str,
    admin: SocketAddr,
    guard: &mut ChildGuard,
    limit: Duration,
    check: impl FnMut(&CertStatus) -> bool,
) -> CertStatus {
    wait_on(DOMAIN, what, admin, guard, limit, check).await
}

/// Wait until `domain`'s status passes `check`; it, or a panic with what it was.
async fn wait_on(
    domain: &str,
    what: &str,
    admin: SocketAddr,
    guard: &mut ChildGuard,
    limit: Duration,
    mut check: impl FnMut(&CertStatus) -> bool,
) -> CertStatus {
    let end = tokio::time::Instant::now() + limit;
    loop {
        guard.assert_running();
        if let Some(c) = certs(admin).await.into_iter().find(|c| c.domain == domain) {
            if check(&c) {
                return c;
            }
            if tokio::time::Instant::now() > end {
                panic!("timed out waiting for {what}: {c:#?}\n{}", guard.stderr());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Wait until `domain` has a valid certificate and its dstack records are in place.
async fn issued_with_records(domain: &str, admin: SocketAddr, guard: &mut ChildGuard) {
    wait_on(
        domain,
        "issuance and records",
        admin,
        guard,
        Duration::from_secs(90),
        |c| c.status == Status::Valid && c.dns_records.as_deref() == Some("in place"),
    )
    .await;
}

/// A wildcard with the gateway's records, resolved through challtestsrv, with a provider's
/// credential variables.
fn wildcard_env(
    d: &Deployment,
    credentials: Vec<(&'static str, String)>,
) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("DOMAIN", "*.example.test".to_owned()),
        ("TARGET_ENDPOINT", d.backend.addr.to_string()),
        ("GATEWAY_DOMAIN", GATEWAY.to_owned()),
        ("DNS_RESOLVERS", d.pebble.challtestsrv_dns.to_string()),
        ("PORT", "443".to_owned()),
    ];
    env.extend(credentials);
    env
}

/// Each of `wanted` is among `held` (a provider's records as the stand-in keeps them); the
/// failure shows everything held.
fn assert_holds<T: PartialEq + std::fmt::Debug>(held: &[T], wanted: &[T]) {
    for w in wanted {
        assert!(held.contains(w), "{w:?} is not held: {held:#?}");
    }
}

/// `domain`'s first error (within a minute).
async fn first_error(domain: &str, admin: SocketAddr, guard: &mut ChildGuard) -> String {
    wait_on(
        domain,
        "a failure",
        admin,
        guard,
        Duration::from_secs(60),
        |c| c.last_error.is_some(),
    )
    .await
    .last_error
    .unwrap_or_default()
}

fn ingress_env(
    d: &Deployment,
    mode: &str,
    doh: &str,
    hook: &str,
    timeout: &str,
) -> Vec<(&'static str, String)> {
    vec![
        ("DOMAIN", DOMAIN.to_owned()),
        ("TARGET_ENDPOINT", format!("http://{}", d.backend.addr)),
        ("GATEWAY_DOMAIN", GATEWAY.to_owned()),
        ("CHALLENGE_TYPE", "tls-alpn-01".to_owned()),
        ("DNS_SETUP_MODE", mode.to_owned()),
        ("DOH_RESOLVERS", doh.to_owned()),
        ("DNS_WEBHOOK_URL", hook.to_owned()),
        ("DNS_WEBHOOK_TOKEN", TOKEN.to_owned()),
        ("DNS_SETUP_TIMEOUT", timeout.to_owned()),
        ("DNS_SETUP_INTERVAL", "1".to_owned()),
        ("DNS_SETTLE_SECONDS", "0".to_owned()),
        ("PORT", "443".to_owned()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_creates_the_records_and_issuance_waits_for_them() {
    let d = Deployment::start().await;
    let doh = doh(d.pebble.challtestsrv_dns).await;
    let (hook, received) = receiver(d.pebble.challtestsrv_management.clone(), Hook::Creates).await;
    let env = ingress_env(&d, "webhook", &doh, &hook, "120");
    let (mut guard, admin) = d.sidecar("ingress", &env);
    let cert = wait_for(
        "a valid certificate",
        admin,
        &mut guard,
        Duration::from_secs(90),
        |c| c.status == Status::Valid,
    )
    .await;
    // The records it asked for, as the operator's service received them, signed and quoted.
    let r = received.lock().unwrap();
    assert_eq!(r.posts, 1, "posted once");
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    let asked: Vec<(String, String, String)> = r
        .records
        .iter()
        .map(|x| {
            (
                x["type"].as_str().unwrap().to_owned(),
                x["name"].as_str().unwrap().to_owned(),
                x["value"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        asked,
        [
            ("CNAME".to_owned(), DOMAIN.to_owned(), GATEWAY.to_owned()),
            (
                "TXT".to_owned(),
                format!("_dstack-app-address.{DOMAIN}"),
                format!("{SERVER}:443")
            ),
        ]
    );
    // /certs shows each record as seen.
    let setup = cert.dns_setup.unwrap();
    assert!(setup.iter().all(|c| c.visible), "{setup:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolvers_that_disagree_hold_issuance_until_every_one_sees_the_records() {
    // One resolver sees the new records at once; the other still answers the old gateway and
    // app address from its cache. Every resolver must see every record: the attempt fails
    // naming the lagging resolver and what it saw, and succeeds once it catches up.
    let d = Deployment::start().await;
    let fresh = doh(d.pebble.challtestsrv_dns).await;
    let behind = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let lagging = doh_lagging(d.pebble.challtestsrv_dns, behind.clone()).await;
    let (hook, _received) = receiver(d.pebble.challtestsrv_management.clone(), Hook::Creates).await;
    let env = ingress_env(&d, "webhook", &format!("{fresh},{lagging}"), &hook, "3");
    let (mut guard, admin) = d.sidecar("ingress", &env);
    let cert = wait_for(
        "the disagreement to time out",
        admin,
        &mut guard,
        Duration::from_secs(60),
        |c| c.last_error.is_some(),
    )
    .await;
    let error = cert.last_error.unwrap();
    assert!(
        error.contains(&format!("{lagging}: CNAME old-gw.example.net")),
        "{error}"
    );
    assert!(error.contains(&format!("{lagging}: 0ld0ld:443")), "{error}");
    assert!(
        !error.contains(&format!("{fresh}:")),
        "the fresh resolver is not blamed: {error}"
    );
    assert_eq!(
        d.pebble.orders_seen(),
        0,
        "no order while a resolver disagrees"
    );
    behind.store(false, std::sync::atomic::Ordering::SeqCst);
    wait_for(
        "issuance once the resolvers agree",
        admin,
        &mut guard,
        Duration::from_secs(60),
        |c| c.status == Status::Valid,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_that_never_appear_fail_the_domain_naming_them() {
    // The receiver answers 500 and creates nothing: the sidecar waits DNS_SETUP_TIMEOUT, then
    // fails the attempt naming each missing record; the sidecar keeps running and retries.
    let d = Deployment::start().await;
    // No address for every name (challtestsrv's default): the name is not the gateway's.
    d.pebble
        .challtestsrv("/set-default-ipv4", &serde_json::json!({"ip": ""}));
    let doh = doh(d.pebble.challtestsrv_dns).await;
    let (hook, received) = receiver(d.pebble.challtestsrv_management.clone(), Hook::Fails).await;
    let env = ingress_env(&d, "webhook", &doh, &hook, "3");
    let (mut guard, admin) = d.sidecar("ingress", &env);
    let cert = wait_for(
        "the setup to time out",
        admin,
        &mut guard,
        Duration::from_secs(60),
        |c| c.last_error.is_some(),
    )
    .await;
    let error = cert.last_error.unwrap();
    assert!(error.contains("not visible"), "{error}");
    assert!(
        error.contains(&format!("TXT _dstack-app-address.{DOMAIN} -> {SERVER}:443")),
        "{error}"
    );
    assert!(
        error.contains(&format!("CNAME {DOMAIN} -> {GATEWAY}")),
        "{error}"
    );
    assert_ne!(cert.status, Status::Valid);
    assert_eq!(
        d.pebble.orders_seen(),
        0,
        "no order placed without the records"
    );
    // The webhook was tried three times (2 s and 4 s apart) before the wait began; a later
    // attempt posts again.
    assert!(received.lock().unwrap().posts >= 3);
    let shown = cert.dns_setup.unwrap();
    assert_eq!(shown.len(), 2);
    assert!(
        shown.iter().all(|c| !c.visible && c.seen.is_some()),
        "{shown:#?}"
    );
    assert!(guard
        .stderr()
        .contains("DNS records required for app.example.test"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn print_mode_shows_the_records_and_wait_mode_proceeds_when_they_appear() {
    let d = Deployment::start().await;
    let doh = doh(d.pebble.challtestsrv_dns).await;
    let env = ingress_env(&d, "wait", &doh, "", "120");
    let env: Vec<(&str, String)> = env
        .into_iter()
        .filter(|(k, _)| !k.starts_with("DNS_WEBHOOK"))
        .collect();
    let (mut guard, admin) = d.sidecar("ingress", &env);
    // Waiting, with the records on /certs.
    let waiting = wait_for(
        "the records to be listed",
        admin,
        &mut guard,
        Duration::from_secs(30),
        |c| {
            c.dns_setup
                .as_ref()
                .is_some_and(|s| s.iter().any(|r| r.seen.is_some()))
        },
    )
    .await;
    assert_ne!(waiting.status, Status::Valid);
    // The operator creates them by hand: the order follows.
    d.pebble.challtestsrv(
        "/set-cname",
        &serde_json::json!({"host": format!("{DOMAIN}."), "target": format!("{GATEWAY}.")}),
    );
    d.pebble.challtestsrv(
        "/set-txt",
        &serde_json::json!({"host": format!("_dstack-app-address.{DOMAIN}."), "value": format!("{SERVER}:443")}),
    );
    wait_for(
        "a valid certificate",
        admin,
        &mut guard,
        Duration::from_secs(90),
        |c| c.status == Status::Valid,
    )
    .await;
    drop(guard);
    // print: shown, and ordered as soon as the resolvers see them (here they already do).
    let env: Vec<(&str, String)> = env
        .into_iter()
        .map(|(k, v)| {
            if k == "DNS_SETUP_MODE" {
                (k, "print".to_owned())
            } else {
                (k, v)
            }
        })
        .collect();
    let (mut guard, admin) = d.sidecar("printer", &env);
    wait_for(
        "a valid certificate",
        admin,
        &mut guard,
        Duration::from_secs(90),
        |c| c.status == Status::Valid,
    )
    .await;
    assert!(guard
        .stderr()
        .contains("DNS records required for app.example.test"));
}

/// `env` with `key` set to `value` (added if absent).
fn with(
    mut env: Vec<(&'static str, String)>,
    key: &'static str,
    value: &str,
) -> Vec<(&'static str, String)> {
    env.retain(|(k, _)| *k != key);
    env.push((key, value.to_owned()));
    env
}

/// The records listed for `domain` on `/certs`: (type, name, value, visible, looked at).
fn listed(c: &CertStatus) -> Vec<(String, String, String, bool, bool)> {
    c.dns_setup
        .iter()
        .flatten()
        .map(|r| {
            let (rtype, name, value) = (
                r.record.rtype.clone(),
                r.record.name.clone(),
                r.record.value.clone(),
            );
            (rtype, name, value, r.visible, r.visible || r.seen.is_some())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns01_without_credentials_the_webhook_makes_each_challenge_record() {
    // No DNS credential in the CVM and DNS-01: the operator's service gets the dstack records,
    // then each order's _acme-challenge TXT, and the CA is told to look once DoH sees it.
    let d = Deployment::start().await;
    let doh = doh(d.pebble.challtestsrv_dns).await;
    let (hook, received) = receiver(d.pebble.challtestsrv_management.clone(), Hook::Creates).await;
    let env = with(
        ingress_env(&d, "webhook", &doh, &hook, "120"),
        "CHALLENGE_TYPE",
        "dns-01",
    );
    let (mut guard, admin) = d.sidecar("ingress", &env);
    let cert = wait_for(
        "a valid certificate",
        admin,
        &mut guard,
        Duration::from_secs(90),
        |c| c.status == Status::Valid,
    )
    .await;
    assert_eq!(d.pebble.orders_seen(), 1);
    let r = received.lock().unwrap();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    let posted: Vec<(String, Vec<(String, String)>)> = r
        .payloads
        .iter()
        .map(|p| {
            let records = p["records"].as_array().unwrap().iter().map(|x| {
                (
                    x["type"].as_str().unwrap().to_owned(),
                    x["name"].as_str().unwrap().to_owned(),
                )
            });
            (
                p["challenge"].as_str().unwrap().to_owned(),
                records.collect(),
            )
        })
        .collect();
    assert_eq!(
        posted,
        [
            (
                "dns-01".to_owned(),
                vec![
                    ("CNAME".to_owned(), DOMAIN.to_owned()),
                    ("TXT".to_owned(), format!("_dstack-app-address.{DOMAIN}")),
                ]
            ),
            (
                "dns-01".to_owned(),
                vec![("TXT".to_owned(), format!("_acme-challenge.{DOMAIN}"))]
            ),
        ]
    );
    // The challenge is the one the CA checked: base64url of a SHA-256, 43 characters.
    let value = r.payloads[1]["records"][0]["value"].as_str().unwrap();
    assert_eq!(value.len(), 43, "{value}");
    // /certs lists it under the dstack records, seen; the log says it may go.
    let rows = listed(&cert);
    assert_eq!(rows.len(), 3, "{rows:#?}");
    assert_eq!(rows[2].1, format!("_acme-challenge.{DOMAIN}"));
    assert!(rows.iter().all(|r| r.3), "{rows:#?}");
    assert!(guard
        .stderr()
        .contains("this DNS-01 challenge record may be removed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn print_mode_lists_each_dns01_challenge_and_orders_only_once_it_is_visible() {
    // print: the operator reads the records off /certs and makes them by hand; nothing goes
    // to the CA before the resolvers see them, and the CA looks only once the challenge shows.
    let d = Deployment::start().await;
    let doh = doh(d.pebble.challtestsrv_dns).await;
    let env: Vec<(&str, String)> = with(
        ingress_env(&d, "print", &doh, "", "120"),
        "CHALLENGE_TYPE",
        "dns-01",
    )
    .into_iter()
    .filter(|(k, _)| !k.starts_with("DNS_WEBHOOK"))
    .collect();
    let (mut guard, admin) = d.sidecar("printer", &env);
    let waiting = wait_for(
        "the dstack records looked at",
        admin,
        &mut guard,
        Duration::from_secs(30),
        |c| listed(c).iter().any(|r| r.4),
    )
    .await;
    // (The CNAME may already pass: challtestsrv gives every name the gateway's address.)
    let app_address = format!("_dstack-app-address.{DOMAIN}");
    assert!(
        listed(&waiting).iter().any(|r| r.1 == app_address && !r.3),
        "{waiting:#?}"
    );
    assert_eq!(
        d.pebble.orders_seen(),
        0,
        "no order before the records are visible"
    );
    d.pebble.challtestsrv(
        "/set-cname",
        &serde_json::json!({"host": format!("{DOMAIN}."), "target": format!("{GATEWAY}.")}),
    );
    d.pebble.challtestsrv(
        "/set-txt",
        &serde_json::json!({"host": format!("_dstack-app-address.{DOMAIN}."), "value": format!("{SERVER}:443")}),
    );
    let challenge_name = format!("_acme-challenge.{DOMAIN}");
    let asked = wait_for(
        "the challenge listed and looked at",
        admin,
        &mut guard,
        Duration::from_secs(60),
        |c| listed(c).iter().any(|r| r.1 == challenge_name && r.4),
    )
    .await;
    let row = listed(&asked)
        .into_iter()
        .find(|r| r.1 == challenge_name)
        .unwrap();
    assert!(!row.3, "not there yet: {row:?}");
    assert_ne!(asked.status, Status::Valid);
    assert_eq!(d.pebble.orders_seen(), 1);
    assert!(guard
        .stderr()
        .contains(&format!("TXT   {challenge_name} -> {}", row.2)));
    d.pebble.challtestsrv(
        "/set-txt",
        &serde_json::json!({"host": format!("{challenge_name}."), "value": row.2}),
    );
    wait_for(
        "a valid certificate",
        admin,
        &mut guard,
        Duration::from_secs(90),
        |c| c.status == Status::Valid,
    )
    .await;
    assert_eq!(d.pebble.orders_seen(), 1, "the one order, not a retry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_caa_without_credentials_lists_the_caa_pin_for_the_operator() {
    // SET_CAA with no DNS credential: the CAA pin (this CA, this account, this method) is one
    // of the records the operator is asked to create, and the order waits for it. A wildcard,
    // because a name that is a CNAME to the gateway can carry no CAA (its base can).
    let d = Deployment::start().await;
    let doh = doh(d.pebble.challtestsrv_dns).await;
    let env = ingress_env(&d, "print", &doh, "", "120");
    let env = with(env, "DOMAIN", "*.wild.example.test");
    let env = with(env, "CHALLENGE_TYPE", "dns-01");
    let env: Vec<(&str, String)> = with(env, "SET_CAA", "true")
        .into_iter()
        .filter(|(k, _)| !k.starts_with("DNS_WEBHOOK"))
        .collect();
    let (mut guard, admin) =
        d.sidecar_with("caa", &env, "[dns]\ncaa_identities = [\"pebble.test\"]\n");
    let shown = wait_on(
        "*.wild.example.test",
        "the CAA record listed",
        admin,
        &mut guard,
        Duration::from_secs(30),
        |c| listed(c).iter().any(|r| r.0 == "CAA" && r.4),
    )
    .await;
    let caa = listed(&shown).into_iter().find(|r| r.0 == "CAA").unwrap();
    assert_eq!(caa.1, "wild.example.test", "{caa:?}");
    assert!(caa.2.starts_with("0 issuewild \"pebble.test;"), "{caa:?}");
    assert!(
        caa.2.contains("accounturi=") && caa.2.contains("validationmethods=dns-01"),
        "{caa:?}"
    );
    assert!(!caa.3, "nobody made it yet");
    assert_eq!(d.pebble.orders_seen(), 0, "the order waits for it");
    assert!(guard
        .stderr()
        .contains("CAA   wild.example.test -> 0 issuewild"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_never_answers_fails_its_domain_and_not_the_one_beside_it() {
    // The operator's service hangs past DNS_WEBHOOK_TIMEOUT on every post. The domain whose
    // records exist is issued; the other fails at DNS_SETUP_TIMEOUT naming its records.
    let d = Deployment::start().await;
    let doh = doh(d.pebble.challtestsrv_dns).await;
    let (hook, received) = receiver(
        d.pebble.challtestsrv_management.clone(),
        Hook::Stalls(Duration::from_secs(30)),
    )
    .await;
    let other = "other.example.test";
    d.pebble.challtestsrv(
        "/set-cname",
        &serde_json::json!({"host": format!("{other}."), "target": format!("{GATEWAY}.")}),
    );
    d.pebble.challtestsrv(
        "/set-txt",
        &serde_json::json!({"host": format!("_dstack-app-address.{other}."), "value": format!("{SERVER}:443")}),
    );
    let env = ingress_env(&d, "webhook", &doh, &hook, "3");
    let mut env: Vec<(&str, String)> = env.into_iter().filter(|(k, _)| *k != "DOMAIN").collect();
    env.push(("DOMAINS", format!("{DOMAIN}\n{other}")));
    env = with(env, "DNS_WEBHOOK_TIMEOUT", "1");
    let (mut guard, admin) = d.sidecar("ingress", &env);
    wait_on(
        other,
        "the domain beside it issued",
        admin,
        &mut guard,
        Duration::from_secs(90),
        |c| c.status == Status::Valid,
    )
    .await;
    let error = first_error(DOMAIN, admin, &mut guard).await;
    assert!(error.contains("not visible"), "{error}");
    assert!(
        error.contains(&format!("TXT _dstack-app-address.{DOMAIN} -> {SERVER}:443")),
        "{error}"
    );
    let stderr = guard.stderr();
    assert!(stderr.contains("no answer within 1s"), "{stderr}");
    assert!(
        received.lock().unwrap().posts >= 6,
        "three tries for each domain"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delegation_zone_is_the_only_zone_written() {
    // The customer's zone (read-only to every key) holds the operator's three CNAMEs into
    // delegate.test, which the RFC 2136 key may update; pebble resolves with BIND.
    let dir = tempfile::tempdir().unwrap();
    let named = dir.path().join("named");
    let customer = Zone {
        name: "example.test".into(),
        records: vec![
            "app IN CNAME app.example.test.delegate.test.".into(),
            "_dstack-app-address.app IN CNAME _dstack-app-address.app.example.test.delegate.test."
                .into(),
            "_acme-challenge.app IN CNAME _acme-challenge.app.example.test.delegate.test.".into(),
        ],
        read_only: true,
    };
    let delegated = Zone {
        name: "delegate.test".into(),
        records: Vec::new(),
        read_only: false,
    };
    let bind = tokio::task::spawn_blocking(move || {
        Bind::start(
            &named,
            BindOptions {
                zones: vec![customer, delegated],
                tsig: Tsig::generate("delegate-key"),
            },
        )
    })
    .await
    .unwrap();
    // The CA and the public resolve recursively: unbound follows the CNAMEs into the
    // delegated zone, as Let's Encrypt's resolvers do.
    let stubs = [("example.test", bind.addr), ("delegate.test", bind.addr)];
    let unbound = e2e::unbound::Unbound::start(&dir.path().join("unbound"), &stubs);
    let d = Deployment::resolving_with(dir, Some(unbound.addr)).await;
    let doh = doh(unbound.addr).await;
    let serial = bind.serial("example.test");
    let env = vec![
        ("DOMAIN", DOMAIN.to_owned()),
        ("TARGET_ENDPOINT", d.backend.addr.to_string()),
        ("GATEWAY_DOMAIN", GATEWAY.to_owned()),
        ("DNS_PROVIDER", "rfc2136".to_owned()),
        ("RFC2136_SERVER", bind.addr.to_string()),
        ("RFC2136_TSIG_KEY", bind.tsig.name.clone()),
        ("RFC2136_TSIG_SECRET", bind.tsig.secret.clone()),
        ("RFC2136_ZONE", "delegate.test".to_owned()),
        ("DELEGATION_ZONE", "delegate.test".to_owned()),
        ("DNS_SETUP_MODE", "wait".to_owned()),
        ("DOH_RESOLVERS", doh),
        ("DNS_SETUP_INTERVAL", "1".to_owned()),
        ("DNS_SETTLE_SECONDS", "0".to_owned()),
        ("PORT", "443".to_owned()),
    ];
    let (mut guard, admin) = d.sidecar("delegated", &env);
    let cert = wait_for(
        "a valid certificate",
        admin,
        &mut guard,
        Duration::from_secs(90),
        |c| c.status == Status::Valid,
    )
    .await;
    // The operator's CNAMEs were checked, each exact.
    let checked: Vec<String> = cert
        .dns_setup
        .unwrap()
        .iter()
        .map(|c| {
            format!(
                "{} {} {} {}",
                c.record.rtype, c.record.name, c.record.value, c.visible
            )
        })
        .collect();
    assert_eq!(
        checked,
        [
            "CNAME app.example.test app.example.test.delegate.test true",
            "CNAME _dstack-app-address.app.example.test _dstack-app-address.app.example.test.delegate.test true",
            "CNAME _acme-challenge.app.example.test _acme-challenge.app.example.test.delegate.test true",
        ]
    );
    // The dstack records live in the delegated zone; the customer's zone is untouched.
    wait_for(
        "the records in place",
        admin,
        &mut guard,
        Duration::from_secs(30),
        |c| c.dns_records.as_deref() == Some("in place"),
    )
    .await;
    assert_eq!(
        bind.dig("app.example.test.delegate.test", "CNAME"),
        [format!("{GATEWAY}.")]
    );
    assert_eq!(
        bind.dig("_dstack-app-address.app.example.test.delegate.test", "TXT"),
        [format!("\"{SERVER}:443\"")]
    );
    assert_eq!(
        bind.serial("example.test"),
        serial,
        "the customer's zone changed"
    );
    // The challenge record is gone from the delegated zone once the order is over.
    let lines = bind.dig("_acme-challenge.app.example.test.delegate.test", "TXT");
    assert!(lines.iter().all(|l| !l.starts_with('"')), "{lines:?}");
}

/// What an httpreq endpoint was asked, in order: (action, fqdn, value).
type Calls = Arc<Mutex<Vec<(String, String, String)>>>;

/// An operator's httpreq endpoint (lego's protocol) that wants Basic `user:pass`, and either
/// mirrors present/cleanup into challtestsrv or (`broken`) answers 500 with its own words.
async fn httpreq_endpoint(challtestsrv: String, broken: bool) -> (String, Calls) {
    let calls: Calls = Arc::default();
    let seen = calls.clone();
    let addr = serve(move |req: Request<Incoming>| {
        let (seen, challtestsrv) = (seen.clone(), challtestsrv.clone());
        async move {
            let authorized = req
                .headers()
                .get(http::header::AUTHORIZATION)
                .is_some_and(|v| v == "Basic b3BzOmh1bnRlcjI="); // ops:hunter2
            if !authorized {
                return json_response(
                    StatusCode::UNAUTHORIZED,
                    serde_json::json!({"error": "who are you"}),
                );
            }
            let action = req.uri().path().trim_start_matches("/dns/").to_owned();
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let (fqdn, value) = (
                v["fqdn"].as_str().unwrap_or_default().to_owned(),
                v["value"].as_str().unwrap_or_default().to_owned(),
            );
            seen.lock()
                .unwrap()
                .push((action.clone(), fqdn.clone(), value.clone()));
            if broken {
                return json_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    serde_json::json!({"error": "zone example.test is locked by a change freeze"}),
                );
            }
            let (path, body) = match action.as_str() {
                "present" => (
                    "/set-txt",
                    serde_json::json!({"host": fqdn, "value": value}),
                ),
                "cleanup" => ("/clear-txt", serde_json::json!({"host": fqdn})),
                _ => return json_response(StatusCode::NOT_FOUND, serde_json::json!({})),
            };
            let base = challtestsrv.clone();
            let status = tokio::task::spawn_blocking(move || {
                e2e::pebble::post_json(&base, path, &body).map(|r| r.status)
            })
            .await
            .unwrap()
            .unwrap();
            assert_eq!(status, 200);
            json_response(StatusCode::OK, serde_json::json!({}))
        }
    })
    .await;
    (format!("http://{addr}/dns"), calls)
}

fn httpreq_env(d: &Deployment, endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("DOMAIN", "*.example.test".to_owned()),
        ("TARGET_ENDPOINT", d.backend.addr.to_string()),
        ("DNS_PROVIDER", "httpreq".to_owned()),
        ("HTTPREQ_ENDPOINT", endpoint.to_owned()),
        ("HTTPREQ_USERNAME", "ops".to_owned()),
        ("HTTPREQ_PASSWORD", "hunter2".to_owned()),
        ("DNS_RESOLVERS", d.pebble.challtestsrv_dns.to_string()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httpreq_presents_and_cleans_up_the_challenge_through_the_operators_endpoint() {
    let d = Deployment::start().await;
    let (endpoint, calls) = httpreq_endpoint(d.pebble.challtestsrv_management.clone(), false).await;
    let (mut guard, admin) = d.sidecar("httpreq", &httpreq_env(&d, &endpoint));
    wait_on(
        "*.example.test",
        "a valid certificate",
        admin,
        &mut guard,
        Duration::from_secs(90),
        |c| c.status == Status::Valid,
    )
    .await;
    // Presented with credentials, then cleaned up with the same value, as lego does.
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    while calls.lock().unwrap().len() < 2 {
        assert!(
            tokio::time::Instant::now() < end,
            "no cleanup: {:?}",
            calls.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[0].0, "present");
    assert_eq!(calls[1].0, "cleanup");
    assert_eq!(calls[0].1, "_acme-challenge.example.test.");
    assert_eq!(calls[0].1, calls[1].1);
    assert_eq!(calls[0].2, calls[1].2);
    assert_eq!(
        calls[0].2.len(),
        43,
        "a base64url SHA-256 key authorization digest"
    );
    assert!(
        !guard.stderr().contains("hunter2"),
        "the password was logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_httpreq_endpoint_that_fails_fails_the_order_in_its_own_words() {
    let d = Deployment::start().await;
    let (endpoint, calls) = httpreq_endpoint(d.pebble.challtestsrv_management.clone(), true).await;
    let (mut guard, admin) = d.sidecar("httpreq", &httpreq_env(&d, &endpoint));
    let error = first_error("*.example.test", admin, &mut guard).await;
    assert!(error.contains("DNS provider httpreq"), "{error}");
    assert!(error.contains("HTTP 500"), "{error}");
    assert!(error.contains("locked by a change freeze"), "{error}");
    assert!(!calls.lock().unwrap().is_empty());
    assert_eq!(
        d.pebble.orders_seen(),
        1,
        "one order, abandoned when the challenge could not be presented"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digitalocean_issues_a_wildcard_and_writes_the_dstack_records() {
    let d = Deployment::start().await;
    let api = e2e::digitalocean::DigitalOceanStandIn::start(
        "do-token",
        &["other.test", "example.test"],
        Some(d.pebble.challtestsrv_management.clone()),
    )
    .await;
    let env = wildcard_env(
        &d,
        vec![
            ("DO_AUTH_TOKEN", "do-token".to_owned()),
            ("DO_API_URL", api.base.clone()),
        ],
    );
    // DNS_PROVIDER unset: detected from DO_AUTH_TOKEN; DNS-01 by default.
    let (mut guard, admin) = d.sidecar("digitalocean", &env);
    issued_with_records("*.example.test", admin, &mut guard).await;
    // The records as DigitalOcean holds them: relative names, the CNAME target as sent.
    let held: Vec<(String, String, String)> = api
        .records()
        .iter()
        .map(|r| (r.rtype.clone(), r.name.clone(), r.data.clone()))
        .collect();
    assert_holds(
        &held,
        &[
            ("CNAME".into(), "*".into(), GATEWAY.into()),
            (
                "TXT".into(),
                "_dstack-app-address-wildcard".into(),
                format!("{SERVER}:443"),
            ),
        ],
    );
    assert!(
        !held
            .iter()
            .any(|(_, n, _)| n.starts_with("_acme-challenge")),
        "the challenge record was left behind: {held:?}"
    );
    assert!(!guard.stderr().contains("do-token"), "the token was logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digitalocean_errors_are_the_apis_own_words() {
    let d = Deployment::start().await;
    let api = e2e::digitalocean::DigitalOceanStandIn::start("right", &["example.test"], None).await;
    let env = vec![
        ("DOMAIN", "*.example.test".to_owned()),
        ("TARGET_ENDPOINT", d.backend.addr.to_string()),
        ("DNS_PROVIDER", "digitalocean".to_owned()),
        ("DO_AUTH_TOKEN", "wrong".to_owned()),
        ("DO_API_URL", api.base.clone()),
    ];
    let (mut guard, admin) = d.sidecar("digitalocean", &env);
    let error = first_error("*.example.test", admin, &mut guard).await;
    assert!(error.contains("DNS provider digitalocean"), "{error}");
    assert!(error.contains("401"), "{error}");
    assert!(
        error.contains("unauthorized: Unable to authenticate you."),
        "{error}"
    );
}

#[tokio::test]
async fn the_digitalocean_client_follows_every_page() {
    use dstack_mesh::acme::dns01::{digitalocean::DigitalOcean, Provider};
    let names: Vec<String> = (0..450).map(|i| format!("zone{i:03}.test")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let api = e2e::digitalocean::DigitalOceanStandIn::start("t", &refs, None).await;
    let client = DigitalOcean::new(&api.base, "t", Duration::from_secs(5)).unwrap();
    let zones = client.zones().await.unwrap();
    assert_eq!(zones.len(), 450);
    assert_eq!(zones[449].name, "zone449.test");
    let pages = api
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /v2/domains"))
        .count();
    assert_eq!(pages, 3, "200 per page, following links.pages.next");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linode_as_dstack_ingress_configures_it_issues_and_writes_the_records() {
    // dstack-ingress's Linode deployment: LINODE_API_TOKEN alone picks the provider and DNS-01.
    let d = Deployment::start().await;
    let api = e2e::linode::LinodeStandIn::start(
        "linode-token",
        &["example.test"],
        Some(d.pebble.challtestsrv_management.clone()),
    )
    .await;
    let env = vec![
        ("DOMAIN", "shop.example.test".to_owned()),
        ("TARGET_ENDPOINT", format!("http://{}", d.backend.addr)),
        ("LINODE_API_TOKEN", "linode-token".to_owned()),
        ("LINODE_API_URL", api.base.clone()),
        ("GATEWAY_DOMAIN", GATEWAY.to_owned()),
        ("DNS_RESOLVERS", d.pebble.challtestsrv_dns.to_string()),
        ("PORT", "443".to_owned()),
    ];
    let (mut guard, admin) = d.sidecar("linode", &env);
    issued_with_records("shop.example.test", admin, &mut guard).await;
    let held: Vec<(String, String, String, u64)> = api
        .records()
        .iter()
        .map(|r| (r.rtype.clone(), r.name.clone(), r.target.clone(), r.ttl_sec))
        .collect();
    // TTL 60 rounds up to Linode's 120.
    assert_holds(
        &held,
        &[
            ("CNAME".into(), "shop".into(), GATEWAY.into(), 120),
            (
                "TXT".into(),
                "_dstack-app-address.shop".into(),
                format!("{SERVER}:443"),
                120,
            ),
        ],
    );
    assert!(
        !held
            .iter()
            .any(|(_, n, _, _)| n.starts_with("_acme-challenge")),
        "{held:?}"
    );
    // Records are read a page at a time at Linode's largest size.
    assert!(
        api.requests().iter().any(|r| r.contains("page_size=500")),
        "{:?}",
        api.requests()
    );
    assert!(
        !guard.stderr().contains("linode-token"),
        "the token was logged"
    );
}

#[tokio::test]
async fn linode_errors_name_the_field_and_reason() {
    use dstack_mesh::acme::dns01::{linode::Linode, Provider};
    let api = e2e::linode::LinodeStandIn::start("t", &["example.test"], None).await;
    let wrong = Linode::new(&api.base, "nope", Duration::from_secs(5)).unwrap();
    let e = wrong.zones().await.unwrap_err().to_string();
    assert!(e.contains("HTTP 401") && e.contains("Invalid Token"), "{e}");
    // A field Linode refuses is named with its reason.
    let client = Linode::new(&api.base, "t", Duration::from_secs(5)).unwrap();
    let zone = client.zone_for("example.test").await.unwrap();
    let caa = dstack_mesh::acme::dns01::Record {
        name: "example.test".into(),
        data: Data::Caa {
            critical: false,
            tag: "issuer".into(),
            value: "letsencrypt.org".into(),
        },
        ttl: 60,
        id: None,
    };
    let e = client.create(&zone, &caa).await.unwrap_err().to_string();
    assert!(
        e.contains("HTTP 400") && e.contains("tag: tag must be issue"),
        "{e}"
    );
    // 1,200 domains: three pages of Linode's largest size.
    let names: Vec<String> = (0..1200).map(|i| format!("z{i:04}.test")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let many = e2e::linode::LinodeStandIn::start("t", &refs, None).await;
    let client = Linode::new(&many.base, "t", Duration::from_secs(5)).unwrap();
    assert_eq!(client.zones().await.unwrap().len(), 1200);
    assert_eq!(many.requests().len(), 3, "{:?}", many.requests());
}

/// `dstack-mesh dns check` with `env`, as an operator runs it.
async fn dns_check(d: &Deployment, env: &[(&str, String)], args: &[&str]) -> std::process::Output {
    let config = d.dir.path().join("check.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\naddress = \"unix:{}\"\n[admin]\nenabled = false\n",
            d.socket.display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(mesh_binary());
    cmd.args(["dns", "check", "--config"])
        .arg(&config)
        .args(args)
        .env_remove("DSTACK_AGENT_ADDRESS");
    for (k, v) in env {
        cmd.env(k, v);
    }
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_check_presents_sees_and_removes_a_challenge_with_the_credential() {
    let d = Deployment::start().await;
    let api = e2e::digitalocean::DigitalOceanStandIn::start(
        "do-token",
        &["example.test"],
        Some(d.pebble.challtestsrv_management.clone()),
    )
    .await;
    let env = |token: &str| {
        vec![
            ("DOMAINS", "*.example.test\nshop.example.test".to_owned()),
            ("TARGET_ENDPOINT", d.backend.addr.to_string()),
            ("DO_AUTH_TOKEN", token.to_owned()),
            ("DO_API_URL", api.base.clone()),
            ("DNS_RESOLVERS", d.pebble.challtestsrv_dns.to_string()),
        ]
    };
    let out = dns_check(&d, &env("do-token"), &[]).await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "ok      *.example.test: presented _acme-challenge.example.test.",
        "ok      *.example.test: every resolver sees it",
        "ok      *.example.test: removed",
        "ok      shop.example.test: presented _acme-challenge.shop.example.test.",
        "ok      shop.example.test: removed",
    ] {
        assert!(text.contains(line), "{line:?} in:\n{text}");
    }
    assert!(api.records().is_empty(), "left behind: {:?}", api.records());
    assert_eq!(d.pebble.orders_seen(), 0, "no order without --dry-run");
    // --dry-run: then a whole DNS-01 order per domain at the staging CA (pebble here).
    let ca = d.pebble.ca_file.display().to_string();
    let out = dns_check(
        &d,
        &env("do-token"),
        &[
            "--dry-run",
            "--directory",
            &d.pebble.directory,
            "--ca-roots",
            &ca,
        ],
    )
    .await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for domain in ["*.example.test", "shop.example.test"] {
        let line = format!(
            "ok      {domain}: a DNS-01 order at {} ended with a certificate from Pebble",
            d.pebble.directory
        );
        assert!(text.contains(&line), "{line:?} in:\n{text}");
    }
    assert_eq!(d.pebble.orders_seen(), 2);
    assert!(api.records().is_empty(), "left behind: {:?}", api.records());
    // The wrong token: the step and DigitalOcean's words, exit 1.
    let out = dns_check(&d, &env("wrong"), &[]).await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("FAILED  *.example.test: present the challenge"),
        "{text}"
    );
    assert!(
        text.contains("unauthorized: Unable to authenticate you."),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hetzner_issues_a_wildcard_and_writes_the_records_through_actions() {
    let d = Deployment::start().await;
    let api = e2e::hetzner::HetznerStandIn::start(
        "hz-token",
        &["example.test"],
        Some(d.pebble.challtestsrv_management.clone()),
    )
    .await;
    let env = wildcard_env(
        &d,
        vec![
            ("HETZNER_API_TOKEN", "hz-token".to_owned()),
            ("HETZNER_API_URL", api.base.clone()),
        ],
    );
    let (mut guard, admin) = d.sidecar("hetzner", &env);
    issued_with_records("*.example.test", admin, &mut guard).await;
    let held: Vec<(String, String, Vec<String>)> = api
        .sets()
        .iter()
        .map(|r| (r.rtype.clone(), r.name.clone(), r.values.clone()))
        .collect();
    // TXT values quoted.
    assert_holds(
        &held,
        &[
            ("CNAME".into(), "*".into(), vec![format!("{GATEWAY}.")]),
            (
                "TXT".into(),
                "_dstack-app-address-wildcard".into(),
                vec![format!("\"{SERVER}:443\"")],
            ),
        ],
    );
    assert!(
        !held
            .iter()
            .any(|(_, n, _)| n.starts_with("_acme-challenge")),
        "{held:?}"
    );
    // Each change was an action the client waited for.
    let polled = api
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /v1/actions/"))
        .count();
    assert!(polled >= 3, "{:?}", api.requests());
    assert!(!guard.stderr().contains("hz-token"), "the token was logged");
}

#[tokio::test]
async fn hetzner_refuses_the_deprecated_key_and_says_why() {
    let d = Deployment::start().await;
    let env = vec![
        ("DOMAIN", "*.example.test".to_owned()),
        ("TARGET_ENDPOINT", d.backend.addr.to_string()),
        ("DNS_PROVIDER", "hetzner".to_owned()),
        ("HETZNER_API_KEY", "old".to_owned()),
    ];
    let out = dns_check(&d, &env, &[]).await;
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(
        text.contains("HETZNER_API_KEY: the key of Hetzner's deprecated DNS API"),
        "{text}"
    );
    assert!(
        text.contains("hetzner needs a Hetzner Cloud API token"),
        "{text}"
    );
}

#[tokio::test]
async fn hetzner_errors_are_the_apis_own_words_and_every_page_is_read() {
    use dstack_mesh::acme::dns01::{hetzner::Hetzner, Provider, Zone};
    let api = e2e::hetzner::HetznerStandIn::start("t", &["example.test"], None).await;
    let wrong = Hetzner::new(&api.base, "nope", Duration::from_secs(5)).unwrap();
    let e = wrong.zones().await.unwrap_err().to_string();
    assert!(
        e.contains("HTTP 401") && e.contains("unauthorized: unable to authenticate"),
        "{e}"
    );
    // A zone that went away between listing and writing: Hetzner's 404, in its words.
    let client = Hetzner::new(&api.base, "t", Duration::from_secs(5)).unwrap();
    let gone = Zone {
        name: "gone.test".into(),
        id: "999".into(),
    };
    let txt = dstack_mesh::acme::dns01::Record {
        name: "_acme-challenge.gone.test".into(),
        data: Data::Txt("v".into()),
        ttl: 60,
        id: None,
    };
    let e = client.create(&gone, &txt).await.unwrap_err().to_string();
    assert!(
        e.contains("HTTP 404") && e.contains("not_found: resource not found"),
        "{e}"
    );
    // 250 zones: three pages of Hetzner's largest size, every zone found.
    let names: Vec<String> = (0..250).map(|i| format!("z{i:03}.test")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let many = e2e::hetzner::HetznerStandIn::start("t", &refs, None).await;
    let client = Hetzner::new(&many.base, "t", Duration::from_secs(5)).unwrap();
    let zones = client.zones().await.unwrap();
    assert_eq!(zones.len(), 250);
    assert_eq!(zones[249].name, "z249.test");
    let pages = many
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /v1/zones"))
        .count();
    assert_eq!(pages, 3, "{:?}", many.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn porkbun_issues_a_wildcard_and_writes_the_dstack_records() {
    let d = Deployment::start().await;
    let api = e2e::porkbun::PorkbunStandIn::start(
        "pk1_test:sk1_secret",
        &["example.test"],
        Some(d.pebble.challtestsrv_management.clone()),
    )
    .await;
    let env = wildcard_env(
        &d,
        vec![
            ("PORKBUN_API_KEY", "pk1_test".to_owned()),
            ("PORKBUN_SECRET_API_KEY", "sk1_secret".to_owned()),
            ("PORKBUN_API_URL", api.base.clone()),
        ],
    );
    let (mut guard, admin) = d.sidecar("porkbun", &env);
    issued_with_records("*.example.test", admin, &mut guard).await;
    let held: Vec<(String, String, String, u64)> = api
        .records()
        .iter()
        .map(|r| (r.rtype.clone(), r.name.clone(), r.content.clone(), r.ttl))
        .collect();
    // TTL raised to Porkbun's 600.
    assert_holds(
        &held,
        &[
            ("CNAME".into(), "*.example.test".into(), GATEWAY.into(), 600),
            (
                "TXT".into(),
                "_dstack-app-address-wildcard.example.test".into(),
                format!("{SERVER}:443"),
                600,
            ),
        ],
    );
    assert!(
        !held
            .iter()
            .any(|(_, n, _, _)| n.starts_with("_acme-challenge")),
        "{held:?}"
    );
    assert!(
        !guard.stderr().contains("sk1_secret"),
        "the secret key was logged"
    );
    // Porkbun's burst limit (503 pages past about a call a second) is waited out.
    api.throttle(2);
    let out = dns_check(&d, &env, &[]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // A wrong key pair: Porkbun's words, through dns check.
    let mut wrong = env.clone();
    wrong.retain(|(k, _)| *k != "PORKBUN_SECRET_API_KEY");
    wrong.push(("PORKBUN_SECRET_API_KEY", "sk1_wrong".to_owned()));
    let out = dns_check(&d, &wrong, &[]).await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("DNS provider porkbun") && text.contains("Invalid API key. (001)"),
        "{text}"
    );
}

const AWS_KEY: (&str, &str) = ("AKIAIOSFODNN7EXAMPLE", "route53-long-term-secret");

fn route53_env(api: &e2e::route53::Route53StandIn) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID", AWS_KEY.0.to_owned()),
        ("AWS_SECRET_ACCESS_KEY", AWS_KEY.1.to_owned()),
        ("AWS_ENDPOINT_URL_ROUTE_53", api.base.clone()),
        ("AWS_ENDPOINT_URL_STS", api.sts.clone()),
        ("AWS_POLLING_INTERVAL", "1".to_owned()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route53_issues_a_wildcard_through_an_assumed_role_and_keeps_values_it_does_not_own() {
    use e2e::route53::{RecordSet, Role, Route53StandIn};
    let d = Deployment::start().await;
    // More zones than one page holds: the client must follow NextMarker.
    let mut zones: Vec<String> = (0..150).map(|i| format!("fill{i:03}.test")).collect();
    zones.push("example.test".into());
    let refs: Vec<&str> = zones.iter().map(String::as_str).collect();
    let role = Role {
        arn: "arn:aws:iam::111122223333:role/dstack-dns".into(),
        external_id: Some("ext-5e77".into()),
    };
    let api = Route53StandIn::start(
        AWS_KEY,
        &refs,
        Some(role.clone()),
        Some(d.pebble.challtestsrv_management.clone()),
    )
    .await;
    // Someone else's value where the challenge goes: a record set holds both.
    api.add(RecordSet {
        zone: api.zone_id("example.test"),
        name: "_acme-challenge.example.test".into(),
        rtype: "TXT".into(),
        ttl: 300,
        values: vec!["\"someone-elses\"".into()],
    });
    // As dstack-ingress configures it: the key detects the provider, AWS_ROLE_ARN the role.
    let mut credentials = route53_env(&api);
    credentials.push(("AWS_ROLE_ARN", role.arn.clone()));
    credentials.push(("AWS_EXTERNAL_ID", "ext-5e77".into()));
    let env = wildcard_env(&d, credentials);
    let (mut guard, admin) = d.sidecar("route53", &env);
    issued_with_records("*.example.test", admin, &mut guard).await;
    let held: Vec<(String, String, Vec<String>)> = api
        .sets()
        .iter()
        .map(|r| (r.rtype.clone(), r.name.clone(), r.values.clone()))
        .collect();
    // The challenge must be gone and the other value kept.
    assert_holds(
        &held,
        &[
            (
                "CNAME".into(),
                "*.example.test".into(),
                vec![format!("{GATEWAY}.")],
            ),
            (
                "TXT".into(),
                "_dstack-app-address-wildcard.example.test".into(),
                vec![format!("\"{SERVER}:443\"")],
            ),
            (
                "TXT".into(),
                "_acme-challenge.example.test".into(),
                vec!["\"someone-elses\"".into()],
            ),
        ],
    );
    let requests = api.requests();
    let count = |prefix: &str| requests.iter().filter(|r| r.starts_with(prefix)).count();
    let exactly = |line: &str| requests.iter().filter(|r| *r == line).count();
    assert_eq!(
        exactly("POST /"),
        1,
        "the role is assumed once: {requests:?}"
    );
    assert!(count("GET /2013-04-01/change/") >= 3, "{requests:?}");
    assert!(
        exactly("GET /2013-04-01/hostedzone") >= 2,
        "zones on two pages: {requests:?}"
    );
    let log = guard.stderr();
    for secret in [AWS_KEY.1, "temporary-secret", "session-token"] {
        assert!(!log.contains(secret), "{secret} was logged");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route53_faults_fail_the_domain_in_awss_own_words() {
    use dstack_mesh::acme::dns01::{
        route53::{Route53, Settings},
        sigv4::Credentials,
        Provider, Record,
    };
    use e2e::route53::Route53StandIn;
    let api = Route53StandIn::start(AWS_KEY, &["example.test"], None, None).await;
    let settings = |secret: &str| Settings {
        api_url: api.base.clone(),
        credentials: Credentials {
            access_key: AWS_KEY.0.into(),
            secret_key: secret.into(),
            session_token: None,
        },
        role: None,
        hosted_zone_id: None,
        sync: Some((Duration::from_millis(100), Duration::from_secs(1))),
    };
    // A wrong secret: AWS's words, not ours.
    let wrong = Route53::new(settings("not-the-secret"), Duration::from_secs(5)).unwrap();
    let e = wrong.zones().await.unwrap_err().to_string();
    assert!(
        e.contains("403") && e.contains("SignatureDoesNotMatch"),
        "{e}"
    );
    // The hosted zone named by id, and a private twin never chosen.
    let right = Route53::new(settings(AWS_KEY.1), Duration::from_secs(5)).unwrap();
    let zone = right.zone_for("app.example.test").await.unwrap();
    assert_eq!(zone.id, api.zone_id("example.test"));
    // A change that never leaves PENDING fails naming the change.
    api.stick();
    let record = Record {
        name: "_acme-challenge.app.example.test".into(),
        data: Data::Txt("token".into()),
        ttl: 60,
        id: None,
    };
    let e = right.create(&zone, &record).await.unwrap_err().to_string();
    assert!(e.contains("still PENDING after 1s"), "{e}");
    assert!(
        e.contains("UPSERT TXT _acme-challenge.app.example.test")
            || e.contains("CREATE TXT _acme-challenge.app.example.test"),
        "{e}"
    );

    // Through the sidecar: the domain fails with that message, the process serves on.
    let d = Deployment::start().await;
    let mut env = wildcard_env(&d, route53_env(&api));
    env.push(("AWS_PROPAGATION_TIMEOUT", "2".into()));
    let (mut guard, admin) = d.sidecar("route53-stuck", &env);
    let error = first_error("*.example.test", admin, &mut guard).await;
    assert!(error.contains("DNS provider route53"), "{error}");
    assert!(error.contains("still PENDING after 2s"), "{error}");

    // No key at all is a start-up error naming the variables.
    let out = dns_check(
        &d,
        &[
            ("DOMAIN", "*.example.test".to_owned()),
            ("TARGET_ENDPOINT", d.backend.addr.to_string()),
            ("DNS_PROVIDER", "route53".to_owned()),
            ("AWS_PROFILE", "certbot".to_owned()),
        ],
        &[],
    )
    .await;
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(
        text.contains("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
        "{text}"
    );
    assert!(
        text.contains("AWS_PROFILE's shared credential files are not read"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namecheap_issues_a_wildcard_and_keeps_every_record_it_does_not_own() {
    use e2e::namecheap::{Host, NamecheapStandIn};
    let d = Deployment::start().await;
    let api = NamecheapStandIn::start(
        "dstack",
        "nc-key",
        "127.0.0.1",
        &["example.test", "other.test"],
        Some(d.pebble.challtestsrv_management.clone()),
    )
    .await;
    // The owner's records: setHosts replaces the whole set, so each must survive every write.
    let theirs = vec![
        Host::new("www", "A", "192.0.2.10", 1800),
        Host {
            mx_pref: "20".into(),
            ..Host::new("@", "MX", "mail.example.net.", 3600)
        },
        Host::new("@", "TXT", "v=spf1 include:_spf.example.net ~all", 1799),
        Host::new("old", "URL", "https://example.net/?a=1&b=2", 1799),
        Host::new("shop", "CNAME", "shops.example.net.", 300),
    ];
    api.set("example.test", "MX", theirs.clone());
    // As dstack-ingress configures it: the key picks the provider.
    let env = wildcard_env(
        &d,
        vec![
            ("NAMECHEAP_USERNAME", "dstack".to_owned()),
            ("NAMECHEAP_API_KEY", "nc-key".to_owned()),
            ("NAMECHEAP_CLIENT_IP", "127.0.0.1".to_owned()),
            ("NAMECHEAP_API_URL", api.url.clone()),
        ],
    );
    let (mut guard, admin) = d.sidecar("namecheap", &env);
    issued_with_records("*.example.test", admin, &mut guard).await;
    let hosts = api.hosts("example.test");
    for host in &theirs {
        assert!(hosts.contains(host), "{host:?} lost: {hosts:?}");
    }
    assert!(
        api.rerouted().is_empty(),
        "mail rerouted: {:?}",
        api.rerouted()
    );
    let ours: Vec<(&str, &str, &str)> = hosts
        .iter()
        .filter(|h| !theirs.contains(h))
        .map(|h| (h.name.as_str(), h.rtype.as_str(), h.address.as_str()))
        .collect();
    assert_eq!(
        ours,
        [
            ("*", "CNAME", "gw.example.net."),
            (
                "_dstack-app-address-wildcard",
                "TXT",
                &*format!("{SERVER}:443")
            )
        ],
        "{hosts:?}"
    );
    let sets = api
        .commands()
        .iter()
        .filter(|c| *c == "namecheap.domains.dns.setHosts")
        .count();
    assert!(
        sets >= 4,
        "two records, a challenge placed and removed: {sets}"
    );
    assert!(!guard.stderr().contains("nc-key"), "the key was logged");
}

#[tokio::test]
async fn namecheap_errors_are_namecheaps_words_and_the_address_is_looked_up() {
    use dstack_mesh::acme::dns01::{
        namecheap::{Namecheap, Settings},
        Provider,
    };
    use e2e::namecheap::NamecheapStandIn;
    let api =
        NamecheapStandIn::start("dstack", "nc-key", "127.0.0.1", &["example.co.uk"], None).await;
    let settings = |key: &str, ip: Option<std::net::Ipv4Addr>| Settings {
        api_url: api.url.clone(),
        api_user: "dstack".into(),
        api_key: key.into(),
        client_ip: ip,
        client_ip_url: api.getip.clone(),
    };
    let wrong = Namecheap::new(settings("nope", None), Duration::from_secs(5)).unwrap();
    let e = wrong.zones().await.unwrap_err().to_string();
    assert!(
        e.contains("API Key is invalid or API access has not been enabled [1011102]"),
        "{e}"
    );
    let elsewhere = Namecheap::new(
        settings("nc-key", Some("203.0.113.7".parse().unwrap())),
        Duration::from_secs(5),
    )
    .unwrap();
    let e = elsewhere.zones().await.unwrap_err().to_string();
    assert!(
        e.contains("Parameter RequestIP is invalid [1011150]"),
        "{e}"
    );
    // No address configured: the one the lookup sees, and a two-label public suffix splits
    // at the registered name.
    let right = Namecheap::new(settings("nc-key", None), Duration::from_secs(5)).unwrap();
    let zone = right
        .zone_for("_acme-challenge.www.example.co.uk")
        .await
        .unwrap();
    assert_eq!(zone.name, "example.co.uk");
    let record = dstack_mesh::acme::dns01::Record {
        name: "_acme-challenge.www.example.co.uk".into(),
        data: Data::Txt("token-1".into()),
        ttl: 30,
        id: None,
    };
    right.create(&zone, &record).await.unwrap();
    let hosts = api.hosts("example.co.uk");
    assert_eq!(hosts.len(), 1);
    assert_eq!(
        (hosts[0].name.as_str(), hosts[0].ttl.as_str()),
        ("_acme-challenge.www", "60"),
        "relative to example.co.uk, TTL raised to Namecheap's least"
    );
    right.delete(&zone, &record).await.unwrap();
    assert!(api.hosts("example.co.uk").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcloud_issues_a_wildcard_with_a_service_account_and_keeps_values_it_does_not_own() {
    use e2e::gcloud::{GcloudStandIn, RrSet};
    let d = Deployment::start().await;
    // More zones than a page holds, and a private zone of the same name that is never chosen.
    let mut zones = vec!["example.test".to_owned()];
    zones.extend((0..60).map(|i| format!("fill{i:03}.test")));
    let refs: Vec<&str> = zones.iter().map(String::as_str).collect();
    let (api, key) = GcloudStandIn::start(
        d.dir.path(),
        "dstack-project",
        &refs,
        Some(d.pebble.challtestsrv_management.clone()),
    )
    .await;
    api.add(RrSet {
        zone: "example-test".into(),
        name: "_acme-challenge.example.test.".into(),
        rtype: "TXT".into(),
        ttl: 300,
        rrdatas: vec!["\"someone-elses\"".into()],
    });
    let key_file = d.dir.path().join("service-account.json");
    std::fs::write(&key_file, &key).unwrap();
    // lego's variables: the key file alone picks the provider; the project is the key's.
    let env = wildcard_env(
        &d,
        vec![
            ("GCE_SERVICE_ACCOUNT_FILE", key_file.display().to_string()),
            ("GCE_API_URL", api.api.clone()),
            ("GCE_POLLING_INTERVAL", "1".to_owned()),
        ],
    );
    let (mut guard, admin) = d.sidecar("gcloud", &env);
    issued_with_records("*.example.test", admin, &mut guard).await;
    let held: Vec<(String, String, Vec<String>)> = api
        .sets()
        .iter()
        .map(|r| (r.rtype.clone(), r.name.clone(), r.rrdatas.clone()))
        .collect();
    // The challenge must be gone and the other value kept.
    assert_holds(
        &held,
        &[
            (
                "CNAME".into(),
                "*.example.test.".into(),
                vec![format!("{GATEWAY}.")],
            ),
            (
                "TXT".into(),
                "_dstack-app-address-wildcard.example.test.".into(),
                vec![format!("\"{SERVER}:443\"")],
            ),
            (
                "TXT".into(),
                "_acme-challenge.example.test.".into(),
                vec!["\"someone-elses\"".into()],
            ),
        ],
    );
    assert_eq!(api.grants(), 1, "one token for every call");
    let requests = api.requests();
    assert!(
        requests
            .iter()
            .filter(|r| r.ends_with("/managedZones"))
            .count()
            >= 2,
        "zones on two pages: {requests:?}"
    );
    assert!(
        requests.iter().any(|r| r.contains("/changes/")),
        "pending changes polled: {requests:?}"
    );
    assert!(
        !guard.stderr().contains("PRIVATE KEY"),
        "the key was logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcloud_renews_an_expired_token_and_refuses_keys_that_cannot_sign() {
    use dstack_mesh::acme::dns01::{
        gcloud::{GoogleCloud, ServiceAccount, Settings},
        Provider, Record,
    };
    use e2e::gcloud::GcloudStandIn;
    let dir = tempfile::tempdir().unwrap();
    let (api, key) = GcloudStandIn::start(dir.path(), "p", &["example.test"], None).await;
    let settings = |json: &str| Settings {
        api_url: api.api.clone(),
        project: "p".into(),
        account: ServiceAccount::from_json(json).unwrap(),
        zone: Some("example-test".into()),
        sync: (Duration::from_millis(100), Duration::from_secs(2)),
    };
    let client = GoogleCloud::new(settings(&key), Duration::from_secs(5)).unwrap();
    let zone = client.zone_for("app.example.test").await.unwrap();
    assert_eq!(zone.id, "example-test");
    // The token expires (the API answers 401): a new one, once, and the call goes through.
    api.revoke_tokens();
    let record = Record {
        name: "_acme-challenge.app.example.test".into(),
        data: Data::Txt("token-1".into()),
        ttl: 60,
        id: None,
    };
    client.create(&zone, &record).await.unwrap();
    assert_eq!(api.grants(), 2);
    client.delete(&zone, &record).await.unwrap();
    assert!(api.sets().is_empty(), "{:?}", api.sets());
    // Another key for the same account: Google's words.
    let other = tempfile::tempdir().unwrap();
    let (forged, _) = e2e::gcloud::service_account(other.path(), "p", &api.token_uri);
    let client = GoogleCloud::new(settings(&forged), Duration::from_secs(5)).unwrap();
    let e = client.zones().await.unwrap_err().to_string();
    assert!(e.contains("invalid_grant: Invalid JWT Signature."), "{e}");
    // A user's credentials are not a service account: a start-up error naming the variable.
    let d = Deployment::start().await;
    let out = dns_check(
        &d,
        &[
            ("DOMAIN", "*.example.test".to_owned()),
            ("TARGET_ENDPOINT", d.backend.addr.to_string()),
            (
                "GCE_SERVICE_ACCOUNT",
                r#"{"type": "authorized_user", "client_id": "x", "refresh_token": "y"}"#.to_owned(),
            ),
        ],
        &[],
    )
    .await;
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(
        text.contains("GCE_SERVICE_ACCOUNT: the service account key does not sign: 'type' is Some(\"authorized_user\")"),
        "{text}"
    );
    assert!(
        !text.contains("refresh_token\": \"y"),
        "the credential was echoed: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ovh_issues_a_wildcard_with_signed_calls_at_the_servers_time() {
    use e2e::ovh::OvhStandIn;
    let d = Deployment::start().await;
    let api = OvhStandIn::start(
        ("ovh-app-key", "ovh-app-secret"),
        "ovh-consumer-key",
        ("oauth-id", "oauth-secret"),
        &["example.test"],
        Some(d.pebble.challtestsrv_management.clone()),
    )
    .await;
    api.add(
        "example.test",
        "_acme-challenge",
        "TXT",
        "\"someone-elses\"",
    );
    // lego's variables: the application key picks the provider.
    let env = wildcard_env(
        &d,
        vec![
            ("OVH_ENDPOINT", api.endpoint.clone()),
            ("OVH_APPLICATION_KEY", "ovh-app-key".to_owned()),
            ("OVH_APPLICATION_SECRET", "ovh-app-secret".to_owned()),
            ("OVH_CONSUMER_KEY", "ovh-consumer-key".to_owned()),
        ],
    );
    let (mut guard, admin) = d.sidecar("ovh", &env);
    issued_with_records("*.example.test", admin, &mut guard).await;
    let held: Vec<(String, String, String)> = api
        .records()
        .iter()
        .map(|r| (r.field_type.clone(), r.sub_domain.clone(), r.target.clone()))
        .collect();
    // Fully qualified, not relative to the zone.
    assert_holds(
        &held,
        &[
            ("CNAME".into(), "*".into(), format!("{GATEWAY}.")),
            (
                "TXT".into(),
                "_dstack-app-address-wildcard".into(),
                format!("\"{SERVER}:443\""),
            ),
        ],
    );
    let challenges: Vec<&(String, String, String)> = held
        .iter()
        .filter(|(_, sub, _)| sub == "_acme-challenge")
        .collect();
    assert_eq!(
        challenges,
        [&(
            "TXT".into(),
            "_acme-challenge".into(),
            "\"someone-elses\"".into()
        )],
        "ours removed, theirs kept"
    );
    assert!(
        api.refreshes() >= 4,
        "every change published: {}",
        api.refreshes()
    );
    let log = guard.stderr();
    for secret in ["ovh-app-secret", "ovh-consumer-key"] {
        assert!(!log.contains(secret), "{secret} was logged");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ovh_oauth2_clients_and_bad_keys_are_answered_in_ovhs_words() {
    use dstack_mesh::acme::dns01::{
        ovh::{Auth, Ovh},
        Provider, Record,
    };
    use e2e::ovh::OvhStandIn;
    let api = OvhStandIn::start(
        ("ak", "as"),
        "ck",
        ("oauth-id", "oauth-secret"),
        &["example.test"],
        None,
    )
    .await;
    let oauth = Ovh::new(
        &api.endpoint,
        Auth::OAuth2 {
            client_id: "oauth-id".into(),
            client_secret: "oauth-secret".into(),
            token_url: api.token_url.clone(),
        },
        Duration::from_secs(5),
    )
    .unwrap();
    let zone = oauth.zone_for("app.example.test").await.unwrap();
    let record = Record {
        name: "_acme-challenge.app.example.test".into(),
        data: Data::Txt("token-1".into()),
        ttl: 30,
        id: None,
    };
    let created = oauth.create(&zone, &record).await.unwrap();
    assert!(
        created
            .id
            .as_deref()
            .is_some_and(|id| id.parse::<u64>().unwrap() > u64::from(u32::MAX)),
        "{created:?}"
    );
    assert_eq!(api.records()[0].ttl, 60, "OVH's least TTL");
    // Deleted by its id, or (from another run) found by its value.
    oauth
        .delete(
            &zone,
            &Record {
                id: None,
                ..record.clone()
            },
        )
        .await
        .unwrap();
    assert!(api.records().is_empty());
    assert_eq!(api.grants(), 1, "one token for every call");
    let signed = |secret: &str, consumer: &str| {
        Ovh::new(
            &api.endpoint,
            Auth::Signed {
                application_key: "ak".into(),
                application_secret: secret.into(),
                consumer_key: consumer.into(),
            },
            Duration::from_secs(5),
        )
        .unwrap()
    };
    let e = signed("wrong", "ck").zones().await.unwrap_err().to_string();
    assert!(
        e.contains("400") && e.contains("Client::BadRequest: Invalid signature"),
        "{e}"
    );
    let e = signed("as", "other").zones().await.unwrap_err().to_string();
    assert!(e.contains("This credential does not exist"), "{e}");
    // Two ways to authorise at once is a start-up error.
    let d = Deployment::start().await;
    let out = dns_check(
        &d,
        &[
            ("DOMAIN", "*.example.test".to_owned()),
            ("TARGET_ENDPOINT", d.backend.addr.to_string()),
            ("OVH_APPLICATION_KEY", "ak".to_owned()),
            ("OVH_APPLICATION_SECRET", "as".to_owned()),
            ("OVH_CONSUMER_KEY", "ck".to_owned()),
            ("OVH_ACCESS_TOKEN", "t".to_owned()),
        ],
        &[],
    )
    .await;
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(text.contains("ovh takes one way to authorise"), "{text}");
}
