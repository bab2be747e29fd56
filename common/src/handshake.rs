//! The offer and the accept (PROTOCOL.md §3.3): how a sender and a receiver agree on
//! a transfer's keys through a broker that must learn none of them.
//!
//! Sender: [`make_offer`] → send the [`SignedOffer`] → [`PendingOffer::handle_accept`]
//! → [`StreamKeys`]. Receiver: [`SignedOffer::parse`] (unauthenticated, to find the
//! sender's pinned key) → [`verify_offer`] (signature *before* any RSA decryption,
//! names, fingerprints, time) → [`VerifiedOffer::open`] (blinded OAEP unwrap and the
//! metadata tag) → [`OpenedOffer::accept`]. Each step consumes the previous proof
//! type, so no step can be skipped.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::PROTOCOL_VERSION;
use crate::crypto::ecdh::{Ephemeral, SHARE_LEN};
use crate::crypto::keys::MasterKey;
use crate::crypto::seal::{self, IV_LEN, Sealed, TAG_LEN};
use crate::crypto::{AuthError, mac, wrap};
use crate::encode::{Decoder, Encoder};
use crate::identity::{Fingerprint, Identity, PublicKey};
use crate::ids::{Nonce, TransferId};
use crate::name::AgentName;
use crate::schedule::{StreamKeys, derive_stream_keys, metadata_keys};
pub use crate::wire::message::SignedOffer;

/// Signature and hash contexts of the handshake.
pub mod label {
    /// Signature over the offer body.
    pub const OFFER: &str = "keyferry/v1 offer";
    /// Hash of the offer header (the metadata keys' context).
    pub const OFFER_HEADER: &str = "keyferry/v1 offer-header";
    /// OAEP label of the wrapped master key.
    pub const MASTER_KEY: &str = "keyferry/v1 master-key";
    /// Tag over the sealed metadata.
    pub const METADATA: &str = "keyferry/v1 metadata";
    /// The accept's fixed fields, covered by its MAC.
    pub const ACCEPT: &str = "keyferry/v1 accept";
    /// The transcript hash (context of every key after the accept).
    pub const TRANSCRIPT: &str = "keyferry/v1 transcript";
}

/// Largest signed offer (body plus signature) an agent accepts.
pub const MAX_OFFER_LEN: usize = 8 << 10;
/// Largest metadata plaintext.
pub const MAX_METADATA_LEN: usize = 1 << 10;
/// Largest text message (`Kind::Message`), in bytes (PROTOCOL.md §6.2).
pub const MAX_MESSAGE_LEN: usize = 64 << 10;
/// Largest RSA ciphertext (a 4096-bit modulus).
pub const MAX_WRAPPED_LEN: usize = 512;
/// Exact length of an accept: receiver nonce, receiver share, tag.
pub const ACCEPT_LEN: usize = 32 + SHARE_LEN + TAG_LEN;
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
    /// A file, to be written to the out dir.
    File,
    /// A short text message, to be printed.
    Message,
}

/// The sealed metadata of a transfer (postcard inside the seal).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// File or message.
    pub kind: Kind,
    /// The file's name as the sender proposes it (checked by the receiver).
    pub name: String,
    /// Exact plaintext size of the stream.
    pub size: u64,
}

/// The fields of an offer, parsed but not yet authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferFields {
    /// Protocol version.
    pub version: u16,
    /// Transfer id.
    pub transfer_id: TransferId,
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
    /// RSA-OAEP(receiver key, M).
    pub wrapped_key: Vec<u8>,
    /// Metadata sealed under the metadata keys.
    pub metadata: Sealed,
    /// Length of the header (everything before the sealed metadata) in `body`.
    header_len: usize,
}

fn encode_header(f: &OfferFields) -> Vec<u8> {
    Encoder::default()
        .u16(f.version)
        .fixed(&f.transfer_id.0)
        .bytes(f.sender.as_str().as_bytes())
        .fixed(&f.sender_fp.0)
        .bytes(f.receiver.as_str().as_bytes())
        .fixed(&f.receiver_fp.0)
        .u64(f.time)
        .fixed(&f.sender_nonce.0)
        .fixed(&f.sender_share)
        .bytes(&f.wrapped_key)
        .finish()
}

