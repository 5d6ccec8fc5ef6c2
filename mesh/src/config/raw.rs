//! The configuration file as written: every field optional, unknown keys refused (a typo must
//! not silently fall back to a default). dstack-vpc's `dstack-mesh.toml` (`[client]`, `[auth]`,
//! `[dstack]`, `[tls]`) is a valid file.

use serde::Deserialize;

/// One TOML value that may be a number of seconds or a string such as `"10s"`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum DurationValue {
    /// Seconds.
    Seconds(u64),
    /// `"500ms"`, `"10s"`, `"5m"`, `"24h"`, `"7d"`.
    Text(String),
}

/// The allowlist: `"any"`, a comma-separated string, or an array of hex app ids.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum AllowValue {
    /// `"any"` or `"id1,id2"`.
    Text(String),
    /// `["id1", "id2"]`.
    List(Vec<String>),
}

/// dstack-vpc's listener sections: `address` and `port` apart, plus `enabled`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub enabled: Option<bool>,
    pub address: Option<String>,
    pub port: Option<u16>,
    /// Ours: `host:port` in one value (overrides address/port).
    pub listen: Option<String>,
    /// Auth only: an allowlist of its own (default: the inbound one).
    pub allowed_apps: Option<AllowValue>,
    /// Auth only: accept nginx's verdict on the chain of a lone leaf.
    pub trust_nginx_chain: Option<bool>,
    /// Auth only: the secret our nginx sends with each auth subrequest.
    pub nginx_secret: Option<String>,
    /// Auth only: without a secret, take nginx's word from loopback callers.
    pub trust_loopback: Option<bool>,
    /// Auth only: the request-head deadline.
    pub header_timeout: Option<DurationValue>,
    /// Auth only: connections at once.
    pub max_connections: Option<usize>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDstack {
    pub gateway_domain: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    pub ca_file: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgent {
    pub address: Option<String>,
    pub timeout: Option<DurationValue>,
    pub start_timeout: Option<DurationValue>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIdentity {
    pub subject: Option<String>,
    pub alt_names: Option<Vec<String>>,
    pub validity: Option<DurationValue>,
    pub refresh_margin: Option<DurationValue>,
    pub ra_tls: Option<bool>,
}

/// `[[inbound.federation]]`: another cluster's KMS roots and the apps they vouch for.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFederation {
    pub name: Option<String>,
    pub roots: Option<String>,
    pub allowed_apps: Option<AllowValue>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInbound {
    pub enabled: Option<bool>,
    pub listen: Option<String>,
    pub backend: Option<String>,
    pub allowed_apps: Option<AllowValue>,
    pub require_attestation: Option<bool>,
    pub trust_anchors: Option<Vec<String>>,
    pub federation: Option<Vec<RawFederation>>,
    pub handshake_timeout: Option<DurationValue>,
    pub header_timeout: Option<DurationValue>,
    pub idle_timeout: Option<DurationValue>,
    pub backend_connect_timeout: Option<DurationValue>,
    pub backend_timeout: Option<DurationValue>,
    pub max_connections: Option<usize>,
    pub max_header_bytes: Option<usize>,
    pub proxy_protocol: Option<String>,
    pub tcp: Option<Vec<super::tunnels::RawTcpService>>,
}

/// The whole file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutbound {
    pub agent_passthrough: Option<bool>,
    pub agent_key_methods: Option<bool>,
    pub agent_quote_methods: Option<bool>,
    pub connect_timeout: Option<DurationValue>,
    pub handshake_timeout: Option<DurationValue>,
    pub response_timeout: Option<DurationValue>,
    pub pool_idle_timeout: Option<DurationValue>,
    pub keepalive_interval: Option<DurationValue>,
    pub gateway_address: Option<String>,
    pub gateway_roots: Option<String>,
    pub sys_config: Option<String>,
    pub routes: Option<std::collections::BTreeMap<String, String>>,
    pub idle_timeout: Option<DurationValue>,
    pub header_timeout: Option<DurationValue>,
    pub max_connections: Option<usize>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLifecycle {
    pub drain_timeout: Option<DurationValue>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub outbound: Option<RawOutbound>,
    pub client: Option<RawListener>,
    pub auth: Option<RawListener>,
    pub dstack: Option<RawDstack>,
    pub tls: Option<RawTls>,
    pub agent: Option<RawAgent>,
    pub identity: Option<RawIdentity>,
    pub inbound: Option<RawInbound>,
    pub acme: Option<super::domains::RawAcme>,
    pub dns: Option<super::dns::RawDns>,
    pub lifecycle: Option<RawLifecycle>,
    pub admin: Option<RawListener>,
    pub domains: Option<Vec<super::domains::RawDomain>>,
    pub domain_sources: Option<Vec<super::sources::RawSource>>,
    pub on_demand: Option<super::sources::RawOnDemand>,
    pub domain_health: Option<super::sources::RawHealth>,
    pub store: Option<super::store::RawStore>,
    pub tunnels: Option<Vec<super::tunnels::RawTunnel>>,
    pub registry: Option<super::tunnels::RawRegistry>,
    pub attestation: Option<super::attestation::RawAttestation>,
}
