use std::collections::HashMap;

use super::*;

fn no_env() -> HashMap<&'static str, &'static str> {
    HashMap::new()
}

const DSTACK_VPC: &str = r#"
[client]
address = "0.0.0.0"
port = 8091

[auth]
address = "0.0.0.0"
port = 8092

[dstack]
gateway_domain = "fixed/127.0.0.1:443"

[tls]
cert_file = "/etc/ssl/certs/server.crt"
key_file = "/etc/ssl/private/server.key"
ca_file = "/etc/ssl/certs/ca.crt"
"#;

#[test]
fn dstack_vpc_file_loads_unchanged() {
    // With `enabled`, as mesh-serve.sh writes it.
    let with_enabled = DSTACK_VPC
        .replace("[client]\n", "[client]\nenabled = true\n")
        .replace("[auth]\n", "[auth]\nenabled = true\n");
    for text in [DSTACK_VPC.to_owned(), with_enabled] {
        let c = Config::from_toml(&text, &no_env()).unwrap();
        assert_eq!(c.client.listen, "0.0.0.0:8091".parse().unwrap());
        assert_eq!(c.auth.listener.listen, "0.0.0.0:8092".parse().unwrap());
        assert_eq!(
            c.gateway_domain,
            Some(GatewaySetting::Fixed("127.0.0.1:443".parse().unwrap()))
        );
        assert_eq!(c.tls.ca_file, PathBuf::from("/etc/ssl/certs/ca.crt"));
        assert_eq!(c.inbound.backend.to_string(), DEFAULT_BACKEND);
        assert_eq!(c.inbound.allow, Allow::OwnApp);
    }
}

#[test]
fn dstack_vpc_command_line_takes_its_defaults_and_says_so() {
    let (c, notes) = Config::from_toml_as(DSTACK_VPC, &no_env(), Defaults::DstackVpc).unwrap();
    assert!(!c.inbound.enabled, "nginx holds 443 in dstack-vpc's image");
    assert_eq!(c.inbound.allow, Allow::Any);
    assert!(c.auth.trust_loopback);
    assert!(c.client.enabled && c.auth.listener.enabled);
    assert_eq!(notes.len(), 3, "{notes:?}");
    for (note, about) in notes.iter().zip(["[inbound]", "allowlist", "nginx_secret"]) {
        assert!(note.contains(about), "{note}");
    }

    // Whatever the file or the environment says wins, and is not a note.
    let env = HashMap::from([
        (
            "VPC_ALLOWED_APPS",
            "ca11e2ca11e2ca11e2ca11e2ca11e2ca11e2ca11",
        ),
        (
            "DSTACK_MESH_NGINX_SECRET",
            "0123456789abcdef0123456789abcdef",
        ),
    ]);
    let text = format!("{DSTACK_VPC}\n[inbound]\nlisten = \"127.0.0.1:9443\"\n");
    let (c, notes) = Config::from_toml_as(&text, &env, Defaults::DstackVpc).unwrap();
    assert!(c.inbound.enabled);
    assert!(matches!(c.inbound.allow, Allow::Apps(ref ids) if ids.len() == 1));
    assert!(!c.auth.trust_loopback);
    assert!(notes.is_empty(), "{notes:?}");
    let text = format!("{DSTACK_VPC}\n[auth]\ntrust_loopback = false\n")
        .replace("[auth]\naddress = \"0.0.0.0\"\nport = 8092\n", "");
    let (c, _) = Config::from_toml_as(&text, &no_env(), Defaults::DstackVpc).unwrap();
    assert!(!c.auth.trust_loopback);

    // `run` keeps ours for the same file.
    let (c, notes) = Config::from_toml_as(DSTACK_VPC, &no_env(), Defaults::Ours).unwrap();
    assert!(c.inbound.enabled && !c.auth.trust_loopback && notes.is_empty());
    assert_eq!(c.inbound.allow, Allow::OwnApp);
}

