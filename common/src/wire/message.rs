//! The messages agents and the broker exchange, as serde types encoded with
//! postcard (PROTOCOL.md §2.2), and their frames.
//!
//! Everything here is routing and framing; what must be authenticated travels
//! inside as hand-encoded bytes ([`crate::handshake`], [`super::record`]) whose
//! signatures and tags never depend on serde. The first message on every
//! connection is [`Message::Hello`] with the protocol version, so a future change
//! can be refused cleanly. `tests::exact_bytes` pins the encoding of every variant.

use serde::{Deserialize, Serialize};

use super::frame::{self, FrameError, LEN_PREFIX};
use crate::ids::{StreamId, TransferId};
use crate::name::AgentName;

/// An offer as it travels: the exact hand-encoded body (PROTOCOL.md §3.3) and
/// the signature over it. [`crate::handshake`] builds, parses and checks it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedOffer {
    /// The hand-encoded offer fields.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// RSA-PSS-SHA256 over `label("keyferry/v1 offer") ‖ body`.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// Why a receiver refused an offer (sent back to the sender, unauthenticated).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefuseReason {
    /// Larger than the receiver takes now: its `--max-size`, or its free
    /// space less the margin it keeps, or a message's limit.
    TooLarge {
        /// The most it takes now, in bytes.
        most: u64,
    },
    /// The receiver is busy (too many concurrent transfers).
    Busy,
    /// The sender's key does not match the receiver's pin for it.
    KeyMismatch,
    /// The offer did not verify.
    VerificationFailed,
    /// The receiver's policy refused it (rate limit, bad name).
    Policy,
    /// Not now, but the same offer will be taken after `seconds` (the
    /// receiver's RSA decryption budget for this sender is spent until then).
    TryLater {
        /// How long the sender should wait before it offers again.
        seconds: u32,
    },
    /// The receiver takes transfers only from the senders it names
    /// (`--accept-from NAME,…`), and not this one.
    NotListed,
    /// The receiver takes transfers only from senders whose key it has
    /// already pinned (`--accept-from known`), and this is a first contact.
    NotKnown,
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
    /// The receiver's policy refused what the manifest describes (a file
    /// name, the number or depth of entries, or their total size).
    Policy,
    /// Everything verified, but no free name was left in the out dir for a
    /// top-level item (it and its numbered variants all exist).
    NoFreeName,
    /// The person at the receiver was asked and said no.
    Declined,
    /// The person at the receiver was asked and did not answer in time.
    NoAnswer,
    /// The receiver found the prefix it kept from an earlier attempt changed
    /// on its disk since it verified: it dropped it, and the sender's next
    /// attempt starts from byte 0.
    PrefixDamaged,
}

/// What an authenticated connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Sends one transfer (and may look up peers and list who is online).
    Sender,
    /// The one long-lived control connection of a receiving agent: offers
    /// arrive on it, and it answers them (refusals, accepts) on it.
    Receiver,
}

