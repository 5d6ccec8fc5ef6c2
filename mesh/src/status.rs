//! `dstack-mesh status` and `certs`: the admin endpoints, read from the terminal.

use std::{process::ExitCode, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use crate::{
    acme::CertStatus,
    cli::{CertsAction, EXIT_UNAVAILABLE},
};

const TIMEOUT: Duration = Duration::from_secs(10);
/// `health` answers well within Docker's default HEALTHCHECK timeout (30 s).
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// One request to the admin listener at `addr`: the status and body.
pub async fn request(
    addr: &str,
    method: http::Method,
    path: &str,
) -> Result<(http::StatusCode, Bytes), String> {
    request_within(addr, method, path, TIMEOUT).await
}

async fn request_within(
    addr: &str,
    method: http::Method,
    path: &str,
    timeout: Duration,
) -> Result<(http::StatusCode, Bytes), String> {
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, addr)
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    exchange_local(addr, "the admin listener", req, timeout)
        .await
        .map_err(|e| match e.strip_prefix("cannot reach") {
            Some(_) => format!("{e} (is the sidecar running? --admin sets the address)"),
            None => e,
        })
}

/// One HTTP/1.1 request to `what`, a local listener at `addr`, on a fresh connection, within
/// `timeout`: the status and the whole body.
pub async fn exchange_local(
    addr: &str,
    what: &str,
    req: http::Request<Full<Bytes>>,
    timeout: Duration,
) -> Result<(http::StatusCode, Bytes), String> {
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot reach {what} at {addr}: {e}"))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "{what} at {addr} did not answer within {timeout:?}"
            ))
        })
}

