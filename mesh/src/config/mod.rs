//! The sidecar's configuration: one TOML file (dstack-vpc's `dstack-mesh.toml` loads as it is)
//! overlaid by environment variables, validated completely before anything listens. Every
//! error names the key (file key or variable) and what is expected.

mod raw;
pub mod source;

use std::{
    collections::BTreeSet,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use gateway_client::{RouteKey, StaticRoutes};
use ratls::{identity::IdentityConfig, AppId};
use raw::{AllowValue, DurationValue, RawConfig, RawFederation, RawListener};
pub use source::{Env, Source};

/// Default inbound listener: every interface, the gateway forwards here.
pub const DEFAULT_INBOUND_LISTEN: &str = "0.0.0.0:443";
/// Default mesh backend (the app), as dstack-vpc's `MESH_BACKEND`.
pub const DEFAULT_BACKEND: &str = "127.0.0.1:8000";
/// Default auth service listener (loopback: only the local nginx should ask it).
pub const DEFAULT_AUTH_LISTEN: &str = "127.0.0.1:8092";
/// Default outbound proxy listener (loopback: the app's keys are behind it).
pub const DEFAULT_CLIENT_LISTEN: &str = "127.0.0.1:8091";
/// Default admin listener (health, readiness, certificates, metrics): loopback only.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:8090";
/// ClientHello plus handshake must finish within this (one deadline: no slowloris).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Request headers must arrive within this.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// An idle keep-alive connection is closed after this.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Connecting to the backend must succeed within this.
pub const DEFAULT_BACKEND_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The backend must send its response head within this (bodies stream without a deadline;
/// the idle timer catches a stalled transfer).
pub const DEFAULT_BACKEND_TIMEOUT: Duration = Duration::from_secs(60);
/// Concurrent inbound connections; more wait in the kernel's backlog.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// An app's connection to the outbound proxy closes after this long idle.
pub const DEFAULT_OUTBOUND_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// The auth service's header deadline.
pub const DEFAULT_AUTH_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The auth service's connection cap.
pub const DEFAULT_AUTH_MAX_CONNECTIONS: usize = 1024;
/// Largest request head accepted; larger gets 431.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 << 10;
/// Longest duration any setting accepts: beyond it a timer means "never", and arithmetic on
/// instants could overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 86400);
/// Most inbound connections accepted at once.
pub const MAX_CONNECTIONS: usize = 1_000_000;
/// Outbound: TCP connect deadline to a peer or the gateway.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Outbound: the peer must send its response head within this after the upload ends.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// Outbound: an idle pooled peer connection is closed after this (under the gateway's ~10 min).
pub const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Outbound: h2 PING interval on pooled peer connections.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// Guest-agent call deadline.
pub const DEFAULT_AGENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `run` waits for the agent at start.
pub const DEFAULT_AGENT_START_TIMEOUT: Duration = Duration::from_secs(120);

/// Environment variables, in order of precedence within each setting.
pub mod env {
    /// Path of the configuration file.
    pub const CONFIG: &str = "DSTACK_MESH_CONFIG";
    /// The mesh backend (`host:port`); `MESH_BACKEND` is dstack-vpc's name.
    pub const BACKEND: &[&str] = &["DSTACK_MESH_BACKEND", "MESH_BACKEND"];
    /// Apps allowed to call in (`any` or a comma list); the VPC names are dstack-vpc's.
    pub const ALLOWED_APPS: &[&str] = &[
        "DSTACK_MESH_ALLOWED_APPS",
        "VPC_ALLOWED_APPS",
        "DSTACK_VPC_ALLOWED_APPS",
    ];
    /// The gateway domain (dstack-vpc's name).
    pub const GATEWAY_DOMAIN: &[&str] = &["DSTACK_GATEWAY_DOMAIN"];
    /// The guest agent's address.
    pub const AGENT: &[&str] = &[ratls::agent::ADDRESS_ENV];
    /// Inbound listener address.
    pub const INBOUND_LISTEN: &[&str] = &["DSTACK_MESH_INBOUND_LISTEN"];
    /// Auth service listener address.
    pub const AUTH_LISTEN: &[&str] = &["DSTACK_MESH_AUTH_LISTEN"];
    /// Outbound proxy listener address.
    pub const CLIENT_LISTEN: &[&str] = &["DSTACK_MESH_CLIENT_LISTEN"];
    /// Admin listener address.
    pub const ADMIN_LISTEN: &[&str] = &["DSTACK_MESH_ADMIN_LISTEN"];
    /// `inbound.proxy_protocol` (dstack-ingress's name).
    pub const PROXY_PROTOCOL: &[&str] = &["ACCEPT_PROXY_PROTOCOL"];
    /// The admin address `status` and `certs` talk to.
    pub const ADMIN: &[&str] = &["DSTACK_MESH_ADMIN"];
    /// `auth.nginx_secret`.
    pub const NGINX_SECRET: &[&str] = &["DSTACK_MESH_NGINX_SECRET"];
    /// The server name `nginx-config server` renders.
    pub const SERVER_NAME: &[&str] = &["DSTACK_MESH_SERVER_NAME"];
    /// dstack-ingress's connection cap (HAProxy `maxconn`): `inbound.max_connections`.
    pub const MAXCONN: &[&str] = &["MAXCONN"];
    /// dstack-ingress's backend connect timeout (`10s`): `inbound.backend_connect_timeout`.
    pub const TIMEOUT_CONNECT: &[&str] = &["TIMEOUT_CONNECT"];
    /// dstack-ingress's client inactivity timeout (`86400s`): `inbound.idle_timeout`.
    pub const TIMEOUT_CLIENT: &[&str] = &["TIMEOUT_CLIENT"];
    /// dstack-ingress's server inactivity timeout (`86400s`): `inbound.backend_timeout`.
    pub const TIMEOUT_SERVER: &[&str] = &["TIMEOUT_SERVER"];
}

/// Whose defaults fill in what the file and environment leave out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Defaults {
    /// `dstack-mesh run`: ours, safe (inbound listener on, only this app's instances admitted).
    Ours,
    /// `dstack-mesh --config FILE`, dstack-vpc's command line: what dstack-vpc's service gave,
    /// so its files and its nginx (which holds 443) keep working unchanged. Each default taken
    /// is reported as a migration note.
    DstackVpc,
}

/// `[[inbound.federation]]`: another cluster's KMS roots, trusted only for the apps listed:
/// that KMS cannot mint an identity for one of ours.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Federated {
    /// A name for logs and the status page.
    pub name: String,
    /// Its roots (PEM).
    pub roots: PathBuf,
    /// The apps it vouches for (never `any`: that is `trust_anchors`).
    pub apps: BTreeSet<AppId>,
}

