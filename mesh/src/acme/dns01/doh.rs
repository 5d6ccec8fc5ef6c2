//! DNS over HTTPS, the JSON API (Google's `/resolve`, Cloudflare's `/dns-query` with
//! `accept: application/dns-json`): how `DNS_SETUP_MODE` sees, as the public does, whether the
//! records the operator was asked for exist.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};

use super::{Data, Record, Rtype};

/// Deadline of one query (dstack-ingress's).
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer read.
const MAX_ANSWER: usize = 64 * 1024;

/// A DoH JSON client.
#[derive(Clone)]
pub struct Doh {
    client: Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        Empty<Bytes>,
    >,
}

impl std::fmt::Debug for Doh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Doh").finish_non_exhaustive()
    }
}

/// One resolver's answer: its DNS status and the records of the asked type (CNAMEs on the way
/// are kept: a gateway alias is one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The RCODE (0 NOERROR, 3 NXDOMAIN).
    pub status: u16,
    /// The records, as parsed.
    pub records: Vec<Record>,
}

/// The JSON API's shape.
#[derive(serde::Deserialize)]
struct Json {
    #[serde(rename = "Status")]
    status: u16,
    #[serde(rename = "Answer", default)]
    answer: Vec<JsonRecord>,
}

#[derive(serde::Deserialize)]
struct JsonRecord {
    name: String,
    #[serde(rename = "type")]
    rtype: u16,
    #[serde(default, rename = "TTL")]
    ttl: u32,
    data: String,
}

impl Doh {
    /// A client trusting the WebPKI roots (and plain http, for a resolver on loopback).
    pub fn new() -> Result<Self, crate::https::RootsError> {
        let tls = crate::https::client_config(&[])?;
        let connector = crate::https::connector(tls, crate::https::dialer(QUERY_TIMEOUT));
        Ok(Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
        })
    }

    /// `name`'s `rtype` records as `resolver` (a JSON API URL) sees them.
    pub async fn query(&self, resolver: &str, name: &str, rtype: Rtype) -> Result<Answer, String> {
        let sep = if resolver.contains('?') { '&' } else { '?' };
        let url = format!("{resolver}{sep}name={name}&type={}", code(rtype));
        let req = http::Request::get(&url)
            .header(http::header::ACCEPT, "application/dns-json")
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| ratls::error_chain(&e))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            if !status.is_success() {
                return Err(format!("HTTP {status}"));
            }
            parse(&body)
        };
        tokio::time::timeout(QUERY_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {QUERY_TIMEOUT:?}")))
    }
}

/// A JSON API answer: its status (0 and 3 are answers; anything else is the resolver failing)
/// and its records.
pub fn parse(body: &[u8]) -> Result<Answer, String> {
    let json: Json =
        serde_json::from_slice(body).map_err(|e| format!("not a DNS JSON answer: {e}"))?;
    if !matches!(json.status, 0 | 3) {
        return Err(format!("DNS status {}", json.status));
    }
    let records = json
        .answer
        .into_iter()
        .filter_map(|r| {
            let data = data(r.rtype, &r.data)?;
            Some(Record {
                name: r.name.trim_end_matches('.').to_ascii_lowercase(),
                data,
                ttl: r.ttl,
                id: None,
            })
        })
        .collect();
    Ok(Answer {
        status: json.status,
        records,
    })
}

/// The type's number in a query.
pub fn code(rtype: Rtype) -> u16 {
    match rtype {
        Rtype::A => 1,
        Rtype::Cname => 5,
        Rtype::Txt => 16,
        Rtype::Aaaa => 28,
        Rtype::Caa => 257,
    }
}

/// A record's `data` in presentation form, parsed for the types we compare.
fn data(rtype: u16, text: &str) -> Option<Data> {
    let text = text.trim();
    Some(match rtype {
        1 => Data::Other(Rtype::A, text.to_owned()),
        28 => Data::Other(Rtype::Aaaa, text.to_ascii_lowercase()),
        5 => Data::Cname(text.trim_end_matches('.').to_ascii_lowercase()),
        16 => Data::Txt(txt(text)),
        257 => caa(text)?,
        _ => return None,
    })
}

