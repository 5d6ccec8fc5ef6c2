//! The `auth_request` backend for deployments that keep nginx (dstack-vpc's auth service).
//!
//! `GET /auth` reads `x-client-verify` and `x-client-cert` and answers `200` with
//! `x-dstack-app-id` (and `x-dstack-instance-id`), `401` when there is no usable certificate,
//! `403` when the certificate is good but its app is not allowed. It does not take nginx's
//! word for the caller: it checks validity, EKU, usage, app id and allowlist itself, and the
//! chain too when it can. nginx hands over only the leaf, so for a KMS leaf (whose App CA
//! nginx saw but did not pass on) the chain is the one thing nginx vouches for, and only a
//! request that proves it comes from our nginx (the per-deployment secret the rendered
//! configuration sends) gets that trust; anything else must verify here to the trust anchors.
//!
//! Decisions are cached by the certificate's fingerprint and whether nginx vouched: grants
//! until the certificate expires, refusals for a minute. A new policy clears the cache.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use arc_swap::ArcSwap;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use nginx_compat::auth_request::{self, ClientVerify};
use ratls::{PeerRole, Policy, Rejection, VerifiedPeer};
use rustls_pki_types::UnixTime;
use tokio::{net::TcpListener, time::Instant};

use crate::{
    config::Secret,
    proxy::{self, conn::Lifetime, Body},
};

/// How long a refusal is remembered (a grant lasts until the certificate expires).
const DENY_TTL: Duration = Duration::from_secs(60);
/// Most decisions kept; past this, expired ones go, then all.
const CACHE_ENTRIES: usize = 10_000;

/// What the service answered, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// 200 with the caller's identity.
    Allow(VerifiedPeer),
    /// 401: no certificate, or not one the mesh accepts.
    Unauthorized(Unauthorized),
    /// 403: a good certificate for an app that is not allowed.
    Forbidden(Rejection),
}

/// Why a caller got 401.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Unauthorized {
    /// nginx saw no client certificate, or none reached us.
    #[error("no client certificate")]
    NoCertificate,
    /// nginx's own verification failed (its `$ssl_client_verify` text).
    #[error("nginx could not verify the certificate: {0}")]
    NginxFailed(String),
    /// The certificate header cannot be read.
    #[error(transparent)]
    Header(#[from] auth_request::CertHeaderError),
    /// The certificate is not one the mesh accepts.
    #[error("{0} ({reason})", reason = .0.reason())]
    Rejected(Rejection),
}

/// Where a request's word on the chain comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vouch {
    /// It proved itself our nginx's: nginx verified the chain against the mesh's roots.
    Nginx,
    /// Anyone: the chain must verify here.
    Nobody,
}

/// How a request proves it comes from our nginx.
#[derive(Clone, Debug, Default)]
pub enum NginxProof {
    /// It cannot: nginx's word is never taken.
    #[default]
    Never,
    /// It carries this secret (the configuration `nginx-config server` renders sends it).
    Secret(Secret),
    /// It comes from loopback: dstack-vpc's template, which sends no secret, talks to
    /// 127.0.0.1, and callers in other containers have addresses of their own.
    Loopback,
}

#[derive(Debug)]
struct Entry {
    decision: Decision,
    expires: Instant,
}

/// The auth service: a policy and a decision cache.
#[derive(Debug)]
pub struct AuthService {
    policy: ArcSwap<Policy>,
    cache: Mutex<HashMap<([u8; 32], bool), Entry>>,
    /// What makes a request our nginx's.
    nginx: NginxProof,
    drain: proxy::Drain,
    /// nginx's request head must arrive within this.
    header_timeout: Duration,
    /// Connections at once, over every socket this service serves (one per worker thread).
    connections: Arc<tokio::sync::Semaphore>,
}

