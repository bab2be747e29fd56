//! The stored handshake (PROTOCOL.md §3.4): prekey bundles, stored offers and
//! stored receipts, with the checked-in RSA fixtures. Forward secrecy shown:
//! without the bundle's private halves, the identity key opens nothing.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use keyferry_common::crypto::seal;
use keyferry_common::handshake::prekey::{BundleKind, make_bundle, verify_bundle};
use keyferry_common::handshake::receipt::{Outcome, StoredReceipt};
use keyferry_common::handshake::stored::{
    StoredParams, VerifiedStored, make_stored_offer, parse_stored, verify_stored,
};
use keyferry_common::handshake::{HandshakeError, Kind, SignedOffer, Terms};
use keyferry_common::ids::StreamId;
use keyferry_common::schedule::PairKeys;

mod kit;

use kit::{alice, bob, fixture, name};

const NOW: u64 = 1_800_000_000;

fn terms() -> Terms {
    Terms {
        kind: Kind::Files,
        size: 4096,
        size_known: true,
        resumes: None,
        receivers: 1,
        punch: Vec::new(),
    }
}

/// The root keys of two pair-key sets agree: what one seals, the other opens.
fn same_pair(a: &PairKeys, b: &PairKeys) -> bool {
    let sealed = seal::seal(&a.root, b"ad", b"the stream root");
    seal::open(
        &b.root,
        b"ad",
        &sealed.iv,
        &sealed.ciphertext,
        &sealed.tag,
        64,
    )
    .is_ok()
}

fn stored_to_bob(
    kind: BundleKind,
) -> (
    SignedOffer,
    PairKeys,
    Vec<u8>,
    keyferry_common::handshake::prekey::PrekeyKeys,
) {
    let (signed, _, keys) = make_bundle(bob(), &name("bob"), kind, NOW - 60, 7 * 86400);
    let bundle = verify_bundle(&signed, bob().public(), &name("bob"), NOW).unwrap();
    let (offer, pair) = make_stored_offer(StoredParams {
        identity: alice(),
        sender: name("alice"),
        receiver_key: bob().public(),
        bundle: &bundle,
        stream_id: StreamId::random(),
        terms: terms(),
        now_unix: NOW,
    })
    .unwrap();
    (offer, pair, signed, keys)
}

/// Bob's check of a stored offer from alice at `now`.
fn bob_verifies(offer: &SignedOffer, now: u64) -> Result<VerifiedStored, HandshakeError> {
    verify_stored(
        offer,
        alice().public(),
        &name("bob"),
        bob().fingerprint(),
        now,
    )
}

#[test]
fn a_stored_offer_opens_with_the_identity_and_the_bundle_and_both_sides_agree() {
    let (offer, sent, signed, keys) = stored_to_bob(BundleKind::OneTime);
    let bundle = keyferry_common::handshake::prekey::own_bundle(&signed).unwrap();
    let verified = bob_verifies(&offer, NOW + 86400).unwrap();
    assert_eq!(verified.fields().bundle_id, bundle.id);
    let (got, pair) = verified.open(bob(), &bundle, &keys).unwrap();
    assert_eq!(got, terms());
    assert!(same_pair(&sent, &pair));
    assert_eq!(sent.transfer_id, pair.transfer_id);
}

#[test]
fn without_the_bundle_secrets_the_identity_key_opens_nothing() {
    // Forward secrecy: the receiver deleted the bundle's private halves after
    // delivery; its identity key and the stored bytes are all a thief has.
    // Every other prekey the receiver still holds fails too.
    let (offer, sent, signed, _deleted) = stored_to_bob(BundleKind::OneTime);
    let bundle = keyferry_common::handshake::prekey::own_bundle(&signed).unwrap();
    let (_, _, other_keys) = make_bundle(bob(), &name("bob"), BundleKind::OneTime, NOW, 3600);
    let verified = bob_verifies(&offer, NOW).unwrap();
    // The right public bundle, the wrong private halves: the terms open (they
    // are under RSA alone, PROTOCOL.md §4), the pair keys do not agree.
    let (_, pair) = verified.open(bob(), &bundle, &other_keys).unwrap();
    assert!(!same_pair(&sent, &pair));
    // Another bundle than the one the offer names: refused outright.
    let (other_signed, _, other) = make_bundle(bob(), &name("bob"), BundleKind::OneTime, NOW, 3600);
    let other_bundle = keyferry_common::handshake::prekey::own_bundle(&other_signed).unwrap();
    let verified = bob_verifies(&offer, NOW).unwrap();
    assert_eq!(
        verified.open(bob(), &other_bundle, &other).unwrap_err(),
        HandshakeError::Auth
    );
}

