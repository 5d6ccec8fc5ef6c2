//! `[dns]`: the DNS provider behind DNS-01 and the dstack records, the resolvers that check
//! propagation and CAA, with dstack-ingress's environment variables.

use std::{net::SocketAddr, time::Duration};

use serde::Deserialize;

use super::{raw::DurationValue, secs, source::Source, Check};

/// Environment variables (dstack-ingress's names where it has them).
pub mod env {
    /// `cloudflare` or `rfc2136`.
    pub const PROVIDER: &[&str] = &["DNS_PROVIDER"];
    /// Cloudflare API token (Zone:Read and DNS:Edit on the zones).
    pub const CLOUDFLARE_TOKEN: &[&str] = &["CLOUDFLARE_API_TOKEN"];
    /// Cloudflare API base, for proxies and tests.
    pub const CLOUDFLARE_URL: &[&str] = &["CLOUDFLARE_API_URL"];
    /// The primary server that takes RFC 2136 updates, `host[:port]`.
    pub const RFC2136_SERVER: &[&str] = &["RFC2136_SERVER"];
    /// TSIG key name.
    pub const RFC2136_KEY: &[&str] = &["RFC2136_TSIG_KEY"];
    /// TSIG secret, base64 as `tsig-keygen` prints it.
    pub const RFC2136_SECRET: &[&str] = &["RFC2136_TSIG_SECRET"];
    /// TSIG algorithm (`hmac-sha256` by default).
    pub const RFC2136_ALGORITHM: &[&str] = &["RFC2136_TSIG_ALGORITHM"];
    /// Zones the server holds (comma-separated); unset: found with SOA queries.
    pub const RFC2136_ZONE: &[&str] = &["RFC2136_ZONE"];
    /// DigitalOcean's token (lego's name).
    pub const DO_TOKEN: &[&str] = &["DO_AUTH_TOKEN"];
    /// DigitalOcean's API base, for proxies and tests (lego's name).
    pub const DO_URL: &[&str] = &["DO_API_URL"];
    /// Hetzner Cloud's project token (lego's name).
    pub const HETZNER_TOKEN: &[&str] = &["HETZNER_API_TOKEN"];
    /// Hetzner Cloud's API base, for proxies and tests.
    pub const HETZNER_URL: &[&str] = &["HETZNER_API_URL"];
    /// Porkbun's API key (lego's name).
    pub const PORKBUN_KEY: &[&str] = &["PORKBUN_API_KEY"];
    /// Porkbun's secret API key (lego's name).
    pub const PORKBUN_SECRET: &[&str] = &["PORKBUN_SECRET_API_KEY"];
    /// Porkbun's API base, for proxies and tests.
    pub const PORKBUN_URL: &[&str] = &["PORKBUN_API_URL"];
    /// Linode's token (dstack-ingress's name, then lego's).
    pub const LINODE_TOKEN: &[&str] = &["LINODE_API_TOKEN", "LINODE_TOKEN"];
    /// Linode's API base, for proxies and tests.
    pub const LINODE_URL: &[&str] = &["LINODE_API_URL"];
    /// Namecheap's API user (lego's name, then dstack-ingress's).
    pub const NAMECHEAP_USER: &[&str] = &["NAMECHEAP_API_USER", "NAMECHEAP_USERNAME"];
    /// Namecheap's API key.
    pub const NAMECHEAP_KEY: &[&str] = &["NAMECHEAP_API_KEY"];
    /// The whitelisted IPv4 address calls come from (dstack-ingress's name).
    pub const NAMECHEAP_IP: &[&str] = &["NAMECHEAP_CLIENT_IP"];
    /// Namecheap's sandbox.
    pub const NAMECHEAP_SANDBOX: &[&str] = &["NAMECHEAP_SANDBOX"];
    /// Namecheap's API URL, for proxies and tests.
    pub const NAMECHEAP_URL: &[&str] = &["NAMECHEAP_API_URL"];
    /// Google Cloud: the service account key's JSON (lego's name).
    pub const GCE_ACCOUNT: &[&str] = &["GCE_SERVICE_ACCOUNT"];
    /// Or the file holding it (lego's name, then Google's own).
    pub const GCE_ACCOUNT_FILE: &[&str] =
        &["GCE_SERVICE_ACCOUNT_FILE", "GOOGLE_APPLICATION_CREDENTIALS"];
    /// The project (else the key's `project_id`).
    pub const GCE_PROJECT: &[&str] = &["GCE_PROJECT"];
    /// The one managed zone to write (name or id).
    pub const GCE_ZONE: &[&str] = &["GCE_ZONE_ID"];
    /// Cloud DNS's API root, for proxies and tests.
    pub const GCE_URL: &[&str] = &["GCE_API_URL"];
    /// Between two looks at a pending change (seconds, lego's name).
    pub const GCE_POLLING: &[&str] = &["GCE_POLLING_INTERVAL"];
    /// How long a change may stay pending (seconds, lego's name).
    pub const GCE_SYNC_TIMEOUT: &[&str] = &["GCE_PROPAGATION_TIMEOUT"];
    /// OVH's endpoint: `ovh-eu` (default), `ovh-ca`, `ovh-us`, `kimsufi-*`, `soyoustart-*`, or
    /// a URL.
    pub const OVH_ENDPOINT: &[&str] = &["OVH_ENDPOINT"];
    /// OVH application key, secret and consumer key (lego's names).
    pub const OVH_APP_KEY: &[&str] = &["OVH_APPLICATION_KEY"];
    /// The application secret.
    pub const OVH_APP_SECRET: &[&str] = &["OVH_APPLICATION_SECRET"];
    /// The consumer key.
    pub const OVH_CONSUMER_KEY: &[&str] = &["OVH_CONSUMER_KEY"];
    /// An OAuth2 client's id.
    pub const OVH_CLIENT_ID: &[&str] = &["OVH_CLIENT_ID"];
    /// Its secret.
    pub const OVH_CLIENT_SECRET: &[&str] = &["OVH_CLIENT_SECRET"];
    /// An access token, used as it is.
    pub const OVH_ACCESS_TOKEN: &[&str] = &["OVH_ACCESS_TOKEN"];
    /// The OAuth2 token URL, for tests (else the endpoint's).
    pub const OVH_TOKEN_URL: &[&str] = &["OVH_OAUTH2_TOKEN_URL"];
    /// Route53: the access key (the AWS SDKs' name).
    pub const AWS_KEY: &[&str] = &["AWS_ACCESS_KEY_ID"];
    /// Its secret.
    pub const AWS_SECRET: &[&str] = &["AWS_SECRET_ACCESS_KEY"];
    /// The session token of temporary credentials.
    pub const AWS_TOKEN: &[&str] = &["AWS_SESSION_TOKEN"];
    /// A role to assume (dstack-ingress's name, then lego's).
    pub const AWS_ROLE: &[&str] = &["AWS_ROLE_ARN", "AWS_ASSUME_ROLE_ARN"];
    /// The role's external id (lego's name).
    pub const AWS_EXTERNAL_ID: &[&str] = &["AWS_EXTERNAL_ID"];
    /// The region STS is asked in (unset: the global endpoint).
    pub const AWS_REGION: &[&str] = &["AWS_REGION", "AWS_DEFAULT_REGION"];
    /// The one hosted zone to write (lego's name).
    pub const AWS_ZONE: &[&str] = &["AWS_HOSTED_ZONE_ID"];
    /// Route53's endpoint, as the AWS SDKs override it.
    pub const AWS_ROUTE53_URL: &[&str] = &["AWS_ENDPOINT_URL_ROUTE_53", "AWS_ENDPOINT_URL"];
    /// STS's endpoint, as the AWS SDKs override it.
    pub const AWS_STS_URL: &[&str] = &["AWS_ENDPOINT_URL_STS", "AWS_ENDPOINT_URL"];
    /// Wait for each change to be INSYNC (lego's name; default true).
    pub const AWS_WAIT: &[&str] = &["AWS_WAIT_FOR_RECORD_SETS_CHANGED"];
    /// How long (seconds, lego's name).
    pub const AWS_SYNC_TIMEOUT: &[&str] = &["AWS_PROPAGATION_TIMEOUT"];
    /// Between two looks (seconds, lego's name).
    pub const AWS_POLLING: &[&str] = &["AWS_POLLING_INTERVAL"];
    /// lego's `httpreq` endpoint.
    pub const HTTPREQ_ENDPOINT: &[&str] = &["HTTPREQ_ENDPOINT"];
    /// Its Basic user.
    pub const HTTPREQ_USERNAME: &[&str] = &["HTTPREQ_USERNAME"];
    /// Its Basic password.
    pub const HTTPREQ_PASSWORD: &[&str] = &["HTTPREQ_PASSWORD"];
    /// lego's mode: empty (fqdn and value); `RAW` is not offered.
    pub const HTTPREQ_MODE: &[&str] = &["HTTPREQ_MODE"];
    /// Resolvers that must see a challenge record before the CA is told to look.
    pub const RESOLVERS: &[&str] = &["DNS_RESOLVERS"];
    /// How long to wait for them.
    pub const PROPAGATION_TIMEOUT: &[&str] = &["DNS_PROPAGATION_TIMEOUT"];
    /// `false` skips the propagation check.
    pub const PROPAGATION_CHECK: &[&str] = &["DNS_PROPAGATION_CHECK"];
    /// The CNAME target of every public domain (the dstack gateway's name).
    pub const GATEWAY_DOMAIN: &[&str] = &["GATEWAY_DOMAIN"];
    /// The app-address TXT label (`_dstack-app-address`).
    pub const TXT_PREFIX: &[&str] = &["TXT_PREFIX"];
    /// Pin issuance with a CAA record naming our ACME account.
    pub const SET_CAA: &[&str] = &["SET_CAA"];
    /// The port in the app-address TXT (`<app_id>:<port>`).
    pub const PORT: &[&str] = &["PORT"];
    /// A zone the domains' records and challenges are delegated to by CNAMEs.
    pub const DELEGATION_ZONE: &[&str] = &["DELEGATION_ZONE"];
    /// How long challenge records in the delegated zone may take to show (seconds).
    pub const DELEGATION_PROPAGATION: &[&str] = &["DELEGATION_PROPAGATION_SECONDS"];
}

