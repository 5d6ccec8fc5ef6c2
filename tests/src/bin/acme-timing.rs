//! acme-timing: how long `dstack-mesh run` takes from spawn to serving a public domain's
//! certificate issued by pebble, for `scripts/bench`.
//!
//! For each challenge (TLS-ALPN-01 on the inbound port, HTTP-01 on the `:80` listener) and each
//! run: a fresh pebble and a fresh store, spawn the sidecar, and poll a TLS handshake to the
//! inbound port every 5 ms with the domain as SNI, verifying against pebble's issuance root;
//! the first handshake that succeeds ends the measurement. Then, once it has stored the CA's
//! renewal-window answer, kill the sidecar, spawn it again on the same store and measure again,
//! counting pebble's orders and requests (none expected).
//! The times include process start and the agent handshake; the sidecar's own
//! `certificate issued and served` log line (`elapsed_ms`) gives the order alone.
//!
//! Prints one JSON line per challenge and phase: median, min and max over the runs.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark tool: a failure is a failed run

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Parser;
use e2e::{
    dev_agent, mesh_binary,
    pebble::{Pebble, PebbleOptions},
    ChildGuard,
};
use rustls::{ClientConfig, ClientConnection, RootCertStore};
use rustls_pki_types::{pem::PemObject, CertificateDer, ServerName};

const APP: &str = "71e171e171e171e171e171e171e171e171e171e1";
const CALLER: &str = "ca11e7ca11e7ca11e7ca11e7ca11e7ca11e7ca11";
const DOMAIN: &str = "timing.acme.test";
/// Pause between handshake attempts.
const POLL: Duration = Duration::from_millis(5);
/// A sidecar that serves nothing by then has failed.
const LIMIT: Duration = Duration::from_secs(30);
/// Connect and handshake deadline of one attempt.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// After a restart has served, how long to keep watching for requests to the CA.
const SETTLE: Duration = Duration::from_millis(500);
/// The sidecar's log line when a certificate is issued (with `elapsed_ms`).
const ISSUED: &str = "certificate issued and served";
/// pebble logs one line per request it handles.
const PEBBLE_REQUEST: &str = "-> calling handler()";

