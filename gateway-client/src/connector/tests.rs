use std::{
    net::SocketAddr,
    sync::atomic::{AtomicUsize, Ordering},
};

use ratls::{
    agent::{AgentAddress, AgentClient},
    dev_agent::{DevAgent, DevAgentConfig},
    identity::{IdentityConfig, RotatingIdentity},
    AllowList,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

use super::*;
use crate::address::HostPort;

const CLIENT: &str = "c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0";
const SERVER: &str = "5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e";
const OTHER: &str = "0707070707070707070707070707070707070707";

async fn identity(
    dir: &std::path::Path,
    app: &str,
) -> (RotatingIdentity, tokio::task::JoinHandle<()>) {
    let agent = Arc::new(
        DevAgent::new(DevAgentConfig {
            app_id: app.parse().unwrap(),
            instance_id: None,
            app_name: "t".into(),
            state_dir: dir.join("state"),
        })
        .unwrap(),
    );
    let socket = dir.join(format!("{}.sock", &app[..4]));
    let task = agent.spawn(&socket).unwrap();
    let (client, info) =
        AgentClient::discover(vec![AgentAddress::Unix(socket)], Duration::from_secs(5))
            .await
            .unwrap();
    (
        RotatingIdentity::start(client, info, IdentityConfig::default())
            .await
            .unwrap(),
        task,
    )
}

/// A mesh server for `identity`; counts the application bytes it reads.
async fn server(identity: &RotatingIdentity) -> (SocketAddr, Arc<AtomicUsize>) {
    let policy =
        Arc::new(Policy::new(identity.current().trust_anchors().unwrap()).allow(AllowList::Any));
    let config = ratls::tls::mesh_server_config(identity.resolver(), policy).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let bytes = Arc::new(AtomicUsize::new(0));
    let counted = bytes.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let counted = counted.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = tls.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        counted.fetch_add(n, Ordering::SeqCst);
                        let _ = tls.write_all(&buf[..n]).await;
                    }
                }
            });
        }
    });
    (addr, bytes)
}

fn target(app: &str) -> Target {
    Target {
        app_id: app.parse().unwrap(),
        port: 443,
        instance: None,
        transport: Transport::Mesh,
    }
}

fn connector(client: &RotatingIdentity, addr: SocketAddr, config: ConnectorConfig) -> Connector {
    Connector::new(
        Addressing::Fixed(HostPort {
            host: addr.ip().to_string(),
            port: addr.port(),
        }),
        client.resolver(),
        client.current().trust_anchors().unwrap(),
        None,
        config,
    )
}

#[tokio::test]
async fn the_target_is_verified_and_h2_is_offered() {
    let dir = tempfile::tempdir().unwrap();
    let (client, _a) = identity(dir.path(), CLIENT).await;
    let (server_id, _b) = identity(dir.path(), SERVER).await;
    let (addr, bytes) = server(&server_id).await;
    let mut connected = connector(&client, addr, ConnectorConfig::default())
        .oneshot(target(SERVER))
        .await
        .unwrap();
    assert_eq!(connected.peer.as_ref().unwrap().app_id.to_string(), SERVER);
    assert!(connected.h2);
    connected.stream.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    connected.stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(bytes.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn another_app_is_refused_before_any_byte() {
    let dir = tempfile::tempdir().unwrap();
    let (client, _a) = identity(dir.path(), CLIENT).await;
    let (server_id, _b) = identity(dir.path(), SERVER).await;
    let (addr, bytes) = server(&server_id).await;
    let err = connector(&client, addr, ConnectorConfig::default())
        .connect(&target(OTHER))
        .await
        .unwrap_err();
    match err {
        ConnectError::Refused { rejection, .. } => {
            assert_eq!(rejection.reason(), "app_id_mismatch")
        }
        other => panic!("{other}"),
    }
    // The refusal came from our own handshake: nothing was ever written.
    assert_eq!(bytes.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn nothing_listening_and_a_silent_server_fail_within_their_deadlines() {
    let dir = tempfile::tempdir().unwrap();
    let (client, _a) = identity(dir.path(), CLIENT).await;
    // Closed port.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let err = connector(&client, closed, ConnectorConfig::default())
        .connect(&target(SERVER))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ConnectError::Failed {
                stage: Stage::Connect,
                ..
            }
        ),
        "{err}"
    );
    // Accepts TCP, never speaks TLS.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = silent.accept().await {
            held.push(tcp);
        }
    });
    let config = ConnectorConfig {
        handshake_timeout: Duration::from_millis(300),
        ..ConnectorConfig::default()
    };
    let err = connector(&client, silent_addr, config)
        .connect(&target(SERVER))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ConnectError::Timeout {
                stage: Stage::Handshake,
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn unknown_targets_and_gateway_tls_without_roots_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (client, _a) = identity(dir.path(), CLIENT).await;
    let c = Connector::new(
        Addressing::Static {
            routes: Default::default(),
            otherwise: None,
        },
        client.resolver(),
        client.current().trust_anchors().unwrap(),
        None,
        ConnectorConfig::default(),
    );
    assert!(matches!(
        c.connect(&target(SERVER)).await,
        Err(ConnectError::NoRoute(_))
    ));
    let gw = Connector::new(
        Addressing::Gateway {
            base_domain: "gw.test".into(),
            port: 443,
            dial: Some(HostPort {
                host: "127.0.0.1".into(),
                port: 1,
            }),
        },
        client.resolver(),
        client.current().trust_anchors().unwrap(),
        None,
        ConnectorConfig::default(),
    );
    let mut plain = target(SERVER);
    plain.transport = Transport::GatewayTls;
    assert!(matches!(
        gw.connect(&plain).await,
        Err(ConnectError::Config(_))
    ));
}
