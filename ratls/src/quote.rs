//! What a peer's attestation proves: its TDX quote verified with `dcap-qvl` against a TDX root
//! (Intel's in production) and collateral (TCB info, QE identity, CRLs), and the dstack event
//! log replayed to the quote's RTMR3, from which the measured facts are read: app id, instance
//! id, compose hash, OS image hash, key provider.
//!
//! Verification is pure: collateral comes in, never fetched here (a handshake must not wait on
//! a PCCS), and the time is the caller's.

use std::{collections::BTreeMap, path::Path, sync::Arc};

use aws_lc_rs::digest::{digest, SHA384};
use dcap_qvl::{verify::QuoteVerifier, QuoteCollateralV3};

use crate::attestation::{Attestation, TdxEvent};

/// dstack's runtime events (RTMR3): `sha384(type_le || ":" || name || ":" || payload)`.
pub const RUNTIME_EVENT_TYPE: u32 = 0x0800_0001;
/// The measurement register dstack's runtime events extend.
const RTMR3: u32 = 3;
/// After this event the log is the running system's, not what booted.
const SYSTEM_READY: &str = "system-ready";

/// A TDX root CA: Intel's SGX/TDX root in production, another (DER) in tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TdxRoot(Option<Vec<u8>>);

impl TdxRoot {
    /// Intel's SGX root CA, as `dcap-qvl` ships it.
    pub fn intel() -> Self {
        Self(None)
    }

    fn verifier(&self) -> QuoteVerifier {
        match &self.0 {
            None => QuoteVerifier::new_prod(),
            Some(der) => QuoteVerifier::new(der.clone()),
        }
    }

    /// The first certificate of a PEM file.
    pub fn from_pem(pem: &[u8]) -> Result<Self, QuoteError> {
        let chain = crate::cert::parse_chain(pem)
            .map_err(|e| QuoteError::Collateral(format!("TDX root: {e}")))?;
        let first = chain
            .into_iter()
            .next()
            .ok_or_else(|| QuoteError::Collateral("TDX root: no certificate".into()))?;
        Ok(Self(Some(first.to_vec())))
    }
}

/// Collateral for quotes of one platform (FMSPC), as a PCCS serves it.
#[derive(Clone, Debug)]
pub struct Collateral {
    inner: QuoteCollateralV3,
    /// The earliest `nextUpdate` of its TCB info and QE identity (unix seconds): past it, the
    /// collateral no longer verifies anything.
    pub next_update: i64,
    /// The FMSPC its TCB info is for.
    pub fmspc: String,
}

/// PCCS v4 answers, as the fetcher or a directory hands them over.
#[derive(Clone, Debug, Default)]
pub struct PccsResponses {
    /// `GET /tdx/certification/v4/tcb?fmspc=…`: the body.
    pub tcb_info: Vec<u8>,
    /// Its `TCB-Info-Issuer-Chain` (or `SGX-TCB-Info-Issuer-Chain`) header, URL-decoded PEM.
    pub tcb_info_issuer_chain: String,
    /// `GET /tdx/certification/v4/qe/identity`: the body.
    pub qe_identity: Vec<u8>,
    /// Its `SGX-Enclave-Identity-Issuer-Chain` header, URL-decoded PEM.
    pub qe_identity_issuer_chain: String,
    /// `GET /sgx/certification/v4/pckcrl?ca=platform&encoding=der`: the body (DER).
    pub pck_crl: Vec<u8>,
    /// Its `SGX-PCK-CRL-Issuer-Chain` header, URL-decoded PEM.
    pub pck_crl_issuer_chain: String,
    /// `GET /sgx/certification/v4/rootcacrl`: the body (hex of the DER, as PCCS answers).
    pub root_ca_crl_hex: Vec<u8>,
}

/// Why a quote did not prove anything.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QuoteError {
    /// No usable collateral (missing, unreadable, for another platform).
    #[error("collateral unavailable: {0}")]
    Collateral(String),
    /// The collateral's `nextUpdate` has passed.
    #[error("collateral expired: {0}")]
    CollateralExpired(String),
    /// The quote's signature chain, QE report or TCB evaluation failed.
    #[error("quote does not verify: {0}")]
    Signature(String),
    /// The event log does not replay to the quote's RTMR3.
    #[error("event log does not replay to RTMR3")]
    EventLogMismatch,
    /// The quote or the attestation is not one this verifier reads.
    #[error("quote malformed: {0}")]
    Malformed(String),
}

