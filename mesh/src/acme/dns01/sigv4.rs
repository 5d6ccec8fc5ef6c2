//! AWS Signature Version 4 for the calls Route53 and STS take: the canonical request (path,
//! sorted and encoded query, lowercased sorted headers, the body's SHA-256), the string to sign
//! under the date/region/service scope, and the `Authorization` header. Session tokens are
//! signed like any `x-amz-*` header. Checked against AWS's signing test suite.

use std::time::SystemTime;

use aws_lc_rs::{digest, hmac};

/// An access key pair, with the session token temporary credentials carry.
#[derive(Clone)]
pub struct Credentials {
    /// `AKIA…` or `ASIA…`.
    pub access_key: String,
    /// The secret half.
    pub secret_key: String,
    /// The session token of temporary credentials.
    pub session_token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key", &self.access_key)
            .finish_non_exhaustive()
    }
}

/// Where a signature is valid: the region and service of its scope.
#[derive(Clone, Copy, Debug)]
pub struct Scope<'a> {
    /// `us-east-1` for Route53 and the global STS endpoint.
    pub region: &'a str,
    /// `route53`, `sts`.
    pub service: &'a str,
}

/// `s` percent-encoded as SigV4 wants: everything but `A-Za-z0-9-_.~`, upper-case hex.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(char::from(b))
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// `pairs` as a canonical (and wire) query string: each name and value encoded, sorted.
pub fn query(pairs: &[(&str, &str)]) -> String {
    let mut encoded: Vec<(String, String)> =
        pairs.iter().map(|(k, v)| (encode(k), encode(v))).collect();
    encoded.sort();
    encoded
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// `20150830T123600Z`.
pub fn amz_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let dt = time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap_or(0))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second()
    )
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, bytes))
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data)
        .as_ref()
        .to_vec()
}

/// One request to sign: `path` as sent (already encoded), `query` as [`query`] built it,
/// `headers` (name, value) including `host`.
#[derive(Debug)]
pub struct Request<'a> {
    /// `GET`, `POST`.
    pub method: &'a str,
    /// The absolute path.
    pub path: &'a str,
    /// The canonical query string.
    pub query: &'a str,
    /// Every header to sign, `host` among them.
    pub headers: &'a [(&'a str, &'a str)],
    /// The body.
    pub body: &'a [u8],
}

/// The canonical request and the signed-header list.
pub fn canonical(req: &Request<'_>) -> (String, String) {
    let mut headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.to_ascii_lowercase(),
                v.split_whitespace().collect::<Vec<_>>().join(" "),
            )
        })
        .collect();
    headers.sort();
    let canonical_headers: String = headers.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let signed = headers
        .iter()
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let path = if req.path.is_empty() { "/" } else { req.path };
    let text = format!(
        "{}\n{path}\n{}\n{canonical_headers}\n{signed}\n{}",
        req.method,
        req.query,
        sha256_hex(req.body)
    );
    (text, signed)
}

/// The signature of `canonical_request` at `date` (`YYYYMMDDTHHMMSSZ`) under `scope`.
pub fn signature(
    secret: &str,
    scope: Scope<'_>,
    date: &str,
    canonical_request: &str,
) -> (String, String) {
    let day = &date[..8.min(date.len())];
    let scope_text = format!("{day}/{}/{}/aws4_request", scope.region, scope.service);
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{date}\n{scope_text}\n{}",
        sha256_hex(canonical_request.as_bytes())
    );
    let k_date = hmac(format!("AWS4{secret}").as_bytes(), day.as_bytes());
    let k_region = hmac(&k_date, scope.region.as_bytes());
    let k_service = hmac(&k_region, scope.service.as_bytes());
    let k_signing = hmac(&k_service, b"aws4_request");
    (
        hex::encode(hmac(&k_signing, to_sign.as_bytes())),
        scope_text,
    )
}

/// The headers that sign `req` (which must already carry `host`, `x-amz-date` and, for
/// session credentials, `x-amz-security-token`): the `Authorization` value.
pub fn authorization(
    creds: &Credentials,
    scope: Scope<'_>,
    date: &str,
    req: &Request<'_>,
) -> String {
    let (canonical_request, signed) = canonical(req);
    let (sig, scope_text) = signature(&creds.secret_key, scope, date, &canonical_request);
    format!(
        "AWS4-HMAC-SHA256 Credential={}/{scope_text}, SignedHeaders={signed}, Signature={sig}",
        creds.access_key
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
    const SCOPE: Scope<'static> = Scope {
        region: "us-east-1",
        service: "service",
    };

    // aws-c-auth tests/aws-signing-test-suite/v4/get-vanilla.
    #[test]
    fn get_vanilla_matches_the_aws_test_suite() {
        let req = Request {
            method: "GET",
            path: "/",
            query: "",
            headers: &[
                ("Host", "example.amazonaws.com"),
                ("X-Amz-Date", "20150830T123600Z"),
            ],
            body: b"",
        };
        let (text, signed) = canonical(&req);
        assert_eq!(
            text,
            "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(signed, "host;x-amz-date");
        let creds = Credentials {
            access_key: "AKIDEXAMPLE".into(),
            secret_key: SECRET.into(),
            session_token: None,
        };
        assert_eq!(
            authorization(&creds, SCOPE, "20150830T123600Z", &req),
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
        );
    }

    // aws-c-auth tests/aws-signing-test-suite/v4/get-vanilla-with-session-token.
    #[test]
    fn a_session_token_is_signed() {
        let token = "6e86291e8372ff2a2260956d9b8aae1d763fbf315fa00fa31553b73ebf194267";
        let req = Request {
            method: "GET",
            path: "/",
            query: "",
            headers: &[
                ("Host", "example.amazonaws.com"),
                ("X-Amz-Date", "20150830T123600Z"),
                ("X-Amz-Security-Token", token),
            ],
            body: b"",
        };
        let (text, _) = canonical(&req);
        assert_eq!(
            sha256_hex(text.as_bytes()),
            "067b36aa60031588cea4a4cde1f21215227a047690c72247f1d70b32fbbfad2b"
        );
        let (sig, _) = signature(SECRET, SCOPE, "20150830T123600Z", &text);
        assert_eq!(
            sig,
            "07ec1639c89043aa0e3e2de82b96708f198cceab042d4a97044c66dd9f74e7f8"
        );
    }

    #[test]
    fn queries_are_encoded_and_sorted_and_dates_formatted() {
        assert_eq!(
            query(&[
                ("type", "TXT"),
                ("name", "_acme-challenge.*.example.com."),
                ("a b", "c/d")
            ]),
            "a%20b=c%2Fd&name=_acme-challenge.%2A.example.com.&type=TXT"
        );
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_440_938_160);
        assert_eq!(amz_date(t), "20150830T123600Z");
    }
}
