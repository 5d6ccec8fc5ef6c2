//! One-shot commands: inspect and verify certificates, print the identity, run a dev agent.

use std::{
    io::Read,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

use ratls::{
    agent::{AgentAddress, AgentClient, DEFAULT_TIMEOUT},
    cert,
    dev_agent::{self, DevAgent, DevAgentConfig},
    identity::{Identity, IdentityConfig, RotatingIdentity},
    quote, AppId, ChainView, PeerRole, Policy, TrustAnchors,
};
use rustls_pki_types::UnixTime;

use crate::cli::{EXIT_BAD_INPUT, EXIT_NO_INPUT, EXIT_REJECTED, EXIT_UNAVAILABLE};

/// A command's input could not be had: the exit status and the one-line message.
struct InputError(u8, String);

fn read_input(file: &Path) -> Result<Vec<u8>, InputError> {
    if file.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .map_err(|e| InputError(EXIT_NO_INPUT, format!("stdin: {e}")))?;
        return Ok(buf);
    }
    std::fs::read(file).map_err(|e| InputError(EXIT_NO_INPUT, format!("{}: {e}", file.display())))
}

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(code)
}

/// `inspect-cert FILE|-`: the RA-TLS view as JSON.
pub fn inspect_cert(file: &Path) -> ExitCode {
    let bytes = match read_input(file) {
        Ok(b) => b,
        Err(InputError(code, e)) => return fail(code, e),
    };
    let view = match ChainView::from_bytes(&bytes) {
        Ok(v) => v,
        Err(e) => return fail(EXIT_BAD_INPUT, format_args!("{}: {e}", file.display())),
    };
    match serde_json::to_string_pretty(&view) {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(EXIT_BAD_INPUT, e),
    }
}

/// What `verify-cert` checks.
#[derive(Debug)]
pub struct VerifyCert {
    /// The chain, leaf first.
    pub file: PathBuf,
    /// Its trust anchors.
    pub ca: PathBuf,
    /// The app id it must carry.
    pub expect: Option<AppId>,
    /// The role it is checked for.
    pub role: PeerRole,
    /// Require an attestation bound to the leaf key.
    pub require_attestation: bool,
    /// How the leaf's quote is checked.
    pub quote: QuoteSources,
    /// The time of the check (RFC 3339; default: now).
    pub at: Option<String>,
}

/// What a one-shot command verifies a TDX quote with.
#[derive(Debug, Default)]
pub struct QuoteSources {
    /// The attestation policy (an `[attestation]` table); default: an up-to-date TCB.
    pub policy: Option<PathBuf>,
    /// The PCCS answers in this directory.
    pub collateral: Option<PathBuf>,
    /// Collateral fetched now from this PCCS.
    pub pccs: Option<String>,
    /// The TDX root (default: the policy's, else Intel's).
    pub tdx_root: Option<PathBuf>,
}