fn encode_sealed(s: &Sealed) -> Vec<u8> {
    Encoder::default()
        .fixed(&s.iv)
        .bytes(&s.ciphertext)
        .fixed(&s.tag)
        .finish()
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

fn metadata_ad(transfer_id: &TransferId) -> Vec<u8> {
    Encoder::new(label::METADATA).fixed(&transfer_id.0).finish()
}

fn signed_bytes(body: &[u8]) -> Vec<u8> {
    Encoder::new(label::OFFER).fixed(body).finish()
}

fn accept_fixed(transfer_id: &TransferId, nonce: &Nonce, share: &[u8; SHARE_LEN]) -> Vec<u8> {
    Encoder::new(label::ACCEPT)
        .u16(PROTOCOL_VERSION)
        .fixed(&transfer_id.0)
        .fixed(&nonce.0)
        .fixed(share)
        .finish()
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

fn name_field(d: &mut Decoder<'_>) -> Result<AgentName, HandshakeError> {
    let bad = HandshakeError::Malformed("offer");
    let raw = d
        .bytes(crate::name::MAX_NAME_LEN)
        .map_err(|_| bad.clone())?;
    let s = std::str::from_utf8(raw).map_err(|_| bad.clone())?;
    AgentName::new(s).map_err(|_| bad)
}

impl SignedOffer {
    /// Parses the body's structure. Nothing is authenticated yet: use the result
    /// only to route the offer and to find the sender's pinned key.
    pub fn parse(&self) -> Result<OfferFields, HandshakeError> {
        let bad = || HandshakeError::Malformed("offer");
        if self.body.len() + self.signature.len() > MAX_OFFER_LEN {
            return Err(bad());
        }
        let mut d = Decoder::new(&self.body);
        let version = d.u16().map_err(|_| bad())?;
        if version != PROTOCOL_VERSION {
            return Err(HandshakeError::Version(version));
        }
        let transfer_id = TransferId(d.array().map_err(|_| bad())?);
        let sender = name_field(&mut d)?;
        let sender_fp = Fingerprint(d.array().map_err(|_| bad())?);
        let receiver = name_field(&mut d)?;
        let receiver_fp = Fingerprint(d.array().map_err(|_| bad())?);
        let time = d.u64().map_err(|_| bad())?;
        let sender_nonce = Nonce(d.array().map_err(|_| bad())?);
        let sender_share = d.array().map_err(|_| bad())?;
        let wrapped_key = d.bytes(MAX_WRAPPED_LEN).map_err(|_| bad())?.to_vec();
        let header_len = self.body.len() - d.remaining();
        let iv = d.array::<IV_LEN>().map_err(|_| bad())?;
        let ciphertext = d.bytes(MAX_METADATA_LEN + 16).map_err(|_| bad())?.to_vec();
        let tag = d.array::<TAG_LEN>().map_err(|_| bad())?;
        d.finish().map_err(|_| bad())?;
        Ok(OfferFields {
            version,
            transfer_id,
            sender,
            sender_fp,
            receiver,
            receiver_fp,
            time,
            sender_nonce,
            sender_share,
            wrapped_key,
            metadata: Sealed {
                iv,
                ciphertext,
                tag,
            },
            header_len,
        })
    }
}

/// What a sender needs to build an offer.
#[derive(Debug)]
pub struct OfferParams<'a> {
    /// The sender's identity.
    pub identity: &'a Identity,
    /// The sender's name.
    pub sender: AgentName,
    /// The receiver's name.
    pub receiver: AgentName,
    /// The receiver's key, already checked against its pin.
    pub receiver_key: &'a PublicKey,
    /// What is offered.
    pub metadata: Metadata,
    /// Sender's clock, Unix seconds.
    pub now_unix: u64,
}

/// The sender's state between the offer and the accept.
pub struct PendingOffer {
    transfer_id: TransferId,
    sender_nonce: Nonce,
    master: MasterKey,
    ephemeral: Ephemeral,
    offer: SignedOffer,
}

impl std::fmt::Debug for PendingOffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingOffer")
            .field("transfer_id", &self.transfer_id)
            .finish_non_exhaustive()
    }
}

