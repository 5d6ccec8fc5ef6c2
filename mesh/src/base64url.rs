//! base64url (RFC 4648 §5), as ACME (JWS) and CAs' HMAC keys and TSIG secrets use it.

/// Text that is not base64url (or standard base64).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not base64url")]
pub struct NotBase64url;

/// base64url without padding (RFC 7515 §2).
pub fn encode(bytes: &[u8]) -> String {
    with_alphabet(
        bytes,
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
    )
}

/// Standard base64 with padding (RFC 4648 §4), as HTTP Basic credentials are written.
pub fn encode_standard(bytes: &[u8]) -> String {
    let mut out = with_alphabet(
        bytes,
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",
    );
    while !out.len().is_multiple_of(4) {
        out.push('=');
    }
    out
}

/// Unpadded base64 over `alphabet`.
fn with_alphabet(bytes: &[u8], alphabet: &[u8; 64]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(alphabet[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

/// base64url or standard base64, padded or not (the forms CAs and DNS servers hand out keys in).
pub fn decode(text: &str) -> Result<Vec<u8>, NotBase64url> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.trim().trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return Err(NotBase64url),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_base64_is_padded() {
        // RFC 4648 §10's vectors, and Basic credentials as RFC 7617 §2 writes them.
        for (input, want) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
            (b"Aladdin:open sesame", "QWxhZGRpbjpvcGVuIHNlc2FtZQ=="),
        ] {
            assert_eq!(encode_standard(input), want);
        }
        assert_eq!(encode_standard(&[0xfb, 0xff]), "+/8=");
    }

    #[test]
    fn base64url_round_trips() {
        for input in [
            &b""[..],
            b"f",
            b"fo",
            b"foo",
            b"foob",
            b"fooba",
            b"foobar",
            &[0xfb, 0xff, 0xfe],
        ] {
            let encoded = encode(input);
            assert!(!encoded.contains('='));
            assert_eq!(decode(&encoded).unwrap(), input, "{encoded}");
        }
        assert_eq!(encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(encode(&[0xfb, 0xff]), "-_8");
        assert_eq!(decode("aGVsbG8=").unwrap(), b"hello");
        assert!(decode("a b").is_err());
    }
}
