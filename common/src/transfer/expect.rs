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
    /// The SHA-256 state after them.
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
}

/// What the receiver itself counted of a stream, to hold its trailer to.
#[derive(Debug)]
pub(super) struct Seen<'a> {
    pub stream_id: &'a StreamId,
    pub total: u64,
    pub sha256: &'a [u8; 32],
    pub chunks: u64,
    pub resume_from: u64,
    pub manifest_hash: &'a [u8; 32],
}

impl Expect {
    /// Checks an opened trailer: its total and hash are what this receiver
    /// counted (and the declared size, if it was exact), it lists this
    /// receiver, and the sender's signature over the stream's commitment
    /// verifies.
    pub(super) fn check_trailer(&self, t: &TrailerPlain, seen: &Seen<'_>) -> Result<(), RecvError> {
        // The trailer is already authenticated and a hash is no secret: a plain
        // comparison is fine here.
        let exact = !self.size_known || t.total == self.declared;
        if t.total != seen.total || !exact || t.sha256 != *seen.sha256 {
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
