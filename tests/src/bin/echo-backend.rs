//! echo-backend: the suite's backend (it answers with what it received, as JSON) as a program,
//! for the containers of the docker tests: `echo-backend 0.0.0.0:8080`.

use std::net::SocketAddr;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let addr: SocketAddr = match std::env::args().nth(1).map(|a| a.parse()) {
        Some(Ok(addr)) => addr,
        _ => {
            eprintln!("usage: echo-backend <ip:port>");
            return std::process::ExitCode::from(2);
        }
    };
    let backend = e2e::backend::Backend::start_on(addr).await;
    eprintln!("echo-backend listening on {}", backend.addr);
    // Until docker stops the container (SIGTERM ends the process).
    std::future::pending::<()>().await;
    std::process::ExitCode::SUCCESS
}
