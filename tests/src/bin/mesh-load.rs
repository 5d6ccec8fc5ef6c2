//! mesh-load: the load client for `scripts/bench`. wrk cannot present a client certificate, so
//! this one can: plain HTTP, TLS, or mTLS with a development-agent identity, HTTP/1.1 keep-alive
//! or h2, or a new connection (full handshake) per request. It also speaks to a public domain
//! as a browser does (WebPKI against a given root, the domain as SNI and Host, no client
//! certificate). It also serves the benchmark's
//! backend, and reads CPU time and RSS of the processes under test from /proc.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark tool: a failure is a failed run

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use ratls::{
    agent::AgentClient,
    identity::{IdentityConfig, RotatingIdentity},
    tls::mesh_client_config,
    verifier::ServerVerifier,
    AppId, Policy,
};
use rustls_pki_types::{pem::PemObject, CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
#[command(about = "load client and backend for scripts/bench")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve `200 ok` (12 bytes) to every request, on one thread.
    Backend {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Write an identity's key, chain and root as nginx reads them.
    Identity {
        #[arg(long)]
        agent: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Run load and print one JSON line of results.
    Run(Box<RunArgs>),
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Plain HTTP.
    Plain,
    /// TLS without a client certificate.
    Tls,
    /// TLS with the identity's client certificate.
    Mtls,
    /// TLS to a public domain: WebPKI verification against `--ca` for `--sni`, no client
    /// certificate, no agent.
    Public,
}

#[derive(clap::Args, Clone)]
struct RunArgs {
    /// Name of the scenario (echoed in the output).
    #[arg(long)]
    name: String,
    #[arg(long)]
    addr: SocketAddr,
    #[arg(long, value_enum)]
    mode: Mode,
    /// Guest agent of the client identity (tls, mtls).
    #[arg(long)]
    agent: Option<String>,
    /// App id the server must prove (tls, mtls).
    #[arg(long)]
    expect: Option<AppId>,
    /// Server name for SNI, certificate verification and the Host header (public).
    #[arg(long)]
    sni: Option<String>,
    /// Server names, one per line, instead of `--sni`: each new connection takes the next
    /// (public; a sidecar serving many domains, visited across all of them).
    #[arg(long)]
    sni_file: Option<PathBuf>,
    /// Root certificates (PEM) the server's chain must lead to (public).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Offer h2 (otherwise HTTP/1.1).
    #[arg(long)]
    h2: bool,
    /// Key exchange groups offered: dstack-mesh's own (X25519MLKEM768 first) or only
    /// X25519, as a client without ML-KEM.
    #[arg(long, value_enum, default_value = "hybrid")]
    kx: Kx,
    /// Start every connection with a PROXY v2 header, as the dstack gateway does for a port
    /// with `pp: true`.
    #[arg(long)]
    proxy_v2: bool,
    /// Concurrent connections (or, with --h2, concurrent streams over one connection each).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Seconds of warm-up, not measured.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Seconds measured.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// A new connection (full handshake) for every request.
    #[arg(long)]
    new_connections: bool,
    /// Instead of load: open this many idle keep-alive connections and report the RSS added.
    #[arg(long)]
    idle: Option<usize>,
    /// Processes whose CPU time and RSS are measured.
    #[arg(long = "pid")]
    pids: Vec<u32>,
    /// An extra request header, `name:value` (repeatable): the outbound proxy's target.
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Hold the total request rate at this many per second (latency at moderate load)
    /// instead of sending as fast as answers come.
    #[arg(long)]
    rate: Option<u64>,
    /// Instead of load: one streamed POST of this many bytes (plain HTTP), reporting the
    /// throughput and each process's peak RSS while it ran.
    #[arg(long)]
    upload_bytes: Option<u64>,
    /// A shell command run when the measured window opens, with no request in flight (the
    /// load pauses around it): `callgrind_control -i on`, starting `perf stat`.
    #[arg(long)]
    on_measure_start: Option<String>,
    /// The same when the window closes, again with no request in flight: the requests counted
    /// are exactly those the processes served between the two commands.
    #[arg(long)]
    on_measure_end: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Kx {
    Hybrid,
    X25519,
}

/// The crypto provider of `--kx`.
fn provider(args: &RunArgs) -> Arc<rustls::crypto::CryptoProvider> {
    match args.kx {
        Kx::Hybrid => ratls::crypto::provider(),
        Kx::X25519 => ratls::crypto::provider_with_groups(&[rustls::NamedGroup::X25519]),
    }
}

fn main() {
    let cli = Cli::parse();
    ratls::crypto::install_default();
    match cli.command {
        Cmd::Backend { listen } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(backend(listen));
        }
        Cmd::Identity { agent, out } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(e2e::write_nginx_identity(agent.parse().unwrap(), &out));
        }
        Cmd::Run(args) => {
            // One worker: the load client must leave the other core to the proxy under test.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(run(*args));
        }
    }
}

async fn backend(listen: SocketAddr) {
    let listener = TcpListener::bind(listen).await.unwrap();
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|req: Request<Incoming>| async {
                // Read what was sent (uploads) before answering.
                let mut body = req.into_body();
                while let Some(frame) = body.frame().await {
                    if frame.is_err() {
                        break;
                    }
                }
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                    b"ok from app\n",
                ))))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// Everything a connection needs: where, and how to do TLS.
