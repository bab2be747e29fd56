//! Length-prefixed frames with a hard maximum (PROTOCOL.md §2.1):
//! `len u32 (big-endian) ‖ postcard(Message)`.
//!
//! The length is compared with the maximum before anything is allocated; a
//! partial frame is "need more bytes", not an error; a zero length, an oversized
//! length, a payload that is not exactly one message, are errors.

use thiserror::Error;

use crate::crypto::cipher::ciphertext_len;
use crate::crypto::seal::TAG_LEN;
use crate::ids::TransferId;
use crate::message::{CHUNK_INDEX, Message};
use crate::record::{CHUNK_HEADER_LEN, MAX_CHUNK_CIPHERTEXT, chunk_record_len};

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

/// A chunk frame laid out in one buffer, the sender's hot path: the plaintext
/// is written straight into its place, sealed where it lies
/// ([`crate::transfer::ChunkJob::seal`]), and the record header and tag are
/// filled in around it. The finished bytes are exactly what [`encode`] makes of
/// `Message::Chunk` with the same record, without a chunk-sized copy or
/// allocation in between; the buffer can be reused for the next chunk.
///
/// Layout: `len u32 ‖ CHUNK_INDEX ‖ transfer id[16] ‖ varint(record len) ‖
/// record header ‖ plaintext, then padding ‖ tag`.
pub struct ChunkFrame {
    buf: Vec<u8>,
    record_at: usize,
    plaintext_len: usize,
}

impl std::fmt::Debug for ChunkFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkFrame")
            .field("plaintext_len", &self.plaintext_len)
            .finish_non_exhaustive()
    }
}

impl ChunkFrame {
    /// Lays out a frame for `plaintext_len` bytes in `buf` (its contents are
    /// discarded, its allocation reused). The plaintext area starts zeroed.
    pub(crate) fn new(
        mut buf: Vec<u8>,
        transfer_id: &TransferId,
        plaintext_len: usize,
    ) -> Result<Self, FrameError> {
        let record_len = chunk_record_len(ciphertext_len(plaintext_len));
        buf.clear();
        buf.extend_from_slice(&[0; LEN_PREFIX]);
        buf.push(CHUNK_INDEX);
        buf.extend_from_slice(&transfer_id.0);
        // postcard's length of a byte string: an unsigned LEB128 varint.
        let mut n = record_len;
        while n >= 0x80 {
            buf.push((n as u8 & 0x7f) | 0x80);
            n >>= 7;
        }
        buf.push(n as u8);
        let record_at = buf.len();
        let len = record_at - LEN_PREFIX + record_len;
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
        buf[..LEN_PREFIX].copy_from_slice(&prefix.to_be_bytes());
        // The record header's slot; the plaintext comes with fill_from or
        // plaintext_mut.
        buf.resize(record_at + CHUNK_HEADER_LEN, 0);
        Ok(Self {
            buf,
            record_at,
            plaintext_len,
        })
    }

    fn end(&self) -> usize {
        self.record_at + chunk_record_len(ciphertext_len(self.plaintext_len))
    }

