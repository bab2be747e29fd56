//! The sender's stream: the stream root for each receiver, the manifest, the
//! chunking decisions and rekeying, the signed trailer, the receipts.
//!
//! Order: [`SendStream::root_for`] (once per receiver), then
//! [`SendStream::manifest`], then chunks ([`SendStream::push_frame`]), then
//! [`SendStream::trailer`]. Everything it produces is a [`ReadyFrame`]. Pushing
//! chunks is sequential (sequence numbers, offsets, rekeying, the hash of the
//! plaintext in order); the [`ChunkJob`] it returns may be sealed on another
//! thread, so several chunks can be sealed at once while their order stays fixed.

use std::sync::Arc;
use std::time::Instant;

use sha2::{Digest, Sha256};
use thiserror::Error;
use zeroize::Zeroize;

use super::frames::{ChunkJob, ReadyFrame};
use super::{MAX_RECEIVERS, RekeyPolicy};
use crate::crypto::aead::ChunkKey;
use crate::crypto::keys::{SessionKey, StreamRoot};
use crate::crypto::{AuthError, mac, random_array, seal};
use crate::encode::Encoder;
use crate::identity::{Fingerprint, Identity};
use crate::ids::StreamId;
use crate::name::AgentName;
use crate::schedule::{PairKeys, StreamKeys, derive_stream_keys};
use crate::wire::chunk::ChunkFrame;
use crate::wire::message::Message;
use crate::wire::record::{
    KeyUpdateRecord, MAX_CHUNK, MAX_MANIFEST, StreamCommitment, TrailerPlain, chunk_ad,
    encode_fixed, encode_sealed, key_update_ad, label, manifest_ad, manifest_hash, receipt_input,
    root_ad, stream_signed, trailer_ad,
};

/// Misuse of the sender's stream (by our own code, or a file that changed size).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SendError {
    /// A chunk would take the stream past the size declared in the offer.
    #[error("the data grew while it was being sent: more than the {declared} bytes announced")]
    Oversize {
        /// Size announced in the offer.
        declared: u64,
    },
    /// The last chunk does not bring the stream to the declared size.
    #[error("the data shrank while it was being sent: {sent} of {declared} bytes")]
    Undersize {
        /// Bytes sent.
        sent: u64,
        /// Size announced in the offer.
        declared: u64,
    },
    /// A chunk is empty (only the last may be) or larger than the maximum.
    #[error("invalid chunk length {0}")]
    ChunkLength(usize),
    /// Records out of order: chunks before the manifest, data after the last
    /// chunk, a trailer before it, a second manifest or trailer.
    #[error("stream used out of order")]
    Order,
    /// The manifest is larger than the protocol allows.
    #[error("the manifest is larger than {MAX_MANIFEST} bytes (too many or too long names)")]
    ManifestTooLarge,
    /// More receivers than one stream may have.
    #[error("more than {MAX_RECEIVERS} receivers for one stream")]
    TooManyReceivers,
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

/// What [`SendStream::push_frame`] produced: a key update to send first, if
/// the key rotated, then the chunk.
#[derive(Debug)]
pub struct Sent {
    /// The key update frame that must precede the chunk, if any.
    pub key_update: Option<ReadyFrame>,
    /// The chunk to seal and send.
    pub chunk: ChunkJob,
}

/// Where a stream's data starts: at 0, or (resuming) after a prefix the
/// receiver already holds verified, with the hash state of that prefix.
#[derive(Debug, Clone)]
pub struct StreamStart {
    /// Plaintext bytes before this stream's first chunk.
    pub offset: u64,
    /// SHA-256 of those bytes, not yet finalized.
    pub hasher: Sha256,
}

impl StreamStart {
    /// From the beginning.
    pub fn fresh() -> Self {
        Self {
            offset: 0,
            hasher: Sha256::new(),
        }
    }
}

/// The sender's side of one stream.
pub struct SendStream {
    stream_id: StreamId,
    policy: RekeyPolicy,
    root: StreamRoot,
    keys: StreamKeys,
    session: SessionKey,
    epoch: u32,
    epoch_key: Arc<ChunkKey>,
    epoch_started: Instant,
    epoch_bytes: u64,
    next_seq: u64,
    start: u64,
    total: u64,
    declared: u64,
    size_known: bool,
    hasher: Sha256,
    manifest_hash: Option<[u8; 32]>,
    last_pushed: bool,
    digest: Option<[u8; 32]>,
}

