//! The embedded default: a local demo mesh on one machine, with no TEE and no configuration.
//!
//! Two apps get identities from development agents that share a root. The "backend" app runs a
//! sidecar (inbound listener) in front of a small demo app; the "frontend" app calls it over
//! mutual TLS. The output shows both identities and what the demo app received: the caller's
//! app id, set by the sidecar after it verified the caller's certificate.

use std::{
    collections::HashMap, convert::Infallible, path::PathBuf, process::ExitCode, sync::Arc,
    time::Duration,
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
    AppId, Policy,
};

use crate::{app::App, cli::EXIT_UNAVAILABLE, config::Config};

/// The demo's frontend app.
const FRONTEND: &str = "f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0";

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
    let backend_app = dev_agent::default_app_id();
    let frontend_app: AppId = FRONTEND.parse()?;
    let (backend_id, _a) = dev_identity(&dir, "backend", backend_app.clone()).await?;
    let (frontend_id, _b) = dev_identity(&dir, "frontend", frontend_app.clone()).await?;

    // The demo app the backend's sidecar protects.
    let app_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let app_addr = app_listener.local_addr()?;
    let demo_app = tokio::spawn(serve_demo_app(app_listener));

    // The backend's sidecar: inbound listener, only the frontend app allowed.
    let config = Config::from_toml(
        &format!(
            "[inbound]\nlisten = \"127.0.0.1:0\"\nbackend = \"{app_addr}\"\nallowed_apps = \"{FRONTEND}\"\n[auth]\nenabled = false\n[client]\nenabled = false\n"
        ),
        &HashMap::<String, String>::new(),
    )?;
    let sidecar = App::start_with(config, backend_id.clone()).await?;
    let inbound = sidecar.addr("inbound").context("inbound listener")?;

    // The frontend calls over mTLS, expecting the backend app's id.
    let answer = call(&frontend_id, &backend_app, inbound).await?;
    demo_app.abort();

    Ok(format!(
        "dstack-mesh demo: a local mesh of two apps (development agents in {})\n\n\
         frontend app (the caller)\n{}\n\
         backend app (its sidecar listens on {inbound}, in front of the demo app on {app_addr})\n{}\n\
         frontend -> backend over mTLS: {answer}\n",
        dir.display(),
        indent(&crate::tools::describe(&frontend_id.current())),
        indent(&crate::tools::describe(&backend_id.current())),
    ))
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

/// One mTLS request with `identity`, expecting `target`.
async fn call(
    identity: &RotatingIdentity,
    target: &AppId,
    addr: std::net::SocketAddr,
) -> anyhow::Result<String> {
    let anchors = identity.current().trust_anchors()?;
    let policy = Arc::new(Policy::new(anchors).expect(target.clone()));
    let mut tls = ratls::tls::mesh_client_config(identity.resolver(), policy)?;
    // This client speaks HTTP/1.1 only; offering h2 would let the sidecar pick it.
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::try_from(format!("{target}-443s.demo.local"))?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .context("mTLS handshake with the backend's sidecar")?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::get("/hello")
        .header("host", "backend.demo.local")
        // A forgery the sidecar must drop.
        .header(
            "x-dstack-app-id",
            "0000000000000000000000000000000000000000",
        )
        .body(Empty::<Bytes>::new())?;
    let resp = send.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(format!("{status}: {}", String::from_utf8_lossy(&body)))
}

/// Resolves on SIGTERM or Ctrl-C. SIGHUP, whose default action would end the process, is
/// caught and logged until configuration reload exists.
pub async fn wait_for_shutdown() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup()).ok();
        let hangup = async {
            match hup.as_mut() {
                Some(hup) => {
                    while hup.recv().await.is_some() {
                        tracing::warn!("SIGHUP: configuration reload is not supported yet; restart to apply changes");
                    }
                }
                None => std::future::pending::<()>().await,
            }
        };
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                    _ = hangup => {}
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
