//! Entry points for the fuzz targets (`fuzz/`) and their corpus regression tests
//! (`mesh/tests/fuzz_corpora.rs`): each takes untrusted bytes the way the sidecar receives
//! them and drives everything they reach. None may panic, whatever the input.
//!
//! [`TARGETS`] is the list `scripts/fuzz` runs and the suite checks against `fuzz/Cargo.toml`.

use std::{collections::HashMap, net::SocketAddr, str::FromStr};

use gateway_client::{
    address::{Addressing, GatewaySetting, HostPort, RouteKey},
    target::{strip_routing_headers, Target},
};

use crate::{
    acme::dns01::{self, caa, doh, wire, Data, Record},
    inbound::{
        proxy_protocol::{read_slice, Accept},
        route::{route, Hello, PublicNames},
    },
};

/// A fuzz target's entry point: any bytes, never a panic.
pub type Entry = fn(&[u8]);

/// Every fuzz target: its name (the `fuzz/fuzz_targets/<name>.rs` file) and its entry point.
pub const TARGETS: &[(&str, Entry)] = &[
    ("certificate", ratls::fuzz::certificate),
    ("ra_tls_extension", ratls::fuzz::ra_tls_extension),
    ("app_info", ratls::fuzz::app_info),
    ("attestation", ratls::fuzz::attestation),
    ("agent_response", ratls::fuzz::agent_response),
    ("pccs_collateral", ratls::fuzz::pccs_collateral),
    ("client_hello", client_hello),
    ("proxy_header", proxy_header),
    ("routing_headers", routing_headers),
    ("auth_request", auth_request),
    ("config_toml", config_toml),
    ("config_env", config_env),
    ("dns_message", dns_message),
    ("caa", caa_records),
    ("doh_answer", doh_answer),
    ("dns_provider", dns_provider),
    ("acme_answer", acme_answer),
    ("evidence", evidence),
    ("admin_input", admin_input),
    ("stored_state", stored_state),
];

/// `data` cut at each `\0`: several inputs from one.
fn parts(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    data.split(|b| *b == 0)
}

fn text(data: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(data)
}

/// `Name: value` lines as a header map (invalid lines skipped, as hyper would refuse them).
fn headers(data: &[u8]) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    for line in data.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let value = line[colon + 1..].trim_ascii();
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(&line[..colon]),
            http::HeaderValue::from_bytes(value),
        ) {
            map.append(name, value);
        }
    }
    map
}

/// Names the public side of a listener would serve: one domain with a wildcard and a pending
/// TLS-ALPN-01 challenge.
struct Names;

impl PublicNames for Names {
    type Domain = String;

    fn has_challenge(&self, name: &str) -> bool {
        name == "challenge.example.com"
    }

    fn domain_for(&self, name: &str) -> Option<String> {
        let parent = name.split_once('.').map(|(_, p)| p);
        (name == "example.com" || parent == Some("example.com")).then(|| "example.com".into())
    }
}

/// The first bytes of a connection on the inbound listener: rustls reads the ClientHello the
/// router then decides on.
pub fn client_hello(data: &[u8]) {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut input = data;
    while !input.is_empty() {
        match acceptor.read_tls(&mut input) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let client_hello = accepted.client_hello();
                let hello = Hello::from_rustls(&client_hello);
                let _ = route(&hello, &Names);
                return;
            }
            Ok(None) => {}
            Err(_) => return,
        }
    }
}

/// The PROXY protocol header (v1 text, v2 binary) a gateway writes before the ClientHello.
pub fn proxy_header(data: &[u8]) {
    for accept in [Accept::V1, Accept::V2, Accept::Any] {
        let mut rest = data;
        let _ = read_slice(&mut rest, accept);
        // Never past a header: v2's 16 bytes and its body, or v1's 107.
        assert!(data.len() - rest.len() <= 16 + 1024);
    }
}

/// An app's outbound request head: the routing headers (`x-dstack-target-*`), a CONNECT
/// authority, and the gateway and static-route settings that resolve the target.
pub fn routing_headers(data: &[u8]) {
    let mut parts = parts(data);
    let head = parts.next().unwrap_or_default();
    let setting = text(parts.next().unwrap_or_default()).into_owned();
    let mut map = headers(head);
    let target = Target::from_headers(&map);
    strip_routing_headers(&mut map);
    let first = text(head.split(|b| *b == b'\n').next().unwrap_or_default()).into_owned();
    let connect = Target::from_connect_authority(first.trim());
    let _ = HostPort::from_str(&setting);
    let _ = RouteKey::from_str(&setting);
    if let Ok(setting) = GatewaySetting::from_str(&setting) {
        let addressing = Addressing::from_setting(&setting, Some(443));
        for target in [target.ok().flatten(), connect.ok()].into_iter().flatten() {
            let _ = addressing.route(&target);
        }
    }
}

