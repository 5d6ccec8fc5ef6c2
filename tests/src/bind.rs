//! Debian's BIND 9 `named` on loopback as the authoritative server of test zones that accept
//! RFC 2136 updates signed with a TSIG key: what a DNS-01 client updates and what pebble
//! (through [`PebbleOptions::dns_server`](crate::pebble::PebbleOptions::dns_server)) reads.
//!
//! [`Bind::start`] writes `named.conf` and one zone file per [`Zone`] into a directory of the
//! test's, runs `named -g` (foreground, logging to stderr, no `-u`: it needs no root for a high
//! port and stays the user it was started as) and returns once every zone answers its SOA over
//! UDP and TCP. `dig` and `nsupdate` from bind9-dnsutils look and change the zones.
//!
//! What named 9.18 does that tests depend on:
//! - the port comes from `listen-on port P` in the configuration (`-p` only sets the default
//!   for a `listen-on` without one), the same for UDP and TCP;
//! - a UDP port taken by someone else is fatal (`unable to listen on any configured
//!   interfaces`), a TCP one only logged (`creating TCP socket: address in use`) while named
//!   serves UDP alone, so both count as a taken port here;
//! - each accepted update is written to `<zone>.db.jnl` in the directory (which must be
//!   writable by named's user) and increments the SOA serial by one;
//! - a bad signature fails the update with `NOTAUTH(BADSIG)`, an unknown key name with
//!   `NOTAUTH(BADKEY)`, an unsigned update with `REFUSED`;
//! - `querylog yes` (set here) logs every query as `query: <name> IN <type>` in [`Bind::log`].
//!
//! Like [`crate::pebble`], everything here blocks; see there for use from async tests.

use std::{
    io::Write,
    net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use crate::{program, wait_until, ChildGuard};

/// How long named may take to load its zones and answer.
const READY_LIMIT: Duration = Duration::from_secs(20);

/// Launches with a fresh port when the one picked was taken before named bound it.
const BIND_ATTEMPTS: usize = 3;

/// Lines in named's log that mean the port was taken.
const PORT_TAKEN: [&str; 2] = ["address in use", "unable to listen on any configured"];

/// A TSIG key (RFC 8945) that signs updates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tsig {
    /// Key name, as in `key "<name>"` and on the wire.
    pub name: String,
    /// BIND's name of the HMAC, e.g. `hmac-sha256`.
    pub algorithm: String,
    /// The shared secret, standard base64.
    pub secret: String,
}

impl Tsig {
    /// An `hmac-sha256` key named `name` with a random 32-byte secret.
    pub fn generate(name: &str) -> Self {
        use aws_lc_rs::rand::SecureRandom;
        let mut secret = [0u8; 32];
        aws_lc_rs::rand::SystemRandom::new()
            .fill(&mut secret)
            .expect("random TSIG secret");
        Self {
            name: name.to_owned(),
            algorithm: "hmac-sha256".to_owned(),
            secret: crate::base64(&secret),
        }
    }

    /// The key as `nsupdate -y` and `dig -y` take it: `algorithm:name:secret`.
    pub fn spec(&self) -> String {
        format!("{}:{}:{}", self.algorithm, self.name, self.secret)
    }
}

/// A zone named serves as primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    /// The apex without a trailing dot, e.g. `example.test`.
    pub name: String,
    /// Zone-file lines after the SOA, NS and `ns1 A 127.0.0.1` every zone gets, relative to
    /// the apex: `www IN A 127.0.0.1`, `@ IN CAA 0 issue "other.example"`.
    pub records: Vec<String>,
    /// No key may update it (a customer's zone a delegated deployment must never touch).
    pub read_only: bool,
}

/// What [`Bind::start`] serves.
#[derive(Debug, Clone)]
pub struct BindOptions {
    /// The zones, each updatable with [`BindOptions::tsig`] unless read-only.
    pub zones: Vec<Zone>,
    /// The only key allowed to update them.
    pub tsig: Tsig,
}

