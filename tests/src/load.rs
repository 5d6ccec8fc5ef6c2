//! Counting load for fault, rotation and soak runs: callers that send requests one after
//! another, each on its connection (a new one after any failure, or for every request), and
//! count every answer. A failure is anything but a `200` read to its end.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use http::{HeaderName, HeaderValue, Request};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

use crate::client::{empty, ClientBody};

/// How one caller speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// HTTP/1.1, keep-alive.
    H1,
    /// h2 (prior knowledge without TLS, ALPN `h2` with it), one connection for all requests.
    H2,
    /// A new connection and a full handshake for every request, as a browser's first visit.
    Fresh,
}

/// Where the callers send their requests.
#[derive(Clone, Debug)]
pub struct Target {
    /// The listener.
    pub addr: SocketAddr,
    /// TLS (a client config without ALPN, which the caller sets) and the server name, or none.
    pub tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    /// `Host` (HTTP/1.1) or `:authority` (h2).
    pub host: String,
    /// Extra headers on every request (the outbound's target).
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl Target {
    /// Plain HTTP to `addr` (the outbound proxy) with `headers`.
    pub fn plain(addr: SocketAddr, headers: &[(&'static str, &str)]) -> Self {
        Self {
            addr,
            tls: None,
            host: "b".to_owned(),
            headers: headers
                .iter()
                .map(|(k, v)| (HeaderName::from_static(k), v.parse().unwrap()))
                .collect(),
        }
    }

    /// HTTPS to a public domain served at `addr`, verified against `roots_pem`.
    pub fn public(addr: SocketAddr, domain: &str, roots_pem: &[u8]) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        for cert in ratls::cert::parse_chain(roots_pem).unwrap() {
            roots.add(cert).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(ratls::crypto::provider())
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Self {
            addr,
            tls: Some((
                Arc::new(config),
                ServerName::try_from(domain.to_owned()).unwrap(),
            )),
            host: domain.to_owned(),
            headers: Vec::new(),
        }
    }
}

/// What the callers counted; shared with whoever samples it.
#[derive(Debug, Default)]
pub struct Counts {
    ok: AtomicUsize,
    failed: AtomicUsize,
    retried: AtomicUsize,
    /// Latencies (µs) since the last [`Counts::take_latencies`].
    latencies: Mutex<Vec<u32>>,
}

impl Counts {
    /// Requests answered `200`.
    pub fn ok(&self) -> usize {
        self.ok.load(Ordering::SeqCst)
    }

    /// Requests that failed.
    pub fn failed(&self) -> usize {
        self.failed.load(Ordering::SeqCst)
    }

    /// Requests sent again because the server had closed their kept-alive connection.
    pub fn retried(&self) -> usize {
        self.retried.load(Ordering::SeqCst)
    }

    /// The latencies recorded since the last call, sorted.
    pub fn take_latencies(&self) -> Vec<u32> {
        let mut l = std::mem::take(&mut *self.latencies.lock().unwrap());
        l.sort_unstable();
        l
    }
}

/// The `p`-th percentile (0..=100) of sorted `values`, or 0 for none.
pub fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Running callers.
#[derive(Debug)]
pub struct Load {
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// One task per entry of `callers`, each sending `GET /` to `target` and pausing `pause`
    /// between requests.
    pub fn start(target: Target, callers: &[Caller], pause: Duration) -> Self {
        let counts = Arc::new(Counts::default());
        let stop = Arc::new(AtomicBool::new(false));
        let target = Arc::new(target);
        let tasks = callers
            .iter()
            .map(|&caller| {
                let (counts, stop, target) = (counts.clone(), stop.clone(), target.clone());
                tokio::spawn(async move {
                    let mut conn = None;
                    while !stop.load(Ordering::SeqCst) {
                        let started = Instant::now();
                        match request(&target, caller, &mut conn, &counts).await {
                            Ok(()) => {
                                counts.ok.fetch_add(1, Ordering::SeqCst);
                                let micros = started.elapsed().as_micros();
                                counts
                                    .latencies
                                    .lock()
                                    .unwrap()
                                    .push(u32::try_from(micros).unwrap_or(u32::MAX));
                            }
                            Err(e) => {
                                eprintln!(
                                    "load ({caller:?} to {} at {}): request failed: {e}",
                                    target.host, target.addr
                                );
                                counts.failed.fetch_add(1, Ordering::SeqCst);
                                conn = None;
                            }
                        }
                        if caller == Caller::Fresh {
                            conn = None;
                        }
                        tokio::time::sleep(pause).await;
                    }
                })
            })
            .collect();
        Self {
            counts,
            stop,
            tasks,
        }
    }

    /// The counts, live.
    pub fn counts(&self) -> Arc<Counts> {
        self.counts.clone()
    }

    /// Requests answered so far.
    pub fn ok(&self) -> usize {
        self.counts.ok()
    }

    /// Stop after the requests in flight; `(ok, failed)`.
    pub async fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        for task in self.tasks {
            task.await.unwrap();
        }
        (self.counts.ok(), self.counts.failed())
    }
}

enum Conn {
    H1(hyper::client::conn::http1::SendRequest<ClientBody>),
    H2(hyper::client::conn::http2::SendRequest<ClientBody>),
}

async fn connect(target: &Target, caller: Caller) -> Result<Conn, String> {
    let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(target.addr))
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| format!("connect: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let h2 = caller == Caller::H2;
    match &target.tls {
        None => handshake(TokioIo::new(tcp), h2).await,
        Some((config, name)) => {
            let mut config = (**config).clone();
            config.alpn_protocols = vec![if h2 {
                b"h2".to_vec()
            } else {
                b"http/1.1".to_vec()
            }];
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config));
            let stream =
                tokio::time::timeout(Duration::from_secs(10), tls.connect(name.clone(), tcp))
                    .await
                    .map_err(|_| "TLS handshake timed out".to_owned())?
                    .map_err(|e| format!("TLS handshake: {e}"))?;
            handshake(TokioIo::new(stream), h2).await
        }
    }
}