/// The headers nginx's `auth_request` passes (`X-SSL-Client-Verify`, the escaped PEM of
/// `$ssl_client_escaped_cert`) and the decision on them, against the chain's own root.
pub fn auth_request(data: &[u8]) {
    let mut parts = parts(data);
    let verify = text(parts.next().unwrap_or_default()).into_owned();
    let cert = text(parts.next().unwrap_or_default()).into_owned();
    let _ = nginx_compat::auth_request::unescape(&cert);
    let certs = nginx_compat::auth_request::client_certs(Some(&cert));
    let root = certs.ok().and_then(|c| c.last().cloned());
    let anchors = root.and_then(|r| ratls::TrustAnchors::new(&[r]).ok());
    if let Some(anchors) = anchors {
        let auth = crate::auth::AuthService::new(
            std::sync::Arc::new(ratls::Policy::new(anchors)),
            crate::auth::NginxProof::Loopback,
        );
        for vouch in [crate::auth::Vouch::Nginx, crate::auth::Vouch::Nobody] {
            let _ = auth.decide(Some(&verify), Some(&cert), vouch);
        }
    } else {
        let _ = nginx_compat::auth_request::ClientVerify::parse(Some(&verify));
    }
}

/// A configuration file (TOML) with no environment.
pub fn config_toml(data: &[u8]) {
    let env: HashMap<String, String> = HashMap::new();
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::config::Config::from_toml(text, &env);
    }
}

/// The environment alone (`KEY=value` lines): dstack-mesh's, dstack-vpc's and dstack-ingress's
/// variables, with an empty file.
pub fn config_env(data: &[u8]) {
    let env: HashMap<String, String> = text(data)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let _ = crate::config::Config::from_toml("", &env);
}

/// A DNS server's answer: to a query, to an SOA lookup, and to a TSIG-signed update (whose
/// signature must verify for a success to count).
pub fn dns_message(data: &[u8]) {
    let server: SocketAddr = ([127, 0, 0, 1], 53).into();
    if let Ok(reply) = hickory_proto::op::Message::from_vec(data) {
        let _ = wire::read_answer(&reply);
        let _ = wire::read_soa_reply(server, "_acme-challenge.example.com", &reply);
    }
    let signer = hickory_proto::rr::TSigner::new(
        b"0123456789abcdef0123456789abcdef".to_vec(),
        hickory_proto::rr::rdata::tsig::TsigAlgorithm::HmacSha256,
        hickory_proto::rr::Name::from_ascii("fuzz-key.").unwrap_or_default(),
        300,
    );
    if let Ok(signer) = signer {
        let mut msg = hickory_proto::op::Message::new(
            0x1234,
            hickory_proto::op::MessageType::Query,
            hickory_proto::op::OpCode::Update,
        );
        // The time the seed replies were signed at, so a valid signature can verify.
        if let Ok(mut verifier) = msg.finalize(&signer, 1_780_000_000) {
            let _ = wire::read_update_reply(server, data, verifier.as_mut());
        }
    }
}

/// CAA: an `issue` value as the operator writes it, and a record set as a resolver or a
/// provider returns it (one `flags tag "value"` per line), evaluated for a CA.
pub fn caa_records(data: &[u8]) {
    let input = text(data);
    let mut lines = input.lines();
    if let Some(first) = lines.next() {
        if let Ok(v) = caa::IssueValue::parse(first) {
            let _ = v.render();
        }
    }
    let set: Vec<Record> = input
        .lines()
        .filter_map(|l| doh::caa(l).or_else(|| dns01::rest::parse_presentation("CAA", l)))
        .map(|data| Record {
            name: "example.com".into(),
            data,
            ttl: 300,
            id: None,
        })
        .collect();
    let identities = ["letsencrypt.org".to_owned()];
    for method in ["dns-01", "http-01", "tls-alpn-01"] {
        let req = caa::Request {
            identities: &identities,
            account: Some("https://acme.example/acct/1"),
            method,
        };
        let _ = caa::evaluate("www.example.com", &set, &req);
        let _ = caa::evaluate("*.example.com", &set, &req);
    }
    for d in set.iter().map(|r| &r.data) {
        if let Data::Caa { .. } = d {
            let _ = dns01::rest::presentation(d);
        }
    }
}

