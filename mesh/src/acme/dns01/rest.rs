//! What the JSON-over-HTTPS DNS APIs share: one client with a deadline per call, the
//! credential in a header, bodies read up to a bound, and a failure in the provider's own
//! words (each provider says how its error bodies read).

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use serde_json::Value;

use super::{Data, DnsError, Provider, Record, Zone};

/// Largest answer read.
pub(super) const MAX_BODY: usize = 8 << 20;

/// How a provider's API takes its credential.
#[derive(Clone)]
pub(super) enum Credential {
    /// In a header (`Authorization: Bearer …`).
    Header(http::HeaderName, String),
    /// As fields of every JSON body (Porkbun's `apikey` and `secretapikey`).
    Body(serde_json::Map<String, Value>),
}

/// HTTPS to a provider's API: WebPKI roots, pooled connections, a deadline per call and
/// answers read up to a bound.
pub(super) struct Https {
    client: Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        Full<Bytes>,
    >,
    timeout: Duration,
}

impl Https {
    /// A client whose calls end after `timeout`.
    pub(super) fn new(timeout: Duration) -> Result<Self, super::SetupError> {
        let tls = crate::https::client_config(&[])?;
        let connector = crate::https::connector(tls, crate::https::dialer(timeout));
        Ok(Self {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(connector),
            timeout,
        })
    }

    /// Send `req`: the status and the whole body, or what went wrong in words.
    pub(super) async fn exchange(&self, req: http::Request<Full<Bytes>>) -> Result<Answer, String> {
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| ratls::error_chain(&e))?;
            let status = resp.status();
            let retry_after = (status == http::StatusCode::TOO_MANY_REQUESTS)
                .then(|| crate::acme::ari::retry_after_header(resp.headers()))
                .flatten();
            let body = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok(Answer {
                status,
                body,
                retry_after,
            })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {:?}", self.timeout)))
    }
}

/// What a provider's API answered.
pub(super) struct Answer {
    pub(super) status: http::StatusCode,
    pub(super) body: Bytes,
    /// A `429`'s `Retry-After`.
    pub(super) retry_after: Option<Duration>,
}

impl Answer {
    /// This answer as a failure in `provider`'s name: throttled when it said when to come
    /// back (the domain then waits that long), else the provider's refusal.
    pub(super) fn refusal(&self, provider: &'static str, message: String) -> DnsError {
        match self.retry_after {
            Some(retry_after) => DnsError::Throttled {
                provider,
                message,
                retry_after,
            },
            None => DnsError::Provider { provider, message },
        }
    }
}

/// A provider's API root, its credential and how its errors read.
pub(super) struct JsonApi {
    provider: &'static str,
    base: String,
    credential: Credential,
    https: Https,
    /// The provider's words in an error body, when it has a shape this reads.
    explain: fn(&Value) -> Option<String>,
}

impl std::fmt::Debug for JsonApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonApi")
            .field("provider", &self.provider)
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl JsonApi {
    /// `provider`'s API at `base`, sending `credential` with each call.
    pub(super) fn new(
        provider: &'static str,
        base: &str,
        credential: Credential,
        timeout: Duration,
        explain: fn(&Value) -> Option<String>,
    ) -> Result<Self, super::SetupError> {
        Ok(Self {
            provider,
            base: base.trim_end_matches('/').to_owned(),
            credential,
            https: Https::new(timeout)?,
            explain,
        })
    }

    /// A failure, in the provider's name.
    pub(super) fn fail(&self, message: String) -> DnsError {
        DnsError::Provider {
            provider: self.provider,
            message,
        }
    }

    /// One call to `path` under the base; the JSON body on success (`Null` when empty).
    pub(super) async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, DnsError> {
        let url = format!("{}{path}", self.base);
        let what = format!("{method} {url}");
        let mut req = http::Request::builder()
            .method(method)
            .uri(&url)
            .header(http::header::CONTENT_TYPE, "application/json");
        let body = match &self.credential {
            Credential::Header(name, value) => {
                req = req.header(name, value);
                body
            }
            Credential::Body(fields) => {
                let mut with = body.unwrap_or_else(|| Value::Object(Default::default()));
                if let Some(obj) = with.as_object_mut() {
                    obj.extend(fields.clone());
                }
                Some(with)
            }
        };
        let req = req
            .body(Full::new(Bytes::from(
                body.map(|b| b.to_string()).unwrap_or_default(),
            )))
            .map_err(|e| self.fail(format!("{what}: {e}")))?;
        let answer = self
            .https
            .exchange(req)
            .await
            .map_err(|e| self.fail(format!("{what}: {e}")))?;
        let (status, bytes) = (answer.status, &answer.body);
        let value = match bytes.is_empty() {
            true => Value::Null,
            false => serde_json::from_slice(bytes).unwrap_or_else(|_| {
                Value::String(String::from_utf8_lossy(bytes).chars().take(300).collect())
            }),
        };
        if status.is_success() {
            return Ok(value);
        }
        let said = (self.explain)(&value).unwrap_or_else(|| value.to_string());
        Err(answer.refusal(self.provider, format!("{what}: HTTP {status}: {said}")))
    }
}

