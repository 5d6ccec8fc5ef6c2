//! DNS-01 and the dstack DNS records through a small provider trait (Cloudflare, RFC 2136),
//! with resolvers that check propagation and CAA before the CA is asked to look.
//!
//! Providers only list zones and records and create or delete one record; the policy (which
//! zone, what to replace, what never to touch, when a record is visible) lives here, once.

pub mod caa;
pub mod cloudflare;
pub mod digitalocean;
pub mod doh;
pub mod gcloud;
pub mod hetzner;
pub mod httpreq;
pub mod linode;
pub mod namecheap;
pub mod ovh;
pub mod porkbun;
pub(crate) mod rest;
pub mod rfc2136;
pub mod route53;
pub mod setup;
pub mod sigv4;
pub mod webhook;
pub mod wire;

use std::{fmt, future::Future, net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use crate::config::{DnsConfig, DomainConfig, ProviderConfig};

/// A boxed future, so the provider trait stays object safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Deadline of one DNS query or provider request.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of one propagation or CAA query (a silent resolver is asked again later).
const QUERY_TIMEOUT: Duration = Duration::from_secs(3);
/// Pause between propagation rounds.
const POLL: Duration = Duration::from_secs(2);
/// TTL of everything we write: challenge records are short-lived, and a gateway move should
/// not wait on caches.
const TTL: u32 = 60;

/// Why the DNS provider could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// The HTTPS client for the provider's API.
    #[error("HTTPS client: {0}")]
    Https(#[from] crate::https::RootsError),
    /// The service account's key file does not sign.
    #[error("service account: {0}")]
    ServiceAccount(String),
    /// A TSIG algorithm hickory does not sign with.
    #[error("TSIG algorithm {0:?} is not supported")]
    Algorithm(String),
    /// The TSIG secret is not base64.
    #[error("the TSIG secret is not base64")]
    Secret(#[from] crate::base64url::NotBase64url),
    /// The TSIG key name is not a DNS name.
    #[error(transparent)]
    KeyName(#[from] wire::WireError),
    /// The TSIG signer refused the key.
    #[error("TSIG key {name}: {source}")]
    Tsig {
        /// The key name.
        name: String,
        /// What hickory said.
        source: hickory_proto::dnssec::DnsSecError,
    },
}

/// Why a DNS step failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// The provider refused or failed; its own message.
    #[error("DNS provider {provider}: {message}")]
    Provider {
        /// `cloudflare` or `rfc2136`.
        provider: &'static str,
        /// What it said.
        message: String,
    },
    /// The provider throttled us (HTTP 429) and said when to come back.
    #[error("DNS provider {provider}: {message}")]
    Throttled {
        /// The provider.
        provider: &'static str,
        /// What it said.
        message: String,
        /// Its `Retry-After`.
        retry_after: Duration,
    },
    /// The provider holds no zone enclosing the name.
    #[error("DNS provider {provider}: no zone holds {name} ({zones})")]
    NoZone {
        /// The provider.
        provider: &'static str,
        /// The name.
        name: String,
        /// What it does hold.
        zones: String,
    },
    /// A record at a name we manage that we did not write and will not remove.
    #[error("{0}")]
    Conflict(String),
    /// A challenge record did not reach every resolver in time.
    #[error("{0}")]
    NotPropagated(String),
    /// CAA forbids the order.
    #[error("{forbidden} (the CAA set at {owner}; remove or extend it, or the CA will refuse)")]
    Caa {
        /// Where the relevant CAA set is.
        owner: String,
        /// Why it forbids this order.
        forbidden: caa::Forbidden,
    },
    /// No DNS provider is configured.
    #[error("no DNS provider is configured (DNS_PROVIDER)")]
    NoProvider,
    /// Records the operator must create are not visible to every DoH resolver in time.
    #[error("{0}")]
    NotVisible(String),
}

/// The record types we write or look at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rtype {
    /// IPv4 address.
    A,
    /// IPv6 address.
    Aaaa,
    /// Alias.
    Cname,
    /// Text.
    Txt,
    /// Certification authority authorization.
    Caa,
}

impl Rtype {
    /// The type's mnemonic.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::A => "A",
            Self::Aaaa => "AAAA",
            Self::Cname => "CNAME",
            Self::Txt => "TXT",
            Self::Caa => "CAA",
        }
    }

    fn hickory(self) -> hickory_proto::rr::RecordType {
        use hickory_proto::rr::RecordType as T;
        match self {
            Self::A => T::A,
            Self::Aaaa => T::AAAA,
            Self::Cname => T::CNAME,
            Self::Txt => T::TXT,
            Self::Caa => T::CAA,
        }
    }
}

