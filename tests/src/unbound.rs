//! Debian's `unbound` as the recursive resolver a CA and the public use: it follows CNAMEs
//! across zones (an authoritative server such as BIND answers a CNAME and stops), here with
//! stub zones that send each test zone to its authoritative server. No cache to speak of, so a
//! record a test adds is seen at the next query; `test.` is served (unbound answers that
//! special-use name NXDOMAIN by default).

use std::{net::SocketAddr, path::Path, process::Command, time::Duration};

use crate::{free_port, pebble::resolve, pebble::Record, program, wait_until, ChildGuard};

/// A running unbound; killed on drop.
#[derive(Debug)]
pub struct Unbound {
    /// Where it answers (UDP and TCP).
    pub addr: SocketAddr,
    _process: ChildGuard,
}

impl Unbound {
    /// Resolve each `(zone, server)` by asking `server`, from `dir`; wait until it answers.
    pub fn start(dir: &Path, stubs: &[(&str, SocketAddr)]) -> Self {
        std::fs::create_dir_all(dir).expect("create the unbound directory");
        // `free_port` can race with other tests' listeners: on a lost race, another port.
        for attempt in 1.. {
            let port = free_port();
            let mut conf = format!(
                "server:\n  interface: 127.0.0.1\n  port: {port}\n  do-ip6: no\n  do-daemonize: no\n  \
                 chroot: \"\"\n  username: \"\"\n  directory: \"{dir}\"\n  pidfile: \"{dir}/unbound.pid\"\n  \
                 use-syslog: no\n  logfile: \"\"\n  verbosity: 1\n  do-not-query-localhost: no\n  \
                 module-config: \"iterator\"\n  qname-minimisation: no\n  \
                 access-control: 127.0.0.0/8 allow\n  cache-max-ttl: 0\n  cache-max-negative-ttl: 0\n  \
                 local-zone: \"test.\" nodefault\n\n\
                 remote-control:\n  control-enable: no\n",
                dir = dir.display()
            );
            for (zone, server) in stubs {
                conf.push_str(&format!(
                    "\nstub-zone:\n  name: \"{zone}\"\n  stub-addr: {}@{}\n",
                    server.ip(),
                    server.port()
                ));
            }
            let file = dir.join("unbound.conf");
            std::fs::write(&file, conf).expect("write unbound.conf");
            let mut cmd = Command::new(program("unbound"));
            cmd.arg("-d").arg("-c").arg(&file);
            let mut process =
                ChildGuard::spawn(&format!("unbound-{port}"), cmd, dir).expect("start unbound");
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let mut exited = None;
            wait_until("unbound to answer", Duration::from_secs(20), || {
                exited = process.exited();
                exited.is_some() || resolve(addr, "localhost.", Record::A).is_ok()
            });
            match exited {
                None => {
                    return Self {
                        addr,
                        _process: process,
                    }
                }
                Some(_) if attempt < 5 && process.stderr().contains("could not open ports") => {
                    continue
                }
                Some(status) => panic!("unbound exited ({status}): {}", process.stderr()),
            }
        }
        unreachable!("the loop returns or panics")
    }
}
