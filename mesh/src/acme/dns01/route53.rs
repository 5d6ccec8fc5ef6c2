//! Amazon Route53 (REST/XML API 2013-04-01), every call signed with SigV4: hosted zones
//! (`ListHostedZones` paged by marker, or the one `AWS_HOSTED_ZONE_ID` names), record sets
//! (`ListResourceRecordSets`), and `ChangeResourceRecordSets` batches polled with `GetChange`
//! until `INSYNC`. A record set is one name and type holding every value: a value is added by
//! an `UPSERT` of the merged set, removed by an `UPSERT` of the rest or a `DELETE` of the set
//! exactly as listed, one change at a time so concurrent writers never drop each other's
//! values. Optionally through a role (`sts:AssumeRole`), its credentials renewed before they
//! expire. Errors carry Route53's `Code` and `Message` (or `InvalidChangeBatch`'s messages).

use std::{
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http_body_util::Full;

use super::{
    rest::{parse_presentation, presentation, public_resolvers, set_records, Https},
    sigv4::{self, Credentials, Scope},
    BoxFuture, Data, DnsError, Provider, Record, Rtype, Zone,
};

/// Route53's namespace, on every request body.
const XMLNS: &str = "https://route53.amazonaws.com/doc/2013-04-01/";
/// Route53 signs in this region whatever region the caller is in.
const ROUTE53_SCOPE: Scope<'static> = Scope {
    region: "us-east-1",
    service: "route53",
};
/// Attempts at a call Route53 throttles (`Throttling`, `PriorRequestNotComplete`) or fails
/// with a 5xx.
const ATTEMPTS: u32 = 4;
/// Assumed-role credentials are renewed this long before they expire.
const RENEW_BEFORE: Duration = Duration::from_secs(300);
/// How long an assumed role's credentials are asked for.
const ROLE_SESSION: Duration = Duration::from_secs(3600);

/// How the provider is set up.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The API root (`https://route53.amazonaws.com`).
    pub api_url: String,
    /// The key pair (and session token) calls are signed with, or that assumes the role.
    pub credentials: Credentials,
    /// A role to assume first, with its external id.
    pub role: Option<Role>,
    /// The one hosted zone to write (`AWS_HOSTED_ZONE_ID`); unset: every public zone listed.
    pub hosted_zone_id: Option<String>,
    /// Wait for each change to be `INSYNC`: between looks, and at most.
    pub sync: Option<(Duration, Duration)>,
}

/// `sts:AssumeRole`'s inputs.
#[derive(Clone, Debug)]
pub struct Role {
    /// `arn:aws:iam::<account>:role/<name>`.
    pub arn: String,
    /// The external id the role's trust policy asks for.
    pub external_id: Option<String>,
    /// STS's root (`https://sts.amazonaws.com`, or a regional one).
    pub sts_url: String,
    /// The region STS signs in.
    pub region: String,
}

/// The API, the credentials and the one-change-at-a-time lock.
pub struct Route53 {
    https: Https,
    settings: Settings,
    /// The role's credentials and when they expire.
    assumed: tokio::sync::Mutex<Option<(Credentials, SystemTime)>>,
    /// A value is added or removed by reading the set and writing it back: one at a time.
    changing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Route53 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route53")
            .field("api_url", &self.settings.api_url)
            .field("role", &self.settings.role.as_ref().map(|r| &r.arn))
            .finish_non_exhaustive()
    }
}

/// A failure, in Route53's name.
fn fail(message: String) -> DnsError {
    DnsError::Provider {
        provider: "route53",
        message,
    }
}

/// One record set as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
struct RecordSet {
    name: String,
    rtype: String,
    ttl: u32,
    values: Vec<String>,
}

impl Route53 {
    /// Calls end after `timeout` each.
    pub fn new(settings: Settings, timeout: Duration) -> Result<Self, super::SetupError> {
        Ok(Self {
            https: Https::new(timeout)?,
            settings,
            assumed: tokio::sync::Mutex::new(None),
            changing: tokio::sync::Mutex::new(()),
        })
    }

