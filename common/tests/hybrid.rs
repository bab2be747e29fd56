//! The handshake (the same in versions 2 to 6) against a broker that edits
//! it: the ML-KEM-768
//! encapsulation key stripped or swapped in the offer, the ciphertext
//! stripped or swapped in the accept, shares of the wrong length, keys that
//! are not valid points or vectors, and terms beyond their bound. Offers are
//! also built by hand from PROTOCOL.md §3.3, as a second implementation
//! would, and must open.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use keyferry_common::crypto::ecdh::{Ephemeral, SHARE_LEN};
use keyferry_common::crypto::kem::{self, CT_LEN, EK_LEN, KemKeyPair};
use keyferry_common::crypto::keys::MasterKey;
use keyferry_common::crypto::{seal, wrap};
use keyferry_common::encode::Encoder;
use keyferry_common::handshake::{
    HandshakeError, Kind, MIN_ACCEPT_LEN, OfferParams, ResumePoint, SignedOffer, Terms, make_offer,
    verify_offer,
};
use keyferry_common::identity::Identity;
use keyferry_common::ids::{Nonce, StreamId, TransferId};
use keyferry_common::schedule::terms_keys;
use sha2::{Digest as _, Sha256};

mod kit;

use kit::{alice, bob, name};

const NOW: u64 = 1_800_000_000;
const WINDOW: u64 = 300;

fn terms() -> Terms {
    Terms {
        kind: Kind::Files,
        size: 1 << 30,
        size_known: true,
        resumes: Some(StreamId([9; 16])),
        receivers: 1,
        punch: Vec::new(),
    }
}

fn verify(
    offer: &SignedOffer,
) -> Result<keyferry_common::handshake::VerifiedOffer, HandshakeError> {
    verify_offer(
        offer,
        alice().public(),
        &name("bob"),
        bob().fingerprint(),
        NOW,
        WINDOW,
    )
}

/// The parts of a hand-made offer a test may get wrong on purpose.
struct Parts {
    share: Vec<u8>,
    kem_key: Vec<u8>,
    terms: Vec<u8>,
}

impl Parts {
    fn honest() -> Self {
        Self {
            share: Ephemeral::generate().public().to_vec(),
            kem_key: KemKeyPair::generate().encapsulation_key().to_vec(),
            terms: postcard::to_stdvec(&terms()).unwrap(),
        }
    }
}

/// The protocol version PROTOCOL.md describes.
const VERSION: u16 = 9;

/// An offer from Alice to Bob built from PROTOCOL.md §3.3 alone, signed by
/// Alice whatever its parts.
fn hand_made(p: &Parts) -> SignedOffer {
    let (tid, sid, nonce, master) = (
        TransferId::random(),
        StreamId::random(),
        Nonce::random(),
        MasterKey::random(),
    );
    let (afp, bfp) = (alice().fingerprint(), bob().fingerprint());
    let label: [u8; 32] = Sha256::digest(
        Encoder::new("keyferry/v2 master-key")
            .u16(VERSION)
            .fixed(&tid.0)
            .fixed(&afp.0)
            .fixed(&bfp.0)
            .fixed(&nonce.0)
            .finish(),
    )
    .into();
    let wrapped = wrap::wrap_master_key(bob().public().rsa(), &label, &master);
    let mut body = Encoder::default()
        .u16(VERSION)
        .fixed(&tid.0)
        .fixed(&sid.0)
        .bytes(b"alice")
        .fixed(&afp.0)
        .bytes(b"bob")
        .fixed(&bfp.0)
        .u64(NOW)
        .fixed(&nonce.0)
        .fixed(&p.share)
        .fixed(&p.kem_key)
        .bytes(&wrapped)
        .finish();
    let header_hash: [u8; 32] = Sha256::digest(
        Encoder::new("keyferry/v2 offer-header")
            .fixed(&body)
            .finish(),
    )
    .into();
    let keys = terms_keys(&master, &nonce, &tid, &header_hash);
    let ad = Encoder::new("keyferry/v2 terms").fixed(&tid.0).finish();
    let sealed = seal::seal(&keys, &ad, &p.terms);
    body.extend(
        Encoder::default()
            .fixed(&sealed.iv)
            .bytes(&sealed.ciphertext)
            .fixed(&sealed.tag)
            .finish(),
    );
    let signature = alice().sign("keyferry/v2 offer", &body);
    SignedOffer { body, signature }
}

