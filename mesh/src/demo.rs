//! The embedded default: a local demo on one machine, with no TEE and no configuration.
//!
//! For now it starts a development agent and takes a sidecar identity from it; the mesh
//! listeners join it as they land.

use std::{path::PathBuf, process::ExitCode, sync::Arc};

use ratls::{
    agent::{AgentAddress, AgentClient, DEFAULT_TIMEOUT},
    dev_agent::{self, DevAgent, DevAgentConfig},
    identity::{IdentityConfig, RotatingIdentity},
};

use crate::cli::EXIT_UNAVAILABLE;

/// Run the demo and print who the sidecar is.
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
    match start(dir).await {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_UNAVAILABLE)
        }
    }
}

async fn start(dir: PathBuf) -> anyhow::Result<String> {
    let agent = Arc::new(DevAgent::new(DevAgentConfig {
        app_id: dev_agent::default_app_id(),
        instance_id: None,
        app_name: "demo-app".into(),
        state_dir: dir.clone(),
    })?);
    let socket = dir.join("dstack.sock");
    let task = agent.spawn(&socket)?;
    eprintln!("WARNING: {}", dev_agent::NOT_ATTESTED);
    let (client, info) =
        AgentClient::discover(vec![AgentAddress::Unix(socket.clone())], DEFAULT_TIMEOUT).await?;
    let identity = RotatingIdentity::start(client, info, IdentityConfig::default()).await?;
    let text = format!(
        "dstack-mesh demo: development agent on {}\n\n{}",
        socket.display(),
        crate::tools::describe(&identity.current())
    );
    task.abort();
    Ok(text)
}

/// Resolves on SIGTERM or Ctrl-C.
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