/// `verify-cert FILE --ca FILE [--policy FILE] [--collateral DIR | --pccs URL]`: exit 0 with
/// the verified identity (and, with collateral, what the quote and its event log prove, held
/// to the policy: the sidecar's own check), or non-zero with the failed rule.
pub async fn verify_cert(args: VerifyCert) -> ExitCode {
    let bad = |path: &Path, e: &dyn std::fmt::Display| {
        InputError(EXIT_BAD_INPUT, format!("{}: {e}", path.display()))
    };
    let load = |path: &Path| {
        read_input(path).and_then(|b| cert::parse_chain(&b).map_err(|e| bad(path, &e)))
    };
    let chain = match load(&args.file) {
        Ok(c) => c,
        Err(InputError(code, e)) => return fail(code, e),
    };
    let roots =
        match load(&args.ca).and_then(|r| TrustAnchors::new(&r).map_err(|e| bad(&args.ca, &e))) {
            Ok(r) => r,
            Err(InputError(code, e)) => return fail(code, e),
        };
    let at = match args.at.as_deref().map(parse_time).transpose() {
        Ok(at) => at.unwrap_or_else(crate::clock::unix_now),
        Err(e) => return fail(EXIT_BAD_INPUT, format!("--at: {e}")),
    };
    let leaf_attestation = || {
        cert::attestation_of(&chain[0])
            .map_err(|e| quote::QuoteError::Malformed(e.to_string()))?
            .ok_or_else(|| {
                quote::QuoteError::Malformed("the certificate carries no attestation".into())
            })
    };
    let attestor = match quote_checker(&args.quote, leaf_attestation).await {
        Ok(a) => a,
        Err(Unchecked::Input(InputError(code, e))) => return fail(code, e),
        Err(Unchecked::Collateral(e)) => {
            eprintln!("rejected ({}): {e}", e.reason());
            return ExitCode::from(EXIT_REJECTED);
        }
    };
    let now = UnixTime::since_unix_epoch(Duration::from_secs(at.max(0) as u64));
    let mut policy = Policy::new(roots)
        .require_attestation(args.require_attestation)
        .attested(attestor.clone());
    if let Some(id) = args.expect {
        policy = policy.expect(id);
    }
    let peer = match policy.verify(&chain[0], &chain[1..], args.role, now) {
        Ok(peer) => peer,
        Err(r) => {
            eprintln!("rejected ({}): {r}", r.reason());
            return ExitCode::from(EXIT_REJECTED);
        }
    };
    let out = match attestor {
        Some(_) => serde_json::json!({ "peer": peer, "quote": peer.quote.as_deref() }),
        None => {
            if args.require_attestation {
                // What --require-attestation can promise without collateral, and no more.
                eprintln!("attestation: {}: its signature and TCB status are not checked (give --collateral or --pccs), so this shows what the certificate claims, not that a TEE produced it", peer.attestation);
            }
            serde_json::json!(peer)
        }
    };
    println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    ExitCode::SUCCESS
}

/// Why `verify-cert` could not set up the quote check.
enum Unchecked {
    /// A flag or file is unusable.
    Input(InputError),
    /// No collateral to verify the quote with: the certificate is refused for it.
    Collateral(quote::QuoteError),
}

/// The attestor a one-shot command holds a quote to: the policy's rules (or the default: an
/// up-to-date TCB), its TDX root, and collateral from the directory or the PCCS (for the
/// platform of the quote `attestation` gives); `None` when no collateral is named (the quote
/// is then not checked).
async fn quote_checker(
    args: &QuoteSources,
    attestation: impl FnOnce() -> Result<ratls::attestation::Attestation, quote::QuoteError>,
) -> Result<Option<Arc<ratls::attested::Attestor>>, Unchecked> {
    let input = |code: u8, e: String| Unchecked::Input(InputError(code, e));
    let policy = match &args.policy {
        None => None,
        Some(path) => {
            let text = read_input(path).map_err(Unchecked::Input)?;
            let text = String::from_utf8_lossy(&text);
            let policy = crate::config::attestation::policy_file(&text)
                .map_err(|e| input(EXIT_BAD_INPUT, format!("{}: {e}", path.display())))?;
            Some(policy)
        }
    };
    // The flags first, then what the policy names.
    let dir = args.collateral.clone().or_else(|| {
        policy
            .as_ref()
            .map(|p| p.collateral_dir.clone())
            .filter(|d| !d.as_os_str().is_empty())
    });
    let pccs = args.pccs.clone().or_else(|| {
        policy
            .as_ref()
            .and_then(|p| p.pccs.as_ref())
            .map(|p| p.url.clone())
    });
    let tdx_root = args
        .tdx_root
        .clone()
        .or_else(|| policy.as_ref().and_then(|p| p.tdx_root.clone()));
    if dir.is_none() && pccs.is_none() {
        return match policy {
            Some(_) => Err(input(
                EXIT_BAD_INPUT,
                "--policy needs collateral to verify quotes with: --collateral DIR or --pccs URL (or collateral_dir / pccs_url in the policy)".into(),
            )),
            None => Ok(None),
        };
    }
    let root = match &tdx_root {
        None => quote::TdxRoot::intel(),
        Some(path) => {
            let pem = read_input(path).map_err(Unchecked::Input)?;
            quote::TdxRoot::from_pem(&pem)
                .map_err(|e| input(EXIT_BAD_INPUT, format!("{}: {e}", path.display())))?
        }
    };
    let rules = policy.map(|p| p.rules).unwrap_or_default();
    let attestor = Arc::new(ratls::attested::Attestor::new(rules, root));
    match (dir, pccs) {
        (Some(dir), _) => {
            let set = quote::CollateralSet::from_dir(&dir).map_err(Unchecked::Collateral)?;
            attestor.replace_collateral(set);
        }
        (None, Some(url)) => {
            // The platform whose collateral to fetch is the quote's own.
            let attestation = attestation().map_err(Unchecked::Collateral)?;
            let fmspc = quote::fmspc_of(&attestation.quote).map_err(Unchecked::Collateral)?;
            let pccs = crate::pccs::Pccs::new(&url)
                .map_err(|e| input(EXIT_UNAVAILABLE, format!("--pccs {url}: {e}")))?;
            let responses = pccs
                .fetch(&fmspc)
                .await
                .map_err(|e| Unchecked::Collateral(quote::QuoteError::Collateral(e.to_string())))?;
            let collateral =
                quote::Collateral::from_pccs(&responses).map_err(Unchecked::Collateral)?;
            attestor.set_collateral(collateral);
        }
        (None, None) => {}
    }
    Ok(Some(attestor))
}

