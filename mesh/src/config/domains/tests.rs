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

    // dstack-ingress 2.3's own names, beside the certbot-era ones.
    let c = load(
        "",
        &[
            ("DOMAIN", "app.example.com"),
            ("TARGET_ENDPOINT", "http://app:80"),
            ("ACME_EMAIL", "acme@example.com"),
            ("ACME_STAGING", "true"),
            ("EVIDENCE_SERVER", "false"),
        ],
    )
    .unwrap();
    let d = &c.public.domains[0];
    assert_eq!(d.issuer, Issuer::Acme(LETSENCRYPT_STAGING.into()));
    assert_eq!(c.public.acme.email.as_deref(), Some("acme@example.com"));
    assert!(!c.public.acme.evidence_server);

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
        ("", &[("DOMAINS", "a.example.com"), ("ALIAS_DOMAIN", "b.example.com"), ("TARGET_ENDPOINT", "x:1")], "ALIAS_DOMAIN: ALIAS_DOMAIN adds names to the single DOMAIN's certificate; with DOMAINS give each domain its aliases as `domain=alias1,alias2`"),
        ("", &[("DOMAINS", "a.example.com=www_bad.example.com"), ("TARGET_ENDPOINT", "x:1")], "DOMAINS: entry 1"),
        ("", &[("DOMAINS", "a.example.com=b.example.com\nb.example.com"), ("TARGET_ENDPOINT", "x:1")], "b.example.com is also served by DOMAINS"),
        ("", &[("DOMAIN", "*.example.com"), ("TARGET_ENDPOINT", "x:1")], "a wildcard needs the dns-01 challenge"),
        ("", &[("DOMAIN", "bad_name.example.com"), ("TARGET_ENDPOINT", "x:1")], "DOMAIN: \"bad_name.example.com\" is not a valid domain name"),
        ("", &[("DOMAINS", "a.example.com")], "a.example.com: no backend"),
        ("", &[("DOMAINS", "a.example.com"), ("ROUTING_MAP", "z.example.com=z:1"), ("TARGET_ENDPOINT", "x:1")], "z.example.com is routed but neither DOMAIN nor DOMAINS holds it or a wildcard over it"),
        ("", &[("DOMAINS", "a.example.com\n# ours\nbad_name.example.com"), ("TARGET_ENDPOINT", "x:1")], "DOMAINS: entry 3 (\"bad_name.example.com\")"),
        ("", &[("DOMAINS", "a.example.com"), ("ROUTING_MAP", "a.example.com=a:1,b.example.com"), ("TARGET_ENDPOINT", "x:1")], "ROUTING_MAP: entry 2 (\"b.example.com\"): expected domain=host:port"),
        ("", &[("DOMAINS", "a.example.com"), ("ROUTING_MAP", "a.example.com=a:1\nb_x.example.com=b:1"), ("TARGET_ENDPOINT", "x:1")], "ROUTING_MAP: entry 2"),
        ("", &[("DOMAIN", "a.example.com"), ("TARGET_ENDPOINT", "x:1"), ("ACME_CHALLENGE_ALIAS", "z.example.net")], "ACME_CHALLENGE_ALIAS: renamed DELEGATION_ZONE"),
        ("", &[("DOMAIN", "a.example.com"), ("TARGET_ENDPOINT", "x:1"), ("ALPN", "h2,grpc-exp")], "ALPN: \"grpc-exp\": an http-mode domain speaks h2 and http/1.1 only"),
        ("", &[("DOMAIN", "a.example.com"), ("TARGET_ENDPOINT", "x:1"), ("ALPN", "h2;http/1.1")], "is not an ALPN protocol id"),
        ("", &[("MAXCONN", "lots")], "MAXCONN: \"lots\" is not a number"),
        ("", &[("TIMEOUT_CLIENT", "30")], "TIMEOUT_CLIENT: \"30\" is not a timeout: a number and a unit"),
        ("", &[("TIMEOUT_SERVER", "5y")], "TIMEOUT_SERVER: \"5y\": unit \"y\""),
        ("", &[("TIMEOUT_CONNECT", "0s")], "TIMEOUT_CONNECT: \"0s\" must be above zero"),
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

