//! What the receiver's stream says about a record: why it refused it
//! ([`RecvError`]), or what it accepted ([`Opened`], [`TrailerVerified`]).

use thiserror::Error;

use crate::wire::message::AbortReason;
use crate::wire::record::MalformedRecord;

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
    /// The sender's signature over the stream did not verify, or does not
    /// list this receiver.
    #[error("the sender's signature over the stream does not verify for this receiver")]
    Signature,
    /// A chunk carries another epoch than the current one.
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
    /// A key update for an epoch that carried no chunk.
    #[error("key update #{epoch} for an epoch without a chunk")]
    EmptyEpoch {
        /// The epoch that would have started.
        epoch: u32,
    },
    /// A record after the last chunk (other than one trailer), or a second trailer.
    #[error("data after the end of the stream")]
    AfterEnd,
    /// A record before the one that must come first (root, then manifest).
    #[error("{0} before the stream's root and manifest")]
    Early(&'static str),
    /// The manifest starts the data at an offset this receiver did not offer,
    /// or resumes another manifest than the one it holds.
    #[error("the manifest resumes at byte {offered_by_sender}, not where this receiver stands")]
    BadResume {
        /// Where the sender says the data starts.
        offered_by_sender: u64,
    },
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
    /// A message of another transfer or stream.
    #[error("a message of another transfer in the stream")]
    OtherTransfer,
    /// A message that has no place in a stream.
    #[error("unexpected {0} message in the stream")]
    Unexpected(&'static str),
    /// The sender gave up and said why, or the broker said the sender is
    /// gone (unauthenticated: it ends the stream, it proves nothing).
    #[error("{}", aborted_text(*.0))]
    Aborted(AbortReason),
}

/// What an `Abort` that arrived in the stream tells the receiver's user.
fn aborted_text(r: AbortReason) -> String {
    match r {
        // The broker sends this one when the sender's connection ended.
        AbortReason::PeerGone => {
            "the sender's connection was lost (the broker reports it gone)".into()
        }
        AbortReason::Interrupted => "the sender was interrupted".into(),
        AbortReason::Source => {
            "the sender could not read what it was sending, or it changed meanwhile".into()
        }
        AbortReason::Timeout => "the sender or the broker gave up waiting".into(),
        AbortReason::Policy => {
            "the sender found no path it may take (its --direct setting against this \
             receiver's)"
                .into()
        }
        AbortReason::VerificationFailed => {
            "the sender refused this receiver's accept: it did not verify there (changed on \
             the way?)"
                .into()
        }
        other => format!("the sender aborted the transfer ({other:?})"),
    }
}

/// What one frame of the stream was, once [`RecvStream::open`] accepted it.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened<'a> {
    /// The stream root arrived: the stream keys are known.
    Root,
    /// The manifest: where the data starts, and the manifest's body (to be
    /// parsed and checked by the caller before any chunk is accepted).
    Manifest {
        /// The offset of the first byte of this stream's chunks.
        resume_from: u64,
        /// The manifest body.
        body: Vec<u8>,
    },
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
    /// SHA-256 of the whole plaintext: the receiver's own, or (if
    /// `own_hash` is false) the sender's signed one.
    pub sha256: [u8; 32],
    /// Whether `sha256` is the receiver's own hash of what it received.
    pub own_hash: bool,
    /// The receipt tag to send once the data is safely in place.
    pub receipt: [u8; 32],
}
