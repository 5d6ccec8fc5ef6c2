//! Where a dstack target lives and how to reach it.
//!
//! An app names the peer it wants with `x-dstack-target-*` headers ([`target`]); the sidecar
//! turns that into an address and a TLS server name ([`address`]): through the dstack gateway,
//! which passes TLS through to the target CVM by SNI (`<id>-<port>s.<base_domain>`), to one
//! fixed address, or by a static table for networks where CVMs reach each other directly. The
//! gateway's base domain and port come from its `/prpc/Info` ([`discovery`]). The
//! [`connector`] dials a target and completes the handshake with the sidecar's RA-TLS
//! certificate, accepting only a peer that proves the target's app id, so a wrong peer never
//! receives a request byte.

pub mod address;
pub mod connector;
pub mod discovery;
pub mod target;

pub use address::{
    AddressError, Addressing, GatewaySetting, HostPort, Route, RouteKey, StaticRoutes,
};
pub use connector::{ConnectError, Connected, Connector, ConnectorConfig};
pub use target::{Target, TargetError, Transport};
