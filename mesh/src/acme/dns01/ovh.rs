//! OVHcloud's API (`/1.0/domain/zone`): with an application key, secret and consumer key,
//! every call signed (`X-Ovh-Signature: $1$` + SHA-1 of secret, consumer key, method, full
//! URL, body and timestamp, joined by `+`) at the server's time (`/auth/time`, its offset
//! kept); or with an OAuth2 client (client credentials, scope `all`) or an access token as a
//! bearer. Records are listed by id (`?fieldType=&subDomain=`), read one by one, created and
//! deleted by id, and every change is published with `POST /domain/zone/{zone}/refresh`. OVH
//! quotes TXT targets itself; CNAME targets are fully qualified (a trailing dot, else OVH
//! appends the zone). Errors carry OVH's `class` (or `errorCode`) and `message`.

use std::{
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http_body_util::Full;
use serde_json::{json, Value};

use super::{
    rest::{public_resolvers, relative, Https},
    BoxFuture, Data, DnsError, Provider, Record, Rtype, Zone,
};

/// How calls prove who makes them.
#[derive(Clone)]
pub enum Auth {
    /// Application key, secret and consumer key: each call signed.
    Signed {
        /// `OVH_APPLICATION_KEY`.
        application_key: String,
        /// `OVH_APPLICATION_SECRET`.
        application_secret: String,
        /// `OVH_CONSUMER_KEY`.
        consumer_key: String,
    },
    /// An OAuth2 client (client credentials grant, scope `all`).
    OAuth2 {
        /// `OVH_CLIENT_ID`.
        client_id: String,
        /// `OVH_CLIENT_SECRET`.
        client_secret: String,
        /// The endpoint's token URL.
        token_url: String,
    },
    /// A bearer token as given (`OVH_ACCESS_TOKEN`).
    Token(String),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Signed { .. } => "Signed",
            Self::OAuth2 { .. } => "OAuth2",
            Self::Token(_) => "Token",
        })
    }
}

/// The API and how to call it.
pub struct Ovh {
    https: Https,
    base: String,
    auth: Auth,
    /// Our clock minus OVH's, in seconds, once asked.
    delta: tokio::sync::OnceCell<i64>,
    /// The OAuth2 access token and when to fetch another.
    token: tokio::sync::Mutex<Option<(String, tokio::time::Instant)>>,
}

impl std::fmt::Debug for Ovh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ovh")
            .field("base", &self.base)
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

fn fail(message: String) -> DnsError {
    DnsError::Provider {
        provider: "ovh",
        message,
    }
}

/// `$1$` + hex(SHA-1(secret+consumer+METHOD+url+body+timestamp)).
pub fn signature(
    secret: &str,
    consumer: &str,
    method: &str,
    url: &str,
    body: &str,
    timestamp: i64,
) -> String {
    let input = format!("{secret}+{consumer}+{method}+{url}+{body}+{timestamp}");
    let digest = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY,
        input.as_bytes(),
    );
    format!("$1${}", hex::encode(digest))
}

/// `{"class", "message"}` (or the older `{"errorCode", "httpCode", "message"}`).
fn explain(body: &Value) -> Option<String> {
    let message = body["message"].as_str()?;
    match body["class"]
        .as_str()
        .or_else(|| body["errorCode"].as_str())
    {
        Some(class) => Some(format!("{class}: {message}")),
        None => Some(message.to_owned()),
    }
}

/// A record's target as OVH takes it.
fn target(data: &Data) -> Option<String> {
    Some(match data {
        Data::Txt(v) => v.clone(),
        Data::Cname(t) => format!("{t}."),
        Data::Caa {
            critical,
            tag,
            value,
        } => format!("{} {tag} \"{value}\"", if *critical { 128 } else { 0 }),
        Data::Other(..) => return None,
    })
}