#[test]
fn an_offer_made_from_protocol_md_opens_and_accepts() {
    let offer = hand_made(&Parts::honest());
    let opened = verify(&offer).unwrap().open(bob()).unwrap();
    assert_eq!(opened.terms(), &terms());
    let (accept, _) = opened.accept(ResumePoint::none()).unwrap();
    assert_eq!(accept.len(), MIN_ACCEPT_LEN);
    assert_eq!(MIN_ACCEPT_LEN, 32 + 32 + 1088 + 8 + 4 + 2 + 32 + 32);
}

#[test]
fn shares_of_the_wrong_length_are_refused_before_anything_is_unwrapped() {
    let honest = Parts::honest();
    let variants = [
        Parts {
            share: vec![9; SHARE_LEN - 1],
            ..Parts::honest()
        },
        Parts {
            share: vec![9; SHARE_LEN + 1],
            ..Parts::honest()
        },
        Parts {
            kem_key: honest.kem_key[..EK_LEN - 1].to_vec(),
            ..Parts::honest()
        },
        Parts {
            kem_key: [honest.kem_key.as_slice(), &[0]].concat(),
            ..Parts::honest()
        },
        // Stripped entirely: an offer as version 1 laid it out, signed as v2.
        Parts {
            kem_key: Vec::new(),
            ..Parts::honest()
        },
    ];
    for (i, p) in variants.iter().enumerate() {
        assert_eq!(
            verify(&hand_made(p)).unwrap_err(),
            HandshakeError::Malformed("offer"),
            "variant {i}"
        );
    }
}

#[test]
fn an_invalid_mlkem_key_or_a_low_order_x25519_share_fails_the_accept() {
    // Coefficients of 0xfff are above q = 3329: FIPS 203's modulus check.
    let invalid_kem = Parts {
        kem_key: vec![0xff; EK_LEN],
        ..Parts::honest()
    };
    let zero_share = Parts {
        share: vec![0; SHARE_LEN],
        ..Parts::honest()
    };
    for (i, p) in [invalid_kem, zero_share].iter().enumerate() {
        let opened = verify(&hand_made(p)).unwrap().open(bob()).unwrap();
        assert_eq!(
            opened.accept(ResumePoint::none()).unwrap_err(),
            HandshakeError::Auth,
            "variant {i}"
        );
    }
}

#[test]
fn terms_beyond_their_bound_are_refused_even_when_their_seal_fits() {
    let good = postcard::to_stdvec(&terms()).unwrap();
    let open = |t: Vec<u8>| {
        verify(&hand_made(&Parts {
            terms: t,
            ..Parts::honest()
        }))
        .unwrap()
        .open(bob())
        .map(|o| o.terms().clone())
    };
    assert_eq!(open(good.clone()), Ok(terms()));
    let trailing = [good.as_slice(), &[0]].concat();
    assert_eq!(open(trailing), Err(HandshakeError::Malformed("terms")));
    // 257 bytes seal into the 272-byte ciphertext bound, but are refused.
    let mut long = good.clone();
    long.resize(257, 0);
    assert_eq!(open(long), Err(HandshakeError::Malformed("terms")));
}

fn offer() -> (keyferry_common::handshake::PendingOffer, SignedOffer) {
    make_offer(OfferParams {
        identity: alice(),
        sender: name("alice"),
        receiver: name("bob"),
        receiver_key: bob().public(),
        stream_id: StreamId::random(),
        terms: terms(),
        now_unix: NOW,
    })
    .unwrap()
}

/// Where the encapsulation key lies in an offer from Alice to Bob.
fn kem_key_at() -> std::ops::Range<usize> {
    let start = 2 + 16 + 16 + (4 + 5) + 32 + (4 + 3) + 32 + 8 + 32 + 32;
    start..start + EK_LEN
}

