//! The attestation extension (`…62397.1.8`): which format, the quote, and whether its report
//! data binds the certificate's key.
//!
//! This reads the evidence; [`crate::quote`] verifies the quote's signature against collateral
//! and replays the event log.

use aws_lc_rs::digest;

use crate::msgpack;

/// Prefix of the report data that binds a certificate key: `sha512("ratls-cert:" || SPKI DER)`.
pub const REPORT_DATA_PREFIX: &[u8] = b"ratls-cert:";

/// The encoding of an attestation extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// `VersionedAttestation::V0`: SCALE, a TDX quote followed by an event log.
    V0Scale,
    /// `VersionedAttestation::V1`: a msgpack map.
    V1Msgpack,
    /// A guest agent's `GetQuote` answer: the quote in hex, the event log as JSON.
    GetQuote,
}

/// What was read from an attestation extension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attestation {
    /// How it was encoded.
    pub format: Format,
    /// The TDX quote.
    pub quote: Vec<u8>,
    /// The TDX event log (V0: SCALE after the quote; empty when the encoding carries none).
    pub event_log: Vec<TdxEvent>,
}

/// One event of the TDX event log, as dstack's `cc-eventlog` encodes it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TdxEvent {
    /// The measurement register (3: RTMR3, where dstack's runtime events go).
    pub imr: u32,
    /// The event type (`0x08000001`: a dstack runtime event).
    pub event_type: u32,
    /// The digest as logged (runtime events' digests are recomputed, not taken).
    #[serde(serialize_with = "as_hex")]
    pub digest: Vec<u8>,
    /// The event's name (`app-id`, `compose-hash`, ...).
    pub event: String,
    /// Its payload.
    #[serde(serialize_with = "as_hex")]
    pub payload: Vec<u8>,
}

fn as_hex<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(bytes))
}

/// Most events an event log may hold (a real one has a few dozen).
const MAX_EVENTS: usize = 4096;

/// Why an attestation could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AttestationError {
    /// Neither of dstack's versioned encodings.
    #[error("unknown attestation encoding (first byte {0:#04x})")]
    UnknownFormat(u8),
    /// The extension is empty.
    #[error("attestation is empty")]
    Empty,
    /// The SCALE or msgpack structure is broken.
    #[error("attestation is malformed: {0}")]
    Malformed(&'static str),
}

impl Attestation {
    /// Parse the payload of the attestation extension (after the OCTET STRING wrapper).
    pub fn parse(raw: &[u8]) -> Result<Self, AttestationError> {
        match raw.first() {
            None => Err(AttestationError::Empty),
            Some(0x00) => Self::parse_v0(&raw[1..]),
            Some(b) if (0x80..=0x8f).contains(b) || *b == 0xde || *b == 0xdf => Self::parse_v1(raw),
            Some(b) => Err(AttestationError::UnknownFormat(*b)),
        }
    }

    fn parse_v0(rest: &[u8]) -> Result<Self, AttestationError> {
        // Attestation enum variant 0 = DstackTdx, then the quote as a SCALE Vec<u8>.
        let rest = match rest.split_first() {
            Some((0x00, rest)) => rest,
            Some(_) => {
                return Err(AttestationError::Malformed(
                    "unsupported V0 platform variant",
                ))
            }
            None => return Err(AttestationError::Malformed("V0 truncated")),
        };
        let (quote, rest) = scale_bytes(rest, "V0 quote truncated")?;
        // `TdxQuote { quote, event_log: Vec<TdxEvent> }`; what follows (runtime events, report
        // data, config) repeats what the quote and the log already say.
        let (count, mut rest) = scale_compact(rest)?;
        if count > MAX_EVENTS {
            return Err(AttestationError::Malformed("V0 event log too long"));
        }
        let mut event_log = Vec::with_capacity(count);
        for _ in 0..count {
            let (event, after) = TdxEvent::decode(rest)?;
            event_log.push(event);
            rest = after;
        }
        Ok(Self {
            format: Format::V0Scale,
            quote: quote.to_vec(),
            event_log,
        })
    }

