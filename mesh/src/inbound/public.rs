//! Public custom domains on the shared listener: the TLS configurations built from the
//! certificates the ACME subsystem holds, and the three ways their connections are served:
//! `http` mode (HTTP with `x-forwarded-*` to the domain's backend), `tcp` mode (the decrypted
//! stream spliced to the backend, any protocol, as HAProxy's TCP mode does), and TLS-ALPN-01
//! validation connections (the CA reads the challenge certificate and leaves).

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use rustls::ServerConfig;
use tokio::{io::AsyncWriteExt, net::TcpStream};
use tokio_rustls::server::TlsStream;

use super::{
    http::{self, Conn, Serving, Who},
    route::PublicNames,
    Inbound, InboundError,
};
use crate::{
    acme::{challenge::ACME_TLS_ALPN, Acme, Domain},
    config::{InboundConfig, Mode},
    metrics::Direction,
    proxy::{conn::Lifetime, Activity, CallerHeaders, Hold, IdleIo, Upstream, UpstreamConfig},
};

/// What the listener serves besides the mesh. A reload builds a new one and swaps it in;
/// connections keep the one they began on.
pub struct PublicSide {
    acme: Option<Arc<Acme>>,
    /// The configured domains, by primary name.
    domains: HashMap<String, Served>,
    /// TLS-ALPN-01 validation connections.
    challenge_tls: Option<Arc<ServerConfig>>,
    /// Session tickets, shared by every domain.
    ticketer: Option<Arc<dyn rustls::server::ProducesTickets>>,
    /// `http` mode backend pools of the sourced domains, by backend: thousands of domains
    /// routed to one app share its pool.
    sourced_pools: std::sync::Mutex<HashMap<String, Upstream>>,
    upstream_config: UpstreamConfig,
}

/// One domain as the listener serves it.
struct Served {
    tls: Arc<ServerConfig>,
    /// `http` mode's backend pool.
    upstream: Option<Upstream>,
    /// `http` mode's pools of names under a wildcard routed to their own backend.
    routes: HashMap<String, Upstream>,
}

impl std::fmt::Debug for PublicSide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublicSide")
            .field("domains", &self.domains.len())
            .finish_non_exhaustive()
    }
}

impl PublicSide {
    /// Nothing public: the mesh only.
    pub(super) fn none() -> Self {
        Self {
            acme: None,
            domains: HashMap::new(),
            challenge_tls: None,
            ticketer: None,
            sourced_pools: Default::default(),
            upstream_config: UpstreamConfig::default(),
        }
    }

    /// The TLS configurations and backends for `acme`'s domains.
    pub(super) fn new(acme: Arc<Acme>, config: &InboundConfig) -> Result<Self, InboundError> {
        // Browsers resume sessions: stateless tickets (rotating keys, shared by every domain)
        // cost no memory per client, unlike a session cache.
        let ticketer = ratls::crypto::ticketer()?;
        let mut domains = HashMap::new();
        for domain in acme.configured_domains() {
            let tls = domain_tls(domain, &ticketer)?;
            let pool = |backend: &crate::config::HostPort| {
                Upstream::new(&backend.to_string(), upstream_config(config))
                    .map_err(|e| InboundError::Backend(format!("{}: {e}", domain.name())))
            };
            let (upstream, routes) = match domain.config.mode {
                Mode::Http => {
                    let mut routes = HashMap::new();
                    for (name, backend) in &domain.config.routes {
                        routes.insert(name.clone(), pool(backend)?);
                    }
                    (Some(pool(&domain.config.backend)?), routes)
                }
                Mode::Tcp => (None, HashMap::new()),
            };
            let served = Served {
                tls,
                upstream,
                routes,
            };
            domains.insert(domain.name().to_owned(), served);
        }
        // A validator offers only acme-tls/1 and gets only the challenge certificate.
        let mut challenge = server_config(acme.challenges().resolver())?;
        challenge.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
        Ok(Self {
            acme: Some(acme),
            domains,
            challenge_tls: Some(Arc::new(challenge)),
            ticketer: Some(ticketer),
            sourced_pools: Default::default(),
            upstream_config: upstream_config(config),
        })
    }

