//! The pebble harness itself: pebble answers ACME over HTTPS trusting the generated CA,
//! challtestsrv resolves every name to 127.0.0.1, and stop/restart behave as the ACME tests
//! expect (same URLs, new root, accounts forgotten, orders counted across restarts).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::net::{IpAddr, Ipv4Addr};

use aws_lc_rs::{
    rand::SystemRandom,
    signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING},
};
use dstack_mesh::base64url::encode as b64url;
use e2e::{
    free_port,
    pebble::{https, resolve, Pebble, PebbleOptions, Record, Reply},
};
use serde_json::{json, Value};

fn start(dir: &std::path::Path) -> Pebble {
    Pebble::start(
        dir,
        PebbleOptions {
            tls_port: free_port(),
            http_port: free_port(),
            ..PebbleOptions::default()
        },
    )
}

fn directory(pebble: &Pebble) -> Value {
    let reply = https(&pebble.ca_file, "GET", &pebble.directory, None).unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    serde_json::from_slice(&reply.body).unwrap()
}

#[test]
fn serves_acme_over_https_and_resolves_names_to_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let pebble = start(dir.path());

    assert!(pebble.directory.starts_with("https://127.0.0.1:"));
    assert!(pebble.directory.ends_with("/dir"));
    let directory = directory(&pebble);
    for key in ["newNonce", "newAccount", "newOrder"] {
        let url = directory[key].as_str().unwrap_or_default();
        assert!(url.starts_with("https://127.0.0.1:"), "{key}: {directory}");
    }

    // The issuance root is a CA of pebble's own, not the one its API certificate chains to.
    let root = pebble.issuance_root_pem();
    let view = ratls::cert::ChainView::from_bytes(root.as_bytes()).unwrap();
    assert_eq!(view.chain.len(), 1, "{root}");
    assert!(view.chain[0].is_ca);
    assert!(
        view.chain[0].subject.contains("Pebble Root CA"),
        "{}",
        view.chain[0].subject
    );
    assert_eq!(view.chain[0].subject, view.chain[0].issuer, "self-signed");
    let root_file = dir.path().join("issuance-root.pem");
    std::fs::write(&root_file, &root).unwrap();
    assert!(https(&root_file, "GET", &pebble.directory, None).is_err());

    // Every name is 127.0.0.1, nothing has an IPv6 address.
    let loopback = vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
    let dns = pebble.challtestsrv_dns;
    assert_eq!(resolve(dns, "a.example.test", Record::A).unwrap(), loopback);
    assert_eq!(
        resolve(dns, "b.c.dstack.test", Record::A).unwrap(),
        loopback
    );
    assert!(resolve(dns, "a.example.test", Record::Aaaa)
        .unwrap()
        .is_empty());

    // The management API changes answers.
    pebble.challtestsrv(
        "/add-a",
        &json!({"host": "moved.example.test", "addresses": ["127.0.0.2"]}),
    );
    assert_eq!(
        resolve(dns, "moved.example.test", Record::A).unwrap(),
        [IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))]
    );

    assert_eq!(pebble.orders_seen(), 0);
    assert_eq!(pebble.order_requests(), 0);
}

#[test]
fn restart_keeps_the_urls_but_forgets_accounts() {
    let dir = tempfile::tempdir().unwrap();
    let mut pebble = start(dir.path());
    let url = pebble.directory.clone();
    let root = pebble.issuance_root_pem();

    let account = Account::register(&pebble);
    let order = account.new_order(&pebble, "a.example.test");
    assert_eq!(order.status, 201, "{order:?}");
    assert_eq!(pebble.orders_seen(), 1);
    assert_eq!(pebble.order_requests(), 1);

    pebble.stop();
    assert!(https(&pebble.ca_file, "GET", &url, None).is_err());
    assert_eq!(
        resolve(pebble.challtestsrv_dns, "a.example.test", Record::A).unwrap(),
        [IpAddr::V4(Ipv4Addr::LOCALHOST)],
        "challtestsrv keeps running"
    );

    pebble.restart();
    assert_eq!(pebble.directory, url);
    assert!(directory(&pebble)["newOrder"].is_string());
    assert_ne!(
        pebble.issuance_root_pem(),
        root,
        "a new root on every launch"
    );

    let rejected = account.new_order(&pebble, "a.example.test");
    assert_eq!(rejected.status, 400, "{rejected:?}");
    let problem: Value = serde_json::from_slice(&rejected.body).unwrap();
    assert_eq!(
        problem["type"], "urn:ietf:params:acme:error:accountDoesNotExist",
        "{problem}"
    );
    assert_eq!(pebble.orders_seen(), 1, "a rejected request is no order");
    assert_eq!(pebble.order_requests(), 2);

    let order = Account::register(&pebble).new_order(&pebble, "a.example.test");
    assert_eq!(order.status, 201, "{order:?}");
    assert_eq!(pebble.orders_seen(), 2, "counted across restarts");
}

/// Just enough ACME (RFC 8555) to create an account and an order: ES256 JWS over the harness's
/// HTTPS client.
struct Account {
    key: EcdsaKeyPair,
    kid: Option<String>,
    rng: SystemRandom,
}

impl Account {
    fn register(pebble: &Pebble) -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
        let mut account = Self {
            key,
            kid: None,
            rng,
        };
        let url = directory(pebble)["newAccount"].as_str().unwrap().to_owned();
        let reply = account.post(pebble, &url, &json!({"termsOfServiceAgreed": true}));
        assert_eq!(reply.status, 201, "{reply:?}");
        account.kid = Some(reply.header("Location").unwrap().to_owned());
        account
    }

    fn new_order(&self, pebble: &Pebble, name: &str) -> Reply {
        let url = directory(pebble)["newOrder"].as_str().unwrap().to_owned();
        let order = json!({"identifiers": [{"type": "dns", "value": name}]});
        self.post(pebble, &url, &order)
    }

    fn post(&self, pebble: &Pebble, url: &str, payload: &Value) -> Reply {
        let new_nonce = directory(pebble)["newNonce"].as_str().unwrap().to_owned();
        let nonce = https(&pebble.ca_file, "HEAD", &new_nonce, None).unwrap();
        let mut protected = json!({
            "alg": "ES256",
            "nonce": nonce.header("Replay-Nonce").unwrap(),
            "url": url,
        });
        match &self.kid {
            Some(kid) => protected["kid"] = kid.as_str().into(),
            None => {
                // Uncompressed point: 0x04 || x || y.
                let point = self.key.public_key().as_ref();
                protected["jwk"] = json!({
                    "crv": "P-256",
                    "kty": "EC",
                    "x": b64url(&point[1..33]),
                    "y": b64url(&point[33..65]),
                });
            }
        }
        let protected = b64url(protected.to_string().as_bytes());
        let payload = b64url(payload.to_string().as_bytes());
        let signature = self
            .key
            .sign(&self.rng, format!("{protected}.{payload}").as_bytes())
            .unwrap();
        let jws = json!({
            "protected": protected,
            "payload": payload,
            "signature": b64url(signature.as_ref()),
        });
        https(
            &pebble.ca_file,
            "POST",
            url,
            Some(jws.to_string().as_bytes()),
        )
        .unwrap()
    }
}

#[test]
fn b64url_matches_rfc_4648() {
    assert_eq!(b64url(b""), "");
    assert_eq!(b64url(b"f"), "Zg");
    assert_eq!(b64url(b"fo"), "Zm8");
    assert_eq!(b64url(b"foo"), "Zm9v");
    assert_eq!(b64url(b"foob"), "Zm9vYg");
    assert_eq!(b64url(&[0xfb, 0xff]), "-_8");
}
