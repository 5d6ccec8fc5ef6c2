use std::collections::HashMap;

use super::*;
use crate::config::{Challenge, Config};

fn load(toml: &str, env: &[(&str, &str)]) -> Result<Config, String> {
    let env: HashMap<&str, &str> = env.iter().copied().collect();
    Config::from_toml(&format!("[admin]\nenabled = false\n{toml}"), &env).map_err(|e| e.to_string())
}

const WILDCARD: &[(&str, &str)] = &[
    ("DOMAIN", "*.example.com"),
    ("TARGET_ENDPOINT", "app:80"),
    ("CHALLENGE_TYPE", "dns-01"),
];

#[test]
fn dstack_ingress_cloudflare_variables() {
    let mut env = WILDCARD.to_vec();
    env.extend([
        ("DNS_PROVIDER", "cloudflare"),
        ("CLOUDFLARE_API_TOKEN", "tok-123"),
        ("GATEWAY_DOMAIN", "_.dstack-prod.example.net"),
        ("SET_CAA", "true"),
        ("DNS_RESOLVERS", "1.1.1.1, 127.0.0.1:5353"),
        ("DNS_PROPAGATION_TIMEOUT", "30"),
    ]);
    let c = load("", &env).unwrap();
    let dns = &c.public.dns;
    assert_eq!(c.public.domains[0].challenge, Challenge::Dns01);
    assert!(
        matches!(&dns.provider, Some(ProviderConfig::Cloudflare { api_url, .. }) if api_url == CLOUDFLARE_API)
    );
    assert_eq!(
        dns.gateway_domain.as_deref(),
        Some("_.dstack-prod.example.net")
    );
    assert!(dns.set_caa);
    assert_eq!(
        dns.resolvers,
        [
            "1.1.1.1:53".parse().unwrap(),
            "127.0.0.1:5353".parse().unwrap()
        ]
    );
    assert_eq!(dns.propagation_timeout, Duration::from_secs(30));
    assert_eq!(dns.txt_prefix, DEFAULT_TXT_PREFIX);
    // The token never shows: not in Debug, not in check-config's JSON.
    assert!(!format!("{dns:?}").contains("tok-123"));
    assert!(!serde_json::to_string(dns).unwrap().contains("tok-123"));
}

#[test]
fn rfc2136_from_toml() {
    let c = load(
        "[dns]\nprovider = \"rfc2136\"\nserver = \"127.0.0.1:5300\"\ntsig_key = \"mesh-key.\"\ntsig_secret = \"c2VjcmV0c2VjcmV0\"\nzones = [\"Example.com\"]\npropagation_check = false\ntxt_prefix = \"_app\"\n\
         [[domains]]\nnames = [\"*.example.com\"]\nbackend = \"app:80\"\nchallenge = \"dns-01\"\n",
        &[],
    )
    .unwrap();
    let dns = &c.public.dns;
    match &dns.provider {
        Some(ProviderConfig::Rfc2136 {
            server,
            key_name,
            algorithm,
            zones,
            ..
        }) => {
            assert_eq!(
                (server.as_str(), key_name.as_str(), algorithm.as_str()),
                ("127.0.0.1:5300", "mesh-key", "hmac-sha256")
            );
            assert_eq!(zones, &["example.com"]);
        }
        other => panic!("{other:?}"),
    }
    assert!(!dns.propagation_check);
    assert_eq!(dns.txt_prefix, "_app");
}

