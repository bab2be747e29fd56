//! The stored offer and the stored receipt (PROTOCOL.md §3.4): a transfer
//! sealed to a receiver who is offline, against one of its prekey bundles
//! ([`super::prekey`]) instead of an accept.
//!
//! The sender draws M (RSA-wrapped as in a live offer), a nonce and an
//! ephemeral X25519 key, agrees with the bundle's X25519 key and
//! encapsulates to its ML-KEM key; the pair keys come from M ‖ `S_x` ‖ `S_k`
//! exactly as for a live transfer (§4), bound to a transcript of the signed
//! stored offer and the bundle. The receiver opens it with its identity key
//! *and* the bundle's private halves, which it deletes once the transfer is
//! placed or refused: from then on its identity key alone opens nothing.
//!
//! The receipt ([`super::receipt`]) is the receiver's signed word on how it
//! ended.

use sha2::{Digest as _, Sha256};

use super::prekey::{Bundle, PrekeyKeys};
use super::{
    HandshakeError, MAX_OFFER_LEN, MAX_TERMS_LEN, MAX_WRAPPED_LEN, SignedOffer, Terms,
    decode_sealed, encode_sealed, name_field, terms_ad,
};
use crate::PROTOCOL_VERSION;
use crate::crypto::ecdh::{Ephemeral, SHARE_LEN};
use crate::crypto::kem::{self, CT_LEN};
use crate::crypto::keys::MasterKey;
use crate::crypto::seal::{self, IV_LEN, Sealed, TAG_LEN};
use crate::crypto::wrap;
use crate::encode::{Decoder, Encoder};
use crate::identity::{Fingerprint, Identity, PublicKey};
use crate::ids::{Nonce, StreamId, TransferId};
use crate::name::AgentName;
use crate::schedule::{PairKeys, Secrets, derive_pair_keys, terms_keys};

/// Labels of the stored handshake.
pub mod label {
    /// Signature over a stored offer's body.
    pub const STORED_OFFER: &str = "keyferry/v7 stored-offer";
    /// Hash of a stored offer's header (the terms keys' context).
    pub const STORED_HEADER: &str = "keyferry/v7 stored-header";
    /// OAEP label of a stored offer's master key.
    pub const STORED_MASTER_KEY: &str = "keyferry/v7 stored-master-key";
    /// The receiver nonce a bundle stands for.
    pub const PREKEY_NONCE: &str = "keyferry/v7 prekey-nonce";
    /// The stored transcript (context of every pair key).
    pub const STORED_TRANSCRIPT: &str = "keyferry/v7 stored-transcript";
}

/// Longest a stored offer's time may lie in the receiver's past, in seconds
/// (35 days: longer than any broker keeps a stored transfer, 30 days at most).
pub const MAX_STORED_AGE_SECS: u64 = 35 * 24 * 3600;
/// How far it may lie in the receiver's future.
pub const STORED_SKEW_SECS: u64 = 300;

/// A stored offer's fields, parsed but not yet authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredFields {
    /// Transfer id (also the stored transfer's id at the broker).
    pub transfer_id: TransferId,
    /// The stream.
    pub stream_id: StreamId,
    /// Sender's name.
    pub sender: AgentName,
    /// Sender's key fingerprint.
    pub sender_fp: Fingerprint,
    /// Receiver's name.
    pub receiver: AgentName,
    /// Receiver's key fingerprint.
    pub receiver_fp: Fingerprint,
    /// Sender's clock when it sealed the offer, Unix seconds.
    pub time: u64,
    /// Sender nonce.
    pub sender_nonce: Nonce,
    /// The receiver's bundle it was sealed to.
    pub bundle_id: [u8; 16],
    /// Sender's ephemeral X25519 share.
    pub sender_share: [u8; SHARE_LEN],
    /// ML-KEM-768 ciphertext to the bundle's key.
    pub kem_ct: Box<[u8; CT_LEN]>,
    /// RSA-OAEP(receiver key, M).
    pub wrapped_key: Vec<u8>,
    /// The sealed terms.
    pub terms: Sealed,
    header_len: usize,
}

fn encode_header(f: &StoredFields) -> Vec<u8> {
    Encoder::default()
        .u16(PROTOCOL_VERSION)
        .fixed(&f.transfer_id.0)
        .fixed(&f.stream_id.0)
        .bytes(f.sender.as_str().as_bytes())
        .fixed(&f.sender_fp.0)
        .bytes(f.receiver.as_str().as_bytes())
        .fixed(&f.receiver_fp.0)
        .u64(f.time)
        .fixed(&f.sender_nonce.0)
        .fixed(&f.bundle_id)
        .fixed(&f.sender_share)
        .fixed(&f.kem_ct[..])
        .bytes(&f.wrapped_key)
        .finish()
}

fn header_hash(header: &[u8]) -> [u8; 32] {
    Sha256::digest(Encoder::new(label::STORED_HEADER).fixed(header).finish()).into()
}