    fn parse_v1(raw: &[u8]) -> Result<Self, AttestationError> {
        let value =
            msgpack::decode(raw).map_err(|_| AttestationError::Malformed("V1 is not msgpack"))?;
        let quote = value
            .get("platform")
            .and_then(|p| p.get("data"))
            .and_then(|d| d.get("quote"))
            .and_then(msgpack::Value::bytes)
            .ok_or(AttestationError::Malformed("V1 has no platform.data.quote"))?;
        // `platform.data.event_log`: maps of imr, event_type, digest, event, event_payload.
        let events = match value
            .get("platform")
            .and_then(|p| p.get("data"))
            .and_then(|d| d.get("event_log"))
        {
            None => &[][..],
            Some(msgpack::Value::Array(events)) => events.as_slice(),
            Some(_) => return Err(AttestationError::Malformed("V1 event_log is not an array")),
        };
        if events.len() > MAX_EVENTS {
            return Err(AttestationError::Malformed("V1 event log too long"));
        }
        let event_log = events
            .iter()
            .map(|e| {
                let int = |k: &str| match e.get(k) {
                    Some(msgpack::Value::Int(i)) => u32::try_from(*i).ok(),
                    _ => None,
                };
                Some(TdxEvent {
                    imr: int("imr")?,
                    event_type: int("event_type")?,
                    digest: e.get("digest")?.bytes()?,
                    event: match e.get("event")? {
                        msgpack::Value::Str(s) => (*s).to_owned(),
                        _ => return None,
                    },
                    payload: e.get("event_payload")?.bytes()?,
                })
            })
            .collect::<Option<Vec<_>>>()
            .ok_or(AttestationError::Malformed("V1 event log entry malformed"))?;
        Ok(Self {
            format: Format::V1Msgpack,
            quote,
            event_log,
        })
    }

    /// A guest agent's `GetQuote` answer: `quote` (hex) and `event_log` (a JSON array of
    /// `{imr, event_type, digest, event, event_payload}`, hex where bytes).
    pub fn from_get_quote(quote_hex: &str, event_log_json: &str) -> Result<Self, AttestationError> {
        #[derive(serde::Deserialize)]
        struct JsonEvent {
            imr: u32,
            event_type: u32,
            digest: String,
            #[serde(default)]
            event: String,
            #[serde(default)]
            event_payload: String,
        }
        let quote = hex::decode(quote_hex.trim().trim_start_matches("0x"))
            .map_err(|_| AttestationError::Malformed("the quote is not hex"))?;
        if quote.is_empty() {
            return Err(AttestationError::Empty);
        }
        let events: Vec<JsonEvent> = match event_log_json.trim() {
            "" => Vec::new(),
            text => serde_json::from_str(text).map_err(|_| {
                AttestationError::Malformed("the event log is not a JSON event list")
            })?,
        };
        if events.len() > MAX_EVENTS {
            return Err(AttestationError::Malformed("event log too long"));
        }
        let event_log = events
            .into_iter()
            .map(|e| {
                Some(TdxEvent {
                    imr: e.imr,
                    event_type: e.event_type,
                    digest: hex::decode(&e.digest).ok()?,
                    event: e.event,
                    payload: hex::decode(&e.event_payload).ok()?,
                })
            })
            .collect::<Option<Vec<_>>>()
            .ok_or(AttestationError::Malformed(
                "an event's digest or payload is not hex",
            ))?;
        Ok(Self {
            format: Format::GetQuote,
            quote,
            event_log,
        })
    }

    /// The 64-byte report data of the TDX quote (v4 or v5), if the quote is long enough.
    pub fn report_data(&self) -> Option<&[u8]> {
        quote_report_data(&self.quote)
    }

