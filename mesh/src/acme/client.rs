//! Talking to an ACME CA: our HTTPS client, the account derived from the app's key, orders.
//!
//! instant-acme speaks the protocol (JWS, nonces, polling); this module decides which account
//! key, which challenge, what to do with each CA answer, and how failures are reported.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use instant_acme::{
    Account, AuthorizationStatus, BodyWrapper, BytesResponse, ChallengeType, HttpClient,
    Identifier, Key, NewOrder, OrderStatus, RetryPolicy,
};
use ratls::agent::AgentClient;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use super::{
    challenge::{Challenges, Response},
    dns01::{caa, Dns, DnsError, OperatorRecords},
    store::CertStore,
};
use crate::config::{Challenge, Eab};

/// Why an account step or an order failed. `Display` is what `/certs` shows as the last error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IssueError {
    /// The CA did not answer (connection refused, DNS, timeout).
    #[error("CA unreachable: {0}")]
    Unreachable(Unreachable),
    /// The CA answered with a server error or something that is not ACME.
    #[error("CA error: {0}")]
    Server(CaFault),
    /// The CA refused for now: `rateLimited` or HTTP 429.
    #[error("rate limited by the CA: {0}")]
    RateLimited(Problem),
    /// The CA refused the request (problem document).
    #[error("CA refused: {0}")]
    Refused(Problem),
    /// The CA could not validate control of a name.
    #[error("validation failed: {0}")]
    Validation(Validation),
    /// Something on our side (agent, key, store).
    #[error(transparent)]
    Local(#[from] LocalError),
    /// The DNS side: the provider, propagation, CAA.
    #[error(transparent)]
    Dns(#[from] DnsError),
    /// The configured ACME profile is not one the CA offers.
    #[error("the CA at {directory} does not offer the ACME profile {profile:?}: {offered}")]
    Profile {
        /// The profile asked for.
        profile: String,
        /// The CA.
        directory: String,
        /// What it offers, in words.
        offered: String,
    },
    /// The fleet's store (etcd) for replicas.
    #[cfg(feature = "etcd")]
    #[error("shared store: {0}")]
    Shared(#[from] super::replicas::SharedError),
}

impl IssueError {
    /// Whether a cheap directory probe can tell that a retry is worth making now.
    pub fn probe_helps(&self) -> bool {
        matches!(self, Self::Unreachable(_) | Self::Server(_))
    }
}

/// A problem document (RFC 8555 §6.7), as the CA worded it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Its `type` URN, when given.
    pub kind: Option<String>,
    /// Its HTTP status, when given.
    pub status: Option<u16>,
    /// The whole document in words (type, detail, subproblems).
    pub text: String,
    /// The response's `Retry-After`, for a refusal that sets one (a rate limit).
    pub retry_after: Option<Duration>,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl From<&instant_acme::Problem> for Problem {
    fn from(p: &instant_acme::Problem) -> Self {
        Self {
            kind: p.r#type.clone(),
            status: p.status,
            text: p.to_string(),
            retry_after: None,
        }
    }
}

/// Why the CA could not be reached.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Unreachable {
    /// Connecting or the exchange failed, or took too long.
    #[error(transparent)]
    Transport(#[from] Transport),
    /// The answer's body broke off.
    #[error("reading the answer: {0}")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The whole order ran past its deadline.
    #[error("the order took longer than {0:?}")]
    OrderDeadline(Duration),
}

/// The CA answered, but not with something usable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaFault {
    /// A server-side problem document.
    #[error("{0}")]
    Problem(Problem),
    /// A body that is not ACME JSON (an HTML error page, a proxy in the way).
    #[error("the CA answered something that is not ACME JSON: {0}")]
    NotAcme(String),
    /// The directory answered with an error status.
    #[error("directory answered {0}")]
    DirectoryStatus(http::StatusCode),
    /// The directory lacks a resource.
    #[error("the directory has no {0}")]
    DirectoryMissing(&'static str),
    /// No `Replay-Nonce` header.
    #[error("the CA gave no Replay-Nonce")]
    NoNonce,
    /// Two fresh nonces refused in a row.
    #[error("the CA refused two fresh nonces")]
    Nonces,
    /// `newAccount` answered without the account's URL.
    #[error("newAccount answered without a Location")]
    NoLocation,
    /// The issued chain or key does not load or does not match.
    #[error("the issued certificate is unusable: {0}")]
    Unusable(#[from] super::cert::CertError),
    /// Anything else the ACME client reported.
    #[error("{}", ratls::error_chain(.0.as_ref()))]
    Other(Box<dyn std::error::Error + Send + Sync>),
}

/// Why validation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Validation {
    /// The CA's problem document.
    #[error("{0}")]
    Problem(Problem),
    /// The order never became ready.
    #[error("the order did not become ready in time")]
    NotReady,
}

/// Why the ACME account key is unusable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// No hash of the seed was a P-256 scalar (once in 2^32 per try; 64 tries).
    #[error("no usable P-256 scalar from the seed")]
    NoScalar,
    /// PKCS#8 encoding or decoding failed.
    #[error("PKCS#8: {0}")]
    Pkcs8(#[from] p256::pkcs8::Error),
    /// The crypto backend refused the key.
    #[error("{0}")]
    Rejected(#[from] aws_lc_rs::error::KeyRejected),
    /// The public key has no affine point.
    #[error("no public point")]
    NoPublicPoint,
}

/// A failure on this side.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LocalError {
    /// The guest agent did not give a key (the account's, a domain's).
    #[error(transparent)]
    Seed(#[from] SeedError),
    /// The account key cannot be derived, encoded or loaded.
    #[error("account key: {0}")]
    Key(#[from] KeyError),
    /// The EAB HMAC key is not base64url.
    #[error("acme.eab_hmac_key: {0}")]
    HmacKey(#[from] crate::base64url::NotBase64url),
    /// Signing a request failed.
    #[error("signing failed")]
    Signing,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] super::store::StoreError),
    /// The account record cannot be written.
    #[error("account record: {0}")]
    Record(#[from] serde_json::Error),
    /// A request could not be built.
    #[error("request: {0}")]
    Request(#[from] http::Error),
    /// The internal CA could not issue.
    #[error("internal CA: {0}")]
    InternalCa(#[from] super::internal::InternalCaError),
    /// The domain's issuer is not set up.
    #[error("no issuer configured")]
    NoIssuer,
    /// The derived certificate key (`key_source = "derived"`) could not be made.
    #[error("derived certificate key: {0}")]
    DomainKey(String),
    /// The ACME client refused our input.
    #[error(transparent)]
    Acme(instant_acme::Error),
}

const ACCOUNT_GONE: &str = "urn:ietf:params:acme:error:accountDoesNotExist";

/// Transport failures, kept apart from the CA's answers.
#[derive(Debug, thiserror::Error)]
pub enum Transport {
    /// Connecting or the exchange failed.
    #[error("{0}")]
    Failed(String),
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

pub(super) fn classify(e: instant_acme::Error) -> IssueError {
    match e {
        instant_acme::Error::Api(p) => {
            let problem = Problem::from(&p);
            let kind = p.r#type.as_deref().unwrap_or_default();
            if kind.ends_with(":rateLimited") || p.status == Some(429) {
                IssueError::RateLimited(problem)
            } else if p.status.is_some_and(|s| s >= 500) || kind.ends_with(":serverInternal") {
                IssueError::Server(CaFault::Problem(problem))
            } else if kind.ends_with(":connection")
                || kind.ends_with(":unauthorized")
                || kind.ends_with(":tls")
                || kind.ends_with(":dns")
                || kind.ends_with(":incorrectResponse")
            {
                IssueError::Validation(Validation::Problem(problem))
            } else {
                IssueError::Refused(problem)
            }
        }
        instant_acme::Error::Other(inner) => match inner.downcast::<Transport>() {
            Ok(t) => IssueError::Unreachable(Unreachable::Transport(*t)),
            Err(other) => match other.downcast::<DnsError>() {
                Ok(dns) => IssueError::Dns(*dns),
                Err(other) => IssueError::Server(CaFault::Other(other)),
            },
        },
        // A body that is not a problem document: an HTML error page, a proxy in the way.
        instant_acme::Error::Json(e) => IssueError::Server(CaFault::NotAcme(e.to_string())),
        instant_acme::Error::Timeout(_) => IssueError::Validation(Validation::NotReady),
        other => IssueError::Local(LocalError::Acme(other)),
    }
}

/// Whether a new order that named the certificate it replaces failed because of that: a
/// refusal (not a rate limit or a server error), or an order that does not reflect it.
fn refused_replaces(e: &instant_acme::Error) -> bool {
    match e {
        instant_acme::Error::Api(p) => {
            p.status.is_some_and(|s| s < 500)
                && !p
                    .r#type
                    .as_deref()
                    .is_some_and(|t| t.ends_with(":rateLimited"))
        }
        instant_acme::Error::Other(inner) => {
            inner.to_string().starts_with("replaces field mismatch")
        }
        _ => false,
    }
}

fn is_account_gone(e: &instant_acme::Error) -> bool {
    matches!(e, instant_acme::Error::Api(p) if p.r#type.as_deref() == Some(ACCOUNT_GONE))
}

type HttpsClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    BodyWrapper<Bytes>,
>;

/// HTTPS to the CA with our roots and a deadline on every request.
#[derive(Clone)]
struct CaHttp {
    client: HttpsClient,
    timeout: Duration,
}

tokio::task_local! {
    /// The `Retry-After` of the last 429 or 503 met by this task's order, which
    /// instant-acme's problem leaves out. Task-local: orders for several domains run at once
    /// on one client, and each must see its own refusal.
    static REFUSAL: std::cell::Cell<Option<Duration>>;
}

impl HttpClient for CaHttp {
    fn request(
        &self,
        req: http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let client = self.client.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let fetch = async move {
                let rsp = client.request(req).await.map_err(|e| {
                    instant_acme::Error::Other(Box::new(Transport::Failed(ratls::error_chain(&e))))
                })?;
                if matches!(rsp.status().as_u16(), 429 | 503) {
                    if let Some(wait) = super::ari::retry_after_header(rsp.headers()) {
                        // Outside an order (a probe, a renewal-window poll): not kept.
                        let _ = REFUSAL.try_with(|r| r.set(Some(wait)));
                    }
                }
                // Read the body under the same deadline: a CA that stalls mid-body is down.
                let (parts, body) = rsp.into_parts();
                let body = body.collect().await.map_err(|e| {
                    instant_acme::Error::Other(Box::new(Transport::Failed(e.to_string())))
                })?;
                let full = http_body_util::Full::new(body.to_bytes());
                Ok(BytesResponse::from(http::Response::from_parts(parts, full)))
            };
            tokio::time::timeout(timeout, fetch)
                .await
                .unwrap_or_else(|_| {
                    Err(instant_acme::Error::Other(Box::new(Transport::Timeout(
                        timeout,
                    ))))
                })
        })
    }
}

/// One ACME directory and our account on it.
pub struct AcmeClient {
    directory: String,
    http: CaHttp,
    agent: AgentClient,
    store: Arc<dyn CertStore>,
    email: Option<String>,
    eab: Option<Eab>,
    account: tokio::sync::Mutex<Option<Account>>,
    /// What the CA's directory says beyond the protocol's URLs, once read.
    meta: tokio::sync::OnceCell<super::ari::DirectoryMeta>,
    /// The ACME profile orders ask for (`ACME_PROFILE`).
    profile: Option<String>,
    /// Identities from the configuration, for CAs whose directory lists none.
    configured_identities: Vec<String>,
}

impl std::fmt::Debug for AcmeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeClient")
            .field("directory", &self.directory)
            .finish_non_exhaustive()
    }
}

/// What to order.
#[derive(Clone, Copy, Debug)]
pub struct OrderSpec<'a> {
    /// The names, the primary first.
    pub names: &'a [String],
    /// How control of them is shown.
    pub challenge: Challenge,
    /// The certificate's key (`None`: a new one).
    pub key: Option<&'a rcgen::KeyPair>,
    /// The certificate this one replaces (DER), named in the order where the CA speaks ARI.
    pub replacing: Option<&'a [u8]>,
    /// Who publishes DNS-01 challenges when no provider here can (`DNS_SETUP_MODE`).
    pub operator: Option<&'a dyn OperatorRecords>,
}

/// One order's inputs, as sent.
#[derive(Clone, Copy)]
struct How<'a> {
    names: &'a [String],
    challenge: Challenge,
    key: Option<&'a rcgen::KeyPair>,
    replaces: Option<&'a instant_acme::CertificateIdentifier<'static>>,
    operator: Option<&'a dyn OperatorRecords>,
}

/// What the issuer hands back: the chain and its new key, PEM.
#[derive(Clone)]
pub struct Issued {
    /// Leaf first.
    pub chain_pem: String,
    /// The certificate's private key.
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").finish_non_exhaustive()
    }
}

/// Why the app's secret at a `GetKey` path could not be had.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// The guest agent did not answer with it.
    #[error("key from the guest agent: {0}")]
    Agent(#[from] ratls::agent::AgentError),
    /// The agent's `GetKey` answer is not hex.
    #[error("the guest agent's GetKey answer is not hex")]
    NotHex,
}

/// The app's secret at `path` (the guest agent's `GetKey`): the same on every instance of the
/// app, out of reach of any other app. The seed of every key derived below.
pub async fn app_secret(
    agent: &AgentClient,
    path: &str,
    purpose: &str,
) -> Result<Vec<u8>, SeedError> {
    let reply = agent.get_key(path, purpose).await?;
    hex::decode(reply.key.trim_start_matches("0x")).map_err(|_| SeedError::NotHex)
}

/// The account key: a P-256 scalar hashed from the agent's `GetKey` seed for this directory.
/// Every instance of the app derives the same key, so they share one ACME account.
pub fn derive_account_key(seed: &[u8]) -> Result<PrivatePkcs8KeyDer<'static>, KeyError> {
    derive_p256(b"dstack-mesh acme account key v1\0", seed)
}

