//! The sender's stream: chunking decisions, rekeying, the trailer, the receipt.
//!
//! Everything it produces is a [`ReadyFrame`], the exact bytes to write: key
//! updates, chunks and the trailer alike, so the caller is plumbing.
//! [`SendStream::push_frame`] is sequential (it assigns sequence numbers,
//! rotates keys and hashes the plaintext in order); the [`ChunkJob`] it returns
//! is self-contained and may be sealed on another thread, so several chunks can
//! be sealed at once while their order stays fixed.

use std::sync::Arc;
use std::time::Instant;

use sha2::{Digest, Sha256};
use thiserror::Error;
use zeroize::Zeroize;

use super::RekeyPolicy;
use crate::crypto::keys::{MacKey, SealKeys, SessionKey};
use crate::crypto::{AuthError, mac, random_array, seal};
use crate::ids::TransferId;
use crate::schedule::StreamKeys;
use crate::wire::chunk::ChunkFrame;
use crate::wire::frame::MAX_FRAME_LEN;
use crate::wire::message::{self, Message};
use crate::wire::record::{
    KeyUpdateRecord, MAX_CHUNK, TrailerRecord, chunk_ad, chunk_header, key_update_ad,
    receipt_input, trailer_ad,
};

/// Misuse of the sender's stream (by our own code, or a file that changed size).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SendError {
    /// A chunk would take the stream past the size declared in the offer.
    #[error("the file grew while it was being sent: more than the {declared} bytes announced")]
    Oversize {
        /// Size announced in the offer.
        declared: u64,
    },
    /// The last chunk does not bring the stream to the declared size.
    #[error("the file shrank while it was being sent: {sent} of {declared} bytes")]
    Undersize {
        /// Bytes sent.
        sent: u64,
        /// Size announced in the offer.
        declared: u64,
    },
    /// A chunk is empty (only the last may be) or larger than the maximum.
    #[error("invalid chunk length {0}")]
    ChunkLength(usize),
    /// Data or a trailer after the stream was finished, or a trailer before the last chunk.
    #[error("stream used out of order")]
    Order,
    /// The hard per-key limit would be exceeded (only reachable if rekeying is disabled).
    #[error("refusing to seal more than {0} bytes under one session key")]
    KeyExhausted(u64),
    /// A chunk frame pushed before its plaintext was written.
    #[error("chunk pushed before its plaintext was read")]
    Unfilled,
    /// Sequence or epoch numbers would wrap.
    #[error("sequence or epoch counter exhausted")]
    CounterExhausted,
}

/// One frame ready to be written: a `Message::KeyUpdate`, `Chunk` or
/// `Trailer` of the stream's transfer, exactly as it goes on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyFrame {
    frame: Vec<u8>,
    record_at: usize,
}

impl ReadyFrame {
    /// A frame for the record of a small message (key update, trailer).
    fn small(msg: &Message, record_len: usize) -> Self {
        let frame = message::encode(msg, MAX_FRAME_LEN)
            .expect("key updates and trailers are far below the frame limit");
        Self {
            record_at: frame.len() - record_len,
            frame,
        }
    }

    /// The frame's bytes.
    pub fn frame(&self) -> &[u8] {
        &self.frame
    }

    /// The record inside the frame (what the message carries).
    pub fn record(&self) -> &[u8] {
        &self.frame[self.record_at..]
    }

    /// The frame's buffer, to be written and then reused for another chunk.
    pub fn into_frame(self) -> Vec<u8> {
        self.frame
    }
}

/// A chunk ready to be sealed, possibly on another thread.
pub struct ChunkJob {
    keys: Arc<SealKeys>,
    ad: Vec<u8>,
    epoch: u32,
    seq: u64,
    last: bool,
    frame: ChunkFrame,
}

impl std::fmt::Debug for ChunkJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkJob")
            .field("epoch", &self.epoch)
            .field("seq", &self.seq)
            .field("last", &self.last)
            .field("len", &self.frame.plaintext_len())
            .finish_non_exhaustive()
    }
}