/// Record data, in the form we compare.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Data {
    /// A TXT value (its character-strings joined).
    Txt(String),
    /// A CNAME target, lowercase, no trailing dot.
    Cname(String),
    /// A CAA property.
    Caa {
        /// The issuer-critical flag.
        critical: bool,
        /// `issue`, `issuewild`, …
        tag: String,
        /// The raw value.
        value: String,
    },
    /// Another type, shown but never written.
    Other(Rtype, String),
}

impl Data {
    /// Its type.
    pub fn rtype(&self) -> Rtype {
        match self {
            Self::Txt(_) => Rtype::Txt,
            Self::Cname(_) => Rtype::Cname,
            Self::Caa { .. } => Rtype::Caa,
            Self::Other(t, _) => *t,
        }
    }

    /// Equal as DNS sees it (CAA values compare after parsing: spacing does not matter).
    pub fn same(&self, other: &Self) -> bool {
        match (self, other) {
            (
                Self::Caa {
                    critical: c1,
                    tag: t1,
                    value: v1,
                },
                Self::Caa {
                    critical: c2,
                    tag: t2,
                    value: v2,
                },
            ) => {
                c1 == c2
                    && t1.eq_ignore_ascii_case(t2)
                    && match (caa::IssueValue::parse(v1), caa::IssueValue::parse(v2)) {
                        (Ok(a), Ok(b)) => a == b,
                        _ => v1 == v2,
                    }
            }
            (Self::Cname(a), Self::Cname(b)) => a.eq_ignore_ascii_case(b),
            (a, b) => a == b,
        }
    }
}

impl fmt::Display for Data {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Txt(v) => write!(f, "TXT {v:?}"),
            Self::Cname(t) => write!(f, "CNAME {t}."),
            Self::Caa {
                critical,
                tag,
                value,
            } => {
                write!(f, "CAA {} {tag} {value:?}", if *critical { 128 } else { 0 })
            }
            Self::Other(t, v) => write!(f, "{} {v}", t.as_str()),
        }
    }
}

/// One record; `id` is the provider's handle when it has one (Cloudflare).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Owner name, lowercase, no trailing dot.
    pub name: String,
    /// Data.
    pub data: Data,
    /// TTL in seconds.
    pub ttl: u32,
    /// Provider handle.
    pub id: Option<String>,
}

impl Record {
    fn new(name: &str, data: Data) -> Self {
        Self {
            name: name.to_ascii_lowercase(),
            data,
            ttl: TTL,
            id: None,
        }
    }
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}. {}", self.name, self.data)
    }
}

/// A zone a provider holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Zone {
    /// Its apex, lowercase, no trailing dot.
    pub name: String,
    /// The provider's handle (Cloudflare's zone id; the name for RFC 2136).
    pub id: String,
}

/// What a DNS provider does for us.
pub trait Provider: Send + Sync + fmt::Debug {
    /// `cloudflare`, `rfc2136`.
    fn name(&self) -> &'static str;
    /// The zones this provider (this token, this key) can edit.
    fn zones(&self) -> BoxFuture<'_, Result<Vec<Zone>, DnsError>>;
    /// The closest enclosing zone of `name`.
    fn zone_for<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Zone, DnsError>> {
        Box::pin(async move {
            let zones = self.zones().await?;
            closest_zone(name, &zones)
                .cloned()
                .ok_or_else(|| DnsError::NoZone {
                    provider: self.name(),
                    name: name.to_owned(),
                    zones: match zones.is_empty() {
                        true => "it lists no zones: check the credentials' scope".to_owned(),
                        false => format!(
                            "it holds {}",
                            zones
                                .iter()
                                .map(|z| z.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    },
                })
        })
    }
    /// The records of type `rtype` at `name`; answers may carry others (a CNAME on the way),
    /// which [`records_at`] drops.
    fn records<'a>(
        &'a self,
        zone: &'a Zone,
        name: &'a str,
        rtype: Rtype,
    ) -> BoxFuture<'a, Result<Vec<Record>, DnsError>>;
    /// Add one record (others at the name stay); returns it with its handle.
    fn create<'a>(
        &'a self,
        zone: &'a Zone,
        record: &'a Record,
    ) -> BoxFuture<'a, Result<Record, DnsError>>;
    /// Delete one record (as `records` or `create` returned it).
    fn delete<'a>(
        &'a self,
        zone: &'a Zone,
        record: &'a Record,
    ) -> BoxFuture<'a, Result<(), DnsError>>;
    /// Whether a CNAME may sit at a zone apex (Cloudflare flattens it; plain DNS cannot).
    fn apex_cname(&self) -> bool {
        false
    }
    /// Whether it edits zones (the dstack records), or presents challenges only (`httpreq`).
    fn writes_zones(&self) -> bool {
        true
    }
    /// Where records show first when no resolvers are configured.
    fn default_resolvers(&self) -> BoxFuture<'_, Vec<SocketAddr>>;
}