    /// The credentials to sign Route53 calls with: the key pair's, or the role's (assumed
    /// again when they are about to expire).
    async fn credentials(&self) -> Result<Credentials, DnsError> {
        let Some(role) = &self.settings.role else {
            return Ok(self.settings.credentials.clone());
        };
        let mut assumed = self.assumed.lock().await;
        if let Some((creds, expires)) = assumed.as_ref() {
            if SystemTime::now() + RENEW_BEFORE < *expires {
                return Ok(creds.clone());
            }
        }
        let (creds, expires) = self.assume(role).await?;
        tracing::info!(role = %role.arn, expires = %crate::clock::rfc3339_of(expires), "route53: role assumed");
        *assumed = Some((creds.clone(), expires));
        Ok(creds)
    }

    /// `sts:AssumeRole` with the key pair.
    async fn assume(&self, role: &Role) -> Result<(Credentials, SystemTime), DnsError> {
        let session = format!(
            "dstack-mesh-{}",
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        );
        let duration = ROLE_SESSION.as_secs().to_string();
        let mut form = vec![
            ("Action", "AssumeRole"),
            ("Version", "2011-06-15"),
            ("RoleArn", role.arn.as_str()),
            ("RoleSessionName", session.as_str()),
            ("DurationSeconds", duration.as_str()),
        ];
        if let Some(id) = &role.external_id {
            form.push(("ExternalId", id.as_str()));
        }
        let body = sigv4::query(&form);
        let scope = Scope {
            region: &role.region,
            service: "sts",
        };
        let text = self
            .send(
                &role.sts_url,
                scope,
                &self.settings.credentials,
                http::Method::POST,
                "/",
                &[],
                body.into_bytes(),
            )
            .await?;
        let doc = parse(&text)?;
        let creds = element(doc.root(), "Credentials").ok_or_else(|| {
            fail(format!(
                "sts:AssumeRole: no Credentials in {}",
                excerpt(&text)
            ))
        })?;
        let field = |name: &str| {
            text_of(creds, name)
                .map(str::to_owned)
                .ok_or_else(|| fail(format!("sts:AssumeRole: no {name} in its answer")))
        };
        let expiration = field("Expiration")?;
        let expires = time::OffsetDateTime::parse(
            &expiration,
            &time::format_description::well_known::Rfc3339,
        )
        .map(|t| SystemTime::UNIX_EPOCH + Duration::from_secs(t.unix_timestamp().max(0) as u64))
        .map_err(|e| fail(format!("sts:AssumeRole: Expiration {expiration:?}: {e}")))?;
        Ok((
            Credentials {
                access_key: field("AccessKeyId")?,
                secret_key: field("SecretAccessKey")?,
                session_token: Some(field("SessionToken")?),
            },
            expires,
        ))
    }

