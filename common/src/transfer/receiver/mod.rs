//! The receiver's stream: accepts exactly the next record the protocol allows.
//!
//! Order: `ROOT MANIFEST (KEY_UPDATE | CHUNK)* CHUNK(last) TRAILER`. The root
//! (sealed for this receiver under its pair keys) gives the stream keys; the
//! manifest says where the data starts (0, or the offset this receiver said it
//! holds) and what it is. A chunk must carry the current epoch, the next
//! sequence number and its absolute offset; its GCM tag is checked (in
//! constant time, before any plaintext is used) under the current epoch's key. A key
//! update is accepted only for exactly the next epoch at exactly the next
//! sequence number, after a chunk of the current epoch; the retired keys are
//! erased at once. The bytes may never exceed the declared size, and with a
//! known size the last chunk must reach it exactly. The trailer must carry the
//! sender's valid signature over what the stream commits to, listing this
//! receiver, before it counts. The data is hashed here and held to the
//! trailer's hash, unless the receiver takes the sender's signed hash for a
//! stream to it alone ([`Expect::hashes`]).

use sha2::{Digest, Sha256};

mod head;

use super::expect::Seen;
pub use super::expect::{Expect, Resume};
pub use super::outcome::{Opened, RecvError, TrailerVerified};
use crate::crypto::aead::{self, ChunkKey};
use crate::crypto::keys::SessionKey;
use crate::crypto::{mac, seal};
use crate::schedule::{PairKeys, StreamKeys};
use crate::wire::chunk::chunk_record;
use crate::wire::message::{Message, decode_payload};
use crate::wire::record::{
    CHUNK_HEADER_LEN, ChunkRecord, KEY_CT_LEN, KeyUpdateRecord, MAX_CHUNK, MAX_TRAILER_PLAIN,
    TrailerPlain, chunk_ad, key_update_ad, parse_sealed, receipt_input, trailer_ad,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitRoot,
    AwaitManifest,
    Streaming,
    LastChunkSeen,
    Done,
    Failed,
}

/// The keys of the current epoch, once the root arrived.
struct Live {
    keys: StreamKeys,
    session: SessionKey,
    epoch_key: ChunkKey,
}

/// The receiver's side of one transfer's stream.
pub struct RecvStream {
    pair: PairKeys,
    expect: Expect,
    live: Option<Live>,
    epoch: u32,
    /// Sequence number of the current epoch's first chunk.
    epoch_first_seq: u64,
    next_seq: u64,
    start: u64,
    total: u64,
    manifest_hash: [u8; 32],
    /// The receiver's own hash of the data, unless it takes the sender's
    /// ([`Expect::hashes`]).
    hasher: Option<Sha256>,
    state: State,
}

