//! The chunk fast path (PROTOCOL.md §2.2, §5.3), writer and reader side by
//! side: the postcard envelope of `Message::Chunk` written around a record
//! sealed in place ([`ChunkFrame`], the sender), and recognised from its first
//! bytes without copying the record out ([`peek_chunk`] for the broker's relay,
//! [`chunk_record`] for the receiver). Both produce and accept exactly what
//! postcard makes of `Message::Chunk`; the tests hold them to it.

use super::frame::{FrameError, LEN_PREFIX, MAX_FRAME_LEN};
use super::record::{CHUNK_HEADER_LEN, CHUNK_TAG_LEN, chunk_record_len};
use crate::ids::StreamId;

/// The variant index of `Message::Chunk` (its first encoded byte).
pub const CHUNK_INDEX: u8 = 5;

/// Appends `n` as postcard writes a length: an unsigned LEB128 varint.
fn put_varint(buf: &mut Vec<u8>, mut n: usize) {
    while n >= 0x80 {
        buf.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    buf.push(n as u8);
}

/// Reads a length as postcard reads a `usize` (at most ten bytes, the tenth
/// at most 1, non-shortest forms allowed): its value and how many bytes it took.
fn read_varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, &byte) in bytes.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return (i < 9 || byte <= 1).then_some((value, i + 1));
        }
    }
    None
}

/// How much of a payload [`peek_chunk`] needs: the variant, the stream id
/// and the record's length (a varint of at most ten bytes).
pub const CHUNK_HEAD_MAX: usize = 1 + 16 + 10;

/// If a payload of `len` bytes that starts with `head` is a well-formed
/// `Message::Chunk`, its stream id; `None` for anything else (another
/// variant, or a malformed chunk). `head` must hold the first
/// `min(len, CHUNK_HEAD_MAX)` bytes of the payload.
///
/// Gives the same answer as decoding the whole payload and matching on
/// `Chunk`, without having the record: the broker's relay checks every chunk
/// it forwards this way and streams the record through.
pub fn peek_chunk(head: &[u8], len: usize) -> Option<StreamId> {
    chunk_head(head, len).map(|(tid, _)| tid)
}

/// If `payload` is exactly one well-formed `Message::Chunk`, its stream
/// id and where its record starts (the record runs to the end). The same
/// answer as decoding, without copying the record out: the receiver opens
/// the record where it lies.
pub fn chunk_record(payload: &[u8]) -> Option<(StreamId, usize)> {
    chunk_head(payload, payload.len())
}

fn chunk_head(head: &[u8], len: usize) -> Option<(StreamId, usize)> {
    let (&index, rest) = head.split_first()?;
    if index != CHUNK_INDEX {
        return None;
    }
    let (tid, rest) = rest.split_first_chunk::<16>()?;
    // The record: its varint length, then exactly that many bytes.
    let (record_len, width) = read_varint(rest)?;
    let header = 1 + 16 + width;
    (len.checked_sub(header)? as u64 == record_len).then_some((StreamId(*tid), header))
}