/// Default wait for challenge records to propagate.
pub const DEFAULT_PROPAGATION_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest propagation wait: an order as a whole is cut off at five minutes.
pub const MAX_PROPAGATION_TIMEOUT: Duration = Duration::from_secs(240);
/// Default app-address label, as dstack's gateway looks it up.
pub const DEFAULT_TXT_PREFIX: &str = "_dstack-app-address";
/// Cloudflare's v4 API.
pub const CLOUDFLARE_API: &str = "https://api.cloudflare.com/client/v4";
/// Hetzner Cloud's API (DNS zones and record sets).
pub const HETZNER_API: &str = "https://api.hetzner.cloud/v1";
/// Porkbun's API v3.
pub const PORKBUN_API: &str = "https://api.porkbun.com/api/json/v3";
/// Linode's API v4.
pub const LINODE_API: &str = "https://api.linode.com/v4";
/// Namecheap's API.
pub const NAMECHEAP_API: &str = "https://api.namecheap.com/xml.response";
/// Namecheap's sandbox API.
pub const NAMECHEAP_SANDBOX_API: &str = "https://api.sandbox.namecheap.com/xml.response";
/// Cloud DNS's API v1.
pub const GCLOUD_API: &str = "https://dns.googleapis.com/dns/v1";
/// Route53's global endpoint.
pub const ROUTE53_API: &str = "https://route53.amazonaws.com";
/// STS's global endpoint (signed in us-east-1).
pub const STS_API: &str = "https://sts.amazonaws.com";
/// DigitalOcean's API (its paths start with `/v2`).
pub const DIGITALOCEAN_API: &str = "https://api.digitalocean.com";

pub use super::Secret;

pub mod setup;

/// Where DNS records are written.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "provider", rename_all = "snake_case")]
pub enum ProviderConfig {
    /// Cloudflare's v4 API with a scoped token.
    Cloudflare {
        /// The token (Zone:Read, DNS:Edit).
        api_token: Secret,
        /// API base URL.
        api_url: String,
    },
    /// RFC 2136 dynamic update signed with TSIG.
    Rfc2136 {
        /// The primary server.
        server: String,
        /// TSIG key name.
        key_name: String,
        /// TSIG algorithm name (`hmac-sha256`, …).
        algorithm: String,
        /// TSIG secret (base64).
        secret: Secret,
        /// Zones it holds; empty: found with SOA queries.
        zones: Vec<String>,
    },
    /// DigitalOcean's API v2 with a personal access token.
    DigitalOcean {
        /// The token (read and write on domains).
        api_token: Secret,
        /// API base URL, without `/v2`.
        api_url: String,
    },
    /// Hetzner's DNS in the Hetzner Cloud API, with a project API token.
    Hetzner {
        /// The token (read and write).
        api_token: Secret,
        /// API base URL, with its version.
        api_url: String,
    },
    /// Porkbun's API v3 with an API key pair.
    Porkbun {
        /// The API key (`pk1_…`).
        api_key: Secret,
        /// The secret API key (`sk1_…`).
        secret_key: Secret,
        /// API base URL, with its version.
        api_url: String,
    },
    /// Linode's (Akamai's) API v4 with a personal access token.
    Linode {
        /// The token (Domains read/write).
        api_token: Secret,
        /// API base URL, with its version.
        api_url: String,
    },
    /// Namecheap's XML API (its setHosts replaces a domain's whole record set).
    Namecheap {
        /// The API user, also sent as `UserName`.
        api_user: String,
        /// The API key.
        api_key: Secret,
        /// The whitelisted IPv4 calls come from; unset: looked up at the first call.
        client_ip: Option<std::net::Ipv4Addr>,
        /// The API URL.
        api_url: String,
    },
    /// OVHcloud's API.
    Ovh {
        /// The endpoint's root with its version.
        api_url: String,
        /// How calls are authorised.
        auth: OvhAuth,
    },
    /// Amazon Route53, calls signed with SigV4.
    Route53(Route53Config),
    /// Google Cloud DNS with a service account.
    GoogleCloud(GoogleCloudConfig),
    /// lego's HTTP request protocol: `POST <endpoint>/present` and `/cleanup`.
    HttpReq {
        /// The operator's endpoint.
        endpoint: String,
        /// HTTP Basic user, when the endpoint asks for one.
        username: Option<String>,
        /// Its password.
        password: Option<Secret>,
    },
}

