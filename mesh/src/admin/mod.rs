//! The admin listener (default `127.0.0.1:8090`): health, readiness, certificates and their
//! metrics, and the renew action `dstack-mesh certs renew` calls. Read-only but for that one
//! POST; it listens on loopback unless told otherwise.

pub mod page;

use std::sync::Arc;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, NoLabelSet},
    metrics::MetricType,
};
use ratls::identity::RotatingIdentity;
use tokio::net::TcpListener;

use crate::{
    acme::{revoke::Reason, Acme},
    inbound::{Inbound, MeshRoute},
    metrics::Metrics,
    outbound::Outbound,
    proxy::{self, Body},
};

const MAX_CONNECTIONS: usize = 64;

/// The domain of `/certs/{domain}/renew`; `None` for any other path.
pub(crate) fn renew_target(path: &str) -> Option<&str> {
    // Stripped, not sliced: in `/certs/renew` the prefix and suffix share a slash, and slicing
    // between them panicked the connection's task (found by the admin_input fuzz target).
    path.strip_prefix("/certs/")?.strip_suffix("/renew")
}

/// The domain and reason of `/certs/{domain}/revoke[?reason=…]` (`unspecified` when none is
/// given); `None` for any other path.
pub(crate) fn revoke_target(uri: &http::Uri) -> Option<Result<(String, Reason), String>> {
    let domain = uri
        .path()
        .strip_prefix("/certs/")?
        .strip_suffix("/revoke")?;
    let reason = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .find_map(|kv| kv.strip_prefix("reason="));
    Some(
        reason
            .map_or(Ok(Reason::Unspecified), str::parse)
            .map(|r| (domain.to_owned(), r)),
    )
}

/// What the sidecar serves now (`/routes`).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Routes {
    /// The mesh identity.
    pub identity: IdentityView,
    /// The inbound mesh route, when the listener is on.
    pub mesh: Option<MeshRoute>,
    /// Public domains and their certificates.
    pub domains: Vec<crate::acme::CertStatus>,
    /// Distinct peers seen since start.
    pub peers: PeerCounts,
    /// Attested TCP services (`[[inbound.tcp]]`).
    #[serde(default)]
    pub tcp: Vec<TcpRoute>,
    /// Tunnel ports (`[[tunnels]]`).
    #[serde(default)]
    pub tunnels: Vec<TunnelRoute>,
}

/// A TCP service, as shown.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct TcpRoute {
    /// Its name.
    pub name: String,
    /// Where it listens (as configured).
    pub listen: String,
    /// Its backend.
    pub backend: String,
    /// Who may connect, in words.
    pub allowed: String,
    /// Tunnels open now.
    pub open: usize,
}

/// A tunnel port, as shown.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct TunnelRoute {
    /// Its name.
    pub name: String,
    /// Where the app connects (as configured).
    pub listen: String,
    /// The target: `app:port`, with `@instance` when one is named.
    pub target: String,
    /// Tunnels open now.
    pub open: usize,
}

/// The identity, as shown.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct IdentityView {
    /// App id (hex).
    pub app_id: String,
    /// Instance id, when known.
    pub instance_id: Option<String>,
    /// The app's name.
    pub app_name: String,
    /// When the mesh certificate expires (Unix seconds).
    pub not_after: i64,
    /// What its attestation shows (the quote itself is not verified).
    pub attestation: ratls::AttestationStatus,
}

/// Distinct peers seen since start.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct PeerCounts {
    /// Callers (app ids and public domains).
    pub inbound: usize,
    /// Targets.
    pub outbound: usize,
}

/// What the admin endpoints report on.
#[derive(Debug)]
pub struct Admin {
    identity: RotatingIdentity,
    acme: arc_swap::ArcSwapOption<Acme>,
    inbound: Option<Arc<Inbound>>,
    outbound: Option<Arc<Outbound>>,
    tcp: Vec<Arc<crate::tunnel::TcpService>>,
    tunnels: Vec<Arc<crate::tunnel::TunnelPort>>,
    metrics: Arc<Metrics>,
    drain: proxy::Drain,
    attestor: Option<Arc<ratls::attested::Attestor>>,
}