/// An RFC 3339 time as unix seconds.
fn parse_time(text: &str) -> Result<i64, String> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|e| format!("{text:?} is not an RFC 3339 time: {e}"))
}

/// `identity`: discover the agent, fetch an identity, print it.
pub async fn identity(agent: Option<String>) -> ExitCode {
    let env = crate::config::source::first(&crate::config::Env, crate::config::env::AGENT)
        .map(|(_, v)| v);
    let candidates = match AgentAddress::candidates(agent.as_deref(), env.as_deref()) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_BAD_INPUT, e),
    };
    let (client, info) = match AgentClient::discover(candidates, DEFAULT_TIMEOUT).await {
        Ok(found) => found,
        Err(e) => return fail(EXIT_UNAVAILABLE, e),
    };
    match RotatingIdentity::start(client, info, IdentityConfig::default()).await {
        Ok(id) => {
            print!("{}", describe(&id.current()));
            ExitCode::SUCCESS
        }
        Err(e) => fail(EXIT_UNAVAILABLE, e),
    }
}

/// `dev-agent`: serve until interrupted.
pub async fn dev_agent(
    socket: PathBuf,
    app_id: Option<AppId>,
    instance_id: Option<String>,
    app_name: String,
    state_dir: PathBuf,
    tls_key_response: Option<PathBuf>,
) -> ExitCode {
    let recorded = match tls_key_response.as_deref().map(|path| {
        read_input(path).and_then(|b| {
            serde_json::from_slice::<ratls::agent::TlsKeyResponse>(&b)
                .map_err(|e| InputError(EXIT_BAD_INPUT, format!("{}: {e}", path.display())))
        })
    }) {
        None => None,
        Some(Ok(r)) => Some(r),
        Some(Err(InputError(code, e))) => return fail(code, e),
    };
    let config = DevAgentConfig {
        app_id: app_id.unwrap_or_else(dev_agent::default_app_id),
        instance_id,
        app_name,
        state_dir,
    };
    let agent = match DevAgent::new(config) {
        Ok(a) => Arc::new(match recorded {
            Some(r) => a.with_recorded_tls_key(r),
            None => a,
        }),
        Err(e) => return fail(EXIT_UNAVAILABLE, e),
    };
    eprintln!("WARNING: {}", dev_agent::NOT_ATTESTED);
    let app_id = agent.app_id().clone();
    let task = match agent.spawn(&socket) {
        Ok(t) => t,
        Err(e) => return fail(EXIT_UNAVAILABLE, e),
    };
    tracing::info!(socket = %socket.display(), %app_id, "dev-agent listening");
    crate::demo::wait_for_shutdown().await;
    task.abort();
    let _ = std::fs::remove_file(&socket);
    ExitCode::SUCCESS
}