    /// Whether the report data is `sha512("ratls-cert:" || spki_der)`.
    pub fn binds_key(&self, spki_der: &[u8]) -> bool {
        self.report_data() == Some(expected_report_data(spki_der).as_ref())
    }
}

/// The report data that binds a key: `sha512("ratls-cert:" || spki_der)`.
pub fn expected_report_data(spki_der: &[u8]) -> digest::Digest {
    let mut ctx = digest::Context::new(&digest::SHA512);
    ctx.update(REPORT_DATA_PREFIX);
    ctx.update(spki_der);
    ctx.finish()
}

/// `tee_type` of a TDX quote (header bytes 4..8).
const TEE_TYPE_TDX: u32 = 0x81;
/// Offset of `report_data` in a TDX v4 quote: the 48-byte header, then the TD report body.
const V4_REPORT_DATA: usize = 48 + 520;
/// In v5 quotes a 6-byte body descriptor (type, size) sits between header and body.
const V5_REPORT_DATA: usize = 48 + 6 + 520;

/// The report data of a TDX quote: v4 and v5 layouts, by the version field.
pub fn quote_report_data(quote: &[u8]) -> Option<&[u8]> {
    let version = u16::from_le_bytes([*quote.first()?, *quote.get(1)?]);
    let tee_type = u32::from_le_bytes(quote.get(4..8)?.try_into().ok()?);
    if tee_type != TEE_TYPE_TDX {
        return None;
    }
    let offset = match version {
        4 => V4_REPORT_DATA,
        // Body types 2 (TD 1.0) and 3 (TD 1.5) both start with the TD 1.0 report.
        5 if matches!(
            u16::from_le_bytes(quote.get(48..50)?.try_into().ok()?),
            2 | 3
        ) =>
        {
            V5_REPORT_DATA
        }
        _ => return None,
    };
    quote.get(offset..offset + 64)
}

/// A SCALE compact-encoded length, and what follows it.
impl TdxEvent {
    /// One SCALE-encoded event (`imr: u32, event_type: u32, digest: Vec<u8>, event: String,
    /// event_payload: Vec<u8>`) and what follows it.
    fn decode(input: &[u8]) -> Result<(Self, &[u8]), AttestationError> {
        let (imr, rest) = scale_u32(input)?;
        let (event_type, rest) = scale_u32(rest)?;
        let (digest, rest) = scale_bytes(rest, "event digest truncated")?;
        let (event, rest) = scale_bytes(rest, "event name truncated")?;
        let (payload, rest) = scale_bytes(rest, "event payload truncated")?;
        let event = std::str::from_utf8(event)
            .map_err(|_| AttestationError::Malformed("event name is not UTF-8"))?;
        Ok((
            Self {
                imr,
                event_type,
                digest: digest.to_vec(),
                event: event.to_owned(),
                payload: payload.to_vec(),
            },
            rest,
        ))
    }
}

fn scale_u32(input: &[u8]) -> Result<(u32, &[u8]), AttestationError> {
    let (head, rest) = input
        .split_first_chunk::<4>()
        .ok_or(AttestationError::Malformed("u32 truncated"))?;
    Ok((u32::from_le_bytes(*head), rest))
}

/// A SCALE `Vec<u8>` (or `String`): compact length, then the bytes.
fn scale_bytes<'a>(
    input: &'a [u8],
    truncated: &'static str,
) -> Result<(&'a [u8], &'a [u8]), AttestationError> {
    let (len, rest) = scale_compact(input)?;
    let bytes = rest
        .get(..len)
        .ok_or(AttestationError::Malformed(truncated))?;
    Ok((bytes, &rest[len..]))
}