impl Admin {
    /// Report on `identity` and, when configured, the public domains.
    pub fn new(identity: RotatingIdentity, acme: Option<Arc<Acme>>) -> Self {
        Self {
            identity,
            acme: arc_swap::ArcSwapOption::new(acme),
            inbound: None,
            outbound: None,
            tcp: Vec::new(),
            tunnels: Vec::new(),
            metrics: Arc::default(),
            drain: proxy::Drain::default(),
            attestor: None,
        }
    }

    /// Report on these public domains from now on (a reload replaced them).
    pub fn set_acme(&self, acme: Option<Arc<Acme>>) {
        self.acme.store(acme);
    }

    /// Also report the outbound proxy's connections and pool.
    pub fn with_outbound(mut self, outbound: Option<Arc<Outbound>>) -> Self {
        self.outbound = outbound;
        self
    }

    /// Render these request and handshake counters.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Stop with `drain` (SIGTERM) instead of a private one.
    pub fn with_drain(mut self, drain: proxy::Drain) -> Self {
        self.drain = drain;
        self
    }

    /// Also report these TCP services and tunnel ports.
    pub fn with_tunnels(
        mut self,
        tcp: Vec<Arc<crate::tunnel::TcpService>>,
        tunnels: Vec<Arc<crate::tunnel::TunnelPort>>,
    ) -> Self {
        self.tcp = tcp;
        self.tunnels = tunnels;
        self
    }

    /// Also report on the attestation policy's collateral.
    pub fn with_attestor(mut self, attestor: Option<Arc<ratls::attested::Attestor>>) -> Self {
        self.attestor = attestor;
        self
    }

    /// Also report the inbound listener's mesh route.
    pub fn with_inbound(mut self, inbound: Option<Arc<Inbound>>) -> Self {
        self.inbound = inbound;
        self
    }

    /// What is served, read from the running listener and domains (never from the file):
    /// identity, the mesh route, every public domain with its certificate state, peers seen.
    /// `/routes`, the page and `dstack-mesh status` all show this one value.
    pub fn routes(&self) -> Routes {
        let identity = self.identity.current();
        Routes {
            identity: IdentityView {
                app_id: identity.app_id.to_string(),
                instance_id: identity.instance_id.clone(),
                app_name: identity.app_name.clone(),
                not_after: identity.not_after,
                attestation: identity.attestation,
            },
            mesh: self.inbound.as_ref().map(|i| i.mesh_route()),
            domains: self
                .acme
                .load_full()
                .as_ref()
                .map(|a| a.status())
                .unwrap_or_default(),
            peers: PeerCounts {
                inbound: self.metrics.peer_count(crate::metrics::Direction::Inbound),
                outbound: self.metrics.peer_count(crate::metrics::Direction::Outbound),
            },
            tcp: (self.tcp.iter())
                .map(|s| {
                    let c = s.config();
                    TcpRoute {
                        name: c.name.clone(),
                        listen: c.listen.to_string(),
                        backend: c.backend.to_string(),
                        allowed: c.allow.words(),
                        open: s.open_connections(),
                    }
                })
                .collect(),
            tunnels: (self.tunnels.iter())
                .map(|t| TunnelRoute {
                    name: t.config().name.clone(),
                    listen: t.config().listen.to_string(),
                    target: t.target().to_string(),
                    open: t.open_connections(),
                })
                .collect(),
        }
    }

