//! Hetzner's DNS in the Hetzner Cloud API (`/v1/zones`, what lego uses since the standalone DNS
//! API was deprecated), with a project API token: zones and record sets (`rrsets`, named
//! relative to the zone, `@` the apex) paged by `meta.pagination`; values added to and removed
//! from a record set by actions (`add_records`, `remove_records`) that are polled until they
//! succeed or fail. TXT values are quoted strings. Errors carry Hetzner's `error.code` and
//! `error.message`.

use std::{net::SocketAddr, time::Duration};

use serde_json::{json, Value};

use super::{
    rest::{presentation, public_resolvers, relative, set_records, Credential, JsonApi},
    BoxFuture, DnsError, Provider, Record, Rtype, Zone,
};

/// Hetzner's largest page.
const PER_PAGE: u32 = 100;
/// Between two looks at a running action.
const ACTION_POLL: Duration = Duration::from_millis(500);

/// The API and the token.
#[derive(Debug)]
pub struct Hetzner {
    api: JsonApi,
    /// How long an action may run.
    timeout: Duration,
}

impl Hetzner {
    /// `base` is the API root with its version (`https://api.hetzner.cloud/v1`).
    pub fn new(base: &str, token: &str, timeout: Duration) -> Result<Self, super::SetupError> {
        let bearer = Credential::Header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        Ok(Self {
            api: JsonApi::new("hetzner", base, bearer, timeout, explain)?,
            timeout,
        })
    }

    /// Every item of `key` across the pages of `path`.
    async fn all(&self, path: &str, key: &str) -> Result<Vec<Value>, DnsError> {
        let size = format!("per_page={PER_PAGE}");
        self.api
            .paged(path, &size, key, |body, _| {
                body["meta"]["pagination"]["next_page"].as_u64().is_none()
            })
            .await
    }

    /// Run `action` on the record set of `record` and wait until it is done.
    async fn change(
        &self,
        zone: &Zone,
        record: &Record,
        action: &str,
        body: Value,
    ) -> Result<(), DnsError> {
        let relative = self.api.relative_in(zone, &record.name, "@")?;
        let path = format!(
            "/zones/{}/rrsets/{relative}/{}/actions/{action}",
            zone.id,
            record.data.rtype().as_str()
        );
        let started = self.api.call(http::Method::POST, &path, Some(body)).await?;
        let mut action = started["action"].clone();
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            match action["status"].as_str() {
                Some("success") => return Ok(()),
                Some("error") => {
                    return Err(self.api.fail(format!(
                        "{path}: the action failed: {}",
                        explain(&action).unwrap_or_else(|| action["error"].to_string())
                    )))
                }
                _ => {}
            }
            let Some(id) = action["id"].as_u64() else {
                return Err(self.api.fail(format!("{path}: no action in {started}")));
            };
            if tokio::time::Instant::now() + ACTION_POLL > deadline {
                return Err(self.api.fail(format!(
                    "{path}: action {id} still running after {:?}",
                    self.timeout
                )));
            }
            tokio::time::sleep(ACTION_POLL).await;
            action = self
                .api
                .call(http::Method::GET, &format!("/actions/{id}"), None)
                .await?["action"]
                .clone();
        }
    }
}

/// `{"error": {"code": "invalid_input", "message": "...", "details": {...}}}`
fn explain(body: &Value) -> Option<String> {
    let e = &body["error"];
    Some(format!(
        "{}: {}",
        e["code"].as_str()?,
        e["message"].as_str()?
    ))
}

/// A record set's values as ours.
fn records(zone: &Zone, set: &Value) -> Vec<Record> {
    let (Some(name), Some(rtype)) = (set["name"].as_str(), set["type"].as_str()) else {
        return Vec::new();
    };
    let owner = match name {
        "@" => zone.name.clone(),
        n => format!("{n}.{}", zone.name),
    };
    let ttl = u32::try_from(set["ttl"].as_u64().unwrap_or(0)).unwrap_or(u32::MAX);
    let values: Vec<String> = set["records"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["value"].as_str().map(str::to_owned))
        .collect();
    set_records(&owner.to_ascii_lowercase(), rtype, ttl, &values)
}

