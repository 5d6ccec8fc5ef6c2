//! `DNS_SETUP_MODE=webhook`: the records the operator's service must create, posted in
//! dstack-ingress's envelope so its receivers work unchanged. The payload is signed with
//! HMAC-SHA256 under `DNS_WEBHOOK_TOKEN`, and carries a TDX quote whose report data is the
//! payload's SHA-256, so the receiver can tell the request came from this CVM.

use std::time::Duration;

use aws_lc_rs::{digest, hmac};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use ratls::agent::AgentClient;

use crate::config::dns::setup::Webhook;

/// Attempts, and the pause before each retry (dstack-ingress's).
const RETRIES: [Duration; 2] = [Duration::from_secs(2), Duration::from_secs(4)];

/// One record the operator must create.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Required {
    /// `CNAME`, `TXT`, `CAA`.
    #[serde(rename = "type")]
    pub rtype: String,
    /// Its owner name.
    pub name: String,
    /// Its value, in presentation form (`0 issue "…"` for CAA).
    pub value: String,
    /// What it is for.
    pub note: String,
    /// Whether the value must be exactly this (a gateway alias may be a flattened A instead).
    pub exact: bool,
}

/// What the receiver is told about the app and the order.
#[derive(Clone, Debug)]
pub struct Context<'a> {
    /// The primary name.
    pub domain: &'a str,
    /// `tls-alpn-01`, `http-01`, `dns-01`.
    pub challenge: &'a str,
    /// This app.
    pub app_id: &'a str,
    /// This instance.
    pub instance_id: &'a str,
    /// Unix seconds.
    pub timestamp: i64,
}

/// The body dstack-ingress's receivers read: `{payload, hmac_sha256, attestation}`, where
/// `payload` is the compact JSON (keys sorted) of the request.
pub async fn envelope(
    ctx: &Context<'_>,
    records: &[Required],
    token: Option<&str>,
    agent: &AgentClient,
) -> serde_json::Value {
    // serde_json's objects keep keys sorted: the same bytes as Python's sort_keys=True.
    let payload = serde_json::json!({
        "version": 1,
        "domain": ctx.domain,
        "challenge": ctx.challenge,
        "app_id": ctx.app_id,
        "instance_id": ctx.instance_id,
        "timestamp": ctx.timestamp,
        "records": records,
    })
    .to_string();
    let mut body = serde_json::json!({ "payload": payload });
    match token {
        Some(token) => {
            let key = hmac::Key::new(hmac::HMAC_SHA256, token.as_bytes());
            body["hmac_sha256"] = hex::encode(hmac::sign(&key, payload.as_bytes())).into();
        }
        None => {
            tracing::warn!(domain = ctx.domain, "DNS webhook: no DNS_WEBHOOK_TOKEN, so the payload is not signed (the quote still binds it)")
        }
    }
    let digest = digest::digest(&digest::SHA256, payload.as_bytes());
    match agent.get_quote(digest.as_ref()).await {
        Ok(quote) => {
            let mut quote = serde_json::to_value(quote).unwrap_or_default();
            quote["report_data"] = hex::encode(digest.as_ref()).into();
            body["attestation"] = quote;
        }
        Err(e) => {
            tracing::warn!(domain = ctx.domain, error = %e, "DNS webhook: no quote from the guest agent; posting without attestation")
        }
    }
    body
}

/// Post `body` to the webhook: any 2xx is done; three attempts, 2 s and 4 s apart.
pub async fn post(webhook: &Webhook, body: &serde_json::Value) -> Result<(), String> {
    let tls = crate::https::client_config(&[]).map_err(|e| e.to_string())?;
    let connector = crate::https::connector(tls, crate::https::dialer(webhook.timeout));
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let bytes = Bytes::from(body.to_string());
    let mut last = String::new();
    for attempt in 0..=RETRIES.len() {
        if attempt > 0 {
            tokio::time::sleep(RETRIES[attempt - 1]).await;
        }
        let req = http::Request::post(&webhook.url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::USER_AGENT, "dstack-mesh/dns-webhook")
            .body(Full::new(bytes.clone()))
            .map_err(|e| format!("{}: {e}", webhook.url))?;
        let exchange = async {
            let resp = client
                .request(req)
                .await
                .map_err(|e| ratls::error_chain(&e))?;
            let status = resp.status();
            let text = Limited::new(resp.into_body(), 4096)
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                .unwrap_or_default();
            match status.is_success() {
                true => Ok(()),
                false => Err(format!(
                    "HTTP {status}: {}",
                    text.chars().take(200).collect::<String>()
                )),
            }
        };
        match tokio::time::timeout(webhook.timeout, exchange).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => last = e,
            Err(_) => last = format!("no answer within {:?}", webhook.timeout),
        }
        tracing::warn!(url = %webhook.url, attempt = attempt + 1, error = %last, "DNS webhook failed");
    }
    Err(format!("{}: {last}", webhook.url))
}
