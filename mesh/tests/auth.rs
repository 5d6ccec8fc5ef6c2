//! The auth service as nginx's auth_request calls it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use dstack_mesh::{
    app::App,
    auth::{AuthService, Decision, NginxProof, Vouch},
    config::{Config, Secret},
};
use e2e::{backend::Backend, identity};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use nginx_compat::auth_request::escape;
use ratls::identity::RotatingIdentity;

const SERVER: &str = "a0717a0717a0717a0717a0717a0717a0717a0717";
const CALLER: &str = "ca11ca11ca11ca11ca11ca11ca11ca11ca11ca11";
const STRANGER: &str = "0bad0bad0bad0bad0bad0bad0bad0bad0bad0bad";
/// The secret our nginx sends with every auth subrequest (`auth.nginx_secret`).
const SECRET: &str = "0123456789abcdef0123456789abcdef-nginx";

struct Setup {
    app: App,
    caller: RotatingIdentity,
    stranger: RotatingIdentity,
    dir: tempfile::TempDir,
    _agents: Vec<tokio::task::JoinHandle<()>>,
    _backend: Backend,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (server, a1) = identity(dir.path(), &state, SERVER).await;
    let (caller, a2) = identity(dir.path(), &state, CALLER).await;
    let (stranger, a3) = identity(dir.path(), &state, STRANGER).await;
    let backend = Backend::start().await;
    let text = format!(
        "[inbound]\nenabled = false\nbackend = \"{}\"\nallowed_apps = \"{CALLER}\"\n[auth]\nlisten = \"127.0.0.1:0\"\nnginx_secret = \"{SECRET}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[client]\nenabled = false\n[tls]\nca_file = \"{}\"\n",
        backend.addr,
        write_root(&dir, &server),
    );
    let config = Config::from_toml(&text, &HashMap::<&str, &str>::new()).unwrap();
    let app = App::start_with(config, server).await.unwrap();
    assert!(app.inbound.is_none());
    Setup {
        app,
        caller,
        stranger,
        dir,
        _agents: vec![a1, a2, a3],
        _backend: backend,
    }
}

/// nginx's CA file: our root, as mesh-serve.sh writes it.
fn write_root(dir: &tempfile::TempDir, id: &RotatingIdentity) -> String {
    let path = dir.path().join("ca.crt");
    std::fs::write(&path, pem(std::slice::from_ref(&id.current().root))).unwrap();
    path.display().to_string()
}

fn leaf_pem(id: &RotatingIdentity) -> String {
    pem(&id.current().chain[..1])
}

