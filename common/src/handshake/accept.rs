//! The accept (PROTOCOL.md §3.3): the receiver's fresh nonce, X25519 share and
//! ML-KEM-768 ciphertext, the offset of the data it already holds verified
//! from an earlier attempt, how long it may take to ask its user before the
//! data (0: it will not ask), a MAC proving it holds the same prefix (the
//! prefix's hash itself never travels), and a MAC over all of it; and the
//! sender's check of it. Both sides end with the pair's keys.

use sha2::{Digest as _, Sha256};

use super::direct::DirectTerms;
use super::{
    HandshakeError, MAX_ACCEPT_LEN, MIN_ACCEPT_LEN, OfferFields, SignedOffer, Terms, label,
    transcript_hash,
};
use crate::PROTOCOL_VERSION;
use crate::crypto::ecdh::{Ephemeral, SHARE_LEN};
use crate::crypto::kem::{self, CT_LEN};
use crate::crypto::keys::{MacKey, MasterKey};
use crate::crypto::mac;
use crate::crypto::seal::TAG_LEN;
use crate::encode::{Decoder, Encoder};
use crate::ids::{Nonce, StreamId, TransferId};
use crate::schedule::{PairKeys, Secrets, derive_pair_keys};

/// What the receiver already holds of an earlier attempt, verified: the
/// offset, the SHA-256 of those bytes, and the hash of that attempt's
/// manifest. Only the offset travels; the rest is proved by a MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumePoint {
    /// Plaintext bytes held verified.
    pub offset: u64,
    /// SHA-256 of those bytes.
    pub prefix_hash: [u8; 32],
    /// Hash of the manifest they belong to.
    pub manifest_hash: [u8; 32],
}

impl ResumePoint {
    /// Nothing held: start from the beginning.
    pub fn none() -> Self {
        Self {
            offset: 0,
            prefix_hash: Sha256::digest(b"").into(),
            manifest_hash: [0; 32],
        }
    }
}

fn accept_fixed(
    transfer_id: &TransferId,
    nonce: &Nonce,
    share: &[u8; SHARE_LEN],
    ct: &[u8; CT_LEN],
    offset: u64,
    ask: u32,
    direct: &[u8],
) -> Vec<u8> {
    Encoder::new(label::ACCEPT)
        .u16(PROTOCOL_VERSION)
        .fixed(&transfer_id.0)
        .fixed(&nonce.0)
        .fixed(share)
        .fixed(ct)
        .u64(offset)
        .u32(ask)
        .fixed(direct)
        .finish()
}

fn resume_input(transfer_id: &TransferId, r: &ResumePoint) -> Vec<u8> {
    Encoder::new(label::RESUME)
        .fixed(&transfer_id.0)
        .u64(r.offset)
        .fixed(&r.prefix_hash)
        .fixed(&r.manifest_hash)
        .finish()
}

/// An offer whose master key and terms were recovered and authenticated.
#[derive(Debug)]
pub struct OpenedOffer {
    pub(super) fields: OfferFields,
    pub(super) offer: SignedOffer,
    pub(super) master: MasterKey,
    pub(super) terms: Terms,
}

impl OpenedOffer {
    /// The authenticated offer fields.
    pub fn fields(&self) -> &OfferFields {
        &self.fields
    }

    /// The authenticated terms.
    pub fn terms(&self) -> &Terms {
        &self.terms
    }

    /// Accepts: fresh receiver nonce and X25519 share, an ML-KEM-768
    /// encapsulation to the sender's key, the resume point, the MACs, and the
    /// pair's keys. M and both shared secrets are consumed here.
    pub fn accept(self, resume: ResumePoint) -> Result<(Vec<u8>, PairKeys), HandshakeError> {
        self.accept_asking(resume, 0, &DirectTerms::never())
    }

