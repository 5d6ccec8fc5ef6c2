//! The embedded default: a local demo mesh on one machine, with no TEE and no configuration.
//!
//! Three apps get identities from development agents that share a root. App B runs a sidecar
//! in front of a small demo app and lets only app A in. Apps A and C call B the way every app
//! does: plain HTTP to their own sidecar's outbound port with `x-dstack-target-app`. Their
//! sidecars dial B through an in-process stand-in for the dstack gateway (TLS passthrough by
//! SNI) and verify B inside the handshake. The output shows what B's demo app saw (A's app
//! id, set by B's sidecar after it verified A's certificate) and what was refused (C).

mod gateway;

use std::{
    collections::HashMap, convert::Infallible, net::SocketAddr, path::PathBuf, process::ExitCode,
    sync::Arc, time::Duration,
};

use anyhow::Context;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use ratls::{
    agent::{AgentAddress, AgentClient},
    dev_agent::{self, DevAgent, DevAgentConfig},
    identity::{IdentityConfig, RotatingIdentity},
    AppId,
};

pub use gateway::SniGateway;

use crate::{app::App, cli::EXIT_UNAVAILABLE, config::Config};

/// App A: the caller B allows.
const APP_A: &str = "a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0";
/// App C: a caller B does not allow.
const APP_C: &str = "c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0";
/// The gateway's base domain in the demo.
const BASE_DOMAIN: &str = "gateway.demo";
/// B's public custom domain.
const PUBLIC_DOMAIN: &str = "app-b.demo.test";

/// Run the demo and print what happened.
pub async fn run(state_dir: Option<PathBuf>) -> ExitCode {
    let tmp;
    let dir = match state_dir {
        Some(d) => d,
        None => match tempfile::tempdir() {
            Ok(t) => {
                tmp = t;
                tmp.path().to_owned()
            }
            Err(e) => {
                eprintln!("error: cannot create a temporary directory: {e}");
                return ExitCode::from(EXIT_UNAVAILABLE);
            }
        },
    };
    eprintln!("WARNING: {}", dev_agent::NOT_ATTESTED);
    match demo(dir).await {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_UNAVAILABLE)
        }
    }
}

/// An identity from a development agent for `app`, serving on `<dir>/<name>.sock`.
async fn dev_identity(
    dir: &std::path::Path,
    name: &str,
    app: AppId,
) -> anyhow::Result<(RotatingIdentity, tokio::task::JoinHandle<()>)> {
    let agent = Arc::new(DevAgent::new(DevAgentConfig {
        app_id: app,
        instance_id: None,
        app_name: format!("demo-{name}"),
        state_dir: dir.join("state"),
    })?);
    let socket = dir.join(format!("{name}.sock"));
    let task = agent.spawn(&socket)?;
    let (client, info) =
        AgentClient::discover(vec![AgentAddress::Unix(socket)], Duration::from_secs(5)).await?;
    let identity = RotatingIdentity::start(client, info, IdentityConfig::default()).await?;
    Ok((identity, task))
}