/// How OVH calls are authorised: one of three, never two.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum OvhAuth {
    /// Application key, secret and consumer key: each call signed.
    Signed {
        /// The application key (names the application, not secret).
        application_key: String,
        /// The application secret.
        application_secret: Secret,
        /// The consumer key.
        consumer_key: Secret,
    },
    /// An OAuth2 client (service account).
    OAuth2 {
        /// Its id.
        client_id: String,
        /// Its secret.
        client_secret: Secret,
        /// The endpoint's token URL.
        token_url: String,
    },
    /// An access token.
    Token(Secret),
}

/// OVH's endpoints by name: API root and OAuth2 token URL (go-ovh's table).
const OVH_ENDPOINTS: [(&str, &str, Option<&str>); 7] = [
    (
        "ovh-eu",
        "https://eu.api.ovh.com/1.0",
        Some("https://www.ovh.com/auth/oauth2/token"),
    ),
    (
        "ovh-ca",
        "https://ca.api.ovh.com/1.0",
        Some("https://ca.ovh.com/auth/oauth2/token"),
    ),
    (
        "ovh-us",
        "https://api.us.ovhcloud.com/1.0",
        Some("https://us.ovhcloud.com/auth/oauth2/token"),
    ),
    ("kimsufi-eu", "https://eu.api.kimsufi.com/1.0", None),
    ("kimsufi-ca", "https://ca.api.kimsufi.com/1.0", None),
    ("soyoustart-eu", "https://eu.api.soyoustart.com/1.0", None),
    ("soyoustart-ca", "https://ca.api.soyoustart.com/1.0", None),
];

/// Google Cloud DNS's service account and settings.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct GoogleCloudConfig {
    /// The key file's JSON (checked to sign at load).
    pub service_account: Secret,
    /// The project.
    pub project: String,
    /// The one managed zone to write; unset: every public zone of the project.
    pub zone: Option<String>,
    /// Cloud DNS's API root.
    pub api_url: String,
    /// Between two looks at a pending change.
    #[serde(with = "secs")]
    pub polling_interval: Duration,
    /// At most.
    #[serde(with = "secs")]
    pub sync_timeout: Duration,
}

/// A Google service account's key, as its JSON file gives it (checked to sign at load).
#[derive(Clone)]
pub struct ServiceAccount {
    /// `client_email`: the JWT's issuer.
    pub client_email: String,
    /// `private_key_id`: the JWT's `kid`.
    pub private_key_id: String,
    /// The RSA key, PKCS#8 or PKCS#1 DER.
    pub key: std::sync::Arc<aws_lc_rs::signature::RsaKeyPair>,
    /// `token_uri`.
    pub token_uri: String,
    /// `project_id`, when it names one.
    pub project_id: Option<String>,
}

impl std::fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("client_email", &self.client_email)
            .finish_non_exhaustive()
    }
}

impl ServiceAccount {
    /// From a key file's JSON: `type` must be `service_account` and the key RSA.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        match v["type"].as_str() {
            Some("service_account") => {}
            other => {
                return Err(format!(
                    "'type' is {other:?}, not \"service_account\" (a user's or an external account's credentials do not sign)"
                ))
            }
        }
        let field = |k: &str| {
            v[k].as_str()
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .ok_or_else(|| format!("no {k:?}"))
        };
        let pem = field("private_key")?;
        use rustls_pki_types::pem::PemObject as _;
        let der = rustls_pki_types::PrivateKeyDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| format!("private_key: {e}"))?;
        let key = match &der {
            rustls_pki_types::PrivateKeyDer::Pkcs8(k) => {
                aws_lc_rs::signature::RsaKeyPair::from_pkcs8(k.secret_pkcs8_der())
            }
            rustls_pki_types::PrivateKeyDer::Pkcs1(k) => {
                aws_lc_rs::signature::RsaKeyPair::from_der(k.secret_pkcs1_der())
            }
            _ => return Err("private_key: not an RSA key".into()),
        }
        .map_err(|e| format!("private_key: not a usable RSA key ({e})"))?;
        Ok(Self {
            client_email: field("client_email")?,
            private_key_id: field("private_key_id")?,
            key: std::sync::Arc::new(key),
            token_uri: v["token_uri"]
                .as_str()
                .filter(|s| !s.is_empty())
                .unwrap_or("https://oauth2.googleapis.com/token")
                .to_owned(),
            project_id: v["project_id"].as_str().map(str::to_owned),
        })
    }
}

/// Route53's credentials and settings.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Route53Config {
    /// The access key id (not secret: it names the key in CloudTrail).
    pub access_key_id: String,
    /// Its secret.
    pub secret_access_key: Secret,
    /// The session token of temporary credentials.
    pub session_token: Option<Secret>,
    /// A role to assume with the key.
    pub role_arn: Option<String>,
    /// The external id the role's trust policy asks for.
    pub external_id: Option<String>,
    /// The region STS signs in.
    pub region: String,
    /// STS's endpoint.
    pub sts_url: String,
    /// The one hosted zone to write; unset: every public zone the key lists.
    pub hosted_zone_id: Option<String>,
    /// Route53's endpoint.
    pub api_url: String,
    /// Wait for each change to be INSYNC.
    pub wait_for_sync: bool,
    /// Between two looks.
    #[serde(with = "secs")]
    pub polling_interval: Duration,
    /// At most.
    #[serde(with = "secs")]
    pub sync_timeout: Duration,
}

impl ProviderConfig {
    /// Whether it edits zones (the dstack records too), or presents challenges only.
    pub fn writes_zones(&self) -> bool {
        !matches!(self, Self::HttpReq { .. })
    }
}