/// Builds and signs an offer: fresh M, transfer id, nonce and X25519 share.
pub fn make_offer(p: OfferParams<'_>) -> Result<(PendingOffer, SignedOffer), HandshakeError> {
    let metadata_plain =
        postcard::to_stdvec(&p.metadata).map_err(|_| HandshakeError::Malformed("metadata"))?;
    if metadata_plain.len() > MAX_METADATA_LEN {
        return Err(HandshakeError::Malformed("metadata"));
    }
    let master = MasterKey::random();
    let ephemeral = Ephemeral::generate();
    let mut fields = OfferFields {
        version: PROTOCOL_VERSION,
        transfer_id: TransferId::random(),
        sender: p.sender,
        sender_fp: p.identity.fingerprint(),
        receiver: p.receiver,
        receiver_fp: p.receiver_key.fingerprint(),
        time: p.now_unix,
        sender_nonce: Nonce::random(),
        sender_share: ephemeral.public(),
        wrapped_key: Vec::new(),
        metadata: Sealed {
            iv: [0; IV_LEN],
            ciphertext: Vec::new(),
            tag: [0; TAG_LEN],
        },
        header_len: 0,
    };
    fields.wrapped_key = wrap::wrap_master_key(p.receiver_key.rsa(), &oaep_label(&fields), &master);
    let header = encode_header(&fields);
    let keys = metadata_keys(
        &master,
        &fields.sender_nonce,
        &fields.transfer_id,
        &header_hash(&header),
    );
    fields.metadata = seal::seal(&keys, &metadata_ad(&fields.transfer_id), &metadata_plain);
    let mut body = header;
    body.extend_from_slice(&encode_sealed(&fields.metadata));
    let signature = p.identity.sign(label::OFFER, &body);
    let offer = SignedOffer { body, signature };
    if offer.body.len() + offer.signature.len() > MAX_OFFER_LEN {
        return Err(HandshakeError::Malformed("offer"));
    }
    Ok((
        PendingOffer {
            transfer_id: fields.transfer_id,
            sender_nonce: fields.sender_nonce,
            master,
            ephemeral,
            offer: offer.clone(),
        },
        offer,
    ))
}

impl PendingOffer {
    /// The transfer id of this offer.
    pub fn transfer_id(&self) -> TransferId {
        self.transfer_id
    }

    /// Checks the receiver's accept (its MAC proves it holds M) and derives the
    /// stream keys. M and the ephemeral key are consumed.
    pub fn handle_accept(self, accept: &[u8]) -> Result<StreamKeys, HandshakeError> {
        if accept.len() != ACCEPT_LEN {
            return Err(HandshakeError::Malformed("accept"));
        }
        let mut d = Decoder::new(accept);
        let bad = |_| HandshakeError::Malformed("accept");
        let receiver_nonce = Nonce(d.array().map_err(bad)?);
        let share: [u8; SHARE_LEN] = d.array().map_err(bad)?;
        let tag: [u8; TAG_LEN] = d.array().map_err(bad)?;
        let shared = self.ephemeral.agree(&share)?;
        let fixed = accept_fixed(&self.transfer_id, &receiver_nonce, &share);
        let (accept_key, keys) = derive_stream_keys(
            self.master,
            shared,
            &self.sender_nonce,
            &receiver_nonce,
            &self.transfer_id,
            &transcript_hash(&self.offer, &fixed),
        );
        mac::verify(&accept_key, &[&fixed], &tag)?;
        Ok(keys)
    }
}

/// An offer whose signature, addressee and time were checked.
#[derive(Debug)]
pub struct VerifiedOffer {
    fields: OfferFields,
    offer: SignedOffer,
}