    /// One signed call to `base` + `path`; the answer's text on success, Route53's (or
    /// STS's) words otherwise. Throttling and 5xx answers are retried a few times.
    #[allow(clippy::too_many_arguments)]
    async fn send(
        &self,
        base: &str,
        scope: Scope<'_>,
        creds: &Credentials,
        method: http::Method,
        path: &str,
        query: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<String, DnsError> {
        let uri: http::Uri = base
            .parse()
            .map_err(|e| fail(format!("{base}: not a URL: {e}")))?;
        let host = uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .ok_or_else(|| fail(format!("{base}: no host")))?;
        let prefix = uri.path().trim_end_matches('/');
        let full_path = format!("{prefix}{path}");
        let query = sigv4::query(query);
        let url = match query.is_empty() {
            true => format!(
                "{}://{host}{full_path}",
                uri.scheme_str().unwrap_or("https")
            ),
            false => format!(
                "{}://{host}{full_path}?{query}",
                uri.scheme_str().unwrap_or("https")
            ),
        };
        let what = format!("{method} {url}");
        let mut wait = Duration::from_millis(300);
        for attempt in 1..=ATTEMPTS {
            let date = sigv4::amz_date(SystemTime::now());
            let content_type = match (method == http::Method::POST, scope.service) {
                (true, "sts") => Some("application/x-www-form-urlencoded; charset=utf-8"),
                (true, _) => Some("application/xml"),
                _ => None,
            };
            let mut headers: Vec<(&str, &str)> = vec![("host", &host), ("x-amz-date", &date)];
            if let Some(token) = &creds.session_token {
                headers.push(("x-amz-security-token", token));
            }
            if let Some(ct) = content_type {
                headers.push(("content-type", ct));
            }
            let authorization = sigv4::authorization(
                creds,
                scope,
                &date,
                &sigv4::Request {
                    method: method.as_str(),
                    path: &full_path,
                    query: &query,
                    headers: &headers,
                    body: &body,
                },
            );
            let mut req = http::Request::builder().method(method.clone()).uri(&url);
            for (name, value) in headers.iter().filter(|(n, _)| *n != "host") {
                req = req.header(*name, *value);
            }
            let req = req
                .header(http::header::AUTHORIZATION, authorization)
                .body(Full::new(Bytes::from(body.clone())))
                .map_err(|e| fail(format!("{what}: {e}")))?;
            let super::rest::Answer {
                status,
                body: bytes,
                ..
            } = self
                .https
                .exchange(req)
                .await
                .map_err(|e| fail(format!("{what}: {e}")))?;
            let text = String::from_utf8_lossy(&bytes).into_owned();
            if status.is_success() {
                return Ok(text);
            }
            let (code, said) = explain(&text);
            let retry = status.is_server_error()
                || matches!(
                    code.as_deref(),
                    Some("Throttling" | "PriorRequestNotComplete")
                );
            if retry && attempt < ATTEMPTS {
                tracing::debug!(%what, %status, code = ?code, "route53: retrying");
                tokio::time::sleep(wait).await;
                wait *= 2;
                continue;
            }
            return Err(fail(format!("{what}: HTTP {status}: {said}")));
        }
        Err(fail(format!("{what}: no attempt left")))
    }

    /// A signed Route53 call.
    async fn call(
        &self,
        method: http::Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<String>,
    ) -> Result<String, DnsError> {
        let creds = self.credentials().await?;
        self.send(
            &self.settings.api_url,
            ROUTE53_SCOPE,
            &creds,
            method,
            path,
            query,
            body.map(String::into_bytes).unwrap_or_default(),
        )
        .await
    }

    /// The record set of `name` and `rtype` in `zone`, if there is one (sets with a routing
    /// policy or an alias target are not ours and are left alone).
    async fn set(
        &self,
        zone: &Zone,
        name: &str,
        rtype: Rtype,
    ) -> Result<Option<RecordSet>, DnsError> {
        let fqdn = format!("{name}.");
        let text = self
            .call(
                http::Method::GET,
                &format!("/2013-04-01/hostedzone/{}/rrset", zone.id),
                &[
                    ("name", fqdn.as_str()),
                    ("type", rtype.as_str()),
                    ("maxitems", "300"),
                ],
                None,
            )
            .await?;
        Ok(record_sets(&text)?
            .into_iter()
            .find(|s| s.name == name && s.rtype == rtype.as_str()))
    }

    /// Submit one change of `set` and wait until Route53 has it everywhere (when asked to).
    async fn change(&self, zone: &Zone, action: &str, set: &RecordSet) -> Result<(), DnsError> {
        let body = change_batch(action, set);
        let text = self
            .call(
                http::Method::POST,
                &format!("/2013-04-01/hostedzone/{}/rrset/", zone.id),
                &[],
                Some(body),
            )
            .await?;
        let (id, status) = change_info(&text)?;
        let Some((interval, limit)) = self.settings.sync else {
            return Ok(());
        };
        let deadline = tokio::time::Instant::now() + limit;
        let mut status = status;
        while status != "INSYNC" {
            if tokio::time::Instant::now() + interval > deadline {
                return Err(fail(format!(
                    "change {id} ({action} {} {}) still {status} after {limit:?}: Route53 has not applied it on its nameservers",
                    set.rtype, set.name
                )));
            }
            tokio::time::sleep(interval).await;
            let text = self
                .call(
                    http::Method::GET,
                    &format!("/2013-04-01/change/{id}"),
                    &[],
                    None,
                )
                .await?;
            status = change_info(&text)?.1;
        }
        Ok(())
    }
}

/// `text` as an XML document (no DTDs: roxmltree refuses them).
fn parse(text: &str) -> Result<roxmltree::Document<'_>, DnsError> {
    roxmltree::Document::parse(text).map_err(|e| {
        fail(format!(
            "an answer that is not XML ({e}): {}",
            excerpt(text)
        ))
    })
}