#[test]
fn defaults_are_safe() {
    let c = Config::from_toml("", &no_env()).unwrap();
    assert!(c.client.listen.ip().is_loopback());
    assert!(c.auth.listener.listen.ip().is_loopback());
    assert_eq!(c.inbound.listen, DEFAULT_INBOUND_LISTEN.parse().unwrap());
    assert_eq!(c.inbound.allow, Allow::OwnApp);
    assert_eq!(c.inbound.handshake_timeout, DEFAULT_HANDSHAKE_TIMEOUT);
}

#[test]
fn new_keys_and_env_overrides() {
    let text = r#"
[inbound]
listen = "127.0.0.1:9443"
backend = "app:8080"
allowed_apps = ["5bb4ff9a3837357f19dc176407a5709c62eb6c56"]
handshake_timeout = "2s"
idle_timeout = 30
"#;
    let c = Config::from_toml(text, &no_env()).unwrap();
    assert_eq!(c.inbound.listen, "127.0.0.1:9443".parse().unwrap());
    assert_eq!(c.inbound.backend.to_string(), "app:8080");
    assert_eq!(c.inbound.handshake_timeout, Duration::from_secs(2));
    assert_eq!(c.inbound.idle_timeout, Duration::from_secs(30));
    assert!(matches!(c.inbound.allow, Allow::Apps(ref ids) if ids.len() == 1));

    let env = HashMap::from([
        ("MESH_BACKEND", "127.0.0.1:7000"),
        ("VPC_ALLOWED_APPS", "any"),
        ("DSTACK_MESH_INBOUND_LISTEN", "127.0.0.1:9444"),
        ("DSTACK_GATEWAY_DOMAIN", "gw.example.com"),
    ]);
    let c = Config::from_toml(text, &env).unwrap();
    assert_eq!(c.inbound.backend.to_string(), "127.0.0.1:7000");
    assert_eq!(c.inbound.allow, Allow::Any);
    assert_eq!(c.inbound.listen, "127.0.0.1:9444".parse().unwrap());
    assert_eq!(
        c.gateway_domain,
        Some(GatewaySetting::Domain {
            base: "gw.example.com".into(),
            port: None
        })
    );
    let bad = HashMap::from([("DSTACK_GATEWAY_DOMAIN", "not a domain")]);
    let err = Config::from_toml("", &bad).unwrap_err();
    assert!(err.to_string().contains("DSTACK_GATEWAY_DOMAIN"), "{err}");

    // The newer name wins over dstack-vpc's.
    let env = HashMap::from([
        ("DSTACK_MESH_BACKEND", "127.0.0.1:7001"),
        ("MESH_BACKEND", "127.0.0.1:7000"),
        (
            "DSTACK_VPC_ALLOWED_APPS",
            "5bb4ff9a3837357f19dc176407a5709c62eb6c56, 71cbb64614e7090669b2f0cb159295bd81804fa9",
        ),
    ]);
    let c = Config::from_toml("", &env).unwrap();
    assert_eq!(c.inbound.backend.port, 7001);
    assert!(matches!(c.inbound.allow, Allow::Apps(ref ids) if ids.len() == 2));
}

#[test]
fn every_error_names_its_key() {
    let text = r#"
[inbound]
listen = "not an address"
backend = "nohost"
allowed_apps = "zz"
handshake_timeout = "10 parsecs"
backend_timeout = "0s"
max_connections = 0

[auth]
address = "localhost"

[identity]
validity = "9s"
"#;
    let env = HashMap::from([("MESH_BACKEND", "x:0")]);
    let errors = Config::from_toml(text, &env).unwrap_err().0;
    let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
    for key in [
        "inbound.listen",
        "MESH_BACKEND",
        "inbound.allowed_apps",
        "inbound.handshake_timeout",
        "inbound.backend_timeout",
        "inbound.max_connections",
        "auth.address",
        "identity",
    ] {
        assert!(keys.contains(&key), "{key} missing from {keys:?}");
    }
    // The file's backend is shadowed by the variable, so only the variable is reported.
    assert!(!keys.contains(&"inbound.backend"));
    let text = ConfigErrors(errors).to_string();
    assert!(text.contains("port must be 1-65535"), "{text}");
}