/// A human summary of an identity.
pub fn describe(id: &Identity) -> String {
    let view = ChainView::new(&id.chain).ok();
    let chain = view
        .as_ref()
        .map(|v| {
            v.chain
                .iter()
                .map(|c| c.subject.clone())
                .collect::<Vec<_>>()
                .join("  <-  ")
        })
        .unwrap_or_default();
    let lifetime = Duration::from_secs((id.not_after - id.not_before).max(0) as u64);
    let attestation = match id.attestation {
        ratls::AttestationStatus::KeyBound | ratls::AttestationStatus::QuoteVerified => {
            id.attestation.describe()
        }
        ratls::AttestationStatus::Absent => "NO (no attestation bound to the key)",
    };
    format!(
        "app id        {}\ninstance id   {}\napp name      {}\nvalid         {} -> {} ({}h)\nfingerprint   {}\nchain         {}\nattestation   {}\n",
        id.app_id,
        id.instance_id.as_deref().unwrap_or("-"),
        if id.app_name.is_empty() { "-" } else { &id.app_name },
        crate::clock::rfc3339(id.not_before),
        crate::clock::rfc3339(id.not_after),
        lifetime.as_secs() / 3600,
        id.fingerprint,
        chain,
        attestation,
    )
}

/// `dstack-mesh evidence verify`: print each finding; exit 0 when nothing failed, 1 when a
/// check failed, 69 when the evidence could not be fetched at all.
pub async fn evidence_verify(
    source: &str,
    ca: Option<&Path>,
    connect_to: Option<std::net::SocketAddr>,
    quote: QuoteSources,
    at: Option<String>,
) -> ExitCode {
    use crate::acme::evidence::{self, Finding};
    let files = match source.starts_with("https://") || source.starts_with("http://") {
        true => match fetch_evidence(source, ca, connect_to).await {
            Ok(files) => files,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_UNAVAILABLE);
            }
        },
        false => {
            let dir = Path::new(source);
            let mut files = std::collections::BTreeMap::new();
            let sums = std::fs::read(dir.join(evidence::SUMS)).unwrap_or_default();
            let mut names: Vec<String> = evidence::parse_sums(&String::from_utf8_lossy(&sums))
                .into_iter()
                .map(|(_, n)| n)
                .collect();
            names.extend([evidence::SUMS.to_owned(), evidence::QUOTE.to_owned()]);
            for name in names {
                let read = std::fs::read(dir.join(&name)).map_err(|e| e.to_string());
                files.insert(name, read);
            }
            files
        }
    };
    let now = match at.as_deref().map(parse_time).transpose() {
        Ok(at) => at.unwrap_or_else(crate::clock::unix_now),
        Err(e) => return fail(EXIT_BAD_INPUT, format!("--at: {e}")),
    };
    // The quote's platform (for --pccs) is read from quote.json as fetched.
    let fetched_quote = || {
        let bytes = files
            .get(evidence::QUOTE)
            .and_then(|r| r.as_ref().ok())
            .ok_or_else(|| quote::QuoteError::Malformed(format!("no {}", evidence::QUOTE)))?;
        let q: ratls::agent::QuoteResponse = serde_json::from_slice(bytes)
            .map_err(|e| quote::QuoteError::Malformed(e.to_string()))?;
        ratls::attestation::Attestation::from_get_quote(&q.quote, &q.event_log)
            .map_err(|e| quote::QuoteError::Malformed(e.to_string()))
    };
    let attestor = match quote_checker(&quote, fetched_quote).await {
        Ok(a) => a,
        Err(Unchecked::Input(InputError(code, e))) => return fail(code, e),
        Err(Unchecked::Collateral(e)) => {
            println!(
                "FAILED       {}: refused ({}): {e}",
                evidence::QUOTE,
                e.reason()
            );
            return ExitCode::from(EXIT_REJECTED);
        }
    };
    let findings = evidence::verify(
        &mut |name| {
            files
                .get(name)
                .cloned()
                .unwrap_or_else(|| Err("missing".into()))
        },
        attestor.as_deref().map(|a| (a, now)),
    );
    let mut failed = false;
    for finding in &findings {
        match finding {
            Finding::Ok(m) => println!("ok           {m}"),
            Finding::Failed(m) => {
                failed = true;
                println!("FAILED       {m}");
            }
            Finding::NotChecked(m) => println!("not checked  {m}"),
        }
    }
    match failed {
        true => ExitCode::from(EXIT_REJECTED),
        false => ExitCode::SUCCESS,
    }
}

type Fetched = std::collections::BTreeMap<String, Result<Vec<u8>, String>>;

