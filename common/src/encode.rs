//! Hand-built, unambiguous encodings for everything that is signed, MACed or fed
//! to HKDF (PROTOCOL.md §2.3).
//!
//! Serde never produces bytes that a signature or a tag covers: its output may
//! change between versions, and two types may encode alike. Instead every input is
//! built here: an ASCII label with a u8 length, big-endian integers, fixed-width
//! fields as they are, and variable fields with a u32 length prefix. The decoder is
//! its mirror: every read is bounds-checked and trailing bytes are refused.

use thiserror::Error;

/// Builder for a signed, MACed or HKDF `info` input.
#[derive(Debug, Default, Clone)]
pub struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    /// Starts an input with its context label.
    pub fn new(label: &str) -> Self {
        let mut e = Self::default();
        e.label(label);
        e
    }

    /// Appends an ASCII label, u8-length-prefixed.
    ///
    /// Labels are compile-time constants of this crate, so an over-long or
    /// non-ASCII label is a programming error, not a runtime condition.
    pub fn label(&mut self, label: &str) -> &mut Self {
        assert!(
            label.is_ascii() && label.len() <= usize::from(u8::MAX),
            "labels are short ASCII constants"
        );
        self.buf.push(label.len() as u8);
        self.buf.extend_from_slice(label.as_bytes());
        self
    }

    /// Appends one byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    /// Appends a big-endian u16.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Appends a big-endian u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Appends a big-endian u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Appends a fixed-width field as it is (its width is part of the format).
    pub fn fixed(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }

    /// Appends a variable-length field with a u32 length prefix.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        let len = u32::try_from(v.len()).expect("encoded fields are far below 4 GiB");
        self.u32(len);
        self.buf.extend_from_slice(v);
        self
    }

    /// The encoded bytes.
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    /// The encoded bytes so far, without consuming them.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf
    }
}

/// A malformed hand-built encoding.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// The input ended inside a field.
    #[error("input ends inside a field")]
    Truncated,
    /// A length prefix exceeded the field's maximum.
    #[error("a field is longer than allowed")]
    TooLong,
    /// Bytes were left over after the last field.
    #[error("trailing bytes after the last field")]
    Trailing,
    /// A label or fixed value was not the expected one.
    #[error("unexpected label or value")]
    Unexpected,
}

/// Mirror of [`Encoder`]: reads fields with bounds checks, refuses trailing bytes.
#[derive(Debug)]
pub struct Decoder<'a> {
    rest: &'a [u8],
}

impl<'a> Decoder<'a> {
    /// Starts reading `input`.
    pub fn new(input: &'a [u8]) -> Self {
        Self { rest: input }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.rest.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    /// Reads a label and checks that it is exactly `label`.
    pub fn expect_label(&mut self, label: &str) -> Result<(), DecodeError> {
        let len = usize::from(self.u8()?);
        if self.take(len)? == label.as_bytes() {
            Ok(())
        } else {
            Err(DecodeError::Unexpected)
        }
    }

    /// Reads one byte.
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    /// Reads a big-endian u16.
    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    /// Reads a big-endian u32.
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    /// Reads a big-endian u64.
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// Reads a fixed-width field.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// Reads a u32-length-prefixed field of at most `max` bytes.
    pub fn bytes(&mut self, max: usize) -> Result<&'a [u8], DecodeError> {
        let len = usize::try_from(self.u32()?).map_err(|_| DecodeError::TooLong)?;
        if len > max {
            return Err(DecodeError::TooLong);
        }
        self.take(len)
    }

    /// How many bytes are not yet read.
    pub fn remaining(&self) -> usize {
        self.rest.len()
    }

    /// Everything not yet read, consuming it.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }

    /// Succeeds only if every byte was read.
    pub fn finish(self) -> Result<(), DecodeError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Trailing)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_exact_bytes() {
        let bytes = Encoder::new("ab")
            .u8(1)
            .u16(2)
            .u32(3)
            .u64(4)
            .fixed(&[9, 9])
            .bytes(b"xyz")
            .finish();
        assert_eq!(
            bytes,
            [
                2, b'a', b'b', 1, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 4, 9, 9, 0, 0, 0, 3, b'x',
                b'y', b'z'
            ]
        );
        let mut d = Decoder::new(&bytes);
        d.expect_label("ab").unwrap();
        assert_eq!(d.u8().unwrap(), 1);
        assert_eq!(d.u16().unwrap(), 2);
        assert_eq!(d.u32().unwrap(), 3);
        assert_eq!(d.u64().unwrap(), 4);
        assert_eq!(d.array::<2>().unwrap(), [9, 9]);
        assert_eq!(d.bytes(3).unwrap(), b"xyz");
        d.finish().unwrap();
    }

    #[test]
    fn refuses_truncation_overlength_trailing_and_wrong_label() {
        let bytes = Encoder::new("ab").bytes(b"xyz").u8(0).finish();
        let mut d = Decoder::new(&bytes);
        d.expect_label("ab").unwrap();
        assert_eq!(d.bytes(2), Err(DecodeError::TooLong));

        let mut d = Decoder::new(&bytes[..bytes.len() - 2]);
        d.expect_label("ab").unwrap();
        assert_eq!(d.bytes(3), Err(DecodeError::Truncated));

        let mut d = Decoder::new(&bytes);
        d.expect_label("ab").unwrap();
        d.bytes(3).unwrap();
        assert_eq!(d.finish(), Err(DecodeError::Trailing));

        assert_eq!(
            Decoder::new(&bytes).expect_label("ac"),
            Err(DecodeError::Unexpected)
        );
    }
}
