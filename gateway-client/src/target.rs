//! The target an app asks for, read from its request headers.

use http::{HeaderMap, HeaderName, HeaderValue};
use ratls::AppId;

/// The app to reach (hex app id). Without it the request is not for the mesh.
pub const TARGET_APP: &str = "x-dstack-target-app";
/// The port on the target CVM (default [`DEFAULT_PORT`]).
pub const TARGET_PORT: &str = "x-dstack-target-port";
/// A specific instance of the app (hex instance id).
pub const TARGET_INSTANCE: &str = "x-dstack-target-instance";
/// `false` to use the gateway's own TLS instead of mutual RA-TLS to the target.
pub const TARGET_USE_TLS: &str = "x-dstack-target-use-tls";
/// Every routing header, removed before a request is forwarded.
pub const ROUTING_HEADERS: [&str; 4] = [TARGET_APP, TARGET_PORT, TARGET_INSTANCE, TARGET_USE_TLS];
/// Port when none is named: the target's inbound listener.
pub const DEFAULT_PORT: u16 = 443;
/// Length of a dstack app or instance id in bytes (40 hex digits). Routing headers take only
/// ids of this length: anything else cannot name a dstack app and is refused before dialling.
pub const ID_LEN: usize = 20;

/// How the connection to the target is secured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// Mutual RA-TLS with the target's sidecar, its app id verified in the handshake.
    Mesh,
    /// The gateway's own TLS (ordinary WebPKI); the target is not authenticated.
    GatewayTls,
}

/// A peer an app wants to reach.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    /// The app.
    pub app_id: AppId,
    /// The port on the target.
    pub port: u16,
    /// A specific instance, when named.
    pub instance: Option<AppId>,
    /// How the connection is secured.
    pub transport: Transport,
}

impl std::fmt::Display for Target {
    /// `app:port`, with `@instance` when one is named and ` (gateway TLS)` without mTLS.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.app_id, self.port)?;
        if let Some(instance) = &self.instance {
            write!(f, "@{instance}")?;
        }
        if self.transport == Transport::GatewayTls {
            f.write_str(" (gateway TLS)")?;
        }
        Ok(())
    }
}

/// A routing header that cannot be used. Each names the header.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TargetError {
    /// The header is present but empty.
    #[error("{header}: empty")]
    Empty {
        /// The header.
        header: &'static str,
    },
    /// The header appears more than once.
    #[error("{header}: given more than once")]
    Duplicated {
        /// The header.
        header: &'static str,
    },
    /// The value is not what the header takes.
    #[error("{header}: {value:?} is not {expected}")]
    Invalid {
        /// The header.
        header: &'static str,
        /// What was sent (truncated).
        value: String,
        /// What is expected.
        expected: &'static str,
    },
    /// A routing header without `x-dstack-target-app`.
    #[error("{header} given without {TARGET_APP}")]
    WithoutApp {
        /// The orphan header.
        header: &'static str,
    },
}

impl TargetError {
    /// The header at fault.
    pub fn header(&self) -> &'static str {
        match self {
            Self::Empty { header }
            | Self::Duplicated { header }
            | Self::Invalid { header, .. }
            | Self::WithoutApp { header } => header,
        }
    }
}

/// The routing headers' values ([`ROUTING_HEADERS`] order), found in one pass over the
/// request's few headers: a lookup per routing header would parse and hash each name. A header
/// sent twice is refused.
fn routing_values(headers: &HeaderMap) -> Result<[Option<&HeaderValue>; 4], TargetError> {
    let mut found = [None; 4];
    for (name, value) in headers {
        let name = name.as_str();
        if !name.starts_with("x-dstack-target-") {
            continue;
        }
        if let Some(i) = ROUTING_HEADERS.iter().position(|h| *h == name) {
            if found[i].replace(value).is_some() {
                return Err(TargetError::Duplicated {
                    header: ROUTING_HEADERS[i],
                });
            }
        }
    }
    Ok(found)
}

/// An optional header's value: an empty one means absent, as dstack-vpc's proxy read it.
fn optional<'a>(
    header: &'static str,
    value: Option<&'a HeaderValue>,
) -> Result<Option<&'a str>, TargetError> {
    match single(header, value) {
        Err(TargetError::Empty { .. }) => Ok(None),
        other => other,
    }
}

