//! Google Cloud DNS (API v1) with a service account: an OAuth access token from the JWT-bearer
//! grant (RS256 over `iss`, `scope`, `aud`, `iat`, `exp`, signed with the key file's RSA key),
//! kept until shortly before it expires and fetched again after a 401; public managed zones
//! (paged by `pageToken`, or the one `GCE_ZONE_ID` names); record sets (a name and type with
//! every value in `rrdatas`) changed atomically: one change deletes the set exactly as listed
//! and adds it back with the value added or removed, polled until `done`. Errors carry
//! Google's `error.code`, `errors[0].reason` and `error.message`.

use std::{
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http_body_util::Full;
use serde_json::{json, Value};

use super::{
    rest::{parse_presentation, presentation, public_resolvers, set_records, Https},
    BoxFuture, DnsError, Provider, Record, Rtype, Zone,
};

/// The scope Cloud DNS changes need.
pub const SCOPE: &str = "https://www.googleapis.com/auth/ndev.clouddns.readwrite";
/// An access token is fetched again this long before it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(60);
/// Pages of zones followed at most.
const MAX_PAGES: usize = 100;
/// A change that meets a concurrent one (412, 409) is read and made again this often.
const ATTEMPTS: u32 = 3;

pub use crate::config::dns::ServiceAccount;

impl ServiceAccount {
    /// The signed JWT-bearer assertion at `now` (valid an hour, back-dated ten seconds for
    /// clock skew, as Google's libraries do).
    pub fn assertion(&self, now: SystemTime) -> Result<String, String> {
        let iat = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            .saturating_sub(10);
        let header = json!({"alg": "RS256", "typ": "JWT", "kid": self.private_key_id});
        let claims = json!({
            "iss": self.client_email, "scope": SCOPE, "aud": self.token_uri,
            "iat": iat, "exp": iat + 3600,
        });
        let signing_input = format!(
            "{}.{}",
            crate::base64url::encode(header.to_string().as_bytes()),
            crate::base64url::encode(claims.to_string().as_bytes())
        );
        let mut sig = vec![0; self.key.public_modulus_len()];
        self.key
            .sign(
                &aws_lc_rs::signature::RSA_PKCS1_SHA256,
                &aws_lc_rs::rand::SystemRandom::new(),
                signing_input.as_bytes(),
                &mut sig,
            )
            .map_err(|_| "RSA signing failed".to_owned())?;
        Ok(format!(
            "{signing_input}.{}",
            crate::base64url::encode(&sig)
        ))
    }
}

/// How the provider is set up.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `https://dns.googleapis.com/dns/v1`.
    pub api_url: String,
    /// The project.
    pub project: String,
    /// The service account.
    pub account: ServiceAccount,
    /// The one managed zone to write (name or id); unset: every public zone listed.
    pub zone: Option<String>,
    /// Between two looks at a pending change, and at most.
    pub sync: (Duration, Duration),
}

/// The API, the token and the one-change-at-a-time lock.
pub struct GoogleCloud {
    https: Https,
    settings: Settings,
    token: tokio::sync::Mutex<Option<(String, tokio::time::Instant)>>,
    changing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for GoogleCloud {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GoogleCloud")
            .field("project", &self.settings.project)
            .field("account", &self.settings.account)
            .finish_non_exhaustive()
    }
}

fn fail(message: String) -> DnsError {
    DnsError::Provider {
        provider: "gcloud",
        message,
    }
}

/// `{"error": {"code", "message", "errors": [{"reason"}]}}`, or OAuth's `{"error",
/// "error_description"}`.
fn explain(body: &Value) -> Option<String> {
    let e = &body["error"];
    if let Some(code) = e.as_str() {
        return Some(format!(
            "{code}: {}",
            body["error_description"].as_str().unwrap_or_default()
        ));
    }
    let reason = e["errors"][0]["reason"]
        .as_str()
        .or_else(|| e["status"].as_str())
        .unwrap_or("error");
    Some(format!("{reason}: {}", e["message"].as_str()?))
}