#[test]
fn unknown_keys_and_bad_toml_are_refused() {
    let err = Config::from_toml("[inbound]\nbackedn = \"a:1\"\n", &no_env()).unwrap_err();
    assert!(err.to_string().contains("backedn"), "{err}");
    let err = Config::from_toml("[inbound\n", &no_env()).unwrap_err();
    assert!(err.to_string().contains("config"), "{err}");
    let err =
        Config::load(Some(Path::new("/nonexistent/dstack-mesh.toml")), &no_env()).unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/dstack-mesh.toml"),
        "{err}"
    );
}

#[test]
fn values_that_would_fail_later_are_refused_now() {
    let dir = tempfile::tempdir().unwrap();
    let bad_anchor = dir.path().join("anchor.pem");
    std::fs::write(&bad_anchor, "not a certificate").unwrap();
    let text = format!(
        "[inbound]\nidle_timeout = 9223372036854775807\nheader_timeout = \"99999d\"\nmax_connections = 4611686018427387904\nbackend = \"abc:def:80\"\ntrust_anchors = [\"{}\"]\n",
        bad_anchor.display()
    );
    let errors = Config::from_toml(&text, &no_env()).unwrap_err().0;
    let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
    for key in [
        "inbound.idle_timeout",
        "inbound.header_timeout",
        "inbound.max_connections",
        "inbound.backend",
        "inbound.trust_anchors",
    ] {
        assert!(keys.contains(&key), "{key} missing from {keys:?}");
    }
    assert!("[2001:db8::1]:80".parse::<HostPort>().is_ok());
}

#[test]
fn colliding_listeners_are_refused() {
    let text = "[inbound]\nlisten = \"0.0.0.0:8092\"\n";
    let err = Config::from_toml(text, &no_env()).unwrap_err();
    assert!(err.to_string().contains("collides"), "{err}");
    let text = "[inbound]\nlisten = \"0.0.0.0:8092\"\n[auth]\nenabled = false\n";
    assert!(Config::from_toml(text, &no_env()).is_ok());
}

#[test]
fn durations_and_allowlists_parse() {
    assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
    assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
    assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
    assert!(parse_duration("h").is_err());
    assert!(parse_duration("5y").is_err());
    assert!(parse_duration(&format!("{}d", u64::MAX)).is_err());
    assert_eq!(parse_allow(" ANY ").unwrap(), Allow::Any);
    assert!(parse_allow(",").is_err());
    assert!(matches!(parse_allow("aa bb,cc").unwrap(), Allow::Apps(ids) if ids.len() == 3));
    assert!("[::1]:80".parse::<HostPort>().unwrap().to_string() == "[::1]:80");
    assert!("http://app:8000/".parse::<HostPort>().is_ok());
}

#[test]
fn outbound_and_auth_limits_and_routes_by_port() {
    let app = "5bb4ff9a3837357f19dc176407a5709c62eb6c56";
    let text = format!(
        "[outbound]\nidle_timeout = \"60s\"\nheader_timeout = \"5s\"\nmax_connections = 100\n\
         [outbound.routes]\n\"{app}\" = \"10.0.0.2:443\"\n\"{app}:8080\" = \"10.0.0.3:8443\"\n\
         [auth]\nheader_timeout = \"3s\"\nmax_connections = 16\n"
    );
    let c = Config::from_toml(&text, &no_env()).unwrap();
    assert_eq!(c.outbound.idle_timeout, Duration::from_secs(60));
    assert_eq!(c.outbound.header_timeout, Duration::from_secs(5));
    assert_eq!(c.outbound.max_connections, 100);
    assert_eq!(c.auth.header_timeout, Duration::from_secs(3));
    assert_eq!(c.auth.max_connections, 16);
    let app_id: AppId = app.parse().unwrap();
    let at = |port| {
        c.outbound
            .routes
            .get(&app_id, port)
            .map(ToString::to_string)
    };
    assert_eq!(at(8080).as_deref(), Some("10.0.0.3:8443"));
    assert_eq!(at(443).as_deref(), Some("10.0.0.2:443"));
    // check-config prints the keys as written.
    let json = serde_json::to_value(&c).unwrap();
    assert_eq!(
        json["outbound"]["routes"][format!("{app}:8080")],
        "10.0.0.3:8443"
    );

    let d = Config::from_toml("", &no_env()).unwrap();
    assert_eq!(d.outbound.idle_timeout, DEFAULT_OUTBOUND_IDLE_TIMEOUT);
    assert_eq!(d.outbound.header_timeout, DEFAULT_HEADER_TIMEOUT);
    assert_eq!(d.outbound.max_connections, DEFAULT_MAX_CONNECTIONS);
    assert_eq!(d.auth.header_timeout, DEFAULT_AUTH_HEADER_TIMEOUT);
    assert_eq!(d.auth.max_connections, DEFAULT_AUTH_MAX_CONNECTIONS);

    for (text, key) in [
        (
            format!("[outbound.routes]\n\"{app}:0\" = \"h:1\"\n"),
            "outbound.routes.",
        ),
        (
            format!("[outbound.routes]\n\"{app}\" = \"nohost\"\n"),
            "outbound.routes.",
        ),
        (
            "[outbound]\nmax_connections = 0\n".into(),
            "outbound.max_connections",
        ),
        (
            "[auth]\nmax_connections = 0\n".into(),
            "auth.max_connections",
        ),
        (
            "[client]\nheader_timeout = \"1s\"\n".into(),
            "client.header_timeout",
        ),
    ] {
        let err = Config::from_toml(&text, &no_env()).unwrap_err();
        assert!(err.to_string().contains(key), "{text}: {err}");
    }
}