/// Pages followed at most.
const MAX_PAGES: u64 = 100;

impl JsonApi {
    /// Every item of `key` across the numbered pages of `path` (`page=N&<size>`), until `last`
    /// says the body (of page N) was the last.
    pub(super) async fn paged(
        &self,
        path: &str,
        size: &str,
        key: &str,
        last: fn(&Value, u64) -> bool,
    ) -> Result<Vec<Value>, DnsError> {
        let mut items = Vec::new();
        let sep = if path.contains('?') { '&' } else { '?' };
        for page in 1..=MAX_PAGES {
            let body = self
                .call(
                    http::Method::GET,
                    &format!("{path}{sep}page={page}&{size}"),
                    None,
                )
                .await?;
            items.extend(body[key].as_array().cloned().unwrap_or_default());
            if last(&body, page) {
                break;
            }
        }
        Ok(items)
    }
}

/// The provider's ids of `record`: its own, or those of the same records at its name (a record
/// from another run names no id).
pub(super) async fn ids_of(
    provider: &dyn Provider,
    zone: &Zone,
    record: &Record,
) -> Result<Vec<String>, DnsError> {
    Ok(match &record.id {
        Some(id) => vec![id.clone()],
        None => super::records_at(provider, zone, &record.name, record.data.rtype())
            .await?
            .into_iter()
            .filter(|r| r.data.same(&record.data))
            .filter_map(|r| r.id)
            .collect(),
    })
}

/// Delete `record` (by its id, or the ids of the same records at its name) with a `DELETE` to
/// the path `path_of(id)` gives.
pub(super) async fn delete_by_id(
    provider: &dyn Provider,
    api: &JsonApi,
    zone: &Zone,
    record: &Record,
    path_of: impl Fn(&str) -> String,
) -> Result<(), DnsError> {
    for id in ids_of(provider, zone, record).await? {
        api.call(http::Method::DELETE, &path_of(&id), None).await?;
    }
    Ok(())
}

/// `name` relative to `zone`, as the provider writes names: `apex` (`@`, or empty) for the zone
/// itself; `None` outside it.
pub(super) fn relative(zone: &Zone, name: &str, apex: &str) -> Option<String> {
    match name.strip_suffix(&format!(".{}", zone.name)) {
        Some(r) => Some(r.to_owned()),
        None if name == zone.name => Some(apex.to_owned()),
        None => None,
    }
}

impl JsonApi {
    /// [`relative`] for a record to write, or a failure saying it is outside the zone.
    pub(super) fn relative_in(
        &self,
        zone: &Zone,
        name: &str,
        apex: &str,
    ) -> Result<String, DnsError> {
        relative(zone, name, apex)
            .ok_or_else(|| self.fail(format!("{name} is not in the zone {}", zone.name)))
    }
}

/// Two public operators' resolvers: a record both see has left the provider's nameservers.
pub(super) fn public_resolvers() -> Vec<SocketAddr> {
    vec![
        SocketAddr::from(([1, 1, 1, 1], 53)),
        SocketAddr::from(([8, 8, 8, 8], 53)),
    ]
}

