//! An OpenSSL client against the mesh server config: it must decode the CA hints in the
//! CertificateRequest (a malformed DistinguishedName makes OpenSSL abort) and complete mTLS.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::{process::Stdio, sync::Arc, time::Duration};

use e2e::dev_agent;
use ratls::{
    agent::{AgentAddress, AgentClient},
    identity::{IdentityConfig, RotatingIdentity},
    tls::mesh_server_config,
    verifier::peer_identity,
    AllowList, Policy,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SERVER: &str = "5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e";
const CLIENT: &str = "c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1";

#[tokio::test]
async fn openssl_reads_the_ca_hints_and_completes_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (_s, server_sock) = dev_agent(dir.path(), "server", SERVER, &state);
    let (_c, client_sock) = dev_agent(dir.path(), "client", CLIENT, &state);

    let (agent, info) = AgentClient::discover(
        vec![AgentAddress::Unix(server_sock)],
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let server = RotatingIdentity::start(agent, info, IdentityConfig::default())
        .await
        .unwrap();

    // The client's key and chain as files, the way an OpenSSL-based peer holds them.
    let client = AgentClient::new(AgentAddress::Unix(client_sock))
        .get_tls_key(&ratls::agent::TlsKeyRequest {
            subject: "client".into(),
            usage_client_auth: true,
            usage_server_auth: true,
            with_app_info: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let key = dir.path().join("client.key");
    let chain = dir.path().join("client.pem");
    let root = dir.path().join("root.pem");
    std::fs::write(&key, &client.key).unwrap();
    std::fs::write(&chain, client.certificate_chain.concat()).unwrap();
    std::fs::write(&root, client.certificate_chain.last().unwrap()).unwrap();

    let anchors = server.current().trust_anchors().unwrap();
    let policy =
        Arc::new(Policy::new(anchors).allow(AllowList::Only([CLIENT.parse().unwrap()].into())));
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(
        mesh_server_config(server.resolver(), policy).unwrap(),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let caller = peer_identity(tls.get_ref().1).unwrap();
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await.unwrap();
        tls.write_all(b"pong\n").await.unwrap();
        tls.shutdown().await.unwrap();
        caller
    });

    let mut child = tokio::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-verify_return_error",
            "-ign_eof",
        ])
        .arg("-CAfile")
        .arg(&root)
        .arg("-cert")
        .arg(&chain)
        .arg("-cert_chain")
        .arg(&chain)
        .arg("-key")
        .arg(&key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("openssl is installed by scripts/setup-test-deps");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"ping\n")
        .await
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let caller = tokio::time::timeout(Duration::from_secs(5), accepted)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(caller.app_id.to_string(), CLIENT);
    assert!(
        stdout.contains("Acceptable client certificate CA names"),
        "{stdout}"
    );
    assert!(
        stdout.contains("CN=Dstack KMS CA") || stdout.contains("CN = Dstack KMS CA"),
        "{stdout}"
    );
    assert!(stdout.contains("pong"), "{stdout}");
    assert!(stdout.contains("Verify return code: 0 (ok)"), "{stdout}");
    // Debian 12's OpenSSL has no ML-KEM: the mesh takes its X25519.
    assert!(stdout.contains("Server Temp Key: X25519"), "{stdout}");
}