const APP: &str = "a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1";
const OTHER: &str = "b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2";

#[test]
fn tcp_services_tunnels_and_the_registry_load() {
    let text = format!(
        r#"
[inbound]
proxy_protocol = "v2"
[[inbound.tcp]]
name = "redis"
listen = "0.0.0.0:6379"
backend = "127.0.0.1:6380"
allowed_apps = ["{APP}"]
[[inbound.tcp]]
listen = "0.0.0.0:2380"
backend = "etcd:2380"
allowed_apps = "any"
idle_timeout = "5m"
max_connections = 10
proxy_protocol = "off"
[[tunnels]]
name = "redis"
listen = "127.0.0.1:16379"
target_app = "{OTHER}"
target_port = 6379
target_instance = "{APP}"
[registry]
enabled = true
ttl = "30s"
node_type = "mongodb"
labels = {{ zone = "eu-1" }}
"#
    );
    let c = Config::from_toml(&text, &no_env()).unwrap();
    let [redis, etcd] = &c.tcp_services[..] else {
        panic!("{:?}", c.tcp_services)
    };
    assert_eq!((redis.name.as_str(), redis.listen.port()), ("redis", 6379));
    assert_eq!(redis.allow, parse_allow(APP).unwrap());
    assert_eq!(
        redis.proxy_protocol,
        ProxyProtocol::V2,
        "the inbound listener's"
    );
    assert_eq!(redis.idle_timeout, tunnels::DEFAULT_TUNNEL_IDLE_TIMEOUT);
    assert_eq!(etcd.name, "1", "unnamed entries are numbered");
    assert_eq!((etcd.allow.clone(), etcd.max_connections), (Allow::Any, 10));
    assert_eq!(etcd.idle_timeout, Duration::from_secs(300));
    assert_eq!(etcd.proxy_protocol, ProxyProtocol::Off);
    let t = &c.tunnels[0];
    assert_eq!(
        (t.target_app.to_string(), t.target_port),
        (OTHER.to_owned(), 6379)
    );
    assert_eq!(
        t.target_instance.as_ref().map(ToString::to_string),
        Some(APP.to_owned())
    );
    assert!(c.registry.enabled);
    assert_eq!(c.registry.allow, Allow::OwnApp);
    let r = c.registry.register.as_ref().unwrap();
    assert_eq!(
        (r.server_app.clone(), r.server_port),
        (RegistryApp::OwnApp, 443)
    );
    assert_eq!(r.interval, Duration::from_secs(10), "a third of the ttl");
    assert_eq!(r.labels["zone"], "eu-1");
}

