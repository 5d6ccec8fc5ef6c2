//! Two `dstack-mesh dev-agent` processes sharing a state directory form one mesh: identities
//! from each complete mutual TLS with the other, and refuse a third app that is not expected.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::{sync::Arc, time::Duration};

use e2e::dev_agent;
use ratls::{
    agent::{AgentAddress, AgentClient},
    identity::{IdentityConfig, RotatingIdentity},
    tls::{mesh_client_config, mesh_server_config},
    verifier::peer_identity,
    AllowList, Policy, Rejection,
};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const FRONT: &str = "f00df00df00df00df00df00df00df00df00df00d";
const BACK: &str = "bac0bac0bac0bac0bac0bac0bac0bac0bac0bac0";
const OTHER: &str = "0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e";

async fn identity(socket: &std::path::Path) -> RotatingIdentity {
    let (client, info) = AgentClient::discover(
        vec![AgentAddress::Unix(socket.to_owned())],
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    RotatingIdentity::start(client, info, IdentityConfig::default())
        .await
        .unwrap()
}

#[tokio::test]
async fn identities_from_two_dev_agent_processes_form_one_mesh() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (front_agent, front_sock) = dev_agent(dir.path(), "front", FRONT, &state);
    let (_back_agent, back_sock) = dev_agent(dir.path(), "back", BACK, &state);
    assert!(front_agent.stderr().contains("NOT attested"));

    let front = identity(&front_sock).await;
    let back = identity(&back_sock).await;
    assert_eq!(front.current().root, back.current().root);

    // back serves, admitting front only.
    let anchors = back.current().trust_anchors().unwrap();
    let allow = AllowList::Only([FRONT.parse().unwrap()].into());
    let server =
        mesh_server_config(back.resolver(), Arc::new(Policy::new(anchors).allow(allow))).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let caller = peer_identity(tls.get_ref().1).unwrap();
                    let mut buf = [0u8; 16];
                    if tls.read(&mut buf).await.unwrap_or(0) > 0 {
                        let _ = tls.write_all(caller.app_id.to_string().as_bytes()).await;
                        let _ = tls.shutdown().await;
                    }
                }
            });
        }
    });

    let dial = |expect: &str| {
        let anchors = front.current().trust_anchors().unwrap();
        let policy = Arc::new(Policy::new(anchors).expect(expect.parse().unwrap()));
        let config = mesh_client_config(front.resolver(), policy).unwrap();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = ServerName::try_from("mesh.local").unwrap();
            tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
        }
    };

    let mut tls = dial(BACK).await.unwrap();
    tls.write_all(b"who").await.unwrap();
    let mut reply = String::new();
    tls.read_to_string(&mut reply).await.unwrap();
    assert_eq!(reply, FRONT);

    let err = dial(OTHER).await.unwrap_err();
    let tls_err = err
        .get_ref()
        .unwrap()
        .downcast_ref::<rustls::Error>()
        .unwrap();
    assert_eq!(
        Rejection::from_tls_error(tls_err)
            .as_ref()
            .map(Rejection::reason),
        Some("app_id_mismatch")
    );
}
