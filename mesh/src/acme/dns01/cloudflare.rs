//! Cloudflare's v4 API with a scoped token (Zone:Read, DNS:Edit): zones, then DNS records
//! listed, created and deleted one by one. Every error carries Cloudflare's own code and text.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use serde_json::{json, Value};

use super::{rest::Https, BoxFuture, Data, DnsError, Provider, Record, Rtype, Zone};

/// Marks records we write, for people reading the dashboard.
const COMMENT: &str = "managed by dstack-mesh";
/// Largest page the zones endpoint serves.
const ZONES_PER_PAGE: u32 = 50;
/// Largest page the records endpoint serves in one go.
const RECORDS_PER_PAGE: u32 = 100;

/// The API and the token.
pub struct Cloudflare {
    base: String,
    token: String,
    https: Https,
}

impl std::fmt::Debug for Cloudflare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cloudflare")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl Cloudflare {
    /// `base` is the API root (`https://api.cloudflare.com/client/v4`).
    pub fn new(base: &str, token: &str, timeout: Duration) -> Result<Self, super::SetupError> {
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            https: Https::new(timeout)?,
        })
    }

    fn fail(&self, message: String) -> DnsError {
        DnsError::Provider {
            provider: "cloudflare",
            message,
        }
    }

    /// One API call; the envelope's `result` on success, Cloudflare's errors otherwise.
    async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(Value, Value), DnsError> {
        let what = format!("{method} {path}");
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| self.fail(format!("{what}: {e}")))?;
        let answer = self
            .https
            .exchange(req)
            .await
            .map_err(|e| self.fail(format!("{what}: {e}")))?;
        // Throttled: the domain waits as long as the API asks.
        read_envelope(answer.status, &answer.body)
            .map_err(|e| answer.refusal("cloudflare", format!("{what}: {e}")))
    }

    /// Every page of a listing.
    async fn list(&self, path: &str, per_page: u32) -> Result<Vec<Value>, DnsError> {
        let mut out = Vec::new();
        for page in 1u32.. {
            let sep = if path.contains('?') { '&' } else { '?' };
            let (result, info) = self
                .call(
                    http::Method::GET,
                    &format!("{path}{sep}page={page}&per_page={per_page}"),
                    None,
                )
                .await?;
            let items = result.as_array().cloned().unwrap_or_default();
            let got = items.len();
            out.extend(items);
            let pages = info.get("total_pages").and_then(Value::as_u64).unwrap_or(1);
            // A page limit keeps a misbehaving API from looping us forever.
            if u64::from(page) >= pages || got == 0 || page >= 1000 {
                break;
            }
        }
        Ok(out)
    }

    fn parse(v: &Value) -> Option<Record> {
        let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        let name = text("name")?.to_ascii_lowercase();
        let content = text("content").unwrap_or_default();
        let data = match text("type")?.as_str() {
            // TXT content may come back quoted (Cloudflare's newer form).
            "TXT" => Data::Txt(unquote(&content).to_owned()),
            "CNAME" => Data::Cname(content.trim_end_matches('.').to_ascii_lowercase()),
            "CAA" => {
                let d = v.get("data")?;
                Data::Caa {
                    critical: d.get("flags").and_then(Value::as_u64).unwrap_or(0) & 128 != 0,
                    tag: d.get("tag").and_then(Value::as_str)?.to_owned(),
                    value: d.get("value").and_then(Value::as_str)?.to_owned(),
                }
            }
            "A" => Data::Other(Rtype::A, content),
            "AAAA" => Data::Other(Rtype::Aaaa, content),
            _ => return None,
        };
        Some(Record {
            name,
            data,
            ttl: v
                .get("ttl")
                .and_then(Value::as_u64)
                .and_then(|t| u32::try_from(t).ok())
                .unwrap_or(1),
            id: text("id"),
        })
    }
}

