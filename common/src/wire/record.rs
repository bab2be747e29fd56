//! The data-plane records of a transfer, byte by byte (PROTOCOL.md §5): the
//! stream root, the manifest, chunks, key updates, the trailer and the
//! receipt, and exactly what each tag and signature covers.
//!
//! Parsing checks every length against its bound before anything else and
//! refuses trailing bytes; it does not authenticate. Authentication is the job
//! of the stream state machines in [`crate::transfer`].

use thiserror::Error;

use crate::crypto::aead::{self, ChunkKey};
use crate::crypto::seal::{IV_LEN, Sealed, TAG_LEN};
use crate::encode::{Decoder, Encoder};
use crate::identity::Fingerprint;
use crate::ids::{StreamId, TransferId};
use crate::name::AgentName;

/// Largest plaintext of one chunk.
pub const MAX_CHUNK: usize = 1 << 20;
/// Chunk size the sender uses by default. 512 KiB measured best here: against
/// 256 KiB, 6 % less CPU and 4 % more throughput for 5 MiB more RSS per agent;
/// 1 MiB gained nothing more (docs/BENCHMARKS.md).
pub const DEFAULT_CHUNK: usize = 512 << 10;
/// Largest chunk ciphertext (GCM adds no padding: a full chunk).
pub const MAX_CHUNK_CIPHERTEXT: usize = MAX_CHUNK;
/// Largest manifest plaintext.
pub const MAX_MANIFEST: usize = 512 << 10;
/// Largest sender signature in a trailer (a 4096-bit key's).
pub const MAX_SIGNATURE: usize = 512;
/// Most receivers a trailer may list.
pub const MAX_TRAILER_RECEIVERS: usize = 64;
/// Largest trailer plaintext: total, hash, the length-prefixed signature, and
/// the receivers (name with its u32 length, fingerprint).
pub const MAX_TRAILER_PLAIN: usize =
    8 + 32 + 4 + MAX_SIGNATURE + 4 + MAX_TRAILER_RECEIVERS * (4 + 32 + 32);

/// Tag and signature labels of the records.
pub mod label {
    /// Stream-root tag.
    pub const ROOT: &str = "keyferry/v2 root";
    /// Manifest tag.
    pub const MANIFEST: &str = "keyferry/v2 manifest";
    /// Hash of a manifest body (what the journal and the resume proof name).
    pub const MANIFEST_HASH: &str = "keyferry/v2 manifest-hash";
    /// Chunk associated data (AES-256-GCM; version 3).
    pub const CHUNK: &str = "keyferry/v3 chunk";
    /// Key-update tag.
    pub const KEY_UPDATE: &str = "keyferry/v2 key-update";
    /// Trailer tag.
    pub const TRAILER: &str = "keyferry/v2 trailer";
    /// The sender's signature over what a stream's trailer commits to.
    pub const STREAM_SIGNATURE: &str = "keyferry/v2 stream";
    /// Receipt tag.
    pub const RECEIPT: &str = "keyferry/v2 receipt";
}

/// A record that does not have the shape its type requires.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
#[error("malformed {0} record")]
pub struct MalformedRecord(pub &'static str);

/// Fixed part of a chunk record before the ciphertext.
pub const CHUNK_HEADER_LEN: usize = 4 + 8 + 1 + 4;
/// A chunk's GCM tag, after the ciphertext.
pub use crate::crypto::aead::TAG_LEN as CHUNK_TAG_LEN;

/// One sealed chunk: `epoch u32 ‖ seq u64 ‖ last u8 ‖ len u32 ‖ C ‖ tag[16]`
/// (AES-256-GCM: `C` is as long as the plaintext), borrowed from the bytes it
/// was parsed from. The ciphertext is writable so the receiver can decrypt it
/// where it lies, once the tag checked out.
#[derive(Debug, PartialEq, Eq)]
pub struct ChunkRecord<'a> {
    /// Key epoch the chunk is sealed under.
    pub epoch: u32,
    /// Sequence number within the stream.
    pub seq: u64,
    /// Whether this is the final chunk.
    pub last: bool,
    /// AES-256-GCM ciphertext, as long as the plaintext.
    pub ciphertext: &'a mut [u8],
    /// GCM tag.
    pub tag: &'a [u8; CHUNK_TAG_LEN],
}