/// Exactly the `rtype` records owned by `name`.
pub async fn records_at(
    provider: &dyn Provider,
    zone: &Zone,
    name: &str,
    rtype: Rtype,
) -> Result<Vec<Record>, DnsError> {
    let mut records = provider.records(zone, name, rtype).await?;
    records.retain(|r| r.data.rtype() == rtype && r.name.eq_ignore_ascii_case(name));
    Ok(records)
}

/// `name` equals `zone` or sits under it.
pub fn in_zone(name: &str, zone: &str) -> bool {
    let (name, zone) = (name.to_ascii_lowercase(), zone.to_ascii_lowercase());
    name == zone || name.ends_with(&format!(".{zone}"))
}

/// The longest zone enclosing `name`.
pub fn closest_zone<'z>(name: &str, zones: &'z [Zone]) -> Option<&'z Zone> {
    zones
        .iter()
        .filter(|z| in_zone(name, &z.name))
        .max_by_key(|z| z.name.len())
}

/// A challenge record we placed, to remove when the order is over.
#[derive(Clone, Debug)]
pub struct Placed {
    zone: Zone,
    record: Record,
}

impl Placed {
    /// The record, as the provider holds it.
    pub fn record(&self) -> &Record {
        &self.record
    }
}

/// What happened to one dstack record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Already right: nothing written.
    Unchanged(String),
    /// Written.
    Created(String),
    /// Not written, and why.
    Skipped(String),
    /// Written, and our earlier value at that name removed.
    Replaced {
        /// The record now.
        now: String,
        /// What it replaced.
        old: Vec<String>,
    },
}

/// One dstack record a domain needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wanted {
    /// This record.
    Record {
        /// Name and value.
        record: Record,
        /// Other values of its type at its name are ours from an earlier configuration.
        exclusive: bool,
        /// The gateway alias: a provider that flattens it into the gateway's addresses has it
        /// too.
        alias: bool,
        /// What it is for, in words.
        note: &'static str,
    },
    /// Not possible, and why.
    Skipped(String),
}

/// Whoever publishes the DNS-01 challenge records when no provider in the CVM can
/// (`DNS_SETUP_MODE` without a credential): the operator by hand, or their webhook. `publish`
/// returns once the public sees every record, so the CA is told to look only then.
pub trait OperatorRecords: Send + Sync + fmt::Debug {
    /// Show or hand over `challenges`, then wait until they are visible.
    fn publish<'a>(&'a self, challenges: &'a [Record]) -> BoxFuture<'a, Result<(), DnsError>>;
}

/// The DNS side of public domains: one provider, the resolvers, the dstack record settings.
#[derive(Debug)]
pub struct Dns {
    provider: Option<Arc<dyn Provider>>,
    config: DnsConfig,
    /// How the public sees the records the operator creates (`DNS_SETUP_MODE`).
    doh: Option<doh::Doh>,
}