#[test]
fn dstack_ingress_listener_settings_and_internals() {
    let env = [
        ("DOMAIN", "app.example.com"),
        ("TARGET_ENDPOINT", "app:80"),
        ("MAXCONN", "20000"),
        ("TIMEOUT_CONNECT", "1500ms"),
        ("TIMEOUT_CLIENT", "2h"),
        ("TIMEOUT_SERVER", "86400s"),
        ("EVIDENCE_DIR", "/data/evidences"),
        ("ALPN", "http/1.1"),
        ("LEGO_PATH", "/etc/letsencrypt/lego"),
        ("EVIDENCE_PORT", "8080"),
    ];
    let c = load("", &env).unwrap();
    assert_eq!(c.inbound.max_connections, 20_000);
    assert_eq!(
        c.inbound.backend_connect_timeout,
        Duration::from_millis(1500)
    );
    assert_eq!(c.inbound.idle_timeout, Duration::from_secs(7200));
    assert_eq!(c.inbound.backend_timeout, Duration::from_secs(86_400));
    assert_eq!(c.public.acme.evidence_dir, PathBuf::from("/data/evidences"));
    let d = &c.public.domains[0];
    assert_eq!(d.alpn, ["http/1.1"]);
    assert_eq!(d.alpn_offer(), [b"http/1.1".to_vec()]);
    // Internals are accepted and said to be unneeded, each once.
    let env: HashMap<&str, &str> = env.iter().copied().collect();
    let (_, notes) = Config::from_toml_as(
        "[admin]\nenabled = false\n",
        &env,
        crate::config::Defaults::Ours,
    )
    .unwrap();
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert!(notes.iter().any(|n| n.contains("LEGO_PATH")), "{notes:?}");
    assert!(
        notes.iter().any(|n| n.contains("EVIDENCE_PORT")),
        "{notes:?}"
    );
    // Defaults: http mode offers h2 then HTTP/1.1; tcp mode offers nothing unless told.
    let c = load(
        "[[domains]]\nnames = [\"db.example.com\"]\nbackend = \"db:5432\"\nmode = \"tcp\"\nalpn = [\"postgresql\"]\n[[domains]]\nnames = [\"w.example.com\"]\nbackend = \"w:80\"\n",
        &[],
    )
    .unwrap();
    assert_eq!(c.public.domains[0].alpn_offer(), [b"postgresql".to_vec()]);
    assert_eq!(
        c.public.domains[1].alpn_offer(),
        [b"h2".to_vec(), b"http/1.1".to_vec()]
    );
}

#[test]
fn routes_under_a_wildcard_and_the_dns01_default() {
    // dstack-ingress: one wildcard certificate, names under it routed to their own backends;
    // DNS-01 by default when the DNS credential is in the environment.
    let c = load(
        "",
        &[
            ("DOMAINS", "*.example.com"),
            ("TARGET_ENDPOINT", "web:80"),
            (
                "ROUTING_MAP",
                "api.example.com=api:8080,admin.example.com=admin:9000",
            ),
            ("CLOUDFLARE_API_TOKEN", "t"),
        ],
    )
    .unwrap();
    let d = &c.public.domains[0];
    assert_eq!(d.names, ["*.example.com"]);
    assert_eq!(d.challenge, Challenge::Dns01);
    assert_eq!(
        d.backend_for(Some("API.example.com")).to_string(),
        "api:8080"
    );
    assert_eq!(
        d.backend_for(Some("admin.example.com")).to_string(),
        "admin:9000"
    );
    assert_eq!(d.backend_for(Some("www.example.com")).to_string(), "web:80");
    assert_eq!(d.backend_for(None).to_string(), "web:80");
    assert!(matches!(
        c.public.dns.provider,
        Some(crate::config::ProviderConfig::Cloudflare { .. })
    ));
    // An explicit challenge still wins; a DNS provider from the file keeps TLS-ALPN-01.
    let c = load(
        "",
        &[
            ("DOMAIN", "a.example.com"),
            ("TARGET_ENDPOINT", "x:1"),
            ("CLOUDFLARE_API_TOKEN", "t"),
            ("CHALLENGE_TYPE", "tls-alpn-01"),
        ],
    )
    .unwrap();
    assert_eq!(c.public.domains[0].challenge, Challenge::TlsAlpn01);
    let c = load(
        "[dns]\nprovider = \"cloudflare\"\napi_token = \"t\"\n[[domains]]\nnames = [\"a.example.com\"]\nbackend = \"x:1\"\n",
        &[],
    )
    .unwrap();
    assert_eq!(c.public.domains[0].challenge, Challenge::TlsAlpn01);
}

#[test]
fn each_domain_carries_its_aliases() {
    let c = load(
        "",
        &[
            (
                "DOMAINS",
                "shop.example.com=www.shop.example.com,store.example.com\n# b\napi.example.com",
            ),
            (
                "ROUTING_MAP",
                "shop.example.com=shop:80\napi.example.com=api:8080",
            ),
        ],
    )
    .unwrap();
    let d = &c.public.domains;
    assert_eq!(
        d[0].names,
        [
            "shop.example.com",
            "www.shop.example.com",
            "store.example.com"
        ]
    );
    assert_eq!(d[0].backend.to_string(), "shop:80");
    assert_eq!(d[1].names, ["api.example.com"]);
    // One line with `=`: one domain, its commas separate aliases.
    let c = load(
        "",
        &[
            (
                "DOMAINS",
                "shop.example.com=www.shop.example.com,store.example.com",
            ),
            ("TARGET_ENDPOINT", "x:1"),
        ],
    )
    .unwrap();
    assert_eq!(c.public.domains.len(), 1);
    assert_eq!(c.public.domains[0].names.len(), 3);
    // ALIAS_DOMAIN may name several, comma-separated.
    let c = load(
        "",
        &[
            ("DOMAIN", "a.example.com"),
            ("ALIAS_DOMAIN", "www.a.example.com, b.example.com"),
            ("TARGET_ENDPOINT", "x:1"),
        ],
    )
    .unwrap();
    assert_eq!(
        c.public.domains[0].names,
        ["a.example.com", "www.a.example.com", "b.example.com"]
    );
}
