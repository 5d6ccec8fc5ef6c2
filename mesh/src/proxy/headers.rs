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

/// Remove hop-by-hop headers: the fixed set and every header `Connection` names. `Upgrade` and
/// `Connection: upgrade` are the caller's to restore when it forwards an upgrade.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        KEEP_ALIVE,
        PROXY_CONNECTION,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::TRAILER,
    ] {
        headers.remove(name);
    }
    // TE is hop-by-hop; only "trailers" may be passed on (RFC 9110 §10.1.4).
    let keeps_trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    headers.remove(header::TE);
    if keeps_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Remove every identity header the caller sent.
pub fn strip_identity(headers: &mut HeaderMap) {
    for name in &IDENTITY_HEADERS {
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
        strip_identity(headers);
        if let Some(v) = &self.app_id {
            headers.insert(IDENTITY_HEADERS[0].clone(), v.clone());
        }
        if let Some(v) = &self.instance_id {
            headers.insert(IDENTITY_HEADERS[1].clone(), v.clone());
        }
        // A caller's own x-forwarded-* are not trusted: replaced by what this hop saw.
        headers.insert(X_FORWARDED_FOR, self.peer_ip.clone());
        headers.insert(X_REAL_IP, self.peer_ip.clone());
        headers.insert(X_FORWARDED_PROTO, self.proto.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_and_connection_listed_headers_go() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("connection", "close"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic x"),
            ("te", "gzip, trailers"),
            ("upgrade", "websocket"),
            ("x-app", "kept"),
        ]);
        remove_hop_by_hop(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert_eq!(h["x-app"], "kept");
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn identity_is_always_ours() {
        let mut h = map(&[
            ("x-dstack-app-id", "forged"),
            ("X-Dstack-App-Id", "forged-again"),
            ("x-dstack-instance-id", "forged"),
        ]);
        let ip = "10.0.0.7".parse().unwrap();
        CallerHeaders::new(Some("abcd"), None, ip, "https").apply(&mut h);
        assert_eq!(h.get_all("x-dstack-app-id").iter().count(), 1);
        assert_eq!(h["x-dstack-app-id"], "abcd");
        assert!(h.get("x-dstack-instance-id").is_none());
        CallerHeaders::new(Some("abcd"), Some("ef01"), ip, "https").apply(&mut h);
        assert_eq!(h["x-dstack-instance-id"], "ef01");
        // Unauthenticated callers (public domains) get no identity at all.
        CallerHeaders::new(None, None, ip, "https").apply(&mut h);
        assert!(h.get("x-dstack-app-id").is_none());
    }

    #[test]
    fn forwarded_headers_are_replaced() {
        let mut h = map(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "http"),
        ]);
        CallerHeaders::new(None, None, "10.0.0.7".parse().unwrap(), "https").apply(&mut h);
        assert_eq!(h["x-forwarded-for"], "10.0.0.7");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-real-ip"], "10.0.0.7");
    }
}