/// One record set as listed.
#[derive(Clone, Debug, PartialEq)]
struct RrSet {
    name: String,
    rtype: String,
    ttl: u64,
    rrdatas: Vec<String>,
}

impl RrSet {
    fn read(v: &Value) -> Option<Self> {
        Some(Self {
            name: v["name"]
                .as_str()?
                .trim_end_matches('.')
                .to_ascii_lowercase(),
            rtype: v["type"].as_str()?.to_owned(),
            ttl: v["ttl"].as_u64().unwrap_or(300),
            rrdatas: v["rrdatas"]
                .as_array()?
                .iter()
                .filter_map(|d| d.as_str().map(str::to_owned))
                .collect(),
        })
    }

    fn json(&self) -> Value {
        json!({"kind": "dns#resourceRecordSet", "name": format!("{}.", self.name), "type": self.rtype, "ttl": self.ttl, "rrdatas": self.rrdatas})
    }
}

impl GoogleCloud {
    /// Calls end after `timeout` each.
    pub fn new(settings: Settings, timeout: Duration) -> Result<Self, super::SetupError> {
        Ok(Self {
            https: Https::new(timeout)?,
            settings,
            token: tokio::sync::Mutex::new(None),
            changing: tokio::sync::Mutex::new(()),
        })
    }

    /// An access token: the one held, or a new one from the JWT-bearer grant.
    async fn token(&self, fresh: bool) -> Result<String, DnsError> {
        let mut held = self.token.lock().await;
        if let Some((token, until)) = held.as_ref() {
            if !fresh && tokio::time::Instant::now() < *until {
                return Ok(token.clone());
            }
        }
        let account = &self.settings.account;
        let assertion = account.assertion(SystemTime::now()).map_err(fail)?;
        let form = format!(
            "grant_type={}&assertion={assertion}",
            super::sigv4::encode("urn:ietf:params:oauth:grant-type:jwt-bearer")
        );
        let req = http::Request::post(&account.token_uri)
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(Full::new(Bytes::from(form)))
            .map_err(|e| fail(format!("token: {e}")))?;
        let what = format!("POST {}", account.token_uri);
        let super::rest::Answer { status, body, .. } = self
            .https
            .exchange(req)
            .await
            .map_err(|e| fail(format!("{what}: {e}")))?;
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if !status.is_success() {
            let said = explain(&v).unwrap_or_else(|| String::from_utf8_lossy(&body).into());
            return Err(fail(format!(
                "{what}: HTTP {status}: {said} (the service account {} could not sign in)",
                account.client_email
            )));
        }
        let token = v["access_token"]
            .as_str()
            .ok_or_else(|| fail(format!("{what}: no access_token in the answer")))?
            .to_owned();
        let lifetime = Duration::from_secs(v["expires_in"].as_u64().unwrap_or(3600));
        *held = Some((
            token.clone(),
            tokio::time::Instant::now() + lifetime.saturating_sub(TOKEN_MARGIN),
        ));
        Ok(token)
    }