    /// [`Self::accept`], telling the sender that this receiver will ask its
    /// user once the manifest arrived, taking up to `ask` seconds, and that
    /// no chunk may come before its `Proceed` (0: it will not ask); and
    /// which paths it takes for the stream, and where it listens for a
    /// direct connection.
    pub fn accept_asking(
        self,
        resume: ResumePoint,
        ask: u32,
        direct: &DirectTerms,
    ) -> Result<(Vec<u8>, PairKeys), HandshakeError> {
        let f = &self.fields;
        let nonce = Nonce::random();
        let ephemeral = Ephemeral::generate();
        let share = ephemeral.public();
        let x25519 = ephemeral.agree(&f.sender_share)?;
        let (ct, mlkem) = kem::encapsulate(&f.kem_key)?;
        let direct = direct.to_bytes();
        let fixed = accept_fixed(
            &f.transfer_id,
            &nonce,
            &share,
            &ct,
            resume.offset,
            ask,
            &direct,
        );
        let (keys, pair) = derive_pair_keys(
            Secrets {
                master: self.master,
                x25519,
                mlkem,
            },
            &f.sender_nonce,
            &nonce,
            &f.transfer_id,
            &f.stream_id,
            &transcript_hash(&self.offer, &fixed),
        );
        let resume_tag = mac::tag(&keys.resume, &[&resume_input(&f.transfer_id, &resume)]);
        let tag = mac::tag(&keys.accept, &[&fixed, &resume_tag]);
        let mut accept = Vec::with_capacity(MIN_ACCEPT_LEN + direct.len());
        accept.extend_from_slice(&nonce.0);
        accept.extend_from_slice(&share);
        accept.extend_from_slice(&ct);
        accept.extend_from_slice(&resume.offset.to_be_bytes());
        accept.extend_from_slice(&ask.to_be_bytes());
        accept.extend_from_slice(&direct);
        accept.extend_from_slice(&resume_tag);
        accept.extend_from_slice(&tag);
        Ok((accept, pair))
    }
}

/// A verified accept: the pair's keys, and the receiver's resume claim.
#[derive(Debug)]
pub struct Accepted {
    /// The pair's keys.
    pub pair: PairKeys,
    /// The offset the receiver says it holds verified (0: nothing).
    pub resume_offset: u64,
    /// Seconds the receiver may take to ask its user after the manifest;
    /// until its `Proceed`, no chunk may be sent (0: it does not ask).
    pub ask_secs: u32,
    /// Which paths the receiver takes, and where it listens.
    pub direct: DirectTerms,
    transfer_id: TransferId,
    resume_key: MacKey,
    resume_tag: [u8; TAG_LEN],
}

impl Accepted {
    /// Whether the receiver's `resume_offset` bytes are exactly the sender's:
    /// their SHA-256 is `prefix_hash` and they belong to a manifest hashing to
    /// `manifest_hash` (checked in constant time). If not, the sender starts
    /// from the beginning.
    pub fn resume_matches(&self, prefix_hash: &[u8; 32], manifest_hash: &[u8; 32]) -> bool {
        let claim = ResumePoint {
            offset: self.resume_offset,
            prefix_hash: *prefix_hash,
            manifest_hash: *manifest_hash,
        };
        let input = resume_input(&self.transfer_id, &claim);
        mac::verify(&self.resume_key, &[&input], &self.resume_tag).is_ok()
    }

    /// The stream the pair receives.
    pub fn stream_id(&self) -> StreamId {
        self.pair.stream_id
    }
}

impl super::PendingOffer {
    /// The transfer id of this offer.
    pub fn transfer_id(&self) -> TransferId {
        self.transfer_id
    }

    /// Checks the receiver's accept (its MAC proves it holds M and the
    /// ephemeral secrets) and derives the pair's keys. M, the X25519 key and
    /// the ML-KEM decapsulation key are consumed.
    pub fn handle_accept(self, accept: &[u8]) -> Result<Accepted, HandshakeError> {
        if !(MIN_ACCEPT_LEN..=MAX_ACCEPT_LEN).contains(&accept.len()) {
            return Err(HandshakeError::Malformed("accept"));
        }
        let mut d = Decoder::new(accept);
        let bad = |_| HandshakeError::Malformed("accept");
        let receiver_nonce = Nonce(d.array().map_err(bad)?);
        let share: [u8; SHARE_LEN] = d.array().map_err(bad)?;
        let ct: [u8; CT_LEN] = d.array().map_err(bad)?;
        let offset = d.u64().map_err(bad)?;
        let ask = d.u32().map_err(bad)?;
        let direct = DirectTerms::decode(&mut d).map_err(bad)?;
        let resume_tag: [u8; TAG_LEN] = d.array().map_err(bad)?;
        let tag: [u8; TAG_LEN] = d.array().map_err(bad)?;
        d.finish().map_err(bad)?;
        let x25519 = self.ephemeral.agree(&share)?;
        let mlkem = self.kem.decapsulate(&ct);
        let fixed = accept_fixed(
            &self.transfer_id,
            &receiver_nonce,
            &share,
            &ct,
            offset,
            ask,
            &direct.to_bytes(),
        );
        let (keys, pair) = derive_pair_keys(
            Secrets {
                master: self.master,
                x25519,
                mlkem,
            },
            &self.sender_nonce,
            &receiver_nonce,
            &self.transfer_id,
            &self.stream_id,
            &transcript_hash(&self.offer, &fixed),
        );
        mac::verify(&keys.accept, &[&fixed, &resume_tag], &tag)?;
        Ok(Accepted {
            pair,
            resume_offset: offset,
            ask_secs: ask,
            direct,
            transfer_id: self.transfer_id,
            resume_key: keys.resume,
            resume_tag,
        })
    }
}