    /// The public domains' subsystem and how long a first handshake may wait for an
    /// on-demand certificate, when `[on_demand]` is set.
    pub(super) fn on_demand(&self) -> Option<(&Acme, Duration)> {
        let acme = self.acme.as_deref()?;
        Some((acme, acme.on_demand_deadline()?))
    }

    /// The TLS configuration for validation connections.
    pub(super) fn challenge_tls(&self) -> Option<Arc<ServerConfig>> {
        self.challenge_tls.clone()
    }

    /// The TLS configuration of `domain`: a configured one's, or a sourced one's (built at its
    /// first connection and kept with it). None when this listener does not serve it.
    pub(super) fn tls(&self, domain: &Domain) -> Option<Arc<ServerConfig>> {
        if domain.source.is_none() {
            return self.domains.get(domain.name()).map(|s| s.tls.clone());
        }
        if let Some(tls) = domain.tls.get() {
            return Some(tls.clone());
        }
        let tls = domain_tls(domain, self.ticketer.as_ref()?)
            .map_err(
                |e| tracing::error!(domain = %domain.name(), error = %e, "no TLS configuration"),
            )
            .ok()?;
        Some(domain.tls.get_or_init(|| tls).clone())
    }

    /// The `http` mode backend pool for a connection to `domain` that asked for `sni`.
    fn upstream(&self, domain: &Domain, sni: Option<&str>) -> Option<Upstream> {
        if let Some(served) = self.domains.get(domain.name()) {
            return match sni.and_then(|n| served.routes.get(n)) {
                Some(routed) => Some(routed.clone()),
                None => served.upstream.clone(),
            };
        }
        let backend = domain.config.backend_for(sni).to_string();
        let mut pools = self.sourced_pools.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pool) = pools.get(&backend) {
            return Some(pool.clone());
        }
        let pool = Upstream::new(&backend, self.upstream_config.clone())
            .map_err(|e| tracing::error!(domain = %domain.name(), %backend, error = %e, "backend unusable"))
            .ok()?;
        pools.insert(backend, pool.clone());
        Some(pool)
    }
}

/// A domain's TLS configuration: its certificate (a TLS alert while it has none), the
/// shared session tickets, its ALPN offer.
fn domain_tls(
    domain: &Domain,
    ticketer: &Arc<dyn rustls::server::ProducesTickets>,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut tls = server_config(domain.resolver())?;
    tls.ticketer = ticketer.clone();
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.alpn_protocols = domain.config.alpn_offer();
    Ok(Arc::new(tls))
}

impl PublicNames for PublicSide {
    type Domain = Arc<Domain>;

    fn has_challenge(&self, name: &str) -> bool {
        self.acme
            .as_ref()
            .is_some_and(|a| a.challenges().has_tls_alpn(name))
    }

    fn domain_for(&self, name: &str) -> Option<Arc<Domain>> {
        self.acme.as_ref()?.lookup(name)
    }
}

/// TLS 1.2 and 1.3, no client certificate, `resolver`'s certificate.
fn server_config(
    resolver: Arc<dyn rustls::server::ResolvesServerCert>,
) -> Result<ServerConfig, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(ratls::crypto::provider())
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.ignore_client_order = ratls::tls::SERVER_ORDER;
    Ok(config)
}

/// A backend's deadlines, from the listener's settings.
pub(super) fn upstream_config(config: &InboundConfig) -> UpstreamConfig {
    UpstreamConfig {
        connect_timeout: config.backend_connect_timeout,
        response_timeout: config.backend_timeout,
        ..UpstreamConfig::default()
    }
}

