//! Porkbun's API v3: every call a `POST` whose JSON body carries the API key and the secret
//! key; the account's domains listed a thousand at a time (`start`), records of a name and type
//! retrieved by the name relative to the domain, created (`content`, a TTL of at least 600 s)
//! and deleted by id. Errors carry Porkbun's `message`.

use std::{net::SocketAddr, time::Duration};

use serde_json::{json, Value};

use super::{
    rest::{ids_of, public_resolvers, relative, Credential, JsonApi},
    BoxFuture, Data, DnsError, Provider, Record, Rtype, Zone,
};

/// Domains per `listAll` answer.
const LIST_PAGE: usize = 1000;
/// Pages of domains followed at most.
const MAX_PAGES: usize = 100;
/// Porkbun's smallest TTL.
const MIN_TTL: u32 = 600;
/// The first wait after a 503 (Porkbun allows about a call a second).
const THROTTLED: Duration = Duration::from_secs(1);

/// The API and the key pair.
#[derive(Debug)]
pub struct Porkbun {
    api: JsonApi,
}

impl Porkbun {
    /// `base` is the API root with its version (`https://api.porkbun.com/api/json/v3`).
    pub fn new(
        base: &str,
        api_key: &str,
        secret_key: &str,
        timeout: Duration,
    ) -> Result<Self, super::SetupError> {
        let mut keys = serde_json::Map::new();
        keys.insert("apikey".into(), api_key.into());
        keys.insert("secretapikey".into(), secret_key.into());
        Ok(Self {
            api: JsonApi::new("porkbun", base, Credential::Body(keys), timeout, explain)?,
        })
    }

    /// `POST path` with `body`; an answer whose `status` is not `SUCCESS` fails. Porkbun's
    /// front end refuses more than about a call a second with a 503: waited out, three times.
    async fn post(&self, path: &str, body: Value) -> Result<Value, DnsError> {
        let mut wait = THROTTLED;
        let mut attempt = 1;
        let answer = loop {
            match self
                .api
                .call(http::Method::POST, path, Some(body.clone()))
                .await
            {
                Err(e) if attempt < 4 && e.to_string().contains("HTTP 503") => {
                    tracing::debug!(
                        path,
                        wait_ms = wait.as_millis() as u64,
                        "porkbun: throttled"
                    );
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                    attempt += 1;
                }
                other => break other?,
            }
        };
        match answer["status"].as_str() {
            Some("SUCCESS") => Ok(answer),
            _ => Err(self.api.fail(format!(
                "POST {path}: {}",
                explain(&answer).unwrap_or_else(|| answer.to_string())
            ))),
        }
    }
}

/// `{"status": "ERROR", "message": "Invalid API key. (002)"}`
fn explain(body: &Value) -> Option<String> {
    body["message"].as_str().map(str::to_owned)
}

/// A record as Porkbun returns it (`name` the full name, numbers as strings), as ours.
fn record(r: &Value) -> Option<Record> {
    let content = r["content"].as_str().unwrap_or_default();
    let data = match r["type"].as_str()? {
        "TXT" => Data::Txt(content.to_owned()),
        "CNAME" => Data::Cname(content.trim_end_matches('.').to_ascii_lowercase()),
        "CAA" => super::doh::caa(content)?,
        "A" => Data::Other(Rtype::A, content.to_owned()),
        "AAAA" => Data::Other(Rtype::Aaaa, content.to_owned()),
        _ => return None,
    };
    let number = |v: &Value| v.as_u64().or_else(|| v.as_str()?.parse().ok());
    Some(Record {
        name: r["name"]
            .as_str()?
            .trim_end_matches('.')
            .to_ascii_lowercase(),
        data,
        ttl: number(&r["ttl"])
            .and_then(|t| u32::try_from(t).ok())
            .unwrap_or(0),
        id: number(&r["id"]).map(|id| id.to_string()),
    })
}