#[test]
fn dstack_vpc_registry_variables_work() {
    let env = HashMap::from([
        ("VPC_SERVER_ENABLED", "true"),
        ("VPC_NODE_TYPE", "etcd"),
        ("VPC_NODE_NAME", "etcd-0"),
        ("VPC_SERVER_APP_ID", OTHER),
    ]);
    let c = Config::from_toml("", &env).unwrap();
    assert!(c.registry.enabled);
    let r = c.registry.register.unwrap();
    assert_eq!(r.node_type, "etcd");
    assert_eq!(r.node_name.as_deref(), Some("etcd-0"));
    assert_eq!(r.server_app, RegistryApp::App(OTHER.parse().unwrap()));
    let c = Config::from_toml(
        "",
        &HashMap::from([("VPC_SERVER_APP_ID", "self"), ("VPC_NODE_TYPE", "app")]),
    )
    .unwrap();
    assert_eq!(c.registry.register.unwrap().server_app, RegistryApp::OwnApp);
    assert!(Config::from_toml("", &no_env())
        .unwrap()
        .registry
        .register
        .is_none());
}

/// The keys the errors of `text` name (it must not load).
fn keys(text: &str) -> Vec<String> {
    Config::from_toml(text, &no_env())
        .unwrap_err()
        .0
        .into_iter()
        .map(|e| e.key)
        .collect()
}

#[test]
fn tunnel_mistakes_name_their_key() {
    // Required fields.
    let k = keys("[[inbound.tcp]]\nname = \"x\"\n");
    for key in [
        "inbound.tcp[0].listen",
        "inbound.tcp[0].backend",
        "inbound.tcp[0].allowed_apps",
    ] {
        assert!(k.contains(&key.to_owned()), "{key}: {k:?}");
    }
    let k = keys("[[tunnels]]\nlisten = \"127.0.0.1:1\"\ntarget_app = \"abc\"\n");
    assert!(k.contains(&"tunnels[0].target_app".to_owned()), "{k:?}");
    assert!(k.contains(&"tunnels[0].target_port".to_owned()), "{k:?}");
    // One name twice, one address twice.
    let k = keys(&format!(
        "[[inbound.tcp]]\nname = \"a\"\nlisten = \"0.0.0.0:7000\"\nbackend = \"127.0.0.1:1\"\nallowed_apps = \"any\"\n\
         [[inbound.tcp]]\nname = \"a\"\nlisten = \"0.0.0.0:7001\"\nbackend = \"127.0.0.1:1\"\nallowed_apps = \"any\"\n\
         [[tunnels]]\nlisten = \"127.0.0.1:7000\"\ntarget_app = \"{APP}\"\ntarget_port = 1\n"
    ));
    assert!(k.contains(&"inbound.tcp[1].name".to_owned()), "{k:?}");
    assert!(k.contains(&"tunnels[0].listen".to_owned()), "{k:?}");
    // Tunnels and registration go out through the outbound proxy.
    let k = keys(&format!(
        "[client]\nenabled = false\n[[tunnels]]\nlisten = \"127.0.0.1:7000\"\ntarget_app = \"{APP}\"\ntarget_port = 1\n"
    ));
    assert_eq!(k, ["client.enabled"]);
    // A heartbeat slower than the expiry would drop live nodes.
    let k = keys("[registry]\nttl = \"10s\"\ninterval = \"10s\"\nnode_type = \"x\"\n");
    assert_eq!(k, ["registry.interval"]);
    let k = keys("[registry]\nnode_type = \"no spaces\"\n");
    assert_eq!(k, ["registry.node_type"]);
    let k = keys("[registry]\nttl = \"500ms\"\nserver_port = 0\n");
    assert_eq!(k, ["registry.ttl", "registry.server_port"]);
    // CONNECT's tunnels go by this name.
    let k = keys(&format!(
        "[[tunnels]]\nname = \"connect\"\nlisten = \"127.0.0.1:7000\"\ntarget_app = \"{APP}\"\ntarget_port = 1\n"
    ));
    assert_eq!(k, ["tunnels[0].name"]);
}

