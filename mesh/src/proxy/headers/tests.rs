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
    // Trailer is end-to-end; HTTP2-Settings is hop-by-hop; TE is read from every line.
    let mut h = map(&[
        ("trailer", "x-sum"),
        ("http2-settings", "AAMAAABkAAQAAP__"),
        ("te", "gzip"),
        ("te", "trailers"),
    ]);
    remove_hop_by_hop(&mut h);
    assert_eq!(h["trailer"], "x-sum");
    assert!(h.get("http2-settings").is_none());
    assert_eq!(h["te"], "trailers");
    // Each rule alone (the pass that finds none must not miss one).
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "http2-settings",
        "proxy-authorization",
        "proxy-authenticate",
        "transfer-encoding",
        "upgrade",
        "te",
    ] {
        let mut h = map(&[("host", "a"), (name, "x"), ("accept", "*/*")]);
        remove_hop_by_hop(&mut h);
        assert!(h.get(name).is_none(), "{name} stayed");
        assert_eq!(h.len(), 2, "{name}");
    }
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
fn every_forgeable_spelling_goes() {
    let mut h = map(&[
        ("x_dstack_app_id", "victim"),
        ("x-dstack-app-id-extra", "victim"),
        ("forwarded", "for=1.2.3.4;host=evil"),
        ("x-forwarded-host", "evil.example"),
        ("x-forwarded-port", "1"),
        ("x_forwarded_for", "1.2.3.4"),
        ("x-dstack-target-app", "kept"),
        ("x_real_ip", "1.2.3.4"),
        ("x-real-ipv6", "kept"),
        ("x-dstack-app", "kept"),
    ]);
    CallerHeaders::new(Some("abcd"), None, "10.0.0.7".parse().unwrap(), "https").apply(&mut h);
    let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
    left.sort_unstable();
    assert_eq!(
        left,
        [
            "x-dstack-app",
            "x-dstack-app-id",
            "x-dstack-target-app",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-real-ip",
            "x-real-ipv6",
        ]
    );
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