impl Provider for Hetzner {
    fn name(&self) -> &'static str {
        "hetzner"
    }

    fn zones(&self) -> BoxFuture<'_, Result<Vec<Zone>, DnsError>> {
        Box::pin(async move {
            let zones = self.all("/zones", "zones").await?;
            Ok(zones
                .iter()
                .filter(|z| z["mode"].as_str() != Some("secondary"))
                .filter_map(|z| {
                    Some(Zone {
                        name: z["name"]
                            .as_str()?
                            .trim_end_matches('.')
                            .to_ascii_lowercase(),
                        id: z["id"].as_u64()?.to_string(),
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
            let Some(relative) = relative(zone, name, "@") else {
                return Ok(Vec::new());
            };
            let sets = self
                .all(
                    &format!(
                        "/zones/{}/rrsets?name={relative}&type={}",
                        zone.id,
                        rtype.as_str()
                    ),
                    "rrsets",
                )
                .await?;
            Ok(sets.iter().flat_map(|set| records(zone, set)).collect())
        })
    }

    fn create<'a>(
        &'a self,
        zone: &'a Zone,
        record: &'a Record,
    ) -> BoxFuture<'a, Result<Record, DnsError>> {
        Box::pin(async move {
            let v = presentation(&record.data).ok_or_else(|| {
                self.api.fail(format!(
                    "{} records are not written",
                    record.data.rtype().as_str()
                ))
            })?;
            let body = json!({"ttl": record.ttl.max(60), "records": [{"value": v}]});
            self.change(zone, record, "add_records", body).await?;
            Ok(record.clone())
        })
    }

    fn delete<'a>(
        &'a self,
        zone: &'a Zone,
        record: &'a Record,
    ) -> BoxFuture<'a, Result<(), DnsError>> {
        Box::pin(async move {
            let v = presentation(&record.data).ok_or_else(|| {
                self.api.fail(format!(
                    "{} records are not written",
                    record.data.rtype().as_str()
                ))
            })?;
            self.change(
                zone,
                record,
                "remove_records",
                json!({"records": [{"value": v}]}),
            )
            .await
        })
    }

    fn default_resolvers(&self) -> BoxFuture<'_, Vec<SocketAddr>> {
        Box::pin(async { public_resolvers() })
    }
}

/// Everything read from an answer body: the error words and the record sets.
#[doc(hidden)]
pub fn read_answer(body: &[u8]) {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    let zone = Zone {
        name: "example.com".into(),
        id: "example.com".into(),
    };
    let _ = explain(&v);
    for set in v["rrsets"].as_array().into_iter().flatten() {
        let _ = records(&zone, set);
    }
}

#[cfg(test)]
mod tests {
    use super::{super::Data, *};

    #[test]
    fn values_and_record_sets_read_as_hetzner_writes_them() {
        assert_eq!(
            presentation(&Data::Txt("abc:443".into())).unwrap(),
            "\"abc:443\""
        );
        let long = "x".repeat(300);
        assert_eq!(
            presentation(&Data::Txt(long.clone())).unwrap(),
            format!("\"{}\" \"{}\"", &long[..255], &long[255..])
        );
        assert_eq!(
            presentation(&Data::Cname("gw.example.net".into())).unwrap(),
            "gw.example.net."
        );
        let zone = Zone {
            name: "example.com".into(),
            id: "42".into(),
        };
        let set = json!({"id": "www/TXT", "name": "www", "type": "TXT", "ttl": 60, "records": [{"value": "\"a\" \"b\"", "comment": ""}], "zone": 42});
        let r = records(&zone, &set);
        assert_eq!(r[0].name, "www.example.com");
        assert_eq!(r[0].data, Data::Txt("ab".into()));
        let caa = json!({"name": "@", "type": "CAA", "ttl": null, "records": [{"value": "0 issue \"letsencrypt.org\""}]});
        assert_eq!(records(&zone, &caa)[0].name, "example.com");
        assert_eq!(relative(&zone, "example.com", "@").as_deref(), Some("@"));
        assert_eq!(relative(&zone, "other.org", "@"), None);
    }
}
