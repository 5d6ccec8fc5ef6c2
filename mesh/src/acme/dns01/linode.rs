//! Linode's (Akamai's) API v4 (`/v4/domains`), with a personal access token: domains and their
//! records listed a page at a time (`page`, `pages`), records created with a name relative to
//! the domain (empty for the apex) and deleted by id. Errors carry Linode's `errors[].reason`.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use serde_json::{json, Value};

use super::{BoxFuture, Data, DnsError, Provider, Record, Rtype, Zone};

/// Linode's largest page.
const PAGE_SIZE: u32 = 500;
/// Pages followed at most.
const MAX_PAGES: u64 = 100;
/// Largest answer read.
const MAX_BODY: usize = 8 << 20;

/// The API and the token.
pub struct Linode {
    base: String,
    token: String,
    client: Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        Full<Bytes>,
    >,
    timeout: Duration,
}

impl std::fmt::Debug for Linode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Linode")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl Linode {
    /// `base` is the API root with its version (`https://api.linode.com/v4`).
    pub fn new(base: &str, token: &str, timeout: Duration) -> Result<Self, super::SetupError> {
        let tls = crate::https::client_config(&[])?;
        let connector = crate::https::connector(tls, crate::https::dialer(timeout));
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(connector),
            timeout,
        })
    }

    fn fail(message: String) -> DnsError {
        DnsError::Provider {
            provider: "linode",
            message,
        }
    }

    /// One call to `path` under the base; its JSON body on success.
    async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, DnsError> {
        let url = format!("{}{path}", self.base);
        let what = format!("{method} {url}");
        let req = http::Request::builder()
            .method(method)
            .uri(&url)
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(
                body.map(|b| b.to_string()).unwrap_or_default(),
            )))
            .map_err(|e| Self::fail(format!("{what}: {e}")))?;
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| Self::fail(format!("{what}: {}", ratls::error_chain(&e))))?;
            let status = resp.status();
            let bytes = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| Self::fail(format!("{what}: {e}")))?
                .to_bytes();
            let value: Value = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                Value::String(String::from_utf8_lossy(&bytes).chars().take(300).collect())
            });
            if status.is_success() {
                return Ok(value);
            }
            // `{"errors": [{"reason": "Invalid Token"}, {"field": "ttl_sec", "reason": ...}]}`
            let said: Vec<String> = value["errors"]
                .as_array()
                .map(|errors| {
                    errors
                        .iter()
                        .map(|e| match e["field"].as_str() {
                            Some(f) => format!("{f}: {}", e["reason"].as_str().unwrap_or_default()),
                            None => e["reason"].as_str().unwrap_or_default().to_owned(),
                        })
                        .collect()
                })
                .unwrap_or_else(|| vec![value.to_string()]);
            Err(Self::fail(format!(
                "{what}: HTTP {status}: {}",
                said.join("; ")
            )))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(Self::fail(format!(
                    "{what}: no answer within {:?}",
                    self.timeout
                )))
            })
    }

    /// Every item of `data` across the pages of `path`.
    async fn all(&self, path: &str) -> Result<Vec<Value>, DnsError> {
        let mut items = Vec::new();
        let sep = if path.contains('?') { '&' } else { '?' };
        for page in 1..=MAX_PAGES {
            let body = self
                .call(
                    http::Method::GET,
                    &format!("{path}{sep}page={page}&page_size={PAGE_SIZE}"),
                    None,
                )
                .await?;
            items.extend(body["data"].as_array().cloned().unwrap_or_default());
            if page >= body["pages"].as_u64().unwrap_or(1) {
                break;
            }
        }
        Ok(items)
    }
}

/// A record as Linode returns it (`name` relative, empty for the apex), as ours.
fn record(zone: &str, r: &Value) -> Option<Record> {
    let relative = r["name"].as_str().unwrap_or_default();
    let name = match relative {
        "" => zone.to_owned(),
        n => format!("{n}.{zone}"),
    };
    let target = r["target"].as_str().unwrap_or_default();
    let data = match r["type"].as_str()? {
        "TXT" => Data::Txt(target.to_owned()),
        "CNAME" => Data::Cname(target.trim_end_matches('.').to_ascii_lowercase()),
        "CAA" => Data::Caa {
            critical: false,
            tag: r["tag"].as_str().unwrap_or_default().to_ascii_lowercase(),
            value: target.to_owned(),
        },
        "A" => Data::Other(Rtype::A, target.to_owned()),
        "AAAA" => Data::Other(Rtype::Aaaa, target.to_owned()),
        _ => return None,
    };
    Some(Record {
        name: name.to_ascii_lowercase(),
        data,
        ttl: u32::try_from(r["ttl_sec"].as_u64().unwrap_or(0)).unwrap_or(u32::MAX),
        id: r["id"].as_u64().map(|id| id.to_string()),
    })
}

