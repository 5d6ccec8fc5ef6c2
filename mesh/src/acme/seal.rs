//! Sealing for a store that other people run (etcd): whoever operates it sees ciphertext under
//! names it cannot read, and a value it changes, moves to another name or replays from another
//! domain or app fails to open.
//!
//! One secret per app comes from the guest agent's `GetKey` at [`SEAL_KEY_PATH`]: every
//! instance of the app gets the same one, no other app can. HKDF-SHA256 expands it into an
//! AES-256-GCM key for values and an HMAC-SHA256 key for names. A sealed value is
//! `version || nonce || ciphertext || tag`, its associated data the object's kind and logical
//! name; a stored name is `<kind>/<hex HMAC(kind, name)>`, so domain names stay private too.

use aws_lc_rs::{aead, hkdf, hmac, rand::SecureRandom};

/// The `GetKey` path of the sealing secret (changing it orphans every sealed value).
pub const SEAL_KEY_PATH: &str = "dstack-mesh/store-seal/v1";
/// The first byte of every sealed value.
const VERSION: u8 = 1;
/// Bound into every value and name: another use of the same secret cannot collide.
const CONTEXT: &[u8] = b"dstack-mesh store v1";

/// What a stored object is; part of what its seal binds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// An ACME account record.
    Account,
    /// A certificate chain.
    Certificate,
    /// A private key.
    PrivateKey,
    /// Order state and metadata.
    Order,
    /// A challenge response (TLS-ALPN-01 certificate or HTTP-01 key authorization).
    Challenge,
    /// A lock record.
    Lock,
    /// An instance's membership of the fleet.
    Member,
    /// An instance's word that it answers a published challenge.
    Ack,
    /// The registry role's entries (discovery).
    Registry,
}

impl Kind {
    /// Its name in the store and in the associated data.
    pub fn label(self) -> &'static str {
        match self {
            Self::Account => "account",
            Self::Certificate => "cert",
            Self::PrivateKey => "key",
            Self::Order => "order",
            Self::Challenge => "challenge",
            Self::Lock => "lock",
            Self::Member => "member",
            Self::Ack => "ack",
            Self::Registry => "registry",
        }
    }
}

/// Why a sealed value did not open.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// Shorter than a version, nonce and tag.
    #[error("sealed value truncated ({0} bytes)")]
    Truncated(usize),
    /// Sealed by a version this one does not read.
    #[error("sealed value of unknown version {0}")]
    Version(u8),
    /// Authentication failed: changed, moved from another name or kind, or sealed with another
    /// app's key.
    #[error("sealed value does not open: changed, moved, or sealed by another app")]
    Forged,
    /// The system's random number generator failed (sealing only).
    #[error("random number generator failed")]
    Random,
}

/// The sealing keys of one app.
pub struct Sealer {
    values: aead::LessSafeKey,
    names: hmac::Key,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

/// HKDF output of a fixed length.
struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

impl Sealer {
    /// The keys derived from the app's sealing secret (`GetKey` at [`SEAL_KEY_PATH`]).
    pub fn from_secret(secret: &[u8]) -> Self {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, CONTEXT).extract(secret);
        let expand = |info: &[u8], len: usize| {
            let mut out = vec![0u8; len];
            // Lengths are fixed and far below HKDF's limit (255 hashes): cannot fail.
            if let Ok(okm) = prk.expand(&[info], Len(len)) {
                let _ = okm.fill(&mut out);
            }
            out
        };
        let value_key = expand(b"values", aead::AES_256_GCM.key_len());
        let name_key = expand(b"names", 32);
        Self {
            values: aead::LessSafeKey::new(
                aead::UnboundKey::new(&aead::AES_256_GCM, &value_key)
                    .unwrap_or_else(|_| unreachable!("the key has AES-256's length")),
            ),
            names: hmac::Key::new(hmac::HMAC_SHA256, &name_key),
        }
    }

    /// The stored name of `name`: `<kind>/<hex HMAC>`, the same for every instance.
    pub fn name(&self, kind: Kind, name: &str) -> String {
        let tag = hmac::sign(&self.names, &associated(kind, name));
        format!("{}/{}", kind.label(), hex::encode(&tag.as_ref()[..20]))
    }