/// Build the configured provider.
pub fn provider(cfg: &ProviderConfig, timeout: Duration) -> Result<Arc<dyn Provider>, SetupError> {
    Ok(match cfg {
        ProviderConfig::Cloudflare { api_token, api_url } => {
            Arc::new(cloudflare::Cloudflare::new(api_url, &api_token.0, timeout)?)
        }
        ProviderConfig::Rfc2136 {
            server,
            key_name,
            algorithm,
            secret,
            zones,
        } => Arc::new(rfc2136::Rfc2136::new(
            server, key_name, algorithm, &secret.0, zones, timeout,
        )?),
        ProviderConfig::DigitalOcean { api_token, api_url } => Arc::new(
            digitalocean::DigitalOcean::new(api_url, &api_token.0, timeout)?,
        ),
        ProviderConfig::Hetzner { api_token, api_url } => {
            Arc::new(hetzner::Hetzner::new(api_url, &api_token.0, timeout)?)
        }
        ProviderConfig::Porkbun {
            api_key,
            secret_key,
            api_url,
        } => Arc::new(porkbun::Porkbun::new(
            api_url,
            &api_key.0,
            &secret_key.0,
            timeout,
        )?),
        ProviderConfig::Linode { api_token, api_url } => {
            Arc::new(linode::Linode::new(api_url, &api_token.0, timeout)?)
        }
        ProviderConfig::Namecheap {
            api_user,
            api_key,
            client_ip,
            api_url,
        } => Arc::new(namecheap::Namecheap::new(
            namecheap::Settings {
                api_url: api_url.clone(),
                api_user: api_user.clone(),
                api_key: api_key.0.clone(),
                client_ip: *client_ip,
                client_ip_url: namecheap::CLIENT_IP_URL.to_owned(),
            },
            timeout,
        )?),
        ProviderConfig::GoogleCloud(g) => {
            let account = gcloud::ServiceAccount::from_json(&g.service_account.0)
                .map_err(SetupError::ServiceAccount)?;
            Arc::new(gcloud::GoogleCloud::new(
                gcloud::Settings {
                    api_url: g.api_url.clone(),
                    project: g.project.clone(),
                    account,
                    zone: g.zone.clone(),
                    sync: (g.polling_interval, g.sync_timeout),
                },
                timeout,
            )?)
        }
        ProviderConfig::Ovh { api_url, auth } => {
            let auth = match auth {
                crate::config::dns::OvhAuth::Signed {
                    application_key,
                    application_secret,
                    consumer_key,
                } => ovh::Auth::Signed {
                    application_key: application_key.clone(),
                    application_secret: application_secret.0.clone(),
                    consumer_key: consumer_key.0.clone(),
                },
                crate::config::dns::OvhAuth::OAuth2 {
                    client_id,
                    client_secret,
                    token_url,
                } => ovh::Auth::OAuth2 {
                    client_id: client_id.clone(),
                    client_secret: client_secret.0.clone(),
                    token_url: token_url.clone(),
                },
                crate::config::dns::OvhAuth::Token(t) => ovh::Auth::Token(t.0.clone()),
            };
            Arc::new(ovh::Ovh::new(api_url, auth, timeout)?)
        }
        ProviderConfig::Route53(r) => Arc::new(route53::Route53::new(
            route53::Settings {
                api_url: r.api_url.clone(),
                credentials: sigv4::Credentials {
                    access_key: r.access_key_id.clone(),
                    secret_key: r.secret_access_key.0.clone(),
                    session_token: r.session_token.as_ref().map(|t| t.0.clone()),
                },
                role: r.role_arn.as_ref().map(|arn| route53::Role {
                    arn: arn.clone(),
                    external_id: r.external_id.clone(),
                    sts_url: r.sts_url.clone(),
                    region: r.region.clone(),
                }),
                hosted_zone_id: r.hosted_zone_id.clone(),
                sync: r
                    .wait_for_sync
                    .then_some((r.polling_interval, r.sync_timeout)),
            },
            timeout,
        )?),
        ProviderConfig::HttpReq {
            endpoint,
            username,
            password,
        } => Arc::new(httpreq::HttpReq::new(
            endpoint,
            username
                .as_deref()
                .map(|u| (u, password.as_ref().map_or("", |p| p.0.as_str()))),
            timeout,
        )?),
    })
}

impl Dns {
    /// From `[dns]`.
    pub fn new(config: &DnsConfig) -> Result<Self, SetupError> {
        let provider = config
            .provider
            .as_ref()
            .map(|p| provider(p, STEP_TIMEOUT))
            .transpose()?;
        Ok(Self::with_provider(provider, config))
    }

    /// With a given provider (tests bring their own).
    pub fn with_provider(provider: Option<Arc<dyn Provider>>, config: &DnsConfig) -> Self {
        // Only a build without WebPKI roots could fail here; then nothing is seen, and says so.
        let doh = config.setup.as_ref().and_then(|_| doh::Doh::new().ok());
        Self {
            provider,
            config: config.clone(),
            doh,
        }
    }

    /// Whether names are delegated to a zone the provider writes (`DELEGATION_ZONE`).
    pub fn delegates(&self) -> bool {
        self.config.delegation_zone.is_some()
    }

    /// `DNS_SETUP_MODE`, when the operator makes the records.
    pub fn setup(&self) -> Option<&crate::config::dns::setup::DnsSetup> {
        self.config.setup.as_ref()
    }

    /// One look through the DoH resolvers at `wanted`.
    pub async fn look(&self, wanted: &[Wanted]) -> Vec<setup::RecordCheck> {
        match (&self.doh, self.setup()) {
            (Some(doh), Some(s)) => setup::look(doh, &s.doh_resolvers, wanted).await,
            _ => Vec::new(),
        }
    }

    /// Whether the dstack records are to be written.
    pub fn manages_records(&self) -> bool {
        self.provider.as_ref().is_some_and(|p| p.writes_zones())
            && (self.config.gateway_domain.is_some() || self.config.set_caa)
    }