/// A target as ours (OVH returns TXT quoted, whether or not it was sent so).
fn data_of(rtype: &str, target: &str) -> Option<Data> {
    Some(match rtype {
        "TXT" => match target.starts_with('"') {
            true => Data::Txt(super::doh::txt(target)),
            false => Data::Txt(target.to_owned()),
        },
        "CNAME" => Data::Cname(target.trim_end_matches('.').to_ascii_lowercase()),
        "CAA" => super::doh::caa(target)?,
        "A" => Data::Other(Rtype::A, target.to_owned()),
        "AAAA" => Data::Other(Rtype::Aaaa, target.to_owned()),
        _ => return None,
    })
}

impl Ovh {
    /// `base` is the endpoint's root with its version (`https://eu.api.ovh.com/1.0`).
    pub fn new(base: &str, auth: Auth, timeout: Duration) -> Result<Self, super::SetupError> {
        Ok(Self {
            https: Https::new(timeout)?,
            base: base.trim_end_matches('/').to_owned(),
            auth,
            delta: tokio::sync::OnceCell::new(),
            token: tokio::sync::Mutex::new(None),
        })
    }

    /// OVH's clock now (ours, corrected by the offset asked of `/auth/time` once).
    async fn timestamp(&self) -> Result<i64, DnsError> {
        let now = || {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
        };
        let delta = self
            .delta
            .get_or_try_init(|| async {
                let url = format!("{}/auth/time", self.base);
                let req = http::Request::get(&url)
                    .body(Full::new(Bytes::new()))
                    .map_err(|e| fail(format!("GET {url}: {e}")))?;
                let super::rest::Answer { status, body, .. } = self
                    .https
                    .exchange(req)
                    .await
                    .map_err(|e| fail(format!("GET {url}: {e}")))?;
                let server: i64 = String::from_utf8_lossy(&body)
                    .trim()
                    .parse()
                    .map_err(|_| fail(format!("GET {url}: HTTP {status}: not a time")))?;
                Ok::<_, DnsError>(now() - server)
            })
            .await?;
        Ok(now() - delta)
    }

    /// The OAuth2 access token (client credentials), fetched again when it expires.
    async fn oauth2(&self, id: &str, secret: &str, url: &str) -> Result<String, DnsError> {
        let mut held = self.token.lock().await;
        if let Some((token, until)) = held.as_ref() {
            if tokio::time::Instant::now() < *until {
                return Ok(token.clone());
            }
        }
        let basic = crate::base64url::encode_standard(format!("{id}:{secret}").as_bytes());
        let req = http::Request::post(url)
            .header(http::header::AUTHORIZATION, format!("Basic {basic}"))
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(Full::new(Bytes::from_static(
                b"grant_type=client_credentials&scope=all",
            )))
            .map_err(|e| fail(format!("POST {url}: {e}")))?;
        let super::rest::Answer { status, body, .. } = self
            .https
            .exchange(req)
            .await
            .map_err(|e| fail(format!("POST {url}: {e}")))?;
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if !status.is_success() {
            return Err(fail(format!(
                "POST {url}: HTTP {status}: {}: {}",
                v["error"].as_str().unwrap_or("error"),
                v["error_description"].as_str().unwrap_or_default()
            )));
        }
        let token = v["access_token"]
            .as_str()
            .ok_or_else(|| fail(format!("POST {url}: no access_token")))?
            .to_owned();
        let life = Duration::from_secs(v["expires_in"].as_u64().unwrap_or(3600));
        *held = Some((
            token.clone(),
            tokio::time::Instant::now() + life.saturating_sub(Duration::from_secs(60)),
        ));
        Ok(token)
    }

