//! The `dstack-mesh` sidecar: configuration, listeners and the command line, wired from the
//! `ratls`, `gateway-client` and `nginx-compat` crates. `main.rs` only parses and calls in here,
//! so tests build the whole app in-process.

pub mod acme;
pub mod admin;
pub mod app;
pub mod auth;
pub mod base64url;
pub mod cli;
pub mod clock;
pub mod config;
pub mod demo;
#[doc(hidden)]
pub mod fuzz;
pub mod https;
pub mod inbound;
pub mod logging;
pub mod metrics;
pub mod outbound;
pub mod pccs;
pub mod proxy;
pub mod registry;
pub mod run;
pub mod runtime;
pub mod status;
pub mod tools;
pub mod trust;
pub mod tunnel;

pub use ratls::error_chain;