    /// `plaintext` sealed as `kind` under `name`.
    pub fn seal(&self, kind: Kind, name: &str, plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut nonce = [0u8; aead::NONCE_LEN];
        aws_lc_rs::rand::SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| SealError::Random)?;
        let mut out = Vec::with_capacity(1 + nonce.len() + plaintext.len() + 16);
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let tag = self
            .values
            .seal_in_place_separate_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(associated(kind, name)),
                &mut out[1 + aead::NONCE_LEN..],
            )
            .map_err(|_| SealError::Random)?;
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    /// The plaintext of `sealed`, if it was sealed by this app as `kind` under `name`.
    pub fn open(&self, kind: Kind, name: &str, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        let min = 1 + aead::NONCE_LEN + aead::AES_256_GCM.tag_len();
        if sealed.len() < min {
            return Err(SealError::Truncated(sealed.len()));
        }
        if sealed[0] != VERSION {
            return Err(SealError::Version(sealed[0]));
        }
        let mut nonce = [0u8; aead::NONCE_LEN];
        nonce.copy_from_slice(&sealed[1..1 + aead::NONCE_LEN]);
        let mut body = sealed[1 + aead::NONCE_LEN..].to_vec();
        let plain = self
            .values
            .open_in_place(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(associated(kind, name)),
                &mut body,
            )
            .map_err(|_| SealError::Forged)?;
        Ok(plain.to_vec())
    }
}

/// What a seal binds besides the value: the context, the kind and the logical name.
fn associated(kind: Kind, name: &str) -> Vec<u8> {
    let mut ad = CONTEXT.to_vec();
    ad.push(0);
    ad.extend_from_slice(kind.label().as_bytes());
    ad.push(0);
    ad.extend_from_slice(name.as_bytes());
    ad
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"the app's sealing secret from GetKey";

    #[test]
    fn a_value_opens_only_where_and_as_what_it_was_sealed() {
        let sealer = Sealer::from_secret(SECRET);
        let key = b"-----BEGIN PRIVATE KEY-----\n...";
        let sealed = sealer
            .seal(Kind::PrivateKey, "certs/shop.test/key.pem", key)
            .unwrap();
        assert!(!sealed.windows(11).any(|w| w == b"PRIVATE KEY"));
        assert_eq!(
            sealer
                .open(Kind::PrivateKey, "certs/shop.test/key.pem", &sealed)
                .unwrap(),
            key
        );
        // Another instance of the app: the same secret opens it.
        let replica = Sealer::from_secret(SECRET);
        assert!(replica
            .open(Kind::PrivateKey, "certs/shop.test/key.pem", &sealed)
            .is_ok());
        // Moved to another domain, relabelled as another kind, or another app's key: refused.
        for (kind, name) in [
            (Kind::PrivateKey, "certs/other.test/key.pem"),
            (Kind::Certificate, "certs/shop.test/key.pem"),
        ] {
            assert_eq!(sealer.open(kind, name, &sealed), Err(SealError::Forged));
        }
        let other_app = Sealer::from_secret(b"another app's secret");
        assert_eq!(
            other_app.open(Kind::PrivateKey, "certs/shop.test/key.pem", &sealed),
            Err(SealError::Forged)
        );
    }

    #[test]
    fn every_flipped_byte_and_every_truncation_is_refused() {
        let sealer = Sealer::from_secret(SECRET);
        let sealed = sealer
            .seal(Kind::Certificate, "certs/shop.test/chain.pem", b"chain")
            .unwrap();
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert!(
                sealer
                    .open(Kind::Certificate, "certs/shop.test/chain.pem", &bad)
                    .is_err(),
                "byte {i}"
            );
        }
        for len in 0..sealed.len() {
            assert!(sealer
                .open(
                    Kind::Certificate,
                    "certs/shop.test/chain.pem",
                    &sealed[..len]
                )
                .is_err());
        }
        assert_eq!(
            sealer.open(Kind::Certificate, "x", &[9; 64]),
            Err(SealError::Version(9))
        );
    }

    #[test]
    fn names_are_stable_per_app_and_do_not_show_the_domain() {
        let a = Sealer::from_secret(SECRET);
        let name = a.name(Kind::Certificate, "certs/shop.test/chain.pem");
        assert_eq!(
            name,
            Sealer::from_secret(SECRET).name(Kind::Certificate, "certs/shop.test/chain.pem")
        );
        assert!(
            name.starts_with("cert/") && !name.contains("shop"),
            "{name}"
        );
        assert_ne!(
            name,
            a.name(Kind::Certificate, "certs/shop2.test/chain.pem")
        );
        assert_ne!(
            name,
            Sealer::from_secret(b"other").name(Kind::Certificate, "certs/shop.test/chain.pem")
        );
        // Two seals of one value differ (fresh nonces): equal values are not linkable.
        assert_ne!(
            a.seal(Kind::Order, "o", b"same").unwrap(),
            a.seal(Kind::Order, "o", b"same").unwrap()
        );
    }
}
