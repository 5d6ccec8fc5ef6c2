//! `httpreq`: any DNS the operator can script, through lego's HTTP request protocol. A DNS-01
//! challenge is presented with `POST <endpoint>/present` and removed with `POST
//! <endpoint>/cleanup`, each a JSON body `{"fqdn": "_acme-challenge.example.com.", "value":
//! "…"}`, with HTTP Basic credentials when given. It writes challenge TXT records and nothing
//! else: the dstack records of such a deployment are the operator's (`DNS_SETUP_MODE`).

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};

use super::{BoxFuture, Data, DnsError, Provider, Record, Rtype, Zone};

/// The operator's endpoint and its credentials.
pub struct HttpReq {
    endpoint: String,
    /// `Basic <base64(user:password)>`, when given.
    authorization: Option<String>,
    client: Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        Full<Bytes>,
    >,
    timeout: Duration,
}

impl std::fmt::Debug for HttpReq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpReq")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl HttpReq {
    /// Post to `endpoint` (https, or http for a service beside the CVM's app), with
    /// `credentials` (user, password) when given.
    pub fn new(
        endpoint: &str,
        credentials: Option<(&str, &str)>,
        timeout: Duration,
    ) -> Result<Self, super::SetupError> {
        let tls = crate::https::client_config(&[])?;
        let connector = crate::https::connector(tls, crate::https::dialer(timeout));
        Ok(Self {
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            authorization: credentials.map(|(user, password)| {
                format!(
                    "Basic {}",
                    crate::base64url::encode_standard(format!("{user}:{password}").as_bytes())
                )
            }),
            client: Client::builder(TokioExecutor::new()).build(connector),
            timeout,
        })
    }

    fn fail(message: String) -> DnsError {
        DnsError::Provider {
            provider: "httpreq",
            message,
        }
    }

    /// `POST <endpoint>/<action>` with `{fqdn, value}`; any 2xx is done.
    async fn post(&self, action: &str, record: &Record) -> Result<(), DnsError> {
        let Data::Txt(value) = &record.data else {
            return Err(Self::fail(format!(
                "{record}: httpreq presents challenge TXT records only; the dstack records need DNS_SETUP_MODE (the operator makes them) or a provider that edits zones"
            )));
        };
        let url = format!("{}/{action}", self.endpoint);
        let body = serde_json::json!({ "fqdn": format!("{}.", record.name), "value": value });
        let mut req = http::Request::post(&url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::USER_AGENT, "dstack-mesh/httpreq");
        if let Some(auth) = &self.authorization {
            req = req.header(http::header::AUTHORIZATION, auth);
        }
        let req = req
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| Self::fail(format!("{url}: {e}")))?;
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| Self::fail(format!("{url}: {}", ratls::error_chain(&e))))?;
            let status = resp.status();
            if status.is_success() {
                return Ok(());
            }
            let text = Limited::new(resp.into_body(), 4096)
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                .unwrap_or_default();
            Err(Self::fail(format!(
                "{url}: HTTP {status}: {}",
                text.trim().chars().take(300).collect::<String>()
            )))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(Self::fail(format!(
                    "{url}: no answer within {:?}",
                    self.timeout
                )))
            })
    }
}

impl Provider for HttpReq {
    fn name(&self) -> &'static str {
        "httpreq"
    }

    fn writes_zones(&self) -> bool {
        false
    }

    fn zones(&self) -> BoxFuture<'_, Result<Vec<Zone>, DnsError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    /// The endpoint knows its zones: every name is handed over as it is.
    fn zone_for<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Zone, DnsError>> {
        Box::pin(async move {
            Ok(Zone {
                name: name.to_owned(),
                id: String::new(),
            })
        })
    }

    /// Nothing can be listed: nothing is taken to be there.
    fn records<'a>(
        &'a self,
        _zone: &'a Zone,
        _name: &'a str,
        _rtype: Rtype,
    ) -> BoxFuture<'a, Result<Vec<Record>, DnsError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn create<'a>(
        &'a self,
        _zone: &'a Zone,
        record: &'a Record,
    ) -> BoxFuture<'a, Result<Record, DnsError>> {
        Box::pin(async move {
            self.post("present", record).await?;
            Ok(record.clone())
        })
    }

    fn delete<'a>(
        &'a self,
        _zone: &'a Zone,
        record: &'a Record,
    ) -> BoxFuture<'a, Result<(), DnsError>> {
        Box::pin(self.post("cleanup", record))
    }

    fn default_resolvers(&self) -> BoxFuture<'_, Vec<SocketAddr>> {
        // Where the records land is the operator's business: two public operators see them.
        Box::pin(async { super::rest::public_resolvers() })
    }
}