impl std::fmt::Debug for SendStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendStream")
            .field("stream_id", &self.stream_id)
            .field("epoch", &self.epoch)
            .field("next_seq", &self.next_seq)
            .field("total", &self.total)
            .finish_non_exhaustive()
    }
}

impl SendStream {
    /// Starts stream `stream_id` with a fresh root: `declared` bytes in all
    /// (exactly, or at most if `size_known` is false), its data starting at
    /// `start`; epoch 0 begins `now`.
    pub fn new(
        stream_id: StreamId,
        declared: u64,
        size_known: bool,
        start: StreamStart,
        policy: RekeyPolicy,
        now: Instant,
    ) -> Self {
        let root = StreamRoot::random();
        Self::with_root(root, stream_id, declared, size_known, start, policy, now)
    }

    /// [`Self::new`] with a given root instead of a fresh random one: for
    /// known-answer tests only. A root must never be used for two streams.
    #[doc(hidden)]
    pub fn with_root(
        root: StreamRoot,
        stream_id: StreamId,
        declared: u64,
        size_known: bool,
        start: StreamStart,
        policy: RekeyPolicy,
        now: Instant,
    ) -> Self {
        let keys = derive_stream_keys(&root, &stream_id);
        let session = SessionKey::from_bytes(*keys.epoch0.expose());
        let epoch_key = Arc::new(session.epoch_key(&stream_id, 0));
        Self {
            stream_id,
            policy,
            root,
            keys,
            session,
            epoch: 0,
            epoch_key,
            epoch_started: now,
            epoch_bytes: 0,
            next_seq: 0,
            start: start.offset,
            total: start.offset,
            declared,
            size_known,
            hasher: start.hasher,
            manifest_hash: None,
            last_pushed: false,
            digest: None,
        }
    }

    /// The stream's id.
    pub fn stream_id(&self) -> StreamId {
        self.stream_id
    }

    /// The current epoch.
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// How many session keys the stream has used so far (epochs + 1).
    pub fn session_keys(&self) -> u64 {
        u64::from(self.epoch) + 1
    }

    /// Plaintext bytes accepted so far, counted from the start of the data
    /// (a resumed stream starts at its offset).
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The declared size (exact, or the bound if the size is not known).
    pub fn declared(&self) -> u64 {
        self.declared
    }

    /// The stream root sealed for one receiver: its `Root` frame, the first
    /// thing that receiver gets on its data connection.
    pub fn root_for(&self, pair: &PairKeys) -> ReadyFrame {
        let sealed = seal::seal(
            &pair.root,
            &root_ad(&pair.transfer_id, &self.stream_id),
            self.root.expose(),
        );
        let record = encode_fixed(&sealed);
        let len = record.len();
        ReadyFrame::small(
            &Message::Root {
                transfer_id: pair.transfer_id,
                record,
            },
            len,
        )
    }

