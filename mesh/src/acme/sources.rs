//! Domains from sources (`[[domain_sources]]`): each source is read on its own clock; a list
//! that reads whole replaces the source's last good one (kept in the store, so a restart with
//! the source down serves the same domains), and the domains it adds or drops are started or
//! stopped without touching any other. A source that fails or answers garbage keeps its last
//! good list and says so (`/ready`, `/certs`, metrics): a blink never drops every domain.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use serde_json::Value;
use tokio::{sync::mpsc, task::JoinSet};

use super::{Acme, Domain};
use crate::config::{
    domains::check_name,
    sources::{SourceConfig, SourceKind},
    DomainConfig, Issuer, Mode,
};

/// Largest list read (10,000 entries of JSON objects fit in a few MiB).
const MAX_BYTES: usize = 64 << 20;
/// Rejected entries kept for `/certs`, per source.
const REJECTS_SHOWN: usize = 20;

/// Why a source's list was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// It could not be read.
    #[error("not read: {0}")]
    Read(String),
    /// It read, but is not a list.
    #[error("not a domain list: {0}")]
    Garbage(String),
    /// It lists more than the source may.
    #[error("lists {listed} domains, more than max_domains = {max}: refused whole")]
    TooMany {
        /// Entries listed.
        listed: usize,
        /// The cap.
        max: usize,
    },
}

/// One listed domain: its name (normalized) and the route its entry names, if any.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    /// The name, lowercase ASCII (an IDN in punycode).
    pub domain: String,
    /// Its own backend (`host:port`), else the source's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// Its own mode, else the source's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
}

/// A list as read: the entries taken and the ones refused, each with why.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    /// Taken, in the order listed, each name once.
    pub entries: Vec<Entry>,
    /// `(what was listed, why it was refused)`.
    pub rejected: Vec<(String, String)>,
}

/// A listed name as served: trimmed, lowercase, without a trailing dot, an IDN in punycode;
/// or why it cannot be served.
pub fn normalize(listed: &str) -> Result<String, String> {
    let trimmed = listed.trim().trim_end_matches('.');
    if trimmed.parse::<std::net::IpAddr>().is_ok() {
        return Err(format!("{listed:?} is an IP address, not a domain"));
    }
    let ascii = match trimmed.is_ascii() {
        true => trimmed.to_ascii_lowercase(),
        false => idna::domain_to_ascii(trimmed)
            .map_err(|_| format!("{listed:?} is not a valid internationalized domain name"))?,
    };
    check_name(&ascii)
}

/// Read a list: JSON (an array of names or of `{"domain", "backend", "mode"}` objects, or an
/// object holding one as `domains`), else text, one `name [backend [mode]]` per line (`#`
/// comments). More than `max` entries refuses the whole list.
pub fn parse(bytes: &[u8], max: usize) -> Result<Parsed, SourceError> {
    take(raw_entries(bytes)?, max)
}

/// The entries of a list as written (JSON or text).
fn raw_entries(bytes: &[u8]) -> Result<Vec<RawEntry>, SourceError> {
    let text =
        std::str::from_utf8(bytes).map_err(|e| SourceError::Garbage(format!("not UTF-8 ({e})")))?;
    let trimmed = text.trim_start();
    match trimmed.starts_with('[') || trimmed.starts_with('{') {
        true => json_entries(trimmed),
        false => Ok(text_entries(text)),
    }
}

/// Check listed entries: the good ones taken, each bad one refused with why; more than `max`
/// refuses the whole list.
fn take(raw: Vec<RawEntry>, max: usize) -> Result<Parsed, SourceError> {
    if raw.len() > max {
        return Err(SourceError::TooMany {
            listed: raw.len(),
            max,
        });
    }
    let mut parsed = Parsed::default();
    let mut seen = HashSet::new();
    for RawEntry {
        listed,
        backend,
        mode,
        unusable,
    } in raw
    {
        let refuse = |why: String| (listed.clone(), why);
        if let Some(why) = unusable {
            parsed.rejected.push(refuse(why.into()));
            continue;
        }
        let domain = match normalize(&listed) {
            Ok(d) => d,
            Err(why) => {
                parsed.rejected.push(refuse(why));
                continue;
            }
        };
        if let Some(b) = &backend {
            if let Err(e) = crate::config::domains::parse_target(b) {
                parsed.rejected.push(refuse(format!("backend {e}")));
                continue;
            }
        }
        let mode = match mode.as_deref().map(str::trim) {
            None => None,
            Some("http") => Some(Mode::Http),
            Some("tcp") => Some(Mode::Tcp),
            Some(other) => {
                parsed
                    .rejected
                    .push(refuse(format!("mode {other:?}: use http or tcp")));
                continue;
            }
        };
        if !seen.insert(domain.clone()) {
            parsed
                .rejected
                .push(refuse("listed twice: the first entry stands".into()));
            continue;
        }
        parsed.entries.push(Entry {
            domain,
            backend,
            mode,
        });
    }
    Ok(parsed)
}

/// One entry as listed.
struct RawEntry {
    listed: String,
    backend: Option<String>,
    mode: Option<String>,
    /// Why it cannot be an entry at all.
    unusable: Option<&'static str>,
}

