//! A PCCS stand-in (Intel's v4 API, as a caching PCCS serves it): the mock PCCS's recorded
//! answers, bodies and issuer-chain headers as `dstack-mock-attestation serve` sent them, on
//! the four paths the keeper asks; switchable at any time to the ways a real one fails.

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::task::{AbortHandle, JoinHandle};

/// How the stand-in answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The recorded collateral.
    None,
    /// Not listening: connections are refused, and those open are closed.
    Down,
    /// `500` on every path.
    Error,
    /// `200` with an HTML maintenance page and issuer-chain headers that are not PEM.
    Garbage,
    /// `429` with `Retry-After: <seconds>`, as Intel's PCS rate-limits.
    TooMany(u64),
    /// The recorded collateral, each answer after this long.
    Slow(Duration),
}

/// The recorded answers.
fn recorded() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../testdata/dstack-sim/mock-pccs"
    ))
}

#[derive(Debug)]
struct Shared {
    fault: Mutex<Fault>,
    /// Every request: when it arrived, and the fault it met.
    asked: Mutex<Vec<(Instant, Fault)>>,
    /// Connections open now, closed when the stand-in goes down.
    open: Mutex<Vec<AbortHandle>>,
}

/// A PCCS on a loopback port; stops with the test's runtime.
#[derive(Debug)]
pub struct Pccs {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Mutex<Option<JoinHandle<()>>>,
}

impl Pccs {
    /// A stand-in answering as `fault` says.
    pub fn start(fault: Fault) -> Self {
        let (listener, addr) = listen("127.0.0.1:0".parse().unwrap());
        let shared = Arc::new(Shared {
            fault: Mutex::new(fault),
            asked: Mutex::default(),
            open: Mutex::default(),
        });
        // Down from the start: the port is known, and nobody listens on it.
        let accept = (fault != Fault::Down).then(|| tokio::spawn(accept(listener, shared.clone())));
        Self {
            url: format!("http://{addr}"),
            addr,
            shared,
            accept: Mutex::new(accept),
        }
    }

    /// Answer as `fault` says from the next request on.
    pub fn set(&self, fault: Fault) {
        *self.shared.fault.lock().unwrap() = fault;
        let mut listening = self.accept.lock().unwrap();
        match (fault, listening.is_some()) {
            (Fault::Down, true) => {
                drop(listening);
                self.stop();
            }
            (Fault::Down, false) | (_, true) => {}
            (_, false) => {
                let (listener, _) = listen(self.addr);
                *listening = Some(tokio::spawn(accept(listener, self.shared.clone())));
            }
        }
    }

    /// Stop listening and close every open connection.
    fn stop(&self) {
        if let Some(task) = self.accept.lock().unwrap().take() {
            task.abort();
        }
        for conn in self.shared.open.lock().unwrap().drain(..) {
            conn.abort();
        }
    }

    /// Every request so far: when, and the fault it met.
    pub fn asked(&self) -> Vec<(Instant, Fault)> {
        self.shared.asked.lock().unwrap().clone()
    }

    /// Requests that met `fault`.
    pub fn seen(&self, fault: Fault) -> usize {
        self.asked().iter().filter(|(_, f)| *f == fault).count()
    }
}

/// A listener on `addr` that may take over the port of one just closed.
fn listen(addr: SocketAddr) -> (tokio::net::TcpListener, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(addr).unwrap();
    let listener = socket.listen(64).unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

/// Serve each connection `listener` takes, keeping a handle to close it.
async fn accept(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    while let Ok((tcp, _)) = listener.accept().await {
        let service = service_fn({
            let shared = shared.clone();
            move |req| answer(req, shared.clone())
        });
        let conn = tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
        let mut open = shared.open.lock().unwrap();
        open.retain(|c| !c.is_finished());
        open.push(conn.abort_handle());
    }
}

async fn answer(
    req: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let fault = *shared.fault.lock().unwrap();
    shared.asked.lock().unwrap().push((Instant::now(), fault));
    let file = match req.uri().path() {
        "/tdx/certification/v4/tcb" => "tcb.json",
        "/tdx/certification/v4/qe/identity" => "qe_identity.json",
        "/sgx/certification/v4/pckcrl" => "pckcrl.der",
        "/sgx/certification/v4/rootcacrl" => "rootcacrl.hex",
        _ => return Ok(status(StatusCode::NOT_FOUND, "")),
    };
    Ok(match fault {
        Fault::None | Fault::Down => recorded_answer(file),
        Fault::Slow(delay) => {
            tokio::time::sleep(delay).await;
            recorded_answer(file)
        }
        Fault::Error => status(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error"),
        Fault::TooMany(seconds) => {
            let mut resp = status(StatusCode::TOO_MANY_REQUESTS, "Rate limit exceeded");
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, seconds.into());
            resp
        }
        Fault::Garbage => {
            let mut resp = status(StatusCode::OK, "<html>maintenance</html>");
            for header in [
                "TCB-Info-Issuer-Chain",
                "SGX-Enclave-Identity-Issuer-Chain",
                "SGX-PCK-CRL-Issuer-Chain",
            ] {
                resp.headers_mut()
                    .insert(header, http::HeaderValue::from_static("x"));
            }
            resp
        }
    })
}

fn status(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp
}

/// `file`'s recorded body, with the issuer-chain headers recorded beside it.
fn recorded_answer(file: &str) -> Response<Full<Bytes>> {
    let dir = recorded();
    let mut resp = Response::new(Full::new(Bytes::from(
        std::fs::read(dir.join(file)).unwrap(),
    )));
    let head = std::fs::read_to_string(dir.join(format!("{file}.headers"))).unwrap();
    for line in head.lines().skip(1) {
        if let Some((k, v)) = line.split_once(':') {
            let k = k.trim();
            if k.to_ascii_lowercase().contains("issuer-chain") {
                resp.headers_mut().insert(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.trim().parse().unwrap(),
                );
            }
        }
    }
    resp
}