#[test]
fn errors_name_what_is_missing() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("DNS_PROVIDER", "cloudflare")], "needs an API token"),
        (
            &[("DNS_PROVIDER", "rfc2136"), ("RFC2136_SERVER", "ns1")],
            "needs a server, a TSIG key name and its secret",
        ),
        (
            &[
                ("DNS_PROVIDER", "rfc2136"),
                ("RFC2136_SERVER", "ns1"),
                ("RFC2136_TSIG_KEY", "k"),
                ("RFC2136_TSIG_SECRET", "not base64!"),
            ],
            "not base64",
        ),
        (
            &[
                ("DNS_PROVIDER", "rfc2136"),
                ("RFC2136_SERVER", "ns1"),
                ("RFC2136_TSIG_KEY", "k"),
                ("RFC2136_TSIG_SECRET", "c2VjcmV0"),
                ("RFC2136_TSIG_ALGORITHM", "hmac-md5"),
            ],
            "use hmac-sha256",
        ),
        (&[("DNS_PROVIDER", "gandi")], "use cloudflare, rfc2136"),
        (
            &[("DNS_PROVIDER", "route53"), ("AWS_ACCESS_KEY_ID", "AKIA")],
            "route53 needs an access key (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
        ),
        (
            &[
                ("AWS_ACCESS_KEY_ID", "AKIA"),
                ("AWS_SECRET_ACCESS_KEY", "s"),
                ("AWS_POLLING_INTERVAL", "4s"),
            ],
            "AWS_POLLING_INTERVAL: \"4s\" is not a whole number of seconds",
        ),
        (
            &[("NAMECHEAP_API_KEY", "k")],
            "namecheap needs its API user and key",
        ),
        (
            &[
                ("NAMECHEAP_USERNAME", "u"),
                ("NAMECHEAP_API_KEY", "k"),
                ("NAMECHEAP_CLIENT_IP", "2001:db8::1"),
            ],
            "NAMECHEAP_CLIENT_IP: \"2001:db8::1\" is not an IPv4 address",
        ),
        (
            &[
                ("ACME_PROFILE", "short lived"),
                ("CLOUDFLARE_API_TOKEN", "t"),
            ],
            "acme.profile: \"short lived\" is not an ACME profile name",
        ),
        (
            &[("DNS_PROVIDER", "linode")],
            "linode needs a personal access token",
        ),
        (
            &[("DNS_PROVIDER", "digitalocean")],
            "digitalocean needs a personal access token with write scope (DO_AUTH_TOKEN",
        ),
        (
            &[("DNS_PROVIDER", "porkbun"), ("PORKBUN_API_KEY", "pk1_x")],
            "porkbun needs its API key pair (PORKBUN_API_KEY and PORKBUN_SECRET_API_KEY",
        ),
        (
            &[("DNS_PROVIDER", "ovh")],
            "ovh needs application keys (OVH_APPLICATION_KEY, OVH_APPLICATION_SECRET, OVH_CONSUMER_KEY",
        ),
        (
            &[("DNS_PROVIDER", "ovh"), ("OVH_APPLICATION_KEY", "k")],
            "ovh's application keys go together",
        ),
        (
            &[
                ("GATEWAY_DOMAIN", "gw.example.net"),
                ("DNS_SETUP_MODE", "dig"),
            ],
            "DNS_SETUP_MODE: \"dig\" is not print, wait or webhook",
        ),
        (
            &[
                ("GATEWAY_DOMAIN", "gw.example.net"),
                ("DNS_SETUP_MODE", "webhook"),
            ],
            "DNS_SETUP_MODE=webhook needs the URL",
        ),
        (
            &[
                ("GATEWAY_DOMAIN", "gw.example.net"),
                ("DOH_RESOLVERS", "http://dns.example/resolve"),
            ],
            "http:// only on loopback",
        ),
        (
            &[
                ("GATEWAY_DOMAIN", "gw.example.net"),
                ("DNS_SETUP_TIMEOUT", "soon"),
            ],
            "DNS_SETUP_TIMEOUT",
        ),
        (
            &[("DNS_PROVIDER", "httpreq")],
            "httpreq needs its endpoint (HTTPREQ_ENDPOINT",
        ),
        (
            &[
                ("DNS_PROVIDER", "httpreq"),
                ("HTTPREQ_ENDPOINT", "https://ops.example/dns"),
                ("HTTPREQ_MODE", "RAW"),
            ],
            "HTTPREQ_MODE: \"RAW\": only the default mode",
        ),
        (
            &[
                ("DNS_PROVIDER", "httpreq"),
                ("HTTPREQ_ENDPOINT", "https://ops.example/dns"),
                ("HTTPREQ_PASSWORD", "p"),
            ],
            "HTTPREQ_USERNAME: a password without a user",
        ),
        (
            &[
                ("DNS_PROVIDER", "httpreq"),
                ("HTTPREQ_ENDPOINT", "ops.example/dns"),
            ],
            "HTTPREQ_ENDPOINT: \"ops.example/dns\" is not an http(s) URL",
        ),
        (
            &[("DELEGATION_ZONE", "acme.example.net")],
            "DELEGATION_ZONE: the delegated zone is written through a DNS provider",
        ),
        (
            &[
                ("CLOUDFLARE_API_TOKEN", "t"),
                ("GATEWAY_DOMAIN", "gw.example.net"),
                ("DNS_SETUP_MODE", "print"),
            ],
            "the DNS provider writes the records itself",
        ),
        (
            &[("DNS_RESOLVERS", "resolver.example")],
            "not a resolver address",
        ),
        (&[("TXT_PREFIX", "a.b")], "one DNS label"),
        (
            &[("DNS_PROPAGATION_TIMEOUT", "10m")],
            "longer than the 240s",
        ),
        (&[], "dns-01 needs a DNS provider"),
    ];
    for (extra, want) in cases {
        let mut env = WILDCARD.to_vec();
        env.extend_from_slice(extra);
        let e = load("", &env).unwrap_err();
        assert!(e.contains(want), "{extra:?}: {e}");
    }
}

#[test]
fn dns01_without_credentials_is_the_operators_with_a_setup_mode() {
    // No provider: DNS_SETUP_MODE (or GATEWAY_DOMAIN, whose default mode is wait) makes each
    // challenge record the operator's, so the wildcard loads.
    for extra in [
        &[
            ("DNS_SETUP_MODE", "webhook"),
            ("DNS_WEBHOOK_URL", "https://ops.example/dns"),
        ][..],
        &[("DNS_SETUP_MODE", "print")][..],
        &[("GATEWAY_DOMAIN", "gw.example.net")][..],
    ] {
        let mut env = WILDCARD.to_vec();
        env.extend_from_slice(extra);
        let c = load("", &env).unwrap_or_else(|e| panic!("{extra:?}: {e}"));
        assert!(c.public.dns.provider.is_none());
        assert!(c.public.dns.setup.is_some(), "{extra:?}");
    }
}