/// Associated data of a chunk's tag: it binds the chunk to its stream, epoch,
/// sequence number, place in the data (the absolute offset of its first
/// plaintext byte) and the last-chunk flag.
pub fn chunk_ad(stream_id: &StreamId, epoch: u32, seq: u64, offset: u64, last: bool) -> Vec<u8> {
    Encoder::new(label::CHUNK)
        .fixed(&stream_id.0)
        .u32(epoch)
        .u64(seq)
        .u64(offset)
        .u8(u8::from(last))
        .finish()
}

/// The fixed part of a chunk record, before the ciphertext.
pub fn chunk_header(
    epoch: u32,
    seq: u64,
    last: bool,
    ciphertext_len: usize,
) -> [u8; CHUNK_HEADER_LEN] {
    let len = u32::try_from(ciphertext_len).expect("chunks are at most 1 MiB");
    let mut h = [0u8; CHUNK_HEADER_LEN];
    h[..4].copy_from_slice(&epoch.to_be_bytes());
    h[4..12].copy_from_slice(&seq.to_be_bytes());
    h[12] = u8::from(last);
    h[13..].copy_from_slice(&len.to_be_bytes());
    h
}

/// Length of a chunk record whose ciphertext is `ciphertext_len` bytes.
pub const fn chunk_record_len(ciphertext_len: usize) -> usize {
    CHUNK_HEADER_LEN + ciphertext_len + CHUNK_TAG_LEN
}

/// A whole chunk record sealed under `key`, copying `plain`: what the
/// sender's in-place path makes, for tests that forge streams. A sender
/// never calls it: nothing here stops a caller from reusing a nonce.
#[doc(hidden)]
pub fn seal_chunk(
    key: &ChunkKey,
    stream_id: &StreamId,
    epoch: u32,
    seq: u64,
    offset: u64,
    last: bool,
    plain: &[u8],
) -> Vec<u8> {
    let mut record = chunk_header(epoch, seq, last, plain.len()).to_vec();
    record.extend_from_slice(plain);
    let ad = chunk_ad(stream_id, epoch, seq, offset, last);
    let tag = aead::seal_in_place(
        key,
        &aead::chunk_nonce(epoch, seq),
        &ad,
        &mut record[CHUNK_HEADER_LEN..],
    );
    record.extend_from_slice(&tag);
    record
}

impl<'a> ChunkRecord<'a> {
    /// Parses a record; the ciphertext must be at most [`MAX_CHUNK_CIPHERTEXT`]
    /// bytes and fill the record exactly.
    pub fn parse(bytes: &'a mut [u8]) -> Result<Self, MalformedRecord> {
        let bad = MalformedRecord("chunk");
        let (epoch, seq, last, len) = {
            let mut d = Decoder::new(bytes);
            let epoch = d.u32().map_err(|_| bad)?;
            let seq = d.u64().map_err(|_| bad)?;
            let last = match d.u8().map_err(|_| bad)? {
                0 => false,
                1 => true,
                _ => return Err(bad),
            };
            let len = d.u32().map_err(|_| bad)? as usize;
            (epoch, seq, last, len)
        };
        if len > MAX_CHUNK_CIPHERTEXT || bytes.len() != chunk_record_len(len) {
            return Err(bad);
        }
        let (ciphertext, tag) = bytes[CHUNK_HEADER_LEN..].split_at_mut(len);
        let tag: &[u8; CHUNK_TAG_LEN] = (&*tag).try_into().map_err(|_| bad)?;
        Ok(Self {
            epoch,
            seq,
            last,
            ciphertext,
            tag,
        })
    }
}