/// A DNS-over-HTTPS resolver's JSON answer (`application/dns-json`).
pub fn doh_answer(data: &[u8]) {
    let _ = doh::parse(data);
}

/// A DNS provider's API answer; the first byte picks the provider.
pub fn dns_provider(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let readers: [fn(&[u8]); 9] = [
        dns01::cloudflare::read_answer,
        dns01::digitalocean::read_answer,
        dns01::hetzner::read_answer,
        dns01::linode::read_answer,
        dns01::porkbun::read_answer,
        dns01::gcloud::read_answer,
        dns01::ovh::read_answer,
        dns01::route53::read_answer,
        dns01::namecheap::read_answer,
    ];
    readers[usize::from(which) % readers.len()](body);
}

/// An ACME server's answers the sidecar reads itself: a problem document, the directory's
/// metadata, a `renewalInfo` window; and a revocation reason as the operator gives it.
pub fn acme_answer(data: &[u8]) {
    let _ = crate::acme::eab::problem(data).to_string();
    if let Ok(dir) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = crate::acme::ari::DirectoryMeta::read(&dir);
    }
    if let Ok(w) = crate::acme::ari::window(data) {
        let _ = (w.start_time(), w.end_time());
    }
    // A `Retry-After` header: seconds or an HTTP date.
    let _ = crate::acme::ari::retry_after(
        Some(&text(data)),
        std::time::SystemTime::now(),
        std::time::Duration::from_secs(60),
    );
    let _ = crate::acme::revoke::Reason::from_str(&text(data));
}

/// Evidence files fetched from a domain: `sha256sum.txt`, `quote.json`, then the files it
/// lists, in that order, separated by `\0`.
pub fn evidence(data: &[u8]) {
    let files: Vec<&[u8]> = parts(data).collect();
    let sums = files.first().copied().unwrap_or_default();
    let listed = crate::acme::evidence::parse_sums(&text(sums));
    let mut get = |name: &str| -> Result<Vec<u8>, String> {
        let at = match name {
            crate::acme::evidence::SUMS => 0,
            crate::acme::evidence::QUOTE => 1,
            _ => {
                2 + listed
                    .iter()
                    .position(|(_, n)| n == name)
                    .unwrap_or(usize::MAX - 2)
            }
        };
        files
            .get(at)
            .map(|f| f.to_vec())
            .ok_or_else(|| "not found".to_owned())
    };
    let _ = crate::acme::evidence::verify(&mut get, None);
}

/// What the admin and registry listeners read from a request: the path and query (certificate
/// actions, the agent pass-through's method), and a node's registration body.
pub fn admin_input(data: &[u8]) {
    let mut parts = parts(data);
    let target = parts.next().unwrap_or_default();
    let body = parts.next().unwrap_or_default();
    if let Ok(uri) = http::Uri::try_from(target) {
        let _ = crate::admin::revoke_target(&uri);
        let _ = crate::admin::renew_target(uri.path());
        let _ = crate::registry::Registry::serves(uri.path());
        let _ = crate::outbound::agent::parse(uri.path());
        let _ = crate::registry::parse_update(uri.query().unwrap_or_default(), body);
    }
}

/// What the store holds and another replica may have written: a certificate and its key, a
/// sealed value, a published challenge, the kept ARI state. `\0` separates chain, key and
/// the rest.
pub fn stored_state(data: &[u8]) {
    let mut parts = parts(data);
    let chain = parts.next().unwrap_or_default();
    let key = parts.next().unwrap_or_default();
    let rest = parts.next().unwrap_or_default();
    let _ = crate::acme::cert::load(chain, key, &["example.com".to_owned()]);
    let _ = crate::acme::cert::leaf_summary(chain);
    let sealer = crate::acme::seal::Sealer::from_secret(b"fuzz");
    let _ = sealer.open(crate::acme::seal::Kind::Certificate, "example.com", rest);
    if let Ok(response) = serde_json::from_slice::<crate::acme::challenge::Response>(rest) {
        let challenges = crate::acme::challenge::Challenges::default();
        if challenges.apply(&response).is_ok() {
            challenges.forget(&response);
        }
    }
    let _ = crate::acme::renewal::read_stored_ari(rest);
}

/// Run the target called `name` on `data` (what each `fuzz/fuzz_targets/<name>.rs` does).
///
/// # Panics
/// When no target has that name: a fuzz target file out of step with [`TARGETS`].
pub fn run(name: &str, data: &[u8]) {
    let Some((_, entry)) = TARGETS.iter().find(|(n, _)| *n == name) else {
        panic!("no fuzz target {name:?} in dstack_mesh::fuzz::TARGETS");
    };
    entry(data);
}
