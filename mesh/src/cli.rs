//! The command line.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use ratls::{AppId, PeerRole};

use crate::logging::LogFormat;

/// Exit status for a certificate that was read but refused.
pub const EXIT_REJECTED: u8 = 1;
/// Exit status for input that could not be read or parsed (sysexits EX_DATAERR).
pub const EXIT_BAD_INPUT: u8 = 65;
/// Exit status for an input file that cannot be opened (sysexits EX_NOINPUT).
pub const EXIT_NO_INPUT: u8 = 66;
/// Exit status for an invalid configuration (sysexits EX_USAGE, as the house style says).
pub const EXIT_CONFIG: u8 = 64;
/// Exit status for a command line that cannot be used (as clap's own usage errors).
pub const EXIT_USAGE: u8 = 2;
/// Exit status when a service the command needs is unavailable (sysexits EX_UNAVAILABLE).
pub const EXIT_UNAVAILABLE: u8 = 69;

/// dstack-mesh: attested identity, an attested service mesh and public HTTPS for dstack apps.
///
/// `dstack-mesh --config FILE` with no subcommand is dstack-vpc's command line: the sidecar runs
/// with dstack-vpc's defaults (see `run`).
#[derive(Debug, Parser)]
#[command(name = "dstack-mesh", version, about, arg_required_else_help = true)]
pub struct Cli {
    /// Log format (logs go to stderr).
    #[arg(long, value_enum, default_value_t = LogFormat::Auto, global = true)]
    pub log_format: LogFormat,
    /// dstack-vpc's form: run with this file and dstack-vpc's defaults (no inbound listener
    /// unless `[inbound]` is set, any app under the KMS root unless an allowlist is set).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the sidecar: identity from the guest agent, the inbound listener, the auth service.
    Run {
        /// Configuration file (default: $DSTACK_MESH_CONFIG, else built-in defaults).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Ask the running sidecar's admin listener whether it is healthy (the container's
    /// HEALTHCHECK: the image has no curl). Exit 0 when it answers 200.
    Health {
        /// The sidecar's admin address [default: DSTACK_MESH_ADMIN, else the port of
        /// DSTACK_MESH_ADMIN_LISTEN on loopback, else 127.0.0.1:8090].
        #[arg(long)]
        admin: Option<String>,
        /// Ask `/ready` (identity fresh, certificates served) instead of `/health` (serving).
        #[arg(long)]
        ready: bool,
    },
    /// Validate the configuration and print the effective settings.
    CheckConfig {
        /// Configuration file (default: $DSTACK_MESH_CONFIG, else built-in defaults).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Print an nginx configuration equivalent to dstack-vpc's, for deployments that keep nginx.
    NginxConfig {
        /// `server`: mTLS on 443 with auth_request to this sidecar; `client`: port 80 to the
        /// outbound proxy.
        #[arg(value_enum)]
        kind: NginxKind,
        /// The app behind nginx (default: inbound.backend / MESH_BACKEND).
        #[arg(long)]
        backend: Option<String>,
        /// nginx `server_name` (default: $DSTACK_MESH_SERVER_NAME, else `_`).
        #[arg(long)]
        server_name: Option<String>,
        /// Port nginx listens on (default: 443 for server, 80 for client).
        #[arg(long)]
        port: Option<u16>,
        /// Configuration file for the other settings (certificate paths, auth address).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Run the local demo mesh: three apps with development agents, their sidecars and a
    /// gateway stand-in, all on loopback; one call allowed, one refused.
    Demo {
        /// Keep the demo's CA and sockets here (default: a temporary directory).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Public-domain certificates of the running sidecar (through its admin listener).
    Certs {
        /// The sidecar's admin address [default: DSTACK_MESH_ADMIN, else 127.0.0.1:8090].
        #[arg(long, global = true)]
        admin: Option<String>,
        #[command(subcommand)]
        action: CertsAction,
    },
    /// What the running sidecar serves: identity, mesh route, domains (the status page, as text).
    Status {
        /// The sidecar's admin address [default: DSTACK_MESH_ADMIN, else 127.0.0.1:8090].
        #[arg(long)]
        admin: Option<String>,
        /// Print `/routes` as JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// Attestation evidence of public-domain certificates.
    Evidence {
        #[command(subcommand)]
        action: EvidenceAction,
    },
    /// Fetch this CVM's identity from the guest agent and print who it is.
    Identity {
        /// Guest agent address (unix:/path or http://host:port); default: DSTACK_AGENT_ADDRESS,
        /// then /var/run/dstack.sock, then /var/run/tappd.sock.
        #[arg(long)]
        agent: Option<String>,
    },
    /// Serve the guest-agent API from a local CA (development only: NOT attested).
    DevAgent {
        /// Unix socket to listen on.
        #[arg(long)]
        socket: PathBuf,
        /// App id to issue certificates for (hex); default: a fixed development id.
        #[arg(long)]
        app_id: Option<AppId>,
        /// Instance id (hex); default: derived from the app id and the state directory.
        #[arg(long)]
        instance_id: Option<String>,
        /// App name reported by Info.
        #[arg(long, default_value = "dev-app")]
        app_name: String,
        /// Directory of the shared root CA; agents sharing it form one mesh.
        #[arg(long, default_value = ".dstack-mesh-dev")]
        state_dir: PathBuf,
        /// Answer GetTlsKey with this recorded response (JSON) instead of minting: real
        /// evidence, such as a simulator certificate whose quote a mock PCK chain signed.
        #[arg(long)]
        tls_key_response: Option<PathBuf>,
    },
    /// The DNS side of public domains.
    Dns {
        #[command(subcommand)]
        action: DnsAction,
    },
    /// Print the RA-TLS view of a certificate or chain (PEM or DER, leaf first) as JSON.
    InspectCert {
        /// File to read, or `-` for stdin.
        file: PathBuf,
    },
    /// Verify a certificate chain against a root with the mesh policy.
    VerifyCert {
        /// The chain (PEM, leaf first) or a single leaf.
        file: PathBuf,
        /// Trust anchor(s): PEM file with one or more root certificates.
        #[arg(long)]
        ca: PathBuf,
        /// Require this app id.
        #[arg(long)]
        expect_app_id: Option<AppId>,
        /// The role the certificate is checked for.
        #[arg(long, value_enum, default_value_t = RoleArg::Server)]
        role: RoleArg,
        /// Require an attestation bound to the leaf key.
        #[arg(long)]
        require_attestation: bool,
        /// Hold the verified quote to this attestation policy: a configuration's
        /// `[attestation]` table, or its keys alone (default: an up-to-date TCB).
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Verify the TDX quote too, with the PCCS answers in this directory (`tcb.json`,
        /// `qe_identity.json`, `pckcrl.der`, `rootcacrl.hex`, each with `<file>.headers`; or
        /// one such directory per platform).
        #[arg(long, conflicts_with = "pccs")]
        collateral: Option<PathBuf>,
        /// Verify the TDX quote too, with collateral fetched now from this PCCS (v4 API) for
        /// the quote's platform.
        #[arg(long)]
        pccs: Option<String>,
        /// The TDX root CA (PEM) quotes chain to; default: the policy's, else Intel's.
        #[arg(long)]
        tdx_root: Option<PathBuf>,
        /// Verify as of this time (RFC 3339) instead of now.
        #[arg(long)]
        at: Option<String>,
    },
}

/// `certs` actions.
#[derive(Debug, Subcommand)]
pub enum CertsAction {
    /// Domain, status, issuer, expiry, days left and last error of every domain.
    List {
        /// Print the JSON the admin endpoint returns.
        #[arg(long)]
        json: bool,
    },
    /// Order a new certificate for DOMAIN now.
    Renew {
        /// The domain (primary name or alias).
        domain: String,
    },
    /// Have the CA revoke DOMAIN's certificate: it stops being served at once, its files are
    /// moved aside, a new one is ordered (unless the domain is no longer configured) and the
    /// evidence is rewritten.
    Revoke {
        /// The domain (primary name or alias, or a removed domain with a stored certificate).
        domain: String,
        /// unspecified, keyCompromise, affiliationChanged, superseded or cessationOfOperation.
        #[arg(long, default_value = "unspecified")]
        reason: crate::acme::revoke::Reason,
    },
}

/// `dns` actions.
#[derive(Debug, Subcommand)]
pub enum DnsAction {
    /// Prove the DNS provider's credential can present a DNS-01 challenge for each public
    /// domain (or DOMAIN), that the resolvers see it, and that it can remove it: exit 0, or 1
    /// naming the step and the provider's words.
    Check {
        /// One configured domain (default: every one).
        domain: Option<String>,
        /// Configuration file (default: $DSTACK_MESH_CONFIG, else built-in defaults).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Then run a whole DNS-01 order per domain against a staging CA, with an account of
        /// its own (the production account and certificates are not touched).
        #[arg(long)]
        dry_run: bool,
        /// The staging CA's directory.
        #[arg(long, requires = "dry_run", default_value = crate::config::domains::LETSENCRYPT_STAGING)]
        directory: String,
        /// Roots (PEM) for the staging CA's HTTPS, beside the public ones.
        #[arg(long, requires = "dry_run")]
        ca_roots: Option<PathBuf>,
    },
}

/// `evidence` actions.
#[derive(Debug, Subcommand)]
pub enum EvidenceAction {
    /// Check an evidence directory or `https://<domain>/evidences/`: every file against
    /// `sha256sum.txt`, the quote's report data against `sha256sum.txt`, and with collateral
    /// the quote itself (signature, TCB status, event log, the policy's measurements).
    Verify {
        /// A directory, or the URL of an `/evidences/` listing.
        source: String,
        /// Extra root (PEM) trusted for the URL's HTTPS, beside the public ones.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Dial this address for the URL's host instead of resolving it (as curl's --resolve).
        #[arg(long)]
        connect_to: Option<std::net::SocketAddr>,
        /// Hold the quote to this attestation policy (see `verify-cert --policy`).
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Verify the quote's signature and TCB status with the PCCS answers in this directory.
        #[arg(long, conflicts_with = "pccs")]
        collateral: Option<PathBuf>,
        /// Verify the quote with collateral fetched now from this PCCS (v4 API).
        #[arg(long)]
        pccs: Option<String>,
        /// The TDX root CA (PEM) quotes chain to; default: the policy's, else Intel's.
        #[arg(long)]
        tdx_root: Option<PathBuf>,
        /// Verify as of this time (RFC 3339) instead of now.
        #[arg(long)]
        at: Option<String>,
    },
}

/// `nginx-config` kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum NginxKind {
    /// The mTLS server proxy in front of the app.
    Server,
    /// The plain-HTTP client proxy in front of the outbound proxy.
    Client,
}

/// `--role` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RoleArg {
    /// A server we dial (EKU serverAuth).
    Server,
    /// A client that dials us (EKU clientAuth).
    Client,
}

impl From<RoleArg> for PeerRole {
    fn from(r: RoleArg) -> Self {
        match r {
            RoleArg::Server => PeerRole::Server,
            RoleArg::Client => PeerRole::Client,
        }
    }
}

/// Run a parsed command line.
pub async fn run(cli: Cli) -> ExitCode {
    let command = match (cli.command, cli.config) {
        (None, config) => return crate::run::run_as_dstack_vpc(config).await,
        (Some(_), Some(_)) => {
            eprintln!("error: --config before a subcommand is dstack-vpc's form, which takes no subcommand; put it after the subcommand (`dstack-mesh run --config FILE`)");
            return ExitCode::from(EXIT_USAGE);
        }
        (Some(command), None) => command,
    };
    match command {
        Command::Run { config } => crate::run::run(config).await,
        Command::Health { admin, ready } => {
            crate::status::health(&admin_address(admin), ready).await
        }
        Command::CheckConfig { config } => crate::run::check_config(config),
        Command::NginxConfig {
            kind,
            backend,
            server_name,
            port,
            config,
        } => crate::run::nginx_config(kind, backend, server_name, port, config),
        Command::Demo { state_dir } => crate::demo::run(state_dir).await,
        Command::Certs { admin, action } => {
            crate::status::certs(&admin_address(admin), action).await
        }
        Command::Status { admin, json } => crate::status::status(&admin_address(admin), json).await,
        Command::Evidence {
            action:
                EvidenceAction::Verify {
                    source,
                    ca,
                    connect_to,
                    policy,
                    collateral,
                    pccs,
                    tdx_root,
                    at,
                },
        } => {
            let quote = crate::tools::QuoteSources {
                policy,
                collateral,
                pccs,
                tdx_root,
            };
            crate::tools::evidence_verify(&source, ca.as_deref(), connect_to, quote, at).await
        }
        Command::Identity { agent } => crate::tools::identity(agent).await,
        Command::DevAgent {
            socket,
            app_id,
            instance_id,
            app_name,
            state_dir,
            tls_key_response,
        } => {
            crate::tools::dev_agent(
                socket,
                app_id,
                instance_id,
                app_name,
                state_dir,
                tls_key_response,
            )
            .await
        }
        Command::Dns {
            action:
                DnsAction::Check {
                    domain,
                    config,
                    dry_run,
                    directory,
                    ca_roots,
                },
        } => {
            let dry = dry_run.then_some(crate::tools::DryRun {
                directory,
                ca_roots,
            });
            crate::tools::dns_check(config, domain, dry).await
        }
        Command::InspectCert { file } => crate::tools::inspect_cert(&file),
        Command::VerifyCert {
            file,
            ca,
            expect_app_id,
            role,
            require_attestation,
            policy,
            collateral,
            pccs,
            tdx_root,
            at,
        } => {
            crate::tools::verify_cert(crate::tools::VerifyCert {
                file,
                ca,
                expect: expect_app_id,
                role: role.into(),
                require_attestation,
                quote: crate::tools::QuoteSources {
                    policy,
                    collateral,
                    pccs,
                    tdx_root,
                },
                at,
            })
            .await
        }
    }
}

/// The admin listener a client command talks to: the flag, else `DSTACK_MESH_ADMIN`, else
/// where the sidecar in this environment listens (`DSTACK_MESH_ADMIN_LISTEN`, an unspecified
/// address read as loopback: in a container the HEALTHCHECK shares the sidecar's environment),
/// else the default admin address.
fn admin_address(flag: Option<String>) -> String {
    use crate::config::{self, source};
    let env = |keys| source::first(&config::Env, keys).map(|(_, v)| v);
    flag.or_else(|| env(config::env::ADMIN))
        .or_else(|| {
            let listen: std::net::SocketAddr = env(config::env::ADMIN_LISTEN)?.parse().ok()?;
            let ip = match listen.ip() {
                ip if ip.is_unspecified() && ip.is_ipv4() => std::net::Ipv4Addr::LOCALHOST.into(),
                ip if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
                ip => ip,
            };
            Some(std::net::SocketAddr::new(ip, listen.port()).to_string())
        })
        .unwrap_or_else(|| config::DEFAULT_ADMIN_LISTEN.to_owned())
}