/// `http` mode: anyone may call; the backend learns the client's address, scheme and host from
/// `x-forwarded-*` (the client's own copies removed).
pub(super) fn serve_http(
    inbound: &Inbound,
    public: &PublicSide,
    domain: Arc<Domain>,
    tls: TlsStream<IdleIo<TcpStream>>,
    remote: SocketAddr,
    activity: Arc<Activity>,
    hold: Hold,
) -> Option<Serving> {
    let sni = tls.get_ref().1.server_name().map(str::to_ascii_lowercase);
    let upstream = public.upstream(&domain, sni.as_deref())?;
    let conn = Conn {
        headers: CallerHeaders::new(None, None, remote.ip(), "https"),
        metrics: inbound.metrics.peer(Direction::Inbound, domain.name()),
        evidence: public.acme.as_ref().and_then(|a| a.evidence_served()),
        registry: None,
        upstream,
        lifetime: Lifetime {
            idle: Some((activity.clone(), inbound.config.idle_timeout)),
            reclaim: Some(inbound.reclaim.clone()),
            ..Lifetime::until_drain("inbound", remote, inbound.drain.clone())
        },
        who: Who::Public(domain),
        activity,
        hold,
    };
    Some(http::serve(conn, tls, &inbound.config))
}

/// `tcp` mode: splice `tls` to the domain's backend until either side closes or the connection
/// idles.
pub(super) async fn splice(
    config: &InboundConfig,
    domain: &Domain,
    mut tls: TlsStream<IdleIo<TcpStream>>,
    remote: SocketAddr,
    activity: Arc<Activity>,
) {
    let backend = domain.config.backend_for(tls.get_ref().1.server_name());
    let dial = TcpStream::connect((backend.host.as_str(), backend.port));
    let mut upstream = match tokio::time::timeout(config.backend_connect_timeout, dial).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            tracing::warn!(%remote, domain = %domain.name(), %backend, error = %e, "tcp backend unreachable");
            return;
        }
        Err(_) => {
            tracing::warn!(%remote, domain = %domain.name(), %backend, timeout = ?config.backend_connect_timeout, "tcp backend connect timed out");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    if domain.config.send_proxy_protocol {
        // The backend learns the client as HAProxy's `send-proxy-v2` tells it.
        let local = tls.get_ref().0.get_ref().local_addr();
        let header = local.map_err(std::io::Error::other).and_then(|local| {
            ppp::v2::Builder::with_addresses(
                ppp::v2::Version::Two | ppp::v2::Command::Proxy,
                ppp::v2::Protocol::Stream,
                same_family(remote, local),
            )
            .build()
        });
        let sent = match header {
            Ok(header) => upstream.write_all(&header).await,
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            tracing::warn!(%remote, domain = %domain.name(), %backend, error = %e, "tcp backend: PROXY header not sent");
            return;
        }
    }
    tokio::select! {
        result = tokio::io::copy_bidirectional(&mut tls, &mut upstream) => {
            if let Err(e) = result {
                tracing::debug!(%remote, domain = %domain.name(), error = %e, "tcp splice ended with an error");
            }
        }
        _ = activity.idle_for(config.idle_timeout) => {
            tracing::debug!(%remote, domain = %domain.name(), "tcp splice idle: closing");
        }
    }
}

/// A TLS-ALPN-01 validator only reads the certificate: say goodbye properly and close.
pub(super) async fn close_validation(mut tls: TlsStream<IdleIo<TcpStream>>, remote: SocketAddr) {
    let name = tls.get_ref().1.server_name().unwrap_or_default().to_owned();
    tracing::info!(%remote, %name, "TLS-ALPN-01 validation connection");
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.shutdown()).await;
}