#[test]
fn without_credentials_the_operator_makes_the_records() {
    // dstack-ingress's defaults: wait, its two public DoH resolvers, 1800 s / 15 s, settle 30 s.
    let c = load(
        "",
        &[
            ("DOMAIN", "a.example.com"),
            ("TARGET_ENDPOINT", "x:1"),
            ("GATEWAY_DOMAIN", "gw.example.net"),
        ],
    )
    .unwrap();
    let setup = c.public.dns.setup.unwrap();
    assert_eq!(setup.mode, setup::SetupMode::Wait);
    assert_eq!(setup.doh_resolvers, setup::DEFAULT_DOH);
    assert_eq!(setup.timeout, Duration::from_secs(1800));
    assert_eq!(setup.interval, Duration::from_secs(15));
    assert_eq!(setup.settle, Duration::from_secs(30));
    assert!(setup.webhook.is_none());
    let c = load(
        "",
        &[
            ("DOMAIN", "a.example.com"),
            ("TARGET_ENDPOINT", "x:1"),
            ("GATEWAY_DOMAIN", "gw.example.net"),
            ("DNS_SETUP_MODE", "webhook"),
            ("DNS_WEBHOOK_URL", "https://dns-ops.example/hook"),
            ("DNS_WEBHOOK_TOKEN", "s3cret"),
            ("DNS_WEBHOOK_TIMEOUT", "5"),
            (
                "DOH_RESOLVER",
                "https://dns.example/resolve, http://127.0.0.1:8053/resolve",
            ),
            ("DNS_SETUP_TIMEOUT", "10m"),
            ("DNS_SETTLE_SECONDS", "0"),
        ],
    )
    .unwrap();
    let setup = c.public.dns.setup.unwrap();
    assert_eq!(setup.mode, setup::SetupMode::Webhook);
    assert_eq!(
        setup.doh_resolvers,
        [
            "https://dns.example/resolve",
            "http://127.0.0.1:8053/resolve"
        ]
    );
    assert_eq!(setup.timeout, Duration::from_secs(600));
    assert_eq!(setup.settle, Duration::ZERO);
    let hook = setup.webhook.unwrap();
    assert_eq!(hook.timeout, Duration::from_secs(5));
    assert_eq!(hook.token.unwrap().0, "s3cret");
    // With a provider writing the records there is nothing for the operator to do.
    let c = load(
        "",
        &[
            ("DOMAIN", "a.example.com"),
            ("TARGET_ENDPOINT", "x:1"),
            ("GATEWAY_DOMAIN", "gw.example.net"),
            ("CLOUDFLARE_API_TOKEN", "t"),
        ],
    )
    .unwrap();
    assert!(c.public.dns.setup.is_none());
}

#[test]
fn a_delegation_zone_takes_the_provider_and_the_operators_cnames() {
    let mut env = WILDCARD.to_vec();
    env.extend([
        ("CLOUDFLARE_API_TOKEN", "t"),
        ("DELEGATION_ZONE", "ACME.example.net."),
        ("DELEGATION_PROPAGATION_SECONDS", "90"),
        ("DNS_SETUP_MODE", "print"),
    ]);
    let c = load("", &env).unwrap();
    let dns = &c.public.dns;
    assert_eq!(dns.delegation_zone.as_deref(), Some("acme.example.net"));
    assert_eq!(dns.propagation_timeout, Duration::from_secs(90));
    // The provider writes in the zone; the operator makes the CNAMEs, as DNS_SETUP_MODE says.
    assert_eq!(dns.setup.as_ref().unwrap().mode, setup::SetupMode::Print);
}

#[test]
fn httpreq_presents_challenges_and_leaves_the_dstack_records_to_the_operator() {
    let mut env = WILDCARD.to_vec();
    env.extend([
        ("DNS_PROVIDER", "httpreq"),
        ("HTTPREQ_ENDPOINT", "https://ops.example/dns/"),
        ("HTTPREQ_USERNAME", "ops"),
        ("HTTPREQ_PASSWORD", "hunter2"),
        ("GATEWAY_DOMAIN", "gw.example.net"),
    ]);
    let c = load("", &env).unwrap();
    let provider = c.public.dns.provider.as_ref().unwrap();
    assert!(
        matches!(provider, ProviderConfig::HttpReq { endpoint, username: Some(u), .. } if endpoint == "https://ops.example/dns" && u == "ops")
    );
    assert!(!provider.writes_zones());
    // It cannot write the CNAME and TXT: the operator makes them, as DNS_SETUP_MODE says.
    assert_eq!(
        c.public.dns.setup.as_ref().unwrap().mode,
        setup::SetupMode::Wait
    );
}