impl Role {
    /// The role's byte in the authentication signature (PROTOCOL.md §2.4).
    pub fn code(self) -> u8 {
        match self {
            Self::Sender => 1,
            Self::Receiver => 2,
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
    /// A stored transfer is over one of the broker's mailbox limits (the
    /// detail names it, with the numbers), or the broker keeps no mailbox.
    StoreFull,
}

/// One of a sender's stored transfers, as the broker lists them
/// (`Receipts`, PROTOCOL.md §2.8).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEntry {
    /// The transfer id (the stored transfer's id).
    pub transfer_id: TransferId,
    /// Its receiver.
    pub to: AgentName,
    /// Bytes its sender announced (`Store.size`).
    pub size: u64,
    /// When the broker stored it, Unix seconds.
    pub stored_at: u64,
    /// 0 waiting, 1 delivered, 2 refused, 3 expired, 4 withdrawn.
    pub state: u8,
    /// When it expires (waiting) or when it ended (otherwise), Unix seconds.
    pub at: u64,
    /// The receiver's signed receipt (delivered, refused), else empty.
    #[serde(with = "serde_bytes")]
    pub receipt: Vec<u8>,
    /// The receiver's public key as the broker knows it (SubjectPublicKeyInfo
    /// DER), to check the receipt with once it matches the sender's pin.
    #[serde(with = "serde_bytes")]
    pub spki: Vec<u8>,
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
    /// In a cluster, the id of the broker its receiver is connected to
    /// (empty outside a cluster, or without a receiver).
    pub broker: String,
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
    /// The receiver's accept (PROTOCOL.md §3.3), on its control connection.
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
        /// The stream it belongs to.
        stream_id: StreamId,
        /// The 108-byte record.
        #[serde(with = "serde_bytes")]
        record: Vec<u8>,
    },
    /// A chunk record.
    Chunk {
        /// The stream it belongs to.
        stream_id: StreamId,
        /// The record.
        #[serde(with = "serde_bytes")]
        record: Vec<u8>,
    },
    /// The trailer record.
    Trailer {
        /// The stream it belongs to.
        stream_id: StreamId,
        /// The record.
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
    /// Broker → agent after `Hello` in versions 1 to 5: the nonce the agent
    /// signed. Never sent since version 6 (the agent signs the TLS exporter
    /// alone, in its first flight); kept so that the numbers of the messages
    /// after it stay as they are.
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
    /// Broker → agent: authenticated; and the address the broker sees the
    /// connection come from (`IP:PORT`, an IPv6 one in brackets; empty if
    /// unknown), which tells an agent behind address translation how it
    /// looks from outside (PROTOCOL.md §2.7). Unauthenticated beyond TLS:
    /// a hint only.
    Welcome {
        /// `IP:PORT` as the broker sees it.
        seen: String,
    },
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
        /// Where to open the data connection: `HOST:PORT`, or empty for the
        /// broker this connection goes to.
        address: String,
    },
    /// Agent → broker: the first message of a plain data connection.
    Redeem {
        /// Transfer id.
        transfer_id: TransferId,
        /// The ticket the broker gave for it.
        ticket: [u8; 32],
    },
    /// The stream's first record: its manifest (PROTOCOL.md §5.2).
    Manifest {
        /// The stream it belongs to.
        stream_id: StreamId,
        /// The record.
        #[serde(with = "serde_bytes")]
        record: Vec<u8>,
    },
    /// Sender → one receiver, before the stream: the stream's root key,
    /// sealed for that receiver (PROTOCOL.md §5.1).
    Root {
        /// The receiver's transfer.
        transfer_id: TransferId,
        /// The 96-byte record.
        #[serde(with = "serde_bytes")]
        record: Vec<u8>,
    },
    /// Either side of a control connection: are you still there?
    Ping {
        /// Echoed in the answer.
        nonce: u64,
    },
    /// The answer to a `Ping`.
    Pong {
        /// The ping's nonce.
        nonce: u64,
    },
    /// The receiver's go-ahead after it asked its user (the accept said it
    /// would): the sender may now send chunks. Data connection, back.
    Proceed {
        /// Transfer id.
        transfer_id: TransferId,
    },
    /// A direct connection's first frame, sender → receiver (PROTOCOL.md
    /// §2.7): which transfer, and the sender's fresh challenge.
    DirectHello {
        /// Transfer id.
        transfer_id: TransferId,
        /// 32 random bytes.
        nonce: [u8; 32],
    },
    /// The receiver's answer: its own fresh challenge, and its proof over
    /// both under the pair's direct key.
    DirectChallenge {
        /// 32 random bytes.
        nonce: [u8; 32],
        /// HMAC under the direct key (PROTOCOL.md §2.7).
        proof: [u8; 32],
    },
    /// The sender's proof over both challenges; the stream follows.
    DirectProof {
        /// HMAC under the direct key (PROTOCOL.md §2.7).
        proof: [u8; 32],
    },
    /// Sender → broker: a prekey bundle of this receiver, for a stored
    /// transfer (PROTOCOL.md §2.8).
    FetchPrekey {
        /// The receiver.
        name: AgentName,
    },
    /// Broker → sender: the receiver's key and one of its signed bundles.
    Prekey {
        /// The receiver.
        name: AgentName,
        /// Its public key (SubjectPublicKeyInfo DER).
        #[serde(with = "serde_bytes")]
        spki: Vec<u8>,
        /// The signed bundle (PROTOCOL.md §3.4).
        #[serde(with = "serde_bytes")]
        bundle: Vec<u8>,
    },
    /// Sender → broker: keep this stored transfer for `to`; `size` bounds
    /// the upload (the data, its manifest and 64 KiB; the broker allows
    /// `size / 64 + 64 KiB` more for the records' headers and tags).
    /// Answered by a `Ticket` for the upload, or an `Error`.
    Store {
        /// The receiver.
        to: AgentName,
        /// The signed stored offer (PROTOCOL.md §3.4).
        offer: SignedOffer,
        /// The upload's bound (see above).
        size: u64,
    },
    /// Broker → sender on the upload's data connection, once all of it is
    /// on the broker's disk: stored, until `expires`.
    Stored {
        /// Transfer id.
        transfer_id: TransferId,
        /// Unix seconds after which it is deleted undelivered.
        expires: u64,
    },
    /// Receiver → broker: signed bundles to hand out (one-time ones, and a
    /// new last-resort one, or empty for none).
    Prekeys {
        /// One-time bundles.
        bundles: Vec<serde_bytes::ByteBuf>,
        /// A last-resort bundle replacing the one held, or empty.
        #[serde(with = "serde_bytes")]
        last_resort: Vec<u8>,
    },
    /// Broker → receiver: how many of its one-time bundles it holds, and
    /// until when its last-resort bundle holds (0: none).
    PrekeyCount {
        /// One-time bundles held.
        one_time: u32,
        /// Expiry of the last-resort bundle, Unix seconds (0: none held).
        last_resort_expires: u64,
    },
    /// Broker → receiver: a stored transfer waiting for it.
    StoredOffered {
        /// The sender.
        from: AgentName,
        /// The sender's public key (SubjectPublicKeyInfo DER).
        #[serde(with = "serde_bytes")]
        spki: Vec<u8>,
        /// The signed stored offer.
        offer: SignedOffer,
        /// Bytes stored.
        size: u64,
        /// When the broker stored it, Unix seconds.
        stored_at: u64,
    },
    /// Receiver → broker: its signed receipt for a stored transfer, placed
    /// or refused for good (PROTOCOL.md §3.4).
    StoredReceipt {
        /// Transfer id.
        transfer_id: TransferId,
        /// The signed receipt.
        #[serde(with = "serde_bytes")]
        receipt: Vec<u8>,
    },
    /// Sender → broker: list my stored transfers.
    Receipts,
    /// Broker → sender: the sender's stored transfers, newest first.
    ReceiptList {
        /// At most 64 entries (this broker's); a sender takes what it gets.
        entries: Vec<StoredEntry>,
    },
    /// Sender → broker: delete a stored transfer still waiting.
    Withdraw {
        /// Transfer id.
        transfer_id: TransferId,
    },
    /// Broker → sender: it is deleted and will never be delivered.
    Withdrawn {
        /// Transfer id.
        transfer_id: TransferId,
    },
    /// The sender's proof on the first direct connection of a stream spread
    /// over `lanes` connections (PROTOCOL.md §2.7), in place of
    /// `DirectProof`; the stream follows, in segments.
    DirectLanes {
        /// How many connections carry the stream, this one included (2 to 8).
        lanes: u8,
        /// HMAC under the direct key over both challenges and `lanes`.
        proof: [u8; 32],
    },
    /// The sender's proof on a further connection of such a stream, which is
    /// its lane `lane` (1 to 7).
    DirectLane {
        /// This connection's place among the stream's connections.
        lane: u8,
        /// HMAC under the direct key over both challenges and `lane`.
        proof: [u8; 32],
    },
    /// Agent → broker: the first message of the first of several data
    /// connections carrying one side of a stream through the relay
    /// (PROTOCOL.md §2.5); a sender's stream follows, in segments.
    RedeemLanes {
        /// Transfer id.
        transfer_id: TransferId,
        /// The side's ticket for it.
        ticket: [u8; 32],
        /// How many connections carry the stream, this one included (2 to 8).
        lanes: u8,
    },
    /// Agent → broker: the first message of a further data connection of
    /// such a side, its lane `lane` (1 to 7).
    RedeemLane {
        /// Transfer id.
        transfer_id: TransferId,
        /// The side's ticket for it (the same as on the first).
        ticket: [u8; 32],
        /// This connection's place among the stream's connections.
        lane: u8,
    },
}