/// Verifies an offer against the sender's pinned key, before any RSA decryption.
///
/// Checks, in order: structure and version; that `sender_key` is the key the
/// offer names; the signature; that the offer names this agent and its key; that
/// its time lies within `window_secs` of `now_unix`. Replay of the transfer id is
/// the caller's job (the agent's replay guard).
pub fn verify_offer(
    offer: &SignedOffer,
    sender_key: &PublicKey,
    me: &AgentName,
    my_fp: Fingerprint,
    now_unix: u64,
    window_secs: u64,
) -> Result<VerifiedOffer, HandshakeError> {
    let fields = offer.parse()?;
    if sender_key.fingerprint() != fields.sender_fp {
        return Err(HandshakeError::SenderKey);
    }
    sender_key.verify(label::OFFER, &offer.body, &offer.signature)?;
    if &fields.receiver != me || fields.receiver_fp != my_fp {
        return Err(HandshakeError::NotForUs {
            name: fields.receiver.clone(),
            fingerprint: fields.receiver_fp,
        });
    }
    let skew = fields.time.abs_diff(now_unix);
    if skew > window_secs {
        return Err(HandshakeError::Stale {
            skew,
            window: window_secs,
        });
    }
    Ok(VerifiedOffer {
        fields,
        offer: offer.clone(),
    })
}

impl VerifiedOffer {
    /// The authenticated fields.
    pub fn fields(&self) -> &OfferFields {
        &self.fields
    }

    /// Unwraps M (blinded OAEP; a random M on failure) and opens the metadata.
    /// Any failure is the one opaque [`HandshakeError::Auth`].
    pub fn open(self, me: &Identity) -> Result<OpenedOffer, HandshakeError> {
        let f = &self.fields;
        let master = me.unwrap_master_key(&oaep_label(f), &f.wrapped_key);
        let keys = metadata_keys(
            &master,
            &f.sender_nonce,
            &f.transfer_id,
            &header_hash(&self.offer.body[..f.header_len]),
        );
        let plain = seal::open(
            &keys,
            &metadata_ad(&f.transfer_id),
            &f.metadata.iv,
            &f.metadata.ciphertext,
            &f.metadata.tag,
            MAX_METADATA_LEN + 16,
        )?;
        if plain.len() > MAX_METADATA_LEN {
            return Err(HandshakeError::Malformed("metadata"));
        }
        let (metadata, rest) = postcard::take_from_bytes::<Metadata>(&plain)
            .map_err(|_| HandshakeError::Malformed("metadata"))?;
        if !rest.is_empty() {
            return Err(HandshakeError::Malformed("metadata"));
        }
        Ok(OpenedOffer {
            verified: self,
            master,
            metadata,
        })
    }
}

/// An offer whose master key and metadata were recovered and authenticated.
#[derive(Debug)]
pub struct OpenedOffer {
    verified: VerifiedOffer,
    master: MasterKey,
    metadata: Metadata,
}

impl OpenedOffer {
    /// The authenticated offer fields.
    pub fn fields(&self) -> &OfferFields {
        &self.verified.fields
    }

    /// The authenticated metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// Accepts: fresh receiver nonce and X25519 share, the accept MAC, and the
    /// stream keys. M and the ephemeral key are consumed here.
    pub fn accept(self) -> Result<(Vec<u8>, StreamKeys), HandshakeError> {
        let f = &self.verified.fields;
        let nonce = Nonce::random();
        let ephemeral = Ephemeral::generate();
        let share = ephemeral.public();
        let shared = ephemeral.agree(&f.sender_share)?;
        let fixed = accept_fixed(&f.transfer_id, &nonce, &share);
        let (accept_key, keys) = derive_stream_keys(
            self.master,
            shared,
            &f.sender_nonce,
            &nonce,
            &f.transfer_id,
            &transcript_hash(&self.verified.offer, &fixed),
        );
        let tag = mac::tag(&accept_key, &[&fixed]);
        let mut accept = Vec::with_capacity(ACCEPT_LEN);
        accept.extend_from_slice(&nonce.0);
        accept.extend_from_slice(&share);
        accept.extend_from_slice(&tag);
        Ok((accept, keys))
    }
}
