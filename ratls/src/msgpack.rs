//! The small part of MessagePack that dstack certificates use.
//!
//! The app-info extension (`…62397.1.9`) is an rmp-serde array and a V1 attestation is a map whose
//! quote may be a `bin` or an array of small integers. A general-purpose crate would do, but this
//! subset is a hundred lines, bounded in depth and size, and fuzzed with the certificate parser.

use std::fmt;

/// A decoded MessagePack value. Extension types are kept opaque.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Value<'a> {
    Nil,
    Bool(bool),
    Int(i128),
    Float,
    Str(&'a str),
    Bin(&'a [u8]),
    Array(Vec<Value<'a>>),
    Map(Vec<(Value<'a>, Value<'a>)>),
    Ext,
}

/// Why a MessagePack buffer could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DecodeError(&'static str);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// Nesting deeper than this is refused: real app-info is two levels deep.
const MAX_DEPTH: usize = 16;

/// Decode one value that must fill `input` exactly.
pub(crate) fn decode(input: &[u8]) -> Result<Value<'_>, DecodeError> {
    let mut reader = Reader { input, pos: 0 };
    let value = reader.value(0)?;
    if reader.pos != input.len() {
        return Err(DecodeError("trailing bytes after msgpack value"));
    }
    Ok(value)
}

impl<'a> Value<'a> {
    /// The bytes of a `bin`, or of an array whose elements are all integers 0..=255
    /// (how rmp-serde writes a `Vec<u8>` without `serde_bytes`).
    pub(crate) fn bytes(&self) -> Option<Vec<u8>> {
        match self {
            Value::Bin(b) => Some(b.to_vec()),
            Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    Value::Int(i) => u8::try_from(*i).ok(),
                    _ => None,
                })
                .collect(),
            _ => None,
        }
    }

    /// The value under a string key of a map.
    pub(crate) fn get(&self, key: &str) -> Option<&Value<'a>> {
        match self {
            Value::Map(entries) => entries
                .iter()
                .find(|(k, _)| matches!(k, Value::Str(s) if *s == key))
                .map(|(_, v)| v),
            _ => None,
        }
    }
}

struct Reader<'a> {
    input: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|end| *end <= self.input.len())
            .ok_or(DecodeError("msgpack value truncated"))?;
        let bytes = &self.input[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn uint(&mut self, n: usize) -> Result<u64, DecodeError> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }

    fn len(&mut self, n: usize) -> Result<usize, DecodeError> {
        let len = self.uint(n)?;
        let len = usize::try_from(len).map_err(|_| DecodeError("msgpack length too large"))?;
        // Every element takes at least one byte, so a length beyond the input is a lie; refusing
        // it here keeps a hostile header from reserving gigabytes.
        if len > self.input.len() - self.pos {
            return Err(DecodeError("msgpack length exceeds input"));
        }
        Ok(len)
    }

    // Long on purpose: one match over MessagePack's type bytes, the format's own table.
    fn value(&mut self, depth: usize) -> Result<Value<'a>, DecodeError> {
        if depth > MAX_DEPTH {
            return Err(DecodeError("msgpack nesting too deep"));
        }
        let tag = self.take(1)?[0];
        Ok(match tag {
            0x00..=0x7f => Value::Int(i128::from(tag)),
            0x80..=0x8f => self.map(usize::from(tag & 0x0f), depth)?,
            0x90..=0x9f => self.array(usize::from(tag & 0x0f), depth)?,
            0xa0..=0xbf => self.str(usize::from(tag & 0x1f))?,
            0xc0 => Value::Nil,
            0xc2 => Value::Bool(false),
            0xc3 => Value::Bool(true),
            0xc4 => {
                let n = self.len(1)?;
                Value::Bin(self.take(n)?)
            }
            0xc5 => {
                let n = self.len(2)?;
                Value::Bin(self.take(n)?)
            }
            0xc6 => {
                let n = self.len(4)?;
                Value::Bin(self.take(n)?)
            }
            0xc7 => {
                let n = self.len(1)?;
                self.take(n + 1)?;
                Value::Ext
            }
            0xc8 => {
                let n = self.len(2)?;
                self.take(n + 1)?;
                Value::Ext
            }
            0xc9 => {
                let n = self.len(4)?;
                self.take(n + 1)?;
                Value::Ext
            }
            0xca => {
                self.take(4)?;
                Value::Float
            }
            0xcb => {
                self.take(8)?;
                Value::Float
            }
            0xcc => Value::Int(i128::from(self.uint(1)?)),
            0xcd => Value::Int(i128::from(self.uint(2)?)),
            0xce => Value::Int(i128::from(self.uint(4)?)),
            0xcf => Value::Int(i128::from(self.uint(8)?)),
            0xd0 => Value::Int(i128::from(self.take(1)?[0] as i8)),
            0xd1 => Value::Int(i128::from(self.uint(2)? as u16 as i16)),
            0xd2 => Value::Int(i128::from(self.uint(4)? as u32 as i32)),
            0xd3 => Value::Int(i128::from(self.uint(8)? as i64)),
            0xd4..=0xd8 => {
                self.take(1 + (1 << (tag - 0xd4)))?;
                Value::Ext
            }
            0xd9 => {
                let n = self.len(1)?;
                self.str(n)?
            }
            0xda => {
                let n = self.len(2)?;
                self.str(n)?
            }
            0xdb => {
                let n = self.len(4)?;
                self.str(n)?
            }
            0xdc => {
                let n = self.len(2)?;
                self.array(n, depth)?
            }
            0xdd => {
                let n = self.len(4)?;
                self.array(n, depth)?
            }
            0xde => {
                let n = self.len(2)?;
                self.map(n, depth)?
            }
            0xdf => {
                let n = self.len(4)?;
                self.map(n, depth)?
            }
            0xe0..=0xff => Value::Int(i128::from(tag as i8)),
            0xc1 => return Err(DecodeError("msgpack reserved tag 0xc1")),
        })
    }

    fn str(&mut self, n: usize) -> Result<Value<'a>, DecodeError> {
        let bytes = self.take(n)?;
        std::str::from_utf8(bytes)
            .map(Value::Str)
            .map_err(|_| DecodeError("msgpack string is not UTF-8"))
    }

    fn array(&mut self, n: usize, depth: usize) -> Result<Value<'a>, DecodeError> {
        let mut items = Vec::with_capacity(n.min(self.input.len() - self.pos));
        for _ in 0..n {
            items.push(self.value(depth + 1)?);
        }
        Ok(Value::Array(items))
    }

    fn map(&mut self, n: usize, depth: usize) -> Result<Value<'a>, DecodeError> {
        let mut entries = Vec::with_capacity(n.min(self.input.len() - self.pos));
        for _ in 0..n {
            let key = self.value(depth + 1)?;
            let value = self.value(depth + 1)?;
            entries.push((key, value));
        }
        Ok(Value::Map(entries))
    }
}

