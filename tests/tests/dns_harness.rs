//! The DNS-01 harness itself: BIND serves its zones and takes updates signed with its TSIG key
//! only, and the Cloudflare stand-in speaks the v4 API (token, paging, record lifecycle,
//! conflicts, injected failures) and mirrors `_acme-challenge.` TXT records into challtestsrv.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::Command,
    time::Duration,
};

use e2e::{
    bind::{Bind, BindOptions, Tsig, Zone},
    cloudflare::CloudflareStandIn,
    free_port,
    pebble::{Pebble, PebbleOptions},
    program,
};
use serde_json::{json, Value};

const TOKEN: &str = "test-token-0123456789";

fn bind(dir: &std::path::Path) -> Bind {
    Bind::start(
        dir,
        BindOptions {
            zones: vec![
                Zone {
                    name: "example.test".to_owned(),
                    records: vec![
                        "www IN A 127.0.0.1".to_owned(),
                        r#"@ IN CAA 0 issue "other.example""#.to_owned(),
                    ],
                    read_only: false,
                },
                Zone {
                    name: "other.test".to_owned(),
                    records: Vec::new(),
                    read_only: false,
                },
            ],
            tsig: Tsig::generate("acme-update"),
        },
    )
}

#[test]
fn bind_serves_its_zones_and_applies_updates_signed_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let bind = bind(dir.path());

    assert!(bind.addr.ip().is_loopback());
    assert_eq!(bind.dig("www.example.test", "A"), ["127.0.0.1"]);
    assert_eq!(bind.dig("ns1.other.test", "A"), ["127.0.0.1"]);
    assert_eq!(
        bind.dig("example.test", "CAA"),
        [r#"0 issue "other.example""#]
    );
    assert!(bind.dig("nothing.example.test", "A").is_empty());
    assert_eq!(bind.serial("example.test"), 1);

    let name = "_acme-challenge.www.example.test";
    bind.nsupdate(&format!("update add {name}. 60 IN TXT \"token-1\""))
        .unwrap();
    assert_eq!(bind.dig(name, "TXT"), [r#""token-1""#]);
    assert_eq!(bind.serial("example.test"), 2);
    assert_eq!(
        bind.serial("other.test"),
        1,
        "only the updated zone changes"
    );

    bind.nsupdate(&format!(
        "update add {name}. 60 IN TXT \"token-2\"\nupdate delete {name}. TXT \"token-1\""
    ))
    .unwrap();
    assert_eq!(bind.dig(name, "TXT"), [r#""token-2""#]);
    assert_eq!(
        bind.serial("example.test"),
        3,
        "one update message, one serial"
    );

    // The right key name with another secret, and a key named nothing named knows.
    let mut wrong = bind.tsig.clone();
    wrong.secret = Tsig::generate("x").secret;
    let err = bind
        .nsupdate_with(&wrong, &format!("update add {name}. 60 IN TXT \"forged\""))
        .unwrap_err();
    assert!(err.contains("NOTAUTH") && err.contains("BADSIG"), "{err}");
    let err = bind
        .nsupdate_with(
            &Tsig::generate("stranger"),
            &format!("update add {name}. 60 IN TXT \"forged\""),
        )
        .unwrap_err();
    assert!(err.contains("BADKEY"), "{err}");
    assert_eq!(bind.dig(name, "TXT"), [r#""token-2""#]);
    assert_eq!(bind.serial("example.test"), 3);

    // The query log shows what was asked, for tests that check who looked.
    assert!(
        bind.log()
            .contains("query: _acme-challenge.www.example.test IN TXT"),
        "{}",
        bind.log()
    );
}

// Whether pebble validates through BIND shows in the DNS-01 tests; here, that it is told to.
#[test]
fn pebble_is_started_with_bind_as_its_resolver() {
    let dir = tempfile::tempdir().unwrap();
    let bind = bind(&dir.path().join("bind"));
    let _pebble = Pebble::start(
        &dir.path().join("pebble"),
        PebbleOptions {
            tls_port: free_port(),
            http_port: free_port(),
            dns_server: Some(bind.addr),
            ..PebbleOptions::default()
        },
    );
    // BIND's port is this test's alone, so a pebble with it in its arguments is ours.
    let wanted = format!("-dnsserver\0{}\0", bind.addr);
    let ours = std::fs::read_dir("/proc").unwrap().flatten().any(|p| {
        std::fs::read(p.path().join("cmdline")).is_ok_and(|c| {
            let c = String::from_utf8_lossy(&c);
            c.split('\0')
                .next()
                .is_some_and(|exe| exe.ends_with("/pebble"))
                && c.contains(&wanted)
        })
    });
    assert!(ours, "no pebble process with {wanted:?}");
}

// One HTTP/1.1 request to the stand-in; the status and the body as JSON.
fn call(
    cf: &CloudflareStandIn,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> (u16, Value) {
    let url: http::Uri = format!("{}{path}", cf.base).parse().unwrap();
    let authority = url.authority().unwrap().as_str().to_owned();
    let addr: SocketAddr = authority.parse().unwrap();
    let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = format!(
        "{method} {} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n",
        url.path_and_query().unwrap()
    );
    if let Some(token) = token {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    let body = body.map(Value::to_string).unwrap_or_default();
    if !body.is_empty() {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    tcp.write_all(format!("{head}\r\n{body}").as_bytes())
        .unwrap();
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap())
}

fn api(cf: &CloudflareStandIn, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    call(cf, method, path, Some(TOKEN), body.as_ref())
}

fn error_code(reply: &Value) -> u64 {
    assert_eq!(reply["success"], false, "{reply}");
    assert_eq!(reply["result"], Value::Null, "{reply}");
    reply["errors"][0]["code"].as_u64().unwrap()
}

#[test]
fn cloudflare_refuses_requests_without_the_token() {
    let cf = CloudflareStandIn::start(TOKEN, &["example.test"], None);
    assert!(cf.base.starts_with("http://127.0.0.1:"), "{}", cf.base);
    assert!(cf.base.ends_with("/client/v4"), "{}", cf.base);

    let refused = json!({
        "success": false,
        "errors": [{"code": 10000, "message": "Authentication error"}],
        "messages": [],
        "result": null,
    });
    assert_eq!(
        call(&cf, "GET", "/zones", None, None),
        (403, refused.clone())
    );
    assert_eq!(
        call(&cf, "GET", "/zones", Some("wrong"), None),
        (403, refused)
    );
    let (status, zones) = api(&cf, "GET", "/zones", None);
    assert_eq!(status, 200, "{zones}");
    assert_eq!(zones["success"], true);

    let requests = cf.requests();
    let seen: Vec<_> = requests
        .iter()
        .map(|r| {
            (
                r.method.as_str(),
                r.path.as_str(),
                r.authorization.as_deref(),
            )
        })
        .collect();
    let bearer = format!("Bearer {TOKEN}");
    assert_eq!(
        seen,
        [
            ("GET", "/client/v4/zones", None),
            ("GET", "/client/v4/zones", Some("Bearer wrong")),
            ("GET", "/client/v4/zones", Some(bearer.as_str())),
        ]
    );
}

#[test]
fn cloudflare_pages_and_filters_zones() {
    let names = [
        "a.test", "b.test", "c.test", "d.test", "e.test", "f.test", "g.test",
    ];
    let cf = CloudflareStandIn::start(TOKEN, &names, None);

    let (_, first) = api(&cf, "GET", "/zones?per_page=5&page=1", None);
    let (_, second) = api(&cf, "GET", "/zones?per_page=5&page=2", None);
    assert_eq!(
        first["result_info"],
        json!({"page": 1, "per_page": 5, "count": 5, "total_count": 7, "total_pages": 2})
    );
    assert_eq!(second["result_info"]["count"], 2);
    let listed: Vec<&str> = [&first, &second]
        .iter()
        .flat_map(|r| r["result"].as_array().unwrap())
        .map(|z| z["name"].as_str().unwrap())
        .collect();
    assert_eq!(listed, names);

    // The default page holds them all; past the end is empty, not an error.
    let (_, all) = api(&cf, "GET", "/zones", None);
    assert_eq!(all["result_info"]["per_page"], 20);
    assert_eq!(all["result"].as_array().unwrap().len(), 7);
    let (status, past) = api(&cf, "GET", "/zones?page=9&per_page=5", None);
    assert_eq!(status, 200);
    assert_eq!(past["result"], json!([]));

    let (_, one) = api(&cf, "GET", "/zones?name=C.test&status=active", None);
    let zone = &one["result"][0];
    assert_eq!(one["result"].as_array().unwrap().len(), 1, "{one}");
    assert_eq!(zone["name"], "c.test");
    assert_eq!(zone["status"], "active");
    assert_eq!(zone["id"], cf.zone_id("c.test"));
    let id = zone["id"].as_str().unwrap();
    assert!(
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );
    let (_, none) = api(&cf, "GET", "/zones?name=sub.c.test", None);
    assert_eq!(none["result"], json!([]));
    assert_eq!(none["result_info"]["total_count"], 0);
}

#[test]
fn cloudflare_creates_lists_updates_and_deletes_txt_and_caa_records() {
    let cf = CloudflareStandIn::start(TOKEN, &["example.test"], None);
    let zone = cf.zone_id("example.test");
    let records = format!("/zones/{zone}/dns_records");
    let name = "_acme-challenge.www.example.test";

    let (status, created) = api(
        &cf,
        "POST",
        &records,
        Some(
            json!({"type": "TXT", "name": name, "content": "\"token-1\"", "ttl": 60,
                    "comment": "dstack-mesh"}),
        ),
    );
    assert_eq!(status, 200, "{created}");
    let txt = &created["result"];
    assert_eq!(txt["zone_id"], zone);
    assert_eq!(txt["zone_name"], "example.test");
    assert_eq!(txt["name"], name);
    assert_eq!(txt["type"], "TXT");
    assert_eq!(txt["content"], "\"token-1\"");
    assert_eq!(txt["ttl"], 60);
    assert_eq!(txt["proxied"], false);
    assert_eq!(txt["comment"], "dstack-mesh");
    assert!(txt.get("data").is_none(), "{txt}");
    let txt_id = txt["id"].as_str().unwrap().to_owned();

    // CAA from `data`; its content is the presentation form.
    let (status, created) = api(
        &cf,
        "POST",
        &records,
        Some(json!({"type": "CAA", "name": "example.test", "ttl": 1,
                    "data": {"flags": 0, "tag": "issue", "value": "ca.example"}})),
    );
    assert_eq!(status, 200, "{created}");
    let caa = &created["result"];
    assert_eq!(caa["content"], "0 issue \"ca.example\"");
    assert_eq!(
        caa["data"],
        json!({"flags": 0, "tag": "issue", "value": "ca.example"})
    );
    assert_eq!(caa["comment"], Value::Null);
    let caa_id = caa["id"].as_str().unwrap().to_owned();

    // Filters: exact name (any case), type.
    let (_, list) = api(
        &cf,
        "GET",
        &format!("{records}?type=TXT&name=_ACME-challenge.www.example.test"),
        None,
    );
    assert_eq!(list["result"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["result"][0]["id"], txt_id);
    assert_eq!(list["result_info"]["per_page"], 100);
    let (_, list) = api(
        &cf,
        "GET",
        &format!("{records}?name=www.example.test"),
        None,
    );
    assert_eq!(list["result"], json!([]), "a name filter is exact");
    let (_, list) = api(&cf, "GET", &format!("{records}?type=CAA"), None);
    assert_eq!(list["result"][0]["id"], caa_id);

    // PATCH changes the fields it names; PUT replaces them all.
    let (status, patched) = api(
        &cf,
        "PATCH",
        &format!("{records}/{txt_id}"),
        Some(json!({"content": "token-2"})),
    );
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["result"]["content"], "token-2");
    assert_eq!(patched["result"]["ttl"], 60);
    assert_eq!(patched["result"]["comment"], "dstack-mesh");
    let (status, put) = api(
        &cf,
        "PUT",
        &format!("{records}/{txt_id}"),
        Some(json!({"type": "TXT", "name": name, "content": "token-3"})),
    );
    assert_eq!(status, 200, "{put}");
    assert_eq!(put["result"]["content"], "token-3");
    assert_eq!(put["result"]["ttl"], 1);
    assert_eq!(put["result"]["comment"], Value::Null);
    let (status, put) = api(
        &cf,
        "PUT",
        &format!("{records}/{caa_id}"),
        Some(json!({"type": "CAA", "name": "example.test", "content": "128 issuewild \";\""})),
    );
    assert_eq!(status, 200, "{put}");
    assert_eq!(
        put["result"]["data"],
        json!({"flags": 128, "tag": "issuewild", "value": ";"})
    );
    assert_eq!(cf.records().len(), 2);

    let (status, deleted) = api(&cf, "DELETE", &format!("{records}/{txt_id}"), None);
    assert_eq!((status, &deleted["result"]), (200, &json!({"id": txt_id})));
    let (status, again) = api(&cf, "DELETE", &format!("{records}/{txt_id}"), None);
    assert_eq!((status, error_code(&again)), (404, 81044), "{again}");
    assert_eq!(again["errors"][0]["message"], "Record does not exist.");
    let remaining: Vec<Value> = cf.records().iter().map(|r| r["id"].clone()).collect();
    assert_eq!(remaining, [json!(caa_id)]);

    let (status, unknown) = api(&cf, "GET", "/zones/0123/dns_records", None);
    assert_eq!((status, error_code(&unknown)), (404, 7003), "{unknown}");
    assert_eq!(
        unknown["errors"][0]["message"],
        "Could not route to /zones/0123/dns_records, perhaps your object identifier is invalid?"
    );

    // Records outside the zone, unknown types and bad addresses are refused.
    for (body, code) in [
        (
            json!({"type": "TXT", "name": "x.other.test", "content": "x"}),
            1004,
        ),
        (
            json!({"type": "MX", "name": "example.test", "content": "mx.example.test"}),
            1004,
        ),
        (
            json!({"type": "A", "name": "a.example.test", "content": "::1"}),
            9005,
        ),
        (
            json!({"type": "TXT", "name": "t.example.test", "content": "x", "proxied": true}),
            9004,
        ),
    ] {
        let (status, refused) = api(&cf, "POST", &records, Some(body.clone()));
        assert_eq!(
            (status, error_code(&refused)),
            (400, code),
            "{body}: {refused}"
        );
    }
}

#[test]
fn cloudflare_refuses_cname_conflicts_and_identical_records() {
    let cf = CloudflareStandIn::start(TOKEN, &["example.test"], None);
    let records = format!("/zones/{}/dns_records", cf.zone_id("example.test"));
    let post = |body: Value| api(&cf, "POST", &records, Some(body));

    // Someone else's record, made outside the API.
    let seeded = cf.insert("example.test", "A", "www.example.test", "192.0.2.1");
    assert!(cf.requests().is_empty());
    assert_eq!(cf.records()[0]["id"], seeded);

    let (status, reply) =
        post(json!({"type": "CNAME", "name": "www.example.test", "content": "x.example"}));
    assert_eq!((status, error_code(&reply)), (400, 81053), "{reply}");
    assert_eq!(
        reply["errors"][0]["message"],
        "An A, AAAA, or CNAME record with that host already exists."
    );
    let (status, reply) =
        post(json!({"type": "CNAME", "name": "alias.example.test", "content": "x.example"}));
    assert_eq!(status, 200, "{reply}");
    let (status, reply) =
        post(json!({"type": "TXT", "name": "alias.example.test", "content": "v"}));
    assert_eq!((status, error_code(&reply)), (400, 81054), "{reply}");

    let txt = json!({"type": "TXT", "name": "_acme-challenge.example.test", "content": "v"});
    assert_eq!(post(txt.clone()).0, 200);
    let (status, reply) = post(txt);
    assert_eq!((status, error_code(&reply)), (400, 81058), "{reply}");
    assert_eq!(
        reply["errors"][0]["message"],
        "An identical record already exists."
    );
    // Another value at the same name is fine (one TXT per pending challenge).
    let (status, _) =
        post(json!({"type": "TXT", "name": "_acme-challenge.example.test", "content": "w"}));
    assert_eq!(status, 200);
    assert_eq!(cf.records().len(), 4);
}

#[test]
fn cloudflare_fails_on_demand() {
    let cf = CloudflareStandIn::start(TOKEN, &["example.test"], None);
    cf.fail_with(500);
    let (status, reply) = api(&cf, "GET", "/zones", None);
    assert_eq!((status, error_code(&reply)), (500, 10001), "{reply}");
    cf.fail_with(403);
    let (status, reply) = api(&cf, "GET", "/zones", None);
    assert_eq!((status, error_code(&reply)), (403, 10000), "{reply}");
    cf.fail_with(0);
    assert_eq!(api(&cf, "GET", "/zones", None).0, 200);
    assert_eq!(cf.requests().len(), 3, "failed requests are recorded too");
}

// challtestsrv's TXT answers for `name`, through dig.
fn challtestsrv_txt(pebble: &Pebble, name: &str) -> Vec<String> {
    let dns = pebble.challtestsrv_dns;
    let out = Command::new(program("dig"))
        .arg(format!("@{}", dns.ip()))
        .args(["-p", &dns.port().to_string(), "+short", name, "TXT"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut values: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    values.sort();
    values
}

#[test]
fn cloudflare_mirrors_acme_challenge_txt_records_into_challtestsrv() {
    let dir = tempfile::tempdir().unwrap();
    let pebble = Pebble::start(
        dir.path(),
        PebbleOptions {
            tls_port: free_port(),
            http_port: free_port(),
            ..PebbleOptions::default()
        },
    );
    let cf = CloudflareStandIn::start(
        TOKEN,
        &["example.test"],
        Some(pebble.challtestsrv_management.clone()),
    );
    let records = format!("/zones/{}/dns_records", cf.zone_id("example.test"));
    let name = "_acme-challenge.www.example.test";
    let create = |content: &str| {
        let body = json!({"type": "TXT", "name": name, "content": content});
        let (status, reply) = api(&cf, "POST", &records, Some(body));
        assert_eq!(status, 200, "{reply}");
        reply["result"]["id"].as_str().unwrap().to_owned()
    };

    // Quoted or not, challtestsrv gets the bare value; both values of the name answer.
    let first = create("\"token-1\"");
    let second = create("token-2");
    assert_eq!(
        challtestsrv_txt(&pebble, name),
        ["\"token-1\"", "\"token-2\""]
    );

    let (status, _) = api(
        &cf,
        "PATCH",
        &format!("{records}/{second}"),
        Some(json!({"content": "token-3"})),
    );
    assert_eq!(status, 200);
    assert_eq!(
        challtestsrv_txt(&pebble, name),
        ["\"token-1\"", "\"token-3\""]
    );

    assert_eq!(
        api(&cf, "DELETE", &format!("{records}/{first}"), None).0,
        200
    );
    assert_eq!(challtestsrv_txt(&pebble, name), ["\"token-3\""]);
    assert_eq!(
        api(&cf, "DELETE", &format!("{records}/{second}"), None).0,
        200
    );
    assert!(challtestsrv_txt(&pebble, name).is_empty());

    // Other TXT records stay out of challtestsrv.
    let (status, _) = api(
        &cf,
        "POST",
        &records,
        Some(json!({"type": "TXT", "name": "www.example.test", "content": "v=spf1 -all"})),
    );
    assert_eq!(status, 200);
    assert!(challtestsrv_txt(&pebble, "www.example.test").is_empty());
}