/// `[dns]`, resolved.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DnsConfig {
    /// The provider; DNS-01 and the dstack records need one.
    #[serde(flatten)]
    pub provider: Option<ProviderConfig>,
    /// Resolvers checked for propagation and asked for CAA; empty: the provider's default
    /// (the RFC 2136 server itself; public resolvers for Cloudflare).
    pub resolvers: Vec<SocketAddr>,
    /// Wait until every resolver sees a challenge record.
    pub propagation_check: bool,
    /// How long to wait for it.
    #[serde(with = "secs")]
    pub propagation_timeout: Duration,
    /// CNAME every public domain to this name (the dstack gateway), when set.
    pub gateway_domain: Option<String>,
    /// The app-address TXT label.
    pub txt_prefix: String,
    /// Write a CAA record pinning our account and challenge method.
    pub set_caa: bool,
    /// The port in the app-address TXT; unset: the inbound listener's.
    pub app_port: Option<u16>,
    /// The CA's CAA identities when its directory does not list them (`caaIdentities`).
    pub caa_identities: Vec<String>,
    /// No provider writes the dstack records (or, with a delegation zone, the operator's
    /// CNAMEs into it): how the operator gets them made.
    pub setup: Option<setup::DnsSetup>,
    /// The zone the operator delegated every name's records and challenges to with CNAMEs;
    /// the provider writes there only.
    pub delegation_zone: Option<String>,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            provider: None,
            resolvers: Vec::new(),
            propagation_check: true,
            propagation_timeout: DEFAULT_PROPAGATION_TIMEOUT,
            gateway_domain: None,
            txt_prefix: DEFAULT_TXT_PREFIX.into(),
            set_caa: false,
            app_port: None,
            caa_identities: Vec::new(),
            setup: None,
            delegation_zone: None,
        }
    }
}

/// `[dns]` as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDns {
    pub provider: Option<String>,
    pub api_token: Option<String>,
    pub api_url: Option<String>,
    pub server: Option<String>,
    pub tsig_key: Option<String>,
    pub tsig_secret: Option<String>,
    pub tsig_algorithm: Option<String>,
    pub zones: Option<Vec<String>>,
    pub resolvers: Option<Vec<String>>,
    pub propagation_check: Option<bool>,
    pub propagation_timeout: Option<DurationValue>,
    pub gateway_domain: Option<String>,
    pub txt_prefix: Option<String>,
    pub set_caa: Option<bool>,
    pub setup_mode: Option<String>,
    pub doh_resolvers: Option<Vec<String>>,
    pub setup_timeout: Option<DurationValue>,
    pub setup_interval: Option<DurationValue>,
    pub settle: Option<DurationValue>,
    pub webhook_url: Option<String>,
    pub webhook_token: Option<String>,
    pub webhook_timeout: Option<DurationValue>,
    pub delegation_zone: Option<String>,
    pub endpoint: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub app_port: Option<u16>,
    pub caa_identities: Option<Vec<String>>,
}