/// Writes the subset the development agent needs to mint app-info extensions.
#[derive(Debug, Default)]
pub(crate) struct Writer {
    pub(crate) buf: Vec<u8>,
}

impl Writer {
    pub(crate) fn array_header(&mut self, n: usize) {
        match n {
            0..=15 => self.buf.push(0x90 | n as u8),
            16..=0xffff => {
                self.buf.push(0xdc);
                self.buf.extend_from_slice(&(n as u16).to_be_bytes());
            }
            _ => {
                self.buf.push(0xdd);
                self.buf.extend_from_slice(&(n as u32).to_be_bytes());
            }
        }
    }

    pub(crate) fn bin(&mut self, bytes: &[u8]) {
        let n = bytes.len();
        match n {
            0..=0xff => {
                self.buf.push(0xc4);
                self.buf.push(n as u8);
            }
            0x100..=0xffff => {
                self.buf.push(0xc5);
                self.buf.extend_from_slice(&(n as u16).to_be_bytes());
            }
            _ => {
                self.buf.push(0xc6);
                self.buf.extend_from_slice(&(n as u32).to_be_bytes());
            }
        }
        self.buf.extend_from_slice(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_nested_values() {
        // {"a": [1, -1, "x", bin[2]], "b": true}
        let input = [
            0x82, 0xa1, b'a', 0x94, 0x01, 0xff, 0xa1, b'x', 0xc4, 0x02, 9, 8, 0xa1, b'b', 0xc3,
        ];
        let value = decode(&input).unwrap();
        let a = value.get("a").unwrap();
        assert_eq!(
            a,
            &Value::Array(vec![
                Value::Int(1),
                Value::Int(-1),
                Value::Str("x"),
                Value::Bin(&[9, 8])
            ])
        );
        assert_eq!(value.get("b"), Some(&Value::Bool(true)));
    }

    #[test]
    fn int_arrays_read_as_bytes() {
        let input = [0x93, 0x01, 0xcc, 0xff, 0x00];
        assert_eq!(decode(&input).unwrap().bytes(), Some(vec![1, 255, 0]));
        let input = [0x91, 0xcd, 0x01, 0x00];
        assert_eq!(decode(&input).unwrap().bytes(), None);
    }

    #[test]
    fn refuses_lies_and_truncation() {
        assert!(decode(&[0xdd, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(decode(&[0xc4, 0x05, 1]).is_err());
        assert!(decode(&[0x91]).is_err());
        assert!(decode(&[0x01, 0x02]).is_err());
        assert!(decode(&[0xc1]).is_err());
        assert!(decode(&[0x91; 64]).is_err());
    }

    #[test]
    fn writer_round_trips() {
        let mut w = Writer::default();
        w.array_header(2);
        w.bin(&[1, 2, 3]);
        w.bin(&[0u8; 300]);
        let value = decode(&w.buf).unwrap();
        match value {
            Value::Array(items) => {
                assert_eq!(items[0], Value::Bin(&[1, 2, 3]));
                assert_eq!(items[1].bytes().unwrap().len(), 300);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