/// Which apps may call in.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Allow {
    /// Every app under the trust anchors (`any`).
    Any,
    /// These apps.
    Apps(BTreeSet<AppId>),
    /// Not configured: only other instances of this app (safe default).
    OwnApp,
}

impl Allow {
    /// Who is allowed, in words (status page, `/routes`).
    pub fn words(&self) -> String {
        match self {
            Self::Any => "any app under the trust anchors".into(),
            Self::OwnApp => "this app's own instances".into(),
            Self::Apps(ids) => ids
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        }
    }

    /// The policy's allowlist, given our own app id.
    pub fn resolve(&self, own: &AppId) -> ratls::AllowList {
        match self {
            Self::Any => ratls::AllowList::Any,
            Self::Apps(ids) => ratls::AllowList::Only(ids.clone()),
            Self::OwnApp => ratls::AllowList::Only(BTreeSet::from([own.clone()])),
        }
    }
}

/// A `host:port` to connect to (defined with the gateway client, which dials them).
pub use gateway_client::{GatewaySetting, HostPort};
/// The inbound listener: mesh callers (and, later, public domains) on one TLS port.
#[derive(Clone, Debug, serde::Serialize)]
pub struct InboundConfig {
    /// Whether it runs.
    pub enabled: bool,
    /// Address to bind.
    pub listen: SocketAddr,
    /// The app that receives authenticated mesh requests.
    pub backend: HostPort,
    /// Apps allowed to call in.
    pub allow: Allow,
    /// Refuse callers without an attestation bound to their key.
    pub require_attestation: bool,
    /// Extra trust anchors (PEM files) next to our own KMS root, each vouching for any app.
    pub trust_anchors: Vec<PathBuf>,
    /// Other clusters' KMS roots, each vouching only for its own apps (federation).
    pub federation: Vec<Federated>,
    /// ClientHello + handshake deadline.
    #[serde(with = "secs")]
    pub handshake_timeout: Duration,
    /// Request header deadline.
    #[serde(with = "secs")]
    pub header_timeout: Duration,
    /// Idle keep-alive limit.
    #[serde(with = "secs")]
    pub idle_timeout: Duration,
    /// Backend connect deadline.
    #[serde(with = "secs")]
    pub backend_connect_timeout: Duration,
    /// Backend response-head deadline.
    #[serde(with = "secs")]
    pub backend_timeout: Duration,
    /// Concurrent connections.
    pub max_connections: usize,
    /// Largest request head.
    pub max_header_bytes: usize,
    /// The PROXY protocol header the gateway writes first (`pp: true`); off by default.
    pub proxy_protocol: ProxyProtocol,
}

/// A plain listener with an on/off switch (auth service, outbound proxy).
#[derive(Clone, Debug, serde::Serialize)]
pub struct ListenerConfig {
    /// Whether it runs.
    pub enabled: bool,
    /// Address to bind.
    pub listen: SocketAddr,
}

/// The outbound proxy's behaviour (`[outbound]`; its listener is dstack-vpc's `[client]`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct OutboundConfig {
    /// Requests without a target header go to the guest agent.
    pub agent_passthrough: bool,
    /// Key-bearing agent methods (GetKey, GetTlsKey, Sign, ...) pass too.
    pub agent_key_methods: bool,
    /// `GetQuote` and `Attest` (quotes over caller-chosen report data) pass too.
    pub agent_quote_methods: bool,
    /// TCP connect deadline.
    #[serde(with = "secs")]
    pub connect_timeout: Duration,
    /// TLS handshake deadline.
    #[serde(with = "secs")]
    pub handshake_timeout: Duration,
    /// Response-head deadline, counted from the end of the upload.
    #[serde(with = "secs")]
    pub response_timeout: Duration,
    /// Idle pooled connections close after this.
    #[serde(with = "secs")]
    pub pool_idle_timeout: Duration,
    /// h2 PING interval on pooled connections.
    #[serde(with = "secs")]
    pub keepalive_interval: Duration,
    /// Dial this address for every gateway name (the SNI stays the gateway name).
    pub gateway_address: Option<HostPort>,
    /// Extra roots (PEM) for the gateway's own TLS, beside the public WebPKI roots.
    pub gateway_roots: Option<PathBuf>,
    /// The CVM's sys-config, where `gateway_urls` come from when no gateway is configured.
    pub sys_config: PathBuf,
    /// Direct addresses by app id, or app id and port (networks where CVMs reach each other
    /// without the gateway); targets they do not name go through the gateway.
    #[serde(serialize_with = "serialize_routes")]
    pub routes: StaticRoutes,
    /// An app's connection closes after this long without a byte either way.
    #[serde(with = "secs")]
    pub idle_timeout: Duration,
    /// An app's request head must arrive within this.
    #[serde(with = "secs")]
    pub header_timeout: Duration,
    /// Connections from apps at once.
    pub max_connections: usize,
}

fn serialize_routes<S: serde::Serializer>(routes: &StaticRoutes, s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(routes.iter().map(|(k, v)| (k.to_string(), v.to_string())))
}

/// The auth service for nginx's `auth_request`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AuthConfig {
    /// Whether and where it listens.
    #[serde(flatten)]
    pub listener: ListenerConfig,
    /// Its allowlist when it differs from the inbound one.
    pub allow: Option<Allow>,
    /// Accept nginx's `SUCCESS` for the chain of a lone leaf (nginx never passes the App CA),
    /// from requests that carry `nginx_secret`. At start the sidecar checks that nginx's CA
    /// file holds only roots the mesh trusts.
    pub trust_nginx_chain: bool,
    /// What our nginx sends with every auth subrequest (`nginx-config server` renders it);
    /// without it, every chain is verified here and a lone KMS leaf is refused.
    pub nginx_secret: Option<Secret>,
    /// Without a secret, take nginx's word from callers on loopback: dstack-vpc's own
    /// template sends no secret and reaches the service on 127.0.0.1, while other containers
    /// come from their own addresses. Off unless set, or in dstack-vpc's form.
    pub trust_loopback: bool,
    /// nginx's request head must arrive within this.
    #[serde(with = "secs")]
    pub header_timeout: Duration,
    /// Connections at once (nginx keeps a few keep-alive ones; the cap stops a runaway client).
    pub max_connections: usize,
}