fn oaep_label(f: &StoredFields) -> [u8; 32] {
    Sha256::digest(
        Encoder::new(label::STORED_MASTER_KEY)
            .u16(PROTOCOL_VERSION)
            .fixed(&f.transfer_id.0)
            .fixed(&f.sender_fp.0)
            .fixed(&f.receiver_fp.0)
            .fixed(&f.sender_nonce.0)
            .fixed(&f.bundle_id)
            .finish(),
    )
    .into()
}

fn bundle_nonce(bundle_body: &[u8]) -> Nonce {
    Nonce(
        Sha256::digest(
            Encoder::new(label::PREKEY_NONCE)
                .fixed(bundle_body)
                .finish(),
        )
        .into(),
    )
}

fn transcript(offer: &SignedOffer, bundle_body: &[u8]) -> [u8; 32] {
    let signed = Encoder::new(label::STORED_OFFER)
        .fixed(&offer.body)
        .finish();
    Sha256::digest(
        Encoder::new(label::STORED_TRANSCRIPT)
            .bytes(&signed)
            .bytes(bundle_body)
            .finish(),
    )
    .into()
}

/// Parses a stored offer's body. Nothing is authenticated yet.
pub fn parse_stored(offer: &SignedOffer) -> Result<StoredFields, HandshakeError> {
    let bad = |_| HandshakeError::Malformed("stored offer");
    if offer.body.len() + offer.signature.len() > MAX_OFFER_LEN {
        return Err(HandshakeError::Malformed("stored offer"));
    }
    let mut d = Decoder::new(&offer.body);
    let version = d.u16().map_err(bad)?;
    if version != PROTOCOL_VERSION {
        return Err(HandshakeError::Version(version));
    }
    let transfer_id = TransferId(d.array().map_err(bad)?);
    let stream_id = StreamId(d.array().map_err(bad)?);
    let sender = name_field(&mut d, "stored offer")?;
    let sender_fp = Fingerprint(d.array().map_err(bad)?);
    let receiver = name_field(&mut d, "stored offer")?;
    let receiver_fp = Fingerprint(d.array().map_err(bad)?);
    let time = d.u64().map_err(bad)?;
    let sender_nonce = Nonce(d.array().map_err(bad)?);
    let bundle_id = d.array().map_err(bad)?;
    let sender_share = d.array().map_err(bad)?;
    let kem_ct = Box::new(d.array().map_err(bad)?);
    let wrapped_key = d.bytes(MAX_WRAPPED_LEN).map_err(bad)?.to_vec();
    let header_len = offer.body.len() - d.remaining();
    let terms = decode_sealed(d, "stored offer")?;
    Ok(StoredFields {
        transfer_id,
        stream_id,
        sender,
        sender_fp,
        receiver,
        receiver_fp,
        time,
        sender_nonce,
        bundle_id,
        sender_share,
        kem_ct,
        wrapped_key,
        terms,
        header_len,
    })
}

/// What a sender needs to seal a stored offer.
#[derive(Debug)]
pub struct StoredParams<'a> {
    /// The sender's identity.
    pub identity: &'a Identity,
    /// The sender's name.
    pub sender: AgentName,
    /// The receiver's key, checked against its pin.
    pub receiver_key: &'a PublicKey,
    /// The receiver's bundle, verified with that key ([`super::verify_bundle`]).
    pub bundle: &'a Bundle,
    /// The stream.
    pub stream_id: StreamId,
    /// What is offered (`resumes` none, `receivers` 1, `punch` empty).
    pub terms: Terms,
    /// Sender's clock, Unix seconds.
    pub now_unix: u64,
}

