use std::{convert::Infallible, net::SocketAddr, path::PathBuf};

use http::Response;
use http_body_util::Full;

use super::*;

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata/dstack-sim")
        .join(rel)
}

fn any_tls() -> Arc<rustls::ClientConfig> {
    // Only http:// gateways are dialled in these tests; the config is never used for TLS.
    Arc::new(
        rustls::ClientConfig::builder_with_provider(ratls::crypto::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
    )
}

/// A gateway stand-in answering `/prpc/Info` with `body` (or never answering).
async fn gateway(body: Option<&'static str>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            let Some(body) = body else {
                held.push(tcp);
                continue;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: Request<hyper::body::Incoming>| async move {
                        let resp = if req.uri().path() == "/prpc/Info" {
                            Response::new(Full::new(Bytes::from_static(body.as_bytes())))
                        } else {
                            let mut r = Response::new(Full::new(Bytes::new()));
                            *r.status_mut() = StatusCode::NOT_FOUND;
                            r
                        };
                        Ok::<_, Infallible>(resp)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    addr
}

#[test]
fn the_simulator_sys_config_lists_its_gateway() {
    let urls = gateway_urls(&fixture("simulator-data/app1/sys-config.json")).unwrap();
    assert_eq!(urls, ["https://tproxy.1022.dstack.org:12002"]);
}

#[test]
fn bad_sys_configs_are_named() {
    let dir = std::env::temp_dir().join(format!("gwc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let empty = dir.join("empty.json");
    std::fs::write(&empty, r#"{"gateway_urls": []}"#).unwrap();
    assert!(matches!(
        gateway_urls(&empty),
        Err(DiscoveryError::NoUrls(_))
    ));
    let broken = dir.join("broken.json");
    std::fs::write(&broken, "{").unwrap();
    let err = gateway_urls(&broken).unwrap_err();
    assert!(err.to_string().contains("broken.json"), "{err}");
    assert!(gateway_urls(&dir.join("missing.json")).is_err());
}

#[tokio::test]
async fn the_first_gateway_that_answers_wins() {
    let silent = gateway(None).await;
    let broken = gateway(Some("not json")).await;
    let good = gateway(Some(
        r#"{"base_domain":"gw.example.com","external_port":9443,"id":"x"}"#,
    ))
    .await;
    let urls = vec![
        format!("http://{silent}"),
        format!("http://{broken}/"),
        "http://127.0.0.1:1".to_owned(),
        format!("http://{good}"),
    ];
    let urls: Vec<String> = urls
        .into_iter()
        .map(|u| u.trim_end_matches('/').to_owned())
        .collect();
    let (url, info) = discover(&urls, any_tls(), Duration::from_millis(500))
        .await
        .unwrap();
    assert_eq!(url, format!("http://{good}"));
    assert_eq!(
        info,
        GatewayInfo {
            base_domain: "gw.example.com".into(),
            external_port: 9443
        }
    );

    let err = discover(&urls[..3], any_tls(), Duration::from_millis(300))
        .await
        .unwrap_err();
    let text = err.to_string();
    for url in &urls[..3] {
        assert!(text.contains(url.as_str()), "{text}");
    }
    assert!(text.contains("no answer within"), "{text}");
    assert!(text.contains("not the JSON expected"), "{text}");
    // Each URL keeps its typed reason.
    let DiscoveryError::NoneAnswered { tried } = err else {
        panic!("{err:?}")
    };
    assert!(
        tried
            .iter()
            .any(|(_, e)| matches!(e, InfoError::Timeout(_))),
        "{tried:?}"
    );
    assert!(
        tried.iter().any(|(_, e)| matches!(e, InfoError::Json(_))),
        "{tried:?}"
    );
}
