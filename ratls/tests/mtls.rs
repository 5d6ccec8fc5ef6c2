//! Real TLS over TCP between identities from development agents: the policy decides inside the
//! handshake, a refused peer's application never reads a byte, and rotation swaps the served
//! certificate without touching open connections.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::{
    collections::BTreeSet,
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use ratls::{
    agent::{AgentAddress, AgentClient},
    dev_agent::{DevAgent, DevAgentConfig},
    identity::{IdentityConfig, RotatingIdentity},
    tls::{mesh_client_config, mesh_server_config},
    verifier::peer_identity,
    AllowList, AppId, Policy, Rejection,
};
use rustls_pki_types::ServerName;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const APP_A: &str = "a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0";
const APP_B: &str = "b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0";
const APP_C: &str = "c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0";

fn id(s: &str) -> AppId {
    s.parse().unwrap()
}

/// A development agent on a socket in `dir`, and an identity taken from it.
async fn sidecar(
    dir: &Path,
    app: &str,
    config: IdentityConfig,
) -> (RotatingIdentity, JoinHandle<()>) {
    let agent = Arc::new(
        DevAgent::new(DevAgentConfig {
            app_id: id(app),
            instance_id: None,
            app_name: format!("app-{}", &app[..2]),
            state_dir: dir.join("state"),
        })
        .unwrap(),
    );
    let socket = dir.join(format!("{}.sock", &app[..2]));
    let task = agent.spawn(&socket).unwrap();
    let (client, info) =
        AgentClient::discover(vec![AgentAddress::Unix(socket)], Duration::from_secs(5))
            .await
            .unwrap();
    let identity = RotatingIdentity::start(client, info, config).await.unwrap();
    (identity, task)
}

/// What the server side saw: handshakes that completed and bytes its application read.
#[derive(Default)]
struct Seen {
    accepted: AtomicUsize,
    refused: AtomicUsize,
    bytes: AtomicUsize,
    /// The key exchange group of each accepted handshake.
    groups: std::sync::Mutex<Vec<rustls::NamedGroup>>,
}

