//! Writes the seed inputs of every fuzz target into `<dir>/<target>/seed-*`, from the in-repo
//! fixtures (the simulator's certificates and agent answers, the mock PCCS, the deploy
//! configurations) and from messages built the way real peers build them (rustls
//! ClientHellos, PROXY headers, DNS answers). `scripts/fuzz` runs it before a campaign; the
//! seeds are committed with the corpora.
//!
//! `cargo run -p dstack-mesh --example fuzz_seeds -- fuzz/seeds`

#![allow(clippy::unwrap_used, clippy::expect_used)] // a tool run by hand: a failed unwrap says what

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{rdata, Name, RData, Record, RecordType},
};

fn main() {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .expect("usage: fuzz_seeds <corpus dir>"),
    );
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let seeds = seeds(&root);
    for (target, inputs) in &seeds {
        let dir = out.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (i, input) in inputs.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:03}")), input).unwrap();
        }
    }
    let total: usize = seeds.values().map(Vec::len).sum();
    println!(
        "{total} seeds for {} targets in {}",
        seeds.len(),
        out.display()
    );
}

fn read(path: impl AsRef<Path>) -> Vec<u8> {
    let path = path.as_ref();
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn joined(parts: &[&[u8]]) -> Vec<u8> {
    parts.join(&0u8)
}

fn seeds(root: &Path) -> BTreeMap<&'static str, Vec<Vec<u8>>> {
    let sim = root.join("testdata/dstack-sim");
    let mut s: BTreeMap<&'static str, Vec<Vec<u8>>> = BTreeMap::new();
    let mut add = |target: &'static str, input: Vec<u8>| s.entry(target).or_default().push(input);

    // Certificates and their dstack extensions.
    let mut cert_dirs: Vec<PathBuf> = std::fs::read_dir(sim.join("certs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    cert_dirs.sort();
    let mut chains = Vec::new();
    for dir in &cert_dirs {
        let pem = read(dir.join("chain.pem"));
        let chain = ratls::cert::parse_chain(&pem).unwrap();
        add("certificate", pem.clone());
        add("certificate", chain[0].to_vec());
        add(
            "certificate",
            chain.iter().flat_map(|c| c.to_vec()).collect(),
        );
        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        for ext in leaf.extensions() {
            let oid: Vec<u64> = ext.oid.iter().map(|i| i.collect()).unwrap_or_default();
            let selector = match oid.as_slice() {
                o if o == ratls::ext::oid::APP_ID => 0,
                o if o == ratls::ext::oid::CERT_USAGE => 1,
                o if o == ratls::ext::oid::APP_INFO => 2,
                o if o == ratls::ext::oid::ATTESTATION => 3,
                _ => continue,
            };
            add("ra_tls_extension", [&[selector][..], ext.value].concat());
            let (_, inner) = der_octet_string(ext.value);
            match selector {
                2 => add("app_info", inner.to_vec()),
                3 => add("attestation", inner.to_vec()),
                _ => {}
            }
        }
        chains.push(pem);
    }

    // Guest-agent answers, as captured from the simulator.
    let info = read(sim.join("api/app1/info_get.json"));
    for app in ["app1", "app1-signed", "app2", "tappd"] {
        let dir = sim.join("api").join(app);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
        files.sort();
        for f in files
            .iter()
            .filter(|f| f.extension().is_some_and(|e| e == "json"))
        {
            let body = read(f);
            if f.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("tlskey")
            {
                add("agent_response", joined(&[&body, &info]));
            }
            if let Ok(q) = serde_json::from_slice::<ratls::agent::QuoteResponse>(&body) {
                if !q.event_log.is_empty() {
                    add("attestation", q.event_log.into_bytes());
                }
            }
            add("agent_response", body);
        }
    }
    let pccs = sim.join("mock-pccs");
    let chain_header = std::fs::read_to_string(pccs.join("qe_identity.json.headers"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.to_ascii_lowercase().contains("issuer-chain"))
        })
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default();
    add(
        "pccs_collateral",
        joined(&[
            &read(pccs.join("tcb.json")),
            &read(pccs.join("qe_identity.json")),
        ]),
    );
    add(
        "pccs_collateral",
        joined(&[&read(pccs.join("tcb.json")), chain_header.as_bytes()]),
    );

    // ClientHellos as rustls sends them: mesh (no public name), a public domain over h2, a
    // TLS-ALPN-01 validation.
    for (name, alpn) in [
        ("mesh.internal", vec![b"h2".to_vec(), b"http/1.1".to_vec()]),
        ("www.example.com", vec![b"h2".to_vec()]),
        ("challenge.example.com", vec![b"acme-tls/1".to_vec()]),
        ("127.0.0.1", vec![]),
    ] {
        add("client_hello", client_hello(name, alpn));
    }
    let hello = client_hello("www.example.com", vec![b"http/1.1".to_vec()]);

    // PROXY headers as a gateway writes them, with the ClientHello behind.
    add(
        "proxy_header",
        [&b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 443\r\n"[..], &hello].concat(),
    );
    add(
        "proxy_header",
        b"PROXY TCP6 2001:db8::7 2001:db8::1 51000 443\r\n".to_vec(),
    );
    add("proxy_header", b"PROXY UNKNOWN\r\n".to_vec());
    let v2 = ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (
            "[2001:db8::7]:51000"
                .parse::<std::net::SocketAddr>()
                .unwrap(),
            "[2001:db8::1]:443".parse::<std::net::SocketAddr>().unwrap(),
        ),
    )
    .write_tlv(ppp::v2::Type::Authority, b"www.example.com")
    .unwrap()
    .build()
    .unwrap();
    add("proxy_header", [v2, hello].concat());

    // Outbound request heads and gateway settings.
    for (head, setting) in [
        ("x-dstack-target-app: 6b4d5b7e1c2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b\nx-dstack-target-port: 8080\nhost: b.internal", "gateway.example.com:443"),
        ("x-dstack-target-app: 6b4d5b7e1c2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b\nx-dstack-target-instance: 0123456789abcdef0123456789abcdef01234567\nx-dstack-target-port: 443\nx-dstack-target-transport: tls", "6b4d5b7e1c2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b:8080=10.0.0.2:8443"),
        ("6b4d5b7e1c2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b-8080s.gateway.example.com:443", "direct"),
        ("x-dstack-target-app: zz\nx-dstack-target-port: 99999", "[::1]:8443"),
    ] {
        add("routing_headers", joined(&[head.as_bytes(), setting.as_bytes()]));
    }

    // auth_request headers from nginx: the escaped PEM of each chain.
    for pem in &chains {
        let escaped = nginx_compat::auth_request::escape(&String::from_utf8_lossy(pem));
        add("auth_request", joined(&[b"SUCCESS", escaped.as_bytes()]));
    }
    add(
        "auth_request",
        joined(&[b"FAILED:certificate has expired", b""]),
    );
    add(
        "auth_request",
        joined(&[b"NONE", b"-----BEGIN%20CERTIFICATE-----%0A"]),
    );

    // Configuration: the deploy examples and the variables of dstack-vpc and dstack-ingress.
    for f in [
        "deploy/mesh/dstack-mesh.toml",
        "deploy/database/app-mesh.toml",
        "deploy/database/redis-mesh.toml",
    ] {
        add("config_toml", read(root.join(f)));
    }
    add("config_toml", b"[inbound]\nlisten = \"0.0.0.0:8443\"\nallow = [\"*\"]\n[[inbound.domains]]\nname = \"app.example.com\"\nbackend = \"127.0.0.1:8080\"\nmode = \"http\"\n[acme]\ndirectory = \"https://acme.example/dir\"\nemail = \"ops@example.com\"\n[acme.dns]\nprovider = \"cloudflare\"\n".to_vec());
    add("config_env", b"DOMAIN=app.example.com\nTARGET_ENDPOINT=http://app:8080\nGATEWAY_DOMAIN=_.dstack-prod5.phala.network\nCERTBOT_EMAIL=ops@example.com\nDNS_PROVIDER=cloudflare\nCLOUDFLARE_API_TOKEN=token\nSET_CAA=true\nCHALLENGE_TYPE=dns-01\n".to_vec());
    add("config_env", b"DOMAINS=a.example.com\\nb.example.com\nROUTING_MAP=a.example.com=app:80\\nb.example.com=api:81\nDNS_SETUP_MODE=webhook\nDNS_WEBHOOK_URL=https://hooks.example/dns\nDNS_WEBHOOK_TOKEN=secret\nDOH_RESOLVERS=https://1.1.1.1/dns-query\nRENEW_DAYS_BEFORE=30\nMAXCONN=4096\nTIMEOUT_CLIENT=30s\nPROXY_PROTOCOL=true\n".to_vec());
    add("config_env", b"DSTACK_MESH_ALLOW=*\nMESH_BACKEND=127.0.0.1:8080\nVPC_SERVER_APP_ID=6b4d5b7e1c2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b\nDSTACK_GATEWAY_DOMAIN=gateway.example.com\n".to_vec());

    // DNS answers: TXT (with a CNAME on the way), an SOA in the authority section, a refused
    // update with a TSIG error.
    add("dns_message", dns_answer());
    add("dns_message", dns_soa());
    add("dns_message", dns_refused());

    for text in [
        "letsencrypt.org\n0 issue \"letsencrypt.org\"\n0 issuewild \";\"",
        "letsencrypt.org; accounturi=https://acme.example/acct/1; validationmethods=dns-01\n0 issue \"letsencrypt.org; accounturi=https://acme.example/acct/1; validationmethods=dns-01\"\n128 tbs \"unknown\"",
        "pki.goog\n0 iodef \"mailto:security@example.com\"\n0 issue \"pki.goog\"",
    ] {
        add("caa", text.as_bytes().to_vec());
    }
    add("doh_answer", br#"{"Status":0,"TC":false,"RD":true,"RA":true,"AD":false,"CD":false,"Question":[{"name":"_acme-challenge.example.com.","type":16}],"Answer":[{"name":"_acme-challenge.example.com.","type":5,"TTL":300,"data":"example.acme-delegation.net."},{"name":"example.acme-delegation.net.","type":16,"TTL":60,"data":"\"gfj9Xq...Rg85nM\""}]}"#.to_vec());
    add("doh_answer", br#"{"Status":0,"Answer":[{"name":"example.com.","type":257,"TTL":3600,"data":"0 issue \"letsencrypt.org\""}]}"#.to_vec());
    add("doh_answer", br#"{"Status":3,"Authority":[{"name":"example.com.","type":6,"TTL":1800,"data":"ns1.example.com. hostmaster.example.com. 1 7200 900 1209600 86400"}]}"#.to_vec());

    for (which, body) in [
        (
            0u8,
            r#"{"success":true,"errors":[],"result":[{"id":"372e6795","name":"_acme-challenge.www.example.com","type":"TXT","content":"\"abc\"","ttl":120},{"id":"1","name":"example.com","type":"CAA","data":{"flags":128,"tag":"issue","value":"letsencrypt.org"}}],"result_info":{"page":1,"total_pages":1}}"#,
        ),
        (
            0,
            r#"{"success":false,"errors":[{"code":10000,"message":"Authentication error"}]}"#,
        ),
        (
            1,
            r#"{"domain_records":[{"id":28448433,"type":"TXT","name":"_acme-challenge.www","data":"abc","ttl":30},{"id":2,"type":"CAA","name":"@","data":"letsencrypt.org","flags":0,"tag":"issue","ttl":3600}],"links":{},"meta":{"total":2}}"#,
        ),
        (
            2,
            r#"{"rrsets":[{"id":"www/TXT","name":"_acme-challenge.www","type":"TXT","ttl":60,"records":[{"value":"\"abc\""}]},{"name":"@","type":"CAA","records":[{"value":"0 issue \"letsencrypt.org\""}]}],"meta":{"pagination":{"page":1,"last_page":1}}}"#,
        ),
        (
            3,
            r#"{"data":[{"id":123,"type":"TXT","name":"_acme-challenge.www","target":"abc","ttl_sec":300},{"id":2,"type":"CAA","name":"","target":"letsencrypt.org","tag":"issue"}],"page":1,"pages":1}"#,
        ),
        (
            3,
            r#"{"errors":[{"field":"target","reason":"Invalid target"}]}"#,
        ),
        (
            4,
            r#"{"status":"SUCCESS","records":[{"id":"106926659","name":"_acme-challenge.www.example.com","type":"TXT","content":"abc","ttl":"600","prio":"0","notes":""}]}"#,
        ),
        (
            5,
            r#"{"rrsets":[{"name":"_acme-challenge.www.example.com.","type":"TXT","ttl":60,"rrdatas":["\"abc\""]}],"error":{"code":412,"message":"Precondition not met","errors":[{"reason":"conditionNotMet"}]}}"#,
        ),
        (
            6,
            r#"{"id":5,"fieldType":"CAA","subDomain":"","target":"0 issue \"letsencrypt.org\"","ttl":0,"zone":"example.com"}"#,
        ),
        (
            7,
            r#"<?xml version="1.0"?><ListResourceRecordSetsResponse xmlns="https://route53.amazonaws.com/doc/2013-04-01/"><ResourceRecordSets><ResourceRecordSet><Name>_acme-challenge.www.example.com.</Name><Type>TXT</Type><TTL>60</TTL><ResourceRecords><ResourceRecord><Value>"abc"</Value></ResourceRecord></ResourceRecords></ResourceRecordSet></ResourceRecordSets><IsTruncated>false</IsTruncated></ListResourceRecordSetsResponse>"#,
        ),
        (
            7,
            r#"<ErrorResponse><Error><Type>Sender</Type><Code>InvalidChangeBatch</Code><Message>Tried to delete resource record set but it was not found</Message></Error></ErrorResponse>"#,
        ),
        (
            8,
            r#"<?xml version="1.0" encoding="utf-8"?><ApiResponse Status="OK" xmlns="http://api.namecheap.com/xml.response"><CommandResponse Type="namecheap.domains.dns.getHosts"><DomainDNSGetHostsResult Domain="example.com" EmailType="MX" IsUsingOurDNS="true"><host HostId="1" Name="_acme-challenge" Type="TXT" Address="abc" MXPref="10" TTL="60"/><host HostId="2" Name="@" Type="CAA" Address="0 issue &quot;letsencrypt.org&quot;" MXPref="10" TTL="1800"/></DomainDNSGetHostsResult></CommandResponse></ApiResponse>"#,
        ),
    ] {
        add("dns_provider", [&[which][..], body.as_bytes()].concat());
    }

    for body in [
        r#"{"type":"urn:ietf:params:acme:error:rateLimited","detail":"too many new orders recently","status":429}"#,
        r#"{"type":"urn:ietf:params:acme:error:unauthorized","detail":"Incorrect TXT record","status":403,"subproblems":[{"type":"urn:ietf:params:acme:error:caa","detail":"CAA forbids","identifier":{"type":"dns","value":"example.com"}}]}"#,
        r#"{"newNonce":"https://acme.example/nonce","newAccount":"https://acme.example/acct","newOrder":"https://acme.example/order","renewalInfo":"https://acme.example/renewal-info","meta":{"termsOfService":"https://acme.example/tos","caaIdentities":["letsencrypt.org"],"externalAccountRequired":false,"profiles":{"classic":"","shortlived":"6 days","tlsserver":""}}}"#,
        r#"{"suggestedWindow":{"start":"2026-12-01T00:00:00Z","end":"2026-12-03T00:00:00Z"},"explanationURL":"https://acme.example/why"}"#,
        "keyCompromise",
        "Wed, 21 Oct 2026 07:28:00 GMT",
        "120",
    ] {
        add("acme_answer", body.as_bytes().to_vec());
    }

    // An evidence set: the sums, a GetQuote answer, the listed files.
    let quote = read(sim.join("api/app1/quote_post.json"));
    let account =
        br#"{"directory":"https://acme.example/dir","url":"https://acme.example/acct/1"}"#;
    let sums = format!(
        "{}  acme-account.json\n{}  quote.json\n",
        hex::encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            account
        )),
        hex::encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            &quote
        )),
    );
    add("evidence", joined(&[sums.as_bytes(), &quote, account]));

    for (target, body) in [
        ("/certs/app.example.com/revoke?reason=keyCompromise", ""),
        ("/certs/app.example.com/renew", ""),
        ("/evidences/sha256sum.txt", ""),
        ("/prpc/GetQuote?report_data=00", ""),
        (
            "/api/nodes?node_type=redis&uuid=r1&hostname=redis-1",
            r#"{"labels":{"role":"primary"},"ports":[{"name":"redis","port":6379}]}"#,
        ),
    ] {
        add("admin_input", joined(&[target.as_bytes(), body.as_bytes()]));
    }

    let key = serde_json::from_slice::<ratls::agent::TlsKeyResponse>(&read(
        sim.join("api/app1/tlskey_with_app_info.json"),
    ))
    .unwrap();
    let chain_pem = key.certificate_chain.concat();
    let sealer = dstack_mesh::acme::seal::Sealer::from_secret(b"fuzz");
    for rest in [
        br#"{"type":"tls-alpn01","name":"app.example.com","digest":"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"}"#.to_vec(),
        br#"{"type":"http01","token":"tok","key_authorization":"tok.thumb"}"#.to_vec(),
        br#"{"serial":"01ab","window":{"start":1780000000,"end":1780086400},"chosen":1780040000,"next_check":1780003600}"#.to_vec(),
        sealer.seal(dstack_mesh::acme::seal::Kind::Certificate, "example.com", chain_pem.as_bytes()).unwrap(),
    ] {
        add("stored_state", joined(&[chain_pem.as_bytes(), key.key.as_bytes(), &rest]));
    }
    s
}

