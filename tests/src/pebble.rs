//! Debian's pebble (a test ACME CA) and pebble-challtestsrv (its mock DNS server) on loopback,
//! for end-to-end ACME tests.
//!
//! [`Pebble::start`] makes a throwaway CA and a `localhost`/`127.0.0.1` certificate for
//! pebble's HTTPS API (ACME clients trust [`Pebble::ca_file`] to talk to pebble; the root that
//! signs *issued* certificates is another one, [`Pebble::issuance_root_pem`]), starts
//! pebble-challtestsrv answering every A query with 127.0.0.1 and no AAAA, and starts pebble
//! resolving through it (or through [`PebbleOptions::dns_server`]), with random validation
//! sleeps, random bad nonces and authorization reuse turned off so that every order is
//! validated for real.
//!
//! Everything here blocks (std sockets, polling with short sleeps) and starts no runtime: call
//! it from a plain `#[test]`, or from `#[tokio::test]` either before the async work or through
//! `tokio::task::spawn_blocking`. A direct call inside a runtime works but stalls that
//! runtime's thread while it polls, so on a current-thread runtime an in-process server (a mesh
//! answering TLS-ALPN-01) makes no progress meanwhile.
//!
//! What pebble 2.4.0 does that tests depend on:
//! - it logs to stdout, one line per request (`POST /order-plz -> calling handler()` for each
//!   new-order request, rejected ones included) and `Added order "<id>" to the db` then
//!   `There are now <n> orders in the db` for each order it creates;
//! - on every launch it generates a new root and intermediate and starts with no accounts,
//!   orders or authorizations, so an old account gets `accountDoesNotExist`;
//! - issued certificates are valid for 5 years unless `certificateValidityPeriod` (seconds) is
//!   set in its configuration ([`PebbleOptions::validity`]);
//! - each challenge is checked by 3 concurrent validation attempts, so a challenge responder
//!   sees several connections per authorization.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::Duration,
};

use rustls_pki_types::{pem::PemObject, CertificateDer, ServerName};

use crate::{free_port, program, wait_until, ChildGuard};

/// How long pebble or pebble-challtestsrv may take to answer once started.
const READY_LIMIT: Duration = Duration::from_secs(20);

/// Launches with fresh ports when a port from [`free_port`] was taken before the program
/// bound it.
const BIND_ATTEMPTS: usize = 3;

/// Deadline for each connect, read and write of the small clients in this module.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// pebble's environment before [`PebbleOptions::env`]: no random sleeps before validating, no
/// valid nonce rejected as bad, reuse a valid authorization as rarely as pebble allows. That is
/// not never: pebble creates a new one when `rand.Intn(100) > percent`, so at 0 one order in a
/// hundred still goes through on an earlier authorization, with no challenge; a test that needs
/// every order to validate asks again when one did not.
const DEFAULT_ENV: [(&str, &str); 3] = [
    ("PEBBLE_VA_NOSLEEP", "1"),
    ("PEBBLE_WFE_NONCEREJECT", "0"),
    ("PEBBLE_AUTHZREUSE", "0"),
];

// Removed so pebble's validation requests go straight to the names challtestsrv resolves.
const PROXY_ENV: [&str; 6] = [
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
];

/// How pebble is configured beyond the fixed loopback setup.
#[derive(Debug, Clone, Default)]
pub struct PebbleOptions {
    /// Where pebble connects for TLS-ALPN-01 validation (`tlsPort`), on the address
    /// challtestsrv resolves the name to (127.0.0.1 unless a test changed it).
    pub tls_port: u16,
    /// Where pebble connects for HTTP-01 validation (`httpPort`).
    pub http_port: u16,
    /// Validity of issued certificates (`certificateValidityPeriod`, whole seconds); `None`
    /// keeps pebble's 5 years.
    pub validity: Option<Duration>,
    /// Extra environment for pebble, applied after [`DEFAULT_ENV`] so it can override it
    /// (pebble 2.4 reads `PEBBLE_VA_NOSLEEP`, `PEBBLE_VA_SLEEPTIME`, `PEBBLE_VA_ALWAYS_VALID`,
    /// `PEBBLE_WFE_NONCEREJECT`, `PEBBLE_AUTHZREUSE`, `PEBBLE_ALTERNATE_ROOTS`,
    /// `PEBBLE_CHAIN_LENGTH` and `PEBBLE_WFE_ORDERS_PER_PAGE`).
    pub env: Vec<(String, String)>,
    /// External Account Binding keys (`kid`, base64url HMAC key); any makes EAB required.
    pub eab_keys: Vec<(String, String)>,
    /// Where pebble resolves names for validation (`-dnsserver`), e.g. a
    /// [`Bind`](crate::bind::Bind) server for DNS-01 against RFC 2136 updates. It then answers
    /// the A/AAAA lookups of HTTP-01 and TLS-ALPN-01 too, so its zones need those records.
    /// `None` = challtestsrv's DNS ([`Pebble::challtestsrv_dns`]).
    pub dns_server: Option<SocketAddr>,
    /// Where the directory and management API listen (default 127.0.0.1), e.g. the docker
    /// bridge's address so that containers reach pebble; its certificate names it too.
    pub listen_ip: Option<IpAddr>,
}

