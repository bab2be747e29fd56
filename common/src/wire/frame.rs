//! Length-prefixed frames with a hard maximum (PROTOCOL.md §2.1):
//! `len u32 (big-endian) ‖ payload[len]`.
//!
//! The codec only: what a frame's payload is ([`super::message`]) sits above
//! it. The length is compared with the maximum before anything is allocated;
//! a partial frame is "need more bytes", not an error; a zero length or an
//! oversized length are errors.

use thiserror::Error;

use super::record::MAX_CHUNK_CIPHERTEXT;

/// Largest frame payload: a full chunk record plus its message envelope.
pub const MAX_FRAME_LEN: usize = MAX_CHUNK_CIPHERTEXT + 1024;
/// Bytes of the length prefix.
pub const LEN_PREFIX: usize = 4;

/// A frame that cannot be accepted.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The announced length exceeds the maximum.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A zero-length frame.
    #[error("empty frame")]
    Empty,
    /// The payload is not exactly one well-formed message.
    #[error("malformed message")]
    Malformed,
}

/// The length prefix of a payload of `len` bytes, refusing one above `max`
/// (or empty).
pub fn prefix(len: usize, max: usize) -> Result<[u8; LEN_PREFIX], FrameError> {
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let len = u32::try_from(len).map_err(|_| FrameError::TooLarge { len, max })?;
    Ok(len.to_be_bytes())
}

/// Reads the length prefix at the start of `buf`: `Ok(None)` if fewer than four
/// bytes are there, an error if the length is zero or above `max`.
pub fn peek_len(buf: &[u8], max: usize) -> Result<Option<usize>, FrameError> {
    let Some(prefix) = buf.get(..LEN_PREFIX) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(Some(len))
}

/// The payload of the whole frame at the start of `buf`: `Ok(None)` means more
/// bytes are needed; `Ok(Some((payload, n)))` consumed `n` bytes.
pub fn split(buf: &[u8], max: usize) -> Result<Option<(&[u8], usize)>, FrameError> {
    let Some(len) = peek_len(buf, max)? else {
        return Ok(None);
    };
    Ok(buf
        .get(LEN_PREFIX..LEN_PREFIX + len)
        .map(|payload| (payload, LEN_PREFIX + len)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::message::{Message, decode, encode};

    #[test]
    fn partial_frames_need_more_and_bad_lengths_fail_before_allocation() {
        let f = encode(&Message::Hello { version: 1 }, MAX_FRAME_LEN).unwrap();
        assert_eq!(f, [0, 0, 0, 2, 0, 1]);
        for cut in 0..f.len() {
            assert_eq!(decode(&f[..cut], MAX_FRAME_LEN), Ok(None));
            assert_eq!(split(&f[..cut], MAX_FRAME_LEN), Ok(None));
        }
        assert_eq!(split(&f, MAX_FRAME_LEN), Ok(Some((&f[4..], 6))));
        assert_eq!(
            decode(&f, MAX_FRAME_LEN),
            Ok(Some((Message::Hello { version: 1 }, 6)))
        );
        assert_eq!(
            decode(&[0xff, 0xff, 0xff, 0xff], MAX_FRAME_LEN),
            Err(FrameError::TooLarge {
                len: u32::MAX as usize,
                max: MAX_FRAME_LEN
            })
        );
        assert_eq!(decode(&[0, 0, 0, 0], MAX_FRAME_LEN), Err(FrameError::Empty));
        // A payload with a byte left over after the message.
        assert_eq!(
            decode(&[0, 0, 0, 3, 0, 1, 0], MAX_FRAME_LEN),
            Err(FrameError::Malformed)
        );
        // An unknown variant.
        assert_eq!(
            decode(&[0, 0, 0, 1, 99], MAX_FRAME_LEN),
            Err(FrameError::Malformed)
        );
        assert!(encode(&Message::Hello { version: 1 }, 1).is_err());
        assert_eq!(prefix(0, 10), Err(FrameError::Empty));
        assert_eq!(
            prefix(11, 10),
            Err(FrameError::TooLarge { len: 11, max: 10 })
        );
        assert_eq!(prefix(10, 10), Ok([0, 0, 0, 10]));
    }
}
