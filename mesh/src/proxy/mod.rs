//! HTTP forwarding shared by the inbound and outbound sides: hop-by-hop headers, streaming
//! bodies, upgrades, and errors that tell the caller who failed without leaking details.

mod forward;
mod headers;
mod idle;
mod upstream;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};

pub use forward::{forward, forward_with, is_websocket, Tunnel};
pub use headers::{remove_hop_by_hop, strip_forgeable, CallerHeaders, IDENTITY_HEADERS};
pub use idle::{Activity, GuardedBody, IdleIo, RequestGuard};
pub(crate) use upstream::exchange;
pub use upstream::{Upstream, UpstreamConfig, UpstreamError};

/// Any error a body can raise.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type every proxy path uses: streamed, never collected.
pub type Body = BoxBody<Bytes, BoxError>;

/// A complete body (errors, health answers).
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A short JSON error for the caller; the details belong in the log line, not here.
pub fn error_response(status: StatusCode, error: &str) -> Response<Body> {
    json_response(status, serde_json::json!({ "error": error }).to_string())
}

/// A JSON error with its detail, for callers that may know it (the local app, not a peer).
pub fn detailed_error(status: StatusCode, error: &str, detail: &str) -> Response<Body> {
    json_response(
        status,
        serde_json::json!({ "error": error, "detail": detail }).to_string(),
    )
}

/// A JSON answer.
pub fn json_response(status: StatusCode, json: String) -> Response<Body> {
    let mut resp = Response::new(full(json));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// A plain-text answer.
pub fn text_response(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut resp = Response::new(full(text));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}