    /// The manifest's frame (before any chunk): `u64 start ‖ body`, sealed
    /// under the manifest keys.
    pub fn manifest(&mut self, body: &[u8]) -> Result<ReadyFrame, SendError> {
        if self.manifest_hash.is_some() {
            return Err(SendError::Order);
        }
        if body.len() > MAX_MANIFEST {
            return Err(SendError::ManifestTooLarge);
        }
        let mut plain = Encoder::default();
        plain.u64(self.start).fixed(body);
        let sealed = seal::seal(
            &self.keys.manifest,
            &manifest_ad(&self.stream_id),
            plain.as_slice(),
        );
        self.manifest_hash = Some(manifest_hash(body));
        let record = encode_sealed(&sealed);
        let len = record.len();
        Ok(ReadyFrame::small(
            &Message::Manifest {
                stream_id: self.stream_id,
                record,
            },
            len,
        ))
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
            &self.keys.wrap,
            &key_update_ad(&self.stream_id, epoch, first_seq),
            &fresh,
        );
        self.session = self.session.ratchet(&fresh, &self.stream_id, epoch);
        fresh.zeroize();
        // The previous epoch's keys are erased when the last job holding them is done.
        self.epoch_key = Arc::new(self.session.epoch_key(&self.stream_id, epoch));
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
                stream_id: self.stream_id,
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
        ChunkFrame::new(buf, &self.stream_id, plaintext_len)
            .map_err(|_| SendError::ChunkLength(plaintext_len))
    }

    /// Takes the next chunk, its plaintext in place in `frame`: checks it
    /// against the declared size, assigns its sequence number and offset,
    /// rotates the key if it is due, and hashes the plaintext. With a known
    /// size the last chunk must bring the data to it exactly (and the chunk
    /// that does must be the last); only a last chunk with nothing left may be
    /// empty.
    pub fn push_frame(
        &mut self,
        frame: ChunkFrame,
        last: bool,
        now: Instant,
    ) -> Result<Sent, SendError> {
        if self.manifest_hash.is_none() || self.last_pushed || frame.stream_id() != self.stream_id {
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
        if self.size_known {
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
        }
        if len == 0 && self.total != self.start && self.size_known {
            return Err(SendError::ChunkLength(0));
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
        let offset = self.total;
        self.epoch_bytes += len64;
        self.total = total;
        self.hasher.update(frame.plaintext());
        self.last_pushed = last;
        Ok(Sent {
            key_update,
            chunk: ChunkJob {
                key: Arc::clone(&self.epoch_key),
                ad: chunk_ad(&self.stream_id, self.epoch, seq, offset, last),
                epoch: self.epoch,
                seq,
                last,
                frame,
            },
        })
    }

    /// The trailer's frame, once the last chunk was pushed: the total and the
    /// SHA-256 of the whole data, and `identity`'s signature over what the
    /// stream commits to, for `receivers` (every receiver of the stream). Also
    /// returns the SHA-256.
    pub fn trailer(
        &mut self,
        identity: &Identity,
        receivers: &[(AgentName, Fingerprint)],
    ) -> Result<(ReadyFrame, [u8; 32]), SendError> {
        let Some(manifest) = self.manifest_hash else {
            return Err(SendError::Order);
        };
        if !self.last_pushed || self.digest.is_some() {
            return Err(SendError::Order);
        }
        if receivers.len() > MAX_RECEIVERS {
            return Err(SendError::TooManyReceivers);
        }
        let digest: [u8; 32] = std::mem::take(&mut self.hasher).finalize().into();
        self.digest = Some(digest);
        let signed = stream_signed(&StreamCommitment {
            stream_id: &self.stream_id,
            sender_fp: &identity.fingerprint(),
            total: self.total,
            sha256: &digest,
            chunks: self.next_seq,
            resume_from: self.start,
            manifest_hash: &manifest,
            receivers,
        });
        let plain = TrailerPlain {
            total: self.total,
            sha256: digest,
            signature: identity.sign(label::STREAM_SIGNATURE, &signed),
            receivers: receivers.to_vec(),
        };
        let sealed = seal::seal(
            &self.keys.trailer,
            &trailer_ad(&self.stream_id, self.next_seq, self.start),
            &plain.encode(),
        );
        let record = encode_sealed(&sealed);
        let len = record.len();
        let frame = ReadyFrame::small(
            &Message::Trailer {
                stream_id: self.stream_id,
                record,
            },
            len,
        );
        Ok((frame, digest))
    }

    /// The SHA-256 state of the plaintext pushed so far, serialized (for a
    /// resume to continue from it: PROTOCOL.md §6.4), and its digest.
    pub fn hash_mark(&self) -> (Vec<u8>, [u8; 32]) {
        (
            crate::hashstate::serialize(&self.hasher),
            self.hasher.clone().finalize().into(),
        )
    }

    /// Checks one receiver's receipt against our own length and hash.
    pub fn check_receipt(&self, pair: &PairKeys, tag: &[u8]) -> Result<(), AuthError> {
        let digest = self.digest.ok_or(AuthError)?;
        let input = receipt_input(&pair.transfer_id, &self.stream_id, self.total, &digest);
        mac::verify(&pair.receipt, &[&input], tag)
    }
}
