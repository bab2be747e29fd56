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

/// What an authenticated connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Sends one transfer (and may look up peers and list who is online).
    Sender,
    /// The one long-lived control connection of a receiving agent.
    Receiver,
    /// A receiver's data connection for one transfer: it carries the accept, then the stream.
    Data,
}

impl Role {
    /// The role's byte in the authentication signature (PROTOCOL.md §2.4).
    pub fn code(self) -> u8 {
        match self {
            Self::Sender => 1,
            Self::Receiver => 2,
            Self::Data => 3,
        }
    }
}

/// What the broker tells an agent when it refuses something.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The agent speaks another protocol version.
    Version,
    /// The authentication signature did not verify.
    AuthFailed,
    /// The name is bound to another key.
    NameTaken,
    /// A receiver with this name is already connected.
    ReceiverConnected,
    /// No agent of that name has ever registered.
    UnknownPeer,
    /// The peer has registered but no receiver of that name is connected.
    PeerOffline,
    /// No such transfer (or not yours).
    UnknownTransfer,
    /// Too many requests, offers or connections.
    RateLimited,
    /// A message out of order or malformed.
    Protocol,
    /// Refused by the broker's access policy.
    Policy,
}

/// One entry of the broker's list of online agents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnlineAgent {
    /// The agent's name.
    pub name: AgentName,
    /// Whether a receiver of that name is connected.
    pub receiving: bool,
    /// Transfers in progress to that receiver.
    pub incoming: u32,
    /// Sender connections of that name.
    pub senders: u32,
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
    /// Broker → agent after `Hello`: the nonce the agent must sign.
    Challenge {
        /// Fresh random nonce.
        nonce: [u8; 32],
    },
    /// Agent → broker: who it is and what the connection is for.
    Auth {
        /// The agent's name.
        name: AgentName,
        /// The connection's role.
        role: Role,
        /// The agent's public key (SubjectPublicKeyInfo DER).
        #[serde(with = "serde_bytes")]
        spki: Vec<u8>,
        /// RSA-PSS over the authentication input (PROTOCOL.md §2.4).
        #[serde(with = "serde_bytes")]
        signature: Vec<u8>,
    },
    /// Broker → agent: authenticated.
    Welcome,
    /// Broker → agent: a refusal; the broker may close the connection after it.
    Error {
        /// What went wrong.
        code: ErrorCode,
        /// Human-readable detail (no secrets).
        detail: String,
    },
    /// Sender → broker: the public key of a peer.
    Lookup {
        /// The peer's name.
        name: AgentName,
    },
    /// Broker → sender: a peer's public key, as registered.
    PeerKey {
        /// The peer's name.
        name: AgentName,
        /// Its SubjectPublicKeyInfo DER.
        #[serde(with = "serde_bytes")]
        spki: Vec<u8>,
    },
    /// Broker → receiver: an offer from an authenticated sender.
    Offered {
        /// The authenticated name of the offering connection.
        from: AgentName,
        /// The sender's registered key (SubjectPublicKeyInfo DER).
        #[serde(with = "serde_bytes")]
        spki: Vec<u8>,
        /// The signed offer, as the sender sent it.
        offer: SignedOffer,
    },
    /// Agent → broker: who is online?
    List,
    /// Broker → agent: who is online.
    Online {
        /// One entry per name with a connection.
        agents: Vec<OnlineAgent>,
    },
    /// Broker → sender and receiver of an accepted transfer (over TLS): the
    /// one-time secret that admits a plain data connection for it.
    Ticket {
        /// Transfer id.
        transfer_id: TransferId,
        /// 32 random bytes, valid once and only for a short time.
        ticket: [u8; 32],
    },
    /// Agent → broker: the first message of a plain data connection.
    Redeem {
        /// Transfer id.
        transfer_id: TransferId,
        /// The ticket the broker gave for it.
        ticket: [u8; 32],
    },
}

/// The variant index of [`Message::Chunk`] (its first encoded byte).
pub const CHUNK_INDEX: u8 = 5;