impl QuoteError {
    /// A bounded label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Collateral(_) => "collateral_unavailable",
            Self::CollateralExpired(_) => "collateral_expired",
            Self::Signature(_) => "quote_signature",
            Self::EventLogMismatch => "event_log_mismatch",
            Self::Malformed(_) => "quote_malformed",
        }
    }
}

/// What a verified quote and its replayed event log establish.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct QuoteFacts {
    /// The platform's TCB status (`UpToDate`, `SWHardeningNeeded`, `OutOfDate`, ...).
    pub tcb_status: String,
    /// Intel advisories that apply.
    pub advisory_ids: Vec<String>,
    /// The TD's initial measurement (hex).
    pub mr_td: String,
    /// RTMR0-3 (hex).
    pub rtmr: [String; 4],
    /// The 64 bytes of report data (hex).
    pub report_data: String,
    /// The app id the event log measured (hex).
    pub app_id: Option<String>,
    /// The instance id the event log measured (hex).
    pub instance_id: Option<String>,
    /// The app-compose hash (hex).
    pub compose_hash: Option<String>,
    /// The OS image hash (hex; measured on the KMS path).
    pub os_image_hash: Option<String>,
    /// The key provider (its JSON, as measured).
    pub key_provider: Option<String>,
    /// The collateral's earliest `nextUpdate` (unix seconds): these facts hold until then.
    pub valid_until: i64,
}

impl Collateral {
    /// Collateral from PCCS answers.
    pub fn from_pccs(r: &PccsResponses) -> Result<Self, QuoteError> {
        let bad =
            |what: &str, e: &dyn std::fmt::Display| QuoteError::Collateral(format!("{what}: {e}"));
        // The signature covers the inner object's exact bytes: take them as served.
        let (tcb_info, tcb_sig) =
            signed_object(&r.tcb_info, "tcbInfo").map_err(|e| bad("TCB info", &e))?;
        let (qe_identity, qe_sig) =
            signed_object(&r.qe_identity, "enclaveIdentity").map_err(|e| bad("QE identity", &e))?;
        let dates = |json: &str| -> Result<(i64, String), String> {
            let v: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
            let next = v["nextUpdate"].as_str().ok_or("no nextUpdate")?;
            let next =
                time::OffsetDateTime::parse(next, &time::format_description::well_known::Rfc3339)
                    .map_err(|e| format!("nextUpdate {next:?}: {e}"))?;
            Ok((
                next.unix_timestamp(),
                v["fmspc"].as_str().unwrap_or_default().to_owned(),
            ))
        };
        let (tcb_next, fmspc) = dates(&tcb_info).map_err(|e| bad("TCB info", &e))?;
        let (qe_next, _) = dates(&qe_identity).map_err(|e| bad("QE identity", &e))?;
        let root_ca_crl =
            hex::decode(r.root_ca_crl_hex.trim_ascii()).map_err(|e| bad("root CA CRL", &e))?;
        Ok(Self {
            inner: QuoteCollateralV3 {
                pck_crl_issuer_chain: r.pck_crl_issuer_chain.clone(),
                root_ca_crl,
                pck_crl: r.pck_crl.clone(),
                tcb_info_issuer_chain: r.tcb_info_issuer_chain.clone(),
                tcb_info,
                tcb_info_signature: tcb_sig,
                qe_identity_issuer_chain: r.qe_identity_issuer_chain.clone(),
                qe_identity,
                qe_identity_signature: qe_sig,
                pck_certificate_chain: None,
            },
            next_update: tcb_next.min(qe_next),
            fmspc: fmspc.to_ascii_lowercase(),
        })
    }

