//! Linode's (Akamai's) API v4 (`/v4/domains`), with a personal access token: domains and their
//! records listed a page at a time (`page`, `pages`), records created with a name relative to
//! the domain (empty for the apex) and deleted by id. Errors carry Linode's `errors[].reason`.

use std::{net::SocketAddr, time::Duration};

use serde_json::{json, Value};

use super::{
    rest::{delete_by_id, public_resolvers, Credential, JsonApi},
    BoxFuture, Data, DnsError, Provider, Record, Rtype, Zone,
};

/// Linode's largest page.
const PAGE_SIZE: u32 = 500;

/// The API and the token.
#[derive(Debug)]
pub struct Linode {
    api: JsonApi,
}

impl Linode {
    /// `base` is the API root with its version (`https://api.linode.com/v4`).
    pub fn new(base: &str, token: &str, timeout: Duration) -> Result<Self, super::SetupError> {
        let bearer = Credential::Header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        Ok(Self {
            api: JsonApi::new("linode", base, bearer, timeout, explain)?,
        })
    }

    fn fail(&self, message: String) -> DnsError {
        self.api.fail(message)
    }

    /// Every item of `data` across the pages of `path`.
    async fn all(&self, path: &str) -> Result<Vec<Value>, DnsError> {
        let size = format!("page_size={PAGE_SIZE}");
        self.api
            .paged(path, &size, "data", |body, page| {
                page >= body["pages"].as_u64().unwrap_or(1)
            })
            .await
    }
}

/// `{"errors": [{"reason": "Invalid Token"}, {"field": "ttl_sec", "reason": "..."}]}`
fn explain(body: &Value) -> Option<String> {
    let said: Vec<String> = body["errors"]
        .as_array()?
        .iter()
        .map(|e| match e["field"].as_str() {
            Some(f) => format!("{f}: {}", e["reason"].as_str().unwrap_or_default()),
            None => e["reason"].as_str().unwrap_or_default().to_owned(),
        })
        .collect();
    Some(said.join("; "))
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
            let relative = self.api.relative_in(zone, &record.name, "")?;
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
                    return Err(self.fail(format!("{} records are not written", t.as_str())))
                }
            };
            let made = self
                .api
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
        Box::pin(delete_by_id(self, &self.api, zone, record, move |id| {
            format!("/domains/{}/records/{id}", zone.id)
        }))
    }

    fn default_resolvers(&self) -> BoxFuture<'_, Vec<SocketAddr>> {
        // Linode's nameservers are slow to take changes (dstack-ingress waits 300 s for them).
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
    for r in v["data"].as_array().into_iter().flatten() {
        let _ = record("example.com", r);
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