    /// One call under the project; the JSON answer. A 401 fetches a new token once.
    async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, DnsError> {
        let url = format!(
            "{}/projects/{}{path}",
            self.settings.api_url.trim_end_matches('/'),
            self.settings.project
        );
        let what = format!("{method} {url}");
        for fresh in [false, true] {
            let token = self.token(fresh).await?;
            let req = http::Request::builder()
                .method(method.clone())
                .uri(&url)
                .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(
                    body.as_ref().map(Value::to_string).unwrap_or_default(),
                )))
                .map_err(|e| fail(format!("{what}: {e}")))?;
            let answer = self
                .https
                .exchange(req)
                .await
                .map_err(|e| fail(format!("{what}: {e}")))?;
            let (status, bytes) = (answer.status, &answer.body);
            let v: Value = serde_json::from_slice(bytes).unwrap_or_else(|_| {
                Value::String(String::from_utf8_lossy(bytes).chars().take(300).collect())
            });
            if status.is_success() {
                return Ok(v);
            }
            if status == http::StatusCode::UNAUTHORIZED && !fresh {
                continue;
            }
            let said = explain(&v).unwrap_or_else(|| v.to_string());
            return Err(answer.refusal("gcloud", format!("{what}: HTTP {status}: {said}")));
        }
        Err(fail(format!("{what}: unauthorized with a new token")))
    }

    /// The set at `name` and `rtype`, as listed.
    async fn set(&self, zone: &Zone, name: &str, rtype: Rtype) -> Result<Option<RrSet>, DnsError> {
        let path = format!(
            "/managedZones/{}/rrsets?name={}&type={}",
            zone.id,
            super::sigv4::encode(&format!("{name}.")),
            rtype.as_str()
        );
        let v = self.call(http::Method::GET, &path, None).await?;
        Ok(v["rrsets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(RrSet::read)
            .find(|s| s.name == name && s.rtype == rtype.as_str()))
    }

    /// One atomic change (the deletion exactly as listed) and the wait until it is done.
    async fn change(
        &self,
        zone: &Zone,
        deletion: Option<&RrSet>,
        addition: Option<&RrSet>,
    ) -> Result<(), DnsError> {
        let body = json!({
            "kind": "dns#change",
            "deletions": deletion.map(RrSet::json).into_iter().collect::<Vec<_>>(),
            "additions": addition.map(RrSet::json).into_iter().collect::<Vec<_>>(),
        });
        let path = format!("/managedZones/{}/changes", zone.id);
        let mut change = self.call(http::Method::POST, &path, Some(body)).await?;
        let (interval, limit) = self.settings.sync;
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match change["status"].as_str() {
                Some("done") => return Ok(()),
                Some(_) => {}
                None => return Err(fail(format!("{path}: no status in {change}"))),
            }
            let id = change["id"].as_str().unwrap_or_default().to_owned();
            if tokio::time::Instant::now() + interval > deadline {
                return Err(fail(format!(
                    "change {id} still pending after {limit:?}: Cloud DNS has not sent it to its nameservers"
                )));
            }
            tokio::time::sleep(interval).await;
            change = self
                .call(http::Method::GET, &format!("{path}/{id}"), None)
                .await?;
        }
    }

    /// Read the set, compute the new one, change it; again when another writer got there
    /// first (Cloud DNS answers 412 or 409).
    async fn rewrite(
        &self,
        zone: &Zone,
        record: &Record,
        edit: impl Fn(Option<&RrSet>) -> Option<Option<RrSet>>,
    ) -> Result<(), DnsError> {
        let _one = self.changing.lock().await;
        let mut last = None;
        for _ in 0..ATTEMPTS {
            let current = self.set(zone, &record.name, record.data.rtype()).await?;
            let Some(next) = edit(current.as_ref()) else {
                return Ok(());
            };
            match self.change(zone, current.as_ref(), next.as_ref()).await {
                Err(e)
                    if e.to_string().contains("HTTP 412") || e.to_string().contains("HTTP 409") =>
                {
                    last = Some(e);
                }
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| fail("no attempt made".into())))
    }
}