    /// Serve `listener` until the future is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let drain = self.drain.clone();
        proxy::serve_plain(listener, "admin", MAX_CONNECTIONS, drain, move |req| {
            let admin = self.clone();
            async move {
                match (req.method(), revoke_target(req.uri())) {
                    (&Method::POST, Some(target)) => admin.revoke(target).await,
                    _ => admin.answer(&req),
                }
            }
        })
        .await;
    }

    /// `POST /certs/{domain}/revoke?reason=…`: the CA's answer is awaited, so the caller
    /// learns whether the certificate is revoked.
    async fn revoke(&self, target: Result<(String, Reason), String>) -> Response<Body> {
        let (domain, reason) = match target {
            Ok(t) => t,
            Err(why) => return proxy::error_response(StatusCode::BAD_REQUEST, &why),
        };
        let Some(acme) = self.acme.load_full() else {
            return proxy::error_response(StatusCode::NOT_FOUND, "no public domains");
        };
        match acme.revoke(&domain, reason).await {
            Ok(revoked) => match serde_json::to_string(&revoked) {
                Ok(json) => proxy::json_response(StatusCode::OK, json),
                Err(e) => proxy::error_response(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            },
            Err(e) => proxy::error_response(e.status(), &e.to_string()),
        }
    }

    /// Why the sidecar is not ready; empty when it is.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let identity = self.identity.current();
        if identity.not_after <= crate::clock::unix_now() {
            problems.push(
                "identity: the mesh certificate has expired and refresh keeps failing".into(),
            );
        }
        if let Some(acme) = self.acme.load_full() {
            problems.extend(acme.problems());
        }
        if let Some(attestor) = &self.attestor {
            let now = crate::clock::unix_now();
            if !attestor.collateral().iter().any(|c| c.next_update > now) {
                problems.push("attestation: no valid collateral (PCCS not reached, directory missing or expired): every peer is refused as collateral_unavailable or collateral_expired".into());
            }
        }
        problems
    }

    // Long on purpose: the admin port's routing table, one arm per endpoint.
    fn answer(&self, req: &Request<Incoming>) -> Response<Body> {
        let path = req.uri().path();
        match (req.method(), path) {
            (&Method::GET, "/health") => proxy::text_response(StatusCode::OK, "ok\n"),
            (&Method::GET, "/ready") => {
                let problems = self.problems();
                let status = match problems.is_empty() {
                    true => StatusCode::OK,
                    false => StatusCode::SERVICE_UNAVAILABLE,
                };
                let body =
                    serde_json::json!({ "ready": problems.is_empty(), "problems": problems });
                proxy::json_response(status, body.to_string())
            }
            (&Method::GET, "/sources") => {
                let sources = self
                    .acme
                    .load_full()
                    .map(|a| a.sources())
                    .unwrap_or_default();
                let body = serde_json::to_string(&sources).unwrap_or_else(|_| "[]".into());
                proxy::json_response(StatusCode::OK, body)
            }
            (&Method::GET, "/certs") => {
                let status = self
                    .acme
                    .load_full()
                    .as_ref()
                    .map(|a| a.status())
                    .unwrap_or_default();
                match serde_json::to_string(&status) {
                    Ok(json) => proxy::json_response(StatusCode::OK, json),
                    Err(e) => {
                        proxy::error_response(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string())
                    }
                }
            }
            (&Method::POST, p) if renew_target(p).is_some() => {
                let domain = renew_target(p).unwrap_or_default();
                match self
                    .acme
                    .load_full()
                    .as_ref()
                    .is_some_and(|a| a.renew(domain))
                {
                    true => proxy::json_response(
                        StatusCode::ACCEPTED,
                        serde_json::json!({ "renewing": domain }).to_string(),
                    ),
                    false => proxy::error_response(StatusCode::NOT_FOUND, "no such domain"),
                }
            }
            (&Method::GET, "/routes") => match serde_json::to_string(&self.routes()) {
                Ok(json) => proxy::json_response(StatusCode::OK, json),
                Err(e) => proxy::error_response(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            },
            (&Method::GET, "/") => {
                let now = std::time::SystemTime::now();
                let view = page::View::from_query(req.uri().query());
                let mut resp = Response::new(proxy::full(page::render(&self.routes(), now, &view)));
                let headers = resp.headers_mut();
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/html; charset=utf-8"),
                );
                // Inline style and script only: nothing is fetched from anywhere else.
                headers.insert(
                    header::CONTENT_SECURITY_POLICY,
                    HeaderValue::from_static("default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src 'none'"),
                );
                resp
            }
            // The evidence files, whether or not the public domains serve them.
            (&Method::GET, p) if p == "/evidences" || p.starts_with("/evidences/") => self
                .acme
                .load_full()
                .and_then(|a| a.evidence().answer(p))
                .unwrap_or_else(|| {
                    proxy::error_response(StatusCode::NOT_FOUND, "no evidence here")
                }),
            (&Method::GET, "/metrics") => {
                let mut resp = Response::new(proxy::full(self.metrics()));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                resp
            }
            _ => proxy::error_response(StatusCode::NOT_FOUND, "not found"),
        }
    }

    /// Prometheus text: requests, handshakes, connections, identity and certificates.
    pub fn metrics(&self) -> String {
        let (inbound, outbound) = (self.inbound.as_ref(), self.outbound.as_ref());
        let state = State {
            open: [
                inbound.map(|i| ("inbound", i.open_connections())),
                outbound.map(|o| ("outbound", o.open_connections())),
            ]
            .into_iter()
            .flatten()
            .collect(),
            reclaimed: [
                inbound.map(|i| ("inbound", i.reclaimed_connections())),
                outbound.map(|o| ("outbound", o.reclaimed_connections())),
            ]
            .into_iter()
            .flatten()
            .collect(),
            pool: outbound.map(|o| o.pooled()),
            identity_not_after: self.identity.current().not_after,
            certificates: self.acme.load_full().map(|a| a.status()),
            sources: self
                .acme
                .load_full()
                .map(|a| a.sources())
                .unwrap_or_default(),
            store: self.acme.load_full().and_then(|a| a.store_state()),
            attestation: self.attestor.as_ref().map(|a| {
                let platforms = a
                    .collateral()
                    .iter()
                    .map(|c| (c.fmspc.clone(), c.next_update))
                    .collect();
                (platforms, a.cached())
            }),
        };
        crate::metrics::exposition(vec![Box::new(self.metrics.clone()), Box::new(state)])
    }
}