/// An echo server that answers each read with `pong:<caller app id>`.
async fn server(
    identity: &RotatingIdentity,
    allow: AllowList,
) -> (std::net::SocketAddr, Arc<Seen>) {
    let anchors = identity.current().trust_anchors().unwrap();
    let policy = Arc::new(Policy::new(anchors).allow(allow));
    let config = mesh_server_config(identity.resolver(), policy).unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let seen2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            let seen = seen2.clone();
            tokio::spawn(async move {
                let mut tls = match acceptor.accept(tcp).await {
                    Ok(tls) => tls,
                    Err(_) => {
                        seen.refused.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                };
                seen.accepted.fetch_add(1, Ordering::SeqCst);
                if let Some(g) = tls.get_ref().1.negotiated_key_exchange_group() {
                    seen.groups.lock().unwrap().push(g.name());
                }
                let caller = peer_identity(tls.get_ref().1).unwrap();
                let mut buf = [0u8; 1024];
                loop {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            seen.bytes.fetch_add(n, Ordering::SeqCst);
                            let reply = format!("pong:{}", caller.app_id);
                            if tls.write_all(reply.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, seen)
}

async fn connect(
    identity: &RotatingIdentity,
    expect: &str,
    addr: std::net::SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let anchors = identity.current().trust_anchors().unwrap();
    let policy = Arc::new(Policy::new(anchors).expect(id(expect)));
    let config = mesh_client_config(identity.resolver(), policy).unwrap();
    let tcp = TcpStream::connect(addr).await?;
    // The name is the gateway's routing label; the app id is what is verified.
    let name = ServerName::try_from(format!("{expect}-443s.dstack.example")).unwrap();
    TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

async fn ping(tls: &mut tokio_rustls::client::TlsStream<TcpStream>) -> std::io::Result<String> {
    tls.write_all(b"ping").await?;
    let mut buf = [0u8; 128];
    let n = tls.read(&mut buf).await?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn rejection(err: &std::io::Error) -> Option<Rejection> {
    let tls = err.get_ref()?.downcast_ref::<rustls::Error>()?;
    Rejection::from_tls_error(tls)
}

/// Wait (bounded) until `f` holds.
async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn mutual_tls_completes_when_the_policy_allows() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _ta) = sidecar(dir.path(), APP_A, IdentityConfig::default()).await;
    let (b, _tb) = sidecar(dir.path(), APP_B, IdentityConfig::default()).await;
    // Two agents, one state directory: one root.
    assert_eq!(a.current().root, b.current().root);

    let (addr, seen) = server(&b, AllowList::Only(BTreeSet::from([id(APP_A)]))).await;
    let mut tls = connect(&a, APP_B, addr).await.unwrap();
    let server_peer = peer_identity(tls.get_ref().1).unwrap();
    assert_eq!(server_peer.app_id, id(APP_B));
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    // The server knows the caller by its verified app id.
    assert_eq!(ping(&mut tls).await.unwrap(), format!("pong:{APP_A}"));
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn the_mesh_prefers_the_post_quantum_hybrid_and_a_classical_peer_gets_x25519() {
    use rustls::{HandshakeKind, NamedGroup};
    let dir = tempfile::tempdir().unwrap();
    let (a, _ta) = sidecar(dir.path(), APP_A, IdentityConfig::default()).await;
    let (b, _tb) = sidecar(dir.path(), APP_B, IdentityConfig::default()).await;
    let (addr, seen) = server(&b, AllowList::Only(BTreeSet::from([id(APP_A)]))).await;

    let mut tls = connect(&a, APP_B, addr).await.unwrap();
    let conn = tls.get_ref().1;
    let group = conn.negotiated_key_exchange_group().map(|g| g.name());
    assert_eq!(group, Some(NamedGroup::X25519MLKEM768));
    assert_eq!(conn.handshake_kind(), Some(HandshakeKind::Full));
    assert_eq!(ping(&mut tls).await.unwrap(), format!("pong:{APP_A}"));

    // A peer without ML-KEM (an older sidecar, another TLS stack): the same verification, its
    // one classical share taken without a HelloRetryRequest.
    for only in [NamedGroup::X25519, NamedGroup::secp256r1] {
        let provider = ratls::crypto::provider_with_groups(&[only]);
        let anchors = a.current().trust_anchors().unwrap();
        let policy = Arc::new(Policy::new(anchors).expect(id(APP_B)));
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ratls::verifier::ServerVerifier::new(
                policy,
            )))
            .with_client_cert_resolver(Arc::new(a.resolver()));
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("classical.example").unwrap();
        let mut tls = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .unwrap();
        let conn = tls.get_ref().1;
        assert_eq!(
            conn.negotiated_key_exchange_group().map(|g| g.name()),
            Some(only)
        );
        assert_eq!(conn.handshake_kind(), Some(HandshakeKind::Full), "{only:?}");
        assert_eq!(ping(&mut tls).await.unwrap(), format!("pong:{APP_A}"));
    }
    // The server side agrees, handshake by handshake.
    assert_eq!(
        *seen.groups.lock().unwrap(),
        [
            NamedGroup::X25519MLKEM768,
            NamedGroup::X25519,
            NamedGroup::secp256r1
        ]
    );
}

#[tokio::test]
async fn the_server_chooses_the_cipher_suite_by_its_own_order() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _ta) = sidecar(dir.path(), APP_A, IdentityConfig::default()).await;
    let (b, _tb) = sidecar(dir.path(), APP_B, IdentityConfig::default()).await;
    let (addr, _seen) = server(&b, AllowList::Only(BTreeSet::from([id(APP_A)]))).await;
    // A client listing ChaCha20 first, then AES-256: the server still takes its first choice.
    let ours = ratls::crypto::provider();
    let mut suites = ours.cipher_suites.clone();
    suites.reverse();
    assert_ne!(suites[0].suite(), ours.cipher_suites[0].suite());
    let provider = Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: suites,
        ..(*ours).clone()
    });
    let anchors = a.current().trust_anchors().unwrap();
    let policy = Arc::new(Policy::new(anchors).expect(id(APP_B)));
    for versions in [
        &[&rustls::version::TLS13][..],
        &[&rustls::version::TLS12][..],
    ] {
        let config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ratls::verifier::ServerVerifier::new(
                policy.clone(),
            )))
            .with_client_cert_resolver(Arc::new(a.resolver()));
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("order.example").unwrap();
        let mut tls = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .unwrap();
        let chosen = tls.get_ref().1.negotiated_cipher_suite().unwrap().suite();
        let first_for_version = ours
            .cipher_suites
            .iter()
            .find(|s| s.version() == versions[0])
            .unwrap()
            .suite();
        assert_eq!(chosen, first_for_version, "{:?}", versions[0]);
        assert_eq!(ping(&mut tls).await.unwrap(), format!("pong:{APP_A}"));
    }
}

