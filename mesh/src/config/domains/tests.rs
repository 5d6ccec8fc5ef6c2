use std::collections::HashMap;

use super::*;
use crate::config::Config;

fn load(toml: &str, env: &[(&str, &str)]) -> Result<Config, String> {
    let env: HashMap<&str, &str> = env.iter().copied().collect();
    Config::from_toml(&format!("[admin]\nenabled = false\n{toml}"), &env).map_err(|e| e.to_string())
}

#[test]
fn toml_domains() {
    let c = load(
        "[acme]\nissuer = \"https://ca.test/dir\"\nstore = \"/tmp/s\"\nrenew_before = \"30d\"\nhttp_listen = \"127.0.0.1:8080\"\n\
         [[domains]]\nnames = [\"App.Example.com.\", \"www.example.com\"]\nbackend = \"127.0.0.1:8080\"\n\
         [[domains]]\nnames = [\"db.example.com\"]\nbackend = \"db:5432\"\nmode = \"tcp\"\nissuer = \"internal-ca\"\nchallenge = \"http-01\"\n",
        &[],
    )
    .unwrap();
    let d = &c.public.domains;
    assert_eq!(d[0].names, ["app.example.com", "www.example.com"]);
    assert_eq!(d[0].issuer, Issuer::Acme("https://ca.test/dir".into()));
    assert_eq!(d[0].challenge, Challenge::TlsAlpn01);
    assert_eq!(d[1].mode, Mode::Tcp);
    assert_eq!(d[1].issuer, Issuer::InternalCa);
    assert_eq!(
        c.public.acme.renew_before,
        Some(Duration::from_secs(30 * 86400))
    );
}

#[test]
fn dstack_ingress_variables() {
    let c = load(
        "",
        &[
            ("DOMAIN", "app.example.com"),
            ("TARGET_ENDPOINT", "http://app:80"),
            ("ALIAS_DOMAIN", "www.example.com"),
            ("CERTBOT_EMAIL", "ops@example.com"),
            ("CERTBOT_STAGING", "true"),
            ("RENEW_DAYS_BEFORE", "20"),
        ],
    )
    .unwrap();
    let d = &c.public.domains[0];
    assert_eq!(d.names, ["app.example.com", "www.example.com"]);
    assert_eq!(d.backend.to_string(), "app:80");
    assert_eq!(d.issuer, Issuer::Acme(LETSENCRYPT_STAGING.into()));
    assert_eq!(c.public.acme.email.as_deref(), Some("ops@example.com"));
    assert_eq!(
        c.public.acme.renew_before,
        Some(Duration::from_secs(20 * 86400))
    );

    let c = load(
        "",
        &[
            ("DOMAINS", "a.example.com\nb.example.com\n\nc.example.com"),
            ("ROUTING_MAP", "a.example.com=a:1\nb.example.com=grpc://b:2"),
            ("TARGET_ENDPOINT", "fallback:3"),
        ],
    )
    .unwrap();
    let backends: Vec<String> = c
        .public
        .domains
        .iter()
        .map(|d| d.backend.to_string())
        .collect();
    assert_eq!(backends, ["a:1", "b:2", "fallback:3"]);
}

#[test]
fn errors_name_the_entry() {
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case<'_>] = &[
        ("", &[("DOMAINS", "a.example.com"), ("ALIAS_DOMAIN", "b.example.com"), ("TARGET_ENDPOINT", "x:1")], "ALIAS_DOMAIN: ALIAS_DOMAIN adds a name"),
        ("", &[("DOMAIN", "*.example.com"), ("TARGET_ENDPOINT", "x:1")], "a wildcard needs the dns-01 challenge"),
        ("", &[("DOMAIN", "bad_name.example.com"), ("TARGET_ENDPOINT", "x:1")], "DOMAIN: \"bad_name.example.com\" is not a valid domain name"),
        ("", &[("DOMAINS", "a.example.com")], "a.example.com: no backend"),
        ("", &[("DOMAINS", "a.example.com"), ("ROUTING_MAP", "z.example.com=z:1"), ("TARGET_ENDPOINT", "x:1")], "z.example.com is routed but is not in DOMAIN or DOMAINS"),
        ("[acme]\nissuer = \"internal-ca\"\n[[domains]]\nnames = [\"a.example.com\"]\nbackend = \"x:1\"\n[[domains]]\nnames = [\"A.example.com\"]\nbackend = \"x:2\"\n", &[], "domains[1]: a.example.com is also served by domains[0]"),
        ("[[domains]]\nnames = [\"a.example.com\"]\n", &[], "domains[0]: a.example.com: no backend"),
        ("[[domains]]\nnames = [\"a.example.com\"]\nbackend = \"x:1\"\nchallenge = \"http-01\"\n", &[], "http-01 needs the :80 listener"),
        ("[[domains]]\nnames = [\"a.example.com\"]\nbackend = \"x:1\"\nissuer = \"ftp://ca\"\n", &[], "is not an issuer"),
        ("[[domains]]\nnames = [\"10.0.0.1\"]\nbackend = \"x:1\"\n", &[], "an IP address is not a domain"),
        ("", &[("DOMAIN", "a.example.com"), ("TARGET_ENDPOINT", "x:1"), ("RENEW_DAYS_BEFORE", "soon")], "RENEW_DAYS_BEFORE"),
        ("[acme]\neab_kid = \"k\"\n", &[], "eab_kid and eab_hmac_key go together"),
    ];
    for (toml, env, want) in cases {
        let err = load(toml, env).unwrap_err();
        assert!(err.contains(want), "{toml} {env:?}: {err}");
    }
}

#[test]
fn names() {
    assert_eq!(check_name("*.Example.COM.").unwrap(), "*.example.com");
    for bad in [
        "",
        "com",
        "-a.example.com",
        "a..example.com",
        "a.*.example.com",
        "é.example.com",
    ] {
        assert!(check_name(bad).is_err(), "{bad}");
    }
    assert_eq!(
        parse_target("grpc://svc:50051/").unwrap().to_string(),
        "svc:50051"
    );
    assert!(parse_target("http://nohost").is_err());
}