/// What the admin port reads at a scrape besides the request counters.
#[derive(Debug)]
struct State {
    /// Client connections open now, by listener.
    open: Vec<(&'static str, usize)>,
    /// Idle client connections closed to make room at the connection limit, by listener.
    reclaimed: Vec<(&'static str, u64)>,
    /// The outbound pool: (h2, idle HTTP/1.1).
    pool: Option<(usize, usize)>,
    identity_not_after: i64,
    /// Every public domain's state, when there are public domains.
    certificates: Option<Vec<crate::acme::CertStatus>>,
    /// The domain sources.
    sources: Vec<crate::acme::sources::SourceStatus>,
    /// The fleet's store: up, and values refused by kind.
    store: Option<(bool, Vec<(&'static str, u64)>)>,
    /// The attestation policy's collateral (FMSPC, nextUpdate) and its cached verdicts.
    attestation: Option<(Vec<(String, i64)>, usize)>,
}

impl Collector for State {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let mut family = encoder.encode_descriptor(
            "dstack_mesh_open_connections",
            "Client connections open now, by listener.",
            None,
            MetricType::Gauge,
        )?;
        for (listener, n) in &self.open {
            family
                .encode_family(&[("listener", *listener)])?
                .encode_gauge(n)?;
        }
        let mut family = encoder.encode_descriptor(
            "dstack_mesh_connections_reclaimed",
            "Idle client connections closed to make room for new ones at max_connections, by listener.",
            None,
            MetricType::Counter,
        )?;
        for (listener, n) in &self.reclaimed {
            family
                .encode_family(&[("listener", *listener)])?
                .encode_counter::<NoLabelSet, _, u64>(n, None)?;
        }
        if let Some((h2, h1)) = self.pool {
            let mut family = encoder.encode_descriptor(
                "dstack_mesh_pool_connections",
                "Connections to peers the outbound pool holds, by protocol (h1: idle ones).",
                None,
                MetricType::Gauge,
            )?;
            for (protocol, n) in [("h2", h2), ("h1", h1)] {
                family
                    .encode_family(&[("protocol", protocol)])?
                    .encode_gauge(&n)?;
            }
        }
        encoder
            .encode_descriptor(
                "dstack_mesh_identity_expiration_timestamp_seconds",
                "When the mesh certificate expires.",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&self.identity_not_after)?;
        if let Some((up, refused)) = &self.store {
            encoder
                .encode_descriptor(
                    "dstack_mesh_store_up",
                    "1 when the last request to the fleet's shared store (etcd) worked.",
                    None,
                    MetricType::Gauge,
                )?
                .encode_gauge(&i64::from(*up))?;
            let mut family = encoder.encode_descriptor(
                "dstack_mesh_store_refused",
                "Values in the shared store that did not open (changed, moved, or sealed by another app), by kind; never served.",
                None,
                MetricType::Counter,
            )?;
            for (kind, n) in refused {
                family
                    .encode_family(&[("kind", *kind)])?
                    .encode_counter::<NoLabelSet, _, u64>(n, None)?;
            }
        }
        if let Some((platforms, cached)) = &self.attestation {
            let mut family = encoder.encode_descriptor(
                "dstack_mesh_attestation_collateral_next_update_timestamp_seconds",
                "When each platform's (FMSPC's) collateral stops verifying quotes.",
                None,
                MetricType::Gauge,
            )?;
            for (fmspc, next) in platforms {
                family
                    .encode_family(&[("fmspc", fmspc.as_str())])?
                    .encode_gauge(next)?;
            }
            encoder
                .encode_descriptor(
                    "dstack_mesh_attestation_verdicts_cached",
                    "Peer certificates whose quote verdict is cached.",
                    None,
                    MetricType::Gauge,
                )?
                .encode_gauge(&(*cached as i64))?;
        }
        encode_sources(&self.sources, &mut encoder)?;
        match &self.certificates {
            Some(status) => encode_certificates(status, &mut encoder),
            None => Ok(()),
        }
    }
}

/// Each domain source's series.
fn encode_sources(
    sources: &[crate::acme::sources::SourceStatus],
    encoder: &mut DescriptorEncoder<'_>,
) -> std::fmt::Result {
    if sources.is_empty() {
        return Ok(());
    }
    type Value = fn(&crate::acme::sources::SourceStatus) -> Option<u64>;
    let series: [(&str, MetricType, &str, Value); 5] = [
        (
            "dstack_mesh_domain_source_up",
            MetricType::Gauge,
            "1 when the source's last read gave a list.",
            |s| Some(u64::from(s.up)),
        ),
        (
            "dstack_mesh_domain_source_domains",
            MetricType::Gauge,
            "Domains on the source's last good list (served while it fails).",
            |s| Some(s.domains as u64),
        ),
        (
            "dstack_mesh_domain_source_rejected",
            MetricType::Gauge,
            "Entries of the source's last list that were refused (invalid names, duplicates).",
            |s| Some(s.rejected_total as u64),
        ),
        (
            "dstack_mesh_domain_source_last_success_timestamp_seconds",
            MetricType::Gauge,
            "When a read of the source last worked.",
            |s| s.last_success,
        ),
        (
            "dstack_mesh_domain_source_read_failures",
            MetricType::Counter,
            "Reads of the source that failed since start.",
            |s| Some(s.reads_failed_total),
        ),
    ];
    for (name, kind, help, value) in series {
        let counter = matches!(kind, MetricType::Counter);
        let mut family = encoder.encode_descriptor(name, help, None, kind)?;
        for s in sources {
            let Some(v) = value(s) else { continue };
            let labels = [("source", s.name.as_str())];
            let mut metric = family.encode_family(&labels)?;
            match counter {
                true => metric.encode_counter::<NoLabelSet, _, u64>(&v, None)?,
                false => metric.encode_gauge(&(v as i64))?,
            }
        }
    }
    Ok(())
}

/// Whether a domain gets series of its own: a configured one always; one from a source (there
/// may be thousands) only while it needs someone (no valid certificate, failing, moved away),
/// so the series stay bounded by the trouble, not by the customers.
fn own_series(s: &crate::acme::CertStatus) -> bool {
    use crate::acme::Status;
    s.source.is_none()
        || s.expired
        || s.not_after.is_none()
        || matches!(s.status, Status::Failed | Status::DnsMoved)
}

/// Each public domain's certificate series and its finished orders; the count of domains by
/// state.
fn encode_certificates(
    all: &[crate::acme::CertStatus],
    encoder: &mut DescriptorEncoder<'_>,
) -> std::fmt::Result {
    let mut by_state: std::collections::BTreeMap<&str, i64> = std::collections::BTreeMap::new();
    for s in all {
        *by_state.entry(page::status_word(s.status)).or_default() += 1;
    }
    let mut family = encoder.encode_descriptor(
        "dstack_mesh_domains",
        "Public domains by state (configured, from sources and on demand).",
        None,
        MetricType::Gauge,
    )?;
    for (state, n) in &by_state {
        family
            .encode_family(&[("state", *state)])?
            .encode_gauge(n)?;
    }
    let status: Vec<&crate::acme::CertStatus> = all.iter().filter(|s| own_series(s)).collect();
    type Value = fn(&crate::acme::CertStatus) -> Option<u64>;
    let series: [(&str, MetricType, &str, Value); 6] = [
        (
            "dstack_mesh_certificate_expiration_timestamp_seconds",
            MetricType::Gauge,
            "When the served certificate expires.",
            |s| s.not_after,
        ),
        (
            "dstack_mesh_certificate_renewal_timestamp_seconds",
            MetricType::Gauge,
            "When renewal is due.",
            |s| s.renew_at,
        ),
        (
            "dstack_mesh_certificate_ready_status",
            MetricType::Gauge,
            "1 when a valid, unexpired certificate is served.",
            |s| Some(u64::from(s.not_after.is_some() && !s.expired)),
        ),
        (
            "dstack_mesh_certificate_expired",
            MetricType::Gauge,
            "1 when the served certificate has expired (renewal failing).",
            |s| Some(u64::from(s.expired)),
        ),
        (
            "dstack_mesh_certificate_renewal_failures",
            MetricType::Counter,
            "Failed orders since start.",
            |s| Some(s.failures_total),
        ),
        (
            "dstack_mesh_certificates_from_fleet",
            MetricType::Counter,
            "Certificates taken from the shared store (another instance ordered them) since start.",
            |s| Some(s.from_fleet_total),
        ),
    ];
    for (name, kind, help, value) in series {
        let counter = matches!(kind, MetricType::Counter);
        let mut family = encoder.encode_descriptor(name, help, None, kind)?;
        for s in &status {
            let Some(v) = value(s) else { continue };
            let labels = [("domain", s.domain.as_str()), ("issuer", s.issuer.as_str())];
            let mut metric = family.encode_family(&labels)?;
            match counter {
                true => metric.encode_counter::<NoLabelSet, _, u64>(&v, None)?,
                false => metric.encode_gauge(&v)?,
            }
        }
    }
    let mut family = encoder.encode_descriptor(
        "dstack_mesh_acme_orders",
        "Finished certificate orders since start, by result.",
        None,
        MetricType::Counter,
    )?;
    for s in &status {
        for (result, n) in [("valid", s.issued_total), ("failed", s.failures_total)] {
            let labels = [
                ("domain", s.domain.as_str()),
                ("issuer", s.issuer.as_str()),
                ("result", result),
            ];
            family
                .encode_family(&labels)?
                .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoke_paths_name_the_domain_and_the_reason() {
        let target = |uri: &str| revoke_target(&uri.parse().unwrap());
        assert_eq!(
            target("/certs/app.example.com/revoke?reason=keyCompromise"),
            Some(Ok(("app.example.com".into(), Reason::KeyCompromise)))
        );
        assert_eq!(
            target("/certs/*.example.com/revoke"),
            Some(Ok(("*.example.com".into(), Reason::Unspecified)))
        );
        assert!(
            matches!(target("/certs/a.example/revoke?reason=hold"), Some(Err(e)) if e.contains("not a revocation reason"))
        );
        assert_eq!(target("/certs/a.example/renew"), None);
        assert_eq!(renew_target("/certs/a.example/renew"), Some("a.example"));
        assert_eq!(renew_target("/certs/renew"), None);
        assert_eq!(target("/certs"), None);
    }
}