impl Provider for Linode {
    fn name(&self) -> &'static str {
        "linode"
    }

    fn zones(&self) -> BoxFuture<'_, Result<Vec<Zone>, DnsError>> {
        Box::pin(async move {
            let domains = self.all("/domains").await?;
            Ok(domains
                .iter()
                .filter(|d| d["type"].as_str() != Some("slave"))
                .filter_map(|d| {
                    Some(Zone {
                        name: d["domain"]
                            .as_str()?
                            .trim_end_matches('.')
                            .to_ascii_lowercase(),
                        id: d["id"].as_u64()?.to_string(),
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
            let items = self.all(&format!("/domains/{}/records", zone.id)).await?;
            Ok(items
                .iter()
                .filter_map(|r| record(&zone.name, r))
                .filter(|r| r.name.eq_ignore_ascii_case(name) && r.data.rtype() == rtype)
                .collect())
        })
    }

    fn create<'a>(
        &'a self,
        zone: &'a Zone,
        record: &'a Record,
    ) -> BoxFuture<'a, Result<Record, DnsError>> {
        Box::pin(async move {
            let relative = match record.name.strip_suffix(&format!(".{}", zone.name)) {
                Some(r) => r.to_owned(),
                None if record.name == zone.name => String::new(),
                None => {
                    return Err(Self::fail(format!(
                        "{} is not in the domain {}",
                        record.name, zone.name
                    )))
                }
            };
            // Linode rounds a TTL up to its next allowed value (30 s the smallest).
            let ttl = record.ttl.max(30);
            let body = match &record.data {
                Data::Txt(v) => {
                    json!({"type": "TXT", "name": relative, "target": v, "ttl_sec": ttl})
                }
                Data::Cname(t) => {
                    json!({"type": "CNAME", "name": relative, "target": t, "ttl_sec": ttl})
                }
                Data::Caa { tag, value, .. } => json!({
                    "type": "CAA", "name": relative, "target": value, "tag": tag, "ttl_sec": ttl,
                }),
                Data::Other(t, _) => {
                    return Err(Self::fail(format!(
                        "{} records are not written",
                        t.as_str()
                    )))
                }
            };
            let made = self
                .call(
                    http::Method::POST,
                    &format!("/domains/{}/records", zone.id),
                    Some(body),
                )
                .await?;
            let mut created = record.clone();
            created.id = made["id"].as_u64().map(|id| id.to_string());
            Ok(created)
        })
    }

    fn delete<'a>(
        &'a self,
        zone: &'a Zone,
        record: &'a Record,
    ) -> BoxFuture<'a, Result<(), DnsError>> {
        Box::pin(async move {
            let ids = match &record.id {
                Some(id) => vec![id.clone()],
                None => super::records_at(self, zone, &record.name, record.data.rtype())
                    .await?
                    .into_iter()
                    .filter(|r| r.data.same(&record.data))
                    .filter_map(|r| r.id)
                    .collect(),
            };
            for id in ids {
                self.call(
                    http::Method::DELETE,
                    &format!("/domains/{}/records/{id}", zone.id),
                    None,
                )
                .await?;
            }
            Ok(())
        })
    }

    fn default_resolvers(&self) -> BoxFuture<'_, Vec<SocketAddr>> {
        // Linode's nameservers are slow to take changes (dstack-ingress waits 300 s for them):
        // two public operators must both see a record.
        Box::pin(async {
            vec![
                SocketAddr::from(([1, 1, 1, 1], 53)),
                SocketAddr::from(([8, 8, 8, 8], 53)),
            ]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_as_linode_writes_them() {
        let r = record(
            "example.com",
            &json!({"id": 28448432, "type": "TXT", "name": "_dstack-app-address.www", "target": "abc:443", "ttl_sec": 300}),
        )
        .unwrap();
        assert_eq!(r.name, "_dstack-app-address.www.example.com");
        assert_eq!(r.data, Data::Txt("abc:443".into()));
        let apex = record(
            "example.com",
            &json!({"id": 1, "type": "CAA", "name": "", "target": "letsencrypt.org", "tag": "issue", "ttl_sec": 0}),
        )
        .unwrap();
        assert_eq!(apex.name, "example.com");
        assert!(matches!(apex.data, Data::Caa { ref tag, .. } if tag == "issue"));
    }
}