/// Which PROXY headers the listener requires (`inbound.proxy_protocol`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    /// No header: the connection starts with the ClientHello.
    #[default]
    Off,
    /// Version 1 (text) only.
    V1,
    /// Version 2 (binary) only.
    V2,
    /// Either version.
    Any,
}

impl std::str::FromStr for ProxyProtocol {
    type Err = String;

    /// `off`, `v1`, `v2`, `any`; dstack-ingress's `true`/`false` mean `any`/`off`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "off" | "false" | "0" | "no" => Ok(Self::Off),
            "v1" => Ok(Self::V1),
            "v2" => Ok(Self::V2),
            "any" | "on" | "true" | "1" | "yes" => Ok(Self::Any),
            other => Err(format!("{other:?}: use off, v1, v2 or any")),
        }
    }
}

/// A secret from the configuration: never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// Certificate files of a dstack-vpc deployment (used to render nginx configs).
#[derive(Clone, Debug, serde::Serialize)]
pub struct TlsFiles {
    /// Certificate chain.
    pub cert_file: PathBuf,
    /// Private key.
    pub key_file: PathBuf,
    /// KMS root.
    pub ca_file: PathBuf,
}

/// The guest agent.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AgentConfig {
    /// Address, when not discovered.
    pub address: Option<String>,
    /// Per-call deadline.
    #[serde(with = "secs")]
    pub timeout: Duration,
    /// How long `run` waits for an agent that does not answer at start (it starts later than
    /// the sidecar, or restarts) before it gives up.
    #[serde(with = "secs")]
    pub start_timeout: Duration,
}

/// Everything the sidecar needs.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Config {
    /// The guest agent.
    pub agent: AgentConfig,
    /// How the identity is requested.
    #[serde(skip)]
    pub identity: IdentityConfig,
    /// The inbound listener.
    pub inbound: InboundConfig,
    /// The auth service.
    pub auth: AuthConfig,
    /// The outbound proxy's listener (`[client]`).
    pub client: ListenerConfig,
    /// The admin listener (`[admin]`).
    pub admin: ListenerConfig,
    /// The outbound proxy's behaviour.
    pub outbound: OutboundConfig,
    /// The gateway domain (`[dstack]`).
    pub gateway_domain: Option<GatewaySetting>,
    /// dstack-vpc's certificate files (`[tls]`).
    pub tls: TlsFiles,
    /// Public domains and their certificates (`[[domains]]`, `[acme]`).
    pub public: PublicConfig,
    /// Where certificates and ACME state are kept and shared (`[store]`).
    pub store: store::StoreConfig,
    /// Attested TCP services (`[[inbound.tcp]]`).
    pub tcp_services: Vec<TcpServiceConfig>,
    /// Local ports carried to other apps' TCP services (`[[tunnels]]`).
    pub tunnels: Vec<TunnelConfig>,
    /// The registry role and this sidecar's registration (`[registry]`).
    pub registry: RegistryConfig,
    /// Verify peers' quotes and hold them to rules (`[attestation]`), when required.
    pub attestation: Option<attestation::AttestationConfig>,
    /// How long SIGTERM waits for in-flight requests (`[lifecycle] drain_timeout`).
    #[serde(with = "secs")]
    pub drain_timeout: Duration,
}

/// Default wait for in-flight requests at SIGTERM: inside Docker's and Kubernetes' default
/// grace period (10 s and 30 s) with room to exit.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(8);

mod secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}s", d.as_secs_f64()))
    }
}

/// One problem with one setting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The file key (`inbound.backend`) or variable (`MESH_BACKEND`).
    pub key: String,
    /// What is wrong and what is expected.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Every problem found, so one run shows them all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration:")?;
        for e in &self.0 {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Parse `"500ms"`, `"10s"`, `"5m"`, `"24h"`, `"7d"` (or bare seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!("{s:?} is not a duration (e.g. \"500ms\", \"10s\", \"5m\", \"24h\")")
    })?;
    let secs = |mult: u64| n.checked_mul(mult).map(Duration::from_secs);
    match unit.trim() {
        "ms" => Some(Duration::from_millis(n)),
        "" | "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86400),
        other => return Err(format!("{s:?}: unknown unit {other:?} (ms, s, m, h, d)")),
    }
    .ok_or_else(|| format!("{s:?} is too large"))
}

/// Parse an allowlist: `any`, or hex app ids separated by commas or whitespace.
pub fn parse_allow(text: &str) -> Result<Allow, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("any") {
        return Ok(Allow::Any);
    }
    let mut ids = BTreeSet::new();
    for part in text
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|p| !p.is_empty())
    {
        ids.insert(part.parse::<AppId>().map_err(|e| e.to_string())?);
    }
    if ids.is_empty() {
        return Err("empty: use \"any\" or a comma-separated list of hex app ids".into());
    }
    Ok(Allow::Apps(ids))
}

/// Collects errors while settings are converted.
struct Check {
    errors: Vec<ConfigError>,
}