impl ChunkJob {
    /// Seals the chunk where it lies (AES-256-CBC, random IV, HMAC-SHA256) and
    /// completes its frame.
    pub fn seal(mut self) -> ReadyFrame {
        let iv = random_array();
        let plaintext_len = self.frame.plaintext_len();
        let (header, ciphertext, tag) = self.frame.record_parts_mut();
        *tag = seal::seal_in_place(&self.keys, &self.ad, &iv, ciphertext, plaintext_len);
        *header = chunk_header(self.epoch, self.seq, self.last, &iv, ciphertext.len());
        ReadyFrame {
            record_at: self.frame.record_at(),
            frame: self.frame.into_bytes(),
        }
    }

    /// Plaintext length of this chunk.
    pub fn len(&self) -> usize {
        self.frame.plaintext_len()
    }

    /// Whether the chunk is empty (only an empty file's final chunk is).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What [`SendStream::push_frame`] produced: a key update to send first, if
/// the key rotated, then the chunk.
#[derive(Debug)]
pub struct Sent {
    /// The key update frame that must precede the chunk, if any.
    pub key_update: Option<ReadyFrame>,
    /// The chunk to seal and send.
    pub chunk: ChunkJob,
}

/// The sender's side of one transfer's stream.
pub struct SendStream {
    transfer_id: TransferId,
    policy: RekeyPolicy,
    wrap: SealKeys,
    trailer: SealKeys,
    receipt: MacKey,
    session: SessionKey,
    epoch: u32,
    epoch_keys: Arc<SealKeys>,
    epoch_started: Instant,
    epoch_bytes: u64,
    next_seq: u64,
    total: u64,
    declared: u64,
    hasher: Sha256,
    last_pushed: bool,
    digest: Option<[u8; 32]>,
}

impl std::fmt::Debug for SendStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendStream")
            .field("transfer_id", &self.transfer_id)
            .field("epoch", &self.epoch)
            .field("next_seq", &self.next_seq)
            .field("total", &self.total)
            .finish_non_exhaustive()
    }
}

impl SendStream {
    /// Starts the stream of a transfer that declared `declared` bytes; epoch 0
    /// begins `now`.
    pub fn new(keys: StreamKeys, declared: u64, policy: RekeyPolicy, now: Instant) -> Self {
        let StreamKeys {
            transfer_id,
            wrap,
            epoch0,
            trailer,
            receipt,
        } = keys;
        let epoch_keys = Arc::new(epoch0.epoch_keys(&transfer_id, 0));
        Self {
            transfer_id,
            policy,
            wrap,
            trailer,
            receipt,
            session: epoch0,
            epoch: 0,
            epoch_keys,
            epoch_started: now,
            epoch_bytes: 0,
            next_seq: 0,
            total: 0,
            declared,
            hasher: Sha256::new(),
            last_pushed: false,
            digest: None,
        }
    }

    /// The current epoch.
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// How many session keys the stream has used so far (epochs + 1).
    pub fn session_keys(&self) -> u64 {
        u64::from(self.epoch) + 1
    }

    /// Plaintext bytes accepted so far.
    pub fn total(&self) -> u64 {
        self.total
    }

    fn rekey_due(&self, len: u64, now: Instant) -> bool {
        self.epoch_bytes > 0
            && (now.saturating_duration_since(self.epoch_started) >= self.policy.interval
                || self.epoch_bytes + len > self.policy.soft_bytes)
    }

    fn rekey(&mut self, now: Instant) -> Result<ReadyFrame, SendError> {
        let epoch = self
            .epoch
            .checked_add(1)
            .ok_or(SendError::CounterExhausted)?;
        let first_seq = self.next_seq;
        let mut fresh: [u8; 32] = random_array();
        let sealed = seal::seal(
            &self.wrap,
            &key_update_ad(&self.transfer_id, epoch, first_seq),
            &fresh,
        );
        self.session = self.session.ratchet(&fresh, &self.transfer_id, epoch);
        fresh.zeroize();
        // The previous epoch's keys are erased when the last job holding them is done.
        self.epoch_keys = Arc::new(self.session.epoch_keys(&self.transfer_id, epoch));
        self.epoch = epoch;
        self.epoch_started = now;
        self.epoch_bytes = 0;
        let record = KeyUpdateRecord {
            epoch,
            first_seq,
            sealed,
        }
        .encode();
        let len = record.len();
        Ok(ReadyFrame::small(
            &Message::KeyUpdate {
                transfer_id: self.transfer_id,
                record,
            },
            len,
        ))
    }