/// The content of a DER OCTET STRING (short or long form length).
fn der_octet_string(der: &[u8]) -> (u8, &[u8]) {
    let first = der[1];
    let (len_bytes, len) = if first < 0x80 {
        (0, usize::from(first))
    } else {
        let n = usize::from(first & 0x7f);
        (
            n,
            der[2..2 + n]
                .iter()
                .fold(0usize, |a, b| (a << 8) | usize::from(*b)),
        )
    };
    let start = 2 + len_bytes;
    (der[0], &der[start..start + len])
}

fn client_hello(name: &str, alpn: Vec<Vec<u8>>) -> Vec<u8> {
    let mut config = rustls::ClientConfig::builder_with_provider(ratls::crypto::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = alpn;
    let server = rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), server).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

fn response(query: &str, rtype: RecordType, code: ResponseCode) -> Message {
    let mut m = Message::new(0x1234, MessageType::Response, OpCode::Query);
    m.metadata.response_code = code;
    m.add_query(Query::query(Name::from_ascii(query).unwrap(), rtype));
    m
}

fn dns_answer() -> Vec<u8> {
    let mut m = response(
        "_acme-challenge.www.example.com.",
        RecordType::TXT,
        ResponseCode::NoError,
    );
    let owner = Name::from_ascii("_acme-challenge.www.example.com.").unwrap();
    let delegated = Name::from_ascii("www.acme.example.net.").unwrap();
    m.add_answer(Record::from_rdata(
        owner,
        300,
        RData::CNAME(rdata::CNAME(delegated.clone())),
    ));
    m.add_answer(Record::from_rdata(
        delegated,
        60,
        RData::TXT(rdata::TXT::new(vec!["gfj9Xq-Rg85nM".into()])),
    ));
    m.to_vec().unwrap()
}

fn dns_soa() -> Vec<u8> {
    let mut m = response(
        "_acme-challenge.www.example.com.",
        RecordType::SOA,
        ResponseCode::NXDomain,
    );
    let zone = Name::from_ascii("example.com.").unwrap();
    let soa = rdata::SOA::new(
        Name::from_ascii("ns1.example.com.").unwrap(),
        Name::from_ascii("hostmaster.example.com.").unwrap(),
        1,
        7200,
        900,
        1_209_600,
        86_400,
    );
    m.add_authority(Record::from_rdata(zone, 1800, RData::SOA(soa)));
    m.to_vec().unwrap()
}

fn dns_refused() -> Vec<u8> {
    let mut m = Message::new(0x1234, MessageType::Response, OpCode::Update);
    m.metadata.response_code = ResponseCode::NotAuth;
    m.add_query(Query::query(
        Name::from_ascii("example.com.").unwrap(),
        RecordType::SOA,
    ));
    m.to_vec().unwrap()
}