impl Check {
    fn fail(&mut self, key: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            key: key.to_owned(),
            message: message.into(),
        });
    }

    /// A timeout: more than zero, at most [`MAX_DURATION`].
    fn duration(
        &mut self,
        key: &str,
        value: Option<&DurationValue>,
        default: Duration,
    ) -> Duration {
        self.bounded_duration(key, value, default, Some(MAX_DURATION))
    }

    /// A duration without the 30-day cap of timeouts (certificate lifetimes).
    fn long_duration(
        &mut self,
        key: &str,
        value: Option<&DurationValue>,
        default: Duration,
    ) -> Duration {
        self.bounded_duration(key, value, default, None)
    }

    fn bounded_duration(
        &mut self,
        key: &str,
        value: Option<&DurationValue>,
        default: Duration,
        max: Option<Duration>,
    ) -> Duration {
        let parsed = match value {
            None => return default,
            Some(DurationValue::Seconds(n)) => Ok(Duration::from_secs(*n)),
            Some(DurationValue::Text(t)) => parse_duration(t),
        };
        match parsed {
            Ok(d) if d.is_zero() => {
                self.fail(key, "must be greater than zero");
                default
            }
            Ok(d) if max.is_some_and(|max| d > max) => {
                self.fail(
                    key,
                    format!("{d:?} is longer than the 30 days any timeout may be"),
                );
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.fail(key, e);
                default
            }
        }
    }

    fn socket(&mut self, key: &str, text: &str) -> Option<SocketAddr> {
        match text.trim().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.fail(
                    key,
                    format!("{text:?} is not an IP:port address (e.g. 0.0.0.0:443)"),
                );
                None
            }
        }
    }

    fn allow(&mut self, key: &str, value: &AllowValue) -> Option<Allow> {
        let text = match value {
            AllowValue::Text(t) => t.clone(),
            AllowValue::List(items) => items.join(","),
        };
        parse_allow(&text).map_err(|e| self.fail(key, e)).ok()
    }

    /// dstack-vpc's `address` + `port`, or our `listen`.
    fn listener(
        &mut self,
        section: &str,
        raw: Option<&RawListener>,
        env: Option<(&'static str, String)>,
        default: &str,
    ) -> ListenerConfig {
        let enabled = raw.and_then(|r| r.enabled).unwrap_or(true);
        let fallback: SocketAddr = default
            .parse()
            .unwrap_or_else(|_| unreachable!("default address"));
        let listen = if let Some((var, value)) = env {
            self.socket(var, &value)
        } else if let Some(listen) = raw.and_then(|r| r.listen.as_deref()) {
            self.socket(&format!("{section}.listen"), listen)
        } else {
            match raw.map(|r| (r.address.as_deref(), r.port)) {
                Some((Some(addr), port)) => {
                    let port = port.unwrap_or(fallback.port());
                    let host = addr.trim_start_matches('[').trim_end_matches(']');
                    match host.parse::<std::net::IpAddr>() {
                        Ok(ip) => Some(SocketAddr::new(ip, port)),
                        Err(_) => {
                            self.fail(
                                &format!("{section}.address"),
                                format!("{addr:?} is not an IP address"),
                            );
                            None
                        }
                    }
                }
                Some((None, Some(port))) => Some(SocketAddr::new(fallback.ip(), port)),
                _ => Some(fallback),
            }
        };
        ListenerConfig {
            enabled,
            listen: listen.unwrap_or(fallback),
        }
    }
}

impl Config {
    /// Load the file at `path` (if any) and overlay `env`.
    pub fn load(path: Option<&Path>, env: &dyn Source) -> Result<Self, ConfigErrors> {
        Self::load_as(path, env, Defaults::Ours).map(|(config, _)| config)
    }

    /// [`Config::load`] with `defaults`; also the migration notes for the defaults taken.
    pub fn load_as(
        path: Option<&Path>,
        env: &dyn Source,
        defaults: Defaults,
    ) -> Result<(Self, Vec<String>), ConfigErrors> {
        let raw = match path {
            None => RawConfig::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigErrors(vec![ConfigError {
                        key: path.display().to_string(),
                        message: format!("cannot read the configuration file: {e}"),
                    }])
                })?;
                Self::parse_toml(&text, &path.display().to_string())?
            }
        };
        Self::from_raw(&raw, env, defaults)
    }

    /// Parse TOML text (errors name `origin`).
    fn parse_toml(text: &str, origin: &str) -> Result<RawConfig, ConfigErrors> {
        toml::from_str::<RawConfig>(text).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                key: origin.to_owned(),
                message: e.message().to_owned()
                    + &e.span()
                        .map(|s| format!(" (at byte {})", s.start))
                        .unwrap_or_default(),
            }])
        })
    }

    /// Load from TOML text (tests, embedded defaults).
    pub fn from_toml(text: &str, env: &dyn Source) -> Result<Self, ConfigErrors> {
        Self::from_toml_as(text, env, Defaults::Ours).map(|(config, _)| config)
    }

    /// [`Config::from_toml`] with `defaults`; also the migration notes for the defaults taken.
    pub fn from_toml_as(
        text: &str,
        env: &dyn Source,
        defaults: Defaults,
    ) -> Result<(Self, Vec<String>), ConfigErrors> {
        Self::from_raw(&Self::parse_toml(text, "config")?, env, defaults)
    }

    fn from_raw(
        raw: &RawConfig,
        env: &dyn Source,
        defaults: Defaults,
    ) -> Result<(Self, Vec<String>), ConfigErrors> {
        let mut c = Check { errors: Vec::new() };
        let agent = agent(raw, env, &mut c);
        let identity = identity(raw, &mut c);
        let mut inbound = inbound(raw, env, &mut c);
        let (auth_listener, client, admin) = listeners(raw, env, &mut c);
        let mut auth = auth(raw, env, auth_listener, &mut c);
        let outbound = outbound(raw, &mut c);
        let gateway_domain = gateway(raw, env, &mut c);
        let tls = tls_files(raw);
        let public = public(raw, env, &inbound, &mut c);
        let store = store::store(raw.store.as_ref(), env, &mut c);
        let tcp_services = tunnels::tcp_services(
            raw.inbound
                .as_ref()
                .and_then(|i| i.tcp.as_deref())
                .unwrap_or_default(),
            &inbound,
            &mut c,
        );
        let tunnels = tunnels::tunnels(raw.tunnels.as_deref().unwrap_or_default(), &mut c);
        let registry = tunnels::registry(raw.registry.as_ref(), env, &mut c);
        let attestation = attestation::attestation(raw.attestation.as_ref(), &mut c);
        needs_listeners(&tunnels, &registry, &inbound, &client, &mut c);
        let mut notes = match defaults {
            Defaults::Ours => Vec::new(),
            Defaults::DstackVpc => dstack_vpc_defaults(raw, env, &public, &mut inbound, &mut auth)
                .into_iter()
                .map(|n| format!("dstack-vpc default: {n}"))
                .collect(),
        };
        notes.extend(domains::ingress_notes(env));
        let mut listeners = vec![
            ("inbound.listen".to_owned(), inbound.enabled, inbound.listen),
            (
                "auth.listen".into(),
                auth.listener.enabled,
                auth.listener.listen,
            ),
            ("client.listen".into(), client.enabled, client.listen),
            ("admin.listen".into(), admin.enabled, admin.listen),
            (
                "acme.http_listen".into(),
                public.acme.http_listen.is_some(),
                public.acme.http_listen.unwrap_or(inbound.listen),
            ),
        ];
        listeners.extend(
            (tcp_services.iter().enumerate())
                .map(|(i, s)| (format!("inbound.tcp[{i}].listen"), true, s.listen)),
        );
        listeners.extend(
            (tunnels.iter().enumerate())
                .map(|(i, t)| (format!("tunnels[{i}].listen"), true, t.listen)),
        );
        no_collisions(&listeners, &mut c);
        let drain_timeout = c.duration(
            "lifecycle.drain_timeout",
            raw.lifecycle
                .as_ref()
                .and_then(|l| l.drain_timeout.as_ref()),
            DEFAULT_DRAIN_TIMEOUT,
        );
        if !c.errors.is_empty() {
            return Err(ConfigErrors(c.errors));
        }
        let config = Config {
            agent,
            identity,
            inbound,
            auth,
            client,
            admin,
            outbound,
            gateway_domain,
            tls,
            public,
            store,
            tcp_services,
            tunnels,
            registry,
            attestation,
            drain_timeout,
        };
        Ok((config, notes))
    }
}

