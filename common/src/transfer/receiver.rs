//! The receiver's stream: accepts exactly the next record the protocol allows.
//!
//! Order: `(KEY_UPDATE | CHUNK)* CHUNK(last) TRAILER`. A chunk must carry the
//! current epoch and the next sequence number, and its tag is checked (in
//! constant time, before decryption) under the current epoch's keys. A key update
//! is accepted only for exactly the next epoch at exactly the next sequence
//! number; the retired keys are erased at once. The bytes may never exceed the
//! size declared in the offer, and the last chunk must reach it exactly.

use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::crypto::keys::{MacKey, SealKeys, SessionKey};
use crate::crypto::{mac, seal};
use crate::ids::TransferId;
use crate::schedule::StreamKeys;
use crate::wire::chunk::chunk_record;
use crate::wire::message::{AbortReason, Message, decode_payload};
use crate::wire::record::{
    CHUNK_HEADER_LEN, ChunkRecord, KEY_UPDATE_CT_LEN, KeyUpdateRecord, MAX_CHUNK,
    MAX_CHUNK_CIPHERTEXT, MalformedRecord, TRAILER_CT_LEN, TrailerRecord, chunk_ad, key_update_ad,
    receipt_input, trailer_ad,
};

/// Why the receiver refused a record. Peers are only ever told "verification
/// failed"; the detail is for the local user and the tests.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RecvError {
    /// The record does not have its type's shape.
    #[error(transparent)]
    Malformed(#[from] MalformedRecord),
    /// A tag (or the padding behind a valid tag) did not verify.
    #[error("authentication failed: the data was altered or does not belong to this transfer")]
    Auth,
    /// A chunk carries another epoch than the current one: a retired key, or a
    /// key update that never arrived.
    #[error("chunk of epoch {got} while epoch {expected} is current")]
    WrongEpoch {
        /// Current epoch.
        expected: u32,
        /// Epoch in the chunk.
        got: u32,
    },
    /// A record out of sequence: replayed, reordered, duplicated or after a gap.
    #[error("record out of sequence: expected #{expected}, got #{got}")]
    OutOfOrder {
        /// Next sequence number expected.
        expected: u64,
        /// Sequence number in the record.
        got: u64,
    },
    /// A key update for anything but exactly the next epoch.
    #[error("key update for epoch {got} while epoch {expected} was due")]
    BadKeyUpdate {
        /// The epoch that would come next.
        expected: u32,
        /// Epoch in the update.
        got: u32,
    },
    /// More bytes than the offer declared, or a last chunk short of it.
    #[error("stream length does not match the {declared} bytes declared in the offer")]
    Length {
        /// Size declared in the offer.
        declared: u64,
    },
    /// An empty chunk that is not the last one.
    #[error("empty chunk before the end of the stream")]
    EmptyChunk,
    /// A key update for an epoch that carried no chunk (before the first
    /// chunk, or right after another key update).
    #[error("key update #{epoch} for an epoch without a chunk")]
    EmptyEpoch {
        /// The epoch that would have started.
        epoch: u32,
    },
    /// A record after the last chunk (other than one trailer), or a second trailer.
    #[error("data after the end of the stream")]
    AfterEnd,
    /// A trailer before the last chunk.
    #[error("trailer before the last chunk")]
    EarlyTrailer,
    /// The trailer's length or hash differs from what was received.
    #[error("the received data does not match the sender's length and SHA-256")]
    TrailerMismatch,
    /// The stream ended before the last chunk and a verified trailer.
    #[error("the stream ended before the transfer was complete")]
    Truncated,
    /// A frame payload that is not one well-formed message.
    #[error("a frame in the stream is not a well-formed message")]
    NotAMessage,
    /// A message of another transfer.
    #[error("a message of another transfer in the stream")]
    OtherTransfer,
    /// A message that has no place in a stream.
    #[error("unexpected {0} message in the stream")]
    Unexpected(&'static str),
    /// The sender gave up and said why (unauthenticated: it ends the stream,
    /// it proves nothing).
    #[error("the sender aborted the transfer ({0:?})")]
    Aborted(AbortReason),
}

/// What one frame of the stream was, once [`RecvStream::open`] accepted it.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened<'a> {
    /// A chunk's verified plaintext (inside the payload it arrived in), and
    /// whether it was the last chunk.
    Chunk {
        /// The plaintext.
        plaintext: &'a [u8],
        /// Whether this was the final chunk.
        last: bool,
    },
    /// A key update: the stream is now in this epoch.
    KeyUpdate(u32),
    /// The verified trailer: the stream is complete.
    Trailer(TrailerVerified),
}