/// The first element named `name` below `node`.
fn element<'a, 'i>(node: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    node.descendants()
        .find(|n| n.is_element() && n.tag_name().name() == name)
}

/// The text of `node`'s child element `name`.
fn text_of<'a>(node: roxmltree::Node<'a, '_>, name: &str) -> Option<&'a str> {
    node.children()
        .find(|n| n.is_element() && n.tag_name().name() == name)
        .and_then(|n| n.text())
        .map(str::trim)
}

/// The first 300 characters of an answer, for messages.
fn excerpt(text: &str) -> String {
    text.chars().take(300).collect()
}

/// The error code and the whole reason of an error answer: `ErrorResponse/Error/{Code,
/// Message}`, or `InvalidChangeBatch/Messages/Message`.
fn explain(text: &str) -> (Option<String>, String) {
    let Ok(doc) = roxmltree::Document::parse(text) else {
        return (None, excerpt(text));
    };
    let root = doc.root_element();
    if root.tag_name().name() == "InvalidChangeBatch" {
        let messages: Vec<&str> = root
            .descendants()
            .filter(|n| n.is_element() && n.tag_name().name() == "Message")
            .filter_map(|n| n.text())
            .collect();
        return (
            Some("InvalidChangeBatch".into()),
            format!("InvalidChangeBatch: {}", messages.join("; ")),
        );
    }
    match element(root, "Error") {
        Some(e) => {
            let code = text_of(e, "Code").map(str::to_owned);
            let said = format!(
                "{}: {}",
                code.as_deref().unwrap_or("error"),
                text_of(e, "Message").unwrap_or_default()
            );
            (code, said)
        }
        None => (None, excerpt(text)),
    }
}