/// dstack-vpc's service, for what its file leaves out: nginx holds 443 (no inbound listener),
/// every app under the KMS root is admitted, and its nginx template, which sends no secret,
/// is believed from loopback. Each one taken comes back as a note for the log.
fn dstack_vpc_defaults(
    raw: &RawConfig,
    env: &dyn Source,
    public: &PublicConfig,
    inbound: &mut InboundConfig,
    auth: &mut AuthConfig,
) -> Vec<String> {
    let mut notes = Vec::new();
    let inbound_set = raw.inbound.is_some()
        || source::first(env, env::INBOUND_LISTEN).is_some()
        || public.serves_domains();
    if !inbound_set {
        inbound.enabled = false;
        notes.push(
            "no [inbound]: dstack-mesh's own mTLS listener is off, as dstack-vpc's nginx holds 443; add [inbound] (and retire nginx) to let dstack-mesh terminate mTLS itself".to_owned(),
        );
    }
    if inbound.allow == Allow::OwnApp && auth.allow.is_none() {
        inbound.allow = Allow::Any;
        notes.push(
            "no allowlist: any app under the KMS root may call in, as dstack-vpc admitted; name the callers in VPC_ALLOWED_APPS or inbound.allowed_apps".to_owned(),
        );
    }
    let loopback_set = raw.auth.as_ref().and_then(|a| a.trust_loopback).is_some();
    if auth.listener.enabled && auth.nginx_secret.is_none() && !loopback_set {
        auth.trust_loopback = true;
        notes.push(
            "no auth.nginx_secret: nginx's verdict on a caller's chain is taken from loopback (dstack-vpc's template sends no secret); set the secret and add `proxy_set_header x-dstack-mesh-nginx-secret` to the /auth location to take it from nginx alone".to_owned(),
        );
    }
    notes
}

