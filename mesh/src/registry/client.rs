//! This sidecar's registration: `POST /api/nodes/update` to the registry's app through our own
//! outbound proxy (so the registry is reached, and verified, exactly as the app would reach it),
//! every `interval`, for as long as the sidecar runs.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use ratls::AppId;

use super::{NodePort, Update};
use crate::config::Registration;

/// Deadline of one registration request.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait before trying again after a failure.
const MAX_RETRY: Duration = Duration::from_secs(5);

/// Register as `registration` says, with `ports`, at the registry app `server`, through the
/// outbound proxy at `outbound`; again every interval (sooner after a failure). Runs until
/// dropped.
pub async fn keep_registered(
    outbound: SocketAddr,
    server: AppId,
    registration: Registration,
    ports: Vec<NodePort>,
) {
    let update = Update {
        node_type: Some(registration.node_type.clone()),
        uuid: registration.node_name.clone(),
        hostname: registration.node_name.clone(),
        labels: registration.labels.clone(),
        ports,
    };
    let body = match serde_json::to_vec(&update) {
        Ok(body) => Bytes::from(body),
        Err(e) => return tracing::error!(error = %e, "registration not serialised"),
    };
    let mut registered = false;
    loop {
        let sent = send(outbound, &server, registration.server_port, body.clone()).await;
        let wait = match sent {
            Ok(status) => {
                if !registered {
                    tracing::info!(registry = %server, node_type = %registration.node_type, status, "registered with the registry");
                }
                registered = true;
                registration.interval
            }
            Err(e) => {
                tracing::warn!(registry = %server, node_type = %registration.node_type, error = %e, "registration failed; trying again");
                registered = false;
                registration.interval.min(MAX_RETRY)
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// One registration; the registry's `status` (`created` or `updated`).
async fn send(
    outbound: SocketAddr,
    server: &AppId,
    port: u16,
    body: Bytes,
) -> Result<String, String> {
    let req = Request::post("/api/nodes/update")
        .header(http::header::HOST, "registry")
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(gateway_client::target::TARGET_APP, server.to_string())
        .header(gateway_client::target::TARGET_PORT, port.to_string())
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let (status, body) =
        crate::status::exchange_local(&outbound.to_string(), "the outbound proxy", req, TIMEOUT)
            .await?;
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    match status {
        StatusCode::OK => Ok(answer["status"].as_str().unwrap_or("ok").to_owned()),
        _ => Err(format!(
            "{status}: {}",
            String::from_utf8_lossy(&body)
                .chars()
                .take(300)
                .collect::<String>()
        )),
    }
}
