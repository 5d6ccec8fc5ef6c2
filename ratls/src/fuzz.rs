//! Entry points for the fuzz targets (`fuzz/`) and their corpus regression tests: each takes
//! untrusted bytes the way the sidecar receives them and drives everything they reach. None
//! may panic, whatever the input.

use rustls_pki_types::{CertificateDer, UnixTime};

use crate::{
    agent::{InfoResponse, QuoteResponse, TlsKeyResponse, VersionResponse},
    attestation::Attestation,
    cert::{parse_chain, parse_x509, ChainView, Claims},
    ext, PeerRole, Policy, TrustAnchors,
};

/// A peer's certificate chain (PEM or DER): parsing, the RA-TLS view, and verification against
/// its own last certificate as anchor, in both roles.
pub fn certificate(data: &[u8]) {
    let Ok(chain) = parse_chain(data) else { return };
    let _ = ChainView::new(&chain);
    verify_against_own_root(&chain);
    if let Ok(leaf) = parse_x509(0, &chain[0]) {
        if let Ok(claims) = Claims::read(0, &leaf) {
            let _ = crate::policy::identity_of(&leaf, &claims);
        }
    }
}

fn verify_against_own_root(chain: &[CertificateDer<'static>]) {
    let Some(root) = chain.last() else { return };
    if let Ok(anchors) = TrustAnchors::new(std::slice::from_ref(root)) {
        let policy = Policy::new(anchors).require_attestation(true);
        for role in [PeerRole::Server, PeerRole::Client] {
            let _ = policy.verify(&chain[0], &chain[1..], role, UnixTime::now());
        }
    }
}

/// The `extnValue` of one dstack extension; the first byte picks which (app id, usage,
/// app-info, attestation), the rest is the DER as it sits in the certificate.
pub fn ra_tls_extension(data: &[u8]) {
    let Some((&which, der)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => {
            let _ = ext::app_id(der);
        }
        1 => {
            let _ = ext::usage(der);
        }
        2 => {
            let _ = ext::app_info(der);
        }
        _ => {
            if let Ok(raw) = ext::unwrap_octet_string("attestation", der) {
                attestation(raw);
            }
        }
    }
}

/// The app-info extension's msgpack payload (what dstack writes with rmp-serde).
pub fn app_info(data: &[u8]) {
    let _ = ext::app_info(&ext::wrap_octet_string(data));
}

/// The attestation extension payload (V0 SCALE with its event log, V1 msgpack with its) and a
/// GetQuote answer's JSON event log; the RTMR3 replay of what they decoded and the FMSPC read
/// from the quote's PCK chain.
pub fn attestation(data: &[u8]) {
    if let Ok(att) = Attestation::parse(data) {
        let _ = att.report_data();
        let _ = att.binds_key(data);
        let _ = crate::quote::replay_rtmr3(&att.event_log);
        let _ = crate::quote::fmspc_of(&att.quote);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(att) = Attestation::from_get_quote("040002008100", text) {
            let _ = crate::quote::replay_rtmr3(&att.event_log);
        }
    }
}

/// A guest agent's JSON answer to each method the sidecar calls, and what the sidecar builds
/// from it: the identity (key and chain) from `GetTlsKey` + `Info`, the attestation from
/// `GetQuote`. The input is the answer body; `\0` separates a second body (the `Info` answer
/// for `GetTlsKey`).
pub fn agent_response(data: &[u8]) {
    let (first, second) = match data.iter().position(|b| *b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let info: InfoResponse = serde_json::from_slice(second).unwrap_or_default();
    if let Ok(resp) = serde_json::from_slice::<TlsKeyResponse>(first) {
        if let Ok(identity) = crate::identity::Identity::from_response(&resp, &info) {
            let _ = identity.self_check();
            let _ = identity.trust_anchors();
            let _ = identity.refresh_at(None);
        }
    }
    if let Ok(quote) = serde_json::from_slice::<QuoteResponse>(first) {
        if let Ok(att) = Attestation::from_get_quote(&quote.quote, &quote.event_log) {
            let _ = crate::quote::replay_rtmr3(&att.event_log);
            let _ = att.report_data();
        }
    }
    let _ = serde_json::from_slice::<InfoResponse>(first);
    let _ = serde_json::from_slice::<VersionResponse>(first);
    let _ = crate::agent::error_message(first);
}

/// A PCCS's TCB info and QE identity answers (`\0` between them): the signed objects and their
/// dates, as collateral is built from them; and the URL-encoded issuer-chain header.
pub fn pccs_collateral(data: &[u8]) {
    let (tcb, qe) = match data.iter().position(|b| *b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, data),
    };
    if let Ok(header) = std::str::from_utf8(qe) {
        let _ = crate::quote::percent_decode(header);
    }
    let r = crate::quote::PccsResponses {
        tcb_info: tcb.to_vec(),
        qe_identity: qe.to_vec(),
        ..Default::default()
    };
    let _ = crate::quote::Collateral::from_pccs(&r);
}

/// xorshift64*: a small deterministic generator for the suite's mutation tests, so a failure
/// reproduces from its seed.
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    #[allow(clippy::should_implement_trait)] // not an iterator: it never ends
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// `input` with one to five random edits of the kinds parsers trip on: flipped bits, bytes
/// replaced, cuts, insertions, length and separator bytes made extreme, spans copied or
/// removed.
pub fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..=rng.below(4) {
        if out.is_empty() {
            out.push(rng.next() as u8);
        }
        let at = rng.below(out.len());
        match rng.below(7) {
            0 => out[at] ^= 1 << rng.below(8),
            1 => out[at] = rng.next() as u8,
            2 => out.truncate(at),
            3 => out.insert(at, rng.next() as u8),
            // Length bytes and separators are what parsers trust most.
            4 => out[at] = [0x00, 0x7f, 0x80, 0x81, 0xff, b'"', b'\n', b'%'][rng.below(8)],
            5 => {
                let len = rng.below(64).min(out.len() - at);
                let chunk = out[at..at + len].to_vec();
                let to = rng.below(out.len());
                out.splice(to..to, chunk);
            }
            _ => {
                let len = rng.below(32).min(out.len() - at);
                out.drain(at..at + len);
            }
        }
    }
    out
}
