//! The development agent speaks the guest agent's API with the KMS chain shape.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::{path::Path, sync::Arc, time::Duration};

use ratls::{
    agent::{AgentAddress, AgentClient, AgentError, TlsKeyRequest},
    dev_agent::{DevAgent, DevAgentConfig, NOT_ATTESTED},
    AppId, AppIdSource, ChainView,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const APP: &str = "0123456789abcdef0123456789abcdef01234567";

async fn start(dir: &Path, app: &str, sock: &str) -> (AgentClient, tokio::task::JoinHandle<()>) {
    let agent = Arc::new(
        DevAgent::new(DevAgentConfig {
            app_id: app.parse().unwrap(),
            instance_id: None,
            app_name: "test-app".into(),
            state_dir: dir.join("state"),
        })
        .unwrap(),
    );
    let socket = dir.join(sock);
    let task = agent.spawn(&socket).unwrap();
    (AgentClient::new(AgentAddress::Unix(socket)), task)
}

fn full_request() -> TlsKeyRequest {
    TlsKeyRequest {
        subject: "app.dstack.internal".into(),
        alt_names: vec!["app.dstack.internal".into(), "127.0.0.1".into()],
        usage_ra_tls: true,
        usage_server_auth: true,
        usage_client_auth: true,
        with_app_info: true,
        not_before: Some(1_800_000_000),
        not_after: Some(1_800_086_400),
    }
}

#[tokio::test]
async fn get_tls_key_issues_the_kms_chain_shape() {
    let dir = tempfile::tempdir().unwrap();
    let (client, _task) = start(dir.path(), APP, "a.sock").await;
    let resp = client.get_tls_key(&full_request()).await.unwrap();
    assert!(resp.key.starts_with("-----BEGIN PRIVATE KEY-----"));
    assert_eq!(resp.certificate_chain.len(), 3);
    let chain = ratls::cert::parse_pem_list(&resp.certificate_chain).unwrap();
    let view = ChainView::new(&chain).unwrap();
    assert_eq!(view.app_id.as_ref().unwrap().to_string(), APP);
    assert_eq!(view.app_id_source, Some(AppIdSource::Extension));
    assert_eq!(view.usage.as_deref(), Some("app:custom"));
    assert!(view.app_info.is_some());
    assert!(view.instance_id.is_some());
    // Not attested, even when RA-TLS was asked for.
    assert!(view.attestation.is_none());
    assert_eq!(view.leaf.subject, "CN=app.dstack.internal");
    assert_eq!(view.leaf.sans, ["app.dstack.internal", "127.0.0.1"]);
    assert_eq!(view.leaf.eku, ["serverAuth", "clientAuth"]);
    assert_eq!(view.leaf.not_after_unix, 1_800_086_400);
    assert!(view.chain[1].subject.ends_with("CN=Dstack App CA"));
    assert!(view.chain[1].subject.contains("NOT ATTESTED"));
    assert_eq!(view.chain[1].usage.as_deref(), Some("app:ca"));
    assert_eq!(view.chain[1].app_id.as_ref().unwrap().to_string(), APP);
    assert!(view.chain[2].subject.ends_with("CN=Dstack KMS CA"));

    // Usage flags are honoured: no flag, no EKU extension (as the real agent).
    let bare = client
        .get_tls_key(&TlsKeyRequest {
            subject: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let view =
        ChainView::new(&ratls::cert::parse_pem_list(&bare.certificate_chain).unwrap()).unwrap();
    assert!(view.leaf.eku.is_empty());
    assert!(view.app_info.is_none());
}

#[tokio::test]
async fn errors_look_like_the_real_agent() {
    let dir = tempfile::tempdir().unwrap();
    let (client, _task) = start(dir.path(), APP, "a.sock").await;
    let bad_validity = TlsKeyRequest {
        not_before: Some(2000),
        not_after: Some(1000),
        ..Default::default()
    };
    match client.get_tls_key(&bad_validity).await.unwrap_err() {
        AgentError::Agent {
            status, message, ..
        } => {
            assert_eq!(status, 400);
            assert_eq!(message, "not_before must be earlier than not_after");
        }
        other => panic!("{other:?}"),
    }
    match client.get_quote(&[0u8; 65]).await.unwrap_err() {
        AgentError::Agent { message, .. } => assert_eq!(message, "Report data is too long"),
        other => panic!("{other:?}"),
    }
    let err = client
        .call::<_, serde_json::Value>("NoSuchMethod", &serde_json::json!({}))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("Service not found: NoSuchMethod"),
        "{err}"
    );
}

async fn raw(socket: &Path, request: &str) -> String {
    let mut stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

#[tokio::test]
async fn get_with_query_and_post_without_json_are_handled_like_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let (_client, _task) = start(dir.path(), APP, "a.sock").await;
    let socket = dir.path().join("a.sock");
    // dstack-vpc's mesh-serve.sh asks this way.
    let resp = raw(
        &socket,
        "GET /GetTlsKey?subject=localhost&usage_server_auth=true&usage_client_auth=true HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("certificate_chain"));
    let resp = raw(
        &socket,
        "POST /Info HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(resp.contains("application/json"), "{resp}");
    let resp = raw(
        &socket,
        "GET /GetTlsKey?usage_ra_tls=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        resp.contains("provided string was not `true` or `false`"),
        "{resp}"
    );
}

#[tokio::test]
async fn info_and_quote_say_they_are_not_attested() {
    let dir = tempfile::tempdir().unwrap();
    let (client, _task) = start(dir.path(), APP, "a.sock").await;
    let info = client.info().await.unwrap();
    assert_eq!(info.app_id, APP);
    assert_eq!(info.app_name, "test-app");
    assert!(info.tcb_info.contains(NOT_ATTESTED));
    assert!(info.vm_config.contains("\"attested\":false"));
    let quote = client.get_quote(&[0xab; 32]).await.unwrap();
    let bytes = hex::decode(&quote.quote).unwrap();
    let rd = ratls::attestation::quote_report_data(&bytes).unwrap();
    assert_eq!(&rd[..32], &[0xab; 32]);
    assert_eq!(&rd[32..], &[0u8; 32]);
    assert_eq!(quote.report_data, hex::encode(rd));
    assert!(client
        .version()
        .await
        .unwrap()
        .version
        .contains("dev-agent"));
}

#[tokio::test]
async fn agents_sharing_a_state_directory_share_a_root_and_derive_the_same_keys() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let (one, _t1) = start(dir.path(), APP, "one.sock").await;
    let (two, _t2) = start(dir.path(), APP, "two.sock").await;
    let (three, _t3) = start(dir.path(), "ff".repeat(20).as_str(), "three.sock").await;
    let (foreign, _t4) = start(other.path(), APP, "four.sock").await;
    let root = |resp: ratls::agent::TlsKeyResponse| resp.certificate_chain.last().unwrap().clone();
    let req = full_request();
    let r1 = root(one.get_tls_key(&req).await.unwrap());
    assert_eq!(r1, root(two.get_tls_key(&req).await.unwrap()));
    assert_eq!(r1, root(three.get_tls_key(&req).await.unwrap()));
    assert_ne!(r1, root(foreign.get_tls_key(&req).await.unwrap()));

    // GetKey: one key per (app, path, purpose), the same from every replica.
    let k1 = one.get_key("acme/account", "acme").await.unwrap().key;
    assert_eq!(k1.len(), 64);
    assert_eq!(k1, two.get_key("acme/account", "acme").await.unwrap().key);
    assert_ne!(k1, one.get_key("acme/other", "acme").await.unwrap().key);
    assert_ne!(k1, three.get_key("acme/account", "acme").await.unwrap().key);
    let _: AppId = APP.parse().unwrap();

    // The CA keys and the key secret are readable by the owner only.
    use std::os::unix::fs::PermissionsExt;
    for file in ["root-ca.pem", "key-secret"] {
        let mode = std::fs::metadata(dir.path().join("state").join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
}

#[test]
fn a_corrupt_state_directory_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("root-ca.pem"), "not a certificate").unwrap();
    let err = DevAgent::new(DevAgentConfig {
        app_id: APP.parse().unwrap(),
        instance_id: None,
        app_name: "x".into(),
        state_dir: state,
    })
    .unwrap_err();
    assert!(err.to_string().contains("root-ca.pem"), "{err}");
}

fn config(state: &Path, app: &str) -> DevAgentConfig {
    DevAgentConfig {
        app_id: app.parse().unwrap(),
        instance_id: None,
        app_name: "x".into(),
        state_dir: state.to_owned(),
    }
}

#[tokio::test]
async fn spawn_never_removes_a_live_socket_or_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let (_client, _task) = start(dir.path(), APP, "live.sock").await;
    let second = Arc::new(DevAgent::new(config(&dir.path().join("state"), APP)).unwrap());
    let err = second
        .clone()
        .spawn(&dir.path().join("live.sock"))
        .unwrap_err();
    assert!(err.to_string().contains("listening"), "{err}");

    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, "precious").unwrap();
    let err = second.clone().spawn(&file).unwrap_err();
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");

    // A stale socket (nobody listening) is replaced.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let _task = second.spawn(&stale).unwrap();
    AgentClient::new(AgentAddress::Unix(stale))
        .info()
        .await
        .unwrap();
}

#[test]
fn an_instance_id_must_be_hex() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), APP);
    cfg.instance_id = Some("not-hex".into());
    let err = DevAgent::new(cfg).unwrap_err();
    assert!(err.to_string().contains("instance id"), "{err}");
}

