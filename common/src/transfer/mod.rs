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

use sha2::Sha256;
use sha2::digest::common::hazmat::SerializableState;

pub use frames::{ChunkJob, ReadyFrame};
pub use receiver::{Expect, Opened, RecvError, RecvStream, Resume, TrailerVerified};
pub use sender::{SendError, SendStream, Sent, StreamStart};

/// Most receivers one stream may have (PROTOCOL.md §5.5).
pub const MAX_RECEIVERS: usize = crate::wire::record::MAX_TRAILER_RECEIVERS;

/// The SHA-256 state after some prefix of the data, as bytes: what a
/// receiver's journal keeps so that a resumed transfer never hashes the
/// prefix again.
pub fn save_hasher(hasher: &Sha256) -> Vec<u8> {
    hasher.serialize().to_vec()
}

/// A state saved by [`save_hasher`]; `None` if the bytes are not one.
pub fn load_hasher(bytes: &[u8]) -> Option<Sha256> {
    let state = bytes.try_into().ok()?;
    Sha256::deserialize(state).ok()
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest as _;

    #[test]
    fn a_saved_hash_state_has_the_layout_protocol_md_gives_and_runs_on() {
        let h = Sha256::new().chain_update(b"abc");
        let saved = save_hasher(&h);
        assert_eq!(saved.len(), 104);
        // SHA-256's initial chaining words, little-endian; no block done yet.
        assert_eq!(saved[..4], 0x6a09_e667u32.to_le_bytes());
        assert_eq!(saved[28..32], 0x5be0_cd19u32.to_le_bytes());
        assert_eq!(saved[32..40], [0; 8]);
        assert_eq!(saved[40], 3);
        assert_eq!(&saved[41..44], b"abc");
        assert!(saved[44..].iter().all(|&b| b == 0));
        let back = load_hasher(&saved).unwrap();
        assert_eq!(
            back.chain_update(b"def").finalize(),
            Sha256::digest(b"abcdef")
        );
        assert!(load_hasher(&saved[..103]).is_none());
        let mut bad = saved.clone();
        bad[40] = 64;
        assert!(load_hasher(&bad).is_none());
    }
}
