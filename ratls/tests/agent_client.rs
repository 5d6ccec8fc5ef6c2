//! Round trips of `AgentClient` against a fake guest agent that answers with the responses the
//! real dstack simulator gave (`testdata/dstack-sim/api`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::{
    convert::Infallible,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use ratls::{
    agent::{
        AgentAddress, AgentClient, AgentError, InfoResponse, KeyResponse, QuoteResponse,
        TlsKeyRequest, TlsKeyResponse, VersionResponse, DEFAULT_SOCKET, LEGACY_SOCKET,
    },
    identity::Identity,
};
use serde::de::DeserializeOwned;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
    task::JoinHandle,
};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/dstack-sim/api");
const APP1_ID: &str = "5bb4ff9a3837357f19dc176407a5709c62eb6c56";
const APP1_INSTANCE: &str = "1691ed1b47506cad7d08834668691d88246f5b1f";
/// Long enough for a loaded CI machine, short enough that a hang fails the test quickly.
const TEST_DEADLINE: Duration = Duration::from_secs(10);

fn fixture(rel: &str) -> Vec<u8> {
    let path = format!("{FIXTURES}/{rel}");
    std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {path}: {e}"))
}

fn parse_fixture<T: DeserializeOwned>(rel: &str) -> T {
    serde_json::from_slice(&fixture(rel)).unwrap_or_else(|e| panic!("fixture {rel}: {e}"))
}

/// One request as the fake agent saw it.
#[derive(Clone, Debug)]
struct Recorded {
    method: http::Method,
    path: String,
    content_type: Option<String>,
    body: serde_json::Value,
}

type Requests = Arc<Mutex<Vec<Recorded>>>;

/// The recorded requests, even if a handler panicked while holding the lock.
fn lock(requests: &Requests) -> MutexGuard<'_, Vec<Recorded>> {
    requests.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the fake agent answers for a path (with query): status and body.
type Responder = fn(&str) -> (StatusCode, Vec<u8>);

/// The simulator's answers, by route.
fn simulator(path_and_query: &str) -> (StatusCode, Vec<u8>) {
    let file = match path_and_query {
        "/Info" => "app1/info_get.json",
        "/GetTlsKey" => "app1/tlskey_with_app_info.json",
        "/GetQuote" => "app1/quote_post.json",
        "/GetKey" => "app1/getkey_post.json",
        "/Version" => "app1/version_get.json",
        "/prpc/Tappd.Info?json" => "tappd/tappd_sock_prpc_Tappd.Info.json",
        // tappd's DeriveKey answers in GetTlsKey's shape.
        "/prpc/Tappd.DeriveKey?json" => "app1/tlskey_with_app_info.json",
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                fixture("app1/err_unknown_method.json"),
            )
        }
    };
    (StatusCode::OK, fixture(file))
}

/// A broken agent: 200 with a body that is not JSON.
fn not_json(_: &str) -> (StatusCode, Vec<u8>) {
    (StatusCode::OK, b"<html>surprise</html>".to_vec())
}

async fn handle(
    req: Request<Incoming>,
    requests: Requests,
    respond: Responder,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let bytes = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned());
    lock(&requests).push(Recorded {
        method: parts.method.clone(),
        path: path.clone(),
        content_type: parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body: serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    });
    let (status, body) = respond(&path);
    let mut resp = Response::new(Full::from(body));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::SERVER, HeaderValue::from_static("dstack Simulator"));
    Ok(resp)
}

fn serve_connection<IO>(io: IO, requests: Requests, respond: Responder)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let svc = service_fn(move |req| handle(req, requests.clone(), respond));
        // A client that goes away mid-request is not the test's concern.
        let _ = http1::Builder::new()
            .serve_connection(TokioIo::new(io), svc)
            .await;
    });
}

/// A Unix listener on `name` in a fresh temporary directory (kept alive by the caller).
fn bind_in_tempdir(name: &str) -> (tempfile::TempDir, PathBuf, UnixListener) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temporary directory: {e}"));
    let socket = dir.path().join(name);
    let listener =
        UnixListener::bind(&socket).unwrap_or_else(|e| panic!("bind {}: {e}", socket.display()));
    (dir, socket, listener)
}

