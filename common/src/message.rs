//! The messages agents and the broker exchange, as serde types encoded with
//! postcard (PROTOCOL.md §2.2).
//!
//! Everything here is routing and framing; what must be authenticated travels
//! inside as hand-encoded bytes ([`crate::handshake`], [`crate::record`]) whose
//! signatures and tags never depend on serde. The first message on every
//! connection is [`Message::Hello`] with the protocol version, so a future change
//! can be refused cleanly. `tests::exact_bytes` pins the encoding of every variant.

use serde::{Deserialize, Serialize};

use crate::handshake::SignedOffer;
use crate::ids::TransferId;
use crate::name::AgentName;

/// Why a receiver refused an offer (sent back to the sender, unauthenticated).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefuseReason {
    /// Larger than the receiver's `--max-size`, or than its free space.
    TooLarge,
    /// The receiver is busy (too many concurrent transfers).
    Busy,
    /// The sender's key does not match the receiver's pin for it.
    KeyMismatch,
    /// The offer did not verify.
    VerificationFailed,
    /// The receiver's policy refused it (rate limit, bad name).
    Policy,
}

/// Why a transfer was abandoned mid-way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AbortReason {
    /// A record failed verification (deliberately indistinct).
    VerificationFailed,
    /// The receiver could not store the data (disk full, out dir not writable).
    Storage,
    /// The sender could not read its file, or it changed.
    Source,
    /// A deadline passed.
    Timeout,
    /// The user interrupted.
    Interrupted,
    /// The other side disconnected.
    PeerGone,
}

/// One message on a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// First message of every connection, in both directions.
    Hello {
        /// Protocol version.
        version: u16,
    },
    /// A sender's offer, addressed to an agent by name.
    Offer {
        /// Receiver's name (for routing; the signed body names it too).
        to: AgentName,
        /// The signed offer.
        offer: SignedOffer,
    },
    /// The receiver's accept: nonce, X25519 share and MAC (96 bytes).
    Accept {
        /// Transfer id.
        transfer_id: TransferId,
        /// The accept bytes.
        #[serde(with = "serde_bytes")]
        accept: Vec<u8>,
    },
    /// The receiver refuses an offer.
    Refuse {
        /// Transfer id.
        transfer_id: TransferId,
        /// Why.
        reason: RefuseReason,
    },
    /// A key update record.
    KeyUpdate {
        /// Transfer id.
        transfer_id: TransferId,
        /// The 108-byte record.
        #[serde(with = "serde_bytes")]
        record: Vec<u8>,
    },
    /// A chunk record.
    Chunk {
        /// Transfer id.
        transfer_id: TransferId,
        /// The record.
        #[serde(with = "serde_bytes")]
        record: Vec<u8>,
    },
    /// The trailer record.
    Trailer {
        /// Transfer id.
        transfer_id: TransferId,
        /// The 96-byte record.
        #[serde(with = "serde_bytes")]
        record: Vec<u8>,
    },
    /// The receiver's receipt tag.
    Receipt {
        /// Transfer id.
        transfer_id: TransferId,
        /// HMAC over transfer id, length and hash.
        tag: [u8; 32],
    },
    /// Either side abandons a transfer.
    Abort {
        /// Transfer id.
        transfer_id: TransferId,
        /// Why.
        reason: AbortReason,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_bytes() {
        // Changing any of these bytes changes the wire format: bump the version.
        let tid = TransferId([0xaa; 16]);
        let cases: Vec<(Message, Vec<u8>)> = vec![
            (Message::Hello { version: 1 }, vec![0, 1]),
            (
                Message::Offer {
                    to: AgentName::new("bob").unwrap(),
                    offer: SignedOffer {
                        body: vec![1, 2],
                        signature: vec![3],
                    },
                },
                vec![1, 3, b'b', b'o', b'b', 2, 1, 2, 1, 3],
            ),
            (
                Message::Accept {
                    transfer_id: tid,
                    accept: vec![9],
                },
                [vec![2], vec![0xaa; 16], vec![1, 9]].concat(),
            ),
            (
                Message::Refuse {
                    transfer_id: tid,
                    reason: RefuseReason::Busy,
                },
                [vec![3], vec![0xaa; 16], vec![1]].concat(),
            ),
            (
                Message::KeyUpdate {
                    transfer_id: tid,
                    record: vec![7, 7],
                },
                [vec![4], vec![0xaa; 16], vec![2, 7, 7]].concat(),
            ),
            (
                Message::Chunk {
                    transfer_id: tid,
                    record: vec![],
                },
                [vec![5], vec![0xaa; 16], vec![0]].concat(),
            ),
            (
                Message::Trailer {
                    transfer_id: tid,
                    record: vec![1],
                },
                [vec![6], vec![0xaa; 16], vec![1, 1]].concat(),
            ),
            (
                Message::Receipt {
                    transfer_id: tid,
                    tag: [5; 32],
                },
                [vec![7], vec![0xaa; 16], vec![5; 32]].concat(),
            ),
            (
                Message::Abort {
                    transfer_id: tid,
                    reason: AbortReason::PeerGone,
                },
                [vec![8], vec![0xaa; 16], vec![5]].concat(),
            ),
        ];
        for (msg, bytes) in cases {
            assert_eq!(postcard::to_stdvec(&msg).unwrap(), bytes, "{msg:?}");
            assert_eq!(postcard::from_bytes::<Message>(&bytes).unwrap(), msg);
        }
    }
}