struct Dialer {
    addr: SocketAddr,
    tls: Option<tokio_rustls::TlsConnector>,
    /// The server names (SNI) with the Host header and the authority of the request URI of
    /// each: a new connection takes the next.
    names: Vec<(ServerName<'static>, String)>,
    next: std::sync::atomic::AtomicUsize,
    h2: bool,
    headers: Vec<(http::HeaderName, http::HeaderValue)>,
    proxy_v2: bool,
}

/// A PROXY v2 header for an IPv4 TCP connection from `source` to `destination`.
fn proxy_v2_header(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    for a in [source, destination] {
        match a.ip() {
            std::net::IpAddr::V4(ip) => h.extend_from_slice(&ip.octets()),
            std::net::IpAddr::V6(_) => h.extend_from_slice(&[127, 0, 0, 1]),
        }
    }
    h.extend_from_slice(&source.port().to_be_bytes());
    h.extend_from_slice(&destination.port().to_be_bytes());
    h
}

/// A connection, and which of the dialer's names it was made for.
enum Conn {
    H1(Sender, usize),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>, usize),
}

impl Dialer {
    async fn connect(&self) -> std::io::Result<Conn> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.names.len();
        let (name, _) = &self.names[i];
        let mut tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        if self.proxy_v2 {
            let header = proxy_v2_header(tcp.local_addr()?, self.addr);
            tokio::io::AsyncWriteExt::write_all(&mut tcp, &header).await?;
        }
        match &self.tls {
            None => Ok(Conn::H1(h1(TokioIo::new(tcp)).await?, i)),
            Some(tls) => {
                let stream = tls.connect(name.clone(), tcp).await?;
                if self.h2 {
                    let (send, conn) = hyper::client::conn::http2::handshake(
                        TokioExecutor::new(),
                        TokioIo::new(stream),
                    )
                    .await
                    .map_err(std::io::Error::other)?;
                    tokio::spawn(conn);
                    Ok(Conn::H2(send, i))
                } else {
                    Ok(Conn::H1(h1(TokioIo::new(stream)).await?, i))
                }
            }
        }
    }
}

async fn h1<T>(io: TokioIo<T>) -> std::io::Result<Sender>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    Ok(send)
}