impl Message {
    /// The variant's name, for log lines and errors (never its contents).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "Hello",
            Self::Offer { .. } => "Offer",
            Self::Accept { .. } => "Accept",
            Self::Refuse { .. } => "Refuse",
            Self::KeyUpdate { .. } => "KeyUpdate",
            Self::Chunk { .. } => "Chunk",
            Self::Trailer { .. } => "Trailer",
            Self::Receipt { .. } => "Receipt",
            Self::Abort { .. } => "Abort",
            Self::Challenge { .. } => "Challenge",
            Self::Auth { .. } => "Auth",
            Self::Welcome { .. } => "Welcome",
            Self::Error { .. } => "Error",
            Self::Lookup { .. } => "Lookup",
            Self::PeerKey { .. } => "PeerKey",
            Self::Offered { .. } => "Offered",
            Self::List => "List",
            Self::Online { .. } => "Online",
            Self::Ticket { .. } => "Ticket",
            Self::Redeem { .. } => "Redeem",
            Self::Manifest { .. } => "Manifest",
            Self::Root { .. } => "Root",
            Self::Ping { .. } => "Ping",
            Self::Pong { .. } => "Pong",
            Self::Proceed { .. } => "Proceed",
            Self::DirectHello { .. } => "DirectHello",
            Self::DirectChallenge { .. } => "DirectChallenge",
            Self::DirectProof { .. } => "DirectProof",
            Self::FetchPrekey { .. } => "FetchPrekey",
            Self::Prekey { .. } => "Prekey",
            Self::Store { .. } => "Store",
            Self::Stored { .. } => "Stored",
            Self::Prekeys { .. } => "Prekeys",
            Self::PrekeyCount { .. } => "PrekeyCount",
            Self::StoredOffered { .. } => "StoredOffered",
            Self::StoredReceipt { .. } => "StoredReceipt",
            Self::Receipts => "Receipts",
            Self::ReceiptList { .. } => "ReceiptList",
            Self::Withdraw { .. } => "Withdraw",
            Self::Withdrawn { .. } => "Withdrawn",
            Self::DirectLanes { .. } => "DirectLanes",
            Self::DirectLane { .. } => "DirectLane",
            Self::RedeemLanes { .. } => "RedeemLanes",
            Self::RedeemLane { .. } => "RedeemLane",
        }
    }
}