impl Provider for GoogleCloud {
    fn name(&self) -> &'static str {
        "gcloud"
    }

    fn zones(&self) -> BoxFuture<'_, Result<Vec<Zone>, DnsError>> {
        Box::pin(async move {
            let read = |z: &Value| {
                if z["visibility"].as_str() == Some("private") {
                    return None;
                }
                Some(Zone {
                    name: z["dnsName"]
                        .as_str()?
                        .trim_end_matches('.')
                        .to_ascii_lowercase(),
                    id: z["name"].as_str()?.to_owned(),
                })
            };
            if let Some(zone) = &self.settings.zone {
                let z = self
                    .call(http::Method::GET, &format!("/managedZones/{zone}"), None)
                    .await?;
                return Ok(read(&z).into_iter().collect());
            }
            let mut zones = Vec::new();
            let mut token: Option<String> = None;
            for _ in 0..MAX_PAGES {
                let path = match &token {
                    Some(t) => format!("/managedZones?pageToken={}", super::sigv4::encode(t)),
                    None => "/managedZones".to_owned(),
                };
                let page = self.call(http::Method::GET, &path, None).await?;
                zones.extend(
                    page["managedZones"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(read),
                );
                match page["nextPageToken"].as_str() {
                    Some(t) if !t.is_empty() => token = Some(t.to_owned()),
                    _ => break,
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
            let Some(set) = self.set(zone, name, rtype).await? else {
                return Ok(Vec::new());
            };
            let ttl = u32::try_from(set.ttl).unwrap_or(u32::MAX);
            Ok(set_records(&set.name, &set.rtype, ttl, &set.rrdatas))
        })
    }

    fn create<'a>(
        &'a self,
        zone: &'a Zone,
        record: &'a Record,
    ) -> BoxFuture<'a, Result<Record, DnsError>> {
        Box::pin(async move {
            let rtype = record.data.rtype();
            let value = presentation(&record.data)
                .ok_or_else(|| fail(format!("{} records are not written", rtype.as_str())))?;
            self.rewrite(zone, record, |current| {
                let holds = |v: &String| {
                    parse_presentation(rtype.as_str(), v).is_some_and(|d| d.same(&record.data))
                };
                match current {
                    Some(set) if set.rrdatas.iter().any(holds) => None,
                    Some(set) => {
                        let mut next = set.clone();
                        next.rrdatas.push(value.clone());
                        Some(Some(next))
                    }
                    None => Some(Some(RrSet {
                        name: record.name.clone(),
                        rtype: rtype.as_str().to_owned(),
                        ttl: u64::from(record.ttl.max(1)),
                        rrdatas: vec![value.clone()],
                    })),
                }
            })
            .await?;
            Ok(record.clone())
        })
    }

    fn delete<'a>(
        &'a self,
        zone: &'a Zone,
        record: &'a Record,
    ) -> BoxFuture<'a, Result<(), DnsError>> {
        Box::pin(async move {
            let rtype = record.data.rtype();
            self.rewrite(zone, record, |current| {
                let set = current?;
                let rest: Vec<String> = set
                    .rrdatas
                    .iter()
                    .filter(|v| {
                        !parse_presentation(rtype.as_str(), v).is_some_and(|d| d.same(&record.data))
                    })
                    .cloned()
                    .collect();
                if rest.len() == set.rrdatas.len() {
                    return None;
                }
                Some((!rest.is_empty()).then(|| RrSet {
                    rrdatas: rest,
                    ..set.clone()
                }))
            })
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
    let _ = explain(&v);
    for set in v["rrsets"].as_array().into_iter().flatten() {
        if let Some(set) = RrSet::read(set) {
            let _ = set.json();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_that_cannot_sign_are_refused_with_the_reason() {
        let e = ServiceAccount::from_json(r#"{"type": "authorized_user", "client_id": "x"}"#)
            .unwrap_err();
        assert!(e.contains("not \"service_account\""), "{e}");
        let e = ServiceAccount::from_json(r#"{"type": "service_account", "private_key": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "client_email": "a@b", "private_key_id": "k"}"#).unwrap_err();
        assert!(e.contains("private_key"), "{e}");
        assert!(ServiceAccount::from_json("{")
            .unwrap_err()
            .contains("not JSON"));
        assert_eq!(
            explain(&json!({"error": {"code": 412, "message": "Precondition not met for 'entity.change.deletions[0]'", "errors": [{"domain": "global", "reason": "conditionNotMet"}]}})).unwrap(),
            "conditionNotMet: Precondition not met for 'entity.change.deletions[0]'"
        );
        assert_eq!(
            explain(
                &json!({"error": "invalid_grant", "error_description": "Invalid JWT Signature."})
            )
            .unwrap(),
            "invalid_grant: Invalid JWT Signature."
        );
    }
}
