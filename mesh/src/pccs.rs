//! Collateral from a PCCS (Intel's PCS or a caching PCCS, the v4 API), in the background:
//! fetched at start and again a day before its `nextUpdate` (hourly after a failure), written
//! to the collateral directory (the same files an air-gapped setup provides, so a restart
//! serves from disk before the PCCS answers), swapped into the attestor. Never inside a
//! handshake: a PCCS that is down costs nothing while the collateral in hand is valid.

use std::{path::Path, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use ratls::{
    attested::Attestor,
    quote::{Collateral, PccsResponses},
};

use crate::acme::store::{CertStore, DirStore};

/// Deadline of one PCCS request.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer taken (TCB info is a few KiB).
const MAX_BODY: usize = 1 << 20;
/// Fetch again this long before the collateral's `nextUpdate`.
const REFRESH_BEFORE: i64 = 86_400;
/// After a failure, try again this often.
const RETRY: Duration = Duration::from_secs(3600);
/// After a failed fetch, try again this soon, doubling up to [`RETRY`]: without collateral
/// every attested peer is refused, so a PCCS back from an outage must be noticed in seconds.
const RETRY_MIN: Duration = Duration::from_secs(5);

/// Why the PCCS gave no collateral.
#[derive(Debug, thiserror::Error)]
pub enum PccsError {
    /// The request failed or timed out.
    #[error("{url}: {reason}")]
    Request {
        /// What was asked.
        url: String,
        /// Why it failed.
        reason: String,
    },
    /// The PCCS answered, but not with collateral.
    #[error("{url}: {status}: {body}")]
    Status {
        /// What was asked.
        url: String,
        /// Its status.
        status: http::StatusCode,
        /// The start of its body.
        body: String,
        /// How long it asked to be left alone (`Retry-After`, as Intel's PCS sends with 429).
        retry_after: Option<Duration>,
    },
    /// The answer lacks an issuer chain header.
    #[error("{url}: no {header} header")]
    Header {
        /// What was asked.
        url: String,
        /// The header.
        header: &'static str,
    },
    /// What it served does not make collateral.
    #[error(transparent)]
    Collateral(#[from] ratls::quote::QuoteError),
}

/// One answer: its body and the issuer chain from `header` (URL-decoded).
type Answer = (Bytes, Option<String>);

/// A PCCS at `base` (e.g. `https://api.trustedservices.intel.com`).
#[derive(Clone)]
pub struct Pccs {
    base: String,
    client: crate::https::GetClient,
}

impl std::fmt::Debug for Pccs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pccs")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl Pccs {
    /// A client for the PCCS at `base` (https with the WebPKI roots, or http for a local one).
    pub fn new(base: &str) -> Result<Self, crate::https::RootsError> {
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            client: crate::https::get_client(TIMEOUT)?,
        })
    }

    /// The PCCS answers collateral for `fmspc` is made of.
    pub async fn fetch(&self, fmspc: &str) -> Result<PccsResponses, PccsError> {
        let (tcb, tcb_chain) = self
            .get(
                &format!("/tdx/certification/v4/tcb?fmspc={fmspc}"),
                &["TCB-Info-Issuer-Chain", "SGX-TCB-Info-Issuer-Chain"],
            )
            .await?;
        let (qe, qe_chain) = self
            .get(
                "/tdx/certification/v4/qe/identity",
                &["SGX-Enclave-Identity-Issuer-Chain"],
            )
            .await?;
        let (crl, crl_chain) = self
            .get(
                "/sgx/certification/v4/pckcrl?ca=platform&encoding=der",
                &["SGX-PCK-CRL-Issuer-Chain"],
            )
            .await?;
        let (root_crl, _) = self.get("/sgx/certification/v4/rootcacrl", &[]).await?;
        let need = |chain: Option<String>, path: &str, header: &'static str| {
            chain.ok_or_else(|| PccsError::Header {
                url: format!("{}{path}", self.base),
                header,
            })
        };
        Ok(PccsResponses {
            tcb_info: tcb.to_vec(),
            tcb_info_issuer_chain: need(
                tcb_chain,
                "/tdx/certification/v4/tcb",
                "TCB-Info-Issuer-Chain",
            )?,
            qe_identity: qe.to_vec(),
            qe_identity_issuer_chain: need(
                qe_chain,
                "/tdx/certification/v4/qe/identity",
                "SGX-Enclave-Identity-Issuer-Chain",
            )?,
            pck_crl: crl.to_vec(),
            pck_crl_issuer_chain: need(
                crl_chain,
                "/sgx/certification/v4/pckcrl",
                "SGX-PCK-CRL-Issuer-Chain",
            )?,
            root_ca_crl_hex: root_crl.to_vec(),
        })
    }

    /// `GET path`: the body, and the first of `headers` present (URL-decoded).
    async fn get(&self, path: &str, headers: &[&'static str]) -> Result<Answer, PccsError> {
        let url = format!("{}{path}", self.base);
        let fail = |reason: String| PccsError::Request {
            url: url.clone(),
            reason,
        };
        let uri: http::Uri = url.parse().map_err(|e| fail(format!("{e}")))?;
        let exchange = async {
            let resp = self
                .client
                .get(uri)
                .await
                .map_err(|e| fail(ratls::error_chain(&e)))?;
            let status = resp.status();
            let retry_after = crate::acme::ari::retry_after_header(resp.headers());
            let chain = headers.iter().find_map(|h| {
                let v = resp.headers().get(*h)?.to_str().ok()?;
                ratls::quote::percent_decode(v)
            });
            let body = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| fail(e.to_string()))?
                .to_bytes();
            if !status.is_success() {
                return Err(PccsError::Status {
                    url: url.clone(),
                    status,
                    body: String::from_utf8_lossy(&body).chars().take(200).collect(),
                    retry_after,
                });
            }
            Ok((body, chain))
        };
        tokio::time::timeout(TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| Err(fail(format!("no answer within {TIMEOUT:?}"))))
    }
}