impl Conn {
    async fn get(&mut self, dialer: &Dialer) -> Result<(), String> {
        let (Self::H1(_, i) | Self::H2(_, i)) = self;
        let host = &dialer.names[*i].1;
        let mut req = Request::get(format!("https://{host}/bench"))
            .header("host", host)
            .body(Empty::new())
            .unwrap();
        for (k, v) in &dialer.headers {
            req.headers_mut().insert(k, v.clone());
        }
        let resp = match self {
            Self::H1(s, _) => {
                s.ready().await.map_err(|e| e.to_string())?;
                s.send_request(req).await
            }
            Self::H2(s, _) => {
                s.ready().await.map_err(|e| e.to_string())?;
                s.send_request(req).await
            }
        }
        .map_err(|e| e.to_string())?;
        let status = resp.status();
        resp.into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("status {status}"))
        }
    }
}

fn headers(args: &RunArgs) -> Vec<(http::HeaderName, http::HeaderValue)> {
    args.headers
        .iter()
        .map(|h| {
            let (k, v) = h.split_once(':').expect("--header name:value");
            (k.trim().parse().unwrap(), v.trim().parse().unwrap())
        })
        .collect()
}

fn alpn(args: &RunArgs) -> Vec<Vec<u8>> {
    if args.h2 {
        vec![b"h2".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    }
}

async fn dialer(args: &RunArgs) -> (Dialer, Option<RotatingIdentity>) {
    let name = ServerName::try_from("bench.local").unwrap();
    let host = "bench.local".to_owned();
    match args.mode {
        Mode::Plain => {
            return (
                Dialer {
                    addr: args.addr,
                    tls: None,
                    names: vec![(name, host)],
                    next: Default::default(),
                    h2: false,
                    headers: headers(args),
                    proxy_v2: args.proxy_v2,
                },
                None,
            )
        }
        Mode::Public => return (public_dialer(args), None),
        Mode::Tls | Mode::Mtls => {}
    }
    let agent = args.agent.as_deref().expect("--agent for tls/mtls");
    let (client, info) =
        AgentClient::discover(vec![agent.parse().unwrap()], Duration::from_secs(5))
            .await
            .unwrap();
    let identity = RotatingIdentity::start(client, info, IdentityConfig::default())
        .await
        .unwrap();
    let anchors = identity.current().trust_anchors().unwrap();
    let policy = Arc::new(Policy::new(anchors).expect(args.expect.clone().expect("--expect")));
    let mut config = mesh_client_config(identity.resolver(), policy.clone()).unwrap();
    if args.kx != Kx::Hybrid {
        // The mesh's own config with another provider: same verifier, resolver and ALPN.
        let alpn = config.alpn_protocols.clone();
        config = rustls::ClientConfig::builder_with_provider(provider(args))
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ServerVerifier::new(policy)))
            .with_client_cert_resolver(Arc::new(identity.resolver()));
        config.resumption = rustls::client::Resumption::disabled();
        config.alpn_protocols = alpn;
    }
    if args.mode == Mode::Tls {
        // Same server verification, no client certificate.
        let mut anonymous = config.clone();
        anonymous.client_auth_cert_resolver = Arc::new(NoClientCert);
        config = anonymous;
    }
    config.alpn_protocols = alpn(args);
    no_resumption(&mut config, args);
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config));
    (
        Dialer {
            addr: args.addr,
            tls: Some(tls),
            names: vec![(name, host)],
            next: Default::default(),
            h2: args.h2,
            headers: headers(args),
            proxy_v2: args.proxy_v2,
        },
        Some(identity),
    )
}

/// `--new-connections` measures full handshakes: a resumed session skips the certificate
/// signature, and servers differ in whether they issue tickets at all.
fn no_resumption(config: &mut rustls::ClientConfig, args: &RunArgs) {
    if args.new_connections {
        config.resumption = rustls::client::Resumption::disabled();
    }
}