#[test]
fn the_attestation_policy_loads_and_its_mistakes_name_their_key() {
    let compose = "c1".repeat(32);
    let text = format!(
        "[attestation]\nrequired = true\ncollateral_dir = \"/var/lib/pccs\"\ntcb_statuses = [\"UpToDate\", \"SWHardeningNeeded\"]\n\
         compose_hashes = [\"{compose}\"]\nmrtd = [\"{}\"]\n[attestation.apps.{APP}]\ncompose_hashes = [\"{}\"]\n",
        "ab".repeat(48),
        "d2".repeat(32)
    );
    let a = Config::from_toml(&text, &no_env())
        .unwrap()
        .attestation
        .unwrap();
    assert_eq!(a.collateral_dir, PathBuf::from("/var/lib/pccs"));
    assert_eq!(a.tdx_root, None, "Intel's root by default");
    assert!(a.rules.tcb_statuses.contains("SWHardeningNeeded"));
    assert!(a.rules.compose_hashes.contains(&compose));
    assert_eq!(a.rules.apps.len(), 1);
    assert!(Config::from_toml("", &no_env())
        .unwrap()
        .attestation
        .is_none());

    let k = keys("[attestation]\nrequired = true\ntcb_statuses = [\"Revoked\", \"Fine\"]\ncompose_hashes = [\"abc\"]\n");
    for key in [
        "attestation.collateral_dir",
        "attestation.tcb_statuses",
        "attestation.compose_hashes",
    ] {
        assert!(k.contains(&key.to_owned()), "{key}: {k:?}");
    }
    // Rules that would not be enforced are a mistake, not a silent no-op.
    assert_eq!(
        keys("[attestation]\ncompose_hashes = []\n"),
        ["attestation.required"]
    );
    // A PCCS needs the platform whose collateral to keep.
    let k =
        keys("[attestation]\nrequired = true\ncollateral_dir = \"/c\"\npccs_url = \"ftp://x\"\n");
    assert_eq!(k, ["attestation.fmspc"]);
    let k = keys("[attestation]\nrequired = true\ncollateral_dir = \"/c\"\npccs_url = \"ftp://x\"\nfmspc = \"00906ED5\"\n");
    assert_eq!(k, ["attestation.pccs_url", "attestation.fmspc"]);
    let ok = "[attestation]\nrequired = true\ncollateral_dir = \"/c\"\npccs_url = \"https://api.trustedservices.intel.com\"\nfmspc = \"00906ED50000\"\n";
    let pccs = Config::from_toml(ok, &no_env())
        .unwrap()
        .attestation
        .unwrap()
        .pccs
        .unwrap();
    assert_eq!(pccs.fmspcs, ["00906ed50000"]);
    // A fleet on several CPU models: each platform's collateral, as a list or comma-separated.
    for fmspc in [
        "[\"00906ED50000\", \"00806F050000\"]",
        "\"00906ED50000, 00806f050000\"",
    ] {
        let text = ok.replace("\"00906ED50000\"", fmspc);
        let pccs = Config::from_toml(&text, &no_env())
            .unwrap()
            .attestation
            .unwrap()
            .pccs
            .unwrap();
        assert_eq!(pccs.fmspcs, ["00806f050000", "00906ed50000"], "{fmspc}");
    }
}

#[test]
fn federation_names_its_roots_and_only_their_apps() {
    let k = keys("[[inbound.federation]]\nname = \"b\"\nallowed_apps = [\"5e77e75e77e75e77e75e77e75e77e75e77e75e77\"]\n");
    assert_eq!(k, ["inbound.federation.roots"]);
    // "any" would let another cluster's KMS mint our app ids: refused, like a missing list.
    for apps in ["allowed_apps = \"any\"\n", ""] {
        let k = keys(&format!(
            "[[inbound.federation]]\nname = \"b\"\nroots = \"/nonexistent.pem\"\n{apps}"
        ));
        assert_eq!(k, ["inbound.federation.allowed_apps"], "{apps}");
    }
    let k = keys("[[inbound.federation]]\nroots = \"/nonexistent.pem\"\nallowed_apps = [\"5e77e75e77e75e77e75e77e75e77e75e77e75e77\"]\n");
    assert_eq!(k, ["inbound.federation.roots"]);
}