/// `client` and `local` in one address family, as a PROXY v2 header carries them (a v4 address
/// beside a v6 one becomes v4-mapped v6).
fn same_family(client: SocketAddr, local: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v6 = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
        v6 => v6,
    };
    match (client, local) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) | (SocketAddr::V6(_), SocketAddr::V6(_)) => {
            (client, local)
        }
        _ => (v6(client), v6(local)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbound::route::{route, Hello, Route};

    /// A listener's public side with one configured domain (and an alias) and `n` domains
    /// from a source, nothing ordered.
    fn public_side(dir: &std::path::Path, n: usize) -> (PublicSide, Vec<String>) {
        let names: Vec<String> = (0..n)
            .map(|i| format!("c{i}.customer{}.test", i % 97))
            .collect();
        let text = format!(
            "[acme]\nstore = \"{store}\"\nissuer = \"internal-ca\"\n\
             [[domains]]\nnames = [\"app.example.com\", \"www.example.com\"]\nbackend = \"127.0.0.1:9\"\n\
             [[domain_sources]]\nfile = \"{list}\"\nbackend = \"127.0.0.1:9\"\n",
            store = dir.join("store").display(),
            list = dir.join("customers.txt").display(),
        );
        let env: HashMap<&str, &str> = HashMap::new();
        let config = crate::config::Config::from_toml(&text, &env).unwrap();
        let shared = crate::acme::Shared {
            store: config.store.clone(),
            app_id: "5bb4ff9a3837357f19dc176407a5709c62eb6c56".parse().unwrap(),
        };
        let agent = ratls::agent::AgentClient::new(ratls::agent::AgentAddress::Unix(
            dir.join("no-agent.sock"),
        ));
        let acme = Acme::new(&config.public, &shared, agent, None).unwrap();
        acme.install_sourced(&names);
        (PublicSide::new(acme, &config.inbound).unwrap(), names)
    }

    /// The router's decision and the TLS configuration it leads to, as a handshake makes them.
    fn lookup(public: &PublicSide, sni: &str) -> Option<(Arc<Domain>, Arc<ServerConfig>)> {
        let hello = Hello {
            server_name: Some(sni),
            offers_acme_tls: false,
        };
        match route(&hello, public) {
            Route::PublicDomain(domain) => {
                let tls = public.tls(&domain)?;
                Some((domain, tls))
            }
            _ => None,
        }
    }

    #[test]
    fn the_sni_lookup_among_10000_domains_allocates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (public, names) = public_side(dir.path(), 10_000);
        // A sourced domain's TLS configuration is built at its first connection, once.
        for name in &names {
            let (domain, _) = lookup(&public, name).expect(name);
            assert_eq!(domain.name(), name);
        }
        let (first, _) = lookup(&public, &names[0]).unwrap();
        let again = allocation_counter::measure(|| {
            for name in names.iter().chain(&names) {
                std::hint::black_box(lookup(&public, name));
            }
        });
        assert_eq!(again.count_total, 0, "{} lookups", 2 * names.len());
        let (after, _) = lookup(&public, &names[0]).unwrap();
        assert!(Arc::ptr_eq(&first, &after));

        // Configured names (an alias too), and the names nothing here serves (the mesh's).
        let mesh_name = "5bb4ff9a3837357f19dc176407a5709c62eb6c56-443s.gw.test";
        let others = allocation_counter::measure(|| {
            for name in ["app.example.com", "www.example.com", mesh_name] {
                std::hint::black_box(lookup(&public, name));
            }
        });
        assert_eq!(others.count_total, 0);
        let app = lookup(&public, "www.example.com").unwrap().0;
        assert_eq!(app.name(), "app.example.com");
        assert!(lookup(&public, mesh_name).is_none());
    }

    #[test]
    fn a_proxy_header_carries_one_family() {
        let v4: SocketAddr = "203.0.113.7:5".parse().unwrap();
        let local4: SocketAddr = "10.0.0.1:443".parse().unwrap();
        let local6: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        assert_eq!(same_family(v4, local4), (v4, local4));
        let (client, local) = same_family(v4, local6);
        assert_eq!(
            client,
            "[::ffff:203.0.113.7]:5".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(local, local6);
    }
}