#[test]
fn agents_created_at_once_agree_on_one_root() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let roots: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let state = state.clone();
                s.spawn(move || {
                    let app = format!("{i:02x}").repeat(20);
                    DevAgent::new(config(&state, &app))
                        .unwrap()
                        .root_pem()
                        .to_owned()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(roots.iter().all(|r| *r == roots[0]));
}

#[tokio::test]
async fn a_refresh_under_another_root_is_refused_and_the_identity_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (client, first_agent) = start(dir.path(), APP, "agent.sock").await;
    let info = client.info().await.unwrap();
    let identity = ratls::identity::RotatingIdentity::start(client, info, Default::default())
        .await
        .unwrap();
    let before = identity.current();
    // The agent restarts with a new CA (its state gone) on the same socket.
    first_agent.abort();
    std::fs::remove_file(dir.path().join("agent.sock")).unwrap();
    std::fs::remove_dir_all(dir.path().join("state")).unwrap();
    let (_, _second_agent) = start(dir.path(), APP, "agent.sock").await;
    // The first call may meet the pooled connection to the old agent, reset.
    let mut result = identity.refresh_now().await;
    if matches!(result, Err(ratls::identity::IdentityError::Agent(_))) {
        result = identity.refresh_now().await;
    }
    match result {
        Err(ratls::identity::IdentityError::RootChanged { was, now }) => assert_ne!(was, now),
        other => panic!("{other:?}"),
    }
    assert_eq!(identity.current().fingerprint, before.fingerprint);
}
