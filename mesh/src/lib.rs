//! The `dstack-mesh` sidecar: configuration, listeners and the command line, wired from the
//! `ratls`, `gateway-client` and `nginx-compat` crates. `main.rs` only parses and calls in here,
//! so tests build the whole app in-process.

pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod demo;
pub mod inbound;
pub mod logging;
pub mod proxy;
pub mod run;
pub mod tools;

/// `e` and its sources, joined, so "connection refused" is not hidden behind "client error".
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
