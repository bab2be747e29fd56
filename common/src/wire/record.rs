//! The data-plane records of a transfer, byte by byte (PROTOCOL.md §5): chunks,
//! key updates, the trailer and the receipt, and the associated data each tag
//! covers.
//!
//! Parsing checks every length against its bound before anything else and
//! refuses trailing bytes; it does not authenticate. Authentication is the job
//! of the stream state machines in [`crate::transfer`].

use thiserror::Error;

use crate::crypto::seal::{IV_LEN, Sealed, TAG_LEN};
use crate::encode::{Decoder, Encoder};
use crate::ids::TransferId;

/// Largest plaintext of one chunk.
pub const MAX_CHUNK: usize = 1 << 20;
/// Chunk size the sender uses by default. 512 KiB measured best here: against
/// 256 KiB, 6 % less CPU and 4 % more throughput for 5 MiB more RSS per agent;
/// 1 MiB gained nothing more (docs/BENCHMARKS.md).
pub const DEFAULT_CHUNK: usize = 512 << 10;
/// Largest chunk ciphertext (a full chunk plus a block of padding).
pub const MAX_CHUNK_CIPHERTEXT: usize = MAX_CHUNK + 16;

/// Tag labels of the records.
pub mod label {
    /// Chunk tag.
    pub const CHUNK: &str = "keyferry/v1 chunk";
    /// Key-update tag.
    pub const KEY_UPDATE: &str = "keyferry/v1 key-update";
    /// Trailer tag.
    pub const TRAILER: &str = "keyferry/v1 trailer";
    /// Receipt tag.
    pub const RECEIPT: &str = "keyferry/v1 receipt";
}

/// A record that does not have the shape its type requires.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
#[error("malformed {0} record")]
pub struct MalformedRecord(pub &'static str);

/// Fixed part of a chunk record before the ciphertext.
pub const CHUNK_HEADER_LEN: usize = 4 + 8 + 1 + IV_LEN + 4;

/// One sealed chunk: `epoch u32 ‖ seq u64 ‖ last u8 ‖ IV[16] ‖ len u32 ‖ C ‖ tag[32]`,
/// borrowed from the bytes it was parsed from. The ciphertext is writable so
/// the receiver can decrypt it where it lies, after the tag checked out.
#[derive(Debug, PartialEq, Eq)]
pub struct ChunkRecord<'a> {
    /// Key epoch the chunk is sealed under.
    pub epoch: u32,
    /// Sequence number within the transfer.
    pub seq: u64,
    /// Whether this is the final chunk.
    pub last: bool,
    /// Random CBC IV.
    pub iv: [u8; IV_LEN],
    /// AES-256-CBC ciphertext, PKCS#7-padded.
    pub ciphertext: &'a mut [u8],
    /// HMAC-SHA256 tag.
    pub tag: &'a [u8; TAG_LEN],
}

/// Associated data of a chunk's tag.
pub fn chunk_ad(transfer_id: &TransferId, epoch: u32, seq: u64, last: bool) -> Vec<u8> {
    Encoder::new(label::CHUNK)
        .fixed(&transfer_id.0)
        .u32(epoch)
        .u64(seq)
        .u8(u8::from(last))
        .finish()
}

/// The fixed part of a chunk record, before the ciphertext.
pub fn chunk_header(
    epoch: u32,
    seq: u64,
    last: bool,
    iv: &[u8; IV_LEN],
    ciphertext_len: usize,
) -> [u8; CHUNK_HEADER_LEN] {
    let len = u32::try_from(ciphertext_len).expect("chunks are at most 1 MiB");
    let mut h = [0u8; CHUNK_HEADER_LEN];
    h[..4].copy_from_slice(&epoch.to_be_bytes());
    h[4..12].copy_from_slice(&seq.to_be_bytes());
    h[12] = u8::from(last);
    h[13..29].copy_from_slice(iv);
    h[29..].copy_from_slice(&len.to_be_bytes());
    h
}

/// Length of a chunk record whose ciphertext is `ciphertext_len` bytes.
pub const fn chunk_record_len(ciphertext_len: usize) -> usize {
    CHUNK_HEADER_LEN + ciphertext_len + TAG_LEN
}