    /// Whether a CAA pin is to be written (`SET_CAA`).
    pub fn sets_caa(&self) -> bool {
        self.config.set_caa
    }

    /// The port in the app-address TXT.
    pub fn app_port(&self) -> Option<u16> {
        self.config.app_port
    }

    /// Whether CAA is checked before ordering (needs resolvers: a provider's or configured).
    pub fn checks_caa(&self) -> bool {
        self.provider.is_some() || !self.config.resolvers.is_empty()
    }

    fn provider(&self) -> Result<&Arc<dyn Provider>, DnsError> {
        self.provider.as_ref().ok_or(DnsError::NoProvider)
    }

    async fn resolvers(&self) -> Vec<SocketAddr> {
        match (&self.provider, self.config.resolvers.is_empty()) {
            (Some(p), true) => p.default_resolvers().await,
            _ => self.config.resolvers.clone(),
        }
    }

    /// Whether DNS-01 challenges are published by the operator, not by a provider here.
    pub fn operator_places(&self) -> bool {
        self.provider.is_none() && self.setup().is_some()
    }

    /// The TXT record `_acme-challenge.<name>` = `value` of a DNS-01 challenge.
    pub fn challenge_record(&self, identifier: &str, value: &str) -> Record {
        let owner = self.owner(&format!(
            "_acme-challenge.{}",
            identifier.trim_start_matches("*.")
        ));
        Record::new(&owner, Data::Txt(value.to_owned()))
    }

    /// Publish `_acme-challenge.<name>` = `value` for a DNS-01 challenge.
    pub async fn place_challenge(&self, identifier: &str, value: &str) -> Result<Placed, DnsError> {
        let provider = self.provider()?;
        let record = self.challenge_record(identifier, value);
        let zone = provider.zone_for(&record.name).await?;
        let record = provider.create(&zone, &record).await?;
        tracing::debug!(record = %record, zone = %zone.name, "challenge record placed");
        Ok(Placed { zone, record })
    }

    /// Remove challenge records; failures are logged, never fatal (the order is over).
    pub async fn remove(&self, placed: &[Placed]) {
        for p in placed {
            match self.take_back(p).await {
                Ok(()) => tracing::debug!(record = %p.record, "challenge record removed"),
                Err(e) => {
                    tracing::warn!(record = %p.record, error = %e, "challenge record not removed")
                }
            }
        }
    }

    /// Remove one challenge record, saying whether that worked.
    pub async fn take_back(&self, placed: &Placed) -> Result<(), DnsError> {
        self.provider()?.delete(&placed.zone, &placed.record).await
    }

    /// Wait until every resolver sees every placed value, or fail after the timeout saying
    /// which resolver saw what.
    pub async fn wait_visible(&self, placed: &[Placed]) -> Result<(), DnsError> {
        if !self.config.propagation_check || placed.is_empty() {
            return Ok(());
        }
        let resolvers = self.resolvers().await;
        let deadline = tokio::time::Instant::now() + self.config.propagation_timeout;
        let mut waiting: Vec<(SocketAddr, &Placed, String)> = resolvers
            .iter()
            .flat_map(|r| placed.iter().map(move |p| (*r, p, String::new())))
            .collect();
        loop {
            let mut still = Vec::new();
            for (resolver, p, _) in waiting {
                let Data::Txt(want) = &p.record.data else {
                    continue;
                };
                let seen =
                    match wire::query(resolver, &p.record.name, Rtype::Txt, QUERY_TIMEOUT).await {
                        Ok(a) => {
                            let values: Vec<&str> = a.txts().collect();
                            if values.contains(&want.as_str()) {
                                continue;
                            }
                            match values.is_empty() {
                                true => format!("it answers {}", a.rcode),
                                false => format!("it sees {values:?}"),
                            }
                        }
                        Err(e) => e.to_string(),
                    };
                still.push((resolver, p, seen));
            }
            if still.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() + POLL > deadline {
                let (resolver, p, seen) = &still[0];
                return Err(DnsError::NotPropagated(format!(
                    "{} not seen by resolver {resolver} within {:?} ({seen}); a resolver with another view of the zone (split horizon) never will: list resolvers that see the public zone in DNS_RESOLVERS, or set DNS_PROPAGATION_CHECK=false",
                    p.record,
                    self.config.propagation_timeout
                )));
            }
            waiting = still;
            tokio::time::sleep(POLL).await;
        }
    }

