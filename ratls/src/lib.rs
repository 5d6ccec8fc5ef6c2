//! RA-TLS for dstack.
//!
//! A dstack application proves who it is with a certificate chain from the guest agent: the leaf
//! carries the app id (extension `1.3.6.1.4.1.62397.1.3`, or the app-info extension on simulator
//! certificates), and the chain ends in the KMS root. This crate holds everything both directions
//! of the mesh need to produce and check such proofs:
//!
//! - [`cert`]: read a certificate or chain (PEM or DER) into a [`ChainView`];
//! - [`Policy`]: the verification rules (chain to a trust anchor, validity, EKU for the role, then
//!   the app id against an expected id or an allowlist, optionally an attestation bound to the
//!   key), with a typed [`Rejection`] per rule;
//! - [`verifier`]: rustls verifiers that apply a policy inside the handshake, so a wrong peer
//!   never receives a request byte, and [`verifier::peer_identity`] for the connection's owner;
//! - [`agent`]: the guest-agent client (`dstack.sock`);
//! - [`identity`]: the sidecar's own identity, refreshed before it expires and swapped atomically;
//! - [`tls`]: rustls configs for the mesh on top of the two;
//! - [`quote`]: the TDX quote verified against collateral (`dcap-qvl`), the event log replayed
//!   to RTMR3, the measured facts read;
//! - [`dev_agent`]: a development agent with a local CA, which says loudly that it is not attested.
//!
//! One crypto backend is used throughout: aws-lc-rs, via [`crypto::provider`].

pub mod agent;
mod app_id;
pub mod attestation;
pub mod attested;
pub mod cert;
pub mod crypto;
pub mod dev_agent;
pub mod ext;
#[doc(hidden)]
pub mod fuzz;
pub mod identity;
mod msgpack;
pub mod policy;
pub mod quote;
pub mod tls;
pub mod verifier;

pub use app_id::{AppId, AppIdError, MAX_APP_ID_LEN};
pub use attestation::AttestationStatus;
pub use cert::{AppIdSource, CertError, ChainView};
pub use policy::{AllowList, Malformed, PeerRole, Policy, Rejection, TrustAnchors, VerifiedPeer};

/// An error and its sources, joined by `: `, so "connection refused" is not hidden behind
/// "client error".
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
