//! `run`, `check-config` and `nginx-config`: the commands that read the configuration.

use std::{path::PathBuf, process::ExitCode};

use nginx_compat::render::{ClientProxy, ServerProxy};

use crate::{
    app::{App, ReloadError},
    cli::{NginxKind, EXIT_BAD_INPUT, EXIT_CONFIG, EXIT_UNAVAILABLE},
    config::{self, Config, Defaults, Env, Source},
};

/// The configuration file: the flag, else `DSTACK_MESH_CONFIG`.
fn config_path(flag: Option<PathBuf>) -> Option<PathBuf> {
    flag.or_else(|| Env.get(config::env::CONFIG).map(PathBuf::from))
}

pub(crate) fn load(flag: Option<PathBuf>) -> Result<Config, ExitCode> {
    Config::load(config_path(flag).as_deref(), &Env).map_err(|e| {
        eprint!("error: {e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

/// Each SIGHUP reads the configuration again (same file, same environment) and hands the
/// result to the running sidecar.
fn reloads(
    path: Option<PathBuf>,
    defaults: Defaults,
) -> tokio::sync::mpsc::Receiver<Result<Config, ReloadError>> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    #[cfg(unix)]
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut hup) => {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    tracing::info!("SIGHUP: reading the configuration again");
                    let loaded = Config::load_as(path.as_deref(), &Env, defaults)
                        .map(|(config, _)| config)
                        .map_err(ReloadError::Config);
                    if tx.send(loaded).await.is_err() {
                        return;
                    }
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "SIGHUP not handled: reload needs a restart"),
    }
    #[cfg(not(unix))]
    drop((tx, path, defaults));
    rx
}

/// `run`: start the sidecar and serve until SIGTERM or Ctrl-C; SIGHUP reloads.
pub async fn run(flag: Option<PathBuf>) -> ExitCode {
    serve(flag, Defaults::Ours).await
}

/// `dstack-mesh --config FILE`, the command line dstack-vpc's supervisord and scripts use:
/// `run` with dstack-vpc's defaults, each logged once as a migration note.
pub async fn run_as_dstack_vpc(flag: Option<PathBuf>) -> ExitCode {
    serve(flag, Defaults::DstackVpc).await
}

async fn serve(flag: Option<PathBuf>, defaults: Defaults) -> ExitCode {
    let path = config_path(flag);
    let config = match Config::load_as(path.as_deref(), &Env, defaults) {
        Ok((config, notes)) => {
            for note in notes {
                tracing::info!(target: "dstack_mesh::migration", "{note}");
            }
            config
        }
        Err(e) => {
            eprint!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // Registered before anything slow, so an early SIGHUP does not end the process.
    let reloads = reloads(path, defaults);
    let app = match App::start(config).await {
        Ok(app) => app,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
    };
    let id = app.identity.current();
    tracing::info!(app_id = %id.app_id, fingerprint = %id.fingerprint, "dstack-mesh running");
    app.run_until(crate::demo::wait_for_shutdown(), reloads)
        .await;
    ExitCode::SUCCESS
}

/// `check-config`: validate and print the effective settings as JSON.
pub fn check_config(flag: Option<PathBuf>) -> ExitCode {
    let config = match load(flag) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match serde_json::to_string_pretty(&config) {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// `nginx-config server|client`: print the nginx configuration.
pub fn nginx_config(
    kind: NginxKind,
    backend: Option<String>,
    server_name: Option<String>,
    port: Option<u16>,
    flag: Option<PathBuf>,
) -> ExitCode {
    let config = match load(flag) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let rendered = match kind {
        NginxKind::Server => {
            let mut proxy = ServerProxy::new(
                backend.unwrap_or_else(|| config.inbound.backend.to_string()),
                config.auth.listener.listen,
            );
            if proxy.auth.ip().is_unspecified() {
                // The auth service listens everywhere; nginx reaches it on loopback.
                proxy.auth.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            proxy.server_name = server_name
                .or_else(|| config::source::first(&Env, config::env::SERVER_NAME).map(|(_, v)| v))
                .unwrap_or_else(|| "_".into());
            proxy.auth_secret = config.auth.nginx_secret.map(|s| s.0);
            if proxy.auth_secret.is_none()
                && config.auth.trust_nginx_chain
                && !config.auth.trust_loopback
            {
                eprintln!("note: no auth.nginx_secret (DSTACK_MESH_NGINX_SECRET): the auth service verifies every chain itself, so a KMS leaf that nginx passes alone is refused; set the same secret for the sidecar and here");
            }
            proxy.cert_file = config.tls.cert_file;
            proxy.key_file = config.tls.key_file;
            proxy.ca_file = config.tls.ca_file;
            if let Some(port) = port {
                proxy.port = port;
            }
            proxy.render()
        }
        NginxKind::Client => {
            let mut outbound = config.client.listen;
            if outbound.ip().is_unspecified() {
                outbound.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            let mut proxy = ClientProxy::new(outbound);
            if let Some(port) = port {
                proxy.port = port;
            }
            proxy.render()
        }
    };
    match rendered {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_BAD_INPUT)
        }
    }
}