    /// The relevant CAA set of `name` (RFC 8659 §3: the closest ancestor that has one).
    async fn caa_set(&self, name: &str) -> Option<(String, Vec<Record>)> {
        let resolvers = self.resolvers().await;
        let mut owner = name.trim_start_matches("*.").to_owned();
        loop {
            let mut answered = false;
            for r in &resolvers {
                match wire::query(*r, &owner, Rtype::Caa, QUERY_TIMEOUT).await {
                    Ok(a) => {
                        answered = true;
                        let set: Vec<Record> = a
                            .records
                            .into_iter()
                            .filter(|r| r.data.rtype() == Rtype::Caa)
                            .collect();
                        if !set.is_empty() {
                            return Some((owner, set));
                        }
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(resolver = %r, name = %owner, error = %e, "CAA query unanswered")
                    }
                }
            }
            if !answered {
                // The CA checks CAA itself; ours is an early, clearer error, not a gate.
                tracing::warn!(name = %owner, "no resolver answered the CAA query: not checked before ordering");
                return None;
            }
            owner = match owner.split_once('.') {
                Some((_, parent)) if parent.contains('.') => parent.to_owned(),
                _ => return None,
            };
        }
    }

    /// Fail before ordering when CAA forbids this CA, account or method for any name.
    pub async fn check_caa(
        &self,
        names: &[String],
        req: &caa::Request<'_>,
    ) -> Result<(), DnsError> {
        for name in names {
            if let Some((owner, set)) = self.caa_set(name).await {
                caa::evaluate(name, &set, req)
                    .map_err(|forbidden| DnsError::Caa { owner, forbidden })?;
            }
        }
        Ok(())
    }

    /// Where the record for `name` lives: `name` itself, or with a delegation zone
    /// `name.<zone>`, which the operator's CNAME at `name` points to.
    fn owner(&self, name: &str) -> String {
        match &self.config.delegation_zone {
            Some(zone) => format!("{name}.{zone}"),
            None => name.to_owned(),
        }
    }

    /// The app-address TXT's name for `name` (`<prefix>-wildcard.<base>` for a wildcard).
    fn txt_name(&self, name: &str) -> String {
        match name.strip_prefix("*.") {
            Some(base) => format!("{}-wildcard.{base}", self.config.txt_prefix),
            None => format!("{}.{name}", self.config.txt_prefix),
        }
    }

    /// The dstack records of `domain`: the CNAME to the gateway and the app-address TXT for
    /// every name, and with `SET_CAA` a CAA record pinning `account` and the method; what
    /// cannot be written, and why. With a delegation zone they all live in that zone.
    pub fn dstack_record_set(
        &self,
        domain: &DomainConfig,
        app_id: &str,
        port: u16,
        caa: Option<(&str, &str)>,
    ) -> Vec<Wanted> {
        let mut out: Vec<Wanted> = Vec::new();
        let mut push = |w: Wanted| {
            if !out.contains(&w) {
                out.push(w);
            }
        };
        let delegated = self.config.delegation_zone.is_some();
        for name in &domain.names {
            let base = name.strip_prefix("*.");
            if let Some(gateway) = &self.config.gateway_domain {
                // Delegated: one alias for the base name, which the operator's CNAMEs of the
                // name and its wildcard both point to.
                let alias = match delegated {
                    true => self.owner(base.unwrap_or(name)),
                    false => name.clone(),
                };
                push(Wanted::Record {
                    record: Record::new(&alias, Data::Cname(gateway.clone())),
                    exclusive: true,
                    alias: true,
                    note: "sends the name to the dstack gateway",
                });
                push(Wanted::Record {
                    record: Record::new(
                        &self.owner(&self.txt_name(name)),
                        Data::Txt(format!("{app_id}:{port}")),
                    ),
                    exclusive: true,
                    alias: false,
                    note: "tells the gateway which app (and port) serves the name",
                });
            }
            let caa_owner = self.owner(base.unwrap_or(name));
            let cnamed = self.config.gateway_domain.is_some()
                && (delegated || domain.names.contains(&caa_owner));
            if self.config.set_caa && cnamed {
                // A CNAME owns its name alone (RFC 1034 §3.6.2): CAA there would be refused or
                // silently dropped, and the CA follows the CNAME to the gateway's CAA anyway.
                push(Wanted::Skipped(format!(
                    "CAA at {caa_owner}: the name is a CNAME to the gateway, which cannot carry other records"
                )));
            } else if let (true, Some((identity, account))) = (self.config.set_caa, caa) {
                let value = caa::IssueValue {
                    domain: identity.to_owned(),
                    params: vec![
                        (
                            "validationmethods".into(),
                            domain.challenge.as_str().to_owned(),
                        ),
                        ("accounturi".into(), account.to_owned()),
                    ],
                };
                // Other CAA records stay: several issue records are alternatives, so adding
                // ours never revokes another CA or account the owner allowed.
                push(Wanted::Record {
                    record: Record::new(
                        &caa_owner,
                        Data::Caa {
                            critical: false,
                            tag: if base.is_some() { "issuewild" } else { "issue" }.into(),
                            value: value.render(),
                        },
                    ),
                    exclusive: false,
                    alias: false,
                    note: "lets only this app's ACME account issue for the name",
                });
            }
        }
        out
    }