fn scale_compact(input: &[u8]) -> Result<(usize, &[u8]), AttestationError> {
    let err = AttestationError::Malformed("bad SCALE compact length");
    let first = *input.first().ok_or(err.clone())?;
    let (len, used) = match first & 0b11 {
        0b00 => (u64::from(first >> 2), 1),
        0b01 => {
            let b = input.get(..2).ok_or(err.clone())?;
            (u64::from(u16::from_le_bytes([b[0], b[1]]) >> 2), 2)
        }
        0b10 => {
            let b = input.get(..4).ok_or(err.clone())?;
            (
                u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) >> 2),
                4,
            )
        }
        _ => {
            let n = usize::from(first >> 2) + 4;
            if n > 8 {
                return Err(err);
            }
            let b = input.get(1..1 + n).ok_or(err.clone())?;
            let mut v = 0u64;
            for (i, byte) in b.iter().enumerate() {
                v |= u64::from(*byte) << (8 * i);
            }
            (v, 1 + n)
        }
    };
    let len = usize::try_from(len).map_err(|_| err)?;
    Ok((len, &input[used..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_compact_modes() {
        assert_eq!(scale_compact(&[0x04, 9]).unwrap(), (1, &[9u8][..]));
        // 0x4e49 >> 2 = 5010: the quote length in the fixtures' V0 attestations.
        assert_eq!(scale_compact(&[0x49, 0x4e]).unwrap().0, 5010);
        assert_eq!(scale_compact(&[0x02, 0x00, 0x01, 0x00]).unwrap().0, 16384);
        assert_eq!(scale_compact(&[0x03, 0, 0, 0, 0x40]).unwrap().0, 1 << 30);
        assert!(scale_compact(&[0x01]).is_err());
        assert!(scale_compact(&[0xff]).is_err());
    }

    #[test]
    fn short_quotes_have_no_report_data() {
        assert_eq!(quote_report_data(&[4, 0]), None);
        assert_eq!(quote_report_data(&[]), None);
        let mut q = vec![0u8; 700];
        q[0] = 4;
        q[4] = 0x81;
        q[568..632].fill(7);
        assert_eq!(quote_report_data(&q), Some(&[7u8; 64][..]));
        q[0] = 3;
        assert_eq!(quote_report_data(&q), None);
    }

    #[test]
    fn rejects_unknown_and_truncated() {
        assert_eq!(Attestation::parse(&[]), Err(AttestationError::Empty));
        assert!(matches!(
            Attestation::parse(&[0x42]),
            Err(AttestationError::UnknownFormat(0x42))
        ));
        assert!(Attestation::parse(&[0x00, 0x00, 0x49, 0x4e, 1, 2]).is_err());
        assert!(Attestation::parse(&[0x81, 0xa1, b'x', 0x01]).is_err());
    }
}

/// What was established about a certificate's attestation. Until quotes are verified (their
/// signature chain and TCB against Intel's collateral), the most a certificate earns is
/// [`AttestationStatus::KeyBound`]: its words say exactly that, never "attested".
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum AttestationStatus {
    /// No attestation, or one whose report data does not bind the certificate's key.
    #[default]
    #[serde(rename = "none")]
    Absent,
    /// The quote's report data binds the certificate's key; the quote itself is not verified.
    #[serde(rename = "report data binds the key; quote not verified")]
    KeyBound,
    /// The quote verified against collateral, its report data binds the key, and its event
    /// log replays to RTMR3 (what the attestation policy checked).
    #[serde(rename = "quote verified")]
    QuoteVerified,
}

impl AttestationStatus {
    /// [`AttestationStatus::KeyBound`] when `binds` holds.
    pub fn from_binding(binds: bool) -> Self {
        if binds {
            Self::KeyBound
        } else {
            Self::Absent
        }
    }

    /// Whether the report data binds the key.
    pub fn binds_key(self) -> bool {
        matches!(self, Self::KeyBound | Self::QuoteVerified)
    }

    /// What was checked, in words for people.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Absent => "none bound to the key",
            Self::KeyBound => "report data binds the key; quote not verified",
            Self::QuoteVerified => "quote verified, report data binds the key, event log replayed",
        }
    }
}

impl std::fmt::Display for AttestationStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}