    /// Collateral from a directory holding PCCS answers as files, each body with its response
    /// head beside it (`<file>.headers`): `tcb.json`, `qe_identity.json`, `pckcrl.der`,
    /// `rootcacrl.hex` (air-gapped setups; the layout `dstack-mock-attestation` records).
    pub fn from_dir(dir: &Path) -> Result<Self, QuoteError> {
        let read = |name: &str| {
            std::fs::read(dir.join(name))
                .map_err(|e| QuoteError::Collateral(format!("{}: {e}", dir.join(name).display())))
        };
        let header = |name: &str, headers: &[&str]| -> Result<String, QuoteError> {
            let head = read(&format!("{name}.headers"))?;
            let head = String::from_utf8_lossy(&head);
            head.lines()
                .find_map(|line| {
                    let (k, v) = line.split_once(':')?;
                    headers
                        .iter()
                        .any(|h| k.trim().eq_ignore_ascii_case(h))
                        .then(|| percent_decode(v.trim()))
                })
                .flatten()
                .ok_or_else(|| {
                    QuoteError::Collateral(format!("{name}.headers: no {}", headers.join(" or ")))
                })
        };
        Self::from_pccs(&PccsResponses {
            tcb_info: read("tcb.json")?,
            tcb_info_issuer_chain: header(
                "tcb.json",
                &["TCB-Info-Issuer-Chain", "SGX-TCB-Info-Issuer-Chain"],
            )?,
            qe_identity: read("qe_identity.json")?,
            qe_identity_issuer_chain: header(
                "qe_identity.json",
                &["SGX-Enclave-Identity-Issuer-Chain"],
            )?,
            pck_crl: read("pckcrl.der")?,
            pck_crl_issuer_chain: header("pckcrl.der", &["SGX-PCK-CRL-Issuer-Chain"])?,
            root_ca_crl_hex: read("rootcacrl.hex")?,
        })
    }
}

/// Collateral for each platform (FMSPC) peers run on: a fleet spread over several CPU models
/// needs one TCB info per model.
#[derive(Clone, Debug, Default)]
pub struct CollateralSet(BTreeMap<String, Arc<Collateral>>);

impl CollateralSet {
    /// Add `collateral`, replacing what its FMSPC had.
    pub fn insert(&mut self, collateral: impl Into<Arc<Collateral>>) {
        let collateral = collateral.into();
        self.0.insert(collateral.fmspc.clone(), collateral);
    }

    /// The collateral for `fmspc` (lowercase hex).
    pub fn get(&self, fmspc: &str) -> Option<&Arc<Collateral>> {
        self.0.get(fmspc)
    }

    /// Each platform's collateral.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Collateral>> {
        self.0.values()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The collateral `quote` needs: its PCK certificate's FMSPC picks it.
    pub fn for_quote(&self, quote: &[u8]) -> Result<&Arc<Collateral>, QuoteError> {
        let fmspc = fmspc_of(quote)?;
        self.get(&fmspc).ok_or_else(|| {
            let held: Vec<&str> = self.0.keys().map(String::as_str).collect();
            QuoteError::Collateral(format!(
                "none for the quote's platform (FMSPC {fmspc}); held: [{}]",
                held.join(", ")
            ))
        })
    }

    /// A directory of collateral: the PCCS answers at its top (one platform, the layout
    /// [`Collateral::from_dir`] reads) and in each subdirectory (one per platform, as the PCCS
    /// keeper writes them). Fails only when no platform's collateral loads.
    pub fn from_dir(dir: &Path) -> Result<Self, QuoteError> {
        let mut set = Self::default();
        let mut first_error = None;
        let mut dirs = vec![dir.to_owned()];
        if let Ok(entries) = std::fs::read_dir(dir) {
            let mut subdirs: Vec<_> = entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect();
            subdirs.sort();
            dirs.extend(subdirs);
        }
        for d in dirs {
            match Collateral::from_dir(&d) {
                Ok(c) => set.insert(c),
                Err(e) if d.join("tcb.json").exists() || first_error.is_none() => {
                    first_error = Some(e)
                }
                Err(_) => {}
            }
        }
        match (set.is_empty(), first_error) {
            (true, Some(e)) => Err(e),
            _ => Ok(set),
        }
    }
}

/// The FMSPC (lowercase hex) of the platform that signed `quote`, from its PCK certificate.
pub fn fmspc_of(quote: &[u8]) -> Result<String, QuoteError> {
    let parsed = dcap_qvl::quote::Quote::parse(quote)
        .map_err(|e| QuoteError::Malformed(format!("{e:#}")))?;
    dcap_qvl::intel::quote_fmspc(&parsed)
        .map(hex::encode)
        .map_err(|e| QuoteError::Malformed(format!("PCK certificate: {e:#}")))
}