/// GET `sha256sum.txt`, the quote and every listed file under `url`.
async fn fetch_evidence(
    url: &str,
    ca: Option<&Path>,
    connect_to: Option<std::net::SocketAddr>,
) -> Result<Fetched, String> {
    use http_body_util::BodyExt;
    let extra = ca
        .map(crate::https::roots_file)
        .transpose()
        .map_err(|e| e.to_string())?;
    let tls = crate::https::client_config(extra.as_deref().unwrap_or_default())
        .map_err(|e| e.to_string())?;
    // The name stays the URL's (SNI, certificate check); only where to dial may be overridden.
    let resolve = tower::service_fn(
        move |name: hyper_util::client::legacy::connect::dns::Name| async move {
            match connect_to {
                Some(addr) => Ok::<_, std::io::Error>(vec![addr].into_iter()),
                None => tokio::net::lookup_host((name.as_str(), 0))
                    .await
                    .map(|addrs| addrs.collect::<Vec<_>>().into_iter()),
            }
        },
    );
    let mut dial = hyper_util::client::legacy::connect::HttpConnector::new_with_resolver(resolve);
    dial.enforce_http(false);
    dial.set_connect_timeout(Some(Duration::from_secs(10)));
    let https = crate::https::connector(tls, dial);
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https);
    let base = format!("{}/", url.trim_end_matches('/'));
    let get = |name: String| {
        let client = client.clone();
        let target = format!("{base}{name}");
        async move {
            let fetch = async {
                let uri: http::Uri = target.parse().map_err(|e| format!("{target}: {e}"))?;
                let resp = client
                    .get(uri)
                    .await
                    .map_err(|e| format!("{target}: {}", crate::error_chain(&e)))?;
                let status = resp.status();
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?
                    .to_bytes();
                match status.is_success() {
                    true => Ok(body.to_vec()),
                    false => Err(format!("{target}: {status}")),
                }
            };
            tokio::time::timeout(Duration::from_secs(30), fetch)
                .await
                .unwrap_or_else(|_| Err(format!("{target}: no answer within 30 s")))
        }
    };
    use crate::acme::evidence::{parse_sums, QUOTE, SUMS};
    let sums = get(SUMS.to_owned()).await?;
    let mut files = Fetched::new();
    for (_, name) in parse_sums(&String::from_utf8_lossy(&sums)) {
        let got = get(name.clone()).await;
        files.insert(name, got);
    }
    files.insert(QUOTE.to_owned(), get(QUOTE.to_owned()).await);
    files.insert(SUMS.to_owned(), Ok(sums));
    Ok(files)
}

/// `dns check [DOMAIN]`: prove, for each public domain (or the one named), that the DNS
/// provider's credential can present a DNS-01 challenge in the right zone, that the resolvers
/// then see it, and that the credential can remove it again: an operator's "test
/// connectivity" of a DNS token, before an order depends on it.
pub async fn dns_check(
    flag: Option<PathBuf>,
    only: Option<String>,
    dry_run: Option<DryRun>,
) -> ExitCode {
    use crate::acme::dns01::Dns;
    let config = match crate::run::load(flag) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if config.public.dns.provider.is_none() {
        return fail(EXIT_BAD_INPUT, "no DNS provider is configured (DNS_PROVIDER and its credential): nothing to check (with DNS_SETUP_MODE the records the operator makes are listed, with what the resolvers see, on /certs)");
    }
    let dns = match Dns::new(&config.public.dns) {
        Ok(d) => d,
        Err(e) => return fail(EXIT_BAD_INPUT, format!("DNS provider: {e}")),
    };
    let domains: Vec<_> = config
        .public
        .domains
        .iter()
        .filter(|d| only.as_ref().is_none_or(|o| d.names.iter().any(|n| n == o)))
        .collect();
    if domains.is_empty() {
        return fail(
            EXIT_BAD_INPUT,
            match &only {
                Some(o) => format!("{o} is not a configured public domain"),
                None => "no public domains are configured".to_owned(),
            },
        );
    }
    let mut failed = false;
    for d in &domains {
        let name = d.primary();
        // A value no CA will ever ask for: the check cannot validate an order by accident.
        let value = crate::base64url::encode(&random_bytes());
        let started = std::time::Instant::now();
        let ms = |t: std::time::Instant| t.elapsed().as_millis();
        let placed = match dns.place_challenge(name, &value).await {
            Ok(p) => {
                println!(
                    "ok      {name}: presented {} ({} ms)",
                    p.record(),
                    ms(started)
                );
                p
            }
            Err(e) => {
                println!("FAILED  {name}: present the challenge: {e}");
                failed = true;
                continue;
            }
        };
        let seen = std::time::Instant::now();
        match dns.wait_visible(std::slice::from_ref(&placed)).await {
            Ok(()) => println!("ok      {name}: every resolver sees it ({} ms)", ms(seen)),
            Err(e) => {
                println!("FAILED  {name}: {e}");
                failed = true;
            }
        }
        match dns.take_back(&placed).await {
            Ok(()) => println!("ok      {name}: removed"),
            Err(e) => {
                println!("FAILED  {name}: remove {}: {e}", placed.record());
                failed = true;
            }
        }
    }
    if let (false, Some(dry)) = (failed, dry_run) {
        failed = !staging_orders(&config, &dns, &domains, dry).await;
    }
    match failed {
        true => ExitCode::from(EXIT_REJECTED),
        false => ExitCode::SUCCESS,
    }
}