/// pebble and pebble-challtestsrv, killed on drop; on a panicking thread their logs are printed
/// first.
#[derive(Debug)]
pub struct Pebble {
    /// The ACME directory, `https://127.0.0.1:<port>/dir`.
    pub directory: String,
    /// PEM of the test CA behind pebble's HTTPS certificate: clients trust it to talk to pebble
    /// (directory and management API). It does not sign issued certificates.
    pub ca_file: PathBuf,
    /// pebble's management API, `https://127.0.0.1:<port>`, same certificate as the directory.
    pub management: String,
    /// challtestsrv's DNS server (UDP and TCP), the resolver pebble validates with unless
    /// [`PebbleOptions::dns_server`] names another.
    pub challtestsrv_dns: SocketAddr,
    /// challtestsrv's management API, `http://127.0.0.1:<port>` (plain HTTP).
    pub challtestsrv_management: String,
    dir: PathBuf,
    config: PathBuf,
    env: Vec<(String, String)>,
    // pebble's `-dnsserver`.
    resolver: SocketAddr,
    pebble: Option<ChildGuard>,
    challtestsrv: ChildGuard,
}

impl Pebble {
    /// Start challtestsrv, then pebble, with their files and logs in `dir`; returns once the
    /// directory and the management API answer. Panics (with the logs) if either fails.
    pub fn start(dir: &Path, opts: PebbleOptions) -> Self {
        std::fs::create_dir_all(dir).expect("create the pebble directory");
        for log in ["pebble.log", "challtestsrv.log"] {
            let _ = std::fs::remove_file(dir.join(log));
        }
        let ip = opts.listen_ip.unwrap_or([127, 0, 0, 1].into());
        let (ca_file, certificate, private_key) = write_api_certificate(dir, ip);
        let (challtestsrv, challtestsrv_dns, challtestsrv_management) = start_challtestsrv(dir);
        let mut env: Vec<(String, String)> = DEFAULT_ENV
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        env.extend(opts.env.iter().cloned());
        let mut pebble = Self {
            directory: String::new(),
            ca_file,
            management: String::new(),
            challtestsrv_dns,
            challtestsrv_management,
            dir: dir.to_owned(),
            config: dir.join("pebble-config.json"),
            env,
            resolver: opts.dns_server.unwrap_or(challtestsrv_dns),
            pebble: None,
            challtestsrv,
        };
        for attempt in 1..=BIND_ATTEMPTS {
            let (listen, management) = (free_port(), free_port());
            let (listen, management) =
                (SocketAddr::new(ip, listen), SocketAddr::new(ip, management));
            pebble.directory = format!("https://{listen}/dir");
            pebble.management = format!("https://{management}");
            let mut config = serde_json::json!({"pebble": {
                "listenAddress": listen.to_string(),
                "managementListenAddress": management.to_string(),
                "certificate": certificate,
                "privateKey": private_key,
                "httpPort": opts.http_port,
                "tlsPort": opts.tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
            }});
            if !opts.eab_keys.is_empty() {
                config["pebble"]["externalAccountBindingRequired"] = true.into();
                config["pebble"]["externalAccountMACKeys"] = opts
                    .eab_keys
                    .iter()
                    .map(|(kid, key)| (kid.clone(), serde_json::Value::from(key.clone())))
                    .collect::<serde_json::Map<_, _>>()
                    .into();
            }
            if let Some(validity) = opts.validity {
                config["pebble"]["certificateValidityPeriod"] = validity.as_secs().into();
            }
            std::fs::write(&pebble.config, config.to_string()).expect("write pebble's config");
            match pebble.launch() {
                Ok(guard) => {
                    pebble.pebble = Some(guard);
                    return pebble;
                }
                Err(Failure::PortTaken(_)) if attempt < BIND_ATTEMPTS => continue,
                Err(failure) => panic!("pebble did not start: {failure}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Kill pebble only; challtestsrv keeps answering. The directory is unreachable until
    /// [`Pebble::restart`].
    pub fn stop(&mut self) {
        self.pebble = None;
    }

    /// Start pebble again (stopping it first if it runs) on the same ports and configuration,
    /// and wait until it answers. It comes back with a new issuance root and no accounts.
    pub fn restart(&mut self) {
        self.stop();
        match self.launch() {
            Ok(guard) => self.pebble = Some(guard),
            Err(failure) => panic!("pebble did not restart on the same ports: {failure}"),
        }
    }

    /// The root that signs issued certificates (through pebble's intermediate), PEM, from
    /// `{management}/roots/0`. It changes on every (re)start.
    pub fn issuance_root_pem(&self) -> String {
        let url = format!("{}/roots/0", self.management);
        let reply =
            https(&self.ca_file, "GET", &url, None).unwrap_or_else(|e| panic!("GET {url}: {e}"));
        assert_eq!(reply.status, 200, "GET {url}");
        String::from_utf8(reply.body).expect("the root is PEM text")
    }

    /// Orders pebble created since [`Pebble::start`], across restarts (its
    /// `Added order "<id>" to the db` lines).
    pub fn orders_seen(&self) -> usize {
        self.count_log_lines("Added order \"")
    }

    /// Requests to the new-order URL since [`Pebble::start`], across restarts, including
    /// rejected ones (bad nonce, unknown account, ...).
    pub fn order_requests(&self) -> usize {
        self.count_log_lines("POST /order-plz ")
    }

    /// pebble's stdout and stderr since [`Pebble::start`], all launches in order.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pebble.log")).unwrap_or_default()
    }

    /// challtestsrv's stdout and stderr.
    pub fn challtestsrv_log(&self) -> String {
        self.challtestsrv.stderr()
    }

    /// POST `body` to challtestsrv's management API at `path` (`/add-a`, `/set-txt`,
    /// `/set-default-ipv4`, `/set-servfail`, ...); panics unless it answers 200.
    pub fn challtestsrv(&self, path: &str, body: &serde_json::Value) {
        let reply = post_json(&self.challtestsrv_management, path, body)
            .unwrap_or_else(|e| panic!("POST {path} to challtestsrv: {e}"));
        assert_eq!(reply.status, 200, "POST {path} to challtestsrv: {reply:?}");
    }

    fn count_log_lines(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }

    // One launch of pebble with the current configuration, waiting until it answers or exits.
    fn launch(&self) -> Result<ChildGuard, Failure> {
        let log_from = self.log().len();
        let mut cmd = Command::new(program("pebble"));
        cmd.arg("-config")
            .arg(&self.config)
            .arg("-dnsserver")
            .arg(self.resolver.to_string());
        for var in PROXY_ENV {
            cmd.env_remove(var);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let mut guard = ChildGuard::spawn_with_stdout("pebble", cmd, &self.dir)
            .map_err(|e| Failure::Exited(format!("spawn: {e}")))?;
        let mut exited = None;
        wait_until(
            &format!("pebble to answer at {}", self.directory),
            READY_LIMIT,
            || {
                exited = guard.exited();
                exited.is_some() || self.answers()
            },
        );
        match exited {
            None => Ok(guard),
            Some(status) => {
                let log = self.log().get(log_from..).unwrap_or_default().to_owned();
                Err(failure(format!("exited ({status}): {log}")))
            }
        }
    }

    // The directory lists newOrder and the management API serves the root.
    fn answers(&self) -> bool {
        let directory = https(&self.ca_file, "GET", &self.directory, None);
        let root = https(
            &self.ca_file,
            "GET",
            &format!("{}/roots/0", self.management),
            None,
        );
        match (directory, root) {
            (Ok(directory), Ok(root)) => {
                directory.status == 200
                    && root.status == 200
                    && String::from_utf8_lossy(&directory.body).contains("newOrder")
            }
            _ => false,
        }
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- pebble log ---\n{}--- challtestsrv log ---\n{}",
                self.log(),
                self.challtestsrv_log()
            );
        }
    }
}

// Why a launch failed, with what the program logged.
#[derive(Debug)]
enum Failure {
    // A port picked for it was taken meanwhile: worth another try with new ports.
    PortTaken(String),
    // Anything else.
    Exited(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::PortTaken(log) | Self::Exited(log) => f.write_str(log),
        }
    }
}

fn failure(log: String) -> Failure {
    if log.contains("address already in use") {
        Failure::PortTaken(log)
    } else {
        Failure::Exited(log)
    }
}

// The test CA (`ca.pem`) and pebble's HTTPS certificate and key signed by it (`cert.pem`,
// `key.pem`) for `localhost` and 127.0.0.1.
fn write_api_certificate(dir: &Path, ip: IpAddr) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.distinguished_name
        .push(DnType::CommonName, "e2e pebble API CA");
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("CA key"))
        .expect("self-sign the API CA");
    let key = KeyPair::generate().expect("pebble's key");
    let mut leaf = CertificateParams::new(vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        ip.to_string(),
    ])
    .expect("leaf parameters");
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    let leaf = leaf
        .signed_by(&key, &ca)
        .expect("sign pebble's certificate");
    let files = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&files.0, ca.pem()).expect("write ca.pem");
    std::fs::write(&files.1, leaf.pem()).expect("write cert.pem");
    std::fs::write(&files.2, key.serialize_pem()).expect("write key.pem");
    files
}

