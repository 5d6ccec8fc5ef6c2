//! Header rules: what a proxy must drop (RFC 9110 §7.6.1) and what a caller may never set.

use std::net::IpAddr;

use http::{header, HeaderMap, HeaderName, HeaderValue};

/// Headers that name the caller. Only the proxy sets them, after authentication.
pub const IDENTITY_HEADERS: [HeaderName; 2] = [
    HeaderName::from_static("x-dstack-app-id"),
    HeaderName::from_static("x-dstack-instance-id"),
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// Remove hop-by-hop headers: the fixed set and every header `Connection` names. `Upgrade` and
/// `Connection: upgrade` are the caller's to restore when it forwards an upgrade. `Trailer` is
/// end-to-end (RFC 9110 §6.6.2) and stays.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most requests carry none: one pass over their few names instead of a lookup per rule.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter_map(|t| HeaderName::from_bytes(t.trim_ascii()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    // TE is hop-by-hop; only "trailers" may be passed on (RFC 9110 §10.1.4).
    let keeps_trailers = headers
        .get_all(header::TE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"));
    headers.remove(header::TE);
    if keeps_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Always hop-by-hop (RFC 9110 §7.6.1, and the obsolete ones proxies still meet); `TE` is too,
/// but may keep `trailers`.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    HTTP2_SETTINGS,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name) || name == header::TE
}

/// Whether a caller-sent header could pass for one this proxy vouches for. Names are compared
/// the way CGI/WSGI servers fold them (`_` reads as `-`), so `x_dstack_app_id` counts too.
fn is_forgeable(name: &HeaderName) -> bool {
    let name = name.as_str().as_bytes();
    // `name` with `_` read as `-` starts with `prefix` (every prefix here has a `-` or none).
    let folded_starts = |prefix: &[u8]| {
        name.len() >= prefix.len()
            && name
                .iter()
                .zip(prefix)
                .all(|(c, p)| c == p || (*c == b'_' && *p == b'-'))
    };
    folded_starts(b"x-dstack-app-id")
        || folded_starts(b"x-dstack-instance-id")
        || folded_starts(b"x-forwarded-")
        || name == b"forwarded"
        || (name.len() == b"x-real-ip".len() && folded_starts(b"x-real-ip"))
}

/// Remove every header a caller could use to pass for someone else or somewhere else.
pub fn strip_forgeable(headers: &mut HeaderMap) {
    if !headers.keys().any(is_forgeable) {
        return;
    }
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_forgeable(n))
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
}

/// The headers a connection's requests get, computed once per connection: who the caller is
/// and where it came from.
#[derive(Clone, Debug)]
pub struct CallerHeaders {
    app_id: Option<HeaderValue>,
    instance_id: Option<HeaderValue>,
    peer_ip: HeaderValue,
    proto: HeaderValue,
}

impl CallerHeaders {
    /// For a caller with this identity (if authenticated) at `peer`, over `proto`.
    pub fn new(
        app_id: Option<&str>,
        instance_id: Option<&str>,
        peer: IpAddr,
        proto: &'static str,
    ) -> Self {
        Self {
            app_id: app_id.and_then(|v| HeaderValue::from_str(v).ok()),
            instance_id: instance_id.and_then(|v| HeaderValue::from_str(v).ok()),
            peer_ip: HeaderValue::from_str(&peer.to_string())
                .unwrap_or(HeaderValue::from_static("unknown")),
            proto: HeaderValue::from_static(proto),
        }
    }

    /// Remove what the caller claimed and set what this hop knows.
    pub fn apply(&self, headers: &mut HeaderMap) {
        strip_forgeable(headers);
        if let Some(v) = &self.app_id {
            headers.insert(IDENTITY_HEADERS[0].clone(), v.clone());
        }
        if let Some(v) = &self.instance_id {
            headers.insert(IDENTITY_HEADERS[1].clone(), v.clone());
        }
        // The caller's own forwarding headers are gone: these are what this hop saw.
        headers.insert(X_FORWARDED_FOR, self.peer_ip.clone());
        headers.insert(X_REAL_IP, self.peer_ip.clone());
        headers.insert(X_FORWARDED_PROTO, self.proto.clone());
    }
}

#[cfg(test)]
mod tests;
