//! A backend that shows what reached it: every request is counted and answered with its
//! method, path, headers and body length as JSON (`/upload` answers the body's length and
//! SHA-256 instead; `/allowed` is an on-demand `ask` endpoint). Special paths test streaming
//! and upgrades
//! without timing: the backend waits on gates the test opens.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{body::Frame, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::Notify,
};

/// A running backend. Dropping it stops the accept loop.
#[derive(Debug)]
pub struct Backend {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Requests received so far.
    pub requests: Arc<AtomicUsize>,
    /// Opened by the test to let `/stream` send its second chunk.
    pub release_stream: Arc<Notify>,
    /// Notified by `/upload` when the first body chunk arrived.
    pub upload_started: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Body = BoxBody<Bytes, Infallible>;

impl Backend {
    /// Start on a free loopback port.
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    /// Start on `addr` (to bring a "down" backend back on its old port).
    pub async fn start_on(addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let release_stream = Arc::new(Notify::new());
        let upload_started = Arc::new(Notify::new());
        let state = (
            requests.clone(),
            release_stream.clone(),
            upload_started.clone(),
        );
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let state = state.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(state.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Self {
            addr,
            requests,
            release_stream,
            upload_started,
            task,
        }
    }

    /// How many requests arrived.
    pub fn count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

type State = (Arc<AtomicUsize>, Arc<Notify>, Arc<Notify>);

async fn handle(state: State, mut req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    state.0.fetch_add(1, Ordering::SeqCst);
    match req.uri().path() {
        // An `ask` endpoint: `?allow=<name>&domain=<name>` answers 200 when the domain is the
        // allowed name or under it, 404 otherwise.
        "/allowed" => {
            let query = crate::http_stand_in::query_pairs(req.uri());
            let value = |key: &str| {
                query
                    .iter()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| v.as_str())
            };
            let allowed = match (value("allow"), value("domain")) {
                (Some(allow), Some(domain)) => {
                    domain == allow || domain.ends_with(&format!(".{allow}"))
                }
                _ => false,
            };
            let mut resp = Response::new(Full::new(Bytes::new()).boxed());
            if !allowed {
                *resp.status_mut() = StatusCode::NOT_FOUND;
            }
            Ok(resp)
        }
        "/stream" => {
            // First chunk now, second only when the test says so: a buffering proxy deadlocks.
            let gate = state.1.clone();
            let (tx, body) = ChannelBody::pair();
            tokio::spawn(async move {
                let _ = tx.send(Bytes::from_static(b"first\n")).await;
                if tokio::time::timeout(Duration::from_secs(20), gate.notified())
                    .await
                    .is_ok()
                {
                    let _ = tx.send(Bytes::from_static(b"second\n")).await;
                }
            });
            Ok(Response::new(body.boxed()))
        }
        "/upload" => {
            let mut body = req.into_body();
            let mut total = 0usize;
            let mut first = true;
            let mut digest = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else { break };
                if let Some(data) = frame.data_ref() {
                    total += data.len();
                    digest.update(data);
                    if first && !data.is_empty() {
                        first = false;
                        state.2.notify_one();
                    }
                }
            }
            Ok(json(&serde_json::json!({
                "received": total,
                "sha256": hex(digest.finish().as_ref()),
            })))
        }
        "/ws" => {
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(upgraded) = on_upgrade.await {
                    let mut io = TokioIo::new(upgraded);
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = io.read(&mut buf).await {
                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            });
            let mut resp = Response::new(Full::new(Bytes::new()).boxed());
            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            resp.headers_mut()
                .insert(header::UPGRADE, http::HeaderValue::from_static("websocket"));
            resp.headers_mut().insert(
                header::CONNECTION,
                http::HeaderValue::from_static("upgrade"),
            );
            Ok(resp)
        }
        _ => {
            let method = req.method().to_string();
            let path = req.uri().to_string();
            let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (k, v) in req.headers() {
                headers
                    .entry(k.as_str().to_owned())
                    .or_default()
                    .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
            }
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            Ok(json(&serde_json::json!({
                "method": method,
                "path": path,
                "headers": headers,
                "body_len": body.len(),
            })))
        }
    }
}

/// Lowercase hex of `bytes` (a digest as tests print it).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn json(value: &serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(value.to_string())).boxed());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

/// A body fed from a channel: each message is one DATA frame; the body ends when the sender
/// is dropped. Lets tests send and receive a body chunk by chunk.
#[derive(Debug)]
pub struct ChannelBody(pub tokio::sync::mpsc::Receiver<Bytes>);

impl ChannelBody {
    /// A sender and the body it feeds.
    pub fn pair() -> (tokio::sync::mpsc::Sender<Bytes>, Self) {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        (tx, Self(rx))
    }
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}