async fn handshake<T>(io: TokioIo<T>, h2: bool) -> Result<Conn, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    if h2 {
        let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| format!("h2 handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(Conn::H2(send))
    } else {
        let (send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("HTTP/1.1 handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(Conn::H1(send))
    }
}

/// Why a request failed.
enum Failure {
    /// The server had closed the kept-alive connection before it took the request (a GOAWAY,
    /// an idle close racing the send): an idempotent request is sent again, as every HTTP
    /// client does (RFC 9112 §9.3.1).
    Closed(String),
    /// Anything else: a failed request.
    Failed(String),
}

/// One request, on `conn` if it is open (sent again once on a new connection if the server had
/// closed it), else on a new one.
async fn request(
    target: &Target,
    caller: Caller,
    conn: &mut Option<Conn>,
    counts: &Counts,
) -> Result<(), String> {
    let reused = conn.is_some();
    match attempt(target, caller, conn).await {
        Ok(()) => Ok(()),
        Err(Failure::Closed(_)) if reused => {
            counts.retried.fetch_add(1, Ordering::SeqCst);
            *conn = None;
            attempt(target, caller, conn).await.map_err(|f| match f {
                Failure::Closed(e) | Failure::Failed(e) => e,
            })
        }
        Err(Failure::Closed(e) | Failure::Failed(e)) => Err(e),
    }
}

/// One request on `conn` (dialled first if there is none), read to its end within 10 s.
async fn attempt(target: &Target, caller: Caller, conn: &mut Option<Conn>) -> Result<(), Failure> {
    if conn.is_none() {
        *conn = Some(connect(target, caller).await.map_err(Failure::Failed)?);
    }
    let mut req = Request::get(format!("http://{}/", target.host));
    for (k, v) in &target.headers {
        req = req.header(k, v);
    }
    // Not sent at all, closed before an answer, or refused unprocessed by h2 (RST_STREAM
    // REFUSED_STREAM, or above a GOAWAY's last stream: RFC 9113 §8.7 lets a client retry).
    let closed = |mut e: hyper::client::conn::TrySendError<Request<ClientBody>>| {
        let unsent = e.take_message().is_some();
        let e = e.into_error();
        // A stream above a graceful GOAWAY's last stream id ends with the GOAWAY's NO_ERROR.
        let refused = std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<h2::Error>())
            .is_some_and(|h| {
                h.reason() == Some(h2::Reason::REFUSED_STREAM)
                    || (h.is_go_away() && h.is_remote() && h.reason() == Some(h2::Reason::NO_ERROR))
            });
        let chain = ratls::error_chain(&e);
        if unsent || refused || e.is_closed() || e.is_canceled() || e.is_incomplete_message() {
            Failure::Closed(chain)
        } else {
            Failure::Failed(chain)
        }
    };
    let send = async {
        let resp = match conn.as_mut().expect("dialled above") {
            Conn::H1(s) => {
                let req = req.header(http::header::HOST, &target.host);
                s.ready()
                    .await
                    .map_err(|e| Failure::Closed(e.to_string()))?;
                s.try_send_request(req.body(empty()).unwrap()).await
            }
            Conn::H2(s) => {
                s.ready()
                    .await
                    .map_err(|e| Failure::Closed(e.to_string()))?;
                s.try_send_request(req.body(empty()).unwrap()).await
            }
        }
        .map_err(closed)?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| Failure::Failed(format!("{status}, body: {}", ratls::error_chain(&e))))?
            .to_bytes();
        if status == http::StatusCode::OK {
            Ok(())
        } else {
            let body = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
            Err(Failure::Failed(format!("status {status}: {body}")))
        }
    };
    tokio::time::timeout(Duration::from_secs(10), send)
        .await
        .map_err(|_| Failure::Failed("no answer within 10 s".to_owned()))?
}

/// Resident memory (KiB) and open file descriptors of process `pid`.
pub fn footprint(pid: u32) -> (u64, usize) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    (crate::proc_status_kib(pid, "VmRSS"), fds)
}
