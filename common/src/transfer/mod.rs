//! The sender's and receiver's stream state machines (PROTOCOL.md §6), free of I/O.
//!
//! Both take and return bytes and typed errors; the caller owns sockets, files and
//! clocks (the current [`Instant`](std::time::Instant) is passed in). One door
//! each way, as rustls has it: the sender yields ready frames (key updates,
//! chunks and the trailer alike), and the receiver takes each frame payload as
//! it arrived ([`RecvStream::open`]) and says what it was, checking the
//! transfer id itself. The sender decides when a session key has expired and
//! emits key updates before the first chunk they govern; the receiver accepts
//! exactly the next record the protocol allows and nothing else.

mod expect;
pub mod frames;
mod outcome;
pub mod receiver;
pub mod sender;

use std::time::Duration;

pub use frames::{ChunkJob, ReadyFrame};
pub use receiver::{Expect, Opened, RecvError, RecvStream, Resume, TrailerVerified};
pub use sender::{SendError, SendStream, Sent, StreamStart};

/// Most receivers one stream may have (PROTOCOL.md §5.5).
pub const MAX_RECEIVERS: usize = crate::wire::record::MAX_TRAILER_RECEIVERS;

/// Default session-key lifetime.
pub const DEFAULT_REKEY_INTERVAL: Duration = Duration::from_secs(5);
/// Default backstop: rekey after this much plaintext under one key, whatever the time.
pub const DEFAULT_REKEY_BYTES: u64 = 1 << 30;
/// Default hard limit: never seal more than this much plaintext under one key.
pub const DEFAULT_KEY_HARD_LIMIT: u64 = 2 << 30;

/// When the sender rotates session keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RekeyPolicy {
    /// Rotate once the current key is this old (checked before each chunk).
    pub interval: Duration,
    /// Rotate before a chunk that would take the key past this many bytes.
    pub soft_bytes: u64,
    /// Refuse to seal a chunk that would take one key past this many bytes.
    pub hard_bytes: u64,
}

impl RekeyPolicy {
    /// The default limits with the given interval.
    pub fn with_interval(interval: Duration) -> Self {
        Self {
            interval,
            soft_bytes: DEFAULT_REKEY_BYTES,
            hard_bytes: DEFAULT_KEY_HARD_LIMIT,
        }
    }
}

impl Default for RekeyPolicy {
    fn default() -> Self {
        Self::with_interval(DEFAULT_REKEY_INTERVAL)
    }
}