// challtestsrv with only its DNS server (every A query answers 127.0.0.1, no AAAA) and its
// management API; returns the guard and both addresses once DNS answers.
fn start_challtestsrv(dir: &Path) -> (ChildGuard, SocketAddr, String) {
    let log = dir.join("challtestsrv.log");
    for attempt in 1..=BIND_ATTEMPTS {
        let dns = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let management = format!("127.0.0.1:{}", free_port());
        let log_from = std::fs::metadata(&log).map_or(0, |m| m.len() as usize);
        let mut cmd = Command::new(program("pebble-challtestsrv"));
        cmd.arg("-dns01")
            .arg(dns.to_string())
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .arg("-management")
            .arg(&management)
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""]);
        let mut guard = ChildGuard::spawn_with_stdout("challtestsrv", cmd, dir)
            .expect("start pebble-challtestsrv");
        let new_log = |guard: &ChildGuard| guard.stderr().get(log_from..).unwrap_or("").to_owned();
        let mut exited = None;
        wait_until(
            &format!("challtestsrv to answer DNS on {dns}"),
            READY_LIMIT,
            || {
                exited = guard.exited();
                // A DNS port it could not bind is logged, not fatal.
                exited.is_some()
                    || new_log(&guard).contains("address already in use")
                    || (TcpStream::connect(&management).is_ok()
                        && resolve(dns, "ready.pebble.test", Record::A)
                            .is_ok_and(|a| a == [IpAddr::V4(Ipv4Addr::LOCALHOST)]))
            },
        );
        let log = new_log(&guard);
        if exited.is_none() && !log.contains("address already in use") {
            return (guard, dns, format!("http://{management}"));
        }
        match failure(log) {
            Failure::PortTaken(_) if attempt < BIND_ATTEMPTS => continue,
            failure => panic!("pebble-challtestsrv did not start ({exited:?}): {failure}"),
        }
    }
    unreachable!("the last attempt returns or panics")
}