impl std::fmt::Debug for RecvStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvStream")
            .field("transfer_id", &self.pair.transfer_id)
            .field("epoch", &self.epoch)
            .field("next_seq", &self.next_seq)
            .field("total", &self.total)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl RecvStream {
    /// Starts receiving the stream of `pair`'s transfer.
    pub fn new(pair: PairKeys, expect: Expect) -> Self {
        let hasher = expect.hashes().then(Sha256::new);
        Self {
            pair,
            expect,
            live: None,
            epoch: 0,
            epoch_first_seq: 0,
            next_seq: 0,
            start: 0,
            total: 0,
            manifest_hash: [0; 32],
            hasher,
            state: State::AwaitRoot,
        }
    }

    /// The SHA-256 state of the data verified so far (from byte 0),
    /// serialized, and its digest; `None` for a receiver that takes the
    /// sender's hash and keeps none.
    pub fn hash_mark(&self) -> Option<(Vec<u8>, [u8; 32])> {
        self.hasher
            .as_ref()
            .map(|h| (crate::hashstate::serialize(h), h.clone().finalize().into()))
    }

    /// The stream's id.
    pub fn stream_id(&self) -> crate::ids::StreamId {
        self.pair.stream_id
    }

    /// The transfer this stream belongs to.
    pub fn transfer_id(&self) -> crate::ids::TransferId {
        self.pair.transfer_id
    }

    /// The current epoch.
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// Plaintext bytes held verified, counted from the start of the data (so a
    /// resumed stream starts at its offset).
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Where this stream's chunks started (0, or the resumed offset).
    pub fn resumed_from(&self) -> u64 {
        self.start
    }

    /// The hash of the manifest (zero before it arrived).
    pub fn manifest_hash(&self) -> [u8; 32] {
        self.manifest_hash
    }

    /// Whether a verified trailer ended the stream.
    pub fn is_complete(&self) -> bool {
        self.state == State::Done
    }

    fn fail<T>(&mut self, e: RecvError) -> Result<T, RecvError> {
        self.state = State::Failed;
        Err(e)
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
    /// connection as it arrived, checks that it is a record of this transfer
    /// and stream, and opens it (a chunk where it lies). A sender's `Abort`
    /// ends the stream as [`RecvError::Aborted`].
    pub fn open<'a>(&mut self, payload: &'a mut [u8]) -> Result<Opened<'a>, RecvError> {
        if self.state == State::Failed {
            return Err(RecvError::AfterEnd);
        }
        let (tid, sid) = (self.pair.transfer_id, self.pair.stream_id);
        // The fast path: a chunk in its shortest encoding, opened in place.
        if let Some((stream_id, at)) = chunk_record(payload) {
            if stream_id != sid {
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
            Message::Root {
                transfer_id,
                record,
            } if transfer_id == tid => self.open_root(&record).map(|()| Opened::Root),
            Message::Manifest { stream_id, record } if stream_id == sid => self
                .open_manifest(&record)
                .map(|(resume_from, body)| Opened::Manifest { resume_from, body }),
            Message::KeyUpdate { stream_id, record } if stream_id == sid => {
                self.open_key_update(&record).map(Opened::KeyUpdate)
            }
            Message::Trailer { stream_id, record } if stream_id == sid => {
                self.open_trailer(&record).map(Opened::Trailer)
            }
            // A chunk in a non-shortest encoding (postcard accepts those):
            // opened from its own copy, the plaintext put back where the
            // payload was.
            Message::Chunk {
                stream_id,
                mut record,
            } if stream_id == sid => {
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
            } if transfer_id == tid => self.fail(RecvError::Aborted(reason)),
            Message::Root { .. }
            | Message::Manifest { .. }
            | Message::KeyUpdate { .. }
            | Message::Trailer { .. }
            | Message::Chunk { .. }
            | Message::Abort { .. } => self.fail(RecvError::OtherTransfer),
            other => self.fail(RecvError::Unexpected(other.kind())),
        }
    }

    /// Opens a key-update record; returns the new epoch.
    pub fn open_key_update(&mut self, bytes: &[u8]) -> Result<u32, RecvError> {
        self.guarded(|s| {
            match s.state {
                State::Streaming => {}
                State::AwaitRoot | State::AwaitManifest => {
                    return Err(RecvError::Early("key update"));
                }
                _ => return Err(RecvError::AfterEnd),
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
            let sid = s.pair.stream_id;
            let live = s.live.as_mut().ok_or(RecvError::Early("key update"))?;
            let ad = key_update_ad(&sid, expected, s.next_seq);
            let fresh = zeroize::Zeroizing::new(
                seal::open(
                    &live.keys.wrap,
                    &ad,
                    &ku.sealed.iv,
                    &ku.sealed.ciphertext,
                    &ku.sealed.tag,
                    KEY_CT_LEN,
                )
                .map_err(|_| RecvError::Auth)?,
            );
            let fresh: &[u8; 32] = fresh.as_slice().try_into().map_err(|_| RecvError::Auth)?;
            // Assigning drops (and so erases) the retired session and epoch keys.
            live.session = live.session.ratchet(fresh, &sid, expected);
            live.epoch_key = live.session.epoch_key(&sid, expected);
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
            match s.state {
                State::Streaming => {}
                State::AwaitRoot | State::AwaitManifest => return Err(RecvError::Early("chunk")),
                _ => return Err(RecvError::AfterEnd),
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
            let declared = s.expect.declared;
            // A chunk can never hold more than what is left of the declared
            // size (GCM keeps the length, so this needs no decryption).
            let left = declared - s.total;
            let len = rec.ciphertext.len() as u64;
            if len > left {
                return Err(RecvError::Length { declared });
            }
            let live = s.live.as_ref().ok_or(RecvError::Early("chunk"))?;
            let ad = chunk_ad(&s.pair.stream_id, s.epoch, s.next_seq, s.total, rec.last);
            let nonce = aead::chunk_nonce(s.epoch, s.next_seq);
            let plain = aead::open_in_place(&live.epoch_key, &nonce, &ad, rec.ciphertext, rec.tag)
                .map_err(|_| RecvError::Auth)?;
            // With a known size, the chunk that reaches it is the last one,
            // and only a last one may: a file of k full chunks is k chunks.
            // Checked on the verified flag, so a flipped flag is an
            // authentication failure, not a length error.
            let ends_right = !s.expect.size_known || rec.last == (len == left);
            if plain.len() > MAX_CHUNK || !ends_right {
                return Err(RecvError::Length { declared });
            }
            if plain.is_empty() && !rec.last {
                return Err(RecvError::EmptyChunk);
            }
            s.next_seq = s.next_seq.checked_add(1).ok_or(RecvError::OutOfOrder {
                expected: s.next_seq,
                got: rec.seq,
            })?;
            s.total += len;
            if let Some(hasher) = &mut s.hasher {
                hasher.update(plain);
            }
            if rec.last {
                s.state = State::LastChunkSeen;
            }
            Ok((plain, rec.last))
        })
    }

    /// Opens the trailer: checks length and hash against what was received,
    /// and the sender's signature over what the stream commits to, which must
    /// list this receiver.
    pub fn open_trailer(&mut self, bytes: &[u8]) -> Result<TrailerVerified, RecvError> {
        self.guarded(|s| {
            match s.state {
                State::LastChunkSeen => {}
                State::AwaitRoot | State::AwaitManifest | State::Streaming => {
                    return Err(RecvError::EarlyTrailer);
                }
                State::Done | State::Failed => return Err(RecvError::AfterEnd),
            }
            let live = s.live.as_ref().ok_or(RecvError::EarlyTrailer)?;
            let sealed = parse_sealed(bytes, MAX_TRAILER_PLAIN + 16, "trailer")?;
            let plain = seal::open(
                &live.keys.trailer,
                &trailer_ad(&s.pair.stream_id, s.next_seq, s.start),
                &sealed.iv,
                &sealed.ciphertext,
                &sealed.tag,
                MAX_TRAILER_PLAIN + 16,
            )
            .map_err(|_| RecvError::Auth)?;
            let t = TrailerPlain::parse(&plain)?;
            let ours: Option<[u8; 32]> = s.hasher.take().map(|h| h.finalize().into());
            let seen = Seen {
                stream_id: &s.pair.stream_id,
                total: s.total,
                sha256: ours.as_ref(),
                chunks: s.next_seq,
                resume_from: s.start,
                manifest_hash: &s.manifest_hash,
            };
            s.expect.check_trailer(&t, &seen)?;
            s.state = State::Done;
            let own_hash = ours.is_some();
            let sha256 = ours.unwrap_or(t.sha256);
            let input = receipt_input(&s.pair.transfer_id, &s.pair.stream_id, t.total, &sha256);
            Ok(TrailerVerified {
                total: t.total,
                sha256,
                own_hash,
                receipt: mac::tag(&s.pair.receipt, &[&input]),
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