/// Ciphertext length of 32 bytes of key material (a key update's fresh bytes,
/// a stream root).
pub const KEY_CT_LEN: usize = 48;
/// Exact length of a key-update record.
pub const KEY_UPDATE_LEN: usize = 4 + 8 + IV_LEN + KEY_CT_LEN + TAG_LEN;
/// Exact length of a stream-root record.
pub const ROOT_LEN: usize = IV_LEN + KEY_CT_LEN + TAG_LEN;

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
pub fn key_update_ad(stream_id: &StreamId, epoch: u32, first_seq: u64) -> Vec<u8> {
    Encoder::new(label::KEY_UPDATE)
        .fixed(&stream_id.0)
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
        let sealed = fixed_sealed(&mut d, bad)?;
        d.finish().map_err(|_| bad)?;
        Ok(Self {
            epoch,
            first_seq,
            sealed,
        })
    }
}

fn fixed_sealed(d: &mut Decoder<'_>, bad: MalformedRecord) -> Result<Sealed, MalformedRecord> {
    let iv = d.array::<IV_LEN>().map_err(|_| bad)?;
    let ct = d.array::<KEY_CT_LEN>().map_err(|_| bad)?;
    let tag = d.array::<TAG_LEN>().map_err(|_| bad)?;
    Ok(Sealed {
        iv,
        ciphertext: ct.to_vec(),
        tag,
    })
}

/// Associated data of the stream root's tag, for one receiver.
pub fn root_ad(transfer_id: &TransferId, stream_id: &StreamId) -> Vec<u8> {
    Encoder::new(label::ROOT)
        .fixed(&transfer_id.0)
        .fixed(&stream_id.0)
        .finish()
}

/// Encodes a stream-root record: `IV[16] ‖ C[48] ‖ tag[32]`.
pub fn encode_fixed(s: &Sealed) -> Vec<u8> {
    Encoder::default()
        .fixed(&s.iv)
        .fixed(&s.ciphertext)
        .fixed(&s.tag)
        .finish()
}

/// Parses a stream-root record of exactly [`ROOT_LEN`] bytes.
pub fn parse_root(bytes: &[u8]) -> Result<Sealed, MalformedRecord> {
    let bad = MalformedRecord("root");
    if bytes.len() != ROOT_LEN {
        return Err(bad);
    }
    let mut d = Decoder::new(bytes);
    let sealed = fixed_sealed(&mut d, bad)?;
    d.finish().map_err(|_| bad)?;
    Ok(sealed)
}

/// Encodes a variable sealed record (manifest, trailer):
/// `IV[16] ‖ u32 len(C) ‖ C ‖ tag[32]`.
pub fn encode_sealed(s: &Sealed) -> Vec<u8> {
    Encoder::default()
        .fixed(&s.iv)
        .bytes(&s.ciphertext)
        .fixed(&s.tag)
        .finish()
}

/// Parses a variable sealed record whose ciphertext may be at most `max_ct`
/// bytes (and a non-zero multiple of 16).
pub fn parse_sealed(
    bytes: &[u8],
    max_ct: usize,
    what: &'static str,
) -> Result<Sealed, MalformedRecord> {
    let bad = MalformedRecord(what);
    let mut d = Decoder::new(bytes);
    let iv = d.array::<IV_LEN>().map_err(|_| bad)?;
    let ct = d.bytes(max_ct).map_err(|_| bad)?;
    if ct.is_empty() || !ct.len().is_multiple_of(16) {
        return Err(bad);
    }
    let ciphertext = ct.to_vec();
    let tag = d.array::<TAG_LEN>().map_err(|_| bad)?;
    d.finish().map_err(|_| bad)?;
    Ok(Sealed {
        iv,
        ciphertext,
        tag,
    })
}

/// Associated data of the manifest's tag.
pub fn manifest_ad(stream_id: &StreamId) -> Vec<u8> {
    Encoder::new(label::MANIFEST).fixed(&stream_id.0).finish()
}

/// The hash of a manifest body: what the sender signs, and what a resume
/// proof and a receiver's journal name.
pub fn manifest_hash(body: &[u8]) -> [u8; 32] {
    use sha2::{Digest as _, Sha256};
    Sha256::digest(Encoder::new(label::MANIFEST_HASH).bytes(body).finish()).into()
}