#[test]
fn domain_sources_name_their_list_and_route() {
    let head = "[acme]\nissuer = \"internal-ca\"\n";
    let src = |body: &str| format!("{head}[[domain_sources]]\nbackend = \"app:80\"\n{body}");
    assert_eq!(keys(&src("")), ["domain_sources[0]"]);
    assert_eq!(
        keys(&src("file = \"/l\"\nurl = \"https://x/l\"\n")),
        ["domain_sources[0]"]
    );
    assert_eq!(
        keys(&src("url = \"ftp://x/l\"\n")),
        ["domain_sources[0].url"]
    );
    assert_eq!(
        keys(&src("file = \"/l\"\n[domain_sources.headers]\nA = \"b\"\n")),
        ["domain_sources[0].headers"]
    );
    assert_eq!(
        keys(&src("file = \"/l\"\nmax_domains = 0\ninterval = \"0s\"\n")),
        [
            "domain_sources[0].interval",
            "domain_sources[0].max_domains"
        ]
    );
    assert_eq!(
        keys(&format!("{head}[[domain_sources]]\nfile = \"/l\"\n")),
        ["domain_sources[0]"],
        "a backend for the listed domains"
    );
    let two = format!(
        "{}[[domain_sources]]\nfile = \"/l\"\nbackend = \"app:81\"\n",
        src("file = \"/l\"\n")
    );
    assert_eq!(keys(&two), ["domain_sources[1].name"]);
    assert_eq!(
        keys(&src("redis = \"redis://127.0.0.1/0\"\n")),
        ["domain_sources[0].key"]
    );
    assert_eq!(
        keys(&src("redis = \"rediss://:pw@r/0\"\nkey = \"k\"\n")),
        ["domain_sources[0].redis"]
    );
    assert_eq!(
        keys(&src("file = \"/l\"\nkey = \"k\"\n")),
        ["domain_sources[0].key"]
    );
    let redis = Config::from_toml(
        &src("redis = \"redis://:secret@127.0.0.1:6379/2\"\nkey = \"customers\"\n"),
        &no_env(),
    )
    .unwrap();
    assert_eq!(
        redis.public.sources[0].name,
        "redis://***@127.0.0.1:6379/2/customers"
    );
    assert!(!serde_json::to_string(&redis.public)
        .unwrap()
        .contains("secret"));
    let ok = Config::from_toml(
        &src("url = \"https://api.example.com/domains\"\nmax_domains = 500\n[domain_sources.headers]\nAuthorization = \"Bearer t\"\n"),
        &no_env(),
    )
    .unwrap();
    let s = &ok.public.sources[0];
    assert_eq!(s.name, "https://api.example.com/domains");
    assert_eq!(s.max_domains, 500);
    assert_eq!(s.interval, Duration::from_secs(60));
    assert_eq!(s.route.backend.to_string(), "app:80");
    assert_eq!(
        s.grace,
        Duration::ZERO,
        "a dropped domain goes at once by default"
    );
    assert!(ok.public.serves_domains());
    let graced = Config::from_toml(&src("file = \"/l\"\ngrace = \"24h\"\n"), &no_env()).unwrap();
    assert_eq!(graced.public.sources[0].grace, Duration::from_secs(86400));
    assert_eq!(
        keys(&src("file = \"/l\"\ngrace = \"soon\"\n")),
        ["domain_sources[0].grace"]
    );
    // The token is never shown (check-config prints the configuration).
    assert!(!serde_json::to_string(&ok.public)
        .unwrap()
        .contains("Bearer t"));
}

