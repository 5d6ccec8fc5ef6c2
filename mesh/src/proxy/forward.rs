//! Forward one request to an upstream, streaming both bodies and splicing upgrades.

use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::{remove_hop_by_hop, upstream::splice_upgrades, Body, Upstream, UpstreamError};

/// The protocol an HTTP/1.1 request asks to upgrade to (`Connection: upgrade` + `Upgrade`).
fn requested_upgrade(req: &Request<Incoming>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let wants = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    wants
        .then(|| req.headers().get(header::UPGRADE).cloned())
        .flatten()
}

/// Forward `req` to `upstream`. `set_headers` runs after hop-by-hop headers are gone and
/// before the request leaves: it is where identity and forwarding headers are set.
pub async fn forward(
    upstream: &Upstream,
    mut req: Request<Incoming>,
    set_headers: impl FnOnce(&mut HeaderMap),
) -> Result<Response<Body>, UpstreamError> {
    let upgrade = requested_upgrade(&req);
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    remove_hop_by_hop(&mut parts.headers);
    if let Some(protocol) = upgrade {
        parts.headers.insert(header::UPGRADE, protocol);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    set_headers(&mut parts.headers);
    let req = Request::from_parts(parts, body.map_err(Into::into).boxed());

    let mut resp = upstream.send(req).await?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client) = client_upgrade {
            let upstream_side = hyper::upgrade::on(&mut resp);
            tokio::spawn(splice_upgrades(client, upstream_side));
        }
        // The 101 keeps its Upgrade and Connection headers: they are the answer.
    } else {
        remove_hop_by_hop(resp.headers_mut());
    }
    Ok(resp.map(|b| b.map_err(Into::into).boxed()))
}