    /// Takes the next chunk of plaintext (a copy of it: see
    /// [`Self::push_frame`] for the form without one).
    pub fn push(
        &mut self,
        plaintext: impl AsRef<[u8]>,
        last: bool,
        now: Instant,
    ) -> Result<Sent, SendError> {
        let plaintext = plaintext.as_ref();
        let mut frame = self.chunk_frame(Vec::new(), plaintext.len())?;
        frame.plaintext_mut().copy_from_slice(plaintext);
        self.push_frame(frame, last, now)
    }

    /// A frame for the next chunk of `plaintext_len` bytes, in `buf` (whose
    /// allocation is reused); fill its plaintext, then [`Self::push_frame`] it.
    pub fn chunk_frame(&self, buf: Vec<u8>, plaintext_len: usize) -> Result<ChunkFrame, SendError> {
        if plaintext_len > MAX_CHUNK {
            return Err(SendError::ChunkLength(plaintext_len));
        }
        ChunkFrame::new(buf, &self.transfer_id, plaintext_len)
            .map_err(|_| SendError::ChunkLength(plaintext_len))
    }

    /// Takes the next chunk, its plaintext in place in `frame`: checks it
    /// against the declared size, assigns its sequence number, rotates the key
    /// if it is due, and hashes the plaintext. The last chunk must bring the
    /// stream to the declared size exactly; only an empty file's last chunk may
    /// be empty.
    pub fn push_frame(
        &mut self,
        frame: ChunkFrame,
        last: bool,
        now: Instant,
    ) -> Result<Sent, SendError> {
        if self.last_pushed || frame.transfer_id() != self.transfer_id {
            return Err(SendError::Order);
        }
        if !frame.is_filled() {
            return Err(SendError::Unfilled);
        }
        let len = frame.plaintext_len();
        if len > MAX_CHUNK || (len == 0 && !last) {
            return Err(SendError::ChunkLength(len));
        }
        let len64 = len as u64;
        let total = self.total + len64;
        if total > self.declared {
            return Err(SendError::Oversize {
                declared: self.declared,
            });
        }
        if last && total != self.declared {
            return Err(SendError::Undersize {
                sent: total,
                declared: self.declared,
            });
        }
        // The chunk that reaches the declared size must be the last one.
        if !last && total == self.declared {
            return Err(SendError::Order);
        }
        let key_update = if self.rekey_due(len64, now) {
            Some(self.rekey(now)?)
        } else {
            None
        };
        if self.epoch_bytes + len64 > self.policy.hard_bytes {
            return Err(SendError::KeyExhausted(self.policy.hard_bytes));
        }
        let seq = self.next_seq;
        self.next_seq = seq.checked_add(1).ok_or(SendError::CounterExhausted)?;
        self.epoch_bytes += len64;
        self.total = total;
        self.hasher.update(frame.plaintext());
        self.last_pushed = last;
        Ok(Sent {
            key_update,
            chunk: ChunkJob {
                keys: Arc::clone(&self.epoch_keys),
                ad: chunk_ad(&self.transfer_id, self.epoch, seq, last),
                epoch: self.epoch,
                seq,
                last,
                frame,
            },
        })
    }

    /// The trailer's frame, once the last chunk was pushed; also returns the
    /// SHA-256 of the whole plaintext.
    pub fn trailer(&mut self) -> Result<(ReadyFrame, [u8; 32]), SendError> {
        if !self.last_pushed || self.digest.is_some() {
            return Err(SendError::Order);
        }
        let digest: [u8; 32] = std::mem::take(&mut self.hasher).finalize().into();
        self.digest = Some(digest);
        let mut plain = [0u8; 40];
        plain[..8].copy_from_slice(&self.total.to_be_bytes());
        plain[8..].copy_from_slice(&digest);
        let sealed = seal::seal(
            &self.trailer,
            &trailer_ad(&self.transfer_id, self.next_seq),
            &plain,
        );
        let record = TrailerRecord { sealed }.encode();
        let len = record.len();
        let frame = ReadyFrame::small(
            &Message::Trailer {
                transfer_id: self.transfer_id,
                record,
            },
            len,
        );
        Ok((frame, digest))
    }

    /// Checks the receiver's receipt against our own length and hash.
    pub fn check_receipt(&self, tag: &[u8]) -> Result<(), AuthError> {
        let digest = self.digest.ok_or(AuthError)?;
        mac::verify(
            &self.receipt,
            &[&receipt_input(&self.transfer_id, self.total, &digest)],
            tag,
        )
    }
}
