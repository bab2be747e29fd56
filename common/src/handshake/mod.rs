//! The offer and the accept (PROTOCOL.md §3.3): how a sender and a receiver agree on
//! a transfer's keys through a broker that must learn none of them.
//!
//! Sender: [`make_offer`] → send the [`SignedOffer`] → [`PendingOffer::handle_accept`]
//! → [`Accepted`] (its pair keys, and the receiver's resume point to check against
//! the data). Receiver: [`SignedOffer::parse`] (unauthenticated, to find the
//! sender's pinned key) → [`verify_offer`] (signature *before* any RSA decryption,
//! names, fingerprints, time) → [`VerifiedOffer::open`] (blinded OAEP unwrap and the
//! terms' tag) → [`OpenedOffer::accept`] (X25519 and ML-KEM-768 towards the
//! sender's shares, and the resume point). Each step consumes the previous proof
//! type, so no step can be skipped.
//!
//! [`offer`] builds and checks the offer; [`accept`] the accept and the keys.
//!
//! For a receiver who is offline (PROTOCOL.md §3.4): the receiver's signed
//! [`prekey`] bundles stand in for its accept, and a [`stored`] offer is
//! sealed to one of them; the receiver's signed stored receipt says how it
//! ended.

mod accept;
pub mod direct;
mod offer;
pub mod prekey;
pub mod receipt;
pub mod stored;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::PROTOCOL_VERSION;
use crate::crypto::AuthError;
use crate::crypto::ecdh::SHARE_LEN;
use crate::crypto::kem::{CT_LEN, EK_LEN};
use crate::crypto::seal::{Sealed, TAG_LEN};
use crate::encode::Encoder;
use crate::identity::Fingerprint;
use crate::ids::{Nonce, StreamId, TransferId};
use crate::name::AgentName;
pub use crate::wire::message::SignedOffer;

pub use accept::{Accepted, OpenedOffer, ResumePoint};
pub use offer::{OfferParams, PendingOffer, VerifiedOffer, make_offer, verify_offer};

/// Signature and hash contexts of the handshake.
pub mod label {
    /// Signature over the offer body.
    pub const OFFER: &str = "keyferry/v2 offer";
    /// Hash of the offer header (the terms keys' context).
    pub const OFFER_HEADER: &str = "keyferry/v2 offer-header";
    /// OAEP label of the wrapped master key.
    pub const MASTER_KEY: &str = "keyferry/v2 master-key";
    /// Tag over the sealed terms.
    pub const TERMS: &str = "keyferry/v2 terms";
    /// The accept's fixed fields, covered by its MAC.
    pub const ACCEPT: &str = "keyferry/v2 accept";
    /// The resume point's MAC input.
    pub const RESUME: &str = "keyferry/v2 resume";
    /// The transcript hash (context of every pair key).
    pub const TRANSCRIPT: &str = "keyferry/v2 transcript";
}

/// Largest signed offer (body plus signature) an agent accepts.
pub const MAX_OFFER_LEN: usize = 8 << 10;
/// Largest terms plaintext.
pub const MAX_TERMS_LEN: usize = 256;
/// Largest text message (`Kind::Message`), in bytes (PROTOCOL.md §6.2).
pub const MAX_MESSAGE_LEN: usize = 64 << 10;
/// Largest RSA ciphertext (a 4096-bit modulus).
pub const MAX_WRAPPED_LEN: usize = 512;
/// Shortest accept: receiver nonce, X25519 share, ML-KEM ciphertext, resume
/// offset, the seconds the receiver may take to ask its user, the direct
/// mode and number of candidates (none), resume tag, tag.
pub const MIN_ACCEPT_LEN: usize = 32 + SHARE_LEN + CT_LEN + 8 + 4 + 2 + TAG_LEN + TAG_LEN;
/// Longest accept: [`MIN_ACCEPT_LEN`] with the most candidates, all IPv6.
pub const MAX_ACCEPT_LEN: usize = MIN_ACCEPT_LEN + direct::MAX_CANDIDATES * 19;
/// Default window around the receiver's clock in which an offer's time must lie.
pub const DEFAULT_TIME_WINDOW_SECS: u64 = 300;

/// Why an offer or an accept was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum HandshakeError {
    /// The bytes are not a well-formed offer or accept.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// The offer speaks another protocol version.
    #[error("protocol version {0} is not supported (this agent speaks version {PROTOCOL_VERSION})")]
    Version(u16),
    /// The key we verify with is not the one the offer names.
    #[error("the sender's key does not match the fingerprint in its offer")]
    SenderKey,
    /// The offer is addressed to another agent or another key.
    #[error("the offer is addressed to {name} with key {fingerprint}, not to this agent")]
    NotForUs {
        /// The name in the offer.
        name: AgentName,
        /// The fingerprint in the offer.
        fingerprint: Fingerprint,
    },
    /// The offer's time lies outside the window.
    #[error("the offer's time is {skew} s away from this machine's clock (limit {window} s)")]
    Stale {
        /// Distance between the offer's time and ours.
        skew: u64,
        /// The accepted window.
        window: u64,
    },
    /// A signature, tag or key unwrap failed (deliberately indistinct).
    #[error("verification failed")]
    Auth,
}

