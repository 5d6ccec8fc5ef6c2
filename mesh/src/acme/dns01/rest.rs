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
    pub(super) async fn exchange(
        &self,
        req: http::Request<Full<Bytes>>,
    ) -> Result<(http::StatusCode, Bytes), String> {
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| ratls::error_chain(&e))?;
            let status = resp.status();
            let bytes = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok((status, bytes))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {:?}", self.timeout)))
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
        let (status, bytes) = self
            .https
            .exchange(req)
            .await
            .map_err(|e| self.fail(format!("{what}: {e}")))?;
        let value = match bytes.is_empty() {
            true => Value::Null,
            false => serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                Value::String(String::from_utf8_lossy(&bytes).chars().take(300).collect())
            }),
        };
        if status.is_success() {
            return Ok(value);
        }
        let said = (self.explain)(&value).unwrap_or_else(|| value.to_string());
        Err(self.fail(format!("{what}: HTTP {status}: {said}")))
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