/// A chunk frame laid out in one buffer, the sender's hot path: the plaintext
/// is written straight into its place, sealed where it lies
/// ([`crate::transfer::ChunkJob::seal`]), and the record header and tag are
/// filled in around it. The finished bytes are exactly what
/// [`super::message::encode`] makes of
/// `Message::Chunk` with the same record, without a chunk-sized copy or
/// allocation in between; the buffer can be reused for the next chunk.
///
/// Layout: `len u32 ‖ CHUNK_INDEX ‖ stream id[16] ‖ varint(record len) ‖
/// record header ‖ plaintext (sealed in place: GCM keeps its length) ‖ tag`.
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
        stream_id: &StreamId,
        plaintext_len: usize,
    ) -> Result<Self, FrameError> {
        let record_len = chunk_record_len(plaintext_len);
        buf.clear();
        buf.extend_from_slice(&[0; LEN_PREFIX]);
        buf.push(CHUNK_INDEX);
        buf.extend_from_slice(&stream_id.0);
        put_varint(&mut buf, record_len);
        let record_at = buf.len();
        let prefix = super::frame::prefix(record_at - LEN_PREFIX + record_len, MAX_FRAME_LEN)?;
        buf[..LEN_PREFIX].copy_from_slice(&prefix);
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
        self.record_at + chunk_record_len(self.plaintext_len)
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

    /// The stream this frame belongs to.
    pub fn stream_id(&self) -> StreamId {
        let mut id = [0u8; 16];
        id.copy_from_slice(&self.buf[LEN_PREFIX + 1..LEN_PREFIX + 17]);
        StreamId(id)
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

    /// The record header slot, the plaintext (to become the ciphertext) and
    /// the tag slot.
    pub(crate) fn record_parts_mut(
        &mut self,
    ) -> (
        &mut [u8; CHUNK_HEADER_LEN],
        &mut [u8],
        &mut [u8; CHUNK_TAG_LEN],
    ) {
        let end = self.end();
        self.buf.resize(end, 0);
        let (header, rest) = self.buf[self.record_at..].split_at_mut(CHUNK_HEADER_LEN);
        let (ciphertext, tag) = rest.split_at_mut(rest.len() - CHUNK_TAG_LEN);
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
    use crate::wire::message::{Message, encode};

    #[test]
    fn a_chunk_frame_built_in_place_equals_the_encoded_message() {
        use crate::wire::record::{ChunkRecord, chunk_header};
        let tid = StreamId([5; 16]);
        for plain_len in [0usize, 15, 16, 64, 4096, 262_144, 1 << 20] {
            let mut f = ChunkFrame::new(vec![1; 7], &tid, plain_len).unwrap();
            assert_eq!(f.stream_id(), tid);
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
            assert_eq!(ct.len(), plain_len);
            *header = chunk_header(7, 1 << 40, plain_len == 15, ct.len());
            *tag = [4; 16];
            let record_at = f.record_at();
            let bytes = f.into_bytes();
            let mut record = bytes[record_at..].to_vec();
            ChunkRecord::parse(&mut record).unwrap();
            let msg = Message::Chunk {
                stream_id: tid,
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

    /// What decoding says about `payload`: the stream id and record iff it
    /// is a chunk.
    fn decoded_chunk(payload: &[u8]) -> Option<(StreamId, Vec<u8>)> {
        match postcard::take_from_bytes::<Message>(payload) {
            Ok((Message::Chunk { stream_id, record }, [])) => Some((stream_id, record)),
            _ => None,
        }
    }

    /// `peek_chunk` on the whole payload and on just the head it needs, and
    /// `chunk_record`: all must give the same answer.
    fn peek(payload: &[u8]) -> Option<(StreamId, Vec<u8>)> {
        let whole = peek_chunk(payload, payload.len());
        let head = &payload[..payload.len().min(CHUNK_HEAD_MAX)];
        assert_eq!(whole, peek_chunk(head, payload.len()));
        let located = chunk_record(payload);
        assert_eq!(whole, located.map(|(tid, _)| tid));
        located.map(|(tid, at)| (tid, payload[at..].to_vec()))
    }

    #[test]
    fn peek_chunk_and_chunk_record_agree_with_decoding() {
        let tid = StreamId([7; 16]);
        let mut cases: Vec<Vec<u8>> = Vec::new();
        for len in [0usize, 1, 127, 128, 300, 16_384, 262_176] {
            let chunk = Message::Chunk {
                stream_id: tid,
                record: vec![9; len],
            };
            let bytes = postcard::to_stdvec(&chunk).unwrap();
            cases.push(bytes[..bytes.len() - 1].to_vec()); // one byte short
            cases.push([bytes.clone(), vec![0]].concat()); // one byte over
            cases.push(bytes[..17].to_vec()); // no length
            cases.push(bytes);
        }
        // Over-long (non-canonical) and oversized varints, other variants.
        cases.push([vec![5], vec![7; 16], vec![0x81, 0x00], vec![1]].concat());
        cases.push([vec![5], vec![7; 16], vec![0x80, 0x00]].concat());
        cases.push([vec![5], vec![7; 16], vec![0xff, 0xff, 0xff, 0xff, 0x7f]].concat());
        cases.push([vec![5], vec![7; 16], vec![0x80; 6]].concat());
        cases.push([vec![4], vec![7; 16], vec![1, 1]].concat());
        cases.push(vec![5]);
        cases.push(Vec::new());
        for payload in &cases {
            assert_eq!(peek(payload), decoded_chunk(payload), "{payload:?}");
        }
        assert_eq!(peek(&cases[3]), Some((tid, vec![])));
        assert_eq!(peek(&cases[7]), Some((tid, vec![9])));
    }

    proptest::proptest! {
        #[test]
        fn peek_chunk_agrees_with_decoding_on_any_bytes(
            head in proptest::collection::vec(proptest::num::u8::ANY, 0..24),
            tail in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
        ) {
            let mut payload = vec![5];
            payload.extend(&head);
            payload.extend(&tail);
            proptest::prop_assert_eq!(peek(&payload), decoded_chunk(&payload));
            proptest::prop_assert_eq!(peek(&payload[1..]), decoded_chunk(&payload[1..]));
        }

        #[test]
        fn peek_chunk_agrees_with_decoding_near_the_right_length(
            tail in proptest::collection::vec(proptest::num::u8::ANY, 0..400),
            delta in -2i64..=2,
            padded in proptest::bool::ANY,
        ) {
            let claimed = (tail.len() as i64 + delta).max(0) as u64;
            let mut payload = vec![5];
            payload.extend([7; 16]);
            // The length as a varint, sometimes with a redundant 0x80 0x00 tail.
            let mut v = claimed;
            loop {
                let more = v >= 0x80 || padded;
                payload.push((v as u8 & 0x7f) | if more { 0x80 } else { 0 });
                v >>= 7;
                if v == 0 && !more {
                    break;
                }
                if v == 0 {
                    payload.push(0);
                    break;
                }
            }
            payload.extend(&tail);
            proptest::prop_assert_eq!(peek(&payload), decoded_chunk(&payload));
        }
    }
}