/// An app or instance id: exactly [`ID_LEN`] bytes of hex.
fn id(header: &'static str, value: &str, expected: &'static str) -> Result<AppId, TargetError> {
    match value.parse::<AppId>() {
        Ok(id) if id.as_bytes().len() == ID_LEN => Ok(id),
        _ => Err(invalid(header, value, expected)),
    }
}

/// One header's value: absent, or a non-empty text value.
fn single<'a>(
    header: &'static str,
    value: Option<&'a HeaderValue>,
) -> Result<Option<&'a str>, TargetError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| invalid(header, "?", "visible ASCII"))?
        .trim();
    if text.is_empty() {
        return Err(TargetError::Empty { header });
    }
    Ok(Some(text))
}

fn invalid(header: &'static str, value: &str, expected: &'static str) -> TargetError {
    TargetError::Invalid {
        header,
        value: value.chars().take(80).collect(),
        expected,
    }
}

impl Target {
    /// The target named by `headers`, `None` when there is no `x-dstack-target-app` (the
    /// request is for the guest agent), or the first header that cannot be used.
    pub fn from_headers(headers: &HeaderMap) -> Result<Option<Self>, TargetError> {
        let [app, port, instance, use_tls] = routing_values(headers)?;
        let Some(app) = single(TARGET_APP, app)? else {
            for (header, value) in [
                (TARGET_PORT, port),
                (TARGET_INSTANCE, instance),
                (TARGET_USE_TLS, use_tls),
            ] {
                if optional(header, value)?.is_some() {
                    return Err(TargetError::WithoutApp { header });
                }
            }
            return Ok(None);
        };
        let app_id = id(TARGET_APP, app, "a 40-hex-digit app id")?;
        let port = match optional(TARGET_PORT, port)? {
            None => DEFAULT_PORT,
            Some(p) => match p.parse::<u16>() {
                Ok(port) if port > 0 => port,
                _ => return Err(invalid(TARGET_PORT, p, "a port 1-65535")),
            },
        };
        let instance = optional(TARGET_INSTANCE, instance)?
            .map(|i| id(TARGET_INSTANCE, i, "a 40-hex-digit instance id"))
            .transpose()?;
        let transport = match optional(TARGET_USE_TLS, use_tls)? {
            None => Transport::Mesh,
            // dstack-vpc's client accepted "true" and "1".
            Some(v) if v.eq_ignore_ascii_case("true") || v == "1" => Transport::Mesh,
            Some(v) if v.eq_ignore_ascii_case("false") || v == "0" => Transport::GatewayTls,
            Some(v) => return Err(invalid(TARGET_USE_TLS, v, "true or false")),
        };
        Ok(Some(Self {
            app_id,
            port,
            instance,
            transport,
        }))
    }

    /// The target of `CONNECT <app-id>.dstack:<port>` (or `<instance-id>.<app-id>.dstack:<port>`
    /// for one instance), over mutual RA-TLS.
    pub fn from_connect_authority(authority: &str) -> Result<Self, TargetError> {
        const WHAT: &str = "CONNECT authority";
        const EXPECTED: &str = "<app-id>.dstack:<port>";
        let bad = || invalid(WHAT, authority, EXPECTED);
        let (host, port) = authority.rsplit_once(':').ok_or_else(bad)?;
        let port = match port.parse::<u16>() {
            Ok(port) if port > 0 => port,
            _ => return Err(bad()),
        };
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let names = host.strip_suffix(".dstack").ok_or_else(bad)?;
        let (instance, app) = match names.split_once('.') {
            Some((instance, app)) => (Some(instance), app),
            None => (None, names),
        };
        Ok(Self {
            app_id: id(WHAT, app, "a 40-hex-digit app id before .dstack")?,
            port,
            instance: instance
                .map(|i| id(WHAT, i, "a 40-hex-digit instance id"))
                .transpose()?,
            transport: Transport::Mesh,
        })
    }

    /// The id the gateway routes by: the instance when named, else the app.
    pub fn gateway_id(&self) -> &AppId {
        self.instance.as_ref().unwrap_or(&self.app_id)
    }
}

/// Remove the routing headers (before forwarding).
pub fn strip_routing_headers(headers: &mut HeaderMap) {
    // Parsed names: a `&str` would be parsed again on every request.
    static NAMES: [HeaderName; 4] = [
        HeaderName::from_static(TARGET_APP),
        HeaderName::from_static(TARGET_PORT),
        HeaderName::from_static(TARGET_INSTANCE),
        HeaderName::from_static(TARGET_USE_TLS),
    ];
    for name in &NAMES {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests;