    /// One call to `path` (query included) with `body`; the JSON answer.
    async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, DnsError> {
        let url = format!("{}{path}", self.base);
        let what = format!("{method} {url}");
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut req = http::Request::builder()
            .method(method.clone())
            .uri(&url)
            .header(http::header::ACCEPT, "application/json");
        if !body.is_empty() {
            req = req.header(http::header::CONTENT_TYPE, "application/json;charset=utf-8");
        }
        match &self.auth {
            Auth::Signed {
                application_key,
                application_secret,
                consumer_key,
            } => {
                let ts = self.timestamp().await?;
                req = req
                    .header("X-Ovh-Application", application_key)
                    .header("X-Ovh-Consumer", consumer_key)
                    .header("X-Ovh-Timestamp", ts.to_string())
                    .header(
                        "X-Ovh-Signature",
                        signature(
                            application_secret,
                            consumer_key,
                            method.as_str(),
                            &url,
                            &body,
                            ts,
                        ),
                    );
            }
            Auth::OAuth2 {
                client_id,
                client_secret,
                token_url,
            } => {
                let token = self.oauth2(client_id, client_secret, token_url).await?;
                req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
            }
            Auth::Token(token) => {
                req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
            }
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| fail(format!("{what}: {e}")))?;
        let answer = self
            .https
            .exchange(req)
            .await
            .map_err(|e| fail(format!("{what}: {e}")))?;
        let (status, bytes) = (answer.status, &answer.body);
        let v: Value = match bytes.is_empty() {
            true => Value::Null,
            false => serde_json::from_slice(bytes).unwrap_or_else(|_| {
                Value::String(String::from_utf8_lossy(bytes).chars().take(300).collect())
            }),
        };
        if status.is_success() {
            return Ok(v);
        }
        let said = explain(&v).unwrap_or_else(|| v.to_string());
        Err(answer.refusal("ovh", format!("{what}: HTTP {status}: {said}")))
    }

    /// Publish the zone's changes.
    async fn refresh(&self, zone: &Zone) -> Result<(), DnsError> {
        self.call(
            http::Method::POST,
            &format!("/domain/zone/{}/refresh", zone.name),
            None,
        )
        .await
        .map(drop)
    }

    /// The ids of the `rtype` records at `sub` (relative, empty for the apex).
    async fn ids(&self, zone: &Zone, sub: &str, rtype: &str) -> Result<Vec<u64>, DnsError> {
        let path = format!(
            "/domain/zone/{}/record?fieldType={rtype}&subDomain={}",
            zone.name,
            super::sigv4::encode(sub)
        );
        Ok(self
            .call(http::Method::GET, &path, None)
            .await?
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_u64)
            .collect())
    }
}

impl Provider for Ovh {
    fn name(&self) -> &'static str {
        "ovh"
    }

    fn zones(&self) -> BoxFuture<'_, Result<Vec<Zone>, DnsError>> {
        Box::pin(async move {
            let names = self.call(http::Method::GET, "/domain/zone", None).await?;
            Ok(names
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(|n| {
                    let name = n.trim_end_matches('.').to_ascii_lowercase();
                    Zone {
                        id: name.clone(),
                        name,
                    }
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
            let Some(sub) = relative(zone, name, "") else {
                return Ok(Vec::new());
            };
            let mut records = Vec::new();
            for id in self.ids(zone, &sub, rtype.as_str()).await? {
                let r = self
                    .call(
                        http::Method::GET,
                        &format!("/domain/zone/{}/record/{id}", zone.name),
                        None,
                    )
                    .await?;
                let Some(data) = r["target"]
                    .as_str()
                    .and_then(|t| data_of(rtype.as_str(), t))
                else {
                    continue;
                };
                records.push(Record {
                    name: name.to_owned(),
                    data,
                    ttl: u32::try_from(r["ttl"].as_u64().unwrap_or(0)).unwrap_or(0),
                    id: Some(id.to_string()),
                });
            }
            Ok(records)
        })
    }

    fn create<'a>(
        &'a self,
        zone: &'a Zone,
        record: &'a Record,
    ) -> BoxFuture<'a, Result<Record, DnsError>> {
        Box::pin(async move {
            let sub = relative(zone, &record.name, "")
                .ok_or_else(|| fail(format!("{} is not in {}", record.name, zone.name)))?;
            let rtype = record.data.rtype();
            let target = target(&record.data)
                .ok_or_else(|| fail(format!("{} records are not written", rtype.as_str())))?;
            // OVH takes 0 (the zone's default) or at least 60 seconds.
            let mut body =
                json!({"fieldType": rtype.as_str(), "target": target, "ttl": record.ttl.max(60)});
            if !sub.is_empty() {
                body["subDomain"] = json!(sub);
            }
            let created = self
                .call(
                    http::Method::POST,
                    &format!("/domain/zone/{}/record", zone.name),
                    Some(body),
                )
                .await?;
            self.refresh(zone).await?;
            // OVH has been seen to answer id 0: then the id is not kept (deletion looks it up).
            let id = created["id"].as_u64().filter(|id| *id != 0);
            Ok(Record {
                id: id.map(|i| i.to_string()),
                ..record.clone()
            })
        })
    }

    fn delete<'a>(
        &'a self,
        zone: &'a Zone,
        record: &'a Record,
    ) -> BoxFuture<'a, Result<(), DnsError>> {
        Box::pin(async move {
            let ids = super::rest::ids_of(self, zone, record).await?;
            if ids.is_empty() {
                return Ok(());
            }
            for id in ids {
                let path = format!("/domain/zone/{}/record/{id}", zone.name);
                match self.call(http::Method::DELETE, &path, None).await {
                    // Gone already.
                    Err(e) if e.to_string().contains("HTTP 404") => {}
                    other => {
                        other?;
                    }
                }
            }
            self.refresh(zone).await
        })
    }

    fn default_resolvers(&self) -> BoxFuture<'_, Vec<SocketAddr>> {
        Box::pin(async { public_resolvers() })
    }
}