/// A fake guest agent on a Unix socket in its own temporary directory.
#[derive(Debug)]
struct FakeAgent {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    requests: Requests,
    task: JoinHandle<()>,
}

impl FakeAgent {
    fn start(respond: Responder) -> Self {
        Self::start_named("dstack.sock", respond)
    }

    fn start_named(name: &str, respond: Responder) -> Self {
        let (dir, socket, listener) = bind_in_tempdir(name);
        let requests = Requests::default();
        let recorded = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                serve_connection(stream, recorded.clone(), respond);
            }
        });
        Self {
            _dir: dir,
            socket,
            requests,
            task,
        }
    }

    /// An agent that accepts connections and never answers.
    fn silent() -> Self {
        let (dir, socket, listener) = bind_in_tempdir("dstack.sock");
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        Self {
            _dir: dir,
            socket,
            requests: Requests::default(),
            task,
        }
    }

    fn address(&self) -> AgentAddress {
        AgentAddress::Unix(self.socket.clone())
    }

    fn client(&self) -> AgentClient {
        AgentClient::new(self.address()).with_timeout(TEST_DEADLINE)
    }

    fn requests(&self) -> Vec<Recorded> {
        lock(&self.requests).clone()
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn assert_json_post(req: &Recorded, path: &str) {
    assert_eq!(req.method, http::Method::POST, "{req:?}");
    assert_eq!(req.path, path, "{req:?}");
    assert_eq!(
        req.content_type.as_deref(),
        Some("application/json"),
        "without the JSON content type the agent decodes protobuf: {req:?}"
    );
}

#[tokio::test]
async fn info_parses_the_simulator_answer() {
    let agent = FakeAgent::start(simulator);
    let info = agent.client().info().await.unwrap();
    assert_eq!(info.app_id, APP1_ID);
    assert_eq!(info.instance_id, APP1_INSTANCE);
    assert_eq!(info.app_name, "guest-agent");
    assert!(info.app_cert.starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(info.key_provider_info.contains("\"kms\""));

    let reqs = agent.requests();
    assert_eq!(reqs.len(), 1);
    assert_json_post(&reqs[0], "/Info");
    assert_eq!(reqs[0].body, serde_json::json!({}));
}

#[tokio::test]
async fn version_parses() {
    let agent = FakeAgent::start(simulator);
    let version = agent.client().version().await.unwrap();
    assert_eq!(version.version, "0.6.0");
    assert_eq!(version.rev, "unknown");
    assert_json_post(&agent.requests()[0], "/Version");
}

#[tokio::test]
async fn get_tls_key_sends_the_request_and_builds_an_identity() {
    let agent = FakeAgent::start(simulator);
    let client = agent.client();
    let info = client.info().await.unwrap();
    let req = TlsKeyRequest {
        subject: "app1.dstack.internal".into(),
        alt_names: vec!["app1.dstack.internal".into()],
        usage_ra_tls: true,
        usage_server_auth: true,
        usage_client_auth: true,
        with_app_info: true,
        not_before: None,
        not_after: Some(2_000_000_000),
    };
    let resp = client.get_tls_key(&req).await.unwrap();
    assert_eq!(
        resp.certificate_chain.len(),
        2,
        "simulator chain: leaf and root"
    );

    let reqs = agent.requests();
    assert_eq!(reqs.len(), 2);
    let sent = &reqs[1];
    assert_json_post(sent, "/GetTlsKey");
    assert_eq!(sent.body["with_app_info"], true);
    assert_eq!(sent.body["usage_ra_tls"], true);
    assert_eq!(sent.body["not_after"], 2_000_000_000u64);
    assert_eq!(sent.body["subject"], "app1.dstack.internal");
    assert_eq!(
        sent.body["alt_names"],
        serde_json::json!(["app1.dstack.internal"])
    );
    assert!(
        sent.body.get("not_before").is_none(),
        "an unset not_before is left out, not sent as null: {}",
        sent.body
    );

    let identity = Identity::from_response(&resp, &info).unwrap();
    assert_eq!(identity.app_id.to_string(), APP1_ID);
    assert_eq!(identity.instance_id.as_deref(), Some(APP1_INSTANCE));
    assert_eq!(identity.app_name, "guest-agent");
    assert_eq!(identity.chain.len(), 2);
    assert_eq!(
        identity.attestation,
        ratls::AttestationStatus::KeyBound,
        "the leaf's attestation binds its key"
    );
}

#[tokio::test]
async fn get_quote_sends_hex_report_data() {
    let agent = FakeAgent::start(simulator);
    let quote = agent
        .client()
        .get_quote(&[0x12, 0x34, 0xde, 0xad, 0xbe, 0xef])
        .await
        .unwrap();
    let sent = &agent.requests()[0];
    assert_json_post(sent, "/GetQuote");
    assert_eq!(
        sent.body,
        serde_json::json!({ "report_data": "1234deadbeef" })
    );

    assert!(quote.report_data.starts_with("1234deadbeef"));
    assert_eq!(quote.report_data.len(), 128, "64 bytes, zero-padded");
    assert!(quote.quote.starts_with("04000200"), "TDX v4 quote");
    assert!(quote
        .attestation
        .as_deref()
        .is_some_and(|a| a.starts_with("83a776657273696f6e")));
    let events: serde_json::Value = serde_json::from_str(&quote.event_log).unwrap();
    assert_eq!(events.as_array().map(Vec::len), Some(33));
}

#[tokio::test]
async fn get_key_sends_path_and_purpose() {
    let agent = FakeAgent::start(simulator);
    let key = agent
        .client()
        .get_key("my/key/path", "signing")
        .await
        .unwrap();
    let sent = &agent.requests()[0];
    assert_json_post(sent, "/GetKey");
    assert_eq!(
        sent.body,
        serde_json::json!({ "path": "my/key/path", "purpose": "signing" })
    );
    assert_eq!(key.key.len(), 64);
    assert!(hex::decode(&key.key).is_ok());
    assert_eq!(key.signature_chain.len(), 2);
    assert!(
        !format!("{key:?}").contains(&key.key),
        "Debug must not print the key"
    );
}

#[tokio::test]
async fn unknown_method_is_an_agent_error() {
    let agent = FakeAgent::start(simulator);
    let err = agent
        .client()
        .call::<_, serde_json::Value>("NoSuchMethod", &serde_json::json!({}))
        .await
        .unwrap_err();
    match &err {
        AgentError::Agent {
            status, message, ..
        } => {
            assert_eq!(*status, 400);
            assert_eq!(message, "Service not found: NoSuchMethod");
        }
        other => panic!("expected AgentError::Agent, got {other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains(&agent.address().to_string()), "{text}");
    assert!(text.contains("NoSuchMethod"), "{text}");
    assert_json_post(&agent.requests()[0], "/NoSuchMethod");
}

#[tokio::test]
async fn silent_agent_times_out() {
    let agent = FakeAgent::silent();
    let client = AgentClient::new(agent.address()).with_timeout(Duration::from_millis(200));
    let err = tokio::time::timeout(TEST_DEADLINE, client.info())
        .await
        .expect("the client's own deadline fires first")
        .unwrap_err();
    match &err {
        AgentError::Timeout {
            method, timeout, ..
        } => {
            assert_eq!(method, "Info");
            assert_eq!(*timeout, Duration::from_millis(200));
        }
        other => panic!("expected AgentError::Timeout, got {other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains("Info"), "{text}");
    assert!(text.contains(&agent.address().to_string()), "{text}");
}

#[tokio::test]
async fn non_json_answer_is_a_bad_response() {
    let agent = FakeAgent::start(not_json);
    let err = agent.client().info().await.unwrap_err();
    match &err {
        AgentError::BadResponse { method, .. } => assert_eq!(method, "Info"),
        other => panic!("expected AgentError::BadResponse, got {other:?}"),
    }
}

#[tokio::test]
async fn discover_skips_missing_sockets() {
    let agent = FakeAgent::start(simulator);
    let candidates = vec![
        AgentAddress::Unix("/nonexistent/dstack.sock".into()),
        agent.address(),
    ];
    let (client, info) = AgentClient::discover(candidates, TEST_DEADLINE)
        .await
        .unwrap();
    assert_eq!(client.address(), &agent.address());
    assert_eq!(info.app_id, APP1_ID);
}

#[tokio::test]
async fn discover_with_no_agent_lists_what_it_tried() {
    let candidates = vec![
        AgentAddress::Unix("/nonexistent/dstack.sock".into()),
        AgentAddress::Unix("/nonexistent/tappd.sock".into()),
    ];
    let err = AgentClient::discover(candidates, Duration::from_millis(200))
        .await
        .unwrap_err();
    match &err {
        AgentError::NotFound { tried } => assert_eq!(tried.len(), 2, "{tried:?}"),
        other => panic!("expected AgentError::NotFound, got {other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains("/nonexistent/dstack.sock"), "{text}");
    assert!(text.contains("/nonexistent/tappd.sock"), "{text}");
}

#[tokio::test]
async fn discover_reports_an_agent_that_fails() {
    let agent = FakeAgent::start(not_json);
    let err = AgentClient::discover(vec![agent.address()], TEST_DEADLINE)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, AgentError::NotFound { .. }), "{err:?}");
    assert!(text.contains(&agent.address().to_string()), "{text}");
    assert!(text.contains("unexpected response"), "{text}");
}

#[tokio::test]
async fn legacy_tappd_socket_uses_prpc_paths() {
    let agent = FakeAgent::start_named("tappd.sock", simulator);
    let client = agent.client();
    let info = client.info().await.unwrap();
    assert_eq!(info.app_id, APP1_ID);
    assert_json_post(&agent.requests()[0], "/prpc/Tappd.Info?json");

    let err = client.get_key("p", "q").await.unwrap_err();
    assert!(
        matches!(&err, AgentError::Unsupported { method, .. } if method == "GetKey"),
        "{err:?}"
    );
    assert_eq!(
        agent.requests().len(),
        1,
        "GetKey is refused without a call"
    );

    // A fresh key on every request: without random_seed tappd derives the same key from the
    // path each time, which any process on the CVM could ask for too.
    let req = TlsKeyRequest {
        subject: "dstack-mesh".into(),
        usage_ra_tls: true,
        usage_client_auth: true,
        not_after: Some(4_000_000_000),
        ..TlsKeyRequest::default()
    };
    client.get_tls_key(&req).await.unwrap();
    let sent = &agent.requests()[1];
    assert_json_post(sent, "/prpc/Tappd.DeriveKey?json");
    assert_eq!(sent.body["random_seed"], true, "{sent:?}");
    assert_eq!(sent.body["subject"], "dstack-mesh");
    assert_eq!(sent.body["usage_client_auth"], true);
    assert!(!sent.body["path"].as_str().unwrap().is_empty(), "{sent:?}");
    // tappd has no validity fields: they are not sent as if they were honoured.
    assert!(sent.body.get("not_after").is_none(), "{sent:?}");
}

#[tokio::test]
async fn http_address_works() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let requests = Requests::default();
    let recorded = requests.clone();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            serve_connection(stream, recorded.clone(), simulator);
        }
    });

    let address: AgentAddress = format!("http://127.0.0.1:{port}").parse().unwrap();
    assert_eq!(
        address,
        AgentAddress::Http(format!("http://127.0.0.1:{port}"))
    );
    let info = AgentClient::new(address)
        .with_timeout(TEST_DEADLINE)
        .info()
        .await
        .unwrap();
    task.abort();
    assert_eq!(info.app_id, APP1_ID);
    let reqs = lock(&requests).clone();
    assert_json_post(&reqs[0], "/Info");
}

#[test]
fn candidates_default_to_the_two_sockets() {
    let c = AgentAddress::candidates(None, None).unwrap();
    assert_eq!(
        c,
        vec![
            AgentAddress::Unix(DEFAULT_SOCKET.into()),
            AgentAddress::Unix(LEGACY_SOCKET.into()),
        ]
    );
    assert_eq!(c[0], AgentAddress::Unix("/var/run/dstack.sock".into()));
    assert_eq!(c[1], AgentAddress::Unix("/var/run/tappd.sock".into()));
}

#[test]
fn configured_address_wins_over_the_environment() {
    let c = AgentAddress::candidates(Some("unix:/x.sock"), Some("http://h:1")).unwrap();
    assert_eq!(c, vec![AgentAddress::Unix("/x.sock".into())]);
}

#[test]
fn environment_address_is_used_when_nothing_is_configured() {
    let c = AgentAddress::candidates(None, Some("http://127.0.0.1:8090")).unwrap();
    assert_eq!(c, vec![AgentAddress::Http("http://127.0.0.1:8090".into())]);
}

#[test]
fn address_parsing() {
    let unix = |p: &str| AgentAddress::Unix(p.into());
    assert_eq!(
        "unix:/a.sock".parse::<AgentAddress>().unwrap(),
        unix("/a.sock")
    );
    assert_eq!(
        "unix:///a.sock".parse::<AgentAddress>().unwrap(),
        unix("/a.sock")
    );
    assert_eq!("/a.sock".parse::<AgentAddress>().unwrap(), unix("/a.sock"));
    assert_eq!(
        "http://h:1/".parse::<AgentAddress>().unwrap(),
        AgentAddress::Http("http://h:1".into())
    );
    assert_eq!(unix("/a.sock").to_string(), "unix:/a.sock");
    for bad in ["ftp://x", "unix:", "", "https://h:1"] {
        let err = bad.parse::<AgentAddress>().unwrap_err();
        assert!(matches!(err, AgentError::BadAddress(_)), "{bad:?}: {err:?}");
    }
    assert!(AgentAddress::candidates(Some("ftp://x"), None).is_err());
}

/// Every successful JSON answer the simulator gave parses into the client's response type.
#[test]
fn every_simulator_answer_parses() {
    let mut parsed = 0;
    for app in ["app1", "app2"] {
        let dir = Path::new(FIXTURES).join(app);
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        entries.sort();
        for path in entries {
            let status = std::fs::read_to_string(path.with_extension("status")).unwrap();
            if status.trim() != "200" {
                continue;
            }
            let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
            let rel = format!("{app}/{name}.json");
            if name.starts_with("info_") {
                let info: InfoResponse = parse_fixture(&rel);
                assert_eq!(info.app_id.len(), 40, "{rel}");
                assert!(!info.instance_id.is_empty(), "{rel}");
            } else if name.starts_with("tlskey_") {
                let resp: TlsKeyResponse = parse_fixture(&rel);
                assert!(resp.key.contains("PRIVATE KEY"), "{rel}");
                assert_eq!(resp.certificate_chain.len(), 2, "{rel}");
                ratls::cert::parse_pem_list(&resp.certificate_chain).unwrap();
            } else if name.starts_with("quote_") {
                let quote: QuoteResponse = parse_fixture(&rel);
                assert_eq!(quote.report_data.len(), 128, "{rel}");
                assert!(quote.attestation.is_some(), "{rel}");
            } else if name.starts_with("getkey_") {
                let key: KeyResponse = parse_fixture(&rel);
                assert_eq!(key.key.len(), 64, "{rel}");
            } else if name.starts_with("version_") {
                let version: VersionResponse = parse_fixture(&rel);
                assert_eq!(version.version, "0.6.0", "{rel}");
            } else if name.starts_with("attest_") {
                // `Attest` has no typed method on the client; the answer is `{attestation: hex}`.
                let v: serde_json::Value = parse_fixture(&rel);
                assert!(v["attestation"].as_str().is_some(), "{rel}");
            } else {
                panic!("{rel}: a 200 answer with no response type to check it against");
            }
            parsed += 1;
        }
    }
    assert!(
        parsed >= 20,
        "only {parsed} fixtures found under {FIXTURES}"
    );

    let signed: QuoteResponse = parse_fixture("app1-signed/get_quote_post.json");
    assert!(!signed.quote.is_empty());
}

#[test]
fn app2_info_names_app2() {
    let info: InfoResponse = parse_fixture("app2/info_get.json");
    assert_eq!(info.app_id, "71cbb64614e7090669b2f0cb159295bd81804fa9");
    assert_eq!(info.instance_id, "30dd0ddbcd7bbe24f1a8598846ae67329d8073ae");
}

#[test]
fn legacy_tappd_info_parses() {
    let info: InfoResponse = parse_fixture("tappd/tappd_sock_prpc_Tappd.Info.json");
    assert_eq!(info.app_id, APP1_ID);
    assert_eq!(info.instance_id, APP1_INSTANCE);
    assert_eq!(info.app_name, "guest-agent");
}