    /// The CNAMEs the operator creates once to delegate `domain` to the delegation zone: the
    /// name (and a wildcard's base), its app-address TXT name, and its `_acme-challenge`.
    pub fn delegation_cnames(&self, domain: &DomainConfig) -> Vec<Wanted> {
        let Some(zone) = &self.config.delegation_zone else {
            return Vec::new();
        };
        let mut out: Vec<Wanted> = Vec::new();
        let mut cname = |from: &str, note: &'static str| {
            let w = Wanted::Record {
                record: Record::new(
                    from,
                    Data::Cname(format!("{}.{zone}", from.trim_start_matches("*."))),
                ),
                exclusive: true,
                alias: false,
                note,
            };
            if !out.contains(&w) {
                out.push(w);
            }
        };
        for name in &domain.names {
            let base = name.trim_start_matches("*.");
            if self.config.gateway_domain.is_some() {
                cname(name, "delegates the name to the zone dstack-mesh writes");
                if name.starts_with("*.") {
                    cname(base, "delegates the wildcard's base name");
                }
                cname(&self.txt_name(name), "delegates the app-address TXT");
            }
            cname(
                &format!("_acme-challenge.{base}"),
                "delegates the DNS-01 challenge",
            );
        }
        out
    }

    /// Write the dstack records of `domain` ([`Dns::dstack_record_set`]) through the provider.
    /// Idempotent; removes only what sits at names that exist for this route.
    pub async fn ensure_records(
        &self,
        domain: &DomainConfig,
        app_id: &str,
        port: u16,
        caa: Option<(&str, &str)>,
    ) -> Result<Vec<Outcome>, DnsError> {
        let mut out = Vec::new();
        for wanted in self.dstack_record_set(domain, app_id, port, caa) {
            out.push(match wanted {
                Wanted::Record {
                    record, exclusive, ..
                } => self.ensure(record, exclusive).await?,
                Wanted::Skipped(why) => Outcome::Skipped(why),
            });
        }
        Ok(out)
    }

    /// Make `want` exist at its name. `exclusive`: other values of the type at that name are
    /// ours from an earlier configuration and go (after the new one is in place).
    pub async fn ensure(&self, want: Record, exclusive: bool) -> Result<Outcome, DnsError> {
        let provider = self.provider()?;
        let zone = provider.zone_for(&want.name).await?;
        let rtype = want.data.rtype();
        let existing = records_at(provider.as_ref(), &zone, &want.name, rtype).await?;
        let (same, other): (Vec<_>, Vec<_>) =
            existing.into_iter().partition(|r| r.data.same(&want.data));
        if !same.is_empty() && (!exclusive || other.is_empty()) {
            return Ok(Outcome::Unchanged(want.to_string()));
        }
        if rtype == Rtype::Cname {
            if want.name == zone.name && !provider.apex_cname() {
                return Err(DnsError::Conflict(format!(
                    "{}: a CNAME cannot sit at the zone apex (RFC 1034 §3.6.2); point a subdomain at the gateway, or use a provider that flattens apex CNAMEs",
                    want.name
                )));
            }
            for t in [Rtype::A, Rtype::Aaaa, Rtype::Txt] {
                if let Some(r) = records_at(provider.as_ref(), &zone, &want.name, t)
                    .await?
                    .first()
                {
                    return Err(DnsError::Conflict(format!(
                        "`{r}` sits where the CNAME to the gateway goes, and dstack-mesh does not remove records it did not write: remove it, or unset GATEWAY_DOMAIN"
                    )));
                }
            }
        }
        let old: Vec<String> = match exclusive {
            true => other.iter().map(ToString::to_string).collect(),
            false => Vec::new(),
        };
        // A name holds one CNAME: the old one goes first. Anything else: new first, so the
        // name is never empty.
        if rtype == Rtype::Cname {
            for r in &other {
                provider.delete(&zone, r).await?;
            }
        }
        if same.is_empty() {
            provider.create(&zone, &want).await?;
        }
        if exclusive && rtype != Rtype::Cname {
            for r in &other {
                provider.delete(&zone, r).await?;
            }
        }
        Ok(match old.is_empty() {
            true => Outcome::Created(want.to_string()),
            false => Outcome::Replaced {
                now: want.to_string(),
                old,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closest_zone_wins() {
        let zones = [
            Zone {
                name: "example.com".into(),
                id: "1".into(),
            },
            Zone {
                name: "dev.example.com".into(),
                id: "2".into(),
            },
            Zone {
                name: "ample.com".into(),
                id: "3".into(),
            },
        ];
        assert_eq!(
            closest_zone("_acme-challenge.a.dev.example.com", &zones)
                .unwrap()
                .id,
            "2"
        );
        assert_eq!(closest_zone("www.example.com", &zones).unwrap().id, "1");
        assert_eq!(closest_zone("example.com", &zones).unwrap().id, "1");
        // A suffix match is not enough: labels count.
        assert_eq!(closest_zone("xample.com", &zones), None);
        assert_eq!(closest_zone("other.org", &zones), None);
    }

    #[test]
    fn a_delegation_zone_holds_every_record_the_operators_cnames_point_to() {
        let config = DnsConfig {
            gateway_domain: Some("gw.example.net".into()),
            delegation_zone: Some("z.example.org".into()),
            ..DnsConfig::default()
        };
        let dns = Dns::with_provider(None, &config);
        let domain = DomainConfig {
            names: vec!["*.example.com".into()],
            backend: "app:80".parse().unwrap(),
            mode: crate::config::Mode::Http,
            issuer: crate::config::Issuer::InternalCa,
            challenge: crate::config::Challenge::Dns01,
            send_proxy_protocol: false,
            alpn: Vec::new(),
            routes: Default::default(),
            response_headers: Vec::new(),
        };
        let show = |w: Vec<Wanted>| -> Vec<String> {
            w.iter()
                .map(|w| match w {
                    Wanted::Record { record, .. } => record.to_string(),
                    Wanted::Skipped(why) => why.clone(),
                })
                .collect()
        };
        assert_eq!(
            show(dns.delegation_cnames(&domain)),
            [
                "*.example.com. CNAME example.com.z.example.org.",
                "example.com. CNAME example.com.z.example.org.",
                "_dstack-app-address-wildcard.example.com. CNAME _dstack-app-address-wildcard.example.com.z.example.org.",
                "_acme-challenge.example.com. CNAME _acme-challenge.example.com.z.example.org.",
            ]
        );
        assert_eq!(
            show(dns.dstack_record_set(&domain, "abcd", 443, None)),
            [
                "example.com.z.example.org. CNAME gw.example.net.",
                "_dstack-app-address-wildcard.example.com.z.example.org. TXT \"abcd:443\"",
            ]
        );
    }

    #[test]
    fn an_alias_gets_its_own_dstack_records() {
        let config = DnsConfig {
            gateway_domain: Some("gw.example.net".into()),
            ..DnsConfig::default()
        };
        let dns = Dns::with_provider(None, &config);
        let domain = DomainConfig {
            names: vec!["shop.example.com".into(), "www.shop.example.com".into()],
            backend: "app:80".parse().unwrap(),
            mode: crate::config::Mode::Http,
            issuer: crate::config::Issuer::InternalCa,
            challenge: crate::config::Challenge::TlsAlpn01,
            send_proxy_protocol: false,
            alpn: Vec::new(),
            routes: Default::default(),
            response_headers: Vec::new(),
        };
        let owners: Vec<String> = dns
            .dstack_record_set(&domain, "abcd", 443, None)
            .iter()
            .filter_map(|w| match w {
                Wanted::Record { record, .. } => Some(record.name.clone()),
                Wanted::Skipped(_) => None,
            })
            .collect();
        assert_eq!(
            owners,
            [
                "shop.example.com",
                "_dstack-app-address.shop.example.com",
                "www.shop.example.com",
                "_dstack-app-address.www.shop.example.com",
            ]
        );
    }

    #[test]
    fn caa_values_compare_parsed() {
        let a = Data::Caa {
            critical: false,
            tag: "issue".into(),
            value: "ca.example;accounturi=x".into(),
        };
        let b = Data::Caa {
            critical: false,
            tag: "ISSUE".into(),
            value: "ca.example; accounturi=x".into(),
        };
        assert!(a.same(&b));
        assert!(Data::Cname("GW.example".into()).same(&Data::Cname("gw.example".into())));
        assert!(!Data::Txt("a".into()).same(&Data::Txt("A".into())));
    }
}