impl RawEntry {
    fn named(listed: String, backend: Option<String>, mode: Option<String>) -> Self {
        Self {
            listed,
            backend,
            mode,
            unusable: None,
        }
    }
}

fn json_entries(text: &str) -> Result<Vec<RawEntry>, SourceError> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| SourceError::Garbage(format!("JSON: {e}")))?;
    let list = match &value {
        Value::Array(items) => items,
        Value::Object(o) => match o.get("domains") {
            Some(Value::Array(items)) => items,
            _ => {
                return Err(SourceError::Garbage(
                    "a JSON object without a \"domains\" array".into(),
                ))
            }
        },
        _ => return Err(SourceError::Garbage("JSON that is not a list".into())),
    };
    let field = |o: &serde_json::Map<String, Value>, k: &str| {
        o.get(k).and_then(Value::as_str).map(str::to_owned)
    };
    let mut out = Vec::with_capacity(list.len());
    for item in list {
        out.push(match item {
            Value::String(name) => RawEntry::named(name.clone(), None, None),
            Value::Object(o) => match field(o, "domain").or_else(|| field(o, "name")) {
                Some(name) => RawEntry::named(name, field(o, "backend"), field(o, "mode")),
                None => RawEntry {
                    unusable: Some("an object without a \"domain\" field"),
                    ..RawEntry::named(item.to_string(), None, None)
                },
            },
            other => RawEntry {
                unusable: Some("neither a name nor an object"),
                ..RawEntry::named(other.to_string(), None, None)
            },
        });
    }
    Ok(out)
}

fn text_entries(text: &str) -> Vec<RawEntry> {
    text.lines()
        .map(|line| line.split('#').next().unwrap_or_default().trim())
        .filter(|line| !line.is_empty())
        .map(|line| {
            let mut fields = line.split_whitespace().map(str::to_owned);
            let name = fields.next().unwrap_or_default();
            RawEntry::named(name, fields.next(), fields.next())
        })
        .collect()
}

/// A Redis hash's fields: the name, and its value as `[backend [mode]]`.
fn hash_entries(fields: Vec<(String, String)>) -> Vec<RawEntry> {
    fields
        .into_iter()
        .map(|(name, route)| {
            let mut route = route.split_whitespace().map(str::to_owned);
            RawEntry::named(name, route.next(), route.next())
        })
        .collect()
}

/// What one read of a source gave.
#[derive(Debug)]
enum Read {
    /// A list.
    List(Parsed),
    /// Unchanged since the last read.
    Unchanged,
    /// It failed.
    Failed(SourceError),
}

/// A source at run time: its configuration and how it is doing.
#[derive(Debug)]
pub struct Source {
    /// Its configuration.
    pub config: SourceConfig,
    state: Mutex<SourceState>,
}

#[derive(Debug, Default)]
struct SourceState {
    /// The last good list came from the store (an earlier run), not yet from the source.
    from_store: bool,
    domains: usize,
    rejected: Vec<(String, String)>,
    last_success: Option<SystemTime>,
    last_error: Option<String>,
    failing_since: Option<SystemTime>,
    reads_failed_total: u64,
}

/// A source's state as `/certs` and metrics show it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SourceStatus {
    /// Its name.
    pub name: String,
    /// Domains on its last good list.
    pub domains: usize,
    /// Whether it has been read and its last read worked (not before its first read: a list
    /// from the store is not a source that answers).
    pub up: bool,
    /// The last good list is the one stored by an earlier run (the source not read yet).
    pub from_store: bool,
    /// When a read last worked (Unix seconds).
    pub last_success: Option<u64>,
    /// Why the last read failed, while it fails.
    pub last_error: Option<String>,
    /// Since when it fails (Unix seconds).
    pub failing_since: Option<u64>,
    /// Reads that failed since start.
    pub reads_failed_total: u64,
    /// Entries of the last list refused, each with why (the first few).
    pub rejected: Vec<(String, String)>,
    /// How many entries of the last list were refused.
    pub rejected_total: usize,
}

impl Source {
    /// A source not read yet.
    pub fn new(config: SourceConfig) -> Self {
        Self {
            config,
            state: Mutex::default(),
        }
    }

    fn set(&self, f: impl FnOnce(&mut SourceState)) {
        if let Ok(mut s) = self.state.lock() {
            f(&mut s);
        }
    }

    /// How it is doing.
    pub fn status(&self) -> SourceStatus {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        SourceStatus {
            name: self.config.name.clone(),
            domains: s.domains,
            up: s.last_error.is_none() && s.last_success.is_some(),
            from_store: s.from_store,
            last_success: s.last_success.map(crate::clock::unix_u64),
            last_error: s.last_error.clone(),
            failing_since: s.failing_since.map(crate::clock::unix_u64),
            reads_failed_total: s.reads_failed_total,
            rejected: s.rejected.iter().take(REJECTS_SHOWN).cloned().collect(),
            rejected_total: s.rejected.len(),
        }
    }