    /// Reads the plaintext from `r` into its place, straight into the
    /// buffer's capacity (nothing is zeroed first). Fewer bytes than the
    /// chunk's length is `UnexpectedEof`; a frame already filled is an error.
    pub fn fill_from(&mut self, r: &mut impl std::io::Read) -> std::io::Result<()> {
        use std::io::Read as _;
        if self.buf.len() != self.plaintext_at() {
            return Err(std::io::Error::other("chunk frame filled twice"));
        }
        self.buf.reserve_exact(self.end() - self.buf.len());
        let n = r
            .take(self.plaintext_len as u64)
            .read_to_end(&mut self.buf)?;
        if n != self.plaintext_len {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.buf.resize(self.end(), 0);
        Ok(())
    }

    /// Whether the plaintext is in place ([`Self::fill_from`] or
    /// [`Self::plaintext_mut`] was called).
    pub fn is_filled(&self) -> bool {
        self.buf.len() == self.end()
    }

    /// The transfer this frame belongs to.
    pub fn transfer_id(&self) -> TransferId {
        let mut id = [0u8; 16];
        id.copy_from_slice(&self.buf[LEN_PREFIX + 1..LEN_PREFIX + 17]);
        TransferId(id)
    }

    /// Length of the plaintext.
    pub fn plaintext_len(&self) -> usize {
        self.plaintext_len
    }

    fn plaintext_at(&self) -> usize {
        self.record_at + CHUNK_HEADER_LEN
    }

    /// The plaintext, before sealing (empty until the frame is filled).
    pub fn plaintext(&self) -> &[u8] {
        let at = self.plaintext_at();
        self.buf
            .get(at..at + self.plaintext_len)
            .unwrap_or_default()
    }

    /// The plaintext area, zeroed if it was not filled yet, to be written
    /// before sealing.
    pub fn plaintext_mut(&mut self) -> &mut [u8] {
        let (at, end) = (self.plaintext_at(), self.end());
        if self.buf.len() != end {
            self.buf.resize(end, 0);
        }
        &mut self.buf[at..at + self.plaintext_len]
    }

    /// The record header slot, the ciphertext area (plaintext then room for
    /// the padding) and the tag slot.
    pub(crate) fn record_parts_mut(
        &mut self,
    ) -> (&mut [u8; CHUNK_HEADER_LEN], &mut [u8], &mut [u8; TAG_LEN]) {
        let end = self.end();
        self.buf.resize(end, 0);
        let (header, rest) = self.buf[self.record_at..].split_at_mut(CHUNK_HEADER_LEN);
        let (ciphertext, tag) = rest.split_at_mut(rest.len() - TAG_LEN);
        (
            header.try_into().expect("split at the header length"),
            ciphertext,
            tag.try_into().expect("split at the tag length"),
        )
    }

    /// Where the record starts in the frame.
    pub(crate) fn record_at(&self) -> usize {
        self.record_at
    }

    /// The frame's bytes.
    pub(crate) fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_frame_built_in_place_equals_the_encoded_message() {
        use crate::record::{ChunkRecord, chunk_header};
        let tid = TransferId([5; 16]);
        for plain_len in [0usize, 15, 16, 64, 4096, 262_144, 1 << 20] {
            let mut f = ChunkFrame::new(vec![1; 7], &tid, plain_len).unwrap();
            assert_eq!(f.transfer_id(), tid);
            assert!(!f.is_filled());
            // Half the cases filled from a reader, half written in place.
            if plain_len % 2 == 0 {
                f.fill_from(&mut &vec![9; plain_len + 5][..]).unwrap();
                assert!(f.fill_from(&mut &[9u8; 16][..]).is_err(), "filled twice");
            } else {
                assert!(f.plaintext_mut().iter().all(|&b| b == 0));
                f.plaintext_mut().fill(9);
            }
            assert!(f.is_filled());
            assert_eq!(f.plaintext(), vec![9; plain_len]);
            let (header, ct, tag) = f.record_parts_mut();
            assert_eq!(ct.len(), ciphertext_len(plain_len));
            *header = chunk_header(7, 1 << 40, plain_len == 15, &[3; 16], ct.len());
            ct[plain_len..].fill(6);
            *tag = [4; 32];
            let record_at = f.record_at();
            let bytes = f.into_bytes();
            let mut record = bytes[record_at..].to_vec();
            ChunkRecord::parse(&mut record).unwrap();
            let msg = Message::Chunk {
                transfer_id: tid,
                record,
            };
            assert_eq!(bytes, encode(&msg, MAX_FRAME_LEN).unwrap(), "{plain_len}");
        }
        assert!(ChunkFrame::new(Vec::new(), &tid, MAX_FRAME_LEN).is_err());
        // A reader that runs dry before the chunk is full.
        let mut f = ChunkFrame::new(Vec::new(), &tid, 100).unwrap();
        let short = f.fill_from(&mut &[9u8; 99][..]).unwrap_err();
        assert_eq!(short.kind(), std::io::ErrorKind::UnexpectedEof);
        assert!(!f.is_filled());
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
