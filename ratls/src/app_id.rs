//! The dstack application id.

use std::{fmt, str::FromStr};

/// A dstack application id: raw bytes (20 for every dstack app), shown as lowercase hex.
///
/// Comparison is on the bytes, so `5BB4…` and `5bb4…` name the same app.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AppId(Box<[u8]>);

/// Longest app id accepted (bytes). dstack ids are 20 bytes; the slack admits other hash sizes.
pub const MAX_APP_ID_LEN: usize = 64;

/// Why a string is not an app id.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AppIdError {
    /// The string was empty.
    #[error("app id is empty")]
    Empty,
    /// The string is not an even number of hex digits.
    #[error("app id {0:?} is not hex (expected an even number of 0-9a-f digits)")]
    NotHex(String),
    /// The id is longer than [`MAX_APP_ID_LEN`] bytes.
    #[error("app id is {0} bytes long; at most {MAX_APP_ID_LEN} are allowed")]
    TooLong(usize),
}

impl AppId {
    /// An app id from raw bytes (as found in certificate extensions).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, AppIdError> {
        match bytes.len() {
            0 => Err(AppIdError::Empty),
            n if n > MAX_APP_ID_LEN => Err(AppIdError::TooLong(n)),
            _ => Ok(Self(bytes.into())),
        }
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl FromStr for AppId {
    type Err = AppIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let trimmed = s.trim();
        let hex_part = trimmed.strip_prefix("0x").unwrap_or(trimmed);
        if hex_part.is_empty() {
            return Err(AppIdError::Empty);
        }
        // Decoded on the stack: the outbound proxy parses one per request.
        let digits = hex_part.as_bytes();
        let not_hex = || AppIdError::NotHex(s.to_owned());
        if !digits.len().is_multiple_of(2) {
            return Err(not_hex());
        }
        let mut bytes = [0u8; MAX_APP_ID_LEN];
        for (i, pair) in digits.chunks_exact(2).enumerate() {
            let byte = (nibble(pair[0]).ok_or_else(not_hex)? << 4)
                | nibble(pair[1]).ok_or_else(not_hex)?;
            match bytes.get_mut(i) {
                Some(b) => *b = byte,
                None => return Err(AppIdError::TooLong(digits.len() / 2)),
            }
        }
        Self::from_bytes(&bytes[..digits.len() / 2])
    }
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl fmt::Display for AppId {
    /// Lowercase hex, written at once: ids are formatted on the request path (pool keys, logs).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut text = [0u8; 2 * MAX_APP_ID_LEN];
        for (pair, b) in text.chunks_exact_mut(2).zip(self.0.iter()) {
            pair[0] = DIGITS[usize::from(b >> 4)];
            pair[1] = DIGITS[usize::from(b & 0xf)];
        }
        let text = &text[..2 * self.0.len()];
        // Only ASCII digits were written.
        f.write_str(std::str::from_utf8(text).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for AppId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AppId({self})")
    }
}

impl serde::Serialize for AppId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for AppId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_case_insensitively_and_prints_lowercase() {
        let a: AppId = "5BB4ff9a3837357f19dc176407a5709c62eb6c56".parse().unwrap();
        let b: AppId = "0x5bb4ff9a3837357f19dc176407a5709c62eb6c56"
            .parse()
            .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "5bb4ff9a3837357f19dc176407a5709c62eb6c56");
        assert_eq!(a.as_bytes().len(), 20);
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!("".parse::<AppId>(), Err(AppIdError::Empty));
        assert!(matches!("xyz".parse::<AppId>(), Err(AppIdError::NotHex(_))));
        assert!(matches!("abc".parse::<AppId>(), Err(AppIdError::NotHex(_))));
        assert_eq!(
            "00".repeat(65).parse::<AppId>(),
            Err(AppIdError::TooLong(65))
        );
        assert!(matches!("0g".parse::<AppId>(), Err(AppIdError::NotHex(_))));
        assert!(matches!("é0".parse::<AppId>(), Err(AppIdError::NotHex(_))));
    }

    #[test]
    fn every_byte_and_length_round_trips_as_the_formatter_writes_it() {
        for len in 1..=MAX_APP_ID_LEN {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + len) as u8).collect();
            let expected: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            let id = AppId::from_bytes(&bytes).unwrap();
            assert_eq!(id.to_string(), expected);
            assert_eq!(expected.parse::<AppId>().unwrap(), id);
            assert_eq!(expected.to_uppercase().parse::<AppId>().unwrap(), id);
        }
        let all: Vec<u8> = (0..=255u8).collect();
        for chunk in all.chunks(MAX_APP_ID_LEN) {
            let id = AppId::from_bytes(chunk).unwrap();
            let expected: String = chunk.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(id.to_string(), expected);
        }
    }
}
