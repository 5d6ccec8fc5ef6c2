//! TCP between CVMs and discovery: `[[inbound.tcp]]` (attested TCP services), `[[tunnels]]`
//! (local ports dialled to a target app's service) and `[registry]` (dstack-vpc's
//! `/api/nodes/update` and `/api/discover` over the mesh, and this sidecar's own registration).

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use ratls::AppId;
use serde::Deserialize;

use super::{
    raw::{AllowValue, DurationValue},
    secs,
    source::{self, Source},
    Allow, Check, HostPort, ProxyProtocol, MAX_CONNECTIONS,
};

/// Environment variables (dstack-vpc's names where it had the setting).
pub mod env {
    /// Run the registry role (`true`).
    pub const REGISTRY: &[&str] = &["DSTACK_MESH_REGISTRY", "VPC_SERVER_ENABLED"];
    /// The registry's app id (`self`: this app).
    pub const REGISTRY_APP: &[&str] = &["DSTACK_MESH_REGISTRY_APP", "VPC_SERVER_APP_ID"];
    /// The node type this sidecar registers as.
    pub const NODE_TYPE: &[&str] = &["DSTACK_MESH_NODE_TYPE", "VPC_NODE_TYPE"];
    /// The name this sidecar registers under.
    pub const NODE_NAME: &[&str] = &["DSTACK_MESH_NODE_NAME", "VPC_NODE_NAME"];
}

/// Default: a tunnel's idle limit (databases hold quiet connections: an hour).
pub const DEFAULT_TUNNEL_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default: connections one TCP service or tunnel carries at once.
pub const DEFAULT_TUNNEL_MAX_CONNECTIONS: usize = 4096;
/// Default: a registration lasts this long without a heartbeat.
pub const DEFAULT_REGISTRY_TTL: Duration = Duration::from_secs(60);
/// Default: where the registry keeps its entries across restarts (without an etcd store).
pub const DEFAULT_REGISTRY_STATE: &str = "/var/lib/dstack-mesh/registry.json";
/// The name CONNECT tunnels go by in metrics and logs (no `[[tunnels]]` entry may take it).
pub const CONNECT_NAME: &str = "connect";
/// Shortest registration lifetime: entries are stamped in whole seconds.
pub const MIN_REGISTRY_TTL: Duration = Duration::from_secs(1);
/// Longest node type or label text accepted.
pub const MAX_REGISTRY_TEXT: usize = 253;

/// One `[[inbound.tcp]]` entry as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTcpService {
    pub name: Option<String>,
    pub listen: Option<String>,
    pub backend: Option<String>,
    pub allowed_apps: Option<AllowValue>,
    pub require_attestation: Option<bool>,
    pub handshake_timeout: Option<DurationValue>,
    pub connect_timeout: Option<DurationValue>,
    pub idle_timeout: Option<DurationValue>,
    pub max_connections: Option<usize>,
    pub proxy_protocol: Option<String>,
}

/// One `[[tunnels]]` entry as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTunnel {
    pub name: Option<String>,
    pub listen: Option<String>,
    pub target_app: Option<String>,
    pub target_port: Option<u16>,
    pub target_instance: Option<String>,
    pub idle_timeout: Option<DurationValue>,
    pub max_connections: Option<usize>,
}

/// `[registry]` as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRegistry {
    pub enabled: Option<bool>,
    pub allowed_apps: Option<AllowValue>,
    pub ttl: Option<DurationValue>,
    pub state_file: Option<String>,
    pub server_app: Option<String>,
    pub server_port: Option<u16>,
    pub node_type: Option<String>,
    pub node_name: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
    pub interval: Option<DurationValue>,
}

/// An attested TCP service: callers verified like mesh callers, then spliced to `backend`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TcpServiceConfig {
    /// Its name (logs, metrics, the bound address `tcp:<name>`).
    pub name: String,
    /// Where it listens (the port the app lists for the gateway).
    pub listen: SocketAddr,
    /// The local service.
    pub backend: HostPort,
    /// Who may connect.
    pub allow: Allow,
    /// Refuse callers without an attestation bound to their key.
    pub require_attestation: bool,
    /// PROXY header + handshake deadline.
    #[serde(with = "secs")]
    pub handshake_timeout: Duration,
    /// Backend connect deadline.
    #[serde(with = "secs")]
    pub connect_timeout: Duration,
    /// A tunnel with no byte either way for this long is closed.
    #[serde(with = "secs")]
    pub idle_timeout: Duration,
    /// Connections at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// The PROXY header the gateway may write first.
    pub proxy_protocol: ProxyProtocol,
}

