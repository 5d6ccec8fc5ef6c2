use http::HeaderValue;

use super::*;

const APP: &str = "5bb4ff9a3837357f19dc176407a5709c62eb6c56";

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(*k, HeaderValue::from_str(v).unwrap());
    }
    h
}

#[test]
fn a_full_target() {
    let t = Target::from_headers(&headers(&[
        (TARGET_APP, &APP.to_uppercase()),
        (TARGET_PORT, "8080"),
        (TARGET_INSTANCE, "1691ed1b47506cad7d08834668691d88246f5b1f"),
        (TARGET_USE_TLS, "false"),
    ]))
    .unwrap()
    .unwrap();
    assert_eq!(t.app_id.to_string(), APP);
    assert_eq!(t.port, 8080);
    assert_eq!(t.transport, Transport::GatewayTls);
    assert_eq!(
        t.gateway_id().to_string(),
        "1691ed1b47506cad7d08834668691d88246f5b1f"
    );
}

#[test]
fn defaults_and_absence() {
    let t = Target::from_headers(&headers(&[(TARGET_APP, APP)]))
        .unwrap()
        .unwrap();
    assert_eq!(
        (t.port, t.transport, t.instance.clone()),
        (443, Transport::Mesh, None)
    );
    assert_eq!(t.gateway_id().to_string(), APP);
    assert_eq!(Target::from_headers(&HeaderMap::new()).unwrap(), None);
}

#[test]
fn every_bad_value_names_its_header() {
    let cases: &[(&[(&'static str, &str)], &str)] = &[
        (&[(TARGET_APP, "not-hex")], TARGET_APP),
        (&[(TARGET_APP, "")], TARGET_APP),
        (&[(TARGET_APP, APP), (TARGET_APP, APP)], TARGET_APP),
        (&[(TARGET_APP, APP), (TARGET_PORT, "0")], TARGET_PORT),
        (&[(TARGET_APP, APP), (TARGET_PORT, "70000")], TARGET_PORT),
        // dstack ids are 20 bytes: shorter or longer hex names no app.
        (&[(TARGET_APP, "5bb4ff9a")], TARGET_APP),
        (&[(TARGET_APP, &format!("{APP}00"))], TARGET_APP),
        (
            &[(TARGET_APP, APP), (TARGET_INSTANCE, "1691ed1b")],
            TARGET_INSTANCE,
        ),
        (
            &[(TARGET_APP, APP), (TARGET_PORT, "80"), (TARGET_PORT, "81")],
            TARGET_PORT,
        ),
        (
            &[(TARGET_APP, APP), (TARGET_INSTANCE, "xyz")],
            TARGET_INSTANCE,
        ),
        (
            &[(TARGET_APP, APP), (TARGET_USE_TLS, "yes")],
            TARGET_USE_TLS,
        ),
        (&[(TARGET_PORT, "80")], TARGET_PORT),
    ];
    for (pairs, header) in cases {
        let err = Target::from_headers(&headers(pairs)).unwrap_err();
        assert_eq!(err.header(), *header, "{pairs:?}: {err}");
        assert!(err.to_string().starts_with(header), "{err}");
    }
}

#[test]
fn empty_optional_headers_read_as_absent() {
    let t = Target::from_headers(&headers(&[
        (TARGET_APP, APP),
        (TARGET_PORT, ""),
        (TARGET_INSTANCE, " "),
        (TARGET_USE_TLS, ""),
    ]))
    .unwrap()
    .unwrap();
    assert_eq!(
        (t.port, t.transport, t.instance),
        (DEFAULT_PORT, Transport::Mesh, None)
    );
    // Empty orphans are absent too: the request is for the guest agent.
    assert_eq!(
        Target::from_headers(&headers(&[(TARGET_INSTANCE, "")])).unwrap(),
        None
    );
}

#[test]
fn routing_headers_are_stripped() {
    let mut h = headers(&[(TARGET_APP, APP), (TARGET_PORT, "80"), ("x-other", "kept")]);
    strip_routing_headers(&mut h);
    assert_eq!(h.len(), 1);
}

#[test]
fn connect_authorities_name_an_app_and_port() {
    let app = "a1".repeat(20);
    let instance = "c3".repeat(20);
    let t = Target::from_connect_authority(&format!("{app}.dstack:6379")).unwrap();
    assert_eq!(
        (t.app_id.to_string(), t.port, t.instance),
        (app.clone(), 6379, None)
    );
    let t = Target::from_connect_authority(&format!("{instance}.{app}.dstack:2380")).unwrap();
    assert_eq!(t.instance.unwrap().to_string(), instance);
    for bad in [
        format!("{app}.dstack"),
        format!("{app}.dstack:0"),
        format!("{app}.example:443"),
        "abc.dstack:443".to_owned(),
        format!("x.{app}.dstack:443"),
    ] {
        assert!(Target::from_connect_authority(&bad).is_err(), "{bad}");
    }
}
