//! A pooled HTTP/1.1 client for one upstream (the local app): connect deadline, response-head
//! deadline, keep-alive reuse, upgrades.

use std::time::Duration;

use http::{header, uri::Scheme, HeaderValue, Request, Response, Uri, Version};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioIo, TokioTimer},
};

use super::{Body, BoxError};

/// Deadlines and pool size of an upstream.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    /// TCP connect deadline.
    pub connect_timeout: Duration,
    /// Deadline for the response head (status and headers); bodies stream without one.
    pub response_timeout: Duration,
    /// An idle pooled connection is closed after this.
    pub pool_idle_timeout: Duration,
    /// Idle connections kept per upstream.
    pub max_idle: usize,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(60),
            pool_idle_timeout: Duration::from_secs(90),
            max_idle: 256,
        }
    }
}

/// Why the upstream gave no response.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// Could not connect (down, refused, connect deadline).
    #[error("upstream {upstream} unreachable: {reason}")]
    Connect {
        /// The upstream.
        upstream: String,
        /// Why.
        reason: String,
    },
    /// Connected, but no response head within the deadline.
    #[error("upstream {upstream} sent no response within {timeout:?}")]
    Timeout {
        /// The upstream.
        upstream: String,
        /// The deadline.
        timeout: Duration,
    },
    /// The exchange failed (connection reset, malformed response, ...).
    #[error("upstream {upstream} failed: {reason}")]
    Failed {
        /// The upstream.
        upstream: String,
        /// Why.
        reason: String,
    },
}

impl UpstreamError {
    /// 502 when the upstream is down or broken, 504 when it is slow.
    pub fn status(&self) -> http::StatusCode {
        match self {
            Self::Timeout { .. } => http::StatusCode::GATEWAY_TIMEOUT,
            _ => http::StatusCode::BAD_GATEWAY,
        }
    }
}

/// One upstream `host:port` with a connection pool.
#[derive(Clone, Debug)]
pub struct Upstream {
    client: Client<HttpConnector, Body>,
    authority: http::uri::Authority,
    config: UpstreamConfig,
}

impl Upstream {
    /// A pool for `authority` (`host:port`).
    pub fn new(authority: &str, config: UpstreamConfig) -> Result<Self, http::Error> {
        let authority: http::uri::Authority = authority.parse().map_err(http::Error::from)?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_nodelay(true);
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_max_idle_per_host(config.max_idle)
            .build(connector);
        Ok(Self {
            client,
            authority,
            config,
        })
    }

    /// Send `req` (its URI's path and query are kept; scheme and authority become the
    /// upstream's) as HTTP/1.1. A `Host` the caller named is kept.
    pub async fn send(
        &self,
        mut req: Request<Body>,
    ) -> Result<Response<hyper::body::Incoming>, UpstreamError> {
        if !req.headers().contains_key(header::HOST) {
            if let Some(host) = req
                .uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            {
                req.headers_mut().insert(header::HOST, host);
            }
        }
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(path);
        *req.uri_mut() = Uri::from_parts(parts).map_err(|e| self.failed(e.into()))?;
        *req.version_mut() = Version::HTTP_11;

        match tokio::time::timeout(self.config.response_timeout, self.client.request(req)).await {
            Err(_) => Err(UpstreamError::Timeout {
                upstream: self.authority.to_string(),
                timeout: self.config.response_timeout,
            }),
            Ok(Err(e)) if e.is_connect() => Err(UpstreamError::Connect {
                upstream: self.authority.to_string(),
                reason: crate::error_chain(&e),
            }),
            Ok(Err(e)) => Err(self.failed(Box::new(e))),
            Ok(Ok(resp)) => Ok(resp),
        }
    }

    /// `host:port` of the upstream.
    pub fn authority(&self) -> &str {
        self.authority.as_str()
    }

    fn failed(&self, e: BoxError) -> UpstreamError {
        UpstreamError::Failed {
            upstream: self.authority.to_string(),
            reason: crate::error_chain(e.as_ref()),
        }
    }
}

/// Join two upgraded connections (client side and upstream side) until either closes or the
/// tunnel is idle; the tunnel's hold lives until then.
pub(crate) async fn splice_upgrades(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    tunnel: super::forward::Tunnel,
) {
    match tokio::try_join!(client, upstream) {
        Ok((client, upstream)) => {
            let mut client = TokioIo::new(client);
            let mut upstream = TokioIo::new(upstream);
            tokio::select! {
                ended = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
                    if let Err(e) = ended {
                        tracing::debug!(error = %e, "upgraded connection ended");
                    }
                }
                _ = tunnel.activity.idle_for(tunnel.idle) => {
                    tracing::debug!("upgraded connection idle; closing");
                }
            }
        }
        Err(e) => tracing::debug!(error = %e, "upgrade failed"),
    }
    drop(tunnel);
}