/// Route53's `\ooo` escapes in returned names undone (`\052` is `*`), lowercase, no dot.
fn unescape(name: &str) -> String {
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match octal {
            Some(b) => {
                out.push(b);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out)
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

/// The record sets of a `ListResourceRecordSets` answer.
fn record_sets(text: &str) -> Result<Vec<RecordSet>, DnsError> {
    let doc = parse(text)?;
    Ok(doc
        .descendants()
        .filter(|n| n.is_element() && n.tag_name().name() == "ResourceRecordSet")
        .filter(|n| text_of(*n, "SetIdentifier").is_none() && element(*n, "AliasTarget").is_none())
        .filter_map(|set| {
            Some(RecordSet {
                name: unescape(text_of(set, "Name")?),
                rtype: text_of(set, "Type")?.to_owned(),
                ttl: text_of(set, "TTL")
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(300),
                values: set
                    .descendants()
                    .filter(|n| n.is_element() && n.tag_name().name() == "Value")
                    .filter_map(|n| n.text().map(str::to_owned))
                    .collect(),
            })
        })
        .collect())
}

/// `ChangeInfo`'s bare id (no `/change/`) and status.
fn change_info(text: &str) -> Result<(String, String), DnsError> {
    let doc = parse(text)?;
    let info = element(doc.root(), "ChangeInfo")
        .ok_or_else(|| fail(format!("no ChangeInfo in {}", excerpt(text))))?;
    let id = text_of(info, "Id").unwrap_or_default();
    let id = id.rsplit('/').next().unwrap_or(id).to_owned();
    let status = text_of(info, "Status").unwrap_or_default().to_owned();
    if id.is_empty() || status.is_empty() {
        return Err(fail(format!(
            "ChangeInfo without Id or Status: {}",
            excerpt(text)
        )));
    }
    Ok((id, status))
}

/// `&`, `<`, `>` and quotes as entities.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A one-change `ChangeResourceRecordSetsRequest` (elements in the schema's order).
fn change_batch(action: &str, set: &RecordSet) -> String {
    let values: String = set
        .values
        .iter()
        .map(|v| {
            format!(
                "<ResourceRecord><Value>{}</Value></ResourceRecord>",
                escape(v)
            )
        })
        .collect();
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<ChangeResourceRecordSetsRequest xmlns=\"{XMLNS}\"><ChangeBatch><Comment>dstack-mesh</Comment><Changes><Change><Action>{action}</Action><ResourceRecordSet><Name>{}.</Name><Type>{}</Type><TTL>{}</TTL><ResourceRecords>{values}</ResourceRecords></ResourceRecordSet></Change></Changes></ChangeBatch></ChangeResourceRecordSetsRequest>",
        escape(&set.name),
        set.rtype,
        set.ttl
    )
}

/// Whether `value` (as listed) holds `data`.
fn holds(rtype: &str, value: &str, data: &Data) -> bool {
    parse_presentation(rtype, value).is_some_and(|d| d.same(data))
}

/// The public hosted zones of a `ListHostedZones` answer, and the next marker.
fn hosted_zones(text: &str) -> Result<(Vec<Zone>, Option<String>), DnsError> {
    let doc = parse(text)?;
    let zones = doc
        .descendants()
        .filter(|n| n.is_element() && n.tag_name().name() == "HostedZone")
        .filter(|z| {
            element(*z, "Config")
                .and_then(|c| text_of(c, "PrivateZone"))
                .is_none_or(|p| p != "true")
        })
        .filter_map(|z| {
            let id = text_of(z, "Id")?;
            Some(Zone {
                name: unescape(text_of(z, "Name")?),
                id: id.rsplit('/').next().unwrap_or(id).to_owned(),
            })
        })
        .collect();
    let root = doc.root_element();
    let next = match text_of(root, "IsTruncated") {
        Some("true") => text_of(root, "NextMarker").map(str::to_owned),
        _ => None,
    };
    Ok((zones, next))
}

/// Pages of hosted zones followed at most.
const MAX_PAGES: usize = 100;

impl Provider for Route53 {
    fn name(&self) -> &'static str {
        "route53"
    }

    fn zones(&self) -> BoxFuture<'_, Result<Vec<Zone>, DnsError>> {
        Box::pin(async move {
            if let Some(id) = &self.settings.hosted_zone_id {
                let text = self
                    .call(
                        http::Method::GET,
                        &format!("/2013-04-01/hostedzone/{id}"),
                        &[],
                        None,
                    )
                    .await?;
                return Ok(hosted_zones(&text)?.0);
            }
            let mut zones = Vec::new();
            let mut marker: Option<String> = None;
            for _ in 0..MAX_PAGES {
                let mut query = vec![("maxitems", "100")];
                if let Some(m) = &marker {
                    query.push(("marker", m.as_str()));
                }
                let text = self
                    .call(http::Method::GET, "/2013-04-01/hostedzone", &query, None)
                    .await?;
                let (page, next) = hosted_zones(&text)?;
                zones.extend(page);
                match next {
                    Some(n) => marker = Some(n),
                    None => break,
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
            Ok(set_records(&set.name, &set.rtype, set.ttl, &set.values))
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
            let _one = self.changing.lock().await;
            let (action, set) = match self.set(zone, &record.name, rtype).await? {
                Some(set)
                    if set
                        .values
                        .iter()
                        .any(|v| holds(&set.rtype, v, &record.data)) =>
                {
                    return Ok(record.clone())
                }
                Some(mut set) => {
                    set.values.push(value);
                    ("UPSERT", set)
                }
                None => (
                    "CREATE",
                    RecordSet {
                        name: record.name.clone(),
                        rtype: rtype.as_str().to_owned(),
                        ttl: record.ttl.max(1),
                        values: vec![value],
                    },
                ),
            };
            self.change(zone, action, &set).await?;
            Ok(record.clone())
        })
    }

    fn delete<'a>(
        &'a self,
        zone: &'a Zone,
        record: &'a Record,
    ) -> BoxFuture<'a, Result<(), DnsError>> {
        Box::pin(async move {
            let _one = self.changing.lock().await;
            let Some(set) = self.set(zone, &record.name, record.data.rtype()).await? else {
                return Ok(());
            };
            let rest: Vec<String> = set
                .values
                .iter()
                .filter(|v| !holds(&set.rtype, v, &record.data))
                .cloned()
                .collect();
            if rest.len() == set.values.len() {
                return Ok(());
            }
            match rest.is_empty() {
                // A DELETE names the set exactly as it is (values and TTL).
                true => self.change(zone, "DELETE", &set).await,
                false => {
                    let kept = RecordSet {
                        values: rest,
                        ..set
                    };
                    self.change(zone, "UPSERT", &kept).await
                }
            }
        })
    }

    fn default_resolvers(&self) -> BoxFuture<'_, Vec<SocketAddr>> {
        Box::pin(async { public_resolvers() })
    }
}

