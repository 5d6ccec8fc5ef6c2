//! Requests without a target header go to the guest agent, as the original dstack-mesh did:
//! `/gateway` answers the gateway domain, and a snake_case last path segment names the
//! PascalCase method (`/get_quote` → `GetQuote`).
//!
//! Anything that can reach the outbound port could use the app's keys through it, or get quotes
//! over report data of its choosing, so only `Info` and `Version` pass by default:
//! `outbound.agent_quote_methods` lets `GetQuote`/`Attest` through, `outbound.agent_key_methods`
//! every other method.

use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use ratls::agent::{AgentClient, AgentError};

use crate::proxy::{self, Body};

/// Methods that reveal nothing secret and change nothing: metadata.
const READ_ONLY: &[&str] = &["Info", "Version"];
/// Methods that sign caller-chosen report data with the CVM's attestation.
const QUOTE_METHODS: &[&str] = &["GetQuote", "Attest"];
/// Largest request body passed to the agent (its requests are small JSON documents).
const MAX_BODY: usize = 64 << 10;

/// Which agent methods beyond [`READ_ONLY`] the passthrough lets through.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentAccess {
    /// `GetQuote` and `Attest`: quotes over report data the caller chooses.
    pub quotes: bool,
    /// Every other method (GetKey, GetTlsKey, Sign, ...): the app's keys.
    pub keys: bool,
}

impl AgentAccess {
    /// Why `method` is refused, or `None` when it may pass.
    fn refusal(self, method: &str) -> Option<String> {
        if READ_ONLY.contains(&method) {
            return None;
        }
        if QUOTE_METHODS.contains(&method) {
            return (!self.quotes).then(|| {
                format!("{method} signs report data the caller chooses; set outbound.agent_quote_methods = true to let this port ask for quotes")
            });
        }
        (!self.keys).then(|| {
            format!(
                "{method} is not one of the read-only methods ({}); set outbound.agent_key_methods = true to let this port use the app's keys",
                READ_ONLY.join(", ")
            )
        })
    }
}

/// The passthrough's settings.
#[derive(Clone, Debug)]
pub struct AgentPassthrough {
    agent: AgentClient,
    access: AgentAccess,
}

/// What a path asks of the agent.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Call {
    /// `/gateway`.
    Gateway,
    /// An agent method, by its PascalCase name.
    Method(String),
}

impl AgentPassthrough {
    /// Pass to `agent` the read-only methods and what `access` allows.
    pub fn new(agent: AgentClient, access: AgentAccess) -> Self {
        Self { agent, access }
    }

    /// Answer `req`; `/gateway` answers `gateway_domain`.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        gateway_domain: Option<&str>,
    ) -> Response<Body> {
        let call = match parse(req.uri().path()) {
            Some(call) => call,
            None => {
                return proxy::detailed_error(
                    StatusCode::NOT_FOUND,
                    "not a guest-agent method",
                    &format!(
                        "{} names no method; send x-dstack-target-app to reach another app",
                        req.uri().path()
                    ),
                )
            }
        };
        let method = match call {
            Call::Gateway => {
                let body = serde_json::json!({ "gateway_domain": gateway_domain });
                return proxy::json_response(StatusCode::OK, body.to_string());
            }
            Call::Method(method) => method,
        };
        if let Some(why) = self.access.refusal(&method) {
            tracing::warn!(%method, "guest-agent method refused on the outbound port");
            return proxy::detailed_error(
                StatusCode::FORBIDDEN,
                "guest-agent method not allowed",
                &why,
            );
        }
        let http_method = match *req.method() {
            Method::GET | Method::HEAD => Method::GET,
            Method::POST => Method::POST,
            _ => {
                return proxy::detailed_error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "guest-agent methods take GET or POST",
                    &format!("{} {}", req.method(), req.uri().path()),
                )
            }
        };
        let query = req.uri().query().map(str::to_owned);
        let content_type = req.headers().get(header::CONTENT_TYPE).cloned();
        let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(body) => body.to_bytes(),
            Err(e) => {
                return proxy::detailed_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request body unusable",
                    &format!("guest-agent requests are at most {MAX_BODY} bytes: {e}"),
                )
            }
        };
        match self
            .agent
            .passthrough(http_method, &method, query.as_deref(), content_type, body)
            .await
        {
            Ok((status, content_type, body)) => {
                tracing::debug!(%method, status = status.as_u16(), "guest-agent passthrough");
                let mut resp = Response::new(proxy::full(body));
                *resp.status_mut() = status;
                if let Some(ct) = content_type {
                    resp.headers_mut().insert(header::CONTENT_TYPE, ct);
                }
                resp
            }
            Err(e) => {
                tracing::warn!(%method, error = %e, "guest-agent passthrough failed");
                let status = match e {
                    AgentError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
                    _ => StatusCode::BAD_GATEWAY,
                };
                proxy::detailed_error(status, "guest agent unavailable", &e.to_string())
            }
        }
    }
}

/// The call a path names: its last segment, snake_case mapped to PascalCase.
pub(crate) fn parse(path: &str) -> Option<Call> {
    let last = path.trim_end_matches('/').rsplit('/').next()?;
    if last == "gateway" {
        return Some(Call::Gateway);
    }
    if last.is_empty()
        || last.len() > 64
        || !last.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return None;
    }
    let mut name = String::with_capacity(last.len());
    for word in last.split('_').filter(|w| !w.is_empty()) {
        let mut chars = word.chars();
        if let Some(first) = chars.next() {
            name.push(first.to_ascii_uppercase());
            name.extend(chars);
        }
    }
    (!name.is_empty()).then_some(Call::Method(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snake_case_maps_to_pascal_case() {
        let m = |s: &str| Some(Call::Method(s.to_owned()));
        assert_eq!(parse("/get_quote"), m("GetQuote"));
        assert_eq!(parse("/info"), m("Info"));
        assert_eq!(parse("/Info"), m("Info"));
        assert_eq!(parse("/GetTlsKey"), m("GetTlsKey"));
        assert_eq!(parse("/get_tls_key"), m("GetTlsKey"));
        assert_eq!(parse("/prpc/get_quote/"), m("GetQuote"));
        assert_eq!(parse("/gateway"), Some(Call::Gateway));
    }

    #[test]
    fn each_method_class_needs_its_own_setting() {
        let none = AgentAccess::default();
        let quotes = AgentAccess {
            quotes: true,
            keys: false,
        };
        let keys = AgentAccess {
            quotes: false,
            keys: true,
        };
        for m in ["Info", "Version"] {
            assert_eq!(none.refusal(m), None, "{m}");
        }
        for m in ["GetQuote", "Attest"] {
            assert!(none.refusal(m).unwrap().contains("agent_quote_methods"));
            assert!(keys.refusal(m).is_some(), "keys do not imply quotes: {m}");
            assert_eq!(quotes.refusal(m), None);
        }
        // A name we do not know (another spelling included) is held like a key method.
        for m in ["GetKey", "GetTlsKey", "Sign", "Getquote"] {
            assert!(none.refusal(m).unwrap().contains("agent_key_methods"));
            assert!(quotes.refusal(m).is_some(), "{m}");
            assert_eq!(keys.refusal(m), None);
        }
    }

    #[test]
    fn paths_that_name_no_method() {
        for p in ["/", "", "/a.b", "/../x-y", "/_", "/%41"] {
            assert_eq!(parse(p), None, "{p}");
        }
    }
}