/// `dns check --dry-run`: where the staging order goes.
#[derive(Debug)]
pub struct DryRun {
    /// The staging CA's directory (default: Let's Encrypt's staging).
    pub directory: String,
    /// Roots for the CA's HTTPS beside the public ones (a private or test CA).
    pub ca_roots: Option<PathBuf>,
}

/// A whole DNS-01 order per domain against a staging CA, with an account of its own kept in a
/// scratch directory (the production account and store are never touched); whether every
/// order ended with a certificate.
async fn staging_orders(
    config: &crate::config::Config,
    dns: &crate::acme::dns01::Dns,
    domains: &[&crate::config::DomainConfig],
    dry: DryRun,
) -> bool {
    use crate::acme::{challenge::Challenges, client::AcmeClient, store::DirStore};
    let roots = match dry
        .ca_roots
        .as_deref()
        .map(crate::https::roots_file)
        .transpose()
    {
        Ok(r) => r.unwrap_or_default(),
        Err(e) => {
            println!("FAILED  --ca-roots: {e}");
            return false;
        }
    };
    let candidates = match AgentAddress::candidates(config.agent.address.as_deref(), None) {
        Ok(c) => c,
        Err(e) => {
            println!("FAILED  guest agent: {e}");
            return false;
        }
    };
    let agent = match AgentClient::discover(candidates, config.agent.timeout).await {
        Ok((agent, _)) => agent,
        Err(e) => {
            println!("FAILED  guest agent (the account key comes from it): {e}");
            return false;
        }
    };
    let scratch = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => {
            println!("FAILED  a scratch directory: {e}");
            return false;
        }
    };
    let client = match AcmeClient::new(
        &dry.directory,
        &roots,
        config.public.acme.ca_timeout,
        agent,
        Arc::new(DirStore::new(scratch.path())),
        None,
        None,
    ) {
        Ok(c) => c,
        Err(e) => {
            println!("FAILED  {}: {e}", dry.directory);
            return false;
        }
    };
    let challenges = Challenges::default();
    let mut ok = true;
    for d in domains {
        let started = std::time::Instant::now();
        let spec = crate::acme::client::OrderSpec {
            names: &d.names,
            challenge: crate::config::Challenge::Dns01,
            key: None,
            replacing: None,
            operator: None,
        };
        let issued = client.issue(&spec, &challenges, Some(dns)).await;
        match issued.map(|i| {
            crate::acme::cert::load(i.chain_pem.as_bytes(), i.key_pem.as_bytes(), &d.names)
        }) {
            Ok(Ok(cert)) => println!(
                "ok      {}: a DNS-01 order at {} ended with a certificate from {} ({} ms)",
                d.primary(),
                dry.directory,
                cert.issuer,
                started.elapsed().as_millis()
            ),
            Ok(Err(e)) => {
                println!(
                    "FAILED  {}: the staging certificate is unusable: {e}",
                    d.primary()
                );
                ok = false;
            }
            Err(e) => {
                println!("FAILED  {}: the staging order: {e}", d.primary());
                ok = false;
            }
        }
    }
    ok
}

/// 32 random bytes.
fn random_bytes() -> [u8; 32] {
    let mut b = [0u8; 32];
    let _ = aws_lc_rs::rand::SecureRandom::fill(&aws_lc_rs::rand::SystemRandom::new(), &mut b);
    b
}