/// Seals a stored offer to `p.bundle`: the signed offer, and the pair's keys
/// (the sender's side of what the receiver derives when it opens it).
pub fn make_stored_offer(p: StoredParams<'_>) -> Result<(SignedOffer, PairKeys), HandshakeError> {
    let terms_plain =
        postcard::to_stdvec(&p.terms).map_err(|_| HandshakeError::Malformed("terms"))?;
    if terms_plain.len() > MAX_TERMS_LEN {
        return Err(HandshakeError::Malformed("terms"));
    }
    let master = MasterKey::random();
    let ephemeral = Ephemeral::generate();
    let sender_share = ephemeral.public();
    let x25519 = ephemeral.agree(&p.bundle.share)?;
    let (ct, mlkem) = kem::encapsulate(&p.bundle.kem_key)?;
    let mut fields = StoredFields {
        transfer_id: TransferId::random(),
        stream_id: p.stream_id,
        sender: p.sender,
        sender_fp: p.identity.fingerprint(),
        receiver: p.bundle.receiver.clone(),
        receiver_fp: p.receiver_key.fingerprint(),
        time: p.now_unix,
        sender_nonce: Nonce::random(),
        bundle_id: p.bundle.id,
        sender_share,
        kem_ct: Box::new(ct),
        wrapped_key: Vec::new(),
        terms: Sealed {
            iv: [0; IV_LEN],
            ciphertext: Vec::new(),
            tag: [0; TAG_LEN],
        },
        header_len: 0,
    };
    fields.wrapped_key = wrap::wrap_master_key(p.receiver_key.rsa(), &oaep_label(&fields), &master);
    let header = encode_header(&fields);
    let keys = terms_keys(
        &master,
        &fields.sender_nonce,
        &fields.transfer_id,
        &header_hash(&header),
    );
    let sealed = seal::seal(&keys, &terms_ad(&fields.transfer_id), &terms_plain);
    let mut body = header;
    body.extend_from_slice(&encode_sealed(&sealed));
    let signature = p.identity.sign(label::STORED_OFFER, &body);
    let offer = SignedOffer { body, signature };
    if offer.body.len() + offer.signature.len() > MAX_OFFER_LEN {
        return Err(HandshakeError::Malformed("stored offer"));
    }
    let (_, pair) = derive_pair_keys(
        Secrets {
            master,
            x25519,
            mlkem,
        },
        &fields.sender_nonce,
        &bundle_nonce(&p.bundle.body),
        &fields.transfer_id,
        &fields.stream_id,
        &transcript(&offer, &p.bundle.body),
    );
    Ok((offer, pair))
}

/// A stored offer whose signature, addressee and time were checked.
#[derive(Debug)]
pub struct VerifiedStored {
    fields: StoredFields,
    offer: SignedOffer,
}

/// The receiver's checks of a stored offer before any private key is used:
/// structure and version, `sender_key` is the key it names, the signature,
/// that it names this agent and key, and that its time lies between
/// [`MAX_STORED_AGE_SECS`] ago and [`STORED_SKEW_SECS`] ahead.
pub fn verify_stored(
    offer: &SignedOffer,
    sender_key: &PublicKey,
    me: &AgentName,
    my_fp: Fingerprint,
    now_unix: u64,
) -> Result<VerifiedStored, HandshakeError> {
    let fields = parse_stored(offer)?;
    if sender_key.fingerprint() != fields.sender_fp {
        return Err(HandshakeError::SenderKey);
    }
    sender_key.verify(label::STORED_OFFER, &offer.body, &offer.signature)?;
    if &fields.receiver != me || fields.receiver_fp != my_fp {
        return Err(HandshakeError::NotForUs {
            name: fields.receiver.clone(),
            fingerprint: fields.receiver_fp,
        });
    }
    let too_old = now_unix.saturating_sub(fields.time) > MAX_STORED_AGE_SECS;
    let too_new = fields.time.saturating_sub(now_unix) > STORED_SKEW_SECS;
    if too_old || too_new {
        return Err(HandshakeError::Stale {
            skew: fields.time.abs_diff(now_unix),
            window: MAX_STORED_AGE_SECS,
        });
    }
    Ok(VerifiedStored {
        fields,
        offer: offer.clone(),
    })
}

impl VerifiedStored {
    /// The authenticated fields.
    pub fn fields(&self) -> &StoredFields {
        &self.fields
    }

    /// Opens the offer with the identity key and the bundle's private halves
    /// (whose public bundle is `bundle`, the one the offer names): the terms
    /// and the pair's keys. Any failure is the one opaque
    /// [`HandshakeError::Auth`].
    pub fn open(
        self,
        me: &Identity,
        bundle: &Bundle,
        keys: &PrekeyKeys,
    ) -> Result<(Terms, PairKeys), HandshakeError> {
        let f = &self.fields;
        if bundle.id != f.bundle_id {
            return Err(HandshakeError::Auth);
        }
        let master = me.unwrap_master_key(&oaep_label(f), &f.wrapped_key);
        let tk = terms_keys(
            &master,
            &f.sender_nonce,
            &f.transfer_id,
            &header_hash(&self.offer.body[..f.header_len]),
        );
        let plain = seal::open(
            &tk,
            &terms_ad(&f.transfer_id),
            &f.terms.iv,
            &f.terms.ciphertext,
            &f.terms.tag,
            MAX_TERMS_LEN + 16,
        )?;
        let terms = match postcard::take_from_bytes::<Terms>(&plain) {
            Ok((terms, [])) if plain.len() <= MAX_TERMS_LEN => terms,
            _ => return Err(HandshakeError::Malformed("terms")),
        };
        let x25519 = keys.x25519.agree(&f.sender_share)?;
        let mlkem = keys.kem().decapsulate(&f.kem_ct);
        let (_, pair) = derive_pair_keys(
            Secrets {
                master,
                x25519,
                mlkem,
            },
            &f.sender_nonce,
            &bundle_nonce(&bundle.body),
            &f.transfer_id,
            &f.stream_id,
            &transcript(&self.offer, &bundle.body),
        );
        Ok((terms, pair))
    }
}