/// Associated data of the trailer's tag: it binds the number of chunks of this
/// stream and the offset its data started at.
pub fn trailer_ad(stream_id: &StreamId, chunks: u64, resume_from: u64) -> Vec<u8> {
    Encoder::new(label::TRAILER)
        .fixed(&stream_id.0)
        .u64(chunks)
        .u64(resume_from)
        .finish()
}

/// The trailer's plaintext: `u64 total ‖ SHA-256[32] ‖ u32 len ‖ signature ‖
/// u32 n ‖ n × (u32 len ‖ receiver name ‖ receiver fingerprint[32])`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrailerPlain {
    /// Total plaintext bytes of the data (all of it, also across a resume).
    pub total: u64,
    /// SHA-256 of the whole data.
    pub sha256: [u8; 32],
    /// The sender's RSA-PSS signature over [`stream_signed`].
    pub signature: Vec<u8>,
    /// Every receiver of the stream, as signed.
    pub receivers: Vec<(AgentName, Fingerprint)>,
}

impl TrailerPlain {
    /// Encodes the plaintext.
    pub fn encode(&self) -> Vec<u8> {
        let count = u32::try_from(self.receivers.len()).expect("receivers are bounded");
        let mut e = Encoder::default();
        e.u64(self.total)
            .fixed(&self.sha256)
            .bytes(&self.signature)
            .u32(count);
        for (name, fp) in &self.receivers {
            e.bytes(name.as_str().as_bytes()).fixed(&fp.0);
        }
        e.finish()
    }

    /// Parses an opened trailer.
    pub fn parse(bytes: &[u8]) -> Result<Self, MalformedRecord> {
        let bad = MalformedRecord("trailer");
        let mut d = Decoder::new(bytes);
        let total = d.u64().map_err(|_| bad)?;
        let sha256 = d.array().map_err(|_| bad)?;
        let signature = d.bytes(MAX_SIGNATURE).map_err(|_| bad)?.to_vec();
        let count = d.u32().map_err(|_| bad)? as usize;
        if count == 0 || count > MAX_TRAILER_RECEIVERS {
            return Err(bad);
        }
        let mut receivers = Vec::with_capacity(count);
        for _ in 0..count {
            let raw = d.bytes(crate::name::MAX_NAME_LEN).map_err(|_| bad)?;
            let name = std::str::from_utf8(raw)
                .ok()
                .and_then(|s| AgentName::new(s).ok())
                .ok_or(bad)?;
            receivers.push((name, Fingerprint(d.array().map_err(|_| bad)?)));
        }
        d.finish().map_err(|_| bad)?;
        Ok(Self {
            total,
            sha256,
            signature,
            receivers,
        })
    }
}

/// What the sender's trailer signature covers (signed under the context
/// [`label::STREAM_SIGNATURE`]): the stream, the sender's key, the data's
/// length and hash, the chunk count, where this stream's data started, the
/// manifest, and every receiver the stream was sent to, by name and key.
/// Each receiver checks it is in the list before it places anything.
#[derive(Debug, Clone, Copy)]
pub struct StreamCommitment<'a> {
    /// The stream.
    pub stream_id: &'a StreamId,
    /// The sender's key fingerprint.
    pub sender_fp: &'a Fingerprint,
    /// Total plaintext bytes.
    pub total: u64,
    /// SHA-256 of the whole data.
    pub sha256: &'a [u8; 32],
    /// Chunks in this stream.
    pub chunks: u64,
    /// The offset the stream's data started at.
    pub resume_from: u64,
    /// Hash of the manifest body ([`manifest_hash`]).
    pub manifest_hash: &'a [u8; 32],
    /// Every receiver of the stream.
    pub receivers: &'a [(AgentName, Fingerprint)],
}

/// The bytes a [`StreamCommitment`] signs.
pub fn stream_signed(c: &StreamCommitment<'_>) -> Vec<u8> {
    let count = u32::try_from(c.receivers.len()).expect("receivers are bounded");
    let mut e = Encoder::default();
    e.fixed(&c.stream_id.0)
        .fixed(&c.sender_fp.0)
        .u64(c.total)
        .fixed(c.sha256)
        .u64(c.chunks)
        .u64(c.resume_from)
        .fixed(c.manifest_hash)
        .u32(count);
    for (name, fp) in c.receivers {
        e.bytes(name.as_str().as_bytes()).fixed(&fp.0);
    }
    e.finish()
}