/// A value in zone-file presentation form, as the record-set APIs (Hetzner, Route53) take it:
/// TXT as quoted strings of at most 255 bytes each, CNAME fully qualified, CAA as
/// `flags tag "value"`.
pub(crate) fn presentation(data: &Data) -> Option<String> {
    Some(match data {
        Data::Txt(v) => {
            let chunks: Vec<String> = v
                .as_bytes()
                .chunks(255)
                .map(|c| format!("\"{}\"", String::from_utf8_lossy(c).replace('"', "\\\"")))
                .collect();
            match chunks.is_empty() {
                true => "\"\"".to_owned(),
                false => chunks.join(" "),
            }
        }
        Data::Cname(t) => format!("{t}."),
        Data::Caa {
            critical,
            tag,
            value,
        } => format!("{} {tag} \"{value}\"", if *critical { 128 } else { 0 }),
        Data::Other(..) => return None,
    })
}

/// A value of type `rtype` in presentation form, as ours ([`presentation`] read back).
pub(crate) fn parse_presentation(rtype: &str, v: &str) -> Option<Data> {
    Some(match rtype {
        "TXT" => Data::Txt(super::doh::txt(v)),
        "CNAME" => Data::Cname(v.trim_end_matches('.').to_ascii_lowercase()),
        "CAA" => super::doh::caa(v)?,
        "A" => Data::Other(super::Rtype::A, v.to_owned()),
        "AAAA" => Data::Other(super::Rtype::Aaaa, v.to_owned()),
        _ => return None,
    })
}

/// A record set's values (presentation form, of type `rtype`) as records of `name`; values of
/// types we do not read are left out.
pub(super) fn set_records(name: &str, rtype: &str, ttl: u32, values: &[String]) -> Vec<Record> {
    values
        .iter()
        .filter_map(|v| parse_presentation(rtype, v))
        .map(|data| Record {
            name: name.to_owned(),
            data,
            ttl,
            id: None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loopback server that answers every connection with `head` and `body`.
    async fn answering(head: &'static str, body: &'static str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let mut request = [0u8; 4096];
                let _ = tcp.read(&mut request).await;
                let answer = format!(
                    "{head}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.write_all(answer.as_bytes()).await;
            }
        });
        format!("http://{addr}")
    }

    /// DigitalOcean's API shape (its errors say `message`) at `base`.
    fn api(base: &str) -> JsonApi {
        JsonApi::new(
            "digitalocean",
            base,
            Credential::Header(http::header::AUTHORIZATION, "Bearer t".into()),
            Duration::from_secs(5),
            |v| v["message"].as_str().map(str::to_owned),
        )
        .unwrap()
    }

    const LIMITED: &str = r#"{"id":"too_many_requests","message":"API Rate limit exceeded."}"#;

    #[tokio::test]
    async fn a_429_with_retry_after_throttles_every_other_refusal_fails() {
        let base = answering("HTTP/1.1 429 Too Many Requests\r\nretry-after: 30", LIMITED).await;
        let e = api(&base)
            .call(http::Method::GET, "/v2/domains", None)
            .await
            .unwrap_err();
        match e {
            DnsError::Throttled {
                provider,
                message,
                retry_after,
            } => {
                assert_eq!(provider, "digitalocean");
                assert_eq!(retry_after, Duration::from_secs(30));
                assert!(message.contains("API Rate limit exceeded."), "{message}");
            }
            other => panic!("not throttled: {other:?}"),
        }
        // No Retry-After, or one on another status: the usual failure and backoff.
        for head in [
            "HTTP/1.1 429 Too Many Requests",
            "HTTP/1.1 503 Service Unavailable\r\nretry-after: 30",
        ] {
            let base = answering(head, LIMITED).await;
            let e = api(&base)
                .call(http::Method::GET, "/v2/domains", None)
                .await
                .unwrap_err();
            assert!(
                matches!(&e, DnsError::Provider { message, .. } if message.contains("API Rate limit exceeded.")),
                "{head}: {e:?}"
            );
        }
    }
}