/// How much of a payload [`peek_chunk`] needs: the variant, the transfer id
/// and the record's length (a varint of at most ten bytes).
pub const CHUNK_HEAD_MAX: usize = 1 + 16 + 10;

/// If a payload of `len` bytes that starts with `head` is a well-formed
/// [`Message::Chunk`], its transfer id; `None` for anything else (another
/// variant, or a malformed chunk). `head` must hold the first
/// `min(len, CHUNK_HEAD_MAX)` bytes of the payload.
///
/// Gives the same answer as decoding the whole payload and matching on
/// `Chunk`, without having the record: the broker's relay checks every chunk
/// it forwards this way and streams the record through.
pub fn peek_chunk(head: &[u8], len: usize) -> Option<TransferId> {
    chunk_head(head, len).map(|(tid, _)| tid)
}

/// If `payload` is exactly one well-formed [`Message::Chunk`], its transfer
/// id and where its record starts (the record runs to the end). The same
/// answer as decoding, without copying the record out: the receiver opens
/// the record where it lies.
pub fn chunk_record(payload: &[u8]) -> Option<(TransferId, usize)> {
    chunk_head(payload, payload.len())
}

fn chunk_head(head: &[u8], len: usize) -> Option<(TransferId, usize)> {
    let (&index, rest) = head.split_first()?;
    if index != CHUNK_INDEX {
        return None;
    }
    let (tid, rest) = rest.split_first_chunk::<16>()?;
    // The record: a varint length as postcard reads a `usize` (at most ten
    // bytes, the tenth at most 1), then exactly that many bytes.
    let mut record_len = 0u64;
    for (i, &byte) in rest.iter().enumerate().take(10) {
        record_len |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            let header = 1 + 16 + i + 1;
            let exact = (i < 9 || byte <= 1) && len.checked_sub(header)? as u64 == record_len;
            return exact.then_some((TransferId(*tid), header));
        }
    }
    None
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
        let name = || AgentName::new("b").unwrap();
        let more: Vec<(Message, Vec<u8>)> = vec![
            (
                Message::Challenge { nonce: [1; 32] },
                [vec![9], vec![1; 32]].concat(),
            ),
            (
                Message::Auth {
                    name: name(),
                    role: Role::Data,
                    spki: vec![4],
                    signature: vec![5, 6],
                },
                vec![10, 1, b'b', 2, 1, 4, 2, 5, 6],
            ),
            (Message::Welcome, vec![11]),
            (
                Message::Error {
                    code: ErrorCode::PeerOffline,
                    detail: "x".into(),
                },
                vec![12, 5, 1, b'x'],
            ),
            (Message::Lookup { name: name() }, vec![13, 1, b'b']),
            (
                Message::PeerKey {
                    name: name(),
                    spki: vec![3],
                },
                vec![14, 1, b'b', 1, 3],
            ),
            (
                Message::Offered {
                    from: name(),
                    spki: vec![3],
                    offer: SignedOffer {
                        body: vec![],
                        signature: vec![],
                    },
                },
                vec![15, 1, b'b', 1, 3, 0, 0],
            ),
            (Message::List, vec![16]),
            (
                Message::Online {
                    agents: vec![OnlineAgent {
                        name: name(),
                        receiving: true,
                        incoming: 2,
                        senders: 0,
                    }],
                },
                vec![17, 1, 1, b'b', 1, 2, 0],
            ),
            (
                Message::Ticket {
                    transfer_id: tid,
                    ticket: [3; 32],
                },
                [vec![18], vec![0xaa; 16], vec![3; 32]].concat(),
            ),
            (
                Message::Redeem {
                    transfer_id: tid,
                    ticket: [4; 32],
                },
                [vec![19], vec![0xaa; 16], vec![4; 32]].concat(),
            ),
        ];
        for (msg, bytes) in cases.into_iter().chain(more) {
            assert_eq!(postcard::to_stdvec(&msg).unwrap(), bytes, "{msg:?}");
            assert_eq!(postcard::from_bytes::<Message>(&bytes).unwrap(), msg);
        }
    }

    /// What decoding says about `payload`: the transfer id and record iff it
    /// is a chunk.
    fn decoded_chunk(payload: &[u8]) -> Option<(TransferId, Vec<u8>)> {
        match postcard::take_from_bytes::<Message>(payload) {
            Ok((
                Message::Chunk {
                    transfer_id,
                    record,
                },
                [],
            )) => Some((transfer_id, record)),
            _ => None,
        }
    }

    /// `peek_chunk` on the whole payload and on just the head it needs, and
    /// `chunk_record`: all must give the same answer.
    fn peek(payload: &[u8]) -> Option<(TransferId, Vec<u8>)> {
        let whole = peek_chunk(payload, payload.len());
        let head = &payload[..payload.len().min(CHUNK_HEAD_MAX)];
        assert_eq!(whole, peek_chunk(head, payload.len()));
        let located = chunk_record(payload);
        assert_eq!(whole, located.map(|(tid, _)| tid));
        located.map(|(tid, at)| (tid, payload[at..].to_vec()))
    }

    #[test]
    fn peek_chunk_and_chunk_record_agree_with_decoding() {
        let tid = TransferId([7; 16]);
        let mut cases: Vec<Vec<u8>> = Vec::new();
        for len in [0usize, 1, 127, 128, 300, 16_384, 262_176] {
            let chunk = Message::Chunk {
                transfer_id: tid,
                record: vec![9; len],
            };
            let bytes = postcard::to_stdvec(&chunk).unwrap();
            cases.push(bytes[..bytes.len() - 1].to_vec()); // one byte short
            cases.push([bytes.clone(), vec![0]].concat()); // one byte over
            cases.push(bytes[..17].to_vec()); // no length
            cases.push(bytes);
        }
        // Over-long (non-canonical) and oversized varints, other variants.
        cases.push([vec![5], vec![7; 16], vec![0x81, 0x00], vec![1]].concat());
        cases.push([vec![5], vec![7; 16], vec![0x80, 0x00]].concat());
        cases.push([vec![5], vec![7; 16], vec![0xff, 0xff, 0xff, 0xff, 0x7f]].concat());
        cases.push([vec![5], vec![7; 16], vec![0x80; 6]].concat());
        cases.push([vec![4], vec![7; 16], vec![1, 1]].concat());
        cases.push(vec![5]);
        cases.push(Vec::new());
        for payload in &cases {
            assert_eq!(peek(payload), decoded_chunk(payload), "{payload:?}");
        }
        assert_eq!(peek(&cases[3]), Some((tid, vec![])));
        assert_eq!(peek(&cases[7]), Some((tid, vec![9])));
    }

    proptest::proptest! {
        #[test]
        fn peek_chunk_agrees_with_decoding_on_any_bytes(
            head in proptest::collection::vec(proptest::num::u8::ANY, 0..24),
            tail in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
        ) {
            let mut payload = vec![5];
            payload.extend(&head);
            payload.extend(&tail);
            proptest::prop_assert_eq!(peek(&payload), decoded_chunk(&payload));
            proptest::prop_assert_eq!(peek(&payload[1..]), decoded_chunk(&payload[1..]));
        }

        #[test]
        fn peek_chunk_agrees_with_decoding_near_the_right_length(
            tail in proptest::collection::vec(proptest::num::u8::ANY, 0..400),
            delta in -2i64..=2,
            padded in proptest::bool::ANY,
        ) {
            let claimed = (tail.len() as i64 + delta).max(0) as u64;
            let mut payload = vec![5];
            payload.extend([7; 16]);
            // The length as a varint, sometimes with a redundant 0x80 0x00 tail.
            let mut v = claimed;
            loop {
                let more = v >= 0x80 || padded;
                payload.push((v as u8 & 0x7f) | if more { 0x80 } else { 0 });
                v >>= 7;
                if v == 0 && !more {
                    break;
                }
                if v == 0 {
                    payload.push(0);
                    break;
                }
            }
            payload.extend(&tail);
            proptest::prop_assert_eq!(peek(&payload), decoded_chunk(&payload));
        }
    }
}