/// Cloudflare's envelope: `result` and `result_info` on success, else its `errors` in its words.
fn read_envelope(status: http::StatusCode, bytes: &[u8]) -> Result<(Value, Value), String> {
    let envelope: Value = serde_json::from_slice(bytes)
        .map_err(|_| format!("HTTP {status} with a body that is not the API's JSON"))?;
    let success = envelope
        .get("success")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if !status.is_success() || !success {
        let errors: Vec<String> = envelope
            .get("errors")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|e| {
                format!(
                    "{} (code {})",
                    e.get("message")
                        .and_then(Value::as_str)
                        .unwrap_or("no message"),
                    e.get("code").map(ToString::to_string).unwrap_or_default()
                )
            })
            .collect();
        let hint = match status.as_u16() {
            401 | 403 => ": check the token and its scope (Zone:Read and DNS:Edit on this zone)",
            _ => "",
        };
        return Err(format!("HTTP {status}: {}{hint}", errors.join("; ")));
    }
    let result = envelope.get("result").cloned().unwrap_or(Value::Null);
    let info = envelope.get("result_info").cloned().unwrap_or(Value::Null);
    Ok((result, info))
}

fn unquote(s: &str) -> &str {
    s.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(s)
}

impl Provider for Cloudflare {
    fn name(&self) -> &'static str {
        "cloudflare"
    }

    fn zones(&self) -> BoxFuture<'_, Result<Vec<Zone>, DnsError>> {
        Box::pin(async move {
            let items = self.list("/zones?status=active", ZONES_PER_PAGE).await?;
            Ok(items
                .iter()
                .filter_map(|z| {
                    Some(Zone {
                        name: z.get("name")?.as_str()?.to_ascii_lowercase(),
                        id: z.get("id")?.as_str()?.to_owned(),
                    })
                })
                .collect())
        })
    }

    fn records<'a>(
        &'a self,
        zone: &'a Zone,
        name: &'a str,
        rtype: Rtype,
    ) -> BoxFuture<'a, Result<Vec<Record>, DnsError>> {
        Box::pin(async move {
            let path = format!(
                "/zones/{}/dns_records?type={}&name={name}",
                zone.id,
                rtype.as_str()
            );
            let items = self.list(&path, RECORDS_PER_PAGE).await?;
            Ok(items.iter().filter_map(Self::parse).collect())
        })
    }

    fn create<'a>(
        &'a self,
        zone: &'a Zone,
        record: &'a Record,
    ) -> BoxFuture<'a, Result<Record, DnsError>> {
        Box::pin(async move {
            let mut body = json!({
                "type": record.data.rtype().as_str(),
                "name": record.name,
                "ttl": record.ttl,
                "comment": COMMENT,
            });
            match &record.data {
                Data::Txt(v) => body["content"] = json!(v),
                // Proxied would put Cloudflare's TLS in front of the gateway: never.
                Data::Cname(t) => {
                    body["content"] = json!(t);
                    body["proxied"] = json!(false);
                }
                Data::Caa {
                    critical,
                    tag,
                    value,
                } => {
                    body["data"] = json!({ "flags": if *critical { 128 } else { 0 }, "tag": tag, "value": value });
                }
                Data::Other(t, _) => {
                    return Err(self.fail(format!(
                        "{} records are not written by dstack-mesh",
                        t.as_str()
                    )))
                }
            }
            let (result, _) = self
                .call(
                    http::Method::POST,
                    &format!("/zones/{}/dns_records", zone.id),
                    Some(body),
                )
                .await?;
            let mut created = record.clone();
            created.id = result.get("id").and_then(Value::as_str).map(str::to_owned);
            Ok(created)
        })
    }

    fn delete<'a>(
        &'a self,
        zone: &'a Zone,
        record: &'a Record,
    ) -> BoxFuture<'a, Result<(), DnsError>> {
        Box::pin(async move {
            let ids = super::rest::ids_of(self, zone, record).await?;
            for id in ids {
                self.call(
                    http::Method::DELETE,
                    &format!("/zones/{}/dns_records/{id}", zone.id),
                    None,
                )
                .await?;
            }
            Ok(())
        })
    }

    fn apex_cname(&self) -> bool {
        true
    }

    fn default_resolvers(&self) -> BoxFuture<'_, Vec<SocketAddr>> {
        // Two public operators: a record seen by both has left Cloudflare's edge.
        Box::pin(async { super::rest::public_resolvers() })
    }
}

/// Everything read from an answer body: the envelope and the records in `result`.
#[doc(hidden)]
pub fn read_answer(body: &[u8]) {
    if let Ok((result, _)) = read_envelope(http::StatusCode::OK, body) {
        for v in result.as_array().into_iter().flatten() {
            let _ = Cloudflare::parse(v);
        }
    }
}