/// Verify `attestation`'s quote against `collateral` under `root` at `now` (unix seconds), and
/// replay its event log to RTMR3.
pub fn verify(
    attestation: &Attestation,
    collateral: &Collateral,
    root: &TdxRoot,
    now: u64,
) -> Result<QuoteFacts, QuoteError> {
    if i64::try_from(now).unwrap_or(i64::MAX) > collateral.next_update {
        return Err(QuoteError::CollateralExpired(format!(
            "nextUpdate {} has passed",
            crate::cert::rfc3339(collateral.next_update)
        )));
    }
    let verified = root
        .verifier()
        .verify(&attestation.quote, &collateral.inner, now)
        .map_err(|e| classify(&format!("{e:#}")))?;
    let td = verified
        .report
        .as_td10()
        .ok_or_else(|| QuoteError::Malformed("not a TDX quote".into()))?;
    let replayed = replay_rtmr3(&attestation.event_log);
    if replayed[..] != td.rt_mr3[..] {
        return Err(QuoteError::EventLogMismatch);
    }
    let fact = |name: &str| runtime_event(&attestation.event_log, name).map(hex::encode);
    Ok(QuoteFacts {
        tcb_status: verified.status,
        advisory_ids: verified.advisory_ids,
        mr_td: hex::encode(td.mr_td),
        rtmr: [td.rt_mr0, td.rt_mr1, td.rt_mr2, td.rt_mr3].map(hex::encode),
        report_data: hex::encode(td.report_data),
        app_id: fact("app-id"),
        instance_id: fact("instance-id"),
        compose_hash: fact("compose-hash"),
        os_image_hash: fact("os-image-hash"),
        key_provider: runtime_event(&attestation.event_log, "key-provider")
            .map(|p| String::from_utf8_lossy(p).into_owned()),
        valid_until: collateral.next_update,
    })
}

/// RTMR3 as the event log builds it: from zero, `sha384(rtmr || digest)` per IMR-3 event;
/// a runtime event's digest is recomputed from its name and payload, never taken as logged.
pub fn replay_rtmr3(log: &[TdxEvent]) -> [u8; 48] {
    let mut rtmr = [0u8; 48];
    for event in log.iter().filter(|e| e.imr == RTMR3) {
        let digest_of = |d: &[u8]| -> Vec<u8> {
            let mut both = rtmr.to_vec();
            both.extend_from_slice(d);
            digest(&SHA384, &both).as_ref().to_vec()
        };
        let next = match event.event_type {
            RUNTIME_EVENT_TYPE => {
                let mut preimage = RUNTIME_EVENT_TYPE.to_le_bytes().to_vec();
                preimage.push(b':');
                preimage.extend_from_slice(event.event.as_bytes());
                preimage.push(b':');
                preimage.extend_from_slice(&event.payload);
                digest_of(digest(&SHA384, &preimage).as_ref())
            }
            _ => digest_of(&event.digest),
        };
        rtmr.copy_from_slice(&next);
    }
    rtmr
}

/// The payload of the first runtime event `name` before `system-ready`.
fn runtime_event<'a>(log: &'a [TdxEvent], name: &str) -> Option<&'a [u8]> {
    log.iter()
        .filter(|e| e.imr == RTMR3 && e.event_type == RUNTIME_EVENT_TYPE)
        .take_while(|e| e.event != SYSTEM_READY)
        .find(|e| e.event == name)
        .map(|e| e.payload.as_slice())
}

/// `{"<key>": {...}, "signature": "<hex>"}`: the object's exact bytes and the signature.
fn signed_object(body: &[u8], key: &str) -> Result<(String, Vec<u8>), String> {
    #[derive(serde::Deserialize)]
    struct Signed<'a> {
        #[serde(borrow, rename = "tcbInfo", alias = "enclaveIdentity")]
        object: &'a serde_json::value::RawValue,
        signature: String,
    }
    let signed: Signed<'_> = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let text = signed.object.get();
    if !std::str::from_utf8(body).is_ok_and(|b| b.contains(&format!("\"{key}\""))) {
        return Err(format!("no {key}"));
    }
    let signature = hex::decode(&signed.signature).map_err(|e| format!("signature: {e}"))?;
    Ok((text.to_owned(), signature))
}

/// `%XX` escapes decoded (the PCCS issuer-chain headers).
pub fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        out.push(match b {
            b'%' => {
                let hex = [bytes.next()?, bytes.next()?];
                u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?
            }
            b => b,
        });
    }
    String::from_utf8(out).ok()
}

/// dcap-qvl's error text, as one of our reasons.
fn classify(message: &str) -> QuoteError {
    let lower = message.to_ascii_lowercase();
    if lower.contains("expired") {
        QuoteError::CollateralExpired(message.to_owned())
    } else if lower.contains("fmspc mismatch") || lower.contains("non-tdx tcb info") {
        QuoteError::Collateral(message.to_owned())
    } else if lower.contains("decode quote") || lower.contains("unsupported") {
        QuoteError::Malformed(message.to_owned())
    } else {
        QuoteError::Signature(message.to_owned())
    }
}
