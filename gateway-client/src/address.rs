//! From a target to an address and a TLS server name.

use std::{collections::BTreeMap, fmt, str::FromStr};

use ratls::AppId;

use crate::target::{Target, Transport};

/// A `host:port` to connect to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostPort {
    /// Host name or IP literal (IPv6 without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl serde::Serialize for HostPort {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl FromStr for HostPort {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let s = s.strip_prefix("http://").unwrap_or(s).trim_end_matches('/');
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?} is not host:port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let valid_host = if host.contains(':') {
            host.parse::<std::net::Ipv6Addr>().is_ok()
        } else {
            !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        };
        if !valid_host {
            return Err(format!("{s:?}: bad host"));
        }
        match port.parse::<u16>() {
            Ok(port) if port > 0 => Ok(Self {
                host: host.to_owned(),
                port,
            }),
            _ => Err(format!("{s:?}: port must be 1-65535")),
        }
    }
}

impl HostPort {
    /// The name TLS uses for this address: the host (an IP literal sends no SNI).
    pub fn server_name(&self) -> String {
        self.host.clone()
    }
}

/// What `[dstack] gateway_domain` (or `DSTACK_GATEWAY_DOMAIN`) says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GatewaySetting {
    /// `fixed/host:port`: every target at one address (tests, a single host).
    Fixed(HostPort),
    /// The gateway's base domain, and its external port when the setting names one
    /// (dstack-vpc writes `base_domain:external_port`); otherwise the port comes from
    /// discovery or [`DEFAULT_GATEWAY_PORT`].
    Domain {
        /// The base domain (lowercase).
        base: String,
        /// The external port, if named.
        port: Option<u16>,
    },
}

impl fmt::Display for GatewaySetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fixed(addr) => write!(f, "fixed/{addr}"),
            Self::Domain { base, port: None } => f.write_str(base),
            Self::Domain {
                base,
                port: Some(port),
            } => write!(f, "{base}:{port}"),
        }
    }
}

impl serde::Serialize for GatewaySetting {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The gateway's external port when discovery has not said otherwise.
pub const DEFAULT_GATEWAY_PORT: u16 = 443;

impl FromStr for GatewaySetting {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().trim_end_matches('/');
        if let Some(addr) = s.strip_prefix("fixed/") {
            return addr.parse().map(Self::Fixed);
        }
        let (name, port) = match s.rsplit_once(':') {
            Some((name, port)) => match port.parse::<u16>() {
                Ok(port) if port != 0 => (name, Some(port)),
                _ => return Err(format!("{s:?}: the gateway port must be 1-65535")),
            },
            None => (s, None),
        };
        let valid = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if valid {
            Ok(Self::Domain {
                base: name.to_ascii_lowercase(),
                port,
            })
        } else {
            Err(format!(
                "{s:?} is neither a domain name (the gateway's base domain, optionally with \
                 :port) nor fixed/host:port"
            ))
        }
    }
}

/// How targets are reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Addressing {
    /// Through the dstack gateway, which passes TLS through to the target CVM by SNI.
    Gateway {
        /// The gateway's base domain.
        base_domain: String,
        /// The gateway's external port.
        port: u16,
        /// Where to dial; `None` dials the SNI name itself (the gateway's wildcard record).
        dial: Option<HostPort>,
    },
    /// Every target at one address.
    Fixed(HostPort),
    /// Direct networks: the targets the table names at their addresses, the rest through
    /// `otherwise` (the gateway, when there is one).
    Static {
        /// The table.
        routes: StaticRoutes,
        /// Where targets the table does not name go; `None`: nowhere.
        otherwise: Option<Box<Addressing>>,
    },
}

/// A key of the static table: an app on one port, or an app on every port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteKey {
    /// Every port of the app.
    App(AppId),
    /// One port of the app (preferred over [`RouteKey::App`]).
    AppPort(AppId, u16),
}

impl FromStr for RouteKey {
    type Err = String;