/// A browser's view of a public domain: the roots in `--ca`, `--sni` as the name.
fn public_dialer(args: &RunArgs) -> Dialer {
    let names: Vec<String> = match (&args.sni_file, &args.sni) {
        (Some(file), _) => std::fs::read_to_string(file)
            .expect("--sni-file is readable")
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect(),
        (None, Some(sni)) => vec![sni.clone()],
        (None, None) => panic!("--sni or --sni-file for public"),
    };
    assert!(!names.is_empty(), "no server name in --sni-file");
    let ca = args.ca.as_deref().expect("--ca for public");
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("--ca is a PEM file") {
        roots.add(cert.expect("a PEM certificate")).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider(args))
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn(args);
    no_resumption(&mut config, args);
    Dialer {
        addr: args.addr,
        tls: Some(tokio_rustls::TlsConnector::from(Arc::new(config))),
        names: names
            .into_iter()
            .map(|n| (ServerName::try_from(n.clone()).expect("a DNS name"), n))
            .collect(),
        next: Default::default(),
        h2: args.h2,
        headers: headers(args),
        proxy_v2: args.proxy_v2,
    }
}

/// Presents no client certificate (plain TLS scenarios).
#[derive(Debug)]
struct NoClientCert;

impl rustls::client::ResolvesClientCert for NoClientCert {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        None
    }

    fn has_certs(&self) -> bool {
        false
    }
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the ')'.
    (ticks(11) + ticks(12)) / 100.0
}

async fn run(args: RunArgs) {
    let (dialer, _identity) = dialer(&args).await;
    let dialer = Arc::new(dialer);
    if let Some(n) = args.idle {
        return idle(&args, &dialer, n).await;
    }
    if let Some(bytes) = args.upload_bytes {
        return upload(&args, bytes).await;
    }
    // At a fixed rate, each connection sends its share on a timer.
    let period = args
        .rate
        .map(|r| Duration::from_secs_f64(args.connections as f64 / r.max(1) as f64));
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    // With hooks, each request holds the gate shared and a hook holds it alone, so a hook
    // runs between requests, never across one.
    let hooked = args.on_measure_start.is_some() || args.on_measure_end.is_some();
    let gate = hooked.then(|| Arc::new(tokio::sync::RwLock::new(())));
    let mut tasks = Vec::new();
    for _ in 0..args.connections {
        let dialer = dialer.clone();
        let (stop, measuring, gate) = (stop.clone(), measuring.clone(), gate.clone());
        let new_connections = args.new_connections;
        tasks.push(tokio::spawn(async move {
            let mut latencies: Vec<u32> = Vec::with_capacity(1 << 16);
            let mut errors = 0u64;
            let mut conn = None;
            let mut ticks = period.map(|p| {
                let mut t = tokio::time::interval(p);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                t
            });
            while !stop.load(Ordering::Relaxed) {
                if let Some(t) = ticks.as_mut() {
                    t.tick().await;
                }
                let _turn = match &gate {
                    Some(g) => Some(g.read().await),
                    None => None,
                };
                let start = Instant::now();
                if conn.is_none() || new_connections {
                    match dialer.connect().await {
                        Ok(c) => conn = Some(c),
                        Err(_) => {
                            errors += 1;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    }
                }
                let ok = match conn.as_mut() {
                    Some(c) => c.get(&dialer).await.is_ok(),
                    None => false,
                };
                if !ok {
                    conn = None;
                }
                if measuring.load(Ordering::Relaxed) {
                    if ok {
                        latencies
                            .push(start.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                    } else {
                        errors += 1;
                    }
                }
            }
            (latencies, errors)
        }));
    }
    tokio::time::sleep(Duration::from_secs(args.warmup)).await;
    let paused = match &gate {
        Some(g) => Some(g.write().await),
        None => None,
    };
    hook(args.on_measure_start.as_deref()).await;
    let cpu_before: f64 = args.pids.iter().map(|p| cpu_seconds(*p)).sum();
    let started = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    drop(paused);
    tokio::time::sleep(Duration::from_secs(args.duration)).await;
    let paused = match &gate {
        Some(g) => Some(g.write().await),
        None => None,
    };
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_after: f64 = args.pids.iter().map(|p| cpu_seconds(*p)).sum();
    stop.store(true, Ordering::Relaxed);
    hook(args.on_measure_end.as_deref()).await;
    drop(paused);
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (lat, err) = t.await.unwrap();
        all.extend(lat);
        errors += err;
    }
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map_or(0.0, |us| f64::from(*us) / 1000.0)
    };
    let requests = all.len();
    let cpu = cpu_after - cpu_before;
    let out = serde_json::json!({
        "name": args.name,
        "requests": requests,
        "errors": errors,
        "rps": requests as f64 / elapsed,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "cpu_s": cpu,
        "cpu_us_per_request": if requests > 0 && !args.pids.is_empty() { cpu * 1e6 / requests as f64 } else { 0.0 },
    });
    println!("{out}");
}