impl AuthService {
    /// A service holding callers to `policy`. A request that proves itself our nginx's
    /// (`nginx`) has nginx's `SUCCESS` taken for the chain of a lone leaf whose App CA nginx
    /// kept (everything else is still checked here); any other request passes only with a
    /// chain this service verifies itself.
    pub fn new(policy: Arc<Policy>, nginx: NginxProof) -> Self {
        Self {
            policy: ArcSwap::new(policy),
            cache: Mutex::new(HashMap::new()),
            drain: proxy::Drain::default(),
            nginx,
            header_timeout: crate::config::DEFAULT_AUTH_HEADER_TIMEOUT,
            connections: Arc::new(tokio::sync::Semaphore::new(
                crate::config::DEFAULT_AUTH_MAX_CONNECTIONS,
            )),
        }
    }

    /// Serve with `header_timeout` and at most `max_connections` at once.
    pub fn with_limits(mut self, header_timeout: Duration, max_connections: usize) -> Self {
        self.header_timeout = header_timeout;
        self.connections = Arc::new(tokio::sync::Semaphore::new(max_connections));
        self
    }

    /// Whether a request from `remote` that presented `proof` comes from our nginx (the
    /// secret compared in constant time: it must not leak through timing).
    pub fn vouch(&self, proof: Option<&[u8]>, remote: SocketAddr) -> Vouch {
        let nginx = match (&self.nginx, proof) {
            (NginxProof::Secret(secret), Some(proof)) => {
                constant_time_eq(secret.0.as_bytes(), proof)
            }
            (NginxProof::Loopback, _) => remote.ip().is_loopback(),
            _ => false,
        };
        match nginx {
            true => Vouch::Nginx,
            false => Vouch::Nobody,
        }
    }

    /// Replace the policy (a new allowlist); every cached decision goes with the old one.
    pub fn set_policy(&self, policy: Arc<Policy>) {
        self.policy.store(policy);
        self.lock_cache().clear();
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<([u8; 32], bool), Entry>> {
        // A panic elsewhere while holding the lock leaves a cache, not a broken invariant.
        self.cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// How many decisions are cached.
    pub fn cached_decisions(&self) -> usize {
        self.lock_cache().len()
    }

    /// Decide on nginx's two headers; `vouch` says whether nginx's word on the chain counts.
    pub fn decide(&self, verify: Option<&str>, cert: Option<&str>, vouch: Vouch) -> Decision {
        match ClientVerify::parse(verify) {
            ClientVerify::Success => {}
            ClientVerify::None => return Decision::Unauthorized(Unauthorized::NoCertificate),
            ClientVerify::Failed(why) => {
                return Decision::Unauthorized(Unauthorized::NginxFailed(why))
            }
        }
        let Some(cert) = cert.filter(|c| !c.trim().is_empty()) else {
            return Decision::Unauthorized(Unauthorized::NoCertificate);
        };
        let digest: [u8; 32] =
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert.trim().as_bytes())
                .as_ref()
                .try_into()
                .unwrap_or([0; 32]);
        let key = (digest, vouch == Vouch::Nginx);
        let now = Instant::now();
        if let Some(entry) = self.lock_cache().get(&key) {
            if entry.expires > now {
                return entry.decision.clone();
            }
        }
        let (decision, cacheable) = self.verify(cert, vouch);
        if !cacheable {
            // Garbage is cheap to refuse again and must not push real decisions out.
            return decision;
        }
        let ttl = match &decision {
            Decision::Allow(peer) => {
                let left = peer.not_after - crate::clock::unix_now();
                Duration::from_secs(left.max(0) as u64)
            }
            _ => DENY_TTL,
        };
        let mut cache = self.lock_cache();
        if cache.len() >= CACHE_ENTRIES {
            // Make room: expired entries first, then refusals; grants are never flushed
            // wholesale, and if the cache is still full this decision is simply not kept.
            cache.retain(|_, e| e.expires > now);
            if cache.len() >= CACHE_ENTRIES {
                cache.retain(|_, e| matches!(e.decision, Decision::Allow(_)));
            }
        }
        if cache.len() < CACHE_ENTRIES {
            cache.insert(
                key,
                Entry {
                    decision: decision.clone(),
                    expires: now + ttl,
                },
            );
        }
        decision
    }

    /// The decision, and whether it may be cached (a header that is not a certificate is not).
    fn verify(&self, header: &str, vouch: Vouch) -> (Decision, bool) {
        let certs = match auth_request::client_certs(Some(header)) {
            Ok(certs) => certs,
            Err(e) => return (Decision::Unauthorized(e.into()), false),
        };
        let policy = self.policy.load();
        let now = UnixTime::now();
        let mut result = policy.verify(&certs[0], &certs[1..], PeerRole::Client, now);
        // nginx passes the leaf only; its App CA stayed with nginx, which verified the chain
        // against the same roots (checked at start). Only our nginx's word counts.
        if certs.len() == 1
            && matches!(result, Err(Rejection::UnknownIssuer))
            && vouch == Vouch::Nginx
        {
            result = policy.verify_leaf_vouched(&certs[0], PeerRole::Client, now);
        }
        let decision = match result {
            Ok(peer) => Decision::Allow(peer),
            Err(r @ Rejection::AppIdNotAllowed(_)) => Decision::Forbidden(r),
            Err(r) => Decision::Unauthorized(Unauthorized::Rejected(r)),
        };
        (decision, true)
    }

    /// Stop with `drain` (SIGTERM) instead of a private one.
    pub fn with_drain(mut self, drain: proxy::Drain) -> Self {
        self.drain = drain;
        self
    }

    /// Serve on `listener` until the future is dropped or the drain starts.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        // nginx keeps a few keep-alive connections; the limit only stops a runaway client.
        while let Some((tcp, remote, hold)) =
            proxy::accept(&listener, &self.connections, None, "auth", &self.drain).await
        {
            let this = self.clone();
            tokio::spawn(async move {
                let lifetime = Lifetime::until_drain("auth", remote, this.drain.clone());
                let header_timeout = this.header_timeout;
                let service = service_fn(move |req| {
                    let this = this.clone();
                    async move { Ok::<_, Infallible>(this.handle(&req, remote)) }
                });
                let conn =
                    proxy::conn::http1(header_timeout).serve_connection(TokioIo::new(tcp), service);
                lifetime.drive(conn, |c| c.graceful_shutdown()).await;
                drop(hold);
            });
        }
    }