#[derive(Parser)]
#[command(about = "time from start to a served ACME certificate with pebble")]
struct Cli {
    /// Measurements per challenge and phase.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Keep pebble's and the sidecars' files and logs here (default: a temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// One start of the sidecar, in milliseconds from spawn.
struct Sample {
    /// First TCP connection accepted on the inbound port.
    listening: f64,
    /// First TLS handshake with the domain's certificate.
    served: f64,
    /// The sidecar's `elapsed_ms` for the order, if it ordered.
    order: Option<f64>,
    /// Of that, from `ordering a certificate` to `ACME account ready` in its log (directory,
    /// nonce, account key from the agent, new-account).
    account: Option<f64>,
}

fn main() {
    let cli = Cli::parse();
    ratls::crypto::install_default();
    let tmp = tempfile::tempdir().unwrap();
    let dir = cli.dir.clone().unwrap_or_else(|| tmp.path().to_owned());
    std::fs::create_dir_all(&dir).unwrap();
    let (_agent, socket) = dev_agent(&dir, "agent", APP, &dir.join("state"));
    // Handshakes never reach the backend; it only has to be an address.
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = backend.local_addr().unwrap();
    for challenge in ["tls-alpn-01", "http-01"] {
        let (mut fresh, mut restart) = (Vec::new(), Vec::new());
        let (mut orders, mut new_orders, mut ca_requests) = (Vec::new(), Vec::new(), Vec::new());
        for run in 0..cli.runs {
            let run_dir = dir.join(format!("{challenge}-{run}"));
            // Held until pebble and challtestsrv have taken their own ports, so neither can
            // be handed one of the sidecar's (seen: challtestsrv's DNS on the HTTP-01 port).
            let held = [bind_any(), bind_any()];
            let port = |l: &TcpListener| l.local_addr().unwrap().port();
            let (inbound, http) = (port(&held[0]), port(&held[1]));
            let pebble = Pebble::start(
                &run_dir.join("pebble"),
                PebbleOptions {
                    tls_port: inbound,
                    http_port: http,
                    ..PebbleOptions::default()
                },
            );
            drop(held);
            let client = client_config(&pebble.issuance_root_pem());
            let config = run_dir.join("dstack-mesh.toml");
            std::fs::write(
                &config,
                config_text(
                    &socket, &run_dir, &pebble, backend, inbound, http, challenge,
                ),
            )
            .unwrap();
            let addr = SocketAddr::from(([127, 0, 0, 1], inbound));
            fresh.push(measure(&run_dir, "fresh", &config, addr, &client));
            orders.push(pebble.orders_seen());
            let (orders_before, requests_before) = (pebble.orders_seen(), requests(&pebble));
            let sample = measure(&run_dir, "restart", &config, addr, &client);
            restart.push(sample);
            new_orders.push(pebble.orders_seen() - orders_before);
            ca_requests.push(requests(&pebble) - requests_before);
        }
        println!(
            "{}",
            serde_json::json!({
                "name": format!("acme_fresh_{challenge}"),
                "challenge": challenge,
                "runs": fresh.len(),
                "served_ms": stats(fresh.iter().map(|s| s.served)),
                "listening_ms": stats(fresh.iter().map(|s| s.listening)),
                "order_ms": stats(fresh.iter().filter_map(|s| s.order)),
                "account_ms": stats(fresh.iter().filter_map(|s| s.account)),
                "orders": orders,
            })
        );
        println!(
            "{}",
            serde_json::json!({
                "name": format!("acme_restart_{challenge}"),
                "challenge": challenge,
                "runs": restart.len(),
                "served_ms": stats(restart.iter().map(|s| s.served)),
                "listening_ms": stats(restart.iter().map(|s| s.listening)),
                "reordered": restart.iter().filter(|s| s.order.is_some()).count(),
                "new_orders": new_orders,
                "ca_requests": ca_requests,
            })
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn config_text(
    socket: &Path,
    dir: &Path,
    pebble: &Pebble,
    backend: SocketAddr,
    inbound: u16,
    http: u16,
    challenge: &str,
) -> String {
    format!(
        "[agent]\naddress = \"unix:{sock}\"\n\n\
         [inbound]\nlisten = \"127.0.0.1:{inbound}\"\nbackend = \"{backend}\"\nallowed_apps = \"{CALLER}\"\n\n\
         [auth]\nenabled = false\n\n[client]\nenabled = false\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [acme]\nstore = \"{store}\"\nissuer = \"{directory}\"\nca_roots = [\"{ca}\"]\n\
         http_listen = \"127.0.0.1:{http}\"\nretry_min = \"1s\"\nemail = \"ops@example.test\"\n\n\
         [[domains]]\nnames = [\"{DOMAIN}\"]\nbackend = \"{backend}\"\nchallenge = \"{challenge}\"\n",
        sock = socket.display(),
        store = dir.join("store").display(),
        directory = pebble.directory,
        ca = pebble.ca_file.display(),
    )
}

/// WebPKI against pebble's issuance root, as a browser that trusts it would verify.
fn client_config(root_pem: &str) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = ClientConfig::builder_with_provider(ratls::crypto::provider())
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

fn bind_any() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").expect("a free port")
}

/// Spawn the sidecar and poll until the domain's certificate is served; the sidecar is killed
/// on return.
fn measure(
    dir: &Path,
    phase: &str,
    config: &Path,
    addr: SocketAddr,
    client: &Arc<ClientConfig>,
) -> Sample {
    let mut cmd = Command::new(mesh_binary());
    cmd.args(["--log-format", "json", "run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .env_remove("DSTACK_AGENT_ADDRESS");
    let start = Instant::now();
    let mut guard = ChildGuard::spawn(&format!("mesh-{phase}"), cmd, dir).unwrap();
    let mut listening = None;
    let served = loop {
        guard.assert_running();
        assert!(
            start.elapsed() < LIMIT,
            "{phase}: no certificate served within {LIMIT:?}:\n{}",
            guard.stderr()
        );
        match handshake(addr, client) {
            Ok(()) => break ms(start.elapsed()),
            Err(Attempt::Refused) => {}
            Err(Attempt::Tls) => {
                listening.get_or_insert_with(|| ms(start.elapsed()));
            }
        }
        std::thread::sleep(POLL);
    };
    // The order's own duration: logged just before the certificate is served. And before a
    // restart, the first run's last word with the CA after serving (its renewal window, kept
    // beside the certificate), so the restart measures a sidecar that had settled.
    let mut log = Vec::new();
    let window = dir.join("store/certs").join(DOMAIN).join("ari.json");
    let until = Instant::now() + SETTLE;
    while Instant::now() < until {
        log = json_lines(&guard.stderr());
        if message(&log, ISSUED).is_some() && (phase != "fresh" || window.exists()) {
            break;
        }
        std::thread::sleep(POLL);
    }
    let account = match (
        message(&log, "ordering a certificate"),
        message(&log, "ACME account ready"),
    ) {
        (Some(from), Some(to)) => seconds_of_day(to)
            .zip(seconds_of_day(from))
            .map(|(to, from)| (to - from).rem_euclid(86_400.0) * 1000.0),
        _ => None,
    };
    Sample {
        listening: listening.unwrap_or(served),
        served,
        order: message(&log, ISSUED).and_then(|v| v["fields"]["elapsed_ms"].as_f64()),
        account,
    }
}

enum Attempt {
    /// Nothing listening yet.
    Refused,
    /// Listening, but no certificate for the domain (an alert) or one that does not verify.
    Tls,
}

fn handshake(addr: SocketAddr, config: &Arc<ClientConfig>) -> Result<(), Attempt> {
    let mut tcp =
        TcpStream::connect_timeout(&addr, ATTEMPT_TIMEOUT).map_err(|_| Attempt::Refused)?;
    tcp.set_read_timeout(Some(ATTEMPT_TIMEOUT))
        .map_err(|_| Attempt::Tls)?;
    tcp.set_write_timeout(Some(ATTEMPT_TIMEOUT))
        .map_err(|_| Attempt::Tls)?;
    let name = ServerName::try_from(DOMAIN).unwrap();
    let mut tls = ClientConnection::new(config.clone(), name).map_err(|_| Attempt::Tls)?;
    while tls.is_handshaking() {
        tls.complete_io(&mut tcp).map_err(|_| Attempt::Tls)?;
    }
    Ok(())
}

fn json_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The first line of the sidecar's JSON log with this message.
fn message<'a>(log: &'a [serde_json::Value], text: &str) -> Option<&'a serde_json::Value> {
    log.iter().find(|v| v["fields"]["message"] == text)
}

/// Seconds since midnight of a line's `timestamp` (`2026-01-01T12:34:56.789012Z`).
fn seconds_of_day(line: &serde_json::Value) -> Option<f64> {
    let time = line["timestamp"].as_str()?.split_once('T')?.1;
    let mut parts = time.trim_end_matches('Z').split(':');
    let (h, m, s) = (parts.next()?, parts.next()?, parts.next()?);
    Some(h.parse::<f64>().ok()? * 3600.0 + m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?)
}

fn requests(pebble: &Pebble) -> usize {
    pebble
        .log()
        .lines()
        .filter(|l| l.contains(PEBBLE_REQUEST))
        .count()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn stats(values: impl Iterator<Item = f64>) -> serde_json::Value {
    let mut v: Vec<f64> = values.collect();
    if v.is_empty() {
        return serde_json::Value::Null;
    }
    v.sort_by(f64::total_cmp);
    serde_json::json!({
        "median": v[v.len() / 2],
        "min": v[0],
        "max": v[v.len() - 1],
    })
}
