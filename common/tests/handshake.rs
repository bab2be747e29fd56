//! The offer/accept handshake and identities, with RSA keys checked in as
//! fixtures (`tests/fixtures/*.pem`, generated once with `openssl genpkey`) so
//! that no test waits for RSA key generation.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::time::Instant;

use keyferry_common::handshake::{
    HandshakeError, Kind, OfferParams, PendingOffer, ResumePoint, SignedOffer, Terms, make_offer,
    verify_offer,
};
use keyferry_common::identity::{Identity, KeyError};
use keyferry_common::ids::StreamId;
use keyferry_common::manifest::Manifest;
use keyferry_common::transfer::{Expect, Opened, RecvStream, RekeyPolicy, SendStream, StreamStart};

mod kit;

use kit::{fixture, name};

const NOW: u64 = 1_800_000_000;
const WINDOW: u64 = 300;

fn terms() -> Terms {
    Terms {
        kind: Kind::Files,
        size: 3000,
        size_known: true,
        resumes: None,
        receivers: 1,
        punch: Vec::new(),
    }
}

fn offer_from(alice: &Identity, bob: &Identity) -> (PendingOffer, SignedOffer) {
    make_offer(OfferParams {
        identity: alice,
        sender: name("alice"),
        receiver: name("bob"),
        receiver_key: bob.public(),
        stream_id: StreamId::random(),
        terms: terms(),
        now_unix: NOW,
    })
    .unwrap()
}

/// Bob's accept of `offer` (with nothing to resume).
fn accept_of(alice: &Identity, bob: &Identity, offer: &SignedOffer) -> Vec<u8> {
    verify_offer(
        offer,
        alice.public(),
        &name("bob"),
        bob.fingerprint(),
        NOW,
        WINDOW,
    )
    .unwrap()
    .open(bob)
    .unwrap()
    .accept(ResumePoint::none())
    .unwrap()
    .0
}

#[test]
fn a_full_handshake_then_a_stream() {
    let (alice, bob) = (fixture("alice"), fixture("bob"));
    let (pending, offer) = offer_from(&alice, &bob);

    let verified = verify_offer(
        &offer,
        alice.public(),
        &name("bob"),
        bob.fingerprint(),
        NOW + 10,
        WINDOW,
    )
    .unwrap();
    assert_eq!(verified.fields().sender, name("alice"));
    let opened = verified.open(&bob).unwrap();
    assert_eq!(opened.terms(), &terms());
    let stream_id = opened.fields().stream_id;
    let (accept, recv_keys) = opened.accept(ResumePoint::none()).unwrap();
    let accepted = pending.handle_accept(&accept).unwrap();
    assert_eq!(accepted.resume_offset, 0);
    assert_eq!(accepted.stream_id(), stream_id);

    let t0 = Instant::now();
    let mut s = SendStream::new(
        stream_id,
        3000,
        true,
        StreamStart::fresh(),
        RekeyPolicy::default(),
        t0,
    );
    let body = Manifest::single_file("report.pdf", 3000).encode();
    let mut r = RecvStream::new(
        recv_keys,
        Expect {
            declared: 3000,
            size_known: true,
            resume: None,
            sender: alice.public().clone(),
            me: name("bob"),
            my_fp: bob.fingerprint(),
            receivers: 1,
            trust_sender_hash: false,
        },
    );
    let mut frames = vec![
        s.root_for(&accepted.pair).into_frame(),
        s.manifest(&body).unwrap().into_frame(),
        s.push(vec![7; 3000], true, t0)
            .unwrap()
            .chunk
            .seal()
            .into_frame(),
    ];
    frames.push(
        s.trailer(&alice, &[(name("bob"), bob.fingerprint())])
            .unwrap()
            .0
            .into_frame(),
    );
    let mut opened = Vec::new();
    for f in &mut frames {
        match r.open(&mut f[4..]).unwrap() {
            Opened::Root => opened.push("root"),
            Opened::Manifest {
                resume_from,
                body: b,
            } => {
                assert_eq!((resume_from, &b), (0, &body));
                opened.push("manifest");
            }
            Opened::Chunk { plaintext, last } => {
                assert!(last);
                assert_eq!(plaintext, vec![7; 3000]);
                opened.push("chunk");
            }
            Opened::KeyUpdate(_) => opened.push("key update"),
            Opened::Trailer(done) => {
                s.check_receipt(&accepted.pair, &done.receipt).unwrap();
                opened.push("trailer");
            }
        }
    }
    assert_eq!(opened, ["root", "manifest", "chunk", "trailer"]);
}