    /// What needs an operator: a source that fails.
    pub fn problem(&self) -> Option<String> {
        let s = self.status();
        let why = s.last_error?;
        Some(format!(
            "domain source {}: {why}; serving its last good list ({} domains)",
            s.name, s.domains
        ))
    }

    /// The store key of its last good list.
    fn store_key(&self) -> String {
        let digest =
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, self.config.name.as_bytes());
        format!("sources/{}.json", hex::encode(&digest.as_ref()[..16]))
    }
}

/// Reads one source, keeping what the next read needs: the last list (an unchanged one is
/// not taken again), a file's last bytes, an endpoint's ETag, a Redis connection.
struct Reader {
    config: SourceConfig,
    last: Option<Parsed>,
    last_bytes: Option<Bytes>,
    etag: Option<String>,
    http: Option<crate::https::GetClient>,
    redis: Option<redis::aio::MultiplexedConnection>,
}

impl Reader {
    fn new(config: &SourceConfig) -> Self {
        let http = match &config.kind {
            SourceKind::Http { .. } => crate::https::get_client(config.timeout).ok(),
            _ => None,
        };
        Self {
            config: config.clone(),
            last: None,
            last_bytes: None,
            etag: None,
            http,
            redis: None,
        }
    }

    async fn read(&mut self) -> Read {
        let timeout = self.config.timeout;
        let fetched = match tokio::time::timeout(timeout, self.fetch()).await {
            Ok(fetched) => fetched,
            Err(_) => Err(SourceError::Read(format!("no answer within {timeout:?}"))),
        };
        let raw = match fetched {
            Ok(Some(raw)) => raw,
            Ok(None) => return Read::Unchanged,
            Err(e) => {
                // Ask in full next time, on a new connection.
                self.etag = None;
                self.last_bytes = None;
                self.redis = None;
                return Read::Failed(e);
            }
        };
        match take(raw, self.config.max_domains) {
            Ok(parsed) if self.last.as_ref() == Some(&parsed) => Read::Unchanged,
            Ok(parsed) => {
                self.last = Some(parsed.clone());
                Read::List(parsed)
            }
            Err(e) => {
                self.etag = None;
                self.last_bytes = None;
                Read::Failed(e)
            }
        }
    }

    /// The entries as listed now; none when unchanged since the last read.
    async fn fetch(&mut self) -> Result<Option<Vec<RawEntry>>, SourceError> {
        let bytes = match &self.config.kind {
            SourceKind::File(path) => tokio::fs::read(path)
                .await
                .map(Bytes::from)
                .map_err(|e| SourceError::Read(format!("{}: {e}", path.display())))?,
            SourceKind::Http { url, headers } => {
                let (url, headers) = (url.clone(), headers.clone());
                match self.get(&url, &headers).await? {
                    Some(bytes) => bytes,
                    None => return Ok(None),
                }
            }
            SourceKind::Redis { url, key } => {
                let (url, key) = (url.clone(), key.clone());
                return self.redis(&url, &key).await.map(Some);
            }
            // Fed by handshakes, never read.
            SourceKind::OnDemand(_) => return Ok(None),
        };
        if self.last_bytes.as_ref() == Some(&bytes) {
            return Ok(None);
        }
        let raw = raw_entries(&bytes)?;
        self.last_bytes = Some(bytes);
        Ok(Some(raw))
    }