/// Write `r` into `dir` as the files [`Collateral::from_dir`] reads (atomically, each).
pub fn write_dir(dir: &Path, r: &PccsResponses) -> Result<(), crate::acme::store::StoreError> {
    let store = DirStore::new(dir);
    let head = |header: &str, chain: &str| {
        format!("HTTP/1.1 200 OK\r\n{header}: {}\r\n", percent_encode(chain))
    };
    store.write("tcb.json", &r.tcb_info, false)?;
    store.write(
        "tcb.json.headers",
        head("TCB-Info-Issuer-Chain", &r.tcb_info_issuer_chain).as_bytes(),
        false,
    )?;
    store.write("qe_identity.json", &r.qe_identity, false)?;
    store.write(
        "qe_identity.json.headers",
        head(
            "SGX-Enclave-Identity-Issuer-Chain",
            &r.qe_identity_issuer_chain,
        )
        .as_bytes(),
        false,
    )?;
    store.write("pckcrl.der", &r.pck_crl, false)?;
    store.write(
        "pckcrl.der.headers",
        head("SGX-PCK-CRL-Issuer-Chain", &r.pck_crl_issuer_chain).as_bytes(),
        false,
    )?;
    store.write("rootcacrl.hex", &r.root_ca_crl_hex, false)?;
    Ok(())
}

/// Keep `attestor`'s collateral for the platform `fmspc` fresh from `pccs`, cached in
/// `<dir>/<fmspc>/`. Runs until dropped; one per platform.
pub async fn keep(attestor: Arc<Attestor>, pccs: Pccs, fmspc: String, dir: std::path::PathBuf) {
    let dir = dir.join(&fmspc);
    let mut failures = 0u32;
    loop {
        let mut asked_to_wait = None;
        let now = crate::clock::unix_now();
        let due = |next: i64| now >= next - REFRESH_BEFORE;
        let held = attestor.collateral_for(&fmspc);
        if held.is_none_or(|c| due(c.next_update)) {
            match fetched(&pccs, &fmspc).await {
                Ok((collateral, _)) if collateral.fmspc != fmspc => {
                    tracing::warn!(pccs = %pccs.base, %fmspc, served = %collateral.fmspc, "attestation: the PCCS served collateral for another platform; not used");
                }
                Ok((collateral, responses)) => {
                    if let Err(e) = write_dir(&dir, &responses) {
                        tracing::warn!(dir = %dir.display(), error = %e, "attestation: collateral not cached on disk");
                    }
                    let next_update = collateral.next_update;
                    attestor.set_collateral(collateral);
                    // Said once it is cached and in use.
                    tracing::info!(pccs = %pccs.base, %fmspc, next_update = %crate::clock::rfc3339(next_update), "attestation: collateral fetched");
                    failures = 0;
                }
                Err(e) => {
                    failures += 1;
                    if let PccsError::Status { retry_after, .. } = &e {
                        asked_to_wait = *retry_after;
                    }
                    let held = attestor
                        .collateral_for(&fmspc)
                        .is_some_and(|c| c.next_update > now);
                    let retry_after_secs = asked_to_wait.map(|d| d.as_secs());
                    tracing::warn!(pccs = %pccs.base, %fmspc, error = %e, valid_held = held, retry_after_secs, "attestation: collateral not fetched; the collateral held (if still valid) stays in use");
                }
            }
        }
        // Until a day before the next update; hourly when that is past (a PCCS serving
        // collateral that is already due); after a failure, sooner (5 s doubling), unless the
        // PCCS asked for longer.
        let next = attestor
            .collateral_for(&fmspc)
            .map_or(now, |c| c.next_update);
        let until = next - REFRESH_BEFORE - crate::clock::unix_now();
        let mut wait = match u64::try_from(until) {
            Ok(secs) if secs > 0 => Duration::from_secs(secs).min(RETRY),
            _ => RETRY,
        };
        if failures > 0 {
            wait = wait.min(RETRY_MIN.saturating_mul(1 << (failures - 1).min(10)));
        }
        if let Some(asked) = asked_to_wait {
            wait = wait.max(asked);
        }
        tokio::time::sleep(wait).await;
    }
}

/// Fetch and check: collateral that does not parse is not cached.
async fn fetched(pccs: &Pccs, fmspc: &str) -> Result<(Collateral, PccsResponses), PccsError> {
    let responses = pccs.fetch(fmspc).await?;
    let collateral = Collateral::from_pccs(&responses)?;
    Ok((collateral, responses))
}

/// PEM text as a header value (what PCCS sends: percent-encoded).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3 / 2);
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}