#[test]
fn every_bit_flip_in_the_offer_is_refused() {
    let (alice, bob) = (fixture("alice"), fixture("bob"));
    let (_, offer) = offer_from(&alice, &bob);
    let check = |o: &SignedOffer| {
        verify_offer(
            o,
            alice.public(),
            &name("bob"),
            bob.fingerprint(),
            NOW,
            WINDOW,
        )
    };
    check(&offer).unwrap();
    for bit in 0..offer.body.len() * 8 {
        let mut o = offer.clone();
        o.body[bit / 8] ^= 1 << (bit % 8);
        assert!(check(&o).is_err(), "body bit {bit}");
    }
    for bit in (0..offer.signature.len() * 8).step_by(7) {
        let mut o = offer.clone();
        o.signature[bit / 8] ^= 1 << (bit % 8);
        assert_eq!(
            check(&o).unwrap_err(),
            HandshakeError::Auth,
            "signature bit {bit}"
        );
    }
    let mut truncated = offer.clone();
    truncated.signature.pop();
    assert_eq!(check(&truncated).unwrap_err(), HandshakeError::Auth);
    let mut trailing = offer.clone();
    trailing.body.push(0);
    assert!(check(&trailing).is_err());
}

#[test]
fn an_offer_for_someone_else_or_from_another_key_is_refused() {
    let (alice, bob, mallory) = (fixture("alice"), fixture("bob"), fixture("mallory"));
    let (_, offer) = offer_from(&alice, &bob);
    // Addressed to bob, presented to mallory (name or key differ).
    assert!(matches!(
        verify_offer(
            &offer,
            alice.public(),
            &name("mallory"),
            bob.fingerprint(),
            NOW,
            WINDOW
        ),
        Err(HandshakeError::NotForUs { .. })
    ));
    assert!(matches!(
        verify_offer(
            &offer,
            alice.public(),
            &name("bob"),
            mallory.fingerprint(),
            NOW,
            WINDOW
        ),
        Err(HandshakeError::NotForUs { .. })
    ));
    // Verified with a key that is not the one the offer names.
    assert_eq!(
        verify_offer(
            &offer,
            mallory.public(),
            &name("bob"),
            bob.fingerprint(),
            NOW,
            WINDOW
        )
        .unwrap_err(),
        HandshakeError::SenderKey
    );
}

#[test]
fn a_broker_that_re_signs_alices_offer_as_mallory_learns_nothing() {
    let (alice, bob, mallory) = (fixture("alice"), fixture("bob"), fixture("mallory"));
    let (_, offer) = offer_from(&alice, &bob);
    // Mallory swaps in her own name and fingerprint and signs the result. Her
    // signature verifies under her (pinned) key, but the OAEP label binds the
    // sender's fingerprint, so the unwrapped key is random and the terms'
    // tag fails: one opaque error, and bob never accepts.
    let fields = offer.parse().unwrap();
    let mut body = offer.body.clone();
    let sender_off = 2 + 16 + 16 + 4;
    assert_eq!(&body[sender_off..sender_off + 5], b"alice");
    // Same-length name keeps every other offset; then Mallory's fingerprint.
    body[sender_off..sender_off + 5].copy_from_slice(b"malry");
    let fp_off = sender_off + 5;
    assert_eq!(&body[fp_off..fp_off + 32], fields.sender_fp.as_bytes());
    body[fp_off..fp_off + 32].copy_from_slice(mallory.fingerprint().as_bytes());
    let signature = mallory.sign("keyferry/v2 offer", &body);
    let forged = SignedOffer { body, signature };
    let verified = verify_offer(
        &forged,
        mallory.public(),
        &name("bob"),
        bob.fingerprint(),
        NOW,
        WINDOW,
    )
    .expect("mallory's own signature verifies");
    assert_eq!(verified.fields().sender, name("malry"));
    assert_eq!(verified.open(&bob).unwrap_err(), HandshakeError::Auth);
}