impl From<AuthError> for HandshakeError {
    fn from(_: AuthError) -> Self {
        Self::Auth
    }
}

/// What is being transferred.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// Files and directories (the manifest says which), to be placed in the out dir.
    Files,
    /// A short text message, to be printed.
    Message,
    /// A chat: an open-ended stream of chat records ([`crate::chat`]),
    /// shown as they come, never stored.
    Chat,
}

/// What the receiver must decide on before it accepts, sealed in the offer
/// under keys that only the RSA unwrap gives (postcard inside the seal).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Terms {
    /// Files or a message.
    pub kind: Kind,
    /// The data's total size: exact, or (when `size_known` is false: a stream
    /// read from standard input) the most it may be.
    pub size: u64,
    /// Whether `size` is exact.
    pub size_known: bool,
    /// The stream of an earlier, interrupted attempt this one continues.
    pub resumes: Option<StreamId>,
    /// How many receivers the stream goes to (1 unless fanned out).
    pub receivers: u32,
    /// Where the sender will connect from to the receiver's addresses, as
    /// seen from outside its address translation, for a simultaneous open
    /// (PROTOCOL.md §2.7): [`direct::punch_to_bytes`]; empty for none.
    #[serde(with = "serde_bytes")]
    pub punch: Vec<u8>,
}

/// The fields of an offer, parsed but not yet authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferFields {
    /// Protocol version.
    pub version: u16,
    /// Transfer id (this sender–receiver pair).
    pub transfer_id: TransferId,
    /// The stream the receiver will get.
    pub stream_id: StreamId,
    /// Sender's name.
    pub sender: AgentName,
    /// Sender's key fingerprint.
    pub sender_fp: Fingerprint,
    /// Receiver's name.
    pub receiver: AgentName,
    /// Receiver's key fingerprint.
    pub receiver_fp: Fingerprint,
    /// Sender's clock, Unix seconds.
    pub time: u64,
    /// Sender nonce.
    pub sender_nonce: Nonce,
    /// Sender's ephemeral X25519 share.
    pub sender_share: [u8; SHARE_LEN],
    /// Sender's ephemeral ML-KEM-768 encapsulation key.
    pub kem_key: Box<[u8; EK_LEN]>,
    /// RSA-OAEP(receiver key, M).
    pub wrapped_key: Vec<u8>,
    /// The terms, sealed under the terms keys.
    pub terms: Sealed,
    /// Length of the header (everything before the sealed terms) in `body`.
    header_len: usize,
}

/// A name field of an offer's header; `what` names the record in the error.
fn name_field(
    d: &mut crate::encode::Decoder<'_>,
    what: &'static str,
) -> Result<AgentName, HandshakeError> {
    let raw = d
        .bytes(crate::name::MAX_NAME_LEN)
        .map_err(|_| HandshakeError::Malformed(what))?;
    std::str::from_utf8(raw)
        .ok()
        .and_then(|s| AgentName::new(s).ok())
        .ok_or(HandshakeError::Malformed(what))
}

/// The sealed terms that end an offer's body (live or stored).
fn encode_sealed(s: &Sealed) -> Vec<u8> {
    Encoder::default()
        .fixed(&s.iv)
        .bytes(&s.ciphertext)
        .fixed(&s.tag)
        .finish()
}

/// Reads the sealed terms that end an offer's body, and checks nothing
/// follows them; `what` names the record in the error.
fn decode_sealed(
    mut d: crate::encode::Decoder<'_>,
    what: &'static str,
) -> Result<Sealed, HandshakeError> {
    let bad = |_| HandshakeError::Malformed(what);
    let iv = d.array::<{ crate::crypto::seal::IV_LEN }>().map_err(bad)?;
    let ciphertext = d.bytes(MAX_TERMS_LEN + 16).map_err(bad)?.to_vec();
    let tag = d.array::<TAG_LEN>().map_err(bad)?;
    d.finish().map_err(bad)?;
    Ok(Sealed {
        iv,
        ciphertext,
        tag,
    })
}

fn header_hash(header: &[u8]) -> [u8; 32] {
    Sha256::digest(Encoder::new(label::OFFER_HEADER).fixed(header).finish()).into()
}

fn oaep_label(f: &OfferFields) -> [u8; 32] {
    Sha256::digest(
        Encoder::new(label::MASTER_KEY)
            .u16(f.version)
            .fixed(&f.transfer_id.0)
            .fixed(&f.sender_fp.0)
            .fixed(&f.receiver_fp.0)
            .fixed(&f.sender_nonce.0)
            .finish(),
    )
    .into()
}

fn terms_ad(transfer_id: &TransferId) -> Vec<u8> {
    Encoder::new(label::TERMS).fixed(&transfer_id.0).finish()
}

fn signed_bytes(body: &[u8]) -> Vec<u8> {
    Encoder::new(label::OFFER).fixed(body).finish()
}

fn transcript_hash(offer: &SignedOffer, accept_fixed: &[u8]) -> [u8; 32] {
    Sha256::digest(
        Encoder::new(label::TRANSCRIPT)
            .bytes(&signed_bytes(&offer.body))
            .fixed(accept_fixed)
            .finish(),
    )
    .into()
}
