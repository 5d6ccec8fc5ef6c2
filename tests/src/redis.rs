//! Debian's `redis-server` on a loopback port, and `redis-cli` against any address (a tunnel's
//! local port included).

use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Output, Stdio},
    time::Duration,
};

use crate::{free_port, program, wait_until, ChildGuard};

/// A running Redis; killed on drop.
#[derive(Debug)]
pub struct Redis {
    /// Where it listens.
    pub addr: SocketAddr,
    _process: ChildGuard,
}

impl Redis {
    /// Start a Redis without persistence in `dir` and wait until it answers.
    pub fn start(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("create the redis directory");
        // `free_port` can race with other tests' listeners: on a lost race, another port.
        for attempt in 1.. {
            let port = free_port();
            let mut cmd = Command::new(program("redis-server"));
            cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
                .arg("--dir")
                .arg(dir);
            let mut process =
                ChildGuard::spawn(&format!("redis-{port}"), cmd, dir).expect("start redis-server");
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let mut exited = None;
            wait_until("redis-server to answer", Duration::from_secs(20), || {
                exited = process.exited();
                exited.is_some() || cli(addr, &["PING"]).status.success()
            });
            match exited {
                None => {
                    return Self {
                        addr,
                        _process: process,
                    }
                }
                Some(_) if attempt < 5 => {}
                Some(status) => panic!("redis-server exited ({status}): {}", process.stderr()),
            }
        }
        unreachable!()
    }

    /// A field of `INFO stats` (e.g. `total_connections_received`), read directly (that
    /// connection counts too).
    pub fn stat(&self, field: &str) -> u64 {
        let out = cli(self.addr, &["INFO", "stats"]);
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in INFO stats: {text}"))
    }
}

/// `redis-cli -h <addr> <args>`, raw output, with a deadline.
pub fn cli(addr: SocketAddr, args: &[&str]) -> Output {
    cli_with_input(addr, args, None)
}

/// [`cli`] with `input` on its standard input (`-x` takes the last argument from it).
pub fn cli_with_input(addr: SocketAddr, args: &[&str], input: Option<&Path>) -> Output {
    let mut cmd = Command::new("timeout");
    cmd.arg("30")
        .arg(program("redis-cli"))
        .args([
            "--raw",
            "-h",
            &addr.ip().to_string(),
            "-p",
            &addr.port().to_string(),
        ])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    match input {
        Some(path) => cmd.stdin(std::fs::File::open(path).expect("open the input")),
        None => cmd.stdin(Stdio::null()),
    };
    cmd.output().expect("run redis-cli")
}