/// A domain's certificate key (`[acme] key_source = "derived"`): a P-256 scalar hashed from
/// the agent's `GetKey` seed at [`domain_key_path`].
pub fn derive_domain_key(seed: &[u8]) -> Result<PrivatePkcs8KeyDer<'static>, KeyError> {
    derive_p256(b"dstack-mesh domain key v1\0", seed)
}

/// The internal CA's key when instances must share it (etcd store, derived keys): a P-256
/// scalar hashed from the agent's `GetKey` seed at [`INTERNAL_CA_KEY_PATH`].
pub fn derive_internal_ca_key(seed: &[u8]) -> Result<PrivatePkcs8KeyDer<'static>, KeyError> {
    derive_p256(b"dstack-mesh internal CA key v1\0", seed)
}

/// The `GetKey` path of the shared internal CA's key.
pub const INTERNAL_CA_KEY_PATH: &str = "dstack-mesh/internal-ca/v1";

/// The `GetKey` path of a domain's derived certificate key (its primary name).
pub fn domain_key_path(domain: &str) -> String {
    format!("dstack-mesh/domain-key/v1/{domain}")
}

fn derive_p256(context: &[u8], seed: &[u8]) -> Result<PrivatePkcs8KeyDer<'static>, KeyError> {
    use p256::pkcs8::EncodePrivateKey;
    for counter in 0u32..64 {
        let mut input = context.to_vec();
        input.extend_from_slice(seed);
        input.extend_from_slice(&counter.to_be_bytes());
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &input);
        // Out of range for the curve order once in 2^32 tries: hash again.
        if let Ok(secret) = p256::SecretKey::from_slice(digest.as_ref()) {
            let doc = secret.to_pkcs8_der()?;
            return Ok(PrivatePkcs8KeyDer::from(doc.as_bytes().to_vec()));
        }
    }
    Err(KeyError::NoScalar)
}