/// Encodes `msg` as one frame, refusing to produce a frame above `max`.
pub fn encode(msg: &Message, max: usize) -> Result<Vec<u8>, FrameError> {
    let out = postcard::to_extend(msg, vec![0u8; LEN_PREFIX]).map_err(|_| FrameError::Malformed)?;
    let mut out = out;
    let prefix = frame::prefix(out.len() - LEN_PREFIX, max)?;
    out[..LEN_PREFIX].copy_from_slice(&prefix);
    Ok(out)
}

/// Decodes a frame payload as exactly one message.
pub fn decode_payload(payload: &[u8]) -> Result<Message, FrameError> {
    match postcard::take_from_bytes::<Message>(payload) {
        Ok((msg, [])) => Ok(msg),
        _ => Err(FrameError::Malformed),
    }
}

/// Decodes one frame from the start of `buf`. `Ok(None)` means more bytes are
/// needed; `Ok(Some((msg, n)))` consumed `n` bytes.
pub fn decode(buf: &[u8], max: usize) -> Result<Option<(Message, usize)>, FrameError> {
    match frame::split(buf, max)? {
        Some((payload, n)) => Ok(Some((decode_payload(payload)?, n))),
        None => Ok(None),
    }
}

/// Longest address a [`Message::Ticket`] may name (PROTOCOL.md §2.5).
pub const MAX_TICKET_ADDRESS: usize = 255;

/// Whether a ticket may send a data connection to `address`: non-empty, at
/// most [`MAX_TICKET_ADDRESS`] bytes, no control characters (PROTOCOL.md
/// §2.5). (An empty address means the broker the ticket came from.)
pub fn ticket_address_ok(address: &str) -> bool {
    !address.is_empty()
        && address.len() <= MAX_TICKET_ADDRESS
        && !address.chars().any(char::is_control)
}

