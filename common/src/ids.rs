//! Small identifier newtypes shared by the handshake and the stream.

use serde::{Deserialize, Serialize};
use std::fmt;

use crate::crypto::random_array;

/// A random 128-bit transfer identifier, fresh for every transfer.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TransferId(pub [u8; 16]);

impl TransferId {
    /// Draws a fresh random id.
    pub fn random() -> Self {
        Self(random_array())
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for TransferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for TransferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TransferId({self})")
    }
}

/// A random 128-bit stream identifier: the one upload of a transfer's data,
/// which every receiver of it shares (PROTOCOL.md §3.3). The records of the
/// stream are bound to it; each receiver's handshake has its own
/// [`TransferId`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StreamId(pub [u8; 16]);

impl StreamId {
    /// Draws a fresh random id.
    pub fn random() -> Self {
        Self(random_array())
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StreamId({self})")
    }
}

/// A random 256-bit nonce contributed by one side of a transfer.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Nonce(pub [u8; 32]);

impl Nonce {
    /// Draws a fresh random nonce.
    pub fn random() -> Self {
        Self(random_array())
    }
}