/// An HTTP response.
#[derive(Debug)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Header fields in order, names as sent.
    pub headers: Vec<(String, String)>,
    /// The body (empty for HEAD).
    pub body: Vec<u8>,
}

impl Reply {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.0 request over TLS to `url` (`https://host:port/path`) trusting only the
/// certificates in `ca_file` (PEM); `body` goes as `application/jose+json`, as ACME wants.
pub fn https(
    ca_file: &Path,
    method: &str,
    url: &str,
    body: Option<&[u8]>,
) -> std::io::Result<Reply> {
    let uri: http::Uri = url.parse().map_err(std::io::Error::other)?;
    let host = uri
        .host()
        .ok_or_else(|| std::io::Error::other("no host in the URL"))?;
    let authority = format!("{host}:{}", uri.port_u16().unwrap_or(443));
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).map_err(std::io::Error::other)? {
        roots
            .add(cert.map_err(std::io::Error::other)?)
            .map_err(std::io::Error::other)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(ratls::crypto::provider())
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']'))
        .map_err(std::io::Error::other)?
        .to_owned();
    let tls =
        rustls::ClientConnection::new(Arc::new(config), name).map_err(std::io::Error::other)?;
    let mut stream = rustls::StreamOwned::new(tls, connect(&authority)?);
    stream.write_all(&request_bytes(
        method,
        &authority,
        path,
        body.map(|b| ("application/jose+json", b)),
    ))?;
    let mut raw = Vec::new();
    match stream.read_to_end(&mut raw) {
        Ok(_) => {}
        // A close without close_notify after a whole response is still a response.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(e),
    }
    parse_reply(&raw)
}

/// POST `body` as JSON to `base` (`http://host:port`, plain HTTP) at `path`, over HTTP/1.0.
pub fn post_json(base: &str, path: &str, body: &serde_json::Value) -> std::io::Result<Reply> {
    let authority = base.trim_start_matches("http://");
    let mut tcp = connect(authority)?;
    tcp.write_all(&request_bytes(
        "POST",
        authority,
        path,
        Some(("application/json", body.to_string().as_bytes())),
    ))?;
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw)?;
    parse_reply(&raw)
}