#[tokio::test]
async fn a_server_with_the_wrong_app_id_never_reads_a_byte() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _ta) = sidecar(dir.path(), APP_A, IdentityConfig::default()).await;
    let (b, _tb) = sidecar(dir.path(), APP_B, IdentityConfig::default()).await;
    let (addr, seen) = server(&b, AllowList::Any).await;

    // A wants C but reaches B: B's chain is valid, its app id is not the one wanted.
    let err = connect(&a, APP_C, addr).await.unwrap_err();
    assert_eq!(
        rejection(&err),
        Some(Rejection::AppIdMismatch {
            expected: id(APP_C),
            found: id(APP_B)
        }),
        "{err}"
    );
    eventually("the server to see the failed handshake", || {
        seen.refused.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 0);
    assert_eq!(seen.bytes.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_caller_not_on_the_allowlist_is_refused_and_nothing_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _ta) = sidecar(dir.path(), APP_A, IdentityConfig::default()).await;
    let (b, _tb) = sidecar(dir.path(), APP_B, IdentityConfig::default()).await;
    let (addr, seen) = server(&b, AllowList::Only(BTreeSet::from([id(APP_C)]))).await;

    // In TLS 1.3 the client may finish before the server has judged its certificate, so the
    // refusal shows on the first read or write.
    let outcome = match connect(&a, APP_B, addr).await {
        Err(e) => Err(e),
        Ok(mut tls) => ping(&mut tls).await,
    };
    let reply = outcome.unwrap_or_default();
    assert!(!reply.starts_with("pong"), "{reply}");
    eventually("the server to refuse", || {
        seen.refused.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 0);
    assert_eq!(seen.bytes.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_client_from_another_mesh_is_refused() {
    let ours = tempfile::tempdir().unwrap();
    let theirs = tempfile::tempdir().unwrap();
    let (a_foreign, _ta) = sidecar(theirs.path(), APP_A, IdentityConfig::default()).await;
    let (b, _tb) = sidecar(ours.path(), APP_B, IdentityConfig::default()).await;
    let (addr, seen) = server(&b, AllowList::Any).await;
    // The foreign client trusts our root so that only the server's verdict is under test.
    let anchors = b.current().trust_anchors().unwrap();
    let policy = Arc::new(Policy::new(anchors).expect(id(APP_B)));
    let config = mesh_client_config(a_foreign.resolver(), policy).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("mesh.local").unwrap();
    if let Ok(mut tls) = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
    {
        assert!(!ping(&mut tls).await.unwrap_or_default().starts_with("pong"));
    }
    eventually("the server to refuse", || {
        seen.refused.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(seen.bytes.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn rotation_changes_the_served_certificate_and_keeps_open_connections() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _ta) = sidecar(dir.path(), APP_A, IdentityConfig::default()).await;
    let (b, _tb) = sidecar(dir.path(), APP_B, IdentityConfig::default()).await;
    let (addr, _seen) = server(&b, AllowList::Any).await;

    let mut before = connect(&a, APP_B, addr).await.unwrap();
    let cert_before = before.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_eq!(ping(&mut before).await.unwrap(), format!("pong:{APP_A}"));

    let mut changes = b.subscribe();
    let old = b.current();
    let new = b.refresh_now().await.unwrap();
    assert_ne!(old.fingerprint, new.fingerprint);
    assert_eq!(b.current().fingerprint, new.fingerprint);
    assert!(changes.has_changed().unwrap());
    changes.borrow_and_update();

    let mut after = connect(&a, APP_B, addr).await.unwrap();
    let cert_after = after.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_ne!(
        cert_before, cert_after,
        "the new handshake must see the new certificate"
    );
    assert_eq!(ping(&mut after).await.unwrap(), format!("pong:{APP_A}"));
    // The connection opened before the rotation still works.
    assert_eq!(ping(&mut before).await.unwrap(), format!("pong:{APP_A}"));
}

#[tokio::test]
async fn the_identity_refreshes_itself_before_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let config = IdentityConfig {
        validity: Duration::from_secs(600),
        // Due one second after issue (lifetime = validity + the not_before backdating).
        refresh_margin: Some(Duration::from_secs(599)),
        ..IdentityConfig::default()
    };
    let (a, _ta) = sidecar(dir.path(), APP_A, config).await;
    let first = a.current();
    assert!(first.not_after - first.not_before >= 600);
    let mut changes = a.subscribe();
    tokio::time::timeout(Duration::from_secs(20), changes.changed())
        .await
        .expect("no refresh within 20s")
        .unwrap();
    assert_ne!(a.current().fingerprint, first.fingerprint);
}

#[tokio::test]
async fn an_unreachable_agent_keeps_the_current_identity() {
    let dir = tempfile::tempdir().unwrap();
    let (a, agent_task) = sidecar(dir.path(), APP_A, IdentityConfig::default()).await;
    let (b, _tb) = sidecar(dir.path(), APP_B, IdentityConfig::default()).await;
    let (addr, _) = server(&a, AllowList::Any).await;
    let current = a.current();

    agent_task.abort();
    let _ = agent_task.await;
    std::fs::remove_file(dir.path().join("a0.sock")).unwrap();
    let err = a.refresh_now().await.unwrap_err();
    assert!(err.to_string().contains("a0.sock"), "{err}");
    assert_eq!(a.current().fingerprint, current.fingerprint);
    // And it still serves.
    let mut tls = connect(&b, APP_A, addr).await.unwrap();
    assert_eq!(ping(&mut tls).await.unwrap(), format!("pong:{APP_B}"));
}

#[tokio::test]
async fn start_up_without_an_agent_names_the_addresses_tried() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("dstack.sock");
    let err = AgentClient::discover(
        vec![
            AgentAddress::Unix(missing.clone()),
            AgentAddress::Unix("/var/run/nothing-here.sock".into()),
        ],
        Duration::from_secs(1),
    )
    .await
    .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&missing.display().to_string()), "{msg}");
    assert!(msg.contains("/var/run/nothing-here.sock"), "{msg}");
}