/// The verified end of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrailerVerified {
    /// Total plaintext bytes.
    pub total: u64,
    /// SHA-256 of the whole plaintext.
    pub sha256: [u8; 32],
    /// The receipt tag to send once the file is safely in place.
    pub receipt: [u8; 32],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Streaming,
    LastChunkSeen,
    Done,
    Failed,
}

/// The receiver's side of one transfer's stream.
pub struct RecvStream {
    transfer_id: TransferId,
    wrap: SealKeys,
    trailer: SealKeys,
    receipt: MacKey,
    session: SessionKey,
    epoch: u32,
    epoch_keys: SealKeys,
    /// Sequence number of the current epoch's first chunk.
    epoch_first_seq: u64,
    next_seq: u64,
    total: u64,
    declared: u64,
    hasher: Sha256,
    state: State,
}

impl std::fmt::Debug for RecvStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvStream")
            .field("transfer_id", &self.transfer_id)
            .field("epoch", &self.epoch)
            .field("next_seq", &self.next_seq)
            .field("total", &self.total)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl RecvStream {
    /// Starts receiving a transfer that declared `declared` bytes.
    pub fn new(keys: StreamKeys, declared: u64) -> Self {
        let StreamKeys {
            transfer_id,
            wrap,
            epoch0,
            trailer,
            receipt,
        } = keys;
        Self {
            epoch_keys: epoch0.epoch_keys(&transfer_id, 0),
            transfer_id,
            wrap,
            trailer,
            receipt,
            session: epoch0,
            epoch: 0,
            epoch_first_seq: 0,
            next_seq: 0,
            total: 0,
            declared,
            hasher: Sha256::new(),
            state: State::Streaming,
        }
    }

    /// The current epoch.
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// Plaintext bytes received and verified so far.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Runs `step`; any error poisons the stream so nothing is accepted after it.
    fn guarded<T>(
        &mut self,
        step: impl FnOnce(&mut Self) -> Result<T, RecvError>,
    ) -> Result<T, RecvError> {
        if self.state == State::Failed {
            return Err(RecvError::AfterEnd);
        }
        let result = step(self);
        if result.is_err() {
            self.state = State::Failed;
        }
        result
    }

    /// The one door: takes the payload of the next frame of the data
    /// connection as it arrived, checks that it is a key update, chunk or
    /// trailer of this transfer, and opens it (a chunk where it lies). A
    /// sender's `Abort` ends the stream as [`RecvError::Aborted`].
    pub fn open<'a>(&mut self, payload: &'a mut [u8]) -> Result<Opened<'a>, RecvError> {
        if self.state == State::Failed {
            return Err(RecvError::AfterEnd);
        }
        // The fast path: a chunk in its shortest encoding, opened in place.
        if let Some((transfer_id, at)) = chunk_record(payload) {
            if transfer_id != self.transfer_id {
                return self.fail(RecvError::OtherTransfer);
            }
            let (plaintext, last) = self.open_chunk_in_place(&mut payload[at..])?;
            return Ok(Opened::Chunk { plaintext, last });
        }
        let msg = match decode_payload(payload) {
            Ok(msg) => msg,
            Err(_) => return self.fail(RecvError::NotAMessage),
        };
        match msg {
            Message::KeyUpdate {
                transfer_id,
                record,
            } if transfer_id == self.transfer_id => {
                self.open_key_update(&record).map(Opened::KeyUpdate)
            }
            Message::Trailer {
                transfer_id,
                record,
            } if transfer_id == self.transfer_id => self.open_trailer(&record).map(Opened::Trailer),
            // A chunk in a non-shortest encoding (postcard accepts those):
            // opened from its own copy, the plaintext put back where the
            // payload was.
            Message::Chunk {
                transfer_id,
                mut record,
            } if transfer_id == self.transfer_id => {
                let (plain, last) = self.open_chunk_in_place(&mut record)?;
                let len = plain.len();
                payload[..len].copy_from_slice(plain);
                Ok(Opened::Chunk {
                    plaintext: &payload[..len],
                    last,
                })
            }
            Message::Abort {
                transfer_id,
                reason,
            } if transfer_id == self.transfer_id => self.fail(RecvError::Aborted(reason)),
            Message::KeyUpdate { .. }
            | Message::Trailer { .. }
            | Message::Chunk { .. }
            | Message::Abort { .. } => self.fail(RecvError::OtherTransfer),
            other => self.fail(RecvError::Unexpected(other.kind())),
        }
    }

    /// Poisons the stream with `e`.
    fn fail<T>(&mut self, e: RecvError) -> Result<T, RecvError> {
        self.state = State::Failed;
        Err(e)
    }

    /// Whether a verified trailer ended the stream.
    pub fn is_complete(&self) -> bool {
        self.state == State::Done
    }

    /// Opens a key-update record; returns the new epoch.
    pub fn open_key_update(&mut self, bytes: &[u8]) -> Result<u32, RecvError> {
        self.guarded(|s| {
            if s.state != State::Streaming {
                return Err(RecvError::AfterEnd);
            }
            let ku = KeyUpdateRecord::parse(bytes)?;
            let expected = s.epoch.checked_add(1).ok_or(RecvError::BadKeyUpdate {
                expected: s.epoch,
                got: ku.epoch,
            })?;
            if ku.epoch != expected {
                return Err(RecvError::BadKeyUpdate {
                    expected,
                    got: ku.epoch,
                });
            }
            if ku.first_seq != s.next_seq {
                return Err(RecvError::OutOfOrder {
                    expected: s.next_seq,
                    got: ku.first_seq,
                });
            }
            // Every epoch carries at least one chunk (the sender's own rule):
            // key updates alone never make a stream look alive.
            if s.next_seq == s.epoch_first_seq {
                return Err(RecvError::EmptyEpoch { epoch: expected });
            }
            let ad = key_update_ad(&s.transfer_id, expected, s.next_seq);
            let fresh = zeroize::Zeroizing::new(
                seal::open(
                    &s.wrap,
                    &ad,
                    &ku.sealed.iv,
                    &ku.sealed.ciphertext,
                    &ku.sealed.tag,
                    KEY_UPDATE_CT_LEN,
                )
                .map_err(|_| RecvError::Auth)?,
            );
            let fresh: &[u8; 32] = fresh.as_slice().try_into().map_err(|_| RecvError::Auth)?;
            // Assigning drops (and so erases) the retired session and epoch keys.
            s.session = s.session.ratchet(fresh, &s.transfer_id, expected);
            s.epoch_keys = s.session.epoch_keys(&s.transfer_id, expected);
            s.epoch = expected;
            s.epoch_first_seq = s.next_seq;
            Ok(expected)
        })
    }

    /// Opens a chunk record; returns its plaintext and whether it was the last.
    /// A copying form of [`Self::open_chunk_in_place`].
    pub fn open_chunk(&mut self, bytes: &[u8]) -> Result<(Vec<u8>, bool), RecvError> {
        let mut record = bytes.to_vec();
        let (plain, last) = self.open_chunk_in_place(&mut record)?;
        let len = plain.len();
        record.copy_within(CHUNK_HEADER_LEN..CHUNK_HEADER_LEN + len, 0);
        record.truncate(len);
        Ok((record, last))
    }

    /// Opens a chunk record where it lies: checks order, epoch, length and tag,
    /// then decrypts the ciphertext in place; returns the plaintext (inside
    /// `bytes`) and whether it was the last chunk. After an error the bytes are
    /// unspecified and the stream is dead.
    pub fn open_chunk_in_place<'a>(
        &mut self,
        bytes: &'a mut [u8],
    ) -> Result<(&'a [u8], bool), RecvError> {
        self.guarded(|s| {
            if s.state != State::Streaming {
                return Err(RecvError::AfterEnd);
            }
            let rec = ChunkRecord::parse(bytes)?;
            if rec.epoch != s.epoch {
                return Err(RecvError::WrongEpoch {
                    expected: s.epoch,
                    got: rec.epoch,
                });
            }
            if rec.seq != s.next_seq {
                return Err(RecvError::OutOfOrder {
                    expected: s.next_seq,
                    got: rec.seq,
                });
            }
            // A chunk can never hold more than what is left of the declared size.
            let left = s.declared - s.total;
            if (rec.ciphertext.len() as u64) > left + 16 {
                return Err(RecvError::Length {
                    declared: s.declared,
                });
            }
            let ad = chunk_ad(&s.transfer_id, s.epoch, s.next_seq, rec.last);
            let plain = seal::open_in_place(
                &s.epoch_keys,
                &ad,
                &rec.iv,
                rec.ciphertext,
                rec.tag,
                MAX_CHUNK_CIPHERTEXT,
            )
            .map_err(|_| RecvError::Auth)?;
            let len = plain.len() as u64;
            // The chunk that reaches the declared size is the last one, and
            // only a last one may: a file of k full chunks is k chunks, and
            // only an empty file ends with an empty chunk.
            if plain.len() > MAX_CHUNK || len > left || rec.last != (len == left) {
                return Err(RecvError::Length {
                    declared: s.declared,
                });
            }
            if plain.is_empty() && !rec.last {
                return Err(RecvError::EmptyChunk);
            }
            s.next_seq = s.next_seq.checked_add(1).ok_or(RecvError::OutOfOrder {
                expected: s.next_seq,
                got: rec.seq,
            })?;
            s.total += len;
            s.hasher.update(plain);
            if rec.last {
                s.state = State::LastChunkSeen;
            }
            Ok((plain, rec.last))
        })
    }

    /// Opens the trailer and checks length and hash against what was received.
    pub fn open_trailer(&mut self, bytes: &[u8]) -> Result<TrailerVerified, RecvError> {
        self.guarded(|s| {
            match s.state {
                State::LastChunkSeen => {}
                State::Streaming => return Err(RecvError::EarlyTrailer),
                State::Done | State::Failed => return Err(RecvError::AfterEnd),
            }
            let t = TrailerRecord::parse(bytes)?;
            let plain = seal::open(
                &s.trailer,
                &trailer_ad(&s.transfer_id, s.next_seq),
                &t.sealed.iv,
                &t.sealed.ciphertext,
                &t.sealed.tag,
                TRAILER_CT_LEN,
            )
            .map_err(|_| RecvError::Auth)?;
            if plain.len() != 40 {
                return Err(RecvError::Auth);
            }
            let mut total = [0u8; 8];
            total.copy_from_slice(&plain[..8]);
            let total = u64::from_be_bytes(total);
            let ours: [u8; 32] = std::mem::take(&mut s.hasher).finalize().into();
            // The trailer is already authenticated and a hash is no secret: a plain
            // comparison is fine here.
            if total != s.total || total != s.declared || plain[8..] != ours {
                return Err(RecvError::TrailerMismatch);
            }
            s.state = State::Done;
            Ok(TrailerVerified {
                total,
                sha256: ours,
                receipt: mac::tag(&s.receipt, &[&receipt_input(&s.transfer_id, total, &ours)]),
            })
        })
    }

    /// Called when the peer's stream ended: an error unless a trailer verified.
    pub fn end_of_stream(&self) -> Result<(), RecvError> {
        match self.state {
            State::Done => Ok(()),
            _ => Err(RecvError::Truncated),
        }
    }
}
