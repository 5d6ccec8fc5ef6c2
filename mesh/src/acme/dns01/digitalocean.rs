//! DigitalOcean's API v2 (`/v2/domains`), with a personal access token: zones (domains) and
//! their records listed a page at a time (`links.pages.next`), records created with a name
//! relative to the zone and deleted by id. Errors carry DigitalOcean's `id` and `message`.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use serde_json::{json, Value};

use super::{BoxFuture, Data, DnsError, Provider, Record, Rtype, Zone};

/// DigitalOcean's largest page.
const PER_PAGE: u32 = 200;
/// Pages followed at most (40,000 zones or records of a name).
const MAX_PAGES: usize = 200;
/// Largest answer read.
const MAX_BODY: usize = 8 << 20;

/// The API and the token.
pub struct DigitalOcean {
    base: String,
    token: String,
    client: Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        Full<Bytes>,
    >,
    timeout: Duration,
}

impl std::fmt::Debug for DigitalOcean {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DigitalOcean")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl DigitalOcean {
    /// `base` is the API root without `/v2` (`https://api.digitalocean.com`).
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
            provider: "digitalocean",
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
            let value: Value = match bytes.is_empty() {
                true => Value::Null,
                false => serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                    Value::String(String::from_utf8_lossy(&bytes).chars().take(300).collect())
                }),
            };
            if status.is_success() {
                return Ok(value);
            }
            // `{"id": "unauthorized", "message": "Unable to authenticate you."}`
            let said = match (value["id"].as_str(), value["message"].as_str()) {
                (Some(id), Some(m)) => format!("{id}: {m}"),
                _ => value.to_string(),
            };
            Err(Self::fail(format!("{what}: HTTP {status}: {said}")))
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

    /// Every item of `key` across the pages starting at `path`.
    async fn all(&self, path: String, key: &str) -> Result<Vec<Value>, DnsError> {
        let mut items = Vec::new();
        let mut next = Some(path);
        for _ in 0..MAX_PAGES {
            let Some(url) = next.take() else { break };
            let page = self.call(http::Method::GET, &url, None).await?;
            items.extend(page[key].as_array().cloned().unwrap_or_default());
            // The link names DigitalOcean's host; its path and query go to our base (a
            // proxy, a test), never elsewhere.
            next = page["links"]["pages"]["next"]
                .as_str()
                .and_then(|link| link.parse::<http::Uri>().ok())
                .and_then(|uri| uri.path_and_query().map(|pq| pq.to_string()));
        }
        Ok(items)
    }
}

/// A record as DigitalOcean returns it (`name` relative, `@` the apex), as ours.
fn record(zone: &str, r: &Value) -> Option<Record> {
    let relative = r["name"].as_str()?;
    let name = match relative {
        "@" | "" => zone.to_owned(),
        n => format!("{}.{zone}", n.trim_end_matches('.')),
    };
    let data = r["data"].as_str().unwrap_or_default();
    let data = match r["type"].as_str()? {
        "TXT" => Data::Txt(data.to_owned()),
        "CNAME" => Data::Cname(match data {
            "@" => zone.to_owned(),
            d => d.trim_end_matches('.').to_ascii_lowercase(),
        }),
        "CAA" => Data::Caa {
            critical: r["flags"].as_u64().unwrap_or(0) & 0x80 != 0,
            tag: r["tag"].as_str().unwrap_or_default().to_ascii_lowercase(),
            value: data.to_owned(),
        },
        "A" => Data::Other(Rtype::A, data.to_owned()),
        "AAAA" => Data::Other(Rtype::Aaaa, data.to_owned()),
        _ => return None,
    };
    Some(Record {
        name: name.to_ascii_lowercase(),
        data,
        ttl: u32::try_from(r["ttl"].as_u64().unwrap_or(0)).unwrap_or(u32::MAX),
        id: r["id"].as_u64().map(|id| id.to_string()),
    })
}

impl Provider for DigitalOcean {
    fn name(&self) -> &'static str {
        "digitalocean"
    }

    fn zones(&self) -> BoxFuture<'_, Result<Vec<Zone>, DnsError>> {
        Box::pin(async move {
            let domains = self
                .all(format!("/v2/domains?per_page={PER_PAGE}"), "domains")
                .await?;
            Ok(domains
                .iter()
                .filter_map(|d| d["name"].as_str())
                .map(|n| Zone {
                    name: n.trim_end_matches('.').to_ascii_lowercase(),
                    id: n.trim_end_matches('.').to_ascii_lowercase(),
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
            // The `name` filter takes the full name.
            let path = format!(
                "/v2/domains/{}/records?type={}&name={name}&per_page={PER_PAGE}",
                zone.id,
                rtype.as_str()
            );
            let items = self.all(path, "domain_records").await?;
            Ok(items.iter().filter_map(|r| record(&zone.name, r)).collect())
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
                None if record.name == zone.name => "@".to_owned(),
                None => {
                    return Err(Self::fail(format!(
                        "{} is not in the zone {}",
                        record.name, zone.name
                    )))
                }
            };
            // DigitalOcean's smallest TTL is 30 s.
            let ttl = record.ttl.max(30);
            let body = match &record.data {
                Data::Txt(v) => json!({"type": "TXT", "name": relative, "data": v, "ttl": ttl}),
                Data::Cname(t) => {
                    json!({"type": "CNAME", "name": relative, "data": format!("{t}."), "ttl": ttl})
                }
                Data::Caa {
                    critical,
                    tag,
                    value,
                } => json!({
                    "type": "CAA", "name": relative, "data": value, "ttl": ttl,
                    "flags": if *critical { 128 } else { 0 }, "tag": tag,
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
                    &format!("/v2/domains/{}/records", zone.id),
                    Some(body),
                )
                .await?;
            let mut created = record.clone();
            created.id = made["domain_record"]["id"]
                .as_u64()
                .map(|id| id.to_string());
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
                    &format!("/v2/domains/{}/records/{id}", zone.id),
                    None,
                )
                .await?;
            }
            Ok(())
        })
    }

    fn default_resolvers(&self) -> BoxFuture<'_, Vec<SocketAddr>> {
        // Two public operators: a record both see has left DigitalOcean's nameservers.
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
    fn records_read_as_digitalocean_writes_them() {
        let r = record(
            "example.com",
            &json!({"id": 28448432, "type": "CNAME", "name": "www", "data": "gw.example.net", "ttl": 60, "flags": null, "tag": null}),
        )
        .unwrap();
        assert_eq!(r.name, "www.example.com");
        assert_eq!(r.data, Data::Cname("gw.example.net".into()));
        assert_eq!(r.id.as_deref(), Some("28448432"));
        let apex = record(
            "example.com",
            &json!({"id": 1, "type": "CAA", "name": "@", "data": "letsencrypt.org", "ttl": 1800, "flags": 0, "tag": "issue"}),
        )
        .unwrap();
        assert_eq!(apex.name, "example.com");
        assert_eq!(
            apex.data,
            Data::Caa {
                critical: false,
                tag: "issue".into(),
                value: "letsencrypt.org".into()
            }
        );
        assert!(record(
            "example.com",
            &json!({"id": 2, "type": "MX", "name": "@", "data": "mx"})
        )
        .is_none());
    }
}
