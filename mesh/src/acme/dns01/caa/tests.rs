use super::*;

fn caa(tag: &str, value: &str) -> Record {
    Record {
        name: "example.com".into(),
        data: Data::Caa {
            critical: false,
            tag: tag.into(),
            value: value.into(),
        },
        ttl: 300,
        id: None,
    }
}

const ACCOUNT: &str = "https://ca.example/acct/1";

fn req(method: &'static str) -> Request<'static> {
    Request {
        identities: std::slice::from_ref(Box::leak(Box::new("letsencrypt.org".to_owned()))),
        account: Some(ACCOUNT),
        method,
    }
}

#[test]
fn issue_values_parse_and_render() {
    let v = IssueValue::parse("LetsEncrypt.org ; validationmethods=dns-01;accounturi=https://a/b")
        .unwrap();
    assert_eq!(v.domain, "letsencrypt.org");
    assert_eq!(v.param("validationmethods"), Some("dns-01"));
    assert_eq!(
        v.render(),
        "letsencrypt.org; validationmethods=dns-01; accounturi=https://a/b"
    );
    assert_eq!(IssueValue::parse(";").unwrap().domain, "");
    assert!(IssueValue::parse("ca.example; novalue").is_err());
}

#[test]
fn no_records_or_no_issue_tag_allows() {
    assert!(evaluate("example.com", &[], &req("dns-01")).is_ok());
    assert!(evaluate("example.com", &[caa("iodef", "mailto:a@b")], &req("dns-01")).is_ok());
}

#[test]
fn another_ca_is_named_in_the_error() {
    let e = evaluate(
        "example.com",
        &[caa("issue", "other-ca.example")],
        &req("dns-01"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("other-ca.example") && e.contains("another CA"),
        "{e}"
    );
    assert!(evaluate(
        "example.com",
        &[
            caa("issue", "other.example"),
            caa("issue", "letsencrypt.org")
        ],
        &req("dns-01")
    )
    .is_ok());
}

#[test]
fn method_and_account_pins_are_checked() {
    let set = [caa(
        "issue",
        &format!("letsencrypt.org; validationmethods=http-01; accounturi={ACCOUNT}"),
    )];
    let e = evaluate("example.com", &set, &req("dns-01")).unwrap_err();
    assert!(
        matches!(&e, Forbidden::Refused { refusals, .. } if matches!(refusals[0].why, Why::OtherMethod { .. })),
        "{e}"
    );
    assert!(e.to_string().contains("allows only http-01"), "{e}");
    assert!(evaluate("example.com", &set, &req("http-01")).is_ok());
    let other = [caa(
        "issue",
        "letsencrypt.org; accounturi=https://ca.example/acct/2",
    )];
    assert!(evaluate("example.com", &other, &req("dns-01"))
        .unwrap_err()
        .to_string()
        .contains("another ACME account"));
}

#[test]
fn wildcards_use_issuewild_when_present() {
    let set = [caa("issue", "letsencrypt.org"), caa("issuewild", ";")];
    assert!(evaluate("example.com", &set, &req("dns-01")).is_ok());
    assert!(evaluate("*.example.com", &set, &req("dns-01"))
        .unwrap_err()
        .to_string()
        .contains("forbids every CA"));
    // Without issuewild, issue governs wildcards too.
    assert!(evaluate("*.example.com", &set[..1], &req("dns-01")).is_ok());
}

#[test]
fn unknown_critical_tags_forbid() {
    let mut r = caa("future", "x");
    if let Data::Caa { critical, .. } = &mut r.data {
        *critical = true;
    }
    assert!(matches!(
        evaluate("example.com", &[r], &req("dns-01")),
        Err(Forbidden::UnknownCritical { .. })
    ));
}

#[test]
fn unknown_ca_identity_still_checks_method() {
    let r = Request {
        identities: &[],
        account: Some(ACCOUNT),
        method: "dns-01",
    };
    assert!(evaluate("example.com", &[caa("issue", "anything.example")], &r).is_ok());
    assert!(evaluate(
        "example.com",
        &[caa("issue", "x.example; validationmethods=tls-alpn-01")],
        &r
    )
    .is_err());
}