    fn handle(&self, req: &Request<Incoming>, remote: SocketAddr) -> Response<Body> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/health") | (&Method::HEAD, "/health") => {
                proxy::text_response(StatusCode::OK, "healthy\n")
            }
            (&Method::GET, "/auth") => {
                let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
                let vouch = self.vouch(
                    req.headers()
                        .get(auth_request::NGINX_SECRET)
                        .map(HeaderValue::as_bytes),
                    remote,
                );
                let decision = self.decide(
                    header(auth_request::CLIENT_VERIFY),
                    header(auth_request::CLIENT_CERT),
                    vouch,
                );
                let uri = header("x-original-uri").unwrap_or("-");
                respond(decision, remote, uri)
            }
            _ => proxy::error_response(StatusCode::NOT_FOUND, "not found"),
        }
    }
}

fn respond(decision: Decision, remote: SocketAddr, uri: &str) -> Response<Body> {
    match decision {
        Decision::Allow(peer) => {
            tracing::debug!(%remote, caller = %peer.app_id, uri, "auth granted");
            let mut resp = proxy::text_response(StatusCode::OK, "");
            let headers = resp.headers_mut();
            if let Ok(v) = HeaderValue::from_str(&peer.app_id.to_string()) {
                headers.insert(auth_request::APP_ID, v);
            }
            if let Some(Ok(v)) = peer.instance_id.as_deref().map(HeaderValue::from_str) {
                headers.insert(auth_request::INSTANCE_ID, v);
            }
            resp
        }
        Decision::Unauthorized(why) => {
            tracing::warn!(%remote, uri, reason = %why, "auth refused (401)");
            proxy::error_response(StatusCode::UNAUTHORIZED, "client certificate required")
        }
        Decision::Forbidden(why) => {
            tracing::warn!(%remote, uri, reason = %why, "auth refused (403)");
            proxy::error_response(StatusCode::FORBIDDEN, "app not allowed")
        }
    }
}

/// `a == b` in time that depends on the lengths only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