/// Everything read from an answer body: the error words, record sets, change info and zones.
#[doc(hidden)]
pub fn read_answer(body: &[u8]) {
    let Ok(text) = std::str::from_utf8(body) else {
        return;
    };
    let _ = explain(text);
    let _ = record_sets(text);
    let _ = change_info(text);
    let _ = hosted_zones(text);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_read_as_route53_writes_them() {
        let list = r#"<?xml version="1.0"?>
<ListResourceRecordSetsResponse xmlns="https://route53.amazonaws.com/doc/2013-04-01/"><ResourceRecordSets>
<ResourceRecordSet><Name>\052.example.com.</Name><Type>CNAME</Type><TTL>60</TTL><ResourceRecords><ResourceRecord><Value>gw.example.net.</Value></ResourceRecord></ResourceRecords></ResourceRecordSet>
<ResourceRecordSet><Name>_acme-challenge.example.com.</Name><Type>TXT</Type><TTL>10</TTL><ResourceRecords><ResourceRecord><Value>"a"</Value></ResourceRecord><ResourceRecord><Value>"b" "c"</Value></ResourceRecord></ResourceRecords></ResourceRecordSet>
<ResourceRecordSet><Name>w.example.com.</Name><Type>A</Type><SetIdentifier>eu</SetIdentifier><Weight>1</Weight><TTL>10</TTL><ResourceRecords><ResourceRecord><Value>192.0.2.1</Value></ResourceRecord></ResourceRecords></ResourceRecordSet>
</ResourceRecordSets><IsTruncated>false</IsTruncated><MaxItems>300</MaxItems></ListResourceRecordSetsResponse>"#;
        let sets = record_sets(list).unwrap();
        assert_eq!(sets.len(), 2, "weighted sets are not ours: {sets:?}");
        assert_eq!(sets[0].name, "*.example.com");
        assert_eq!(sets[1].values, ["\"a\"", "\"b\" \"c\""]);
        assert!(holds("TXT", &sets[1].values[1], &Data::Txt("bc".into())));
        let zones = r#"<ListHostedZonesResponse xmlns="https://route53.amazonaws.com/doc/2013-04-01/"><HostedZones>
<HostedZone><Id>/hostedzone/Z1</Id><Name>example.com.</Name><CallerReference>x</CallerReference><Config><PrivateZone>false</PrivateZone></Config></HostedZone>
<HostedZone><Id>/hostedzone/Z2</Id><Name>example.com.</Name><CallerReference>y</CallerReference><Config><PrivateZone>true</PrivateZone></Config></HostedZone>
</HostedZones><IsTruncated>true</IsTruncated><NextMarker>Z3</NextMarker><MaxItems>2</MaxItems></ListHostedZonesResponse>"#;
        let (zones, next) = hosted_zones(zones).unwrap();
        assert_eq!(
            zones,
            [Zone {
                name: "example.com".into(),
                id: "Z1".into()
            }]
        );
        assert_eq!(next.as_deref(), Some("Z3"));
        let info = "<ChangeResourceRecordSetsResponse><ChangeInfo><Id>/change/C2682N5HXP0BZ4</Id><Status>PENDING</Status><SubmittedAt>2026-12-06T01:36:41.958Z</SubmittedAt></ChangeInfo></ChangeResourceRecordSetsResponse>";
        assert_eq!(
            change_info(info).unwrap(),
            ("C2682N5HXP0BZ4".into(), "PENDING".into())
        );
    }

    #[test]
    fn both_error_shapes_say_what_route53_said() {
        let standard = "<ErrorResponse xmlns=\"https://route53.amazonaws.com/doc/2013-04-01/\"><Error><Type>Sender</Type><Code>AccessDenied</Code><Message>User: arn:aws:iam::1:user/x is not authorized to perform: route53:ChangeResourceRecordSets</Message></Error><RequestId>r</RequestId></ErrorResponse>";
        let (code, said) = explain(standard);
        assert_eq!(code.as_deref(), Some("AccessDenied"));
        assert!(said.starts_with("AccessDenied: User: arn:aws:iam::1:user/x is not authorized"));
        let batch = "<InvalidChangeBatch xmlns=\"https://route53.amazonaws.com/doc/2013-04-01/\"><Messages><Message>Tried to delete resource record set [name='a.example.com.', type='TXT'] but it was not found</Message></Messages><RequestId>r</RequestId></InvalidChangeBatch>";
        let (code, said) = explain(batch);
        assert_eq!(code.as_deref(), Some("InvalidChangeBatch"));
        assert!(said.contains("but it was not found"), "{said}");
        assert_eq!(explain("<html>bad gateway").1, "<html>bad gateway");
        // A DTD (an entity bomb) is refused, not expanded.
        assert!(parse("<!DOCTYPE a [<!ENTITY x \"y\">]><a>&x;</a>").is_err());
    }

    #[test]
    fn change_batches_follow_the_schema_order_and_escape_values() {
        let set = RecordSet {
            name: "*.example.com".into(),
            rtype: "CAA".into(),
            ttl: 60,
            values: vec!["0 issue \"letsencrypt.org; accounturi=https://a/b?c&d\"".into()],
        };
        let body = change_batch("UPSERT", &set);
        assert!(body.contains("<Action>UPSERT</Action><ResourceRecordSet><Name>*.example.com.</Name><Type>CAA</Type><TTL>60</TTL><ResourceRecords><ResourceRecord><Value>0 issue &quot;letsencrypt.org; accounturi=https://a/b?c&amp;d&quot;</Value>"), "{body}");
        assert!(roxmltree::Document::parse(&body).is_ok());
        assert_eq!(unescape("\\052.Example.COM."), "*.example.com");
        assert_eq!(unescape("a\\05"), "a\\05");
    }
}
