//! DigitalOcean's API v2 (`/v2/domains`), with a personal access token: zones (domains) and
//! their records listed a page at a time (`links.pages.next`), records created with a name
//! relative to the zone and deleted by id. Errors carry DigitalOcean's `id` and `message`.

use std::{net::SocketAddr, time::Duration};

use serde_json::{json, Value};

use super::{
    rest::{delete_by_id, public_resolvers, Credential, JsonApi},
    BoxFuture, Data, DnsError, Provider, Record, Rtype, Zone,
};

/// DigitalOcean's largest page.
const PER_PAGE: u32 = 200;
/// Pages followed at most (40,000 zones or records of a name).
const MAX_PAGES: usize = 200;

/// The API and the token.
#[derive(Debug)]
pub struct DigitalOcean {
    api: JsonApi,
}

impl DigitalOcean {
    /// `base` is the API root without `/v2` (`https://api.digitalocean.com`).
    pub fn new(base: &str, token: &str, timeout: Duration) -> Result<Self, super::SetupError> {
        let bearer = Credential::Header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        Ok(Self {
            api: JsonApi::new("digitalocean", base, bearer, timeout, explain)?,
        })
    }

    fn fail(&self, message: String) -> DnsError {
        self.api.fail(message)
    }

    /// Every item of `key` across the pages starting at `path`.
    async fn all(&self, path: String, key: &str) -> Result<Vec<Value>, DnsError> {
        let mut items = Vec::new();
        let mut next = Some(path);
        for _ in 0..MAX_PAGES {
            let Some(url) = next.take() else { break };
            let page = self.api.call(http::Method::GET, &url, None).await?;
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

/// `{"id": "unauthorized", "message": "Unable to authenticate you."}`
fn explain(body: &Value) -> Option<String> {
    Some(format!(
        "{}: {}",
        body["id"].as_str()?,
        body["message"].as_str()?
    ))
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
            let relative = self.api.relative_in(zone, &record.name, "@")?;
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
                    return Err(self.fail(format!("{} records are not written", t.as_str())))
                }
            };
            let made = self
                .api
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
        Box::pin(delete_by_id(self, &self.api, zone, record, move |id| {
            format!("/v2/domains/{}/records/{id}", zone.id)
        }))
    }

    fn default_resolvers(&self) -> BoxFuture<'_, Vec<SocketAddr>> {
        Box::pin(async { public_resolvers() })
    }
}

/// Everything read from an answer body: the error words and the records.
#[doc(hidden)]
pub fn read_answer(body: &[u8]) {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    let _ = explain(&v);
    for r in v["domain_records"].as_array().into_iter().flatten() {
        let _ = record("example.com", r);
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