fn connect(authority: &str) -> std::io::Result<TcpStream> {
    let addr = authority
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{authority} has no address")))?;
    let tcp = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    tcp.set_read_timeout(Some(IO_TIMEOUT))?;
    tcp.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(tcp)
}

// HTTP/1.0, so the server closes after one response and never chunks it.
fn request_bytes(
    method: &str,
    authority: &str,
    path: &str,
    body: Option<(&str, &[u8])>,
) -> Vec<u8> {
    let mut head = format!("{method} {path} HTTP/1.0\r\nHost: {authority}\r\n");
    if let Some((content_type, body)) = body {
        head.push_str(&format!(
            "Content-Type: {content_type}\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body.map_or(&[][..], |(_, b)| b));
    bytes
}

fn parse_reply(raw: &[u8]) -> std::io::Result<Reply> {
    let malformed = || std::io::Error::other("malformed HTTP response");
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(malformed)?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| malformed())?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(malformed)?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let length = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok());
    if let Some(length) = length {
        body.truncate(length);
    }
    Ok(Reply {
        status,
        headers,
        body,
    })
}

/// The address record [`resolve`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// IPv4 (type 1).
    A,
    /// IPv6 (type 28).
    Aaaa,
}

/// Ask the DNS server at `server` (one UDP query, recursion desired) for `name`'s `record`s.
/// An error response code is an error; no records is an empty list.
pub fn resolve(server: SocketAddr, name: &str, record: Record) -> std::io::Result<Vec<IpAddr>> {
    let qtype: u16 = match record {
        Record::A => 1,
        Record::Aaaa => 28,
    };
    let id = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ std::process::id()) as u16;
    let mut query = id.to_be_bytes().to_vec();
    // Flags (RD), one question, no other records.
    query.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        let len = u8::try_from(label.len())
            .ok()
            .filter(|l| (1..64).contains(l))
            .ok_or_else(|| std::io::Error::other(format!("bad DNS name {name:?}")))?;
        query.push(len);
        query.extend_from_slice(label.as_bytes());
    }
    query.push(0);
    query.extend_from_slice(&qtype.to_be_bytes());
    query.extend_from_slice(&1u16.to_be_bytes()); // class IN
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::LOCALHOST, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::LOCALHOST, 0).into(),
    };
    let socket = UdpSocket::bind(local)?;
    socket.set_read_timeout(Some(IO_TIMEOUT))?;
    socket.connect(server)?;
    socket.send(&query)?;
    let mut buf = [0u8; 4096];
    let len = socket.recv(&mut buf)?;
    parse_answer(&buf[..len], id, qtype)
}

fn parse_answer(msg: &[u8], id: u16, qtype: u16) -> std::io::Result<Vec<IpAddr>> {
    let malformed = || std::io::Error::other("malformed DNS answer");
    let u16_at = |at: usize| {
        msg.get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(malformed)
    };
    if u16_at(0)? != id {
        return Err(std::io::Error::other("DNS answer to another query"));
    }
    let rcode = u16_at(2)? & 0x000f;
    if rcode != 0 {
        return Err(std::io::Error::other(format!("DNS response code {rcode}")));
    }
    let mut at = 12;
    for _ in 0..u16_at(4)? {
        at = skip_name(msg, at).ok_or_else(malformed)? + 4; // type, class
    }
    let mut addrs = Vec::new();
    for _ in 0..u16_at(6)? {
        at = skip_name(msg, at).ok_or_else(malformed)?;
        // Type, class, TTL, data length, data.
        let (rtype, len) = (u16_at(at)?, usize::from(u16_at(at + 8)?));
        let data = msg.get(at + 10..at + 10 + len).ok_or_else(malformed)?;
        at += 10 + len;
        if rtype != qtype {
            continue;
        }
        if let Ok(v4) = <[u8; 4]>::try_from(data) {
            addrs.push(IpAddr::from(v4));
        } else if let Ok(v6) = <[u8; 16]>::try_from(data) {
            addrs.push(IpAddr::from(v6));
        }
    }
    Ok(addrs)
}

// The offset after the (possibly compressed) name at `at`.
fn skip_name(msg: &[u8], mut at: usize) -> Option<usize> {
    loop {
        match *msg.get(at)? {
            0 => return Some(at + 1),
            len if len & 0xc0 == 0xc0 => return Some(at + 2),
            len => at += 1 + usize::from(len),
        }
    }
}