/// Run a measurement hook to its end; one that fails spoils the figures, so it stops the run.
async fn hook(command: Option<&str>) {
    let Some(command) = command else { return };
    let status = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .status()
        .await
        .expect("sh runs");
    assert!(
        status.success(),
        "measurement hook `{command}` failed: {status}"
    );
}

async fn idle(args: &RunArgs, dialer: &Arc<Dialer>, n: usize) {
    let rss = |pids: &[u32]| {
        pids.iter()
            .map(|p| e2e::proc_status_kib(*p, "VmRSS"))
            .sum::<u64>()
    };
    let before = rss(&args.pids);
    let mut conns = Vec::with_capacity(n);
    let mut failed = 0;
    for _ in 0..n {
        match dialer.connect().await {
            Ok(mut c) => {
                // One request each, so the connection is past its handshake and at rest.
                if c.get(dialer).await.is_err() {
                    failed += 1;
                }
                conns.push(c);
            }
            Err(_) => failed += 1,
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss(&args.pids);
    let out = serde_json::json!({
        "name": args.name,
        "idle_connections": conns.len(),
        "failed": failed,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "rss_added_mib": (after as f64 - before as f64) / 1024.0,
    });
    println!("{out}");
}

/// A megabyte of zeros, sent again and again without copying.
static ZEROS: [u8; 1 << 20] = [0; 1 << 20];

async fn upload(args: &RunArgs, bytes: u64) {
    let tcp = TcpStream::connect(args.addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let (tx, body) = e2e::backend::ChannelBody::pair();
    let mut req = Request::post("/upload")
        .header("host", "bench.local")
        .body(body)
        .unwrap();
    for (k, v) in headers(args) {
        req.headers_mut().insert(k, v);
    }
    let pids = args.pids.clone();
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        tokio::spawn(async move {
            let mut peak = vec![0u64; pids.len()];
            while sampling.load(Ordering::Relaxed) {
                for (i, pid) in pids.iter().enumerate() {
                    peak[i] = peak[i].max(e2e::proc_status_kib(*pid, "VmRSS"));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            peak
        })
    };
    let started = Instant::now();
    let feeder = tokio::spawn(async move {
        let mut left = bytes;
        while left > 0 {
            let n = left.min(ZEROS.len() as u64) as usize;
            if tx.send(Bytes::from_static(&ZEROS[..n])).await.is_err() {
                break;
            }
            left -= n as u64;
        }
    });
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status();
    resp.into_body().collect().await.unwrap();
    feeder.await.unwrap();
    let seconds = started.elapsed().as_secs_f64();
    sampling.store(false, Ordering::Relaxed);
    let peak = sampler.await.unwrap();
    let out = serde_json::json!({
        "name": args.name,
        "status": status.as_u16(),
        "bytes": bytes,
        "seconds": seconds,
        "mib_per_s": bytes as f64 / (1 << 20) as f64 / seconds,
        "peak_rss_mib": peak.iter().map(|k| *k as f64 / 1024.0).collect::<Vec<_>>(),
    });
    println!("{out}");
}