    /// `<app id>` or `<app id>:<port>`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (app, port) = match s.rsplit_once(':') {
            Some((app, port)) => (app, Some(port)),
            None => (s, None),
        };
        let app = app
            .parse::<AppId>()
            .map_err(|e| format!("{s:?}: not an app id: {e}"))?;
        match port.map(str::parse::<u16>) {
            None => Ok(Self::App(app)),
            Some(Ok(port)) if port > 0 => Ok(Self::AppPort(app, port)),
            Some(_) => Err(format!("{s:?}: the port after ':' must be 1-65535")),
        }
    }
}

impl fmt::Display for RouteKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::App(app) => write!(f, "{app}"),
            Self::AppPort(app, port) => write!(f, "{app}:{port}"),
        }
    }
}

/// Direct addresses by app and port, or by app alone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StaticRoutes(BTreeMap<RouteKey, HostPort>);

impl StaticRoutes {
    /// Route `key` to `addr`.
    pub fn insert(&mut self, key: RouteKey, addr: HostPort) {
        self.0.insert(key, addr);
    }

    /// The address for `app` on `port`: the entry for that port, else the app's.
    pub fn get(&self, app: &AppId, port: u16) -> Option<&HostPort> {
        self.0
            .get(&RouteKey::AppPort(app.clone(), port))
            .or_else(|| self.0.get(&RouteKey::App(app.clone())))
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every entry.
    pub fn iter(&self) -> impl Iterator<Item = (&RouteKey, &HostPort)> {
        self.0.iter()
    }
}

impl FromIterator<(RouteKey, HostPort)> for StaticRoutes {
    fn from_iter<I: IntoIterator<Item = (RouteKey, HostPort)>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

/// Where to connect for a target, and the TLS server name to send.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Route {
    /// The address dialled (a name is resolved at connect time).
    pub connect: HostPort,
    /// The TLS server name (SNI); the gateway routes by it.
    pub server_name: String,
}

/// A target that has no address.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AddressError {
    /// A static table without the app.
    #[error("no address is configured for app {0}")]
    UnknownApp(AppId),
    /// The gateway's own TLS needs the gateway.
    #[error("x-dstack-target-use-tls: false needs the dstack gateway, not {0} addressing")]
    NoGatewayTls(&'static str),
}

impl Addressing {
    /// Addressing from the gateway setting, with the port discovery found (if any).
    pub fn from_setting(setting: &GatewaySetting, discovered_port: Option<u16>) -> Self {
        match setting {
            GatewaySetting::Fixed(addr) => Self::Fixed(addr.clone()),
            GatewaySetting::Domain { base, port } => Self::Gateway {
                base_domain: base.clone(),
                port: port.or(discovered_port).unwrap_or(DEFAULT_GATEWAY_PORT),
                dial: None,
            },
        }
    }

    /// Where `target` is.
    pub fn route(&self, target: &Target) -> Result<Route, AddressError> {
        match self {
            Self::Gateway {
                base_domain,
                port,
                dial,
            } => {
                // `s` asks the gateway to pass TLS through to the target; without it the
                // gateway terminates TLS itself.
                let suffix = match target.transport {
                    Transport::Mesh => "s",
                    Transport::GatewayTls => "",
                };
                let server_name = format!(
                    "{}-{}{suffix}.{base_domain}",
                    target.gateway_id(),
                    target.port
                );
                let connect = dial.clone().unwrap_or(HostPort {
                    host: server_name.clone(),
                    port: *port,
                });
                Ok(Route {
                    connect,
                    server_name,
                })
            }
            Self::Fixed(addr) => match target.transport {
                Transport::Mesh => Ok(Route {
                    connect: addr.clone(),
                    server_name: addr.server_name(),
                }),
                Transport::GatewayTls => Err(AddressError::NoGatewayTls("fixed")),
            },
            Self::Static { routes, otherwise } => {
                let Some(addr) = routes.get(&target.app_id, target.port) else {
                    return match otherwise {
                        Some(otherwise) => otherwise.route(target),
                        None => Err(AddressError::UnknownApp(target.app_id.clone())),
                    };
                };
                match target.transport {
                    Transport::Mesh => Ok(Route {
                        connect: addr.clone(),
                        server_name: addr.server_name(),
                    }),
                    Transport::GatewayTls => Err(AddressError::NoGatewayTls("static")),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
