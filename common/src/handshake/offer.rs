//! The offer (PROTOCOL.md §3.3): built and signed by the sender, parsed,
//! verified and opened by the receiver, in that order.

use super::accept::OpenedOffer;
use super::{
    HandshakeError, MAX_OFFER_LEN, MAX_TERMS_LEN, MAX_WRAPPED_LEN, OfferFields, SignedOffer, Terms,
    decode_sealed, encode_sealed, header_hash, label, name_field, oaep_label, terms_ad,
};
use crate::PROTOCOL_VERSION;
use crate::crypto::ecdh::Ephemeral;
use crate::crypto::kem::KemKeyPair;
use crate::crypto::keys::MasterKey;
use crate::crypto::seal::{self, IV_LEN, Sealed, TAG_LEN};
use crate::crypto::wrap;
use crate::encode::{Decoder, Encoder};
use crate::identity::{Fingerprint, Identity, PublicKey};
use crate::ids::{Nonce, StreamId, TransferId};
use crate::name::AgentName;
use crate::schedule::terms_keys;

fn encode_header(f: &OfferFields) -> Vec<u8> {
    Encoder::default()
        .u16(f.version)
        .fixed(&f.transfer_id.0)
        .fixed(&f.stream_id.0)
        .bytes(f.sender.as_str().as_bytes())
        .fixed(&f.sender_fp.0)
        .bytes(f.receiver.as_str().as_bytes())
        .fixed(&f.receiver_fp.0)
        .u64(f.time)
        .fixed(&f.sender_nonce.0)
        .fixed(&f.sender_share)
        .fixed(&f.kem_key[..])
        .bytes(&f.wrapped_key)
        .finish()
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
        let stream_id = StreamId(d.array().map_err(|_| bad())?);
        let sender = name_field(&mut d, "offer")?;
        let sender_fp = Fingerprint(d.array().map_err(|_| bad())?);
        let receiver = name_field(&mut d, "offer")?;
        let receiver_fp = Fingerprint(d.array().map_err(|_| bad())?);
        let time = d.u64().map_err(|_| bad())?;
        let sender_nonce = Nonce(d.array().map_err(|_| bad())?);
        let sender_share = d.array().map_err(|_| bad())?;
        let kem_key = Box::new(d.array().map_err(|_| bad())?);
        let wrapped_key = d.bytes(MAX_WRAPPED_LEN).map_err(|_| bad())?.to_vec();
        let header_len = self.body.len() - d.remaining();
        let terms = decode_sealed(d, "offer")?;
        Ok(OfferFields {
            version,
            transfer_id,
            stream_id,
            sender,
            sender_fp,
            receiver,
            receiver_fp,
            time,
            sender_nonce,
            sender_share,
            kem_key,
            wrapped_key,
            terms,
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
    /// The stream the offer is for (one per upload, shared by its receivers).
    pub stream_id: StreamId,
    /// What is offered.
    pub terms: Terms,
    /// Sender's clock, Unix seconds.
    pub now_unix: u64,
}

/// The sender's state between the offer and the accept.
pub struct PendingOffer {
    pub(super) transfer_id: TransferId,
    pub(super) stream_id: StreamId,
    pub(super) sender_nonce: Nonce,
    pub(super) master: MasterKey,
    pub(super) ephemeral: Ephemeral,
    pub(super) kem: KemKeyPair,
    pub(super) offer: SignedOffer,
}

impl std::fmt::Debug for PendingOffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingOffer")
            .field("transfer_id", &self.transfer_id)
            .finish_non_exhaustive()
    }
}

/// Builds and signs an offer: fresh M, transfer id, nonce, X25519 share and
/// ML-KEM-768 key pair.
pub fn make_offer(p: OfferParams<'_>) -> Result<(PendingOffer, SignedOffer), HandshakeError> {
    let terms_plain =
        postcard::to_stdvec(&p.terms).map_err(|_| HandshakeError::Malformed("terms"))?;
    if terms_plain.len() > MAX_TERMS_LEN {
        return Err(HandshakeError::Malformed("terms"));
    }
    let master = MasterKey::random();
    let ephemeral = Ephemeral::generate();
    let kem = KemKeyPair::generate();
    let mut fields = OfferFields {
        version: PROTOCOL_VERSION,
        transfer_id: TransferId::random(),
        stream_id: p.stream_id,
        sender: p.sender,
        sender_fp: p.identity.fingerprint(),
        receiver: p.receiver,
        receiver_fp: p.receiver_key.fingerprint(),
        time: p.now_unix,
        sender_nonce: Nonce::random(),
        sender_share: ephemeral.public(),
        kem_key: Box::new(*kem.encapsulation_key()),
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
    fields.terms = seal::seal(&keys, &terms_ad(&fields.transfer_id), &terms_plain);
    let mut body = header;
    body.extend_from_slice(&encode_sealed(&fields.terms));
    let signature = p.identity.sign(label::OFFER, &body);
    let offer = SignedOffer { body, signature };
    if offer.body.len() + offer.signature.len() > MAX_OFFER_LEN {
        return Err(HandshakeError::Malformed("offer"));
    }
    Ok((
        PendingOffer {
            transfer_id: fields.transfer_id,
            stream_id: fields.stream_id,
            sender_nonce: fields.sender_nonce,
            master,
            ephemeral,
            kem,
            offer: offer.clone(),
        },
        offer,
    ))
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

    /// Unwraps M (blinded OAEP; a random M on failure) and opens the terms.
    /// Any failure is the one opaque [`HandshakeError::Auth`].
    pub fn open(self, me: &Identity) -> Result<OpenedOffer, HandshakeError> {
        let f = &self.fields;
        let master = me.unwrap_master_key(&oaep_label(f), &f.wrapped_key);
        let keys = terms_keys(
            &master,
            &f.sender_nonce,
            &f.transfer_id,
            &header_hash(&self.offer.body[..f.header_len]),
        );
        let plain = seal::open(
            &keys,
            &terms_ad(&f.transfer_id),
            &f.terms.iv,
            &f.terms.ciphertext,
            &f.terms.tag,
            MAX_TERMS_LEN + 16,
        )?;
        if plain.len() > MAX_TERMS_LEN {
            return Err(HandshakeError::Malformed("terms"));
        }
        let terms = match postcard::take_from_bytes::<Terms>(&plain) {
            Ok((terms, [])) => terms,
            _ => return Err(HandshakeError::Malformed("terms")),
        };
        Ok(OpenedOffer {
            fields: self.fields,
            offer: self.offer,
            master,
            terms,
        })
    }
}
