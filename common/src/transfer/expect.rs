//! What a receiver knows before its stream ([`Expect`]: from the verified
//! offer, its own identity, and what it offered to resume), and the check of
//! the trailer against it: the totals the receiver counted, and the sender's
//! signature over what the stream commits to, naming this receiver.

use sha2::Sha256;

use super::outcome::RecvError;
use crate::identity::{Fingerprint, PublicKey};
use crate::ids::StreamId;
use crate::name::AgentName;
use crate::wire::record::{StreamCommitment, TrailerPlain, label, stream_signed};

/// The prefix a receiver holds from an earlier attempt, as it offered it in
/// its accept.
#[derive(Debug, Clone)]
pub struct Resume {
    /// Plaintext bytes held verified.
    pub offset: u64,
    /// The SHA-256 state after them, as they were read back.
    pub hasher: Sha256,
    /// Hash of the manifest they belong to.
    pub manifest_hash: [u8; 32],
}

/// What the receiver knows before the stream: from the verified offer, its
/// own identity, and what it offered to resume.
#[derive(Debug, Clone)]
pub struct Expect {
    /// The declared size (exact, or the bound if not `size_known`).
    pub declared: u64,
    /// Whether `declared` is exact.
    pub size_known: bool,
    /// The prefix this receiver offered to resume from, if any.
    pub resume: Option<Resume>,
    /// The sender's key (the one its offer was verified with).
    pub sender: PublicKey,
    /// This receiver's name.
    pub me: AgentName,
    /// This receiver's key fingerprint.
    pub my_fp: Fingerprint,
    /// How many receivers the stream goes to, as the verified offer's terms
    /// say (PROTOCOL.md §3.3).
    pub receivers: u32,
    /// Take the sender's signed hash instead of hashing the data, for a
    /// stream to this receiver alone (see [`Self::hashes`]).
    pub trust_sender_hash: bool,
}

/// What the receiver itself counted of a stream, to hold its trailer to.
#[derive(Debug)]
pub(super) struct Seen<'a> {
    pub stream_id: &'a StreamId,
    pub total: u64,
    /// The receiver's own hash of the data, if it hashed it.
    pub sha256: Option<&'a [u8; 32]>,
    pub chunks: u64,
    pub resume_from: u64,
    pub manifest_hash: &'a [u8; 32],
}

impl Expect {
    /// Whether the receiver hashes the data itself and holds the trailer's
    /// hash to it (PROTOCOL.md §5.5): always, unless it was asked to trust
    /// the sender's hash and it is the stream's only receiver. Alone, it
    /// shares the stream keys with the sender only, so every chunk tag that
    /// verified says the sender sealed that chunk there, and the sender's
    /// signed hash is the hash of what the sender sealed (and says what the
    /// data is only as far as the sender is honest). With other receivers,
    /// any of them can seal chunks under the same keys: only its own hash,
    /// held to the signed one, tells the sender's data from a forgery.
    pub fn hashes(&self) -> bool {
        !(self.receivers == 1 && self.trust_sender_hash)
    }

    /// Checks an opened trailer: its total is what this receiver counted (and
    /// the declared size, if it was exact), its hash is the receiver's own
    /// (if it hashed) or it lists this receiver alone (if not), it lists this
    /// receiver, and the sender's signature over the stream's commitment
    /// verifies.
    pub(super) fn check_trailer(&self, t: &TrailerPlain, seen: &Seen<'_>) -> Result<(), RecvError> {
        // The trailer is already authenticated and a hash is no secret: a plain
        // comparison is fine here.
        let exact = !self.size_known || t.total == self.declared;
        let hash_holds = match seen.sha256 {
            Some(ours) => t.sha256 == *ours,
            None => t.receivers.len() == 1,
        };
        if t.total != seen.total || !exact || !hash_holds {
            return Err(RecvError::TrailerMismatch);
        }
        let listed = t
            .receivers
            .iter()
            .any(|(n, fp)| *n == self.me && *fp == self.my_fp);
        let signed = stream_signed(&StreamCommitment {
            stream_id: seen.stream_id,
            sender_fp: &self.sender.fingerprint(),
            total: t.total,
            sha256: &t.sha256,
            chunks: seen.chunks,
            resume_from: seen.resume_from,
            manifest_hash: seen.manifest_hash,
            receivers: &t.receivers,
        });
        let valid = self
            .sender
            .verify(label::STREAM_SIGNATURE, &signed, &t.signature)
            .is_ok();
        if !(listed && valid) {
            return Err(RecvError::Signature);
        }
        Ok(())
    }
}