/// A local port whose connections are carried to a target app's TCP service.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TunnelConfig {
    /// Its name (logs, metrics, the bound address `tunnel:<name>`).
    pub name: String,
    /// The local address the app connects to.
    pub listen: SocketAddr,
    /// The app whose service is reached.
    pub target_app: AppId,
    /// Its service's port.
    pub target_port: u16,
    /// One instance of it, when named.
    pub target_instance: Option<AppId>,
    /// A tunnel with no byte either way for this long is closed.
    #[serde(with = "secs")]
    pub idle_timeout: Duration,
    /// Connections at once.
    pub max_connections: usize,
}

/// `[registry]`: the registry role and this sidecar's own registration.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RegistryConfig {
    /// Serve `/api/nodes/update` and `/api/discover/<type>` on the mesh listener.
    pub enabled: bool,
    /// Apps that may register and discover (default: this app's instances).
    pub allow: Allow,
    /// A registration ends this long after its last heartbeat.
    #[serde(with = "secs")]
    pub ttl: Duration,
    /// Where entries survive a restart (without an etcd store).
    pub state_file: PathBuf,
    /// Register this sidecar, when set.
    pub register: Option<Registration>,
}

/// Which registry `self` means.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RegistryApp {
    /// This app (a registry runs beside one of its instances).
    OwnApp,
    /// Another app.
    App(AppId),
}

/// This sidecar's registration.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Registration {
    /// The registry's app.
    pub server_app: RegistryApp,
    /// Its mesh port.
    pub server_port: u16,
    /// What this node is (`mongodb`, `etcd`, ...).
    pub node_type: String,
    /// Its name (dstack-vpc's `VPC_NODE_NAME`; default: the instance id).
    pub node_name: Option<String>,
    /// Free-form labels.
    pub labels: BTreeMap<String, String>,
    /// Heartbeat period.
    #[serde(with = "secs")]
    pub interval: Duration,
}

/// A name for logs and metrics: letters, digits, `-`, `_`, `.`.
fn name(c: &mut Check, key: &str, given: Option<&str>, index: usize) -> String {
    match given {
        None => index.to_string(),
        Some(n) if valid_text(n) => n.to_owned(),
        Some(n) => {
            c.fail(
                key,
                format!("{n:?}: 1-{MAX_REGISTRY_TEXT} letters, digits, '-', '_' or '.'"),
            );
            index.to_string()
        }
    }
}