/// A running `named`, killed on drop; on a panicking thread its log is printed first.
#[derive(Debug)]
pub struct Bind {
    /// Where it answers, UDP and TCP (127.0.0.1).
    pub addr: SocketAddr,
    /// The key that may update every zone.
    pub tsig: Tsig,
    zones: Vec<String>,
    named: ChildGuard,
}

impl Bind {
    /// Write the configuration and zones into `dir` and start named; returns once each zone
    /// answers its SOA. Panics (printing named's log) if it does not start.
    pub fn start(dir: &Path, opts: BindOptions) -> Self {
        std::fs::create_dir_all(dir).expect("create the named directory");
        for zone in &opts.zones {
            let file = dir.join(format!("{}.db", zone.name));
            std::fs::write(&file, zone_file(zone)).expect("write a zone file");
            // An old journal would be replayed over the fresh zone.
            let _ = std::fs::remove_file(dir.join(format!("{}.db.jnl", zone.name)));
        }
        let conf = dir.join("named.conf");
        for attempt in 1..=BIND_ATTEMPTS {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_dns_port()));
            std::fs::write(&conf, named_conf(dir, addr.port(), &opts)).expect("write named.conf");
            let mut cmd = Command::new(program("named"));
            cmd.arg("-g").arg("-c").arg(&conf);
            let named = ChildGuard::spawn("named", cmd, dir).expect("start named");
            let mut bind = Self {
                addr,
                tsig: opts.tsig.clone(),
                zones: opts.zones.iter().map(|z| z.name.clone()).collect(),
                named,
            };
            match bind.wait_ready() {
                Ok(()) => return bind,
                Err(Launch::PortTaken) if attempt < BIND_ATTEMPTS => continue,
                // Unwinding drops `bind`, which prints named's log.
                Err(Launch::PortTaken) => panic!("named found its port taken each time"),
                Err(Launch::Failed(why)) => panic!("named did not start: {why}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// `dig +short +norecurse <name> <rtype>` against this server: the answer's records in
    /// presentation form, one per line (TXT quoted, SOA as seven fields). Empty for NXDOMAIN
    /// or no data. Panics with dig's output if it gets no answer.
    pub fn dig(&self, name: &str, rtype: &str) -> Vec<String> {
        self.try_dig(name, rtype, &[])
            .unwrap_or_else(|e| panic!("dig {name} {rtype} at {}: {e}", self.addr))
    }

    /// The SOA serial of `zone`.
    pub fn serial(&self, zone: &str) -> u32 {
        let soa = self.dig(zone, "SOA");
        soa.first()
            .and_then(|l| l.split_whitespace().nth(2))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no SOA serial for {zone} in {soa:?}"))
    }

    /// Run `script` (nsupdate commands such as `update add _acme-challenge.example.test. 60
    /// TXT "x"`) through `nsupdate -y` with this server's key, between `server 127.0.0.1 P`
    /// and `send`. The error holds nsupdate's output, e.g. `update failed: NOTAUTH(BADSIG)`.
    pub fn nsupdate(&self, script: &str) -> Result<(), String> {
        self.nsupdate_with(&self.tsig, script)
    }

    /// [`Bind::nsupdate`] signing with `tsig` instead, to show what a wrong key gets.
    pub fn nsupdate_with(&self, tsig: &Tsig, script: &str) -> Result<(), String> {
        let mut child = Command::new(program("nsupdate"))
            // Give up after 10 s rather than nsupdate's default of 300.
            .args(["-t", "10", "-y"])
            .arg(tsig.spec())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start nsupdate");
        let input = format!(
            "server {} {}\n{}\nsend\n",
            self.addr.ip(),
            self.addr.port(),
            script.trim_end()
        );
        child
            .stdin
            .take()
            .expect("nsupdate's stdin")
            .write_all(input.as_bytes())
            .expect("write to nsupdate");
        let out = child.wait_with_output().expect("run nsupdate");
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "nsupdate {}: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// named's log (stderr) so far.
    pub fn log(&self) -> String {
        self.named.stderr()
    }

    // Until each zone answers its SOA over UDP and TCP, or named exits or reports a taken port.
    fn wait_ready(&mut self) -> Result<(), Launch> {
        let mut outcome = None;
        wait_until(
            &format!("named to answer on {}", self.addr),
            READY_LIMIT,
            || {
                let log = self.log();
                outcome = if port_taken(&log) {
                    Some(Err(Launch::PortTaken))
                } else if let Some(status) = self.named.exited() {
                    Some(Err(Launch::Failed(format!("exited with {status}"))))
                } else if log.contains("not loaded due to errors") {
                    // named keeps running without the zone.
                    Some(Err(Launch::Failed("a zone did not load".to_owned())))
                } else if log.lines().any(|l| l.ends_with(" running")) && self.answers() {
                    Some(Ok(()))
                } else {
                    None
                };
                outcome.is_some()
            },
        );
        outcome.expect("wait_until returns once there is an outcome")
    }

    fn answers(&self) -> bool {
        self.zones.iter().all(|zone| {
            [&[][..], &["+tcp"][..]].iter().all(|extra| {
                self.try_dig(zone, "SOA", extra)
                    .is_ok_and(|soa| !soa.is_empty())
            })
        })
    }

    fn try_dig(&self, name: &str, rtype: &str, extra: &[&str]) -> Result<Vec<String>, String> {
        let out = Command::new(program("dig"))
            .arg(format!("@{}", self.addr.ip()))
            .args(["-p", &self.addr.port().to_string()])
            .args(["+short", "+norecurse", "+time=2", "+tries=2"])
            .args(extra)
            .args([name, rtype])
            .output()
            .map_err(|e| format!("run dig: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        // dig +short reports a failed exchange on stdout, as `;; ...` comments.
        if !out.status.success() || stdout.lines().any(|l| l.starts_with(";;")) {
            return Err(format!(
                "dig {}: {stdout}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(stdout.lines().map(str::to_owned).collect())
    }
}

impl Drop for Bind {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- named log ---\n{}", self.log());
        }
    }
}

// Why a launch did not come up.
#[derive(Debug)]
enum Launch {
    // The port picked for it was taken meanwhile: worth another try with a new one.
    PortTaken,
    // Anything else, said how.
    Failed(String),
}

fn port_taken(log: &str) -> bool {
    PORT_TAKEN.iter().any(|needle| log.contains(needle))
}

// A port free for both UDP and TCP on 127.0.0.1 right now.
fn free_dns_port() -> u16 {
    crate::free_port_where(|port| {
        UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
            && TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
    })
}

fn named_conf(dir: &Path, port: u16, opts: &BindOptions) -> String {
    let dir = dir.display();
    let Tsig {
        name,
        algorithm,
        secret,
    } = &opts.tsig;
    let mut conf = format!(
        r#"options {{
    directory "{dir}";
    pid-file "{dir}/named.pid";
    session-keyfile "{dir}/session.key";
    listen-on port {port} {{ 127.0.0.1; }};
    listen-on-v6 {{ none; }};
    recursion no;
    dnssec-validation no;
    querylog yes;
}};
// No rndc: tests stop named by killing it.
controls {{ }};
key "{name}" {{
    algorithm {algorithm};
    secret "{secret}";
}};
"#
    );
    for zone in &opts.zones {
        let update = match zone.read_only {
            true => "none".to_owned(),
            false => format!("key \"{name}\""),
        };
        conf.push_str(&format!(
            r#"zone "{zone}" {{
    type primary;
    file "{zone}.db";
    allow-update {{ {update}; }};
    notify no;
}};
"#,
            zone = zone.name
        ));
    }
    conf
}

// SOA with serial 1 and short timers (nothing transfers from it; a 1 s negative TTL keeps a
// resolver from caching an answer from before an update), one name server, then the extras.
fn zone_file(zone: &Zone) -> String {
    let apex = &zone.name;
    let mut text = format!(
        "$ORIGIN {apex}.\n$TTL 1\n\
         @ IN SOA ns1.{apex}. hostmaster.{apex}. 1 60 10 600 1\n\
         @ IN NS ns1.{apex}.\n\
         ns1 IN A 127.0.0.1\n"
    );
    for record in &zone.records {
        text.push_str(record);
        text.push('\n');
    }
    text
}