impl Provider for Porkbun {
    fn name(&self) -> &'static str {
        "porkbun"
    }

    fn zones(&self) -> BoxFuture<'_, Result<Vec<Zone>, DnsError>> {
        Box::pin(async move {
            let mut zones = Vec::new();
            for page in 0..MAX_PAGES {
                let start = page * LIST_PAGE;
                let answer = self
                    .post("/domain/listAll", json!({"start": start.to_string()}))
                    .await?;
                let domains = answer["domains"].as_array().cloned().unwrap_or_default();
                zones.extend(domains.iter().filter_map(|d| {
                    let name = d["domain"]
                        .as_str()?
                        .trim_end_matches('.')
                        .to_ascii_lowercase();
                    Some(Zone {
                        id: name.clone(),
                        name,
                    })
                }));
                if domains.len() < LIST_PAGE {
                    break;
                }
            }
            Ok(zones)
        })
    }

    fn records<'a>(
        &'a self,
        zone: &'a Zone,
        name: &'a str,
        rtype: Rtype,
    ) -> BoxFuture<'a, Result<Vec<Record>, DnsError>> {
        Box::pin(async move {
            let Some(sub) = relative(zone, name, "") else {
                return Ok(Vec::new());
            };
            // The apex has no subdomain segment.
            let path = match sub.is_empty() {
                true => format!("/dns/retrieveByNameType/{}/{}", zone.id, rtype.as_str()),
                false => format!(
                    "/dns/retrieveByNameType/{}/{}/{sub}",
                    zone.id,
                    rtype.as_str()
                ),
            };
            let answer = self.post(&path, json!({})).await?;
            Ok(answer["records"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(record)
                .collect())
        })
    }

    fn create<'a>(
        &'a self,
        zone: &'a Zone,
        record: &'a Record,
    ) -> BoxFuture<'a, Result<Record, DnsError>> {
        Box::pin(async move {
            let sub = self.api.relative_in(zone, &record.name, "")?;
            let content = match &record.data {
                Data::Txt(v) => v.clone(),
                Data::Cname(t) => t.clone(),
                Data::Caa {
                    critical,
                    tag,
                    value,
                } => format!("{} {tag} \"{value}\"", if *critical { 128 } else { 0 }),
                Data::Other(t, _) => {
                    return Err(self
                        .api
                        .fail(format!("{} records are not written", t.as_str())))
                }
            };
            let body = json!({
                "name": sub,
                "type": record.data.rtype().as_str(),
                "content": content,
                "ttl": record.ttl.max(MIN_TTL).to_string(),
            });
            let made = self.post(&format!("/dns/create/{}", zone.id), body).await?;
            let mut created = record.clone();
            created.id = made["id"]
                .as_u64()
                .map(|id| id.to_string())
                .or_else(|| made["id"].as_str().map(str::to_owned));
            Ok(created)
        })
    }

    fn delete<'a>(
        &'a self,
        zone: &'a Zone,
        record: &'a Record,
    ) -> BoxFuture<'a, Result<(), DnsError>> {
        Box::pin(async move {
            // Porkbun answers every call with a POST, a delete too.
            for id in ids_of(self, zone, record).await? {
                self.post(&format!("/dns/delete/{}/{id}", zone.id), json!({}))
                    .await?;
            }
            Ok(())
        })
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
    for r in v["records"].as_array().into_iter().flatten() {
        let _ = record(r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_as_porkbun_writes_them() {
        let r = record(&json!({"id": "106926659", "name": "_acme-challenge.www.example.com", "type": "TXT", "content": "abc", "ttl": "600", "prio": "0", "notes": ""})).unwrap();
        assert_eq!(r.name, "_acme-challenge.www.example.com");
        assert_eq!(r.data, Data::Txt("abc".into()));
        assert_eq!(r.id.as_deref(), Some("106926659"));
        assert_eq!(r.ttl, 600);
        let zone = Zone {
            name: "example.com".into(),
            id: "example.com".into(),
        };
        assert_eq!(relative(&zone, "example.com", "").as_deref(), Some(""));
        assert_eq!(
            relative(&zone, "www.example.com", "").as_deref(),
            Some("www")
        );
    }
}