#[test]
fn a_signature_for_another_purpose_does_not_verify_as_an_offer() {
    let (alice, bob) = (fixture("alice"), fixture("bob"));
    let (_, offer) = offer_from(&alice, &bob);
    let resigned = SignedOffer {
        body: offer.body.clone(),
        signature: alice.sign("keyferry/v1 broker-auth", &offer.body),
    };
    assert_eq!(
        verify_offer(
            &resigned,
            alice.public(),
            &name("bob"),
            bob.fingerprint(),
            NOW,
            WINDOW
        )
        .unwrap_err(),
        HandshakeError::Auth
    );
}

#[test]
fn stale_offers_are_refused() {
    let (alice, bob) = (fixture("alice"), fixture("bob"));
    let (_, offer) = offer_from(&alice, &bob);
    assert!(
        verify_offer(
            &offer,
            alice.public(),
            &name("bob"),
            bob.fingerprint(),
            NOW + WINDOW,
            WINDOW
        )
        .is_ok()
    );
    assert_eq!(
        verify_offer(
            &offer,
            alice.public(),
            &name("bob"),
            bob.fingerprint(),
            NOW + WINDOW + 1,
            WINDOW
        )
        .unwrap_err(),
        HandshakeError::Stale {
            skew: WINDOW + 1,
            window: WINDOW
        }
    );
    assert!(
        verify_offer(
            &offer,
            alice.public(),
            &name("bob"),
            bob.fingerprint(),
            NOW - WINDOW - 1,
            WINDOW
        )
        .is_err()
    );
}

#[test]
fn a_tampered_or_foreign_accept_is_refused() {
    let (alice, bob) = (fixture("alice"), fixture("bob"));
    let (_, offer) = offer_from(&alice, &bob);
    let accept = accept_of(&alice, &bob, &offer);
    assert_eq!(accept.len(), keyferry_common::handshake::MIN_ACCEPT_LEN);
    // Every 29th bit: the nonce, the X25519 share, the ML-KEM ciphertext,
    // the resume offset and both tags are all hit.
    for bit in (0..accept.len() * 8).step_by(29) {
        let (pending, offer) = offer_from(&alice, &bob);
        // A fresh offer each time: an accept belongs to exactly one transfer.
        let good = accept_of(&alice, &bob, &offer);
        let mut bad = good.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        assert!(pending.handle_accept(&bad).is_err(), "accept bit {bit}");
        if bit == 0 {
            // The accept of one transfer does not complete another (a
            // broker replaying an old accept).
            let (other_pending, _) = offer_from(&alice, &bob);
            assert!(other_pending.handle_accept(&good).is_err());
        }
    }
    let (pending, _) = offer_from(&alice, &bob);
    assert!(matches!(
        pending.handle_accept(&accept[..95]),
        Err(HandshakeError::Malformed("accept"))
    ));
}

#[test]
fn keys_outside_the_policy_are_refused() {
    for bad in ["small2048", "e3"] {
        let path = format!("{}/tests/fixtures/{bad}.pem", env!("CARGO_MANIFEST_DIR"));
        let pem = std::fs::read_to_string(path).unwrap();
        assert!(
            matches!(
                Identity::from_pkcs8_pem(&pem),
                Some(Err(KeyError::Policy { .. }))
            ),
            "{bad}"
        );
    }
    // A public key outside the policy is refused too, and so is non-canonical DER.
    let alice = fixture("alice");
    let der = alice.public().spki_der().to_vec();
    assert!(keyferry_common::identity::PublicKey::from_spki_der(&der).is_ok());
    let mut trailing = der.clone();
    trailing.push(0);
    assert!(keyferry_common::identity::PublicKey::from_spki_der(&trailing).is_err());
}

#[test]
fn fingerprints_print_like_openssh_and_parse_back() {
    let alice = fixture("alice");
    let fp = alice.fingerprint();
    let s = fp.to_string();
    assert!(s.starts_with("SHA256:") && s.len() == 7 + 43, "{s}");
    assert_eq!(
        s.parse::<keyferry_common::identity::Fingerprint>().unwrap(),
        fp
    );
    assert!(
        "SHA256:short"
            .parse::<keyferry_common::identity::Fingerprint>()
            .is_err()
    );
    assert!(
        "MD5:xx"
            .parse::<keyferry_common::identity::Fingerprint>()
            .is_err()
    );
}
