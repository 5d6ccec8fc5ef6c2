use std::sync::atomic::AtomicUsize;

use http::Method;
use http_body_util::Full;
use hyper::service::service_fn;
use tokio::net::TcpListener;

use super::*;

/// A backend that counts the connections it accepted; `/empty` answers 204, `/big` 1 MiB.
struct Backend {
    addr: std::net::SocketAddr,
    accepted: Arc<AtomicUsize>,
}

impl Backend {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let service = service_fn(|req: Request<Incoming>| async move {
                        let resp = match req.uri().path() {
                            "/empty" => Response::builder()
                                .status(StatusCode::NO_CONTENT)
                                .body(Full::new(Bytes::new())),
                            "/big" => {
                                Response::builder().body(Full::new(Bytes::from(vec![7u8; 1 << 20])))
                            }
                            _ => Response::builder().body(Full::new(Bytes::from_static(b"ok"))),
                        };
                        Ok::<_, std::convert::Infallible>(resp.unwrap())
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Self { addr, accepted }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

fn get(method: Method, path: &str) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", "app")
        .body(super::super::full(Bytes::new()))
        .unwrap()
}

async fn read(resp: Response<PooledBody>) -> Bytes {
    resp.into_body().collect().await.unwrap().to_bytes()
}

#[tokio::test]
async fn a_connection_read_to_the_end_carries_the_next_request() {
    let backend = Backend::start().await;
    let upstream = Upstream::new(&backend.addr.to_string(), UpstreamConfig::default()).unwrap();
    for _ in 0..5 {
        let resp = upstream.send(get(Method::GET, "/")).await.unwrap();
        assert_eq!(read(resp).await, "ok");
    }
    // Bodiless answers are whole at once.
    for (method, path) in [(Method::HEAD, "/"), (Method::GET, "/empty")] {
        let resp = upstream.send(get(method, path)).await.unwrap();
        read(resp).await;
    }
    assert_eq!(
        backend.accepted(),
        1,
        "every request on one kept-alive connection"
    );
}

#[tokio::test]
async fn a_reader_that_stops_at_the_last_byte_gives_the_connection_back() {
    let backend = Backend::start().await;
    let upstream = Upstream::new(&backend.addr.to_string(), UpstreamConfig::default()).unwrap();
    for _ in 0..3 {
        let mut body = upstream
            .send(get(Method::GET, "/"))
            .await
            .unwrap()
            .into_body();
        // As hyper's server does with a body of known length: no poll after the last byte.
        while !body.is_end_stream() {
            body.frame().await.unwrap().unwrap();
        }
    }
    assert_eq!(backend.accepted(), 1);
}

#[tokio::test]
async fn a_body_dropped_before_its_end_costs_its_connection_only() {
    let backend = Backend::start().await;
    let upstream = Upstream::new(&backend.addr.to_string(), UpstreamConfig::default()).unwrap();
    let unread = upstream.send(get(Method::GET, "/big")).await.unwrap();
    // While that body is unread, its connection is not the pool's: a second one is dialled.
    let resp = upstream.send(get(Method::GET, "/")).await.unwrap();
    assert_eq!(read(resp).await, "ok");
    assert_eq!(backend.accepted(), 2);
    drop(unread);
    // The dropped body's connection never comes back; the one read to the end does.
    for _ in 0..3 {
        let resp = upstream.send(get(Method::GET, "/")).await.unwrap();
        assert_eq!(read(resp).await, "ok");
    }
    assert_eq!(backend.accepted(), 2);
}

#[tokio::test]
async fn connections_past_the_idle_limit_are_closed_and_replaced() {
    let backend = Backend::start().await;
    let config = UpstreamConfig {
        pool_idle_timeout: Duration::from_millis(50),
        ..UpstreamConfig::default()
    };
    let upstream = Upstream::new(&backend.addr.to_string(), config).unwrap();
    let resp = upstream.send(get(Method::GET, "/")).await.unwrap();
    read(resp).await;
    // The reaper runs every half idle timeout: wait until the pool holds nothing.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !upstream.pool.idle.local().lock().unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the idle connection was never reaped"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let resp = upstream.send(get(Method::GET, "/")).await.unwrap();
    assert_eq!(read(resp).await, "ok");
    assert_eq!(backend.accepted(), 2);
}

#[tokio::test]
async fn an_unreachable_backend_is_a_connect_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let upstream = Upstream::new(&addr.to_string(), UpstreamConfig::default()).unwrap();
    match upstream.send(get(Method::GET, "/")).await {
        Err(UpstreamError::Connect { reason, .. }) => {
            assert!(reason.contains("tcp connect error"), "{reason}")
        }
        other => panic!("expected a connect error, got {other:?}"),
    }
}
