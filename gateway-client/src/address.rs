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
    /// The gateway's base domain; its port comes from discovery or [`DEFAULT_GATEWAY_PORT`].
    Domain(String),
}

impl fmt::Display for GatewaySetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fixed(addr) => write!(f, "fixed/{addr}"),
            Self::Domain(d) => f.write_str(d),
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
        let valid = !s.is_empty()
            && s.len() <= 253
            && s.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if valid {
            Ok(Self::Domain(s.to_ascii_lowercase()))
        } else {
            Err(format!(
                "{s:?} is neither a domain name (the gateway's base domain) nor fixed/host:port"
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
    /// Direct networks: a table of app id → address.
    Static(BTreeMap<AppId, HostPort>),
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
            GatewaySetting::Domain(base) => Self::Gateway {
                base_domain: base.clone(),
                port: discovered_port.unwrap_or(DEFAULT_GATEWAY_PORT),
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
            Self::Static(table) => {
                let addr = table
                    .get(&target.app_id)
                    .ok_or_else(|| AddressError::UnknownApp(target.app_id.clone()))?;
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
mod tests {
    use super::*;

    const APP: &str = "5bb4ff9a3837357f19dc176407a5709c62eb6c56";
    const INSTANCE: &str = "1691ed1b47506cad7d08834668691d88246f5b1f";

    fn target(transport: Transport, instance: bool) -> Target {
        Target {
            app_id: APP.parse().unwrap(),
            port: 8080,
            instance: instance.then(|| INSTANCE.parse().unwrap()),
            transport,
        }
    }

    #[test]
    fn gateway_names() {
        let a = Addressing::from_setting(&"gw.example.com".parse().unwrap(), Some(9443));
        let r = a.route(&target(Transport::Mesh, false)).unwrap();
        assert_eq!(r.server_name, format!("{APP}-8080s.gw.example.com"));
        assert_eq!(
            r.connect.to_string(),
            format!("{APP}-8080s.gw.example.com:9443")
        );
        let r = a.route(&target(Transport::Mesh, true)).unwrap();
        assert_eq!(r.server_name, format!("{INSTANCE}-8080s.gw.example.com"));
        let r = a.route(&target(Transport::GatewayTls, false)).unwrap();
        assert_eq!(r.server_name, format!("{APP}-8080.gw.example.com"));
        // A configured dial address keeps the gateway's name as SNI.
        let a = Addressing::Gateway {
            base_domain: "gw.example.com".into(),
            port: 443,
            dial: Some("127.0.0.1:8443".parse().unwrap()),
        };
        let r = a.route(&target(Transport::Mesh, false)).unwrap();
        assert_eq!(r.connect.to_string(), "127.0.0.1:8443");
        assert_eq!(r.server_name, format!("{APP}-8080s.gw.example.com"));
    }

    #[test]
    fn fixed_and_static() {
        let fixed: GatewaySetting = "fixed/127.0.0.1:443".parse().unwrap();
        let a = Addressing::from_setting(&fixed, None);
        let r = a.route(&target(Transport::Mesh, false)).unwrap();
        assert_eq!(
            (r.connect.to_string(), r.server_name),
            ("127.0.0.1:443".into(), "127.0.0.1".into())
        );
        assert!(a.route(&target(Transport::GatewayTls, false)).is_err());
        let table = BTreeMap::from([(APP.parse().unwrap(), "10.0.0.5:443".parse().unwrap())]);
        let a = Addressing::Static(table);
        assert_eq!(
            a.route(&target(Transport::Mesh, false))
                .unwrap()
                .connect
                .to_string(),
            "10.0.0.5:443"
        );
        let mut other = target(Transport::Mesh, false);
        other.app_id = "aa".repeat(20).parse().unwrap();
        assert!(matches!(a.route(&other), Err(AddressError::UnknownApp(_))));
    }

    #[test]
    fn gateway_settings_parse() {
        assert_eq!(
            "fixed/127.0.0.1:443/".parse::<GatewaySetting>().unwrap(),
            GatewaySetting::Fixed("127.0.0.1:443".parse().unwrap())
        );
        assert_eq!(
            "GW.Example.com".parse::<GatewaySetting>().unwrap(),
            GatewaySetting::Domain("gw.example.com".into())
        );
        for bad in ["", "fixed/nohost", "a..b", "has space.com", "fixed/h:0"] {
            assert!(bad.parse::<GatewaySetting>().is_err(), "{bad}");
        }
    }
}