/// TXT presentation: `"chunk" "chunk"` (quotes and escapes undone, chunks joined), or bare.
pub(super) fn txt(text: &str) -> String {
    if !text.starts_with('"') {
        return text.to_owned();
    }
    let mut out = String::new();
    let mut chars = text.chars();
    let mut quoted = false;
    while let Some(ch) = chars.next() {
        match (ch, quoted) {
            ('"', _) => quoted = !quoted,
            ('\\', true) => {
                if let Some(next) = chars.next() {
                    out.push(next);
                }
            }
            (ch, true) => out.push(ch),
            (_, false) => {}
        }
    }
    out
}

/// CAA presentation: `0 issue "value"`, or RFC 3597's `\# <len> <hex>`.
pub(crate) fn caa(text: &str) -> Option<Data> {
    if let Some(hex) = text.strip_prefix("\\#") {
        let mut parts = hex.split_whitespace();
        let _len = parts.next()?;
        let bytes = hex::decode(parts.collect::<String>()).ok()?;
        let (&flags, rest) = bytes.split_first()?;
        let (&tag_len, rest) = rest.split_first()?;
        let tag = rest.get(..usize::from(tag_len))?;
        let value = rest.get(usize::from(tag_len)..)?;
        return Some(Data::Caa {
            critical: flags & 0x80 != 0,
            tag: String::from_utf8(tag.to_vec()).ok()?.to_ascii_lowercase(),
            value: String::from_utf8(value.to_vec()).ok()?,
        });
    }
    let mut parts = text.splitn(3, ' ');
    let flags: u8 = parts.next()?.parse().ok()?;
    let tag = parts.next()?.to_ascii_lowercase();
    let value = txt(parts.next()?.trim());
    Some(Data::Caa {
        critical: flags & 0x80 != 0,
        tag,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn google_and_cloudflare_answers_parse() {
        // dns.google/resolve's shape (a CNAME on the way, then the TXT).
        let a = parse(br#"{"Status":0,"TC":false,"RD":true,"RA":true,"AD":false,"CD":false,"Question":[{"name":"_dstack-app-address.app.example.com.","type":16}],"Answer":[{"name":"_dstack-app-address.app.example.com.","type":16,"TTL":60,"data":"\"abc:443\""}]}"#).unwrap();
        assert_eq!(a.records[0].data, Data::Txt("abc:443".into()));
        assert_eq!(a.records[0].name, "_dstack-app-address.app.example.com");
        let a = parse(br#"{"Status":0,"Answer":[{"name":"app.example.com","type":5,"TTL":300,"data":"GW.Example.net."}]}"#).unwrap();
        assert_eq!(a.records[0].data, Data::Cname("gw.example.net".into()));
        // CAA in presentation form and in RFC 3597 form (Cloudflare's).
        let a = parse(br#"{"Status":0,"Answer":[{"name":"example.com","type":257,"TTL":300,"data":"0 issue \"letsencrypt.org;validationmethods=tls-alpn-01\""},{"name":"example.com","type":257,"TTL":300,"data":"\\# 15 00 05 69 73 73 75 65 70 6b 69 2e 67 6f 6f 67"}]}"#).unwrap();
        assert_eq!(
            a.records[0].data,
            Data::Caa {
                critical: false,
                tag: "issue".into(),
                value: "letsencrypt.org;validationmethods=tls-alpn-01".into()
            }
        );
        assert_eq!(
            a.records[1].data,
            Data::Caa {
                critical: false,
                tag: "issue".into(),
                value: "pki.goog".into()
            }
        );
        // Split TXT chunks join; NXDOMAIN is an answer; SERVFAIL and garbage are errors.
        let a = parse(br#"{"Status":0,"Answer":[{"name":"t.example.com","type":16,"data":"\"ab\" \"c\\\"d\""}]}"#).unwrap();
        assert_eq!(a.records[0].data, Data::Txt("abc\"d".into()));
        assert_eq!(parse(br#"{"Status":3}"#).unwrap().records, []);
        assert!(parse(br#"{"Status":2}"#).unwrap_err().contains("status 2"));
        assert!(parse(b"<html>").is_err());
    }
}