/// `dstack-mesh health`: exit 0 when the admin listener answers `/health` (or `/ready`) with
/// 200; otherwise say why on stderr and exit 1, which Docker counts as unhealthy.
pub async fn health(addr: &str, ready: bool) -> ExitCode {
    let path = if ready { "/ready" } else { "/health" };
    match request_within(addr, http::Method::GET, path, HEALTH_TIMEOUT).await {
        Ok((status, _)) if status == http::StatusCode::OK => {
            println!("{addr}{path}: ok");
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            let body = String::from_utf8_lossy(&body);
            eprintln!("unhealthy: {addr}{path} answered {status}: {}", body.trim());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("unhealthy: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `dstack-mesh status`: the page's content as text.
pub async fn status(addr: &str, json: bool) -> ExitCode {
    let body = match request(addr, http::Method::GET, "/routes").await {
        Ok((s, body)) if s.is_success() => body,
        Ok((s, body)) => {
            eprintln!(
                "error: {addr} answered {s}: {}",
                String::from_utf8_lossy(&body)
            );
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
    };
    if json {
        println!("{}", String::from_utf8_lossy(&body));
        return ExitCode::SUCCESS;
    }
    match serde_json::from_slice::<crate::admin::Routes>(&body) {
        Ok(routes) => {
            print!("{}", status_text(&routes, std::time::SystemTime::now()));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: unexpected answer from {addr}: {e}");
            ExitCode::from(EXIT_UNAVAILABLE)
        }
    }
}

/// The status page's content for a terminal.
pub fn status_text(routes: &crate::admin::Routes, now: std::time::SystemTime) -> String {
    let id = &routes.identity;
    let mut out = format!(
        "app       {}{}\n",
        id.app_id,
        match id.app_name.is_empty() {
            true => String::new(),
            false => format!(" ({})", id.app_name),
        }
    );
    if let Some(instance) = &id.instance_id {
        out.push_str(&format!("instance  {instance}\n"));
    }
    out.push_str(&format!(
        "identity  expires {}{}\n",
        crate::clock::rfc3339(id.not_after),
        match id.attestation {
            ratls::AttestationStatus::KeyBound =>
                "; attestation: report data binds the key, quote not verified",
            ratls::AttestationStatus::QuoteVerified => "; attestation: quote verified",
            ratls::AttestationStatus::Absent => "",
        }
    ));
    out.push_str(&format!(
        "peers     {} inbound, {} outbound seen\n",
        routes.peers.inbound, routes.peers.outbound
    ));
    match &routes.mesh {
        Some(m) => out.push_str(&format!(
            "mesh      {} -> {} allowing {}{}\n",
            m.listen,
            m.backend,
            m.allowed(),
            if m.require_attestation {
                " (attestation required)"
            } else {
                ""
            }
        )),
        None => out.push_str("mesh      inbound listener off\n"),
    }
    if routes.domains.is_empty() {
        out.push_str("\nno public domains\n");
    } else {
        out.push('\n');
        out.push_str(&table(&routes.domains, now));
    }
    out
}

/// Run a `certs` action.
pub async fn certs(addr: &str, action: CertsAction) -> ExitCode {
    let (method, path) = match &action {
        CertsAction::List { .. } => (http::Method::GET, "/certs".to_owned()),
        CertsAction::Renew { domain } => (http::Method::POST, format!("/certs/{domain}/renew")),
        CertsAction::Revoke { domain, reason } => (
            http::Method::POST,
            format!("/certs/{domain}/revoke?reason={reason}"),
        ),
    };
    let (status, body) = match request(addr, method, &path).await {
        Ok(answer) => answer,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
    };
    match action {
        CertsAction::List { json: true } if status.is_success() => {
            println!("{}", String::from_utf8_lossy(&body));
            ExitCode::SUCCESS
        }
        CertsAction::List { json: false } if status.is_success() => {
            match serde_json::from_slice::<Vec<CertStatus>>(&body) {
                Ok(list) => {
                    print!("{}", table(&list, std::time::SystemTime::now()));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: unexpected answer from {addr}: {e}");
                    ExitCode::from(EXIT_UNAVAILABLE)
                }
            }
        }
        CertsAction::Renew { domain } if status == http::StatusCode::ACCEPTED => {
            println!("{domain}: renewal started (see `dstack-mesh certs list`)");
            ExitCode::SUCCESS
        }
        CertsAction::Renew { domain } if status == http::StatusCode::NOT_FOUND => {
            eprintln!("error: {domain} is not a configured domain");
            ExitCode::from(crate::cli::EXIT_BAD_INPUT)
        }
        CertsAction::Revoke { .. } if status.is_success() => {
            match serde_json::from_slice::<crate::acme::revoke::Revoked>(&body) {
                Ok(r) => {
                    println!(
                        "{}: certificate {} {} ({}); no longer served{}",
                        r.domain,
                        r.serial,
                        if r.already {
                            "was already revoked"
                        } else {
                            "revoked"
                        },
                        r.reason,
                        if r.reordering {
                            "; a new one is being ordered (see `dstack-mesh certs list`)"
                        } else {
                            "; the domain is not configured, so none is ordered"
                        }
                    );
                    for moved in r.set_aside {
                        println!("  moved aside: {moved}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: unexpected answer from {addr}: {e}");
                    ExitCode::from(EXIT_UNAVAILABLE)
                }
            }
        }
        // The sidecar's words: no such domain, the internal CA's, the CA's refusal.
        CertsAction::Revoke { .. } => {
            let said: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            eprintln!(
                "error: {}",
                said["error"].as_str().map_or_else(
                    || String::from_utf8_lossy(&body).into_owned(),
                    str::to_owned
                )
            );
            ExitCode::from(match status.is_client_error() {
                true => crate::cli::EXIT_BAD_INPUT,
                false => EXIT_UNAVAILABLE,
            })
        }
        _ => {
            eprintln!(
                "error: {addr} answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
            ExitCode::from(EXIT_UNAVAILABLE)
        }
    }
}

/// The `certs list` table.
pub fn table(list: &[CertStatus], now: std::time::SystemTime) -> String {
    let now = crate::clock::unix_u64(now);
    let mut rows = vec![[
        "DOMAIN".to_owned(),
        "STATUS".to_owned(),
        "ISSUER".to_owned(),
        "NOT AFTER".to_owned(),
        "DAYS LEFT".to_owned(),
        "LAST ERROR".to_owned(),
    ]];
    for s in list {
        let not_after = s.not_after.map_or("-".to_owned(), |t| {
            crate::clock::rfc3339(i64::try_from(t).unwrap_or(i64::MAX))
        });
        let days = s.not_after.map_or("-".to_owned(), |t| {
            let left = (t as f64 - now as f64) / 86400.0;
            match s.expired {
                true => format!("{left:.1} EXPIRED"),
                false => format!("{left:.1}"),
            }
        });
        let mut error = s.last_error.clone().unwrap_or_else(|| "-".into());
        if let Some(next) = s.next_attempt {
            error.push_str(&format!(" (next attempt in {}s)", next.saturating_sub(now)));
        }
        // The dstack records fail apart from the certificate: show them in the same column.
        if let Some(dns) = s
            .dns_records
            .as_deref()
            .and_then(|r| r.strip_prefix("error: "))
        {
            error = match error.as_str() {
                "-" => format!("DNS records: {dns}"),
                _ => format!("{error}; DNS records: {dns}"),
            };
        }
        if let Some(fleet) = s.fleet.as_deref().filter(|f| *f != "shared") {
            error = match error.as_str() {
                "-" => format!("fleet store: {fleet}"),
                _ => format!("{error}; fleet store: {fleet}"),
            };
        }
        rows.push([
            s.domain.clone(),
            crate::admin::page::status_word(s.status).to_owned(),
            s.issuer.clone(),
            not_after,
            days,
            error,
        ]);
    }
    let widths: Vec<usize> = (0..5)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < 5 {
                out.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            } else {
                out.push_str(cell);
            }
        }
        out.push('\n');
    }
    out
}
