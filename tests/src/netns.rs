//! Separate machines on one host: each [`Netns`] is a Linux network namespace with its own
//! loopback (so every "CVM" can use the same local ports), joined to the host by a veth pair
//! on a /30 of its own. Needs root (`ip netns`), as the suite runs.

use std::{
    net::Ipv4Addr,
    process::{Command, Output},
};

/// One namespace; deleted (with its veth pair) on drop.
#[derive(Debug)]
pub struct Netns {
    /// Its name (`ip netns exec <name>`).
    pub name: String,
    /// The host's end of its link.
    pub host_ip: Ipv4Addr,
    /// Its own address, reachable from the host.
    pub ip: Ipv4Addr,
}

fn ip(args: &[&str]) -> Output {
    let out = Command::new(crate::program("ip"))
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {args:?}: {} (network namespaces need root)",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl Netns {
    /// Namespace `index` of this test process (up to 60 per process).
    pub fn create(index: u8) -> Self {
        assert!(index < 60, "at most 60 namespaces");
        let pid = std::process::id();
        let name = format!("dm{pid}-{index}");
        // A /30 per namespace in 10.213.0.0/16, spread by pid so concurrent runs differ.
        let third = (pid % 250) as u8;
        let host_ip = Ipv4Addr::new(10, 213, third, index * 4 + 1);
        let ns_ip = Ipv4Addr::new(10, 213, third, index * 4 + 2);
        let (host_if, ns_if) = (
            format!("dmh{}x{index}", pid % 100_000),
            format!("dmn{}x{index}", pid % 100_000),
        );
        // A leftover of an earlier run with this pid would be in the way.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let netns = Self {
            name: name.clone(),
            host_ip,
            ip: ns_ip,
        };
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]);
        ip(&["link", "set", &ns_if, "netns", &name]);
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        netns.exec_ok(&["ip", "addr", "add", &format!("{ns_ip}/30"), "dev", &ns_if]);
        netns.exec_ok(&["ip", "link", "set", &ns_if, "up"]);
        netns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        netns
    }

    /// `program args...` inside the namespace (not started).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(crate::program("ip"));
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Run `args` inside the namespace; panics on failure.
    fn exec_ok(&self, args: &[&str]) {
        let out = self
            .command(args[0])
            .args(&args[1..])
            .output()
            .expect("ip netns exec");
        assert!(
            out.status.success(),
            "{args:?} in {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the veth pair, and with it the host's.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
