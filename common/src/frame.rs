//! Length-prefixed frames with a hard maximum (PROTOCOL.md §2.1):
//! `len u32 (big-endian) ‖ postcard(Message)`.
//!
//! The length is compared with the maximum before anything is allocated; a
//! partial frame is "need more bytes", not an error; a zero length, an oversized
//! length, a payload that is not exactly one message, are errors.

use thiserror::Error;

use crate::ids::TransferId;
use crate::message::{CHUNK_INDEX, Message};
use crate::record::{ChunkRecord, MAX_CHUNK_CIPHERTEXT};

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

/// Encodes `msg` as one frame, refusing to produce a frame above `max`.
pub fn encode(msg: &Message, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; LEN_PREFIX];
    let mut out =
        postcard::to_extend(msg, std::mem::take(&mut out)).map_err(|_| FrameError::Malformed)?;
    let len = out.len() - LEN_PREFIX;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let prefix = u32::try_from(len).map_err(|_| FrameError::TooLarge { len, max })?;
    out[..LEN_PREFIX].copy_from_slice(&prefix.to_be_bytes());
    Ok(out)
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

/// Decodes a frame payload as exactly one message.
pub fn decode_payload(payload: &[u8]) -> Result<Message, FrameError> {
    match postcard::take_from_bytes::<Message>(payload) {
        Ok((msg, [])) => Ok(msg),
        _ => Err(FrameError::Malformed),
    }
}

/// Decodes one frame from the start of `buf`. `Ok(None)` means more bytes are
/// needed; `Ok(Some((msg, n)))` consumed `n` bytes.
pub fn decode(buf: &[u8], max: usize) -> Result<Option<(Message, usize)>, FrameError> {
    let Some(len) = peek_len(buf, max)? else {
        return Ok(None);
    };
    let Some(payload) = buf.get(LEN_PREFIX..LEN_PREFIX + len) else {
        return Ok(None);
    };
    Ok(Some((decode_payload(payload)?, LEN_PREFIX + len)))
}

/// The frame of `Message::Chunk { transfer_id, record }`, byte for byte what
/// [`encode`] makes of it, written without the intermediate encoded record
/// (the sender's hot path: one chunk-sized copy and allocation less per chunk).
pub fn encode_chunk(transfer_id: &TransferId, record: &ChunkRecord) -> Result<Vec<u8>, FrameError> {
    let record_len = record.encoded_len();
    let mut out = Vec::with_capacity(LEN_PREFIX + 1 + 16 + 5 + record_len);
    out.extend_from_slice(&[0; LEN_PREFIX]);
    out.push(CHUNK_INDEX);
    out.extend_from_slice(&transfer_id.0);
    // postcard's length of a byte string: an unsigned LEB128 varint.
    let mut n = record_len;
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
    record.encode_into(&mut out);
    let len = out.len() - LEN_PREFIX;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    let prefix = u32::try_from(len).map_err(|_| FrameError::TooLarge {
        len,
        max: MAX_FRAME_LEN,
    })?;
    out[..LEN_PREFIX].copy_from_slice(&prefix.to_be_bytes());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_frame_written_directly_equals_the_encoded_message() {
        use crate::crypto::seal::Sealed;
        for ct_len in [16usize, 32, 80, 4096, 262_160, MAX_CHUNK_CIPHERTEXT] {
            let record = ChunkRecord {
                epoch: 7,
                seq: 1 << 40,
                last: ct_len == 32,
                sealed: Sealed {
                    iv: [3; 16],
                    ciphertext: vec![9; ct_len],
                    tag: [4; 32],
                },
            };
            let tid = TransferId([5; 16]);
            let msg = Message::Chunk {
                transfer_id: tid,
                record: record.encode(),
            };
            assert_eq!(
                encode_chunk(&tid, &record).unwrap(),
                encode(&msg, MAX_FRAME_LEN).unwrap(),
                "{ct_len}"
            );
        }
    }

    #[test]
    fn partial_frames_need_more_and_bad_lengths_fail_before_allocation() {
        let f = encode(&Message::Hello { version: 1 }, MAX_FRAME_LEN).unwrap();
        assert_eq!(f, [0, 0, 0, 2, 0, 1]);
        for cut in 0..f.len() {
            assert_eq!(decode(&f[..cut], MAX_FRAME_LEN), Ok(None));
        }
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
    }
}