/// Whether a broker may advertise `address` to a cluster (PROTOCOL.md §2.6):
/// a ticket address of the form `HOST:PORT`, port 1–65535, without spaces.
pub fn advertised_address_ok(address: &str) -> bool {
    ticket_address_ok(address)
        && !address.chars().any(char::is_whitespace)
        && address.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn ticket_and_advertised_addresses() {
        use super::{advertised_address_ok, ticket_address_ok};
        for ok in [
            "h:1",
            "broker-2.example:7700",
            "[::1]:7700",
            "10.0.0.2:65535",
        ] {
            assert!(ticket_address_ok(ok) && advertised_address_ok(ok), "{ok}");
        }
        let long = format!("{}:1", "h".repeat(253));
        assert!(ticket_address_ok(&long) && advertised_address_ok(&long));
        let longer = format!("{}:1", "h".repeat(254));
        assert!(!ticket_address_ok(&longer) && !advertised_address_ok(&longer));
        for bad in ["", "h:1\n", "h\u{7}:1"] {
            assert!(
                !ticket_address_ok(bad) && !advertised_address_ok(bad),
                "{bad:?}"
            );
        }
        // A ticket may carry what a broker must not advertise.
        for loose in ["h", "h:0", ":1", "h:99999", "h :1", "h:x"] {
            assert!(
                ticket_address_ok(loose) && !advertised_address_ok(loose),
                "{loose}"
            );
        }
    }

    use super::*;

    #[test]
    fn the_chunk_fast_path_knows_the_chunk_index() {
        let chunk = Message::Chunk {
            stream_id: StreamId([0; 16]),
            record: vec![],
        };
        assert_eq!(
            postcard::to_stdvec(&chunk).unwrap()[0],
            super::super::chunk::CHUNK_INDEX
        );
    }

    #[test]
    fn exact_bytes() {
        // Changing any of these bytes changes the wire format: bump the version.
        let tid = TransferId([0xaa; 16]);
        let sid = StreamId([0xaa; 16]);
        let cases: Vec<(Message, Vec<u8>)> = vec![
            (Message::Hello { version: 2 }, vec![0, 2]),
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
                    stream_id: sid,
                    record: vec![7, 7],
                },
                [vec![4], vec![0xaa; 16], vec![2, 7, 7]].concat(),
            ),
            (
                Message::Chunk {
                    stream_id: sid,
                    record: vec![],
                },
                [vec![5], vec![0xaa; 16], vec![0]].concat(),
            ),
            (
                Message::Trailer {
                    stream_id: sid,
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
                    role: Role::Receiver,
                    spki: vec![4],
                    signature: vec![5, 6],
                },
                vec![10, 1, b'b', 1, 1, 4, 2, 5, 6],
            ),
            (
                Message::Welcome {
                    seen: "1.2.3.4:5".into(),
                },
                vec![11, 9, b'1', b'.', b'2', b'.', b'3', b'.', b'4', b':', b'5'],
            ),
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
                        broker: "b1".into(),
                    }],
                },
                vec![17, 1, 1, b'b', 1, 2, 0, 2, b'b', b'1'],
            ),
            (
                Message::Ticket {
                    transfer_id: tid,
                    ticket: [3; 32],
                    address: "h:1".into(),
                },
                [
                    vec![18],
                    vec![0xaa; 16],
                    vec![3; 32],
                    vec![3, b'h', b':', b'1'],
                ]
                .concat(),
            ),
            (
                Message::Redeem {
                    transfer_id: tid,
                    ticket: [4; 32],
                },
                [vec![19], vec![0xaa; 16], vec![4; 32]].concat(),
            ),
            (
                Message::Manifest {
                    stream_id: sid,
                    record: vec![6],
                },
                [vec![20], vec![0xaa; 16], vec![1, 6]].concat(),
            ),
            (
                Message::Root {
                    transfer_id: tid,
                    record: vec![7],
                },
                [vec![21], vec![0xaa; 16], vec![1, 7]].concat(),
            ),
            (Message::Ping { nonce: 300 }, vec![22, 0xac, 0x02]),
            (Message::Pong { nonce: 1 }, vec![23, 1]),
            (
                Message::Proceed { transfer_id: tid },
                [vec![24], vec![0xaa; 16]].concat(),
            ),
            (
                Message::DirectHello {
                    transfer_id: tid,
                    nonce: [0x55; 32],
                },
                [vec![25], vec![0xaa; 16], vec![0x55; 32]].concat(),
            ),
            (
                Message::DirectChallenge {
                    nonce: [0x55; 32],
                    proof: [0x66; 32],
                },
                [vec![26], vec![0x55; 32], vec![0x66; 32]].concat(),
            ),
            (
                Message::DirectProof { proof: [0x66; 32] },
                [vec![27], vec![0x66; 32]].concat(),
            ),
            (Message::FetchPrekey { name: name() }, vec![28, 1, b'b']),
            (
                Message::Prekey {
                    name: name(),
                    spki: vec![3],
                    bundle: vec![4, 5],
                },
                vec![29, 1, b'b', 1, 3, 2, 4, 5],
            ),
            (
                Message::Store {
                    to: name(),
                    offer: SignedOffer {
                        body: vec![1],
                        signature: vec![2],
                    },
                    size: 300,
                },
                vec![30, 1, b'b', 1, 1, 1, 2, 0xac, 0x02],
            ),
            (
                Message::Stored {
                    transfer_id: tid,
                    expires: 1,
                },
                [vec![31], vec![0xaa; 16], vec![1]].concat(),
            ),
            (
                Message::Prekeys {
                    bundles: vec![serde_bytes::ByteBuf::from(vec![9])],
                    last_resort: vec![],
                },
                vec![32, 1, 1, 9, 0],
            ),
            (
                Message::PrekeyCount {
                    one_time: 3,
                    last_resort_expires: 0,
                },
                vec![33, 3, 0],
            ),
            (
                Message::StoredOffered {
                    from: name(),
                    spki: vec![3],
                    offer: SignedOffer {
                        body: vec![],
                        signature: vec![],
                    },
                    size: 5,
                    stored_at: 6,
                },
                vec![34, 1, b'b', 1, 3, 0, 0, 5, 6],
            ),
            (
                Message::StoredReceipt {
                    transfer_id: tid,
                    receipt: vec![8],
                },
                [vec![35], vec![0xaa; 16], vec![1, 8]].concat(),
            ),
            (Message::Receipts, vec![36]),
            (
                Message::ReceiptList {
                    entries: vec![StoredEntry {
                        transfer_id: tid,
                        to: name(),
                        size: 1,
                        stored_at: 2,
                        state: 3,
                        at: 4,
                        receipt: vec![],
                        spki: vec![5],
                    }],
                },
                [
                    vec![37, 1],
                    vec![0xaa; 16],
                    vec![1, b'b', 1, 2, 3, 4, 0, 1, 5],
                ]
                .concat(),
            ),
            (
                Message::Withdraw { transfer_id: tid },
                [vec![38], vec![0xaa; 16]].concat(),
            ),
            (
                Message::Withdrawn { transfer_id: tid },
                [vec![39], vec![0xaa; 16]].concat(),
            ),
            (
                Message::DirectLanes {
                    lanes: 4,
                    proof: [0x66; 32],
                },
                [vec![40, 4], vec![0x66; 32]].concat(),
            ),
            (
                Message::DirectLane {
                    lane: 3,
                    proof: [0x66; 32],
                },
                [vec![41, 3], vec![0x66; 32]].concat(),
            ),
            (
                Message::RedeemLanes {
                    transfer_id: tid,
                    ticket: [4; 32],
                    lanes: 8,
                },
                [vec![42], vec![0xaa; 16], vec![4; 32], vec![8]].concat(),
            ),
            (
                Message::RedeemLane {
                    transfer_id: tid,
                    ticket: [4; 32],
                    lane: 7,
                },
                [vec![43], vec![0xaa; 16], vec![4; 32], vec![7]].concat(),
            ),
            (
                Message::Error {
                    code: ErrorCode::StoreFull,
                    detail: String::new(),
                },
                vec![12, 10, 0],
            ),
            (
                Message::Refuse {
                    transfer_id: tid,
                    reason: RefuseReason::NotKnown,
                },
                [vec![3], vec![0xaa; 16], vec![7]].concat(),
            ),
            (
                Message::Abort {
                    transfer_id: tid,
                    reason: AbortReason::NoAnswer,
                },
                [vec![8], vec![0xaa; 16], vec![9]].concat(),
            ),
            (
                Message::Refuse {
                    transfer_id: tid,
                    reason: RefuseReason::TryLater { seconds: 300 },
                },
                [vec![3], vec![0xaa; 16], vec![5, 0xac, 0x02]].concat(),
            ),
            (
                Message::Abort {
                    transfer_id: tid,
                    reason: AbortReason::NoFreeName,
                },
                [vec![8], vec![0xaa; 16], vec![7]].concat(),
            ),
            (
                Message::Abort {
                    transfer_id: tid,
                    reason: AbortReason::Policy,
                },
                [vec![8], vec![0xaa; 16], vec![6]].concat(),
            ),
        ];
        for (msg, bytes) in cases.into_iter().chain(more) {
            assert_eq!(postcard::to_stdvec(&msg).unwrap(), bytes, "{msg:?}");
            assert_eq!(postcard::from_bytes::<Message>(&bytes).unwrap(), msg);
        }
    }
}