/// The MAC input of a receipt: `label ‖ transfer id ‖ stream id ‖ total u64 ‖ SHA-256`.
pub fn receipt_input(
    transfer_id: &TransferId,
    stream_id: &StreamId,
    total: u64,
    sha256: &[u8; 32],
) -> Vec<u8> {
    Encoder::new(label::RECEIPT)
        .fixed(&transfer_id.0)
        .fixed(&stream_id.0)
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
        let mut b = chunk_header(epoch, seq, last, ct_len).to_vec();
        b.extend(std::iter::repeat_n(2, ct_len));
        b.extend([3; CHUNK_TAG_LEN]);
        b
    }

    #[test]
    fn chunk_round_trip_and_exact_layout() {
        let mut b = chunk_bytes(7, 9, true, 5);
        assert_eq!(b.len(), chunk_record_len(5));
        assert_eq!(b.len(), 17 + 5 + 16);
        assert_eq!(&b[..13], &[0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 9, 1]);
        assert_eq!(&b[13..17], &[0, 0, 0, 5]);
        let r = ChunkRecord::parse(&mut b).unwrap();
        assert_eq!((r.epoch, r.seq, r.last), (7, 9, true));
        assert_eq!((&*r.ciphertext, r.tag), (&[2u8; 5][..], &[3u8; 16]));
        let mut empty = chunk_bytes(0, 0, true, 0);
        assert_eq!(ChunkRecord::parse(&mut empty).unwrap().ciphertext.len(), 0);
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
        let mut longer = b.clone();
        longer[16] = 33; // declared ciphertext longer than what follows
        assert!(ChunkRecord::parse(&mut longer).is_err());
        let mut huge = b;
        huge[13..17].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(ChunkRecord::parse(&mut huge).is_err());
        assert!(ChunkRecord::parse(&mut []).is_err());
        let mut full = chunk_bytes(0, 0, false, MAX_CHUNK_CIPHERTEXT);
        assert!(ChunkRecord::parse(&mut full).is_ok());
        let mut over = chunk_bytes(0, 0, false, MAX_CHUNK_CIPHERTEXT + 1);
        assert!(ChunkRecord::parse(&mut over).is_err());
    }

    #[test]
    fn fixed_records_have_exact_lengths_and_variable_ones_their_bounds() {
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

        let root = encode_fixed(&sealed(48));
        assert_eq!(root.len(), ROOT_LEN);
        assert_eq!(parse_root(&root).unwrap(), sealed(48));
        assert!(parse_root(&root[..95]).is_err());

        let t = encode_sealed(&sealed(64));
        assert_eq!(t.len(), 16 + 4 + 64 + 32);
        assert_eq!(parse_sealed(&t, 64, "trailer").unwrap(), sealed(64));
        assert!(parse_sealed(&t, 48, "trailer").is_err(), "over the bound");
        assert!(parse_sealed(&encode_sealed(&sealed(20)), 64, "trailer").is_err());
        assert!(parse_sealed(&encode_sealed(&sealed(0)), 64, "trailer").is_err());
        assert!(parse_sealed(&[t.as_slice(), &[0]].concat(), 64, "trailer").is_err());

        let bob = (AgentName::new("bob").unwrap(), Fingerprint([6; 32]));
        let plain = TrailerPlain {
            total: 9,
            sha256: [4; 32],
            signature: vec![5; 384],
            receivers: vec![bob.clone(); MAX_TRAILER_RECEIVERS],
        };
        assert_eq!(TrailerPlain::parse(&plain.encode()).unwrap(), plain);
        assert!(plain.encode().len() <= MAX_TRAILER_PLAIN);
        let mut none = plain.clone();
        none.receivers.clear();
        assert!(TrailerPlain::parse(&none.encode()).is_err());
        let mut too_many = plain;
        too_many.receivers.push(bob);
        assert!(TrailerPlain::parse(&too_many.encode()).is_err());
    }
}
