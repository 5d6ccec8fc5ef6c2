//! Where a dstack target lives and how to reach it.
//!
//! An app names the peer it wants with `x-dstack-target-*` headers ([`target`]); the sidecar
//! turns that into an address and a TLS server name ([`address`]): through the dstack gateway,
//! which passes TLS through to the target CVM by SNI (`<id>-<port>s.<base_domain>`), to one
//! fixed address, or by a static table for networks where CVMs reach each other directly. The
//! gateway's base domain and port come from its `/prpc/Info` ([`discovery`]).

pub mod address;
pub mod discovery;
pub mod target;

pub use address::{AddressError, Addressing, GatewaySetting, HostPort, Route};
pub use target::{Target, TargetError, Transport};