fn pem(certs: &[rustls_pki_types::CertificateDer<'_>]) -> String {
    e2e::to_pem(certs)
}

/// GET /auth on the running service, as our nginx sends it (with the secret).
async fn ask(
    addr: SocketAddr,
    verify: Option<&str>,
    cert: Option<&str>,
) -> (StatusCode, http::HeaderMap) {
    ask_as(addr, Some(SECRET), verify, cert).await
}

/// GET /auth with `secret` (or none) in nginx's proof header.
async fn ask_as(
    addr: SocketAddr,
    secret: Option<&str>,
    verify: Option<&str>,
    cert: Option<&str>,
) -> (StatusCode, http::HeaderMap) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = Request::get("/auth").header("host", "127.0.0.1");
    if let Some(v) = verify {
        req = req.header("x-client-verify", v);
    }
    if let Some(c) = cert {
        req = req.header("x-client-cert", c);
    }
    if let Some(secret) = secret {
        req = req.header("x-dstack-mesh-nginx-secret", secret);
    }
    let resp = send
        .send_request(req.body(Empty::new()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let _ = resp.into_body().collect().await;
    (status, headers)
}

#[tokio::test]
async fn the_allowed_app_gets_200_with_its_identity() {
    let s = setup().await;
    let addr = s.app.addr("auth").unwrap();
    let (status, headers) = ask(addr, Some("SUCCESS"), Some(&escape(&leaf_pem(&s.caller)))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-dstack-app-id"], CALLER);
    let instance = s.caller.current().instance_id.clone().unwrap();
    assert_eq!(headers["x-dstack-instance-id"], instance.as_str());
    // The whole chain in the header is verified to the root, and passes too.
    let full = pem(&s.caller.current().chain);
    assert_eq!(
        ask(addr, Some("SUCCESS"), Some(&escape(&full))).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn refusals() {
    let s = setup().await;
    let addr = s.app.addr("auth").unwrap();
    let caller = escape(&leaf_pem(&s.caller));
    // No certificate; nginx failed to verify; no header at all.
    assert_eq!(
        ask(addr, Some("NONE"), None).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        ask(addr, Some("FAILED:certificate has expired"), Some(&caller))
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        ask(addr, None, Some(&caller)).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        ask(addr, Some("SUCCESS"), None).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        ask(addr, Some("SUCCESS"), Some("garbage%zz")).await.0,
        StatusCode::UNAUTHORIZED
    );
    // A valid certificate of an app that is not allowed.
    let stranger = escape(&leaf_pem(&s.stranger));
    assert_eq!(
        ask(addr, Some("SUCCESS"), Some(&stranger)).await.0,
        StatusCode::FORBIDDEN
    );
    // Another root's full chain, with our root's name: verified here, refused.
    let other = tempfile::tempdir().unwrap();
    let (foreign, _agent) = identity(other.path(), &other.path().join("state"), CALLER).await;
    let foreign_chain = escape(&pem(&foreign.current().chain));
    assert_eq!(
        ask(addr, Some("SUCCESS"), Some(&foreign_chain)).await.0,
        StatusCode::UNAUTHORIZED
    );
    // Leaves under our own App CA that nginx would have passed: expired, and without app id.
    let state = s.dir.path().join("state");
    let (expired, _) = e2e::mint_under_app_ca(&state, CALLER, |p| {
        p.not_before = time::OffsetDateTime::now_utc() - std::time::Duration::from_secs(7200);
        p.not_after = time::OffsetDateTime::now_utc() - std::time::Duration::from_secs(3600);
    });
    let expired = escape(&pem(&expired[..1]));
    assert_eq!(
        ask(addr, Some("SUCCESS"), Some(&expired)).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (anonymous, _) = e2e::mint_under_app_ca(&state, CALLER, |p| p.custom_extensions.clear());
    let anonymous = escape(&pem(&anonymous[..1]));
    assert_eq!(
        ask(addr, Some("SUCCESS"), Some(&anonymous)).await.0,
        StatusCode::UNAUTHORIZED
    );
    // The same minting, unbent, passes: the refusals are about the bent property.
    let (good, _) = e2e::mint_under_app_ca(&state, CALLER, |_| {});
    let good = escape(&pem(&good[..1]));
    assert_eq!(
        ask(addr, Some("SUCCESS"), Some(&good)).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn health_and_unknown_paths() {
    let s = setup().await;
    let addr = s.app.addr("auth").unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = send
        .send_request(Request::get("/health").body(Empty::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let _ = resp.into_body().collect().await;
    let resp = send
        .send_request(Request::get("/other").body(Empty::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn nginx_is_believed_only_with_its_secret_or_from_loopback_when_so_configured() {
    let s = setup().await;
    let anchors = s.caller.current().trust_anchors().unwrap();
    let policy = Arc::new(ratls::Policy::new(anchors));
    let loopback: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    let loopback6: SocketAddr = "[::1]:40000".parse().unwrap();
    // Another container on the compose network, as dstack-vpc's auth port (0.0.0.0) allows.
    let neighbour: SocketAddr = "172.18.0.5:40000".parse().unwrap();

    let by_loopback = AuthService::new(policy.clone(), NginxProof::Loopback);
    assert_eq!(by_loopback.vouch(None, loopback), Vouch::Nginx);
    assert_eq!(by_loopback.vouch(None, loopback6), Vouch::Nginx);
    assert_eq!(
        by_loopback.vouch(Some(SECRET.as_bytes()), neighbour),
        Vouch::Nobody
    );

    let by_secret = AuthService::new(
        policy.clone(),
        NginxProof::Secret(Secret(SECRET.to_owned())),
    );
    assert_eq!(
        by_secret.vouch(Some(SECRET.as_bytes()), neighbour),
        Vouch::Nginx
    );
    assert_eq!(by_secret.vouch(None, loopback), Vouch::Nobody);
    assert_eq!(
        by_secret.vouch(Some(b"0123456789abcdef"), loopback),
        Vouch::Nobody
    );

    let never = AuthService::new(policy, NginxProof::Never);
    assert_eq!(
        never.vouch(Some(SECRET.as_bytes()), loopback),
        Vouch::Nobody
    );
}

#[tokio::test]
async fn decisions_are_cached_and_a_new_policy_clears_them() {
    let s = setup().await;
    let auth: &Arc<AuthService> = s.app.auth.as_ref().unwrap();
    let cert = escape(&leaf_pem(&s.caller));
    let first = auth.decide(Some("SUCCESS"), Some(&cert), Vouch::Nginx);
    assert!(matches!(first, Decision::Allow(_)));
    assert_eq!(auth.cached_decisions(), 1);
    assert_eq!(
        auth.decide(Some("SUCCESS"), Some(&cert), Vouch::Nginx),
        first
    );
    assert_eq!(auth.cached_decisions(), 1);
    // A policy that no longer allows the caller: the cached grant must not survive it.
    let anchors = s.caller.current().trust_anchors().unwrap();
    let none = ratls::Policy::new(anchors).allow(ratls::AllowList::Only(Default::default()));
    auth.set_policy(Arc::new(none));
    assert_eq!(auth.cached_decisions(), 0);
    assert!(matches!(
        auth.decide(Some("SUCCESS"), Some(&cert), Vouch::Nginx),
        Decision::Forbidden(_)
    ));
}

#[tokio::test]
async fn lone_leaves_need_nginx_to_trust_only_our_roots() {
    // nginx's CA file holds another root too: a lone leaf is no longer taken on nginx's word.
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (server, _a) = identity(dir.path(), &state, SERVER).await;
    let (caller, _b) = identity(dir.path(), &state, CALLER).await;
    let other = tempfile::tempdir().unwrap();
    let (foreign, _c) = identity(other.path(), &other.path().join("state"), CALLER).await;
    let ca = dir.path().join("ca.crt");
    let roots = [
        server.current().root.clone(),
        foreign.current().root.clone(),
    ];
    std::fs::write(&ca, pem(&roots)).unwrap();
    let app = auth_service(server, CALLER, &ca.display().to_string()).await;
    let addr = app.addr("auth").unwrap();
    // The full chain still verifies here, without nginx's word.
    assert_lone_then_full(addr, &caller, StatusCode::UNAUTHORIZED).await;
    let lone = escape(&leaf_pem(&caller));

    // Switched off explicitly: the same.
    let text = format!(
        "[inbound]\nenabled = false\nallowed_apps = \"{CALLER}\"\n[auth]\nlisten = \"127.0.0.1:0\"\ntrust_nginx_chain = false\nnginx_secret = \"{SECRET}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[client]\nenabled = false\n"
    );
    let (server2, _d) = identity(other.path(), &state, SERVER).await;
    let config = Config::from_toml(&text, &HashMap::<&str, &str>::new()).unwrap();
    let app = App::start_with(config, server2).await.unwrap();
    let addr = app.addr("auth").unwrap();
    assert_eq!(
        ask(addr, Some("SUCCESS"), Some(&lone)).await.0,
        StatusCode::UNAUTHORIZED
    );
}

/// An auth service (with our nginx's secret) admitting `allowed`, nginx's CA file at `ca_file`.
async fn auth_service(server: RotatingIdentity, allowed: &str, ca_file: &str) -> App {
    let text = format!(
        "[inbound]\nenabled = false\nallowed_apps = \"{allowed}\"\n[auth]\nlisten = \"127.0.0.1:0\"\nnginx_secret = \"{SECRET}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[client]\nenabled = false\n[tls]\nca_file = \"{ca_file}\"\n"
    );
    let config = Config::from_toml(&text, &HashMap::<&str, &str>::new()).unwrap();
    App::start_with(config, server).await.unwrap()
}

/// A lone leaf of `caller` gets `lone`; its whole chain, which needs no one's word, gets 200.
async fn assert_lone_then_full(addr: SocketAddr, caller: &RotatingIdentity, lone: StatusCode) {
    let leaf = escape(&leaf_pem(caller));
    assert_eq!(ask(addr, Some("SUCCESS"), Some(&leaf)).await.0, lone);
    let full = escape(&pem(&caller.current().chain));
    assert_eq!(
        ask(addr, Some("SUCCESS"), Some(&full)).await.0,
        StatusCode::OK
    );
}

/// A leaf signed by nobody but itself that claims `app` in the KMS app id extension.
fn self_signed_leaf(app: &str) -> String {
    let mut params = rcgen::CertificateParams::new(vec!["forged".into()]).unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let mut der = vec![0x04, 20];
    der.extend(hex::decode(app).unwrap());
    params
        .custom_extensions
        .push(rcgen::CustomExtension::from_oid_content(
            &[1, 3, 6, 1, 4, 1, 62397, 1, 3],
            der,
        ));
    let key = rcgen::KeyPair::generate().unwrap();
    params.self_signed(&key).unwrap().pem()
}

#[tokio::test]
async fn only_our_nginx_is_taken_at_its_word_for_a_lone_leaf() {
    let s = setup().await;
    let addr = s.app.addr("auth").unwrap();
    let lone = escape(&leaf_pem(&s.caller));
    // Without nginx's secret, or with a wrong one, a lone KMS leaf cannot be verified here.
    for secret in [None, Some("0123456789abcdef0123456789abcdef-other")] {
        assert_eq!(
            ask_as(addr, secret, Some("SUCCESS"), Some(&lone)).await.0,
            StatusCode::UNAUTHORIZED,
            "{secret:?}"
        );
    }
    assert_eq!(
        ask(addr, Some("SUCCESS"), Some(&lone)).await.0,
        StatusCode::OK
    );
    // A whole chain needs no one's word.
    let full = escape(&pem(&s.caller.current().chain));
    assert_eq!(
        ask_as(addr, None, Some("SUCCESS"), Some(&full)).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_forged_leaf_sent_straight_to_the_service_is_refused_under_any() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (server, _a) = identity(dir.path(), &state, SERVER).await;
    let ca = write_root(&dir, &server);
    let app = auth_service(server, "any", &ca).await;
    let addr = app.addr("auth").unwrap();
    let forged = escape(&self_signed_leaf(STRANGER));
    let (status, headers) = ask_as(addr, None, Some("SUCCESS"), Some(&forged)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(headers.get("x-dstack-app-id").is_none());
}

#[tokio::test]
async fn an_unreadable_nginx_ca_file_fails_closed() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (server, _a) = identity(dir.path(), &state, SERVER).await;
    let (caller, _b) = identity(dir.path(), &state, CALLER).await;
    let missing = dir.path().join("not-mounted/ca.crt");
    let app = auth_service(server, CALLER, &missing.display().to_string()).await;
    let addr = app.addr("auth").unwrap();
    // Nothing shows that nginx checks chains against our roots: its word is not taken.
    assert_lone_then_full(addr, &caller, StatusCode::UNAUTHORIZED).await;
}

#[test]
fn garbage_does_not_evict_grants() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let s = setup().await;
        let auth = s.app.auth.as_ref().unwrap();
        let cert = escape(&leaf_pem(&s.caller));
        assert!(matches!(
            auth.decide(Some("SUCCESS"), Some(&cert), Vouch::Nginx),
            Decision::Allow(_)
        ));
        for i in 0..20_000 {
            auth.decide(Some("SUCCESS"), Some(&format!("garbage-{i}")), Vouch::Nginx);
        }
        assert_eq!(auth.cached_decisions(), 1, "garbage is not cached");
    });
}