/// Everything read from an answer body: the error words and a record's target.
#[doc(hidden)]
pub fn read_answer(body: &[u8]) {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    let _ = explain(&v);
    if let (Some(rtype), Some(target)) = (v["fieldType"].as_str(), v["target"].as_str()) {
        let _ = data_of(rtype, target);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // OVH's own example (first steps with the API guide) and go-ovh's test vectors.
    #[test]
    fn signatures_match_ovhs_examples() {
        assert_eq!(
            signature(
                "EXEgWIz07P0HYwtQDs7cNIqCiQaWSuHF",
                "MtSwSrPpNjqfVSmJhLbPyr2i45lSwPU1",
                "GET",
                "https://eu.api.ovh.com/1.0/domain/",
                "",
                1_366_560_945
            ),
            "$1$6a77f43f2871db97a029f1d1d81c4dcd3c6f7265"
        );
        let (secret, consumer, ts) = (
            "9ufkBmLaTQ9nz5yMUlg79taH0GNnzDjk",
            "5mBuy6SUQcRw2ZUxg0cG68BoDKpED4KY",
            1_457_018_875,
        );
        assert_eq!(
            signature(
                secret,
                consumer,
                "POST",
                "https://eu.api.ovh.com/1.0/auth",
                "{\"a\":\"b\",\"c\":\"d\"}",
                ts
            ),
            "$1$ec2fb5c7a81f64723c77d2e5b609ae6f58a84fc1"
        );
        assert_eq!(
            signature(
                secret,
                consumer,
                "DELETE",
                "https://eu.api.ovh.com/1.0/auth",
                "",
                ts
            ),
            "$1$a1eecd00b3b02b6cf5708b84b9ff42059a950d85"
        );
    }

    #[test]
    fn targets_read_as_ovh_returns_them() {
        assert_eq!(
            data_of("TXT", "\"abc:443\""),
            Some(Data::Txt("abc:443".into()))
        );
        assert_eq!(data_of("TXT", "abc"), Some(Data::Txt("abc".into())));
        assert_eq!(
            target(&Data::Cname("gw.example.net".into())).as_deref(),
            Some("gw.example.net.")
        );
        assert_eq!(
            explain(
                &json!({"class": "Client::Forbidden", "message": "This call has not been granted"})
            )
            .as_deref(),
            Some("Client::Forbidden: This call has not been granted")
        );
        assert_eq!(
            explain(&json!({"errorCode": "INVALID_SIGNATURE", "httpCode": "400 Bad Request", "message": "Invalid signature"})).as_deref(),
            Some("INVALID_SIGNATURE: Invalid signature")
        );
    }
}
