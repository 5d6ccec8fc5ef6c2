//! The `dstack-mesh` sidecar: configuration, listeners and the command line, wired from the
//! `ratls`, `gateway-client` and `nginx-compat` crates. `main.rs` only parses and calls in here,
//! so tests build the whole app in-process.

pub mod cli;
pub mod config;
pub mod demo;
pub mod logging;
pub mod tools;
