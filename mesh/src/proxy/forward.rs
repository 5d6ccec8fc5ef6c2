//! Forward one request to an upstream, streaming both bodies and splicing WebSocket upgrades.

use std::{any::Any, sync::Arc, time::Duration};

use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::{
    remove_hop_by_hop, upstream::splice_upgrades, Activity, Body, Upstream, UpstreamError,
};

/// The one upgrade a mesh proxies. Others (h2c above all, which would let a caller speak raw
/// HTTP/2 to the app and name itself) are forwarded as plain requests without the upgrade.
const WEBSOCKET: &str = "websocket";

/// What a spliced upgrade keeps from its connection: the idle timer and whatever must live
/// while it does (the connection's slot under the connection limit).
#[derive(Clone)]
pub struct Tunnel {
    /// The connection's activity; tunnel bytes count.
    pub activity: Arc<Activity>,
    /// Idle limit.
    pub idle: Duration,
    /// Dropped when the connection and all its tunnels have ended.
    pub hold: Arc<dyn Any + Send + Sync>,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("idle", &self.idle)
            .finish_non_exhaustive()
    }
}

/// Whether an HTTP/1.1 request asks for a WebSocket upgrade.
fn wants_websocket(req: &Request<Incoming>) -> bool {
    if req.version() != Version::HTTP_11 {
        return false;
    }
    let connection_upgrade = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"));
    connection_upgrade
        && req
            .headers()
            .get(header::UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(WEBSOCKET.as_bytes()))
}

/// Forward `req` to `upstream`. `set_headers` runs after hop-by-hop headers are gone and
/// before the request leaves: it is where identity and forwarding headers are set. A
/// WebSocket upgrade is spliced under `tunnel`; without one, upgrades are not forwarded.
pub async fn forward(
    upstream: &Upstream,
    req: Request<Incoming>,
    tunnel: Option<Tunnel>,
    set_headers: impl FnOnce(&mut HeaderMap),
) -> Result<Response<Body>, UpstreamError> {
    forward_with(req, tunnel, set_headers, upstream.authority(), |req| {
        upstream.send(req)
    })
    .await
}

/// Whether `req` is a WebSocket upgrade this proxy would splice (given a tunnel).
pub fn is_websocket(req: &Request<Incoming>) -> bool {
    wants_websocket(req)
}

/// [`forward`] through any sender: `send` takes the prepared request and returns the
/// upstream's response head; `upstream` names it in errors.
pub async fn forward_with<F, B>(
    mut req: Request<Incoming>,
    tunnel: Option<Tunnel>,
    set_headers: impl FnOnce(&mut HeaderMap),
    upstream: &str,
    send: impl FnOnce(Request<Body>) -> F,
) -> Result<Response<Body>, UpstreamError>
where
    F: std::future::Future<Output = Result<Response<B>, UpstreamError>>,
    B: http_body::Body<Data = bytes::Bytes> + Send + Sync + 'static,
    B::Error: Into<super::BoxError>,
{
    // Request body frames show the request is moving (a long upload is not a stall).
    let activity = tunnel.as_ref().map(|t| t.activity.clone());
    let upgrade = tunnel.filter(|_| wants_websocket(&req));
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let from_h2 = req.version() == Version::HTTP_2;
    let (mut parts, body) = req.into_parts();
    remove_hop_by_hop(&mut parts.headers);
    if upgrade.is_some() {
        parts
            .headers
            .insert(header::UPGRADE, HeaderValue::from_static(WEBSOCKET));
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if from_h2 {
        join_cookies(&mut parts.headers);
    }
    set_headers(&mut parts.headers);
    let body = body.map_frame(move |frame| {
        if let Some(activity) = &activity {
            activity.frame();
        }
        frame
    });
    let req = Request::from_parts(parts, body.map_err(Into::into).boxed());

    let mut resp = send(req).await?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let answered_websocket = resp
            .headers()
            .get(header::UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(WEBSOCKET.as_bytes()));
        match (client_upgrade, upgrade) {
            (Some(client), Some(tunnel)) if answered_websocket => {
                let upstream_side = hyper::upgrade::on(&mut resp);
                tokio::spawn(splice_upgrades(client, upstream_side, tunnel));
                // The 101 keeps its Upgrade and Connection headers: they are the answer.
            }
            _ => {
                return Err(UpstreamError::Failed {
                    upstream: upstream.to_owned(),
                    reason: "switched protocols without being asked for a WebSocket".into(),
                })
            }
        }
    } else {
        remove_hop_by_hop(resp.headers_mut());
    }
    Ok(resp.map(|b| b.map_err(Into::into).boxed()))
}

/// h2 may split `cookie` into several fields; HTTP/1.1 wants one (RFC 9113 §8.2.3).
fn join_cookies(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::COOKIE).iter();
    let (Some(first), Some(_)) = (values.next(), values.next()) else {
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    for v in headers.get_all(header::COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_from_h2_are_joined() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        join_cookies(&mut h);
        assert_eq!(h.get_all(header::COOKIE).iter().count(), 1);
        assert_eq!(h[header::COOKIE], "a=1; b=2");
    }
}
