use super::*;

const APP: &str = "5bb4ff9a3837357f19dc176407a5709c62eb6c56";
const INSTANCE: &str = "1691ed1b47506cad7d08834668691d88246f5b1f";

fn target(transport: Transport, instance: bool) -> Target {
    Target {
        app_id: APP.parse().unwrap(),
        port: 8080,
        instance: instance.then(|| INSTANCE.parse().unwrap()),
        transport,
    }
}

#[test]
fn gateway_names() {
    let a = Addressing::from_setting(&"gw.example.com".parse().unwrap(), Some(9443));
    let r = a.route(&target(Transport::Mesh, false)).unwrap();
    assert_eq!(r.server_name, format!("{APP}-8080s.gw.example.com"));
    assert_eq!(
        r.connect.to_string(),
        format!("{APP}-8080s.gw.example.com:9443")
    );
    let r = a.route(&target(Transport::Mesh, true)).unwrap();
    assert_eq!(r.server_name, format!("{INSTANCE}-8080s.gw.example.com"));
    let r = a.route(&target(Transport::GatewayTls, false)).unwrap();
    assert_eq!(r.server_name, format!("{APP}-8080.gw.example.com"));
    // A configured dial address keeps the gateway's name as SNI.
    let a = Addressing::Gateway {
        base_domain: "gw.example.com".into(),
        port: 443,
        dial: Some("127.0.0.1:8443".parse().unwrap()),
    };
    let r = a.route(&target(Transport::Mesh, false)).unwrap();
    assert_eq!(r.connect.to_string(), "127.0.0.1:8443");
    assert_eq!(r.server_name, format!("{APP}-8080s.gw.example.com"));
}

#[test]
fn fixed_and_static() {
    let fixed: GatewaySetting = "fixed/127.0.0.1:443".parse().unwrap();
    let a = Addressing::from_setting(&fixed, None);
    let r = a.route(&target(Transport::Mesh, false)).unwrap();
    assert_eq!(
        (r.connect.to_string(), r.server_name),
        ("127.0.0.1:443".into(), "127.0.0.1".into())
    );
    assert!(a.route(&target(Transport::GatewayTls, false)).is_err());
    let routes = StaticRoutes::from_iter([(
        RouteKey::App(APP.parse().unwrap()),
        "10.0.0.5:443".parse().unwrap(),
    )]);
    let a = Addressing::Static {
        routes,
        otherwise: None,
    };
    assert_eq!(
        a.route(&target(Transport::Mesh, false))
            .unwrap()
            .connect
            .to_string(),
        "10.0.0.5:443"
    );
    let mut other = target(Transport::Mesh, false);
    other.app_id = "aa".repeat(20).parse().unwrap();
    assert!(matches!(a.route(&other), Err(AddressError::UnknownApp(_))));
}

#[test]
fn static_routes_by_port_then_app_then_the_gateway() {
    let app: AppId = APP.parse().unwrap();
    let routes = StaticRoutes::from_iter([
        (RouteKey::App(app.clone()), "10.0.0.5:443".parse().unwrap()),
        (
            RouteKey::AppPort(app, 8080),
            "10.0.0.6:8443".parse().unwrap(),
        ),
    ]);
    let gateway = Addressing::from_setting(&"gw.example.com".parse().unwrap(), None);
    let a = Addressing::Static {
        routes,
        otherwise: Some(Box::new(gateway)),
    };
    let connect = |t: &Target| a.route(t).unwrap().connect.to_string();
    // Port 8080 has its own entry; any other port takes the app's.
    assert_eq!(connect(&target(Transport::Mesh, false)), "10.0.0.6:8443");
    let mut other_port = target(Transport::Mesh, false);
    other_port.port = 9000;
    assert_eq!(connect(&other_port), "10.0.0.5:443");
    // An app the table does not name goes through the gateway.
    let mut other_app = target(Transport::Mesh, false);
    other_app.app_id = "aa".repeat(20).parse().unwrap();
    let r = a.route(&other_app).unwrap();
    assert_eq!(
        r.server_name,
        format!("{}-8080s.gw.example.com", "aa".repeat(20))
    );
    // Keys: an app, or an app and a port.
    assert_eq!(
        format!("{APP}:8080").parse::<RouteKey>().unwrap(),
        RouteKey::AppPort(APP.parse().unwrap(), 8080)
    );
    assert_eq!(
        APP.parse::<RouteKey>().unwrap(),
        RouteKey::App(APP.parse().unwrap())
    );
    for bad in [format!("{APP}:0"), format!("{APP}:x"), "zz".into()] {
        assert!(bad.parse::<RouteKey>().is_err(), "{bad}");
    }
}

#[test]
fn gateway_settings_parse() {
    assert_eq!(
        "fixed/127.0.0.1:443/".parse::<GatewaySetting>().unwrap(),
        GatewaySetting::Fixed("127.0.0.1:443".parse().unwrap())
    );
    assert_eq!(
        "GW.Example.com".parse::<GatewaySetting>().unwrap(),
        GatewaySetting::Domain {
            base: "gw.example.com".into(),
            port: None
        }
    );
    // dstack-vpc's form: `base_domain:external_port`, the port used for every target.
    let vpc = "dstack.example.com:8443".parse::<GatewaySetting>().unwrap();
    assert_eq!(
        vpc,
        GatewaySetting::Domain {
            base: "dstack.example.com".into(),
            port: Some(8443)
        }
    );
    assert_eq!(vpc.to_string(), "dstack.example.com:8443");
    let Addressing::Gateway { port, .. } = Addressing::from_setting(&vpc, Some(443)) else {
        panic!("not a gateway");
    };
    assert_eq!(port, 8443, "the named port wins over discovery");
    for bad in [
        "",
        "fixed/nohost",
        "a..b",
        "has space.com",
        "fixed/h:0",
        "gw.example.com:0",
        "gw.example.com:https",
        ":443",
    ] {
        assert!(bad.parse::<GatewaySetting>().is_err(), "{bad}");
    }
}