/// `[agent]`: where the guest agent is.
fn agent(raw: &RawConfig, env: &dyn Source, c: &mut Check) -> AgentConfig {
    let first = |keys: &[&'static str]| source::first(env, keys);
    let agent_raw = raw.agent.clone().unwrap_or_default();
    let agent = AgentConfig {
        address: first(env::AGENT).map(|(_, v)| v).or(agent_raw.address),
        timeout: c.duration(
            "agent.timeout",
            agent_raw.timeout.as_ref(),
            DEFAULT_AGENT_TIMEOUT,
        ),
        start_timeout: c.duration(
            "agent.start_timeout",
            agent_raw.start_timeout.as_ref(),
            DEFAULT_AGENT_START_TIMEOUT,
        ),
    };
    if let Some(addr) = &agent.address {
        if let Err(e) = addr.parse::<ratls::agent::AgentAddress>() {
            c.fail("agent.address", e.to_string());
        }
    }
    agent
}

/// `[identity]`: the RA-TLS certificate requested from the agent.
fn identity(raw: &RawConfig, c: &mut Check) -> IdentityConfig {
    let id_raw = raw.identity.clone().unwrap_or_default();
    let defaults = IdentityConfig::default();
    let identity = IdentityConfig {
        subject: id_raw.subject.unwrap_or(defaults.subject.clone()),
        alt_names: id_raw.alt_names.unwrap_or(defaults.alt_names.clone()),
        validity: c.duration(
            "identity.validity",
            id_raw.validity.as_ref(),
            defaults.validity,
        ),
        refresh_margin: id_raw
            .refresh_margin
            .as_ref()
            .map(|m| c.duration("identity.refresh_margin", Some(m), Duration::ZERO)),
        ra_tls: id_raw.ra_tls.unwrap_or(defaults.ra_tls),
        ..defaults
    };
    if let Err(e) = identity.validate() {
        c.fail("identity", e.to_string());
    }
    identity
}

/// `[inbound]`: the mesh listener.
fn inbound(raw: &RawConfig, env: &dyn Source, c: &mut Check) -> InboundConfig {
    let ib = raw.inbound.clone().unwrap_or_default();
    let (listen, backend, allow) = inbound_addresses(&ib, env, c);
    let inbound = InboundConfig {
        enabled: ib.enabled.unwrap_or(true),
        listen,
        backend,
        allow,
        require_attestation: ib.require_attestation.unwrap_or(false),
        trust_anchors: ib
            .trust_anchors
            .unwrap_or_default()
            .into_iter()
            .map(PathBuf::from)
            .collect(),
        federation: federation(ib.federation.as_deref().unwrap_or_default(), c),
        handshake_timeout: c.duration(
            "inbound.handshake_timeout",
            ib.handshake_timeout.as_ref(),
            DEFAULT_HANDSHAKE_TIMEOUT,
        ),
        header_timeout: c.duration(
            "inbound.header_timeout",
            ib.header_timeout.as_ref(),
            DEFAULT_HEADER_TIMEOUT,
        ),
        idle_timeout: haproxy_timeout(env, env::TIMEOUT_CLIENT, c).unwrap_or_else(|| {
            c.duration(
                "inbound.idle_timeout",
                ib.idle_timeout.as_ref(),
                DEFAULT_IDLE_TIMEOUT,
            )
        }),
        backend_connect_timeout: haproxy_timeout(env, env::TIMEOUT_CONNECT, c).unwrap_or_else(
            || {
                c.duration(
                    "inbound.backend_connect_timeout",
                    ib.backend_connect_timeout.as_ref(),
                    DEFAULT_BACKEND_CONNECT_TIMEOUT,
                )
            },
        ),
        backend_timeout: haproxy_timeout(env, env::TIMEOUT_SERVER, c).unwrap_or_else(|| {
            c.duration(
                "inbound.backend_timeout",
                ib.backend_timeout.as_ref(),
                DEFAULT_BACKEND_TIMEOUT,
            )
        }),
        max_connections: match source::first(env, env::MAXCONN) {
            Some((var, v)) => v.trim().parse().unwrap_or_else(|_| {
                c.fail(var, format!("{v:?} is not a number of connections"));
                DEFAULT_MAX_CONNECTIONS
            }),
            None => ib.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
        },
        max_header_bytes: ib.max_header_bytes.unwrap_or(DEFAULT_MAX_HEADER_BYTES),
        proxy_protocol: match (source::first(env, env::PROXY_PROTOCOL), &ib.proxy_protocol) {
            (Some((var, v)), _) => v.parse().map_err(|e| c.fail(var, e)).unwrap_or_default(),
            (None, Some(v)) => v
                .parse()
                .map_err(|e| c.fail("inbound.proxy_protocol", e))
                .unwrap_or_default(),
            (None, None) => ProxyProtocol::Off,
        },
    };
    check_inbound(&inbound, c);
    inbound
}

/// A dstack-ingress timeout variable (HAProxy's syntax: a number and a unit, `us` to `d`; a
/// bare number is refused, as dstack-ingress does, because HAProxy would read milliseconds).
fn haproxy_timeout(env: &dyn Source, keys: &[&'static str], c: &mut Check) -> Option<Duration> {
    let (var, text) = source::first(env, keys)?;
    let t = text.trim();
    let split = t.find(|ch: char| !ch.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = match digits.parse() {
        Ok(n) if !unit.is_empty() => n,
        _ => {
            c.fail(
                var,
                format!(
                    "{t:?} is not a timeout: a number and a unit (us, ms, s, m, h, d), e.g. 10s"
                ),
            );
            return None;
        }
    };
    let d = match unit {
        "us" => Duration::from_micros(n),
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        "d" => Duration::from_secs(n.saturating_mul(86_400)),
        other => {
            c.fail(
                var,
                format!("{t:?}: unit {other:?} is not one of us, ms, s, m, h, d"),
            );
            return None;
        }
    };
    if d.is_zero() || d > MAX_DURATION {
        c.fail(var, format!("{t:?} must be above zero and at most 30 days"));
        return None;
    }
    Some(d)
}

/// Where `[inbound]` listens, where it forwards, and whom it admits (each: the environment,
/// else the file, else the default).
fn inbound_addresses(
    ib: &raw::RawInbound,
    env: &dyn Source,
    c: &mut Check,
) -> (SocketAddr, HostPort, Allow) {
    let first = |keys: &[&'static str]| source::first(env, keys);
    let listen_default = DEFAULT_INBOUND_LISTEN
        .parse()
        .unwrap_or_else(|_| unreachable!("default address"));
    let listen = match first(env::INBOUND_LISTEN) {
        Some((var, v)) => c.socket(var, &v),
        None => ib
            .listen
            .as_deref()
            .map_or(Some(listen_default), |l| c.socket("inbound.listen", l)),
    }
    .unwrap_or(listen_default);
    let backend_file = ib
        .backend
        .as_deref()
        .map(|b| ("inbound.backend", b.to_owned()));
    let backend_text = match first(env::BACKEND) {
        Some((var, v)) => Some((var.to_owned(), v)),
        None => backend_file.map(|(k, v)| (k.to_owned(), v)),
    };
    let backend = match backend_text {
        None => DEFAULT_BACKEND
            .parse()
            .unwrap_or_else(|_| unreachable!("default backend")),
        Some((key, text)) => text.parse::<HostPort>().unwrap_or_else(|e| {
            c.fail(&key, e);
            HostPort {
                host: "127.0.0.1".into(),
                port: 8000,
            }
        }),
    };
    let file_allow = ib
        .allowed_apps
        .as_ref()
        .map(|a| ("inbound.allowed_apps", a.clone()));
    let allow = match first(env::ALLOWED_APPS) {
        Some((var, v)) => parse_allow(&v).map_err(|e| c.fail(var, e)).ok(),
        None => file_allow.and_then(|(k, v)| c.allow(k, &v)),
    }
    .unwrap_or(Allow::OwnApp);
    (listen, backend, allow)
}

/// The limits are in range and the extra trust anchors load.
fn check_inbound(inbound: &InboundConfig, c: &mut Check) {
    if !(1..=MAX_CONNECTIONS).contains(&inbound.max_connections) {
        c.fail(
            "inbound.max_connections",
            format!("must be between 1 and {MAX_CONNECTIONS}"),
        );
    }
    if !(1024..=1 << 20).contains(&inbound.max_header_bytes) {
        c.fail(
            "inbound.max_header_bytes",
            "must be between 1024 and 1048576",
        );
    }
    let files = inbound
        .trust_anchors
        .iter()
        .map(|p| ("inbound.trust_anchors", p))
        .chain(
            inbound
                .federation
                .iter()
                .map(|f| ("inbound.federation.roots", &f.roots)),
        );
    for (key, path) in files {
        // Parsed now, so a bad file is a configuration error (exit 64), not a start failure.
        let parsed = std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|b| ratls::cert::parse_chain(&b).map_err(|e| e.to_string()))
            .and_then(|roots| ratls::TrustAnchors::new(&roots).map_err(|e| e.to_string()));
        if let Err(e) = parsed {
            c.fail(key, format!("{}: {e}", path.display()));
        }
    }
}

/// `[[inbound.federation]]`, checked: each has roots and names its apps.
fn federation(raw: &[RawFederation], c: &mut Check) -> Vec<Federated> {
    let mut out = Vec::with_capacity(raw.len());
    for (i, f) in raw.iter().enumerate() {
        let name = f.name.clone().unwrap_or_else(|| format!("federation-{i}"));
        let Some(roots) = &f.roots else {
            c.fail(
                "inbound.federation.roots",
                format!("{name}: required: the other cluster's KMS root (PEM)"),
            );
            continue;
        };
        let apps = match f
            .allowed_apps
            .as_ref()
            .and_then(|a| c.allow("inbound.federation.allowed_apps", a))
        {
            Some(Allow::Apps(apps)) => apps,
            Some(_) => {
                c.fail("inbound.federation.allowed_apps", format!("{name}: name the apps this root vouches for (\"any\" would let it mint any identity, ours too; that is inbound.trust_anchors)"));
                continue;
            }
            None => {
                if f.allowed_apps.is_none() {
                    c.fail(
                        "inbound.federation.allowed_apps",
                        format!("{name}: required: the apps this root vouches for"),
                    );
                }
                continue;
            }
        };
        out.push(Federated {
            name,
            roots: PathBuf::from(roots),
            apps,
        });
    }
    out
}

/// dstack-vpc's listener sections `[auth]` and `[client]`, and `[admin]`: where they listen.
fn listeners(
    raw: &RawConfig,
    env: &dyn Source,
    c: &mut Check,
) -> (ListenerConfig, ListenerConfig, ListenerConfig) {
    let first = |keys: &[&'static str]| source::first(env, keys);
    let auth_listener = c.listener(
        "auth",
        raw.auth.as_ref(),
        first(env::AUTH_LISTEN),
        DEFAULT_AUTH_LISTEN,
    );
    let client = c.listener(
        "client",
        raw.client.as_ref(),
        first(env::CLIENT_LISTEN),
        DEFAULT_CLIENT_LISTEN,
    );
    let admin = c.listener(
        "admin",
        raw.admin.as_ref(),
        first(env::ADMIN_LISTEN),
        DEFAULT_ADMIN_LISTEN,
    );
    if raw
        .client
        .as_ref()
        .and_then(|r| r.allowed_apps.as_ref())
        .is_some()
    {
        c.fail(
            "client.allowed_apps",
            "not a setting of the outbound proxy (see inbound.allowed_apps)",
        );
    }
    if raw
        .client
        .as_ref()
        .is_some_and(|r| r.trust_nginx_chain.is_some() || r.trust_loopback.is_some())
    {
        c.fail(
            "client.trust_nginx_chain",
            "trust_nginx_chain and trust_loopback are settings of [auth], not of [client]",
        );
    }
    (auth_listener, client, admin)
}

/// `[outbound]`: the outbound proxy's behaviour.
fn outbound(raw: &RawConfig, c: &mut Check) -> OutboundConfig {
    let ob = raw.outbound.clone().unwrap_or_default();
    let mut routes = StaticRoutes::default();
    for (app, addr) in ob.routes.iter().flatten() {
        let key = format!("outbound.routes.{app}");
        match (app.parse::<RouteKey>(), addr.parse::<HostPort>()) {
            (Ok(app), Ok(addr)) => routes.insert(app, addr),
            (Err(e), _) => c.fail(&key, e),
            (_, Err(e)) => c.fail(&key, e),
        }
    }
    let gateway_roots = ob.gateway_roots.as_ref().map(PathBuf::from);
    if let Some(path) = &gateway_roots {
        let parsed = std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|b| ratls::cert::parse_chain(&b).map_err(|e| e.to_string()));
        if let Err(e) = parsed {
            c.fail("outbound.gateway_roots", format!("{}: {e}", path.display()));
        }
    }
    let outbound = OutboundConfig {
        agent_passthrough: ob.agent_passthrough.unwrap_or(true),
        agent_key_methods: ob.agent_key_methods.unwrap_or(false),
        agent_quote_methods: ob.agent_quote_methods.unwrap_or(false),
        connect_timeout: c.duration(
            "outbound.connect_timeout",
            ob.connect_timeout.as_ref(),
            DEFAULT_CONNECT_TIMEOUT,
        ),
        handshake_timeout: c.duration(
            "outbound.handshake_timeout",
            ob.handshake_timeout.as_ref(),
            DEFAULT_HANDSHAKE_TIMEOUT,
        ),
        response_timeout: c.duration(
            "outbound.response_timeout",
            ob.response_timeout.as_ref(),
            DEFAULT_RESPONSE_TIMEOUT,
        ),
        pool_idle_timeout: c.duration(
            "outbound.pool_idle_timeout",
            ob.pool_idle_timeout.as_ref(),
            DEFAULT_POOL_IDLE_TIMEOUT,
        ),
        keepalive_interval: c.duration(
            "outbound.keepalive_interval",
            ob.keepalive_interval.as_ref(),
            DEFAULT_KEEPALIVE_INTERVAL,
        ),
        gateway_address: ob.gateway_address.as_deref().and_then(|a| {
            a.parse::<HostPort>()
                .map_err(|e| c.fail("outbound.gateway_address", e))
                .ok()
        }),
        gateway_roots,
        sys_config: ob.sys_config.map_or_else(
            || gateway_client::discovery::DEFAULT_SYS_CONFIG.into(),
            PathBuf::from,
        ),
        routes,
        idle_timeout: c.duration(
            "outbound.idle_timeout",
            ob.idle_timeout.as_ref(),
            DEFAULT_OUTBOUND_IDLE_TIMEOUT,
        ),
        header_timeout: c.duration(
            "outbound.header_timeout",
            ob.header_timeout.as_ref(),
            DEFAULT_HEADER_TIMEOUT,
        ),
        max_connections: ob.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
    };
    if !(1..=MAX_CONNECTIONS).contains(&outbound.max_connections) {
        c.fail(
            "outbound.max_connections",
            format!("{} is not 1-{MAX_CONNECTIONS}", outbound.max_connections),
        );
    }
    outbound
}

/// `[dstack] gateway_domain`, or `DSTACK_GATEWAY_DOMAIN`.
fn gateway(raw: &RawConfig, env: &dyn Source, c: &mut Check) -> Option<GatewaySetting> {
    let first = |keys: &[&'static str]| source::first(env, keys);
    let gateway_text = match first(env::GATEWAY_DOMAIN) {
        Some((var, v)) => Some((var.to_owned(), v)),
        None => raw
            .dstack
            .as_ref()
            .and_then(|d| d.gateway_domain.clone())
            .filter(|d| !d.trim().is_empty())
            .map(|d| ("dstack.gateway_domain".to_owned(), d)),
    };
    gateway_text.and_then(|(key, text)| {
        text.parse::<GatewaySetting>()
            .map_err(|e| c.fail(&key, e))
            .ok()
    })
}

/// `[tls]`: dstack-vpc's certificate files (for `nginx-config`).
fn tls_files(raw: &RawConfig) -> TlsFiles {
    let tls_raw = raw.tls.clone().unwrap_or_default();
    TlsFiles {
        cert_file: tls_raw
            .cert_file
            .unwrap_or(nginx_compat::render::DEFAULT_CERT_FILE.into())
            .into(),
        key_file: tls_raw
            .key_file
            .unwrap_or(nginx_compat::render::DEFAULT_KEY_FILE.into())
            .into(),
        ca_file: tls_raw
            .ca_file
            .unwrap_or(nginx_compat::render::DEFAULT_CA_FILE.into())
            .into(),
    }
}

/// `[auth]`: the auth service's allowlist, nginx trust and limits.
fn auth(raw: &RawConfig, env: &dyn Source, listener: ListenerConfig, c: &mut Check) -> AuthConfig {
    let first = |keys: &[&'static str]| source::first(env, keys);
    let auth_allow = raw
        .auth
        .as_ref()
        .and_then(|a| a.allowed_apps.as_ref())
        .and_then(|a| c.allow("auth.allowed_apps", a));
    let nginx_secret = first(env::NGINX_SECRET)
        .map(|(_, v)| v)
        .or_else(|| raw.auth.as_ref().and_then(|a| a.nginx_secret.clone()))
        .map(|v| v.trim().to_owned());
    if nginx_secret
        .as_deref()
        .is_some_and(|s| !nginx_compat::render::valid_secret(s))
    {
        c.fail(
            "auth.nginx_secret",
            format!(
                "at least {} letters, digits, '-' or '_' (e.g. `openssl rand -hex 32`)",
                nginx_compat::render::MIN_SECRET_LEN
            ),
        );
    }
    let nginx_secret = nginx_secret.map(Secret);
    let auth_raw = raw.auth.clone().unwrap_or_default();
    let auth_header_timeout = c.duration(
        "auth.header_timeout",
        auth_raw.header_timeout.as_ref(),
        DEFAULT_AUTH_HEADER_TIMEOUT,
    );
    let auth_max_connections = auth_raw
        .max_connections
        .unwrap_or(DEFAULT_AUTH_MAX_CONNECTIONS);
    if !(1..=MAX_CONNECTIONS).contains(&auth_max_connections) {
        c.fail(
            "auth.max_connections",
            format!("{auth_max_connections} is not 1-{MAX_CONNECTIONS}"),
        );
    }
    for (field, set) in [
        (
            "header_timeout",
            raw.client
                .as_ref()
                .is_some_and(|r| r.header_timeout.is_some()),
        ),
        (
            "max_connections",
            raw.client
                .as_ref()
                .is_some_and(|r| r.max_connections.is_some()),
        ),
    ] {
        if set {
            c.fail(
                &format!("client.{field}"),
                "set it in [outbound] (the outbound proxy's settings) or [auth]",
            );
        }
    }
    AuthConfig {
        listener,
        allow: auth_allow,
        trust_nginx_chain: raw
            .auth
            .as_ref()
            .and_then(|a| a.trust_nginx_chain)
            .unwrap_or(true),
        nginx_secret,
        trust_loopback: auth_raw.trust_loopback.unwrap_or(false),
        header_timeout: auth_header_timeout,
        max_connections: auth_max_connections,
    }
}

/// `[acme]`, `[dns]`, `[[domains]]` and dstack-ingress's variables, checked against the
/// inbound listener that serves them.
fn public(
    raw: &RawConfig,
    env: &dyn Source,
    inbound: &InboundConfig,
    c: &mut Check,
) -> PublicConfig {
    let mut public = domains::public(raw, env, c);
    // The gateway reaches this CVM on the inbound listener's port unless told otherwise.
    if public.dns.app_port.is_none() && inbound.listen.port() != 0 {
        public.dns.app_port = Some(inbound.listen.port());
    }
    if public.serves_domains() && !inbound.enabled {
        c.fail(
            "inbound.enabled",
            "public domains are served on the inbound listener: enable it",
        );
    }
    public
}

/// Tunnels dial through the outbound proxy's gateway and routes, and the registration goes out
/// the same way; the registry is served on the inbound listener.
fn needs_listeners(
    tunnels: &[TunnelConfig],
    registry: &RegistryConfig,
    inbound: &InboundConfig,
    client: &ListenerConfig,
    c: &mut Check,
) {
    if !tunnels.is_empty() && !client.enabled {
        c.fail(
            "client.enabled",
            "[[tunnels]] dial through the outbound proxy's gateway and routes: enable it",
        );
    }
    if registry.register.is_some() && !client.enabled {
        c.fail(
            "client.enabled",
            "registry.node_type registers through the outbound proxy: enable it",
        );
    }
    if registry.enabled && !inbound.enabled {
        c.fail(
            "inbound.enabled",
            "the registry is served on the inbound listener: enable it",
        );
    }
}

/// No two enabled listeners on one address (port 0 asks the OS, so never collides).
fn no_collisions(listeners: &[(String, bool, SocketAddr)], c: &mut Check) {
    let mut bound: Vec<(&str, SocketAddr)> = Vec::new();
    for (key, enabled, addr) in listeners {
        let (key, enabled, addr) = (key.as_str(), *enabled, *addr);
        if !enabled || addr.port() == 0 {
            continue;
        }
        if let Some((other, _)) = bound.iter().find(|(_, a)| {
            a.port() == addr.port()
                && (a.ip() == addr.ip() || a.ip().is_unspecified() || addr.ip().is_unspecified())
        }) {
            c.fail(key, format!("{addr} collides with {other}"));
        }
        bound.push((key, addr));
    }
}
pub mod attestation;
pub mod dns;
pub mod domains;
pub mod sources;
pub mod store;
#[cfg(test)]
mod tests;
pub mod tunnels;
pub use dns::{DnsConfig, ProviderConfig};
pub use domains::{
    AcmeConfig, Challenge, DomainConfig, Eab, Issuer, KeySource, Mode, PublicConfig,
};
pub use tunnels::{Registration, RegistryApp, RegistryConfig, TcpServiceConfig, TunnelConfig};