impl<'a> ChunkRecord<'a> {
    /// Parses a record; the ciphertext must be a non-zero multiple of 16 bytes,
    /// at most [`MAX_CHUNK_CIPHERTEXT`], and fill the record exactly.
    pub fn parse(bytes: &'a mut [u8]) -> Result<Self, MalformedRecord> {
        let bad = MalformedRecord("chunk");
        let (epoch, seq, last, iv, len) = {
            let mut d = Decoder::new(bytes);
            let epoch = d.u32().map_err(|_| bad)?;
            let seq = d.u64().map_err(|_| bad)?;
            let last = match d.u8().map_err(|_| bad)? {
                0 => false,
                1 => true,
                _ => return Err(bad),
            };
            let iv = d.array::<IV_LEN>().map_err(|_| bad)?;
            let len = d.u32().map_err(|_| bad)? as usize;
            (epoch, seq, last, iv, len)
        };
        if len == 0 || !len.is_multiple_of(16) || len > MAX_CHUNK_CIPHERTEXT {
            return Err(bad);
        }
        if bytes.len() != chunk_record_len(len) {
            return Err(bad);
        }
        let (ciphertext, tag) = bytes[CHUNK_HEADER_LEN..].split_at_mut(len);
        let tag: &[u8; TAG_LEN] = (&*tag).try_into().map_err(|_| bad)?;
        Ok(Self {
            epoch,
            seq,
            last,
            iv,
            ciphertext,
            tag,
        })
    }
}

/// Ciphertext length of the 32 fresh bytes of a key update.
pub const KEY_UPDATE_CT_LEN: usize = 48;
/// Exact length of a key-update record.
pub const KEY_UPDATE_LEN: usize = 4 + 8 + IV_LEN + KEY_UPDATE_CT_LEN + TAG_LEN;

/// A key update: `epoch u32 ‖ first_seq u64 ‖ IV[16] ‖ C[48] ‖ tag[32]`, 108 bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyUpdateRecord {
    /// The epoch this update starts.
    pub epoch: u32,
    /// Sequence number of the first chunk sealed under the new epoch.
    pub first_seq: u64,
    /// IV, ciphertext of the fresh bytes, and tag.
    pub sealed: Sealed,
}

/// Associated data of a key update's tag.
pub fn key_update_ad(transfer_id: &TransferId, epoch: u32, first_seq: u64) -> Vec<u8> {
    Encoder::new(label::KEY_UPDATE)
        .fixed(&transfer_id.0)
        .u32(epoch)
        .u64(first_seq)
        .finish()
}

impl KeyUpdateRecord {
    /// Encodes the record.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        e.u32(self.epoch)
            .u64(self.first_seq)
            .fixed(&self.sealed.iv)
            .fixed(&self.sealed.ciphertext)
            .fixed(&self.sealed.tag);
        e.finish()
    }

    /// Parses a record of exactly [`KEY_UPDATE_LEN`] bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self, MalformedRecord> {
        let bad = MalformedRecord("key-update");
        if bytes.len() != KEY_UPDATE_LEN {
            return Err(bad);
        }
        let mut d = Decoder::new(bytes);
        let epoch = d.u32().map_err(|_| bad)?;
        let first_seq = d.u64().map_err(|_| bad)?;
        let iv = d.array::<IV_LEN>().map_err(|_| bad)?;
        let ct = d.array::<KEY_UPDATE_CT_LEN>().map_err(|_| bad)?;
        let tag = d.array::<TAG_LEN>().map_err(|_| bad)?;
        d.finish().map_err(|_| bad)?;
        Ok(Self {
            epoch,
            first_seq,
            sealed: Sealed {
                iv,
                ciphertext: ct.to_vec(),
                tag,
            },
        })
    }
}

/// Ciphertext length of the trailer's 40-byte plaintext (total u64 ‖ SHA-256).
pub const TRAILER_CT_LEN: usize = 48;
/// Exact length of a trailer record.
pub const TRAILER_LEN: usize = IV_LEN + TRAILER_CT_LEN + TAG_LEN;

/// Associated data of the trailer's tag: it binds the number of chunks.
pub fn trailer_ad(transfer_id: &TransferId, chunks: u64) -> Vec<u8> {
    Encoder::new(label::TRAILER)
        .fixed(&transfer_id.0)
        .u64(chunks)
        .finish()
}

/// The trailer: `IV[16] ‖ C[48] ‖ tag[32]`, sealing `total u64 ‖ SHA-256[32]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrailerRecord {
    /// IV, ciphertext and tag.
    pub sealed: Sealed,
}