    /// `GET url` with `headers` and the last ETag: the body, or none when not modified.
    async fn get(
        &mut self,
        url: &str,
        headers: &[(http::HeaderName, http::HeaderValue)],
    ) -> Result<Option<Bytes>, SourceError> {
        let Some(client) = &self.http else {
            return Err(SourceError::Read("no TLS roots for https".into()));
        };
        let mut req = http::Request::get(url);
        for (name, value) in headers {
            req = req.header(name, value);
        }
        if let Some(etag) = &self.etag {
            req = req.header(http::header::IF_NONE_MATCH, etag.as_str());
        }
        let req = req
            .body(Empty::new())
            .map_err(|e| SourceError::Read(e.to_string()))?;
        let resp = client
            .request(req)
            .await
            .map_err(|e| SourceError::Read(format!("{url}: {}", ratls::error_chain(&e))))?;
        let status = resp.status();
        if status == http::StatusCode::NOT_MODIFIED {
            return Ok(None);
        }
        let etag = resp
            .headers()
            .get(http::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = Limited::new(resp.into_body(), MAX_BYTES)
            .collect()
            .await
            .map_err(|e| SourceError::Read(format!("{url}: {e}")))?
            .to_bytes();
        if !status.is_success() {
            let said: String = String::from_utf8_lossy(&body).chars().take(200).collect();
            return Err(SourceError::Read(format!("{url}: HTTP {status}: {said}")));
        }
        self.etag = etag;
        Ok(Some(body))
    }

    /// The entries under `key`: a set's members, a hash's fields (`name → [backend [mode]]`),
    /// or the list a string holds. A key that is absent is an error, not an empty list: Redis
    /// deletes an emptied set, and a flushed database must not drop every domain.
    async fn redis(&mut self, url: &str, key: &str) -> Result<Vec<RawEntry>, SourceError> {
        let shown = crate::config::sources::redact_userinfo(url);
        let fail = |e: redis::RedisError| SourceError::Read(format!("{shown}: {}", redis_said(&e)));
        let conn = match &mut self.redis {
            Some(conn) => conn,
            None => {
                let client = redis::Client::open(url).map_err(fail)?;
                let conn = client
                    .get_multiplexed_async_connection()
                    .await
                    .map_err(fail)?;
                self.redis.insert(conn)
            }
        };
        let kind: String = redis::cmd("TYPE")
            .arg(key)
            .query_async(conn)
            .await
            .map_err(fail)?;
        Ok(match kind.as_str() {
            "set" => {
                let members: Vec<String> = redis::cmd("SMEMBERS")
                    .arg(key)
                    .query_async(conn)
                    .await
                    .map_err(fail)?;
                let mut entries: Vec<RawEntry> = members
                    .into_iter()
                    .map(|m| RawEntry::named(m, None, None))
                    .collect();
                // A set has no order: keep the list's stable.
                entries.sort_by(|a, b| a.listed.cmp(&b.listed));
                entries
            }
            "hash" => {
                let mut fields: Vec<(String, String)> = redis::cmd("HGETALL")
                    .arg(key)
                    .query_async(conn)
                    .await
                    .map_err(fail)?;
                fields.sort();
                hash_entries(fields)
            }
            "string" => {
                let bytes: Vec<u8> = redis::cmd("GET")
                    .arg(key)
                    .query_async(conn)
                    .await
                    .map_err(fail)?;
                raw_entries(&bytes)?
            }
            "none" => {
                return Err(SourceError::Read(format!(
                    "{shown}: key {key:?} does not exist (an emptied set vanishes; remove the source to serve none of its domains)"
                )))
            }
            other => {
                return Err(SourceError::Garbage(format!(
                    "key {key:?} is a {other}: use a set, a hash or a string"
                )))
            }
        })
    }
}

/// A Redis error without the URL the client may quote.
fn redis_said(e: &redis::RedisError) -> String {
    match e.kind() {
        redis::ErrorKind::AuthenticationFailed => "authentication failed".into(),
        _ => e.to_string(),
    }
}

/// Wake the reader of a Redis source whenever its key changes: keyspace notifications
/// (`__keyspace@<db>__:<key>`), when the server sends them (`notify-keyspace-events` with
/// `K` and the key's type, or `A`). Reconnects after a second; polling covers the gaps.
async fn watch_redis(url: String, key: String, wake: Arc<tokio::sync::Notify>, source: String) {
    use futures_util::StreamExt as _;
    let Ok(client) = redis::Client::open(url.as_str()) else {
        return;
    };
    let channel = format!(
        "__keyspace@{}__:{key}",
        client.get_connection_info().redis_settings().db()
    );
    loop {
        let subscribed = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        match tokio::time::timeout(Duration::from_secs(10), subscribed).await {
            Ok(Ok(mut pubsub)) => {
                tracing::debug!(%source, %channel, "domain source: following keyspace notifications");
                // Changes while we were away.
                wake.notify_one();
                let mut messages = pubsub.on_message();
                while messages.next().await.is_some() {
                    wake.notify_one();
                }
                // The connection dropped: a read says whether Redis is gone.
                wake.notify_one();
            }
            Ok(Err(e)) => {
                tracing::debug!(%source, error = %redis_said(&e), "domain source: no keyspace notifications")
            }
            Err(_) => tracing::debug!(%source, "domain source: subscribing timed out"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The sourced domains' lifecycle tasks (stopped when this is dropped: a reload), and when
/// each domain its source dropped was dropped.
#[derive(Default)]
struct Running {
    set: JoinSet<()>,
    tasks: HashMap<String, tokio::task::AbortHandle>,
    dropped: HashMap<String, SystemTime>,
    /// When the first grace ends.
    grace_ends: Option<SystemTime>,
}

/// The domains sources add to the configured ones, by name (exact, and wildcards by the
/// name one label up), swapped whole on every change.
#[derive(Debug, Default)]
pub struct Sourced {
    pub(super) exact: HashMap<String, Arc<Domain>>,
    pub(super) wildcard: HashMap<String, Arc<Domain>>,
    /// In the order of the sources and their lists.
    pub(super) list: Vec<Arc<Domain>>,
}

impl Acme {
    /// Read every source on its own clock and keep the sourced domains as their lists say:
    /// start the ones added (each its own lifecycle task, stopped when dropped), stop the
    /// ones removed. Runs until aborted (a reload or shutdown), which stops them all.
    pub(super) async fn follow_sources(self: Arc<Self>) {
        if self.sources.is_empty() {
            return;
        }
        let (tx, mut rx) = mpsc::channel::<(usize, Read)>(self.sources.len());
        let mut readers = JoinSet::new();
        for (i, source) in self.sources.iter().enumerate() {
            if matches!(source.config.kind, SourceKind::OnDemand(_)) {
                continue;
            }
            let (tx, config) = (tx.clone(), source.config.clone());
            let wake = Arc::new(tokio::sync::Notify::new());
            if let SourceKind::Redis { url, key } = &config.kind {
                let watch =
                    watch_redis(url.clone(), key.clone(), wake.clone(), config.name.clone());
                readers.spawn(watch);
            }
            readers.spawn(async move {
                let mut reader = Reader::new(&config);
                loop {
                    if tx.send((i, reader.read().await)).await.is_err() {
                        return;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(config.interval) => {}
                        _ = wake.notified() => {}
                    }
                }
            });
        }
        drop(tx);
        // The last good lists, first from the store.
        let mut lists: Vec<Vec<Entry>> = self.sources.iter().map(|s| self.stored_list(s)).collect();
        let mut running = Running::default();
        self.reconcile(&lists, &mut running);
        let on_demand = self
            .sources
            .iter()
            .position(|s| matches!(s.config.kind, SourceKind::OnDemand(_)));
        let mut inbox = self
            .on_demand
            .as_ref()
            .and_then(|o| o.inbox.lock().ok().and_then(|mut i| i.take()));
        if let (Some(i), Some(od)) = (on_demand, &self.on_demand) {
            readers.spawn(self.clone().ask_again(i, od.config.allowed_ttl));
        }
        loop {
            let grace_ends = running.grace_ends;
            let (i, read) = tokio::select! {
                Some(read) = rx.recv() => read,
                Some(request) = async { inbox.as_mut()?.recv().await } => {
                    if let Some(i) = on_demand {
                        self.on_demand_request(i, request, &mut lists, &mut running);
                    }
                    continue;
                }
                // A dropped domain's grace is over: it goes now.
                _ = async {
                    match grace_ends {
                        Some(t) => tokio::time::sleep(t.duration_since(SystemTime::now()).unwrap_or_default()).await,
                        None => std::future::pending().await,
                    }
                } => {
                    self.reconcile(&lists, &mut running);
                    continue;
                }
                else => return,
            };
            let source = &self.sources[i];
            match read {
                Read::Unchanged => source.set(|s| clear_failure(s, SystemTime::now())),
                Read::Failed(e) => {
                    let now = SystemTime::now();
                    let first = source
                        .state
                        .lock()
                        .map(|s| s.last_error.is_none())
                        .unwrap_or(true);
                    if first {
                        tracing::warn!(source = %source.config.name, error = %e, domains = lists[i].len(), "domain source failed: keeping its last good list");
                    }
                    source.set(|s| {
                        s.last_error = Some(e.to_string());
                        s.failing_since.get_or_insert(now);
                        s.reads_failed_total += 1;
                    });
                }
                Read::List(parsed) => {
                    let now = SystemTime::now();
                    if !parsed.rejected.is_empty() {
                        tracing::warn!(source = %source.config.name, rejected = parsed.rejected.len(), first = ?parsed.rejected.first(), "domain source: entries refused");
                    }
                    tracing::info!(source = %source.config.name, domains = parsed.entries.len(), "domain source read");
                    self.keep_list(source, &parsed.entries);
                    source.set(|s| {
                        clear_failure(s, now);
                        s.from_store = false;
                        s.rejected = parsed.rejected;
                    });
                    lists[i] = parsed.entries;
                    self.reconcile(&lists, &mut running);
                }
            }
        }
    }

    /// Admit a name on demand (it joins the on-demand source's list, `i`), or forget names
    /// `ask` no longer allows.
    fn on_demand_request(
        self: &Arc<Self>,
        i: usize,
        request: super::on_demand::Request,
        lists: &mut [Vec<Entry>],
        running: &mut Running,
    ) {
        let source = &self.sources[i];
        match request {
            super::on_demand::Request::Admit(name, reply) => {
                if let Some(domain) = self.lookup(&name) {
                    let _ = reply.send(Some(domain));
                    return;
                }
                if lists[i].len() >= source.config.max_domains {
                    tracing::warn!(domain = %name, max = source.config.max_domains, "on demand: no more names fit (on_demand.max_domains): refused");
                    let _ = reply.send(None);
                    return;
                }
                tracing::info!(domain = %name, "on demand: name admitted");
                lists[i].push(Entry {
                    domain: name.clone(),
                    backend: None,
                    mode: None,
                });
                self.keep_list(source, &lists[i]);
                self.reconcile(lists, running);
                let _ = reply.send(self.sourced.load().exact.get(&name).cloned());
            }
            super::on_demand::Request::Forget(names) => {
                let before = lists[i].len();
                lists[i].retain(|e| !names.contains(&e.domain));
                if lists[i].len() != before {
                    tracing::info!(domains = ?names, "on demand: ask no longer allows these names: not served");
                    self.keep_list(source, &lists[i]);
                    self.reconcile(lists, running);
                }
            }
        }
    }

    /// Ask again, every `every`, about each name admitted on demand, one at a time (outside
    /// `ask_rate`); the ones `ask` refuses now are forgotten (a customer who left stops being
    /// served and renewed). No answer forgets nothing: `ask` down must not drop customers.
    async fn ask_again(self: Arc<Self>, i: usize, every: Duration) {
        let Some(on_demand) = &self.on_demand else {
            return;
        };
        loop {
            tokio::time::sleep(every).await;
            let names: Vec<String> = self
                .sourced
                .load()
                .list
                .iter()
                .filter(|d| d.source.as_deref() == Some(self.sources[i].config.name.as_str()))
                .map(|d| d.name().to_owned())
                .collect();
            let mut refused = Vec::new();
            for name in names {
                if on_demand.answer(&name, false).await == Some(super::on_demand::Answer::Refused) {
                    refused.push(name);
                }
            }
            if !refused.is_empty() {
                let request = super::on_demand::Request::Forget(refused);
                if on_demand.requests.send(request).await.is_err() {
                    return;
                }
            }
        }
    }

    /// A source's last good list as an earlier run stored it (none: empty).
    fn stored_list(&self, source: &Source) -> Vec<Entry> {
        let Ok(Some(bytes)) = self.store.read(&source.store_key()) else {
            return Vec::new();
        };
        match serde_json::from_slice::<Vec<Entry>>(&bytes) {
            Ok(list) => {
                tracing::info!(source = %source.config.name, domains = list.len(), "domain source: serving the list stored by the last run until it is read");
                source.set(|s| s.from_store = true);
                list
            }
            Err(e) => {
                tracing::warn!(source = %source.config.name, error = %e, "domain source: the stored list does not read; set aside");
                let _ = self.store.quarantine(&source.store_key());
                Vec::new()
            }
        }
    }

    /// Keep a source's list for the next run (a store that cannot take it costs a restart
    /// with the source down its domains, nothing else).
    fn keep_list(&self, source: &Source, entries: &[Entry]) {
        let written = serde_json::to_vec(entries)
            .map_err(|e| e.to_string())
            .and_then(|b| {
                self.store
                    .write(&source.store_key(), &b, false)
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = written {
            tracing::warn!(source = %source.config.name, error = %e, "domain source: list not stored");
        }
    }

    /// Make the sourced domains what `lists` say: the first listing of a name wins, a
    /// configured domain's name is never taken, a domain whose route changed is started again.
    fn reconcile(self: &Arc<Self>, lists: &[Vec<Entry>], running: &mut Running) {
        let current = self.sourced.load_full();
        let mut wanted: BTreeMap<String, (usize, DomainConfig)> = BTreeMap::new();
        let mut order = Vec::new();
        for (i, (source, list)) in self.sources.iter().zip(lists).enumerate() {
            let mut refused = Vec::new();
            let mut served = 0;
            for entry in list {
                let route = match wanted.get(&entry.domain) {
                    _ if self.configured(&entry.domain) => {
                        Err("a configured [[domains]] entry serves it".to_owned())
                    }
                    Some((other, _)) => Err(format!(
                        "source {} lists it too, and comes first",
                        self.sources[*other].config.name
                    )),
                    None => route_for(&source.config, entry),
                };
                match route {
                    Ok(config) => {
                        served += 1;
                        order.push(entry.domain.clone());
                        wanted.insert(entry.domain.clone(), (i, config));
                    }
                    Err(why) => refused.push((entry.domain.clone(), why)),
                }
            }
            source.set(|s| {
                s.domains = served;
                for r in refused {
                    if !s.rejected.contains(&r) {
                        s.rejected.push(r);
                    }
                }
            });
        }
        let mut next = Sourced::default();
        let (mut added, mut removed) = (0usize, 0usize);
        // Each listed name: its running domain (kept), or a new one (Err).
        let mut plan: Vec<(String, Result<Arc<Domain>, Domain>)> = Vec::new();
        for name in order {
            let Some((i, config)) = wanted.remove(&name) else {
                continue;
            };
            let kept = current
                .exact
                .get(&name)
                .or_else(|| current.wildcard.get(name.strip_prefix("*.").unwrap_or("")))
                .filter(|d| d.config == config && running.tasks.contains_key(&name))
                .cloned();
            let source = || Some(self.sources[i].config.name.clone());
            plan.push((name, kept.ok_or_else(|| Domain::new(config, source()))));
        }
        let fresh: Vec<&Domain> = plan.iter().filter_map(|(_, p)| p.as_ref().err()).collect();
        super::renewal::load_all_stored(self.store.as_ref(), &fresh);
        for (name, planned) in plan {
            let domain = match planned {
                Ok(d) => d,
                Err(d) => {
                    if let Some(old) = running.tasks.remove(&name) {
                        old.abort();
                    }
                    let d = Arc::new(d);
                    let task = self.start_domain(&d, &mut running.set);
                    running.tasks.insert(name.clone(), task);
                    added += 1;
                    d
                }
            };
            // Listed (again): not on its way out.
            if running.dropped.remove(&name).is_some() {
                domain.set(|s| s.removing_at = None);
            }
            match name.strip_prefix("*.") {
                Some(base) => next.wildcard.insert(base.to_owned(), domain.clone()),
                None => next.exact.insert(name, domain.clone()),
            };
            next.list.push(domain);
        }
        // Dropped by its source: served on through the source's grace, then gone.
        let now = SystemTime::now();
        let listed: HashSet<String> = next.list.iter().map(|d| d.name().to_owned()).collect();
        running.grace_ends = None;
        for d in &current.list {
            let name = d.name();
            let grace = self
                .sources
                .iter()
                .find(|s| d.source.as_deref() == Some(s.config.name.as_str()))
                .map_or(Duration::ZERO, |s| s.config.grace);
            if listed.contains(name) || grace.is_zero() || !running.tasks.contains_key(name) {
                continue;
            }
            let since = *running.dropped.entry(name.to_owned()).or_insert(now);
            let until = since + grace;
            if now >= until {
                continue;
            }
            if !d.state.lock().is_ok_and(|s| s.removing_at.is_some()) {
                tracing::info!(domain = %name, until = %crate::clock::rfc3339_of(until), "dropped by its source: served until its grace ends");
            }
            d.set(|s| s.removing_at = Some(until));
            running.grace_ends = Some(running.grace_ends.map_or(until, |t| t.min(until)));
            match name.strip_prefix("*.") {
                Some(base) => next.wildcard.insert(base.to_owned(), d.clone()),
                None => next.exact.insert(name.to_owned(), d.clone()),
            };
            next.list.push(d.clone());
        }
        let keep: HashSet<&str> = next.list.iter().map(|d| d.name()).collect();
        running
            .dropped
            .retain(|name, _| keep.contains(name.as_str()));
        running.tasks.retain(|name, task| {
            let stays = keep.contains(name.as_str());
            if !stays {
                task.abort();
                removed += 1;
            }
            stays
        });
        if added > 0 || removed > 0 {
            tracing::info!(
                added,
                removed,
                domains = next.list.len(),
                "sourced domains changed"
            );
        }
        self.sourced.store(Arc::new(next));
    }

    /// Whether a configured domain serves `name` (it wins over any source).
    fn configured(&self, name: &str) -> bool {
        self.exact.contains_key(name)
            || name
                .strip_prefix("*.")
                .is_some_and(|base| self.wildcard.contains_key(base))
    }
}

/// The route of `entry` from `source`: its own backend and mode, else the source's; refused
/// when its name is a wildcard the route cannot issue.
/// Serve `names` as the first source's domains, without lifecycle tasks: the listener's
/// tests, which need the table and not the orders.
#[cfg(test)]
impl Acme {
    pub(crate) fn install_sourced(&self, names: &[String]) {
        let source = &self.sources[0].config;
        let mut next = Sourced::default();
        for name in names {
            let entry = Entry {
                domain: name.clone(),
                backend: None,
                mode: None,
            };
            let config = route_for(source, &entry).expect("a route");
            let domain = Arc::new(Domain::new(config, Some(source.name.clone())));
            next.exact.insert(name.clone(), domain.clone());
            next.list.push(domain);
        }
        self.sourced.store(Arc::new(next));
    }
}

fn route_for(source: &SourceConfig, entry: &Entry) -> Result<DomainConfig, String> {
    let mut config = DomainConfig {
        names: vec![entry.domain.clone()],
        ..source.route.clone()
    };
    if let Some(backend) = entry
        .backend
        .as_deref()
        .and_then(|b| crate::config::domains::parse_target(b).ok())
    {
        config.backend = backend;
    }
    if let Some(mode) = entry.mode {
        if mode != config.mode {
            config.mode = mode;
            config.alpn.clear();
            config.response_headers.clear();
            config.send_proxy_protocol = false;
        }
    }
    let wildcard_ok =
        config.challenge == crate::config::Challenge::Dns01 || config.issuer == Issuer::InternalCa;
    if entry.domain.starts_with("*.") && !wildcard_ok {
        return Err(format!(
            "a wildcard needs the dns-01 challenge; this source's domains use {}",
            config.challenge.as_str()
        ));
    }
    Ok(config)
}

fn clear_failure(s: &mut SourceState, now: SystemTime) {
    s.last_error = None;
    s.failing_since = None;
    s.last_success = Some(now);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(p: &Parsed) -> Vec<&str> {
        p.entries.iter().map(|e| e.domain.as_str()).collect()
    }

    #[test]
    fn lists_read_as_text_json_names_or_objects() {
        let text = b"# customers\nshop.example.com\nCareers.Customer.COM. app:9000 tcp\n\n";
        let p = parse(text, 10).unwrap();
        assert_eq!(names(&p), ["shop.example.com", "careers.customer.com"]);
        assert_eq!(p.entries[1].backend.as_deref(), Some("app:9000"));
        assert_eq!(p.entries[1].mode, Some(Mode::Tcp));
        let json =
            br#"["a.example.com", {"domain": "b.example.com", "backend": "b:80", "mode": "http"}]"#;
        let p = parse(json, 10).unwrap();
        assert_eq!(names(&p), ["a.example.com", "b.example.com"]);
        assert_eq!(p.entries[1].mode, Some(Mode::Http));
        let wrapped = br#"{"domains": ["a.example.com"]}"#;
        assert_eq!(names(&parse(wrapped, 10).unwrap()), ["a.example.com"]);
        assert_eq!(parse(b"", 10).unwrap(), Parsed::default());
    }

    #[test]
    fn bad_entries_are_refused_with_a_reason_and_the_rest_taken() {
        let list = serde_json::json!([
            "ok.example.com",
            "192.0.2.1",
            "::1",
            format!("{}.example.com", "a".repeat(70)),
            format!("{}.example.com", "a.".repeat(150)),
            "bad_name.example.com",
            "OK.example.com",
            "bücher.example",
            {"domain": "x.example.com", "mode": "udp"},
            {"domain": "y.example.com", "backend": "no-port"},
            {"name": "z.example.com"},
            {"backend": "x:1"},
            42
        ]);
        let p = parse(list.to_string().as_bytes(), 100).unwrap();
        assert_eq!(
            names(&p),
            ["ok.example.com", "xn--bcher-kva.example", "z.example.com"]
        );
        let why: Vec<&str> = p.rejected.iter().map(|(_, w)| w.as_str()).collect();
        assert!(why[0].contains("IP address"), "{why:?}");
        assert!(why[1].contains("IP address"), "{why:?}");
        assert!(why[2].contains("63 characters"), "{why:?}");
        assert!(why[3].contains("253 characters"), "{why:?}");
        assert!(why[4].contains("only letters"), "{why:?}");
        assert!(why[5].contains("listed twice"), "{why:?}");
        assert!(why[6].contains("use http or tcp"), "{why:?}");
        assert!(why[7].contains("backend"), "{why:?}");
        assert!(why[8].contains("without a \"domain\""), "{why:?}");
        assert!(why[9].contains("neither a name"), "{why:?}");
        assert_eq!(p.rejected.len(), 10, "{:?}", p.rejected);
    }

    fn customers() -> SourceConfig {
        SourceConfig {
            name: "customers".into(),
            kind: SourceKind::File("/l".into()),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            max_domains: 10,
            grace: Duration::ZERO,
            route: DomainConfig {
                names: Vec::new(),
                backend: crate::config::domains::parse_target("app:80").unwrap(),
                mode: Mode::Http,
                issuer: Issuer::Acme("https://ca.test/dir".into()),
                challenge: crate::config::Challenge::TlsAlpn01,
                send_proxy_protocol: false,
                alpn: vec!["h2".into()],
                routes: BTreeMap::new(),
                response_headers: Vec::new(),
            },
        }
    }

    #[test]
    fn a_source_is_up_only_once_a_read_worked() {
        let source = Source::new(customers());
        assert!(!source.status().up, "not read yet");
        source.set(|s| {
            s.from_store = true;
            s.domains = 3;
        });
        assert!(
            !source.status().up,
            "a stored list is not a source that answers"
        );
        source.set(|s| clear_failure(s, SystemTime::now()));
        assert!(source.status().up);
        source.set(|s| s.last_error = Some("gone".into()));
        assert!(!source.status().up);
    }

    #[test]
    fn an_entry_routes_as_it_says_and_a_wildcard_needs_dns_01() {
        let source = customers();
        let entry = |domain: &str, backend: Option<&str>, mode| Entry {
            domain: domain.into(),
            backend: backend.map(str::to_owned),
            mode,
        };
        let plain = route_for(&source, &entry("a.example.com", None, None)).unwrap();
        assert_eq!(plain.names, ["a.example.com"]);
        assert_eq!(plain.backend.to_string(), "app:80");
        let own = route_for(
            &source,
            &entry("b.example.com", Some("db:5432"), Some(Mode::Tcp)),
        )
        .unwrap();
        assert_eq!(own.backend.to_string(), "db:5432");
        assert_eq!(own.mode, Mode::Tcp);
        assert!(own.alpn.is_empty(), "http mode's ALPN does not carry over");
        let e = route_for(&source, &entry("*.example.com", None, None)).unwrap_err();
        assert!(e.contains("dns-01"), "{e}");
        let mut dns = source.clone();
        dns.route.challenge = crate::config::Challenge::Dns01;
        assert!(route_for(&dns, &entry("*.example.com", None, None)).is_ok());
    }

    #[test]
    fn a_redis_hash_maps_names_to_their_routes() {
        let fields = vec![
            ("a.example.com".to_owned(), "app:9000 tcp".to_owned()),
            ("b.example.com".to_owned(), String::new()),
        ];
        let p = take(hash_entries(fields), 10).unwrap();
        assert_eq!(names(&p), ["a.example.com", "b.example.com"]);
        assert_eq!(p.entries[0].backend.as_deref(), Some("app:9000"));
        assert_eq!(p.entries[0].mode, Some(Mode::Tcp));
        assert_eq!(p.entries[1].backend, None);
    }

    #[test]
    fn garbage_or_too_long_a_list_is_refused_whole() {
        assert!(matches!(
            parse(b"{\"domains\": 3}", 10),
            Err(SourceError::Garbage(_))
        ));
        assert!(matches!(
            parse(b"[\"a.example.com\"", 10),
            Err(SourceError::Garbage(_))
        ));
        assert!(matches!(
            parse(&[0xff, 0xfe], 10),
            Err(SourceError::Garbage(_))
        ));
        let many: Vec<String> = (0..11).map(|i| format!("d{i}.example.com")).collect();
        assert_eq!(
            parse(many.join("\n").as_bytes(), 10),
            Err(SourceError::TooMany {
                listed: 11,
                max: 10
            })
        );
    }
}