/// A name, node type or label: short, and nothing a log line or a metric label would mangle.
pub fn valid_text(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_REGISTRY_TEXT
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn connections(c: &mut Check, key: &str, value: Option<usize>) -> usize {
    let n = value.unwrap_or(DEFAULT_TUNNEL_MAX_CONNECTIONS);
    if !(1..=MAX_CONNECTIONS).contains(&n) {
        c.fail(key, format!("{n} is not 1-{MAX_CONNECTIONS}"));
    }
    n
}

/// Stands in for an id that failed to parse (the configuration is refused anyway).
fn placeholder_id() -> AppId {
    AppId::from_bytes(&[0; gateway_client::target::ID_LEN])
        .unwrap_or_else(|_| unreachable!("20 bytes is an app id"))
}

fn app_id(c: &mut Check, key: &str, text: &str) -> Option<AppId> {
    match text.trim().parse::<AppId>() {
        Ok(id) if id.as_bytes().len() == gateway_client::target::ID_LEN => Some(id),
        _ => {
            c.fail(key, format!("{text:?} is not a 40-hex-digit id"));
            None
        }
    }
}

/// `[[inbound.tcp]]`, checked; the inbound listener's settings are their defaults.
pub(super) fn tcp_services(
    raw: &[RawTcpService],
    inbound: &super::InboundConfig,
    c: &mut Check,
) -> Vec<TcpServiceConfig> {
    let mut services = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        let key = |field: &str| format!("inbound.tcp[{i}].{field}");
        let name = name(c, &key("name"), r.name.as_deref(), i);
        let listen = match &r.listen {
            Some(l) => c.socket(&key("listen"), l),
            None => {
                c.fail(&key("listen"), "required (e.g. \"0.0.0.0:6379\")");
                None
            }
        };
        let backend = match r.backend.as_deref().map(str::parse::<HostPort>) {
            Some(Ok(b)) => Some(b),
            Some(Err(e)) => {
                c.fail(&key("backend"), e);
                None
            }
            None => {
                c.fail(&key("backend"), "required (host:port of the local service)");
                None
            }
        };
        let allow = match &r.allowed_apps {
            Some(a) => c.allow(&key("allowed_apps"), a),
            None => {
                c.fail(
                    &key("allowed_apps"),
                    "required: the app ids that may connect, or \"any\"",
                );
                None
            }
        };
        let proxy_protocol = match &r.proxy_protocol {
            Some(v) => v
                .parse()
                .map_err(|e| c.fail(&key("proxy_protocol"), e))
                .unwrap_or_default(),
            None => inbound.proxy_protocol,
        };
        let service = TcpServiceConfig {
            handshake_timeout: c.duration(
                &key("handshake_timeout"),
                r.handshake_timeout.as_ref(),
                inbound.handshake_timeout,
            ),
            connect_timeout: c.duration(
                &key("connect_timeout"),
                r.connect_timeout.as_ref(),
                inbound.backend_connect_timeout,
            ),
            idle_timeout: c.duration(
                &key("idle_timeout"),
                r.idle_timeout.as_ref(),
                DEFAULT_TUNNEL_IDLE_TIMEOUT,
            ),
            max_connections: connections(c, &key("max_connections"), r.max_connections),
            require_attestation: r.require_attestation.unwrap_or(inbound.require_attestation),
            proxy_protocol,
            name,
            listen: listen.unwrap_or(inbound.listen),
            backend: backend.unwrap_or_else(|| inbound.backend.clone()),
            allow: allow.unwrap_or(Allow::OwnApp),
        };
        if services
            .iter()
            .any(|s: &TcpServiceConfig| s.name == service.name)
        {
            c.fail(&key("name"), format!("{:?} is used twice", service.name));
        }
        services.push(service);
    }
    services
}

/// `[[tunnels]]`, checked.
pub(super) fn tunnels(raw: &[RawTunnel], c: &mut Check) -> Vec<TunnelConfig> {
    let mut tunnels = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        let key = |field: &str| format!("tunnels[{i}].{field}");
        let name = name(c, &key("name"), r.name.as_deref(), i);
        let listen = match &r.listen {
            Some(l) => c.socket(&key("listen"), l),
            None => {
                c.fail(&key("listen"), "required (e.g. \"127.0.0.1:6379\")");
                None
            }
        };
        if let Some(addr) = listen.filter(|a| !a.ip().is_loopback()) {
            tracing::warn!(tunnel = %name, %addr, "a tunnel listens beyond loopback: anything that reaches it reaches the target as this app");
        }
        let target_app = match &r.target_app {
            Some(t) => app_id(c, &key("target_app"), t),
            None => {
                c.fail(&key("target_app"), "required: the target's app id");
                None
            }
        };
        let target_port = match r.target_port {
            Some(p) if p > 0 => p,
            _ => {
                c.fail(
                    &key("target_port"),
                    "required: the target service's port (1-65535)",
                );
                1
            }
        };
        let target_instance = r
            .target_instance
            .as_deref()
            .and_then(|t| app_id(c, &key("target_instance"), t));
        let tunnel = TunnelConfig {
            idle_timeout: c.duration(
                &key("idle_timeout"),
                r.idle_timeout.as_ref(),
                DEFAULT_TUNNEL_IDLE_TIMEOUT,
            ),
            max_connections: connections(c, &key("max_connections"), r.max_connections),
            name,
            listen: listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
            target_app: target_app.unwrap_or_else(placeholder_id),
            target_port,
            target_instance,
        };
        if tunnels.iter().any(|t: &TunnelConfig| t.name == tunnel.name) {
            c.fail(&key("name"), format!("{:?} is used twice", tunnel.name));
        }
        if tunnel.name == CONNECT_NAME {
            c.fail(
                &key("name"),
                format!("{CONNECT_NAME:?} names the outbound proxy's CONNECT tunnels in metrics"),
            );
        }
        tunnels.push(tunnel);
    }
    tunnels
}