/// A resolver address: `ip` or `ip:port` (53 when left out).
pub(super) fn resolver(text: &str) -> Result<SocketAddr, String> {
    let t = text.trim();
    t.parse::<SocketAddr>()
        .or_else(|_| {
            t.parse::<std::net::IpAddr>()
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .map_err(|_| format!("{t:?} is not a resolver address (ip or ip:port)"))
}

pub(super) fn dns(raw: Option<&RawDns>, env: &dyn Source, c: &mut Check) -> DnsConfig {
    let first = |keys: &[&'static str]| super::source::first(env, keys);
    let raw = raw.cloned().unwrap_or_default();
    let defaults = DnsConfig::default();
    let mut flag =
        |keys: &[&'static str], file: Option<bool>| super::domains::env_flag(env, keys, c).or(file);
    let propagation_check = flag(env::PROPAGATION_CHECK, raw.propagation_check).unwrap_or(true);
    let set_caa = flag(env::SET_CAA, raw.set_caa).unwrap_or(false);

    let provider = provider(&raw, env, c);
    let delegation_zone = pick(
        env,
        env::DELEGATION_ZONE,
        raw.delegation_zone.clone(),
        "dns.delegation_zone",
    )
    .and_then(|(key, z)| {
        let z = z.trim().trim_end_matches('.').to_ascii_lowercase();
        if provider.is_none() {
            c.fail(key, "the delegated zone is written through a DNS provider whose credential can edit that zone only: set DNS_PROVIDER and its credential");
        }
        super::domains::check_name(&z).map_err(|e| c.fail(key, e)).ok()
    });
    // Records no provider writes are the operator's, and so are the CNAMEs into a delegated
    // zone: DNS_SETUP_MODE says how they get made.
    let gateway_set =
        super::source::first(env, env::GATEWAY_DOMAIN).is_some() || raw.gateway_domain.is_some();
    let writes = provider.as_ref().is_some_and(ProviderConfig::writes_zones);
    // DNS_SETUP_MODE alone, with no provider: the operator creates DNS-01 challenges too.
    let mode_set = pick(
        env,
        setup::env::MODE,
        raw.setup_mode.clone(),
        "dns.setup_mode",
    )
    .is_some();
    let setup = match (delegation_zone.is_some(), gateway_set || set_caa) {
        (true, _) => setup::setup(&raw, env, false, c),
        (false, true) => setup::setup(&raw, env, writes, c),
        (false, false) if mode_set && provider.is_none() => setup::setup(&raw, env, false, c),
        (false, false) => None,
    };

    let resolvers = resolvers(&raw, env, c);
    let propagation_timeout = propagation_timeout(&raw, env, c);
    let gateway_domain = pick(
        env,
        env::GATEWAY_DOMAIN,
        raw.gateway_domain,
        "dns.gateway_domain",
    )
    .and_then(|(key, g)| {
        // dstack's gateway names start with `_.` (a wildcard stand-in): not a host name.
        let bare = g.trim().trim_end_matches('.').to_ascii_lowercase();
        let checked = bare.strip_prefix("_.").map_or_else(
            || super::domains::check_name(&bare),
            |rest| super::domains::check_name(rest).map(|_| bare.clone()),
        );
        checked.map_err(|e| c.fail(key, e)).ok()
    });
    let txt_prefix = pick(env, env::TXT_PREFIX, raw.txt_prefix, "dns.txt_prefix").map_or(
        defaults.txt_prefix,
        |(key, p)| {
            let p = p.trim().trim_matches('.').to_owned();
            if p.is_empty() || p.contains('.') || p.len() > 50 {
                c.fail(
                    key,
                    format!("{p:?}: one DNS label, like _dstack-app-address"),
                );
            }
            p
        },
    );
    let app_port = match first(env::PORT) {
        Some((var, v)) => v
            .trim()
            .parse::<u16>()
            .map_err(|_| c.fail(var, format!("{v:?} is not a port")))
            .ok(),
        None => raw.app_port,
    };

    DnsConfig {
        provider,
        resolvers,
        propagation_check,
        propagation_timeout,
        gateway_domain,
        txt_prefix,
        set_caa,
        app_port,
        caa_identities: raw
            .caa_identities
            .unwrap_or_default()
            .iter()
            .map(|i| i.trim().to_ascii_lowercase())
            .collect(),
        setup,
        delegation_zone,
    }
}

/// `DNS_RESOLVERS` / `[dns] resolvers`: who must see a challenge record before the CA looks.
fn resolvers(raw: &RawDns, env: &dyn Source, c: &mut Check) -> Vec<SocketAddr> {
    let first = |keys: &[&'static str]| super::source::first(env, keys);
    match first(env::RESOLVERS) {
        Some((var, v)) => v
            .split([',', ' ', '\n'])
            .filter(|r| !r.is_empty())
            .filter_map(|r| resolver(r).map_err(|e| c.fail(var, e)).ok())
            .collect(),
        None => raw
            .resolvers
            .clone()
            .unwrap_or_default()
            .iter()
            .filter_map(|r| resolver(r).map_err(|e| c.fail("dns.resolvers", e)).ok())
            .collect(),
    }
}

/// How long to wait for the resolvers, capped below the order deadline.
fn propagation_timeout(raw: &RawDns, env: &dyn Source, c: &mut Check) -> Duration {
    let first = |keys: &[&'static str]| super::source::first(env, keys);
    // dstack-ingress sleeps DELEGATION_PROPAGATION_SECONDS blindly; here it bounds the wait
    // for the resolvers to see the challenge in the delegated zone.
    let propagation_timeout =
        match first(env::PROPAGATION_TIMEOUT).or_else(|| first(env::DELEGATION_PROPAGATION)) {
            Some((var, v)) => {
                let t = v.trim();
                let parsed = t
                    .parse::<u64>()
                    .map(Duration::from_secs)
                    .or_else(|_| super::parse_duration(t));
                parsed
                    .map_err(|e| c.fail(var, e))
                    .unwrap_or(DEFAULT_PROPAGATION_TIMEOUT)
            }
            None => c.duration(
                "dns.propagation_timeout",
                raw.propagation_timeout.as_ref(),
                DEFAULT_PROPAGATION_TIMEOUT,
            ),
        };
    // The whole order has five minutes; a longer wait would be cut off before the challenge
    // records are cleaned up.
    if propagation_timeout > MAX_PROPAGATION_TIMEOUT {
        c.fail(
            "dns.propagation_timeout",
            format!(
                "{}s is longer than the {}s an order may wait for DNS",
                propagation_timeout.as_secs(),
                MAX_PROPAGATION_TIMEOUT.as_secs()
            ),
        );
    }
    propagation_timeout
}

/// The environment wins over the file, as everywhere else.
fn pick(
    env: &dyn Source,
    keys: &[&'static str],
    file: Option<String>,
    key: &'static str,
) -> Option<(&'static str, String)> {
    super::source::first(env, keys).or(file.map(|v| (key, v)))
}

/// dstack-ingress picks the provider by the first credential set, in this order, when
/// `DNS_PROVIDER` is not set.
const DETECTED: [(&str, &str); 11] = [
    ("CLOUDFLARE_API_TOKEN", "cloudflare"),
    ("LINODE_API_TOKEN", "linode"),
    ("NAMECHEAP_API_KEY", "namecheap"),
    ("AWS_ACCESS_KEY_ID", "route53"),
    // Not dstack-ingress's: ours, after its four.
    ("DO_AUTH_TOKEN", "digitalocean"),
    ("HETZNER_API_TOKEN", "hetzner"),
    ("PORKBUN_API_KEY", "porkbun"),
    ("OVH_APPLICATION_KEY", "ovh"),
    ("OVH_CLIENT_ID", "ovh"),
    ("GCE_SERVICE_ACCOUNT", "gcloud"),
    ("GCE_SERVICE_ACCOUNT_FILE", "gcloud"),
];

/// Whether the DNS provider is named by the environment (`DNS_PROVIDER`, or a credential
/// dstack-ingress detects it by), as a dstack-ingress deployment names it.
pub(super) fn provider_from_env(env: &dyn Source) -> bool {
    super::source::first(env, env::PROVIDER).is_some()
        || DETECTED.iter().any(|(var, _)| env.get(var).is_some())
}

/// `DNS_PROVIDER` / `[dns] provider` (else, as dstack-ingress does, the provider whose
/// credential is set) and its credentials.
fn provider(raw: &RawDns, env: &dyn Source, c: &mut Check) -> Option<ProviderConfig> {
    let detected = || {
        DETECTED
            .iter()
            .find(|(var, _)| env.get(var).is_some())
            .map(|(var, name)| (*var, (*name).to_owned()))
    };
    let (key, name) =
        pick(env, env::PROVIDER, raw.provider.clone(), "dns.provider").or_else(detected)?;
    match name.trim().to_ascii_lowercase().as_str() {
        "cloudflare" => cloudflare(raw, env, key, c),
        "rfc2136" => rfc2136(raw, env, key, c),
        "httpreq" => httpreq(raw, env, key, c),
        "digitalocean" => digitalocean(raw, env, key, c),
        "linode" => linode(raw, env, key, c),
        "hetzner" => hetzner(raw, env, key, c),
        "porkbun" => porkbun(raw, env, key, c),
        "route53" => route53(raw, env, key, c),
        "namecheap" => namecheap(raw, env, key, c),
        "ovh" => ovh(env, key, c),
        "gcloud" | "googlecloud" | "google" => gcloud(raw, env, key, c),
        other => {
            c.fail(key, format!("{other:?} is not a DNS provider this build has: use cloudflare, rfc2136 (RFC 2136 works with BIND, Knot, PowerDNS and most managed DNS), digitalocean, gcloud, hetzner, linode, namecheap, ovh, porkbun, route53, or httpreq (any DNS behind an HTTP endpoint of yours)"));
            None
        }
    }
}

/// `digitalocean`: a personal access token with write access to the domains.
fn digitalocean(
    raw: &RawDns,
    env: &dyn Source,
    key: &str,
    c: &mut Check,
) -> Option<ProviderConfig> {
    let Some((_, token)) = pick(env, env::DO_TOKEN, raw.api_token.clone(), "dns.api_token") else {
        c.fail(key, "digitalocean needs a personal access token with write scope (DO_AUTH_TOKEN or dns.api_token)");
        return None;
    };
    Some(ProviderConfig::DigitalOcean {
        api_token: Secret(token.trim().to_owned()),
        api_url: pick(env, env::DO_URL, raw.api_url.clone(), "dns.api_url").map_or_else(
            || DIGITALOCEAN_API.to_owned(),
            |(_, u)| u.trim().trim_end_matches('/').to_owned(),
        ),
    })
}

/// `hetzner`: a Hetzner Cloud project token (the deprecated DNS console's key is refused).
fn hetzner(raw: &RawDns, env: &dyn Source, key: &str, c: &mut Check) -> Option<ProviderConfig> {
    if env.get("HETZNER_API_KEY").is_some() {
        c.fail("HETZNER_API_KEY", "the key of Hetzner's deprecated DNS API (dns.hetzner.com), which zones moved to the Hetzner Console no longer answer: create a Hetzner Cloud API token with read and write access and set HETZNER_API_TOKEN");
    }
    let Some((_, token)) = pick(
        env,
        env::HETZNER_TOKEN,
        raw.api_token.clone(),
        "dns.api_token",
    ) else {
        c.fail(key, "hetzner needs a Hetzner Cloud API token with read and write access (HETZNER_API_TOKEN or dns.api_token)");
        return None;
    };
    Some(ProviderConfig::Hetzner {
        api_token: Secret(token.trim().to_owned()),
        api_url: pick(env, env::HETZNER_URL, raw.api_url.clone(), "dns.api_url").map_or_else(
            || HETZNER_API.to_owned(),
            |(_, u)| u.trim().trim_end_matches('/').to_owned(),
        ),
    })
}

/// `porkbun`: an API key pair, with API access turned on for the domains.
fn porkbun(raw: &RawDns, env: &dyn Source, key: &str, c: &mut Check) -> Option<ProviderConfig> {
    let api_key = pick(
        env,
        env::PORKBUN_KEY,
        raw.api_token.clone(),
        "dns.api_token",
    );
    let secret = pick(
        env,
        env::PORKBUN_SECRET,
        raw.password.clone(),
        "dns.password",
    );
    let (Some((_, api_key)), Some((_, secret))) = (api_key, secret) else {
        c.fail(key, "porkbun needs its API key pair (PORKBUN_API_KEY and PORKBUN_SECRET_API_KEY, or dns.api_token and dns.password), with API access turned on for each domain");
        return None;
    };
    Some(ProviderConfig::Porkbun {
        api_key: Secret(api_key.trim().to_owned()),
        secret_key: Secret(secret.trim().to_owned()),
        api_url: pick(env, env::PORKBUN_URL, raw.api_url.clone(), "dns.api_url").map_or_else(
            || PORKBUN_API.to_owned(),
            |(_, u)| u.trim().trim_end_matches('/').to_owned(),
        ),
    })
}

/// Whole seconds from `keys`, else `default`; anything else is an error naming the variable.
fn whole_seconds(
    env: &dyn Source,
    keys: &'static [&'static str],
    default: u64,
    c: &mut Check,
) -> Duration {
    match super::source::first(env, keys) {
        None => Duration::from_secs(default),
        Some((var, v)) => match v.trim().parse::<u64>() {
            Ok(n) if n > 0 => Duration::from_secs(n),
            _ => {
                c.fail(var, format!("{v:?} is not a whole number of seconds"));
                Duration::from_secs(default)
            }
        },
    }
}

/// `gcloud`: a service account's key (its JSON, or the file holding it) with the DNS
/// Administrator role, and the project (else the key's own).
fn gcloud(raw: &RawDns, env: &dyn Source, key: &str, c: &mut Check) -> Option<ProviderConfig> {
    let json = match (
        super::source::first(env, env::GCE_ACCOUNT),
        super::source::first(env, env::GCE_ACCOUNT_FILE),
        raw.api_token.clone(),
    ) {
        (Some((var, json)), _, _) => Some((var.to_owned(), json)),
        (None, Some((var, path)), _) => match std::fs::read_to_string(path.trim()) {
            Ok(json) => Some((var.to_owned(), json)),
            Err(e) => {
                c.fail(var, format!("{}: {e}", path.trim()));
                return None;
            }
        },
        (None, None, Some(json)) => Some(("dns.api_token".to_owned(), json)),
        (None, None, None) => None,
    };
    let Some((var, json)) = json else {
        c.fail(key, "gcloud needs a service account key with the DNS Administrator role (GCE_SERVICE_ACCOUNT: its JSON, or GCE_SERVICE_ACCOUNT_FILE / GOOGLE_APPLICATION_CREDENTIALS: its file)");
        return None;
    };
    let project_in_key = match ServiceAccount::from_json(&json) {
        Ok(account) => account.project_id,
        Err(e) => {
            c.fail(&var, format!("the service account key does not sign: {e}"));
            return None;
        }
    };
    let Some(project) = super::source::first(env, env::GCE_PROJECT)
        .map(|(_, p)| p.trim().to_owned())
        .or(project_in_key)
    else {
        c.fail(
            "GCE_PROJECT",
            "the key names no project_id: set GCE_PROJECT",
        );
        return None;
    };
    Some(ProviderConfig::GoogleCloud(GoogleCloudConfig {
        service_account: Secret(json),
        project,
        zone: super::source::first(env, env::GCE_ZONE).map(|(_, z)| z.trim().to_owned()),
        api_url: pick(env, env::GCE_URL, raw.api_url.clone(), "dns.api_url").map_or_else(
            || GCLOUD_API.to_owned(),
            |(_, u)| u.trim().trim_end_matches('/').to_owned(),
        ),
        polling_interval: whole_seconds(env, env::GCE_POLLING, 2, c),
        sync_timeout: whole_seconds(env, env::GCE_SYNC_TIMEOUT, 120, c),
    }))
}

/// `ovh`: an endpoint and exactly one way to authorise calls (application keys, an OAuth2
/// client, or an access token).
fn ovh(env: &dyn Source, key: &str, c: &mut Check) -> Option<ProviderConfig> {
    let get = |keys: &[&'static str]| {
        super::source::first(env, keys)
            .map(|(_, v)| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    let endpoint = get(env::OVH_ENDPOINT).unwrap_or_else(|| "ovh-eu".to_owned());
    let (api_url, token_url) = match OVH_ENDPOINTS.iter().find(|(n, _, _)| *n == endpoint) {
        Some((_, url, token)) => ((*url).to_owned(), token.map(str::to_owned)),
        None if endpoint.contains('/') => (endpoint.trim_end_matches('/').to_owned(), None),
        None => {
            c.fail(
                "OVH_ENDPOINT",
                format!(
                    "{endpoint:?} is not an OVH endpoint: use {}, or a URL",
                    OVH_ENDPOINTS.map(|(n, _, _)| n).join(", ")
                ),
            );
            return None;
        }
    };
    let app = (
        get(env::OVH_APP_KEY),
        get(env::OVH_APP_SECRET),
        get(env::OVH_CONSUMER_KEY),
    );
    let client = (get(env::OVH_CLIENT_ID), get(env::OVH_CLIENT_SECRET));
    let token = get(env::OVH_ACCESS_TOKEN);
    let methods = [
        app.0.is_some() || app.1.is_some() || app.2.is_some(),
        client.0.is_some() || client.1.is_some(),
        token.is_some(),
    ];
    if methods.iter().filter(|m| **m).count() > 1 {
        c.fail(key, "ovh takes one way to authorise: application keys (OVH_APPLICATION_KEY, OVH_APPLICATION_SECRET, OVH_CONSUMER_KEY), an OAuth2 client (OVH_CLIENT_ID, OVH_CLIENT_SECRET) or OVH_ACCESS_TOKEN, not several");
        return None;
    }
    let auth = match (app, client, token) {
        ((Some(k), Some(s), Some(ck)), _, _) => OvhAuth::Signed {
            application_key: k,
            application_secret: Secret(s),
            consumer_key: Secret(ck),
        },
        ((Some(_), _, _) | (_, Some(_), _) | (_, _, Some(_)), _, _) => {
            c.fail(key, "ovh's application keys go together: OVH_APPLICATION_KEY, OVH_APPLICATION_SECRET and OVH_CONSUMER_KEY");
            return None;
        }
        (_, (Some(id), Some(secret)), _) => {
            let Some(token_url) = get(env::OVH_TOKEN_URL).or(token_url) else {
                c.fail("OVH_ENDPOINT", format!("{endpoint:?} has no OAuth2 token endpoint: use ovh-eu, ovh-ca or ovh-us, or application keys"));
                return None;
            };
            OvhAuth::OAuth2 {
                client_id: id,
                client_secret: Secret(secret),
                token_url,
            }
        }
        (_, (Some(_), None) | (None, Some(_)), _) => {
            c.fail(
                key,
                "an OVH OAuth2 client needs OVH_CLIENT_ID and OVH_CLIENT_SECRET",
            );
            return None;
        }
        (_, _, Some(t)) => OvhAuth::Token(Secret(t)),
        _ => {
            c.fail(key, "ovh needs application keys (OVH_APPLICATION_KEY, OVH_APPLICATION_SECRET, OVH_CONSUMER_KEY, allowed GET/POST/DELETE on /domain/zone/*), an OAuth2 client (OVH_CLIENT_ID, OVH_CLIENT_SECRET) or OVH_ACCESS_TOKEN");
            return None;
        }
    };
    Some(ProviderConfig::Ovh { api_url, auth })
}

/// `namecheap`: the API user and key, from a whitelisted IPv4 address.
fn namecheap(raw: &RawDns, env: &dyn Source, key: &str, c: &mut Check) -> Option<ProviderConfig> {
    let user = pick(
        env,
        env::NAMECHEAP_USER,
        raw.username.clone(),
        "dns.username",
    );
    let api_key = pick(
        env,
        env::NAMECHEAP_KEY,
        raw.api_token.clone(),
        "dns.api_token",
    );
    let (Some((_, user)), Some((_, api_key))) = (user, api_key) else {
        c.fail(key, "namecheap needs its API user and key (NAMECHEAP_API_USER or NAMECHEAP_USERNAME, and NAMECHEAP_API_KEY; or dns.username and dns.api_token), with API access enabled and this CVM's address whitelisted");
        return None;
    };
    let client_ip = super::source::first(env, env::NAMECHEAP_IP).and_then(|(var, ip)| {
        ip.trim()
            .parse::<std::net::Ipv4Addr>()
            .map_err(|_| {
                c.fail(
                    var,
                    format!("{ip:?} is not an IPv4 address (Namecheap whitelists IPv4 only)"),
                )
            })
            .ok()
    });
    let sandbox = super::domains::env_flag(env, env::NAMECHEAP_SANDBOX, c).unwrap_or(false);
    let api_url = pick(env, env::NAMECHEAP_URL, raw.api_url.clone(), "dns.api_url").map_or_else(
        || match sandbox {
            true => NAMECHEAP_SANDBOX_API.to_owned(),
            false => NAMECHEAP_API.to_owned(),
        },
        |(_, u)| u.trim().to_owned(),
    );
    Some(ProviderConfig::Namecheap {
        api_user: user.trim().to_owned(),
        api_key: Secret(api_key.trim().to_owned()),
        client_ip,
        api_url,
    })
}

/// `route53`: an access key pair (with a session token when temporary), optionally a role it
/// assumes, as the AWS SDKs read them from the environment.
fn route53(raw: &RawDns, env: &dyn Source, key: &str, c: &mut Check) -> Option<ProviderConfig> {
    let first = |keys: &[&'static str]| super::source::first(env, keys).map(|(_, v)| v);
    let id = pick(env, env::AWS_KEY, raw.username.clone(), "dns.username");
    let secret = pick(env, env::AWS_SECRET, raw.password.clone(), "dns.password");
    let (Some((_, id)), Some((_, secret))) = (id, secret) else {
        let missing = match env.get("AWS_PROFILE") {
            Some(_) => "route53 needs an access key in the environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or dns.username and dns.password): AWS_PROFILE's shared credential files are not read inside the CVM",
            None => "route53 needs an access key (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or dns.username and dns.password) allowed route53:ListHostedZones, ListResourceRecordSets, ChangeResourceRecordSets and GetChange",
        };
        c.fail(key, missing);
        return None;
    };
    let polling_interval = whole_seconds(env, env::AWS_POLLING, 4, c);
    let sync_timeout = whole_seconds(env, env::AWS_SYNC_TIMEOUT, 120, c);
    let wait_for_sync = super::domains::env_flag(env, env::AWS_WAIT, c).unwrap_or(true);
    let region = first(env::AWS_REGION).map(|r| r.trim().to_owned());
    let url = |keys, default: String| {
        first(keys).map_or(default, |u| u.trim().trim_end_matches('/').to_owned())
    };
    let sts_default = match &region {
        Some(r) => format!("https://sts.{r}.amazonaws.com"),
        None => STS_API.to_owned(),
    };
    Some(ProviderConfig::Route53(Route53Config {
        access_key_id: id.trim().to_owned(),
        secret_access_key: Secret(secret.trim().to_owned()),
        session_token: first(env::AWS_TOKEN)
            .filter(|t| !t.trim().is_empty())
            .map(|t| Secret(t.trim().to_owned())),
        role_arn: first(env::AWS_ROLE)
            .map(|r| r.trim().to_owned())
            .filter(|r| !r.is_empty()),
        external_id: first(env::AWS_EXTERNAL_ID).map(|r| r.trim().to_owned()),
        region: region.unwrap_or_else(|| "us-east-1".to_owned()),
        sts_url: url(env::AWS_STS_URL, sts_default),
        hosted_zone_id: first(env::AWS_ZONE)
            .map(|z| z.trim().trim_start_matches("/hostedzone/").to_owned())
            .filter(|z| !z.is_empty()),
        api_url: pick(
            env,
            env::AWS_ROUTE53_URL,
            raw.api_url.clone(),
            "dns.api_url",
        )
        .map_or_else(
            || ROUTE53_API.to_owned(),
            |(_, u)| u.trim().trim_end_matches('/').to_owned(),
        ),
        wait_for_sync,
        polling_interval,
        sync_timeout,
    }))
}

/// `linode`: a personal access token with Domains read/write.
fn linode(raw: &RawDns, env: &dyn Source, key: &str, c: &mut Check) -> Option<ProviderConfig> {
    let Some((_, token)) = pick(
        env,
        env::LINODE_TOKEN,
        raw.api_token.clone(),
        "dns.api_token",
    ) else {
        c.fail(key, "linode needs a personal access token with Domains read/write (LINODE_API_TOKEN or dns.api_token)");
        return None;
    };
    Some(ProviderConfig::Linode {
        api_token: Secret(token.trim().to_owned()),
        api_url: pick(env, env::LINODE_URL, raw.api_url.clone(), "dns.api_url").map_or_else(
            || LINODE_API.to_owned(),
            |(_, u)| u.trim().trim_end_matches('/').to_owned(),
        ),
    })
}

/// `httpreq`: lego's HTTP request protocol to the operator's endpoint.
fn httpreq(raw: &RawDns, env: &dyn Source, key: &str, c: &mut Check) -> Option<ProviderConfig> {
    if let Some((var, mode)) = super::source::first(env, env::HTTPREQ_MODE) {
        if !mode.trim().is_empty() {
            c.fail(var, format!("{mode:?}: only the default mode (fqdn and value) is offered; RAW hands the endpoint the key authorization, which stays in the CVM"));
        }
    }
    let Some((ekey, endpoint)) = pick(
        env,
        env::HTTPREQ_ENDPOINT,
        raw.endpoint.clone(),
        "dns.endpoint",
    ) else {
        c.fail(
            key,
            "httpreq needs its endpoint (HTTPREQ_ENDPOINT or dns.endpoint)",
        );
        return None;
    };
    let endpoint = endpoint.trim().trim_end_matches('/').to_owned();
    if !(endpoint.starts_with("https://") || endpoint.starts_with("http://")) {
        c.fail(ekey, format!("{endpoint:?} is not an http(s) URL"));
    }
    let username = pick(
        env,
        env::HTTPREQ_USERNAME,
        raw.username.clone(),
        "dns.username",
    )
    .map(|(_, u)| u);
    let password = pick(
        env,
        env::HTTPREQ_PASSWORD,
        raw.password.clone(),
        "dns.password",
    )
    .map(|(_, p)| Secret(p));
    if username.is_none() && password.is_some() {
        c.fail(
            "HTTPREQ_USERNAME",
            "a password without a user: set HTTPREQ_USERNAME too",
        );
    }
    Some(ProviderConfig::HttpReq {
        endpoint,
        username,
        password,
    })
}

/// `cloudflare`: an API token with Zone:Read and DNS:Edit.
fn cloudflare(raw: &RawDns, env: &dyn Source, key: &str, c: &mut Check) -> Option<ProviderConfig> {
    match pick(
        env,
        env::CLOUDFLARE_TOKEN,
        raw.api_token.clone(),
        "dns.api_token",
    ) {
        Some((_, token)) => Some(ProviderConfig::Cloudflare {
            api_token: Secret(token.trim().to_owned()),
            api_url: pick(env, env::CLOUDFLARE_URL, raw.api_url.clone(), "dns.api_url")
                .map_or_else(
                    || CLOUDFLARE_API.to_owned(),
                    |(_, u)| u.trim().trim_end_matches('/').to_owned(),
                ),
        }),
        None => {
            c.fail(key, "cloudflare needs an API token (CLOUDFLARE_API_TOKEN or dns.api_token) with Zone:Read and DNS:Edit");
            None
        }
    }
}

/// `rfc2136`: a primary server, a TSIG key name and its secret.
fn rfc2136(raw: &RawDns, env: &dyn Source, key: &str, c: &mut Check) -> Option<ProviderConfig> {
    let first = |keys: &[&'static str]| super::source::first(env, keys);

    let server = pick(env, env::RFC2136_SERVER, raw.server.clone(), "dns.server");
    let key_name = pick(env, env::RFC2136_KEY, raw.tsig_key.clone(), "dns.tsig_key");
    let secret = pick(
        env,
        env::RFC2136_SECRET,
        raw.tsig_secret.clone(),
        "dns.tsig_secret",
    );
    let algorithm = pick(
        env,
        env::RFC2136_ALGORITHM,
        raw.tsig_algorithm.clone(),
        "dns.tsig_algorithm",
    )
    .map_or_else(
        || "hmac-sha256".to_owned(),
        |(_, a)| a.trim().to_ascii_lowercase(),
    );
    if !["hmac-sha256", "hmac-sha384", "hmac-sha512"].contains(&algorithm.as_str()) {
        c.fail(
            "dns.tsig_algorithm",
            format!("{algorithm:?}: use hmac-sha256, hmac-sha384 or hmac-sha512"),
        );
    }
    let zones = match first(env::RFC2136_ZONE) {
        Some((_, v)) => v
            .split([',', ' ', '\n'])
            .filter(|z| !z.is_empty())
            .map(str::to_owned)
            .collect(),
        None => raw.zones.clone().unwrap_or_default(),
    };
    let zones = zones
        .iter()
        .filter_map(|z| {
            super::domains::check_name(z)
                .map_err(|e| c.fail("dns.zones", e))
                .ok()
        })
        .collect();
    match (server, key_name, secret) {
        (Some((_, server)), Some((_, key_name)), Some((skey, secret))) => {
            // Standard base64 (tsig-keygen's) decodes with the base64url decoder too.
            if crate::base64url::decode(secret.trim()).is_err() {
                c.fail(
                    skey,
                    "the TSIG secret is not base64 (copy it from tsig-keygen's output)",
                );
            }
            Some(ProviderConfig::Rfc2136 {
                server: server.trim().to_owned(),
                key_name: key_name.trim().trim_end_matches('.').to_owned(),
                algorithm,
                secret: Secret(secret.trim().to_owned()),
                zones,
            })
        }
        _ => {
            c.fail(key, "rfc2136 needs a server, a TSIG key name and its secret (RFC2136_SERVER, RFC2136_TSIG_KEY, RFC2136_TSIG_SECRET or dns.server, dns.tsig_key, dns.tsig_secret)");
            None
        }
    }
}

#[cfg(test)]
mod tests;