#[test]
fn a_stored_offer_is_checked_before_any_private_key_is_used() {
    let (offer, _, _, _) = stored_to_bob(BundleKind::LastResort);
    let carol = fixture("carol");
    // Another sender's key, another addressee, too old, from the future.
    assert_eq!(
        verify_stored(
            &offer,
            carol.public(),
            &name("bob"),
            bob().fingerprint(),
            NOW
        )
        .unwrap_err(),
        HandshakeError::SenderKey
    );
    assert!(matches!(
        verify_stored(
            &offer,
            alice().public(),
            &name("carol"),
            carol.fingerprint(),
            NOW
        ),
        Err(HandshakeError::NotForUs { .. })
    ));
    assert!(bob_verifies(&offer, NOW + 36 * 86400).is_err());
    assert!(bob_verifies(&offer, NOW - 600).is_err());
    // Any flipped byte of the body fails the signature (or the parse).
    for at in [2, 40, 200, 1500, offer.body.len() - 1] {
        let mut bad = offer.clone();
        bad.body[at] ^= 1;
        assert!(bob_verifies(&bad, NOW).is_err(), "{at}");
    }
    // A live offer's signature context differs: a stored body signed as a
    // live offer does not verify as stored.
    let mut relabelled = offer.clone();
    relabelled.signature = alice().sign("keyferry/v2 offer", &offer.body);
    assert_eq!(
        bob_verifies(&relabelled, NOW).unwrap_err(),
        HandshakeError::Auth
    );
    assert!(parse_stored(&offer).is_ok());
}

#[test]
fn a_bundle_verifies_for_its_receiver_only_and_within_its_time() {
    let (signed, bundle, _) = make_bundle(bob(), &name("bob"), BundleKind::OneTime, NOW, 3600);
    assert_eq!(
        verify_bundle(&signed, bob().public(), &name("bob"), NOW).unwrap(),
        bundle
    );
    assert!(matches!(
        verify_bundle(&signed, bob().public(), &name("carol"), NOW),
        Err(HandshakeError::NotForUs { .. })
    ));
    // Signed by someone else than the pinned receiver key.
    assert!(verify_bundle(&signed, alice().public(), &name("bob"), NOW).is_err());
    assert!(verify_bundle(&signed, bob().public(), &name("bob"), NOW + 3600).is_err());
    assert!(verify_bundle(&signed, bob().public(), &name("bob"), NOW - 301).is_err());
    for at in [3, 20, 60, 100, 600, signed.len() - 1] {
        let mut bad = signed.clone();
        bad[at] ^= 1;
        assert!(
            verify_bundle(&bad, bob().public(), &name("bob"), NOW).is_err(),
            "{at}"
        );
    }
    let mut long = signed.clone();
    long.push(0);
    assert!(verify_bundle(&long, bob().public(), &name("bob"), NOW).is_err());
}

#[test]
fn a_receipt_verifies_with_the_receivers_key_only() {
    let (offer, _, _, _) = stored_to_bob(BundleKind::OneTime);
    let f = parse_stored(&offer).unwrap();
    for outcome in [
        Outcome::Delivered { digest: [7; 32] },
        Outcome::Refused {
            why: "bob accepts only known senders".into(),
        },
    ] {
        let receipt = StoredReceipt {
            transfer_id: f.transfer_id,
            sender_fp: alice().fingerprint(),
            receiver_fp: bob().fingerprint(),
            time: NOW,
            outcome,
        };
        let signed = receipt.clone().sign(bob());
        assert_eq!(
            StoredReceipt::verify(&signed, bob().public()).unwrap(),
            receipt
        );
        assert!(StoredReceipt::verify(&signed, alice().public()).is_err());
        let mut bad = signed.clone();
        bad[10] ^= 1;
        assert!(StoredReceipt::verify(&bad, bob().public()).is_err());
    }
    // A long reason is cut, not refused.
    let long = StoredReceipt {
        transfer_id: f.transfer_id,
        sender_fp: alice().fingerprint(),
        receiver_fp: bob().fingerprint(),
        time: NOW,
        outcome: Outcome::Refused {
            why: "é".repeat(150),
        },
    };
    let got = StoredReceipt::verify(&long.sign(bob()), bob().public()).unwrap();
    assert!(matches!(got.outcome, Outcome::Refused { why } if why.len() == 200));
}