#[test]
fn a_broker_that_strips_or_swaps_the_mlkem_key_breaks_the_signature() {
    let (_, good) = offer();
    let at = kem_key_at();
    let fields = good.parse().unwrap();
    assert_eq!(&good.body[at.clone()], &fields.kem_key[..], "layout");
    // Swapped for a key the broker can decapsulate for.
    let mut swapped = good.clone();
    swapped.body[at.clone()].copy_from_slice(KemKeyPair::generate().encapsulation_key());
    assert_eq!(verify(&swapped).unwrap_err(), HandshakeError::Auth);
    // Stripped.
    let mut stripped = good.clone();
    stripped.body.drain(at);
    assert!(verify(&stripped).is_err());
    verify(&good).unwrap();
}

/// Where the ML-KEM ciphertext lies in an accept.
const CT_AT: std::ops::Range<usize> = 64..64 + CT_LEN;

#[test]
fn a_broker_that_strips_or_swaps_the_mlkem_ciphertext_fails_the_accept() {
    let (pending, offer) = offer();
    let opened = verify(&offer).unwrap().open(bob()).unwrap();
    let (accept, _) = opened.accept(ResumePoint::none()).unwrap();
    // The broker encapsulates to the (public) key in the offer itself, so
    // it would know S_mlkem; the accept's MAC under M refuses it.
    let fields = offer.parse().unwrap();
    let (ct, _) = kem::encapsulate(&fields.kem_key).unwrap();
    let mut swapped = accept.clone();
    swapped[CT_AT].copy_from_slice(&ct);
    assert_eq!(
        pending.handle_accept(&swapped).unwrap_err(),
        HandshakeError::Auth
    );
    let (pending, offer) = self::offer();
    let accept = verify(&offer)
        .unwrap()
        .open(bob())
        .unwrap()
        .accept(ResumePoint::none())
        .unwrap()
        .0;
    let mut stripped = accept.clone();
    stripped.drain(CT_AT);
    assert_eq!(
        pending.handle_accept(&stripped).unwrap_err(),
        HandshakeError::Malformed("accept")
    );
}

#[test]
fn a_resume_offset_the_broker_changed_fails_the_accept() {
    let (pending, offer) = offer();
    let resume = ResumePoint {
        offset: 1 << 20,
        prefix_hash: [1; 32],
        manifest_hash: [2; 32],
    };
    let opened = verify(&offer).unwrap().open(bob()).unwrap();
    let (accept, _) = opened.accept(resume).unwrap();
    let offset_at = 64 + CT_LEN;
    assert_eq!(
        accept[offset_at..offset_at + 8],
        (1u64 << 20).to_be_bytes(),
        "layout"
    );
    let mut changed = accept.clone();
    changed[offset_at + 7] ^= 1;
    assert_eq!(
        pending.handle_accept(&changed).unwrap_err(),
        HandshakeError::Auth
    );
}

#[test]
fn the_resume_proof_holds_only_for_the_prefix_the_receiver_holds() {
    let (pending, offer) = offer();
    let resume = ResumePoint {
        offset: 4096,
        prefix_hash: [1; 32],
        manifest_hash: [2; 32],
    };
    let (accept, _) = verify(&offer)
        .unwrap()
        .open(bob())
        .unwrap()
        .accept(resume)
        .unwrap();
    let accepted = pending.handle_accept(&accept).unwrap();
    assert_eq!(accepted.resume_offset, 4096);
    assert!(accepted.resume_matches(&[1; 32], &[2; 32]));
    assert!(
        !accepted.resume_matches(&[3; 32], &[2; 32]),
        "another prefix"
    );
    assert!(
        !accepted.resume_matches(&[1; 32], &[3; 32]),
        "another manifest"
    );
}

#[test]
fn a_receiver_key_is_needed_to_read_the_terms() {
    // Carol, given Bob's offer, cannot open its terms.
    let carol: Identity = kit::fixture("carol");
    let (_, offer) = offer();
    let verified = verify_offer(
        &offer,
        alice().public(),
        &name("bob"),
        bob().fingerprint(),
        NOW,
        WINDOW,
    )
    .unwrap();
    assert_eq!(verified.open(&carol).unwrap_err(), HandshakeError::Auth);
}

#[test]
fn the_terms_example_of_protocol_md_is_the_encoding() {
    let t = Terms {
        kind: Kind::Files,
        size: 5,
        size_known: true,
        resumes: None,
        receivers: 1,
        punch: Vec::new(),
    };
    assert_eq!(postcard::to_stdvec(&t).unwrap(), [0, 5, 1, 0, 1, 0]);
}
