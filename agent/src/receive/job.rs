//! What the opening thread of a stream ([`super::store`]) is given — the
//! stream, what the verified terms promised, where files go, the channels to
//! the reading task — and what it gives back; and how each way it can fail
//! is worded for the sender (an `AbortReason`) and for the user.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64};

use keyferry_common::crypto::keys::MacKey;
use keyferry_common::handshake::Kind;
use keyferry_common::identity::PublicKey;
use keyferry_common::name::AgentName;
use keyferry_common::transfer::{RecvError, RecvStream};
use keyferry_common::wire::message::AbortReason;
use tokio::sync::mpsc;

use super::Failure;
use super::chatsink::ChatLink;
use super::consent::Consent;
use super::report::Placed;
use super::resume::Place;

/// A refused record, as the sender is told and the user reads it.
pub(crate) fn verification(e: RecvError) -> Failure {
    let reason = match e {
        RecvError::Aborted(reason) => reason,
        _ => AbortReason::VerificationFailed,
    };
    Failure::Failed(reason, e.to_string())
}

pub(super) fn policy(why: String) -> Failure {
    Failure::Failed(AbortReason::Policy, why)
}

/// The kept prefix did not hold: the transfer fails, and its staging
/// directory goes, so that the sender's next attempt starts from byte 0.
pub(super) fn damaged(check: Result<(), String>) -> Failure {
    let why = check.err().unwrap_or_default();
    Failure::Failed(
        AbortReason::PrefixDamaged,
        format!("the part kept from an earlier attempt did not hold ({why}); it was dropped"),
    )
}

pub(super) fn storage(e: std::io::Error) -> Failure {
    Failure::Failed(AbortReason::Storage, format!("cannot store the data: {e}"))
}

pub(super) fn storage_stdout(e: &std::io::Error) -> Failure {
    Failure::Failed(
        AbortReason::Storage,
        format!("cannot write to standard output: {e}"),
    )
}

/// The opening thread's ends of the channels: frame payloads in, empty
/// buffers back, and the count of verified plaintext bytes out (the stream's
/// progress).
pub(super) struct Pipe {
    pub payloads: mpsc::Receiver<Vec<u8>>,
    pub free: std::sync::mpsc::Sender<Vec<u8>>,
    pub progress: Arc<AtomicU64>,
    /// The session key in use (0 for the first), for the progress bar.
    pub epoch: Arc<AtomicU32>,
}

/// Why the opening thread stopped without a verified stream.
pub(super) enum Stopped {
    /// It refused something, or could not store it: the real cause.
    Failed(Failure),
    /// Its input ended: the reading task knows why.
    InputEnded,
}

/// What the opening thread is given: the stream, what the terms promised,
/// and where files go.
pub(super) struct Job {
    pub stream: RecvStream,
    pub want: Want,
    pub place: Option<Place>,
}

/// What the verified terms promised.
pub(super) struct Want {
    pub kind: Kind,
    pub declared: u64,
    pub size_known: bool,
    /// The journal key.
    pub key: Arc<MacKey>,
    /// Files go to standard output (`--stdout`: one file, no tree).
    pub stdout: bool,
    /// Apply the sender's modes and times (not with `--no-preserve`).
    pub preserve: bool,
    /// The user is asked once the manifest verified, before any data.
    pub consent: Option<Consent>,
    /// The receivers of the stream (more than one: another's user may be
    /// asked before the first byte).
    pub receivers: u32,
    /// Bytes the receiver already held (a resume: the sender's trailer may
    /// wait for its check of as many).
    pub resumed_from: u64,
    /// When the user was not asked because this resumes a transfer the user
    /// took: the manifest hash it must still have, whatever it resumes from.
    pub took: Option<[u8; 32]>,
    /// For a chat stream: where its records go, its sender, and the key
    /// that signs its lines.
    pub chat: Option<(ChatLink, AgentName, PublicKey)>,
}

/// A verified, stored transfer.
pub(super) struct Received {
    /// What it left, to report.
    pub placed: Placed,
    /// The receipt to send.
    pub receipt: [u8; 32],
}