#[test]
fn on_demand_needs_an_ask_endpoint_and_a_challenge_a_handshake_can_wait_for() {
    let head = "[acme]\nissuer = \"https://ca.test/dir\"\n[on_demand]\nbackend = \"app:80\"\n";
    assert_eq!(keys(head), ["on_demand.ask"]);
    assert_eq!(
        keys(&format!("{head}ask = \"ftp://x\"\n")),
        ["on_demand.ask"]
    );
    let dns = format!(
        "{head}ask = \"http://127.0.0.1:9/ask\"\nchallenge = \"dns-01\"\n[dns]\nprovider = \"rfc2136\"\nserver = \"127.0.0.1:53\"\ntsig_key = \"k\"\ntsig_secret = \"c2VjcmV0\"\n"
    );
    assert!(keys(&dns).contains(&"on_demand.challenge".to_owned()));
    let ok = Config::from_toml(
        &format!("{head}ask = \"http://127.0.0.1:9/ask\"\ndeadline = \"20s\"\n"),
        &no_env(),
    )
    .unwrap();
    let source = &ok.public.sources[0];
    assert_eq!(source.name, "on-demand");
    match &source.kind {
        sources::SourceKind::OnDemand(od) => {
            assert_eq!(od.deadline, Duration::from_secs(20));
            assert_eq!(od.refused_ttl, Duration::from_secs(300));
            assert_eq!(od.ask_rate, Some(sources::DEFAULT_ASK_RATE));
        }
        other => panic!("{other:?}"),
    }
    assert!(ok.public.serves_domains());
    let ask_rate = |v: &str| {
        let text = format!("{head}ask = \"http://127.0.0.1:9/ask\"\nask_rate = \"{v}\"\n");
        Config::from_toml(&text, &no_env()).map(|c| match &c.public.sources[0].kind {
            sources::SourceKind::OnDemand(od) => od.ask_rate,
            other => panic!("{other:?}"),
        })
    };
    let five = ask_rate("5/1m").unwrap().unwrap();
    assert_eq!((five.count, five.per), (5, Duration::from_secs(60)));
    assert_eq!(ask_rate("off").unwrap(), None);
    assert_eq!(
        keys(&format!(
            "{head}ask = \"http://127.0.0.1:9/ask\"\nask_rate = \"lots\"\n"
        )),
        ["on_demand.ask_rate"]
    );
}

#[test]
fn rate_limits_default_to_lets_encrypts_and_can_be_set_or_turned_off() {
    let head = "[acme]\nissuer = \"internal-ca\"\n[[domains]]\nnames = [\"a.example.com\"]\nbackend = \"app:80\"\n";
    let config = |acme: &str| {
        Config::from_toml(
            &head.replace("[acme]\n", &format!("[acme]\n{acme}\n")),
            &no_env(),
        )
    };
    let d = config("").unwrap();
    assert_eq!(d.public.acme.order_limit, Some(domains::LETSENCRYPT_ORDERS));
    assert_eq!(
        d.public.acme.domain_limit.unwrap().per,
        Duration::from_secs(7 * 86400)
    );
    let set = config("order_limit = \"10/1h\"\ndomain_limit = \"off\"").unwrap();
    assert_eq!(set.public.acme.order_limit.unwrap().count, 10);
    assert_eq!(set.public.acme.domain_limit, None);
    for bad in ["0/1h", "10", "10/soon", "-1/1h"] {
        let e = config(&format!("order_limit = \"{bad}\"")).unwrap_err();
        assert_eq!(e.0[0].key, "acme.order_limit", "{bad}");
    }
}

#[test]
fn domain_health_takes_the_gateway_and_resolvers_from_dns_unless_told() {
    let head = "[acme]\nissuer = \"internal-ca\"\n[[domain_sources]]\nfile = \"/l\"\nbackend = \"app:80\"\n";
    let parse = |tail: &str| Config::from_toml(&format!("{head}{tail}"), &no_env());
    let none = parse("").unwrap();
    assert!(none.public.health.is_none());
    let own = parse("[domain_health]\ngateway = \"_.GW.example.\"\ninterval = \"5m\"\nresolvers = [\"127.0.0.1:5353\"]\n").unwrap();
    let h = own.public.health.unwrap();
    assert_eq!(h.gateway.as_deref(), Some("_.gw.example"));
    assert_eq!(h.interval, Duration::from_secs(300));
    assert_eq!(h.resolvers, ["127.0.0.1:5353".parse().unwrap()]);
    assert_eq!(h.txt_prefix, "_dstack-app-address");
    assert_eq!(
        parse("[domain_health]\nresolvers = [\"not an address\"]\n")
            .unwrap_err()
            .0[0]
            .key,
        "domain_health.resolvers"
    );
}