impl TrailerRecord {
    /// Encodes the record.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        e.fixed(&self.sealed.iv)
            .fixed(&self.sealed.ciphertext)
            .fixed(&self.sealed.tag);
        e.finish()
    }

    /// Parses a record of exactly [`TRAILER_LEN`] bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self, MalformedRecord> {
        let bad = MalformedRecord("trailer");
        if bytes.len() != TRAILER_LEN {
            return Err(bad);
        }
        let mut d = Decoder::new(bytes);
        let iv = d.array::<IV_LEN>().map_err(|_| bad)?;
        let ct = d.array::<TRAILER_CT_LEN>().map_err(|_| bad)?;
        let tag = d.array::<TAG_LEN>().map_err(|_| bad)?;
        Ok(Self {
            sealed: Sealed {
                iv,
                ciphertext: ct.to_vec(),
                tag,
            },
        })
    }
}

/// The MAC input of a receipt: `label ‖ transfer id ‖ total u64 ‖ SHA-256`.
pub fn receipt_input(transfer_id: &TransferId, total: u64, sha256: &[u8; 32]) -> Vec<u8> {
    Encoder::new(label::RECEIPT)
        .fixed(&transfer_id.0)
        .u64(total)
        .fixed(sha256)
        .finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(ct_len: usize) -> Sealed {
        Sealed {
            iv: [1; 16],
            ciphertext: vec![2; ct_len],
            tag: [3; 32],
        }
    }

    fn chunk_bytes(epoch: u32, seq: u64, last: bool, ct_len: usize) -> Vec<u8> {
        let mut b = chunk_header(epoch, seq, last, &[1; 16], ct_len).to_vec();
        b.extend(std::iter::repeat_n(2, ct_len));
        b.extend([3; TAG_LEN]);
        b
    }

    #[test]
    fn chunk_round_trip_and_exact_layout() {
        let mut b = chunk_bytes(7, 9, true, 16);
        assert_eq!(b.len(), chunk_record_len(16));
        assert_eq!(b.len(), CHUNK_HEADER_LEN + 16 + 32);
        assert_eq!(&b[..13], &[0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 9, 1]);
        assert_eq!(&b[13..29], &[1; 16]);
        assert_eq!(&b[29..33], &[0, 0, 0, 16]);
        let r = ChunkRecord::parse(&mut b).unwrap();
        assert_eq!((r.epoch, r.seq, r.last, r.iv), (7, 9, true, [1; 16]));
        assert_eq!((&*r.ciphertext, r.tag), (&[2u8; 16][..], &[3u8; 32]));
    }

    #[test]
    fn chunk_parse_refuses_bad_flag_lengths_and_trailing_bytes() {
        let b = chunk_bytes(0, 0, false, 32);
        assert!(ChunkRecord::parse(&mut b.clone()).is_ok());
        let mut flag = b.clone();
        flag[12] = 2;
        assert!(ChunkRecord::parse(&mut flag).is_err());
        let mut trailing = b.clone();
        trailing.push(0);
        assert!(ChunkRecord::parse(&mut trailing).is_err());
        assert!(ChunkRecord::parse(&mut b[..b.len() - 1].to_vec()).is_err());
        let mut odd = b.clone();
        odd[32] = 31; // declared ciphertext length not a multiple of 16
        assert!(ChunkRecord::parse(&mut odd).is_err());
        let mut huge = b;
        huge[29..33].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(ChunkRecord::parse(&mut huge).is_err());
        assert!(ChunkRecord::parse(&mut []).is_err());
    }

    #[test]
    fn key_update_and_trailer_have_exact_lengths() {
        let ku = KeyUpdateRecord {
            epoch: 1,
            first_seq: 5,
            sealed: sealed(48),
        };
        let b = ku.encode();
        assert_eq!(b.len(), 108);
        assert_eq!(KeyUpdateRecord::parse(&b).unwrap(), ku);
        assert!(KeyUpdateRecord::parse(&b[..107]).is_err());
        assert!(KeyUpdateRecord::parse(&[b.as_slice(), &[0]].concat()).is_err());

        let t = TrailerRecord { sealed: sealed(48) };
        let b = t.encode();
        assert_eq!(b.len(), 96);
        assert_eq!(TrailerRecord::parse(&b).unwrap(), t);
        assert!(TrailerRecord::parse(&b[..95]).is_err());
    }
}