async fn demo(dir: PathBuf) -> anyhow::Result<String> {
    let app_b = dev_agent::default_app_id();
    let app_a: AppId = APP_A.parse()?;
    let app_c: AppId = APP_C.parse()?;
    let (id_a, _agent_a) = dev_identity(&dir, "app-a", app_a.clone()).await?;
    let (id_b, _agent_b) = dev_identity(&dir, "app-b", app_b.clone()).await?;
    let (id_c, _agent_c) = dev_identity(&dir, "app-c", app_c.clone()).await?;

    // B's demo app, and B's sidecar in front of it: only app A may call.
    let app_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let app_addr = app_listener.local_addr()?;
    let demo_app = tokio::spawn(serve_demo_app(app_listener));
    let sidecar_b = App::start_with(
        demo_config(&format!(
            "[inbound]\nlisten = \"127.0.0.1:0\"\nbackend = \"{app_addr}\"\nallowed_apps = \"{APP_A}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[client]\nenabled = false\n\
             [acme]\nstore = \"{store}\"\nissuer = \"internal-ca\"\n\
             [[domains]]\nnames = [\"{PUBLIC_DOMAIN}\"]\nbackend = \"{app_addr}\"\n",
            store = dir.join("acme").display(),
        ))?,
        id_b.clone(),
    )
    .await?;
    let inbound_b = sidecar_b.addr("inbound").context("B's inbound listener")?;

    // The gateway stand-in: `<B>-443s.gateway.demo` passes through to B's sidecar.
    let gw_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let gw_addr = gw_listener.local_addr()?;
    let gw = SniGateway::new(BASE_DOMAIN, HashMap::from([(app_b.to_string(), inbound_b)]));
    let gw_task = tokio::spawn(gw.serve(gw_listener));

    // A's and C's sidecars: outbound proxies that reach every gateway name via the stand-in.
    let outbound = format!(
        "[inbound]\nenabled = false\n[admin]\nlisten = \"127.0.0.1:0\"\n[client]\naddress = \"127.0.0.1\"\nport = 0\n[dstack]\ngateway_domain = \"{BASE_DOMAIN}\"\n[outbound]\ngateway_address = \"{gw_addr}\"\n"
    );
    let sidecar_a = App::start_with(demo_config(&outbound)?, id_a.clone()).await?;
    let sidecar_c = App::start_with(demo_config(&outbound)?, id_c.clone()).await?;
    let out_a = sidecar_a.addr("outbound").context("A's outbound proxy")?;
    let out_c = sidecar_c.addr("outbound").context("C's outbound proxy")?;

    let from_a = call(out_a, &app_b).await?;
    let from_c = call(out_c, &app_b).await?;
    let from_browser = browse(&sidecar_b, inbound_b, &dir.join("acme/internal-ca/ca.pem")).await?;
    demo_app.abort();
    gw_task.abort();

    Ok(format!(
        "dstack-mesh demo: a local mesh of three apps (development agents in {})\n\n\
         app A (allowed to call B; its sidecar's outbound proxy is {out_a})\n{}\n\
         app B (its sidecar's inbound listener is {inbound_b}, in front of the demo app on {app_addr})\n{}\n\
         app C (not on B's allowlist; outbound proxy {out_c})\n{}\n\
         Each app sends plain HTTP to its own sidecar, naming B in x-dstack-target-app.\n\
         The sidecar dials {app_b}-443s.{BASE_DOMAIN}\n\
         through the gateway stand-in on {gw_addr} (TLS passthrough by SNI)\n\
         and verifies B's app id inside the handshake, before any request byte leaves.\n\n\
         app A -> B: {from_a}\n\
         app C -> B: {from_c}\n\n\
         B's sidecar also serves the public domain {PUBLIC_DOMAIN} on the same port, with a\n\
         certificate from the internal CA (the demo's issuer; set [acme] issuer = \"letsencrypt\"\n\
         in production). A browser's request, no client certificate:\n\
         https://{PUBLIC_DOMAIN}/ -> {from_browser}\n",
        dir.display(),
        indent(&crate::tools::describe(&id_a.current())),
        indent(&crate::tools::describe(&id_b.current())),
        indent(&crate::tools::describe(&id_c.current())),
    ))
}

/// A sidecar config for the demo: the auth service off, the rest from `text`.
fn demo_config(text: &str) -> anyhow::Result<Config> {
    Ok(Config::from_toml(
        &format!("[auth]\nenabled = false\n{text}"),
        &HashMap::<String, String>::new(),
    )?)
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

/// The demo app: says who called it, as the sidecar told it.
async fn serve_demo_app(listener: tokio::net::TcpListener) {
    while let Ok((tcp, _)) = listener.accept().await {
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let caller = req
                        .headers()
                        .get("x-dstack-app-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("(none)")
                        .to_owned();
                    let body =
                        format!("hello from the demo app; the sidecar says you are app {caller}");
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

/// What a browser does: HTTPS to B's public domain, trusting the internal CA's root.
async fn browse(
    sidecar: &App,
    inbound: SocketAddr,
    root: &std::path::Path,
) -> anyhow::Result<String> {
    // The internal CA signs within milliseconds of start; wait for it all the same.
    for _ in 0..250 {
        let valid = sidecar.acme.as_ref().is_some_and(|a| {
            a.status()
                .iter()
                .all(|s| s.status == crate::acme::Status::Valid)
        });
        if valid {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in ratls::cert::parse_chain(&std::fs::read(root)?)? {
        roots.add(cert)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(ratls::crypto::provider())
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(inbound).await?;
    let name = rustls_pki_types::ServerName::try_from(PUBLIC_DOMAIN)?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    let req = Request::get("/")
        .header("host", PUBLIC_DOMAIN)
        .body(Empty::<Bytes>::new())?;
    exchange(tls, req).await
}

/// One HTTP/1.1 request on `io`: "status: body".
async fn exchange<IO>(io: IO, req: Request<Empty<Bytes>>) -> anyhow::Result<String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(conn);
    let resp = tokio::time::timeout(Duration::from_secs(30), send.send_request(req))
        .await
        .context("no answer from the sidecar")??;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(format!(
        "{status}: {}",
        String::from_utf8_lossy(&body).trim()
    ))
}

/// What an app does: one plain HTTP request to its own sidecar, naming the target app.
async fn call(outbound: SocketAddr, target: &AppId) -> anyhow::Result<String> {
    let tcp = tokio::net::TcpStream::connect(outbound).await?;
    let req = Request::get("/hello")
        .header("host", "app-b.demo")
        .header("x-dstack-target-app", target.to_string())
        // A forgery the target's sidecar must drop.
        .header(
            "x-dstack-app-id",
            "0000000000000000000000000000000000000000",
        )
        .body(Empty::<Bytes>::new())?;
    exchange(tcp, req).await
}

/// Resolves on SIGTERM or Ctrl-C (`run` handles SIGHUP itself: a reload).
pub async fn wait_for_shutdown() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