/// The `GetKey` path of the account key for `directory`.
pub fn account_key_path(directory: &str) -> String {
    format!("dstack-mesh/acme-account/{directory}")
}

impl AcmeClient {
    /// A client for `directory`, trusting the WebPKI roots plus `extra_roots`.
    pub fn new(
        directory: &str,
        extra_roots: &[rustls_pki_types::CertificateDer<'static>],
        timeout: Duration,
        agent: AgentClient,
        store: Arc<dyn CertStore>,
        email: Option<String>,
        eab: Option<Eab>,
    ) -> Result<Self, crate::https::RootsError> {
        let tls = crate::https::client_config(extra_roots)?;
        let https = crate::https::connector(tls, crate::https::dialer(timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(https);
        Ok(Self {
            directory: directory.to_owned(),
            http: CaHttp { client, timeout },
            agent,
            store,
            email,
            eab,
            account: tokio::sync::Mutex::new(None),
            meta: tokio::sync::OnceCell::new(),
            profile: None,
            configured_identities: Vec::new(),
        })
    }

    /// Orders ask for this profile (it must be among the directory's `meta.profiles`).
    pub fn with_profile(mut self, profile: Option<String>) -> Self {
        self.profile = profile;
        self
    }

    /// The directory's `renewalInfo`, `meta.profiles` and `meta.caaIdentities` (read once;
    /// a failed read is tried again next time).
    pub(super) async fn meta(&self) -> Result<&super::ari::DirectoryMeta, IssueError> {
        self.meta
            .get_or_try_init(|| async {
                let req = http::Request::get(&self.directory)
                    .body(BodyWrapper::default())
                    .map_err(LocalError::from)?;
                let mut rsp = self.http.request(req).await.map_err(classify)?;
                let status = rsp.parts.status;
                if !status.is_success() {
                    return Err(IssueError::Server(CaFault::DirectoryStatus(status)));
                }
                let body = rsp
                    .body
                    .into_bytes()
                    .await
                    .map_err(|e| IssueError::Unreachable(Unreachable::Body(e)))?;
                let dir: serde_json::Value = serde_json::from_slice(&body)
                    .map_err(|e| IssueError::Server(CaFault::NotAcme(e.to_string())))?;
                Ok(super::ari::DirectoryMeta::read(&dir))
            })
            .await
    }

    /// GET `url` with the CA's client (deadline, roots): status, `Retry-After` and body.
    pub(super) async fn get(
        &self,
        url: &str,
    ) -> Result<(http::StatusCode, Option<String>, Bytes), IssueError> {
        let req = http::Request::get(url)
            .body(BodyWrapper::default())
            .map_err(LocalError::from)?;
        let mut rsp = self.http.request(req).await.map_err(classify)?;
        let retry_after = rsp
            .parts
            .headers
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let status = rsp.parts.status;
        let body = rsp
            .body
            .into_bytes()
            .await
            .map_err(|e| IssueError::Unreachable(Unreachable::Body(e)))?;
        Ok((status, retry_after, body))
    }

    /// Identities to use when the directory lists none (`[dns] caa_identities`).
    pub fn with_caa_identities(mut self, identities: Vec<String>) -> Self {
        self.configured_identities = identities;
        self
    }

    /// The domains this CA recognises in CAA records: the directory's `meta.caaIdentities`,
    /// else the configured ones; empty when neither says (then CAA checks skip the CA name).
    pub async fn caa_identities(&self) -> Vec<String> {
        match self.meta().await {
            Ok(meta) if !meta.caa_identities.is_empty() => meta.caa_identities.clone(),
            _ => self.configured_identities.clone(),
        }
    }

    /// The directory URL.
    pub fn directory(&self) -> &str {
        &self.directory
    }

    /// A cheap check that the CA answers its directory: one GET, no account, no nonce.
    pub async fn probe(&self) -> Result<(), IssueError> {
        let req = http::Request::get(&self.directory)
            .body(BodyWrapper::default())
            .map_err(LocalError::from)?;
        let rsp = self.http.request(req).await.map_err(classify)?;
        let status = rsp.parts.status;
        match status.is_success() {
            true => Ok(()),
            false => Err(IssueError::Server(CaFault::DirectoryStatus(status))),
        }
    }

    fn store_key(&self) -> String {
        let digest =
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, self.directory.as_bytes());
        format!("accounts/{}.json", hex::encode(&digest.as_ref()[..12]))
    }

    async fn derived_key(&self) -> Result<PrivatePkcs8KeyDer<'static>, IssueError> {
        let seed = app_secret(
            &self.agent,
            &account_key_path(&self.directory),
            "acme-account",
        )
        .await
        .map_err(LocalError::from)?;
        Ok(derive_account_key(&seed).map_err(LocalError::from)?)
    }

    fn builder(&self) -> instant_acme::AccountBuilder {
        Account::builder_with_http(Box::new(self.http.clone()))
    }

    /// The account: cached, else restored from the stored URL, else registered.
    async fn account(&self, fresh: bool) -> Result<Account, IssueError> {
        let mut cached = self.account.lock().await;
        if fresh {
            *cached = None;
        }
        if let Some(account) = cached.as_ref() {
            return Ok(account.clone());
        }
        let stored = self
            .store
            .read(&self.store_key())
            .map_err(LocalError::from)?
            .and_then(|b| serde_json::from_slice::<AccountRecord>(&b).ok())
            .filter(|r| r.directory == self.directory);
        let account = match (stored, fresh) {
            (Some(record), false) => self.restore(record).await?,
            _ => self.register().await?,
        };
        *cached = Some(account.clone());
        Ok(account)
    }

    async fn restore(&self, record: AccountRecord) -> Result<Account, IssueError> {
        let key = self.derived_key().await?;
        self.builder()
            .from_parts(record.url, key, self.directory.clone())
            .await
            .map_err(classify)
    }

    async fn register(&self) -> Result<Account, IssueError> {
        let contact = self.email.as_ref().map(|e| format!("mailto:{e}"));
        let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
        let pkcs8 = self.derived_key().await?;
        let account = match &self.eab {
            Some(eab) => {
                let url = super::eab::register(&self.http, &self.directory, &pkcs8, eab, &contacts)
                    .await?;
                self.builder()
                    .from_parts(url, pkcs8, self.directory.clone())
                    .await
                    .map_err(classify)?
            }
            None => {
                let key = Key::from_pkcs8_der(pkcs8.clone_key()).map_err(classify)?;
                let (account, _) = self
                    .builder()
                    .create_from_key((key, PrivateKeyDer::Pkcs8(pkcs8)), self.directory.clone())
                    .await
                    .map_err(classify)?;
                if !contacts.is_empty() {
                    if let Err(e) = account.update_contacts(&contacts).await {
                        tracing::warn!(directory = %self.directory, error = %e, "ACME account contact not updated");
                    }
                }
                account
            }
        };
        let record = AccountRecord {
            directory: self.directory.clone(),
            url: account.id().to_owned(),
        };
        let bytes = serde_json::to_vec_pretty(&record).map_err(LocalError::from)?;
        self.store
            .write(&self.store_key(), &bytes, false)
            .map_err(LocalError::from)?;
        tracing::info!(directory = %self.directory, account = %account.id(), "ACME account ready");
        Ok(account)
    }

    /// What the evidence says about this account: directory, URL (when registered) and the
    /// public key (the same for every replica).
    pub async fn describe(&self) -> serde_json::Value {
        let url = self
            .store
            .read(&self.store_key())
            .ok()
            .flatten()
            .and_then(|b| serde_json::from_slice::<AccountRecord>(&b).ok())
            .map(|r| r.url);
        let key = match self.derived_key().await {
            Ok(pkcs8) => super::eab::jwk(&pkcs8).ok(),
            Err(_) => None,
        };
        serde_json::json!({ "directory": self.directory, "uri": url, "key": key })
    }

    /// The account URL, registering if needed.
    pub async fn account_url(&self) -> Result<String, IssueError> {
        Ok(self.account(false).await?.id().to_owned())
    }

    /// Revoke `leaf` (DER) as the account that ordered it; `true` when the CA had already
    /// revoked it.
    pub async fn revoke(
        &self,
        leaf: &[u8],
        reason: super::revoke::Reason,
    ) -> Result<bool, IssueError> {
        let account = self.account(false).await?;
        let certificate = rustls_pki_types::CertificateDer::from(leaf);
        let request = instant_acme::RevocationRequest {
            certificate: &certificate,
            reason: Some(reason.acme()),
        };
        match account.revoke(&request).await {
            Ok(()) => Ok(false),
            Err(instant_acme::Error::Api(p))
                if p.r#type
                    .as_deref()
                    .is_some_and(|t| t.ends_with(":alreadyRevoked")) =>
            {
                Ok(true)
            }
            Err(e) => Err(classify(e)),
        }
    }

    /// Order a certificate as `spec` says. A rate limit carries the CA's `Retry-After`.
    pub async fn issue(
        &self,
        spec: &OrderSpec<'_>,
        challenges: &Challenges,
        dns: Option<&Dns>,
    ) -> Result<Issued, IssueError> {
        REFUSAL
            .scope(std::cell::Cell::new(None), async {
                let result = self.order_as(spec, challenges, dns).await;
                let retry_after = REFUSAL.with(std::cell::Cell::take);
                result.map_err(|e| match e {
                    IssueError::RateLimited(mut p) => {
                        p.retry_after = retry_after;
                        IssueError::RateLimited(p)
                    }
                    other => other,
                })
            })
            .await
    }

    async fn order_as(
        &self,
        spec: &OrderSpec<'_>,
        challenges: &Challenges,
        dns: Option<&Dns>,
    ) -> Result<Issued, IssueError> {
        let OrderSpec {
            names,
            challenge,
            key,
            replacing,
            operator,
        } = *spec;
        let account = self.account(false).await?;
        let meta = self.meta().await?;
        if let Some(profile) = &self.profile {
            if !meta.profiles.iter().any(|p| p == profile) {
                return Err(IssueError::Profile {
                    profile: profile.clone(),
                    directory: self.directory.clone(),
                    offered: match meta.profiles.is_empty() {
                        true => "it advertises no profiles".into(),
                        false => format!("it offers {}", meta.profiles.join(", ")),
                    },
                });
            }
        }
        // `replaces` only where the CA speaks ARI (others refuse the field).
        let replaces = match (replacing, meta.renewal_info.is_some()) {
            (Some(leaf), true) => super::ari::cert_id(leaf).ok(),
            _ => None,
        };
        if let Some(dns) = dns.filter(|d| d.checks_caa()) {
            let identities = self.caa_identities().await;
            let req = caa::Request {
                identities: &identities,
                account: Some(account.id()),
                method: challenge.as_str(),
            };
            dns.check_caa(names, &req).await?;
        }
        let how = How {
            names,
            challenge,
            key,
            replaces: replaces.as_ref(),
            operator,
        };
        match self.order(&account, &how, challenges, dns).await {
            // A CA that lost the account (a reset, a restarted pebble): same key, new account.
            Err(e) if is_account_gone(&e) => {
                tracing::warn!(directory = %self.directory, "the CA does not know our account any more: registering again with the same key");
                let account = self.account(true).await?;
                self.order(&account, &how, challenges, dns)
                    .await
                    .map_err(classify)
            }
            // The certificate was replaced already, the CA does not know it, or it took
            // `replaces` without reflecting it: an order without `replaces` is still an order.
            Err(e) if how.replaces.is_some() && refused_replaces(&e) => {
                tracing::warn!(directory = %self.directory, error = %e, "the CA refused the order that replaces the current certificate: ordering without replaces");
                let plain = How {
                    replaces: None,
                    ..how
                };
                self.order(&account, &plain, challenges, dns)
                    .await
                    .map_err(classify)
            }
            other => other.map_err(classify),
        }
    }

    // Long on purpose: one ACME order in the protocol's order (new order, authorizations,
    // challenges, ready, finalize, certificate), each CA answer handled where it arrives.
    async fn order(
        &self,
        account: &Account,
        how: &How<'_>,
        challenges: &Challenges,
        dns: Option<&Dns>,
    ) -> Result<Issued, instant_acme::Error> {
        let How {
            names,
            challenge,
            key,
            replaces,
            operator,
        } = *how;
        let dns_failed = |e: DnsError| instant_acme::Error::Other(Box::new(e));
        let identifiers: Vec<Identifier> = names.iter().cloned().map(Identifier::Dns).collect();
        let mut new_order = NewOrder::new(&identifiers);
        if let Some(profile) = &self.profile {
            new_order = new_order.profile(profile);
        }
        if let Some(id) = replaces {
            new_order = new_order.replaces(id.clone());
        }
        let mut order = account.new_order(&new_order).await?;
        let mut tokens = Vec::new();
        let mut placed = Vec::new();
        let mut by_operator = Vec::new();
        let mut shared: Vec<Response> = Vec::new();
        let result = async {
            let mut authorizations = order.authorizations();
            while let Some(authz) = authorizations.next().await {
                let mut authz = authz?;
                match authz.status {
                    AuthorizationStatus::Valid => continue,
                    AuthorizationStatus::Pending => {}
                    other => {
                        return Err(instant_acme::Error::Other(
                            format!("authorization for {} is {other:?}", authz.identifier()).into(),
                        ))
                    }
                }
                let wanted = match challenge {
                    Challenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
                    Challenge::Http01 => ChallengeType::Http01,
                    Challenge::Dns01 => ChallengeType::Dns01,
                };
                let name = authz.identifier().to_string();
                let Some(mut handle) = authz.challenge(wanted.clone()) else {
                    return Err(instant_acme::Error::Other(
                        format!("the CA offers no {wanted:?} challenge for {name}").into(),
                    ));
                };
                let key_auth = handle.key_authorization();
                let response = match challenge {
                    Challenge::TlsAlpn01 => Response::TlsAlpn01 {
                        name: name.clone(),
                        digest: hex::encode(key_auth.digest()),
                    },
                    Challenge::Http01 => {
                        tokens.push(handle.token.clone());
                        Response::Http01 {
                            token: handle.token.clone(),
                            key_authorization: key_auth.as_str().to_owned(),
                        }
                    }
                    // Every record goes up before the CA is told to look: a wildcard and its
                    // base share one name, and propagation is awaited once for all.
                    Challenge::Dns01 => {
                        let dns = dns.ok_or_else(|| dns_failed(DnsError::NoProvider))?;
                        let value = key_auth.dns_value();
                        match (dns.operator_places(), operator) {
                            (true, Some(_)) => {
                                by_operator.push(dns.challenge_record(&name, &value))
                            }
                            (true, None) => return Err(dns_failed(DnsError::NoProvider)),
                            (false, _) => placed.push(
                                dns.place_challenge(&name, &value)
                                    .await
                                    .map_err(dns_failed)?,
                            ),
                        }
                        continue;
                    }
                };
                // Answered here, and by every other instance of the app before the CA looks:
                // its validation may reach any of them.
                challenges
                    .apply(&response)
                    .map_err(|e| instant_acme::Error::Other(Box::new(e)))?;
                shared.push(response.clone());
                challenges
                    .publish(&response)
                    .await
                    .map_err(|e| instant_acme::Error::Other(e.into()))?;
                handle.set_ready().await?;
            }
            if let (Some(dns), false) = (dns, placed.is_empty()) {
                dns.wait_visible(&placed).await.map_err(dns_failed)?;
            }
            if let (Some(operator), false) = (operator, by_operator.is_empty()) {
                operator.publish(&by_operator).await.map_err(dns_failed)?;
            }
            if !(placed.is_empty() && by_operator.is_empty()) {
                let mut authorizations = order.authorizations();
                while let Some(authz) = authorizations.next().await {
                    let mut authz = authz?;
                    if authz.status != AuthorizationStatus::Pending {
                        continue;
                    }
                    if let Some(mut handle) = authz.challenge(ChallengeType::Dns01) {
                        handle.set_ready().await?;
                    }
                }
            }
            // Pebble and Let's Encrypt validate within tens of milliseconds: poll fast first.
            let polls = RetryPolicy::new()
                .initial_delay(Duration::from_millis(20))
                .backoff(1.5)
                .timeout(Duration::from_secs(90));
            let status = order.poll_ready(&polls).await?;
            if status != OrderStatus::Ready {
                return Err(instant_acme::Error::Api(
                    self.validation_problem(&mut order).await,
                ));
            }
            let fresh;
            let key = match key {
                Some(key) => key,
                None => {
                    fresh = rcgen::KeyPair::generate()
                        .map_err(|e| instant_acme::Error::Other(Box::new(e)))?;
                    &fresh
                }
            };
            let csr = rcgen::CertificateParams::new(names.to_vec())
                .and_then(|p| p.serialize_request(key))
                .map_err(|e| instant_acme::Error::Other(Box::new(e)))?;
            order.finalize_csr(csr.der()).await?;
            let chain_pem = order.poll_certificate(&polls).await?;
            Ok(Issued {
                chain_pem,
                key_pem: key.serialize_pem(),
            })
        }
        .await;
        challenges.remove(names, &tokens);
        for response in &shared {
            challenges.withdraw(response).await;
        }
        if let Some(dns) = dns {
            dns.remove(&placed).await;
        }
        for record in &by_operator {
            tracing::info!(record = %record, "the order is over: this DNS-01 challenge record may be removed");
        }
        result
    }

    /// The CA's reason for an invalid order, from the failed challenge.
    async fn validation_problem(&self, order: &mut instant_acme::Order) -> instant_acme::Problem {
        let mut authorizations = order.authorizations();
        while let Some(Ok(mut authz)) = authorizations.next().await {
            if let Ok(state) = authz.refresh().await {
                if let Some(problem) = state.challenges.iter().find_map(|c| c.error.clone()) {
                    return problem;
                }
            }
        }
        serde_json::from_value(serde_json::json!({
            "type": "urn:ietf:params:acme:error:unauthorized",
            "detail": "the order became invalid without a reason from the CA",
        }))
        .unwrap_or_else(|_| unreachable!("static problem document"))
    }
}

/// What the store keeps about an account: never the key, which the agent derives again.
#[derive(serde::Serialize, serde::Deserialize)]
struct AccountRecord {
    directory: String,
    url: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_keys_are_stable_and_usable() {
        let a = derive_account_key(b"seed one").unwrap();
        let b = derive_account_key(b"seed one").unwrap();
        let c = derive_account_key(b"seed two").unwrap();
        assert_eq!(a.secret_pkcs8_der(), b.secret_pkcs8_der());
        assert_ne!(a.secret_pkcs8_der(), c.secret_pkcs8_der());
        // aws-lc-rs (through instant-acme) accepts it as a signing key.
        Key::from_pkcs8_der(a.clone_key()).unwrap();
        // A domain key from the same seed is another key; rcgen signs CSRs with it.
        let d = derive_domain_key(b"seed one").unwrap();
        assert_eq!(
            d.secret_pkcs8_der(),
            derive_domain_key(b"seed one").unwrap().secret_pkcs8_der()
        );
        assert_ne!(d.secret_pkcs8_der(), a.secret_pkcs8_der());
        rcgen::KeyPair::try_from(d.secret_pkcs8_der()).unwrap();
    }

    #[test]
    fn problems_are_classified() {
        let problem =
            |v: serde_json::Value| instant_acme::Error::Api(serde_json::from_value(v).unwrap());
        assert!(matches!(
            classify(problem(serde_json::json!({"type": "urn:ietf:params:acme:error:rateLimited", "detail": "too many", "status": 429}))),
            IssueError::RateLimited(p) if p.text.contains("too many")
        ));
        assert!(matches!(
            classify(problem(
                serde_json::json!({"type": "urn:ietf:params:acme:error:serverInternal", "status": 500})
            )),
            IssueError::Server(_)
        ));
        assert!(matches!(
            classify(problem(
                serde_json::json!({"type": "urn:ietf:params:acme:error:connection", "status": 400})
            )),
            IssueError::Validation(_)
        ));
        assert!(is_account_gone(&problem(
            serde_json::json!({"type": ACCOUNT_GONE})
        )));
    }
}