/// `[registry]` and dstack-vpc's variables, checked.
pub(super) fn registry(
    raw: Option<&RawRegistry>,
    env: &dyn Source,
    c: &mut Check,
) -> RegistryConfig {
    let r = raw.cloned().unwrap_or_default();
    let first = |keys: &[&'static str]| source::first(env, keys);
    let enabled = match first(env::REGISTRY) {
        Some((var, v)) => match v.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => true,
            "false" | "0" | "no" | "off" | "" => false,
            other => {
                c.fail(var, format!("{other:?}: true or false"));
                false
            }
        },
        None => r.enabled.unwrap_or(false),
    };
    let node_type = first(env::NODE_TYPE)
        .map(|(var, v)| (var.to_owned(), v))
        .or_else(|| {
            r.node_type
                .clone()
                .map(|v| ("registry.node_type".into(), v))
        });
    let node_type = node_type.and_then(|(key, v)| {
        let v = v.trim().to_owned();
        match valid_text(&v) {
            true => Some(v),
            false => {
                c.fail(
                    &key,
                    format!("{v:?}: 1-{MAX_REGISTRY_TEXT} letters, digits, '-', '_' or '.'"),
                );
                None
            }
        }
    });
    let server_app = match first(env::REGISTRY_APP)
        .map(|(var, v)| (var.to_owned(), v))
        .or_else(|| {
            r.server_app
                .clone()
                .map(|v| ("registry.server_app".into(), v))
        }) {
        None => RegistryApp::OwnApp,
        Some((_, v)) if v.trim().is_empty() || v.trim() == "self" => RegistryApp::OwnApp,
        Some((key, v)) => app_id(c, &key, &v).map_or(RegistryApp::OwnApp, RegistryApp::App),
    };
    let node_name = first(env::NODE_NAME)
        .map(|(var, v)| (var.to_owned(), v))
        .or_else(|| {
            r.node_name
                .clone()
                .map(|v| ("registry.node_name".into(), v))
        })
        .and_then(|(key, v)| match valid_text(v.trim()) {
            true => Some(v.trim().to_owned()),
            false => {
                c.fail(&key, format!("{v:?}: letters, digits, '-', '_' or '.'"));
                None
            }
        });
    let labels = r.labels.clone().unwrap_or_default();
    for (k, v) in &labels {
        if !valid_text(k) || v.len() > MAX_REGISTRY_TEXT || v.chars().any(char::is_control) {
            c.fail(
                &format!("registry.labels.{k}"),
                "a label is a short name (letters, digits, '-', '_', '.') and a short value",
            );
        }
    }
    let ttl = c.duration("registry.ttl", r.ttl.as_ref(), DEFAULT_REGISTRY_TTL);
    if ttl < MIN_REGISTRY_TTL {
        c.fail("registry.ttl", format!("{ttl:?} is shorter than a second"));
    }
    if r.server_port == Some(0) {
        c.fail("registry.server_port", "0 is not a port (1-65535)");
    }
    let interval = c.duration("registry.interval", r.interval.as_ref(), ttl / 3);
    if interval >= ttl {
        c.fail(
            "registry.interval",
            format!("{interval:?} must be shorter than registry.ttl ({ttl:?}), or entries expire between heartbeats"),
        );
    }
    let register = node_type.map(|node_type| Registration {
        server_app,
        server_port: r
            .server_port
            .unwrap_or(gateway_client::target::DEFAULT_PORT),
        node_type,
        node_name,
        labels,
        interval,
    });
    RegistryConfig {
        enabled,
        allow: r
            .allowed_apps
            .as_ref()
            .and_then(|a| c.allow("registry.allowed_apps", a))
            .unwrap_or(Allow::OwnApp),
        ttl,
        state_file: r
            .state_file
            .map_or_else(|| DEFAULT_REGISTRY_STATE.into(), PathBuf::from),
        register,
    }
}
