//! The offer/accept handshake and identities, with RSA keys checked in as
//! fixtures (`tests/fixtures/*.pem`, generated once with `openssl genpkey`) so
//! that no test waits for RSA key generation.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::time::Instant;

use keyferry_common::handshake::{
    HandshakeError, Kind, Metadata, OfferParams, SignedOffer, make_offer, verify_offer,
};
use keyferry_common::identity::{Identity, KeyError};
use keyferry_common::name::AgentName;
use keyferry_common::transfer::{RecvStream, RekeyPolicy, SendStream};

fn fixture(name: &str) -> Identity {
    let path = format!("{}/tests/fixtures/{name}.pem", env!("CARGO_MANIFEST_DIR"));
    let pem = std::fs::read_to_string(path).expect("fixture exists");
    Identity::from_pkcs8_pem(&pem)
        .expect("fixture is PKCS#8")
        .expect("fixture fits the key policy")
}

fn name(s: &str) -> AgentName {
    AgentName::new(s).unwrap()
}

const NOW: u64 = 1_800_000_000;
const WINDOW: u64 = 300;

fn metadata() -> Metadata {
    Metadata {
        kind: Kind::File,
        name: "report.pdf".into(),
        size: 3000,
    }
}

fn offer_from(
    alice: &Identity,
    bob: &Identity,
) -> (keyferry_common::handshake::PendingOffer, SignedOffer) {
    make_offer(OfferParams {
        identity: alice,
        sender: name("alice"),
        receiver: name("bob"),
        receiver_key: bob.public(),
        metadata: metadata(),
        now_unix: NOW,
    })
    .unwrap()
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
    assert_eq!(opened.metadata(), &metadata());
    let (accept, recv_keys) = opened.accept().unwrap();
    let send_keys = pending.handle_accept(&accept).unwrap();

    let t0 = Instant::now();
    let mut s = SendStream::new(send_keys, 3000, RekeyPolicy::default(), t0);
    let mut r = RecvStream::new(recv_keys, 3000);
    let out = s.push(vec![7; 3000], true, t0).unwrap();
    let (plain, last) = r.open_chunk(out.chunk.seal().record()).unwrap();
    assert!(last);
    assert_eq!(plain, vec![7; 3000]);
    let (trailer, _) = s.trailer().unwrap();
    let done = r.open_trailer(trailer.record()).unwrap();
    s.check_receipt(&done.receipt).unwrap();
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
    // sender's fingerprint, so the unwrapped key is random and the metadata
    // tag fails: one opaque error, and bob never accepts.
    let fields = offer.parse().unwrap();
    let mut body = offer.body.clone();
    let sender_off = 2 + 16 + 4;
    assert_eq!(&body[sender_off..sender_off + 5], b"alice");
    // Same-length name keeps every other offset; then Mallory's fingerprint.
    body[sender_off..sender_off + 5].copy_from_slice(b"malry");
    let fp_off = sender_off + 5;
    assert_eq!(&body[fp_off..fp_off + 32], fields.sender_fp.as_bytes());
    body[fp_off..fp_off + 32].copy_from_slice(mallory.fingerprint().as_bytes());
    let signature = mallory.sign("keyferry/v1 offer", &body);
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
    let (pending_for_flips, offer) = offer_from(&alice, &bob);
    let opened = verify_offer(
        &offer,
        alice.public(),
        &name("bob"),
        bob.fingerprint(),
        NOW,
        WINDOW,
    )
    .unwrap()
    .open(&bob)
    .unwrap();
    let (accept, _) = opened.accept().unwrap();
    drop(pending_for_flips);
    for bit in (0..accept.len() * 8).step_by(3) {
        let (pending, offer) = offer_from(&alice, &bob);
        // A fresh offer each time: an accept belongs to exactly one transfer.
        let (good, _) = verify_offer(
            &offer,
            alice.public(),
            &name("bob"),
            bob.fingerprint(),
            NOW,
            WINDOW,
        )
        .unwrap()
        .open(&bob)
        .unwrap()
        .accept()
        .unwrap();
        let mut bad = good.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        assert!(pending.handle_accept(&bad).is_err(), "accept bit {bit}");
        if bit == 0 {
            // The accept of one transfer does not complete another.
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

/// An offer built by hand from PROTOCOL.md §3.3 (as a second implementation
/// would), sealing `metadata_plain` whatever its length: honest senders stop
/// at 1024 bytes.
fn hand_made_offer(alice: &Identity, bob: &Identity, metadata_plain: &[u8]) -> SignedOffer {
    use keyferry_common::crypto::ecdh::Ephemeral;
    use keyferry_common::crypto::keys::MasterKey;
    use keyferry_common::crypto::{seal, wrap};
    use keyferry_common::encode::Encoder;
    use keyferry_common::ids::{Nonce, TransferId};
    use keyferry_common::schedule::metadata_keys;
    use sha2::{Digest as _, Sha256};
    let (tid, nonce, master) = (TransferId::random(), Nonce::random(), MasterKey::random());
    let (afp, bfp) = (alice.fingerprint(), bob.fingerprint());
    let label: [u8; 32] = Sha256::digest(
        Encoder::new("keyferry/v1 master-key")
            .u16(1)
            .fixed(&tid.0)
            .fixed(&afp.0)
            .fixed(&bfp.0)
            .fixed(&nonce.0)
            .finish(),
    )
    .into();
    let wrapped = wrap::wrap_master_key(bob.public().rsa(), &label, &master);
    let mut body = Encoder::default()
        .u16(1)
        .fixed(&tid.0)
        .bytes(b"alice")
        .fixed(&afp.0)
        .bytes(b"bob")
        .fixed(&bfp.0)
        .u64(NOW)
        .fixed(&nonce.0)
        .fixed(&Ephemeral::generate().public())
        .bytes(&wrapped)
        .finish();
    let header_hash: [u8; 32] = Sha256::digest(
        Encoder::new("keyferry/v1 offer-header")
            .fixed(&body)
            .finish(),
    )
    .into();
    let keys = metadata_keys(&master, &nonce, &tid, &header_hash);
    let ad = Encoder::new("keyferry/v1 metadata").fixed(&tid.0).finish();
    let sealed = seal::seal(&keys, &ad, metadata_plain);
    body.extend(
        Encoder::default()
            .fixed(&sealed.iv)
            .bytes(&sealed.ciphertext)
            .fixed(&sealed.tag)
            .finish(),
    );
    let signature = alice.sign("keyferry/v1 offer", &body);
    SignedOffer { body, signature }
}

#[test]
fn metadata_over_1024_bytes_is_refused_even_when_its_seal_fits() {
    let (alice, bob) = (fixture("alice"), fixture("bob"));
    let meta = |len: usize| Metadata {
        kind: Kind::File,
        name: "n".repeat(len),
        size: 1,
    };
    let open = |plain: &[u8]| {
        let offer = hand_made_offer(&alice, &bob, plain);
        verify_offer(
            &offer,
            alice.public(),
            &name("bob"),
            bob.fingerprint(),
            NOW,
            WINDOW,
        )
        .unwrap()
        .open(&bob)
    };
    // 1024 bytes of postcard metadata: the largest allowed, opens.
    let at_limit = postcard::to_stdvec(&meta(1024 - 4)).unwrap();
    assert_eq!(at_limit.len(), 1024);
    assert_eq!(open(&at_limit).unwrap().metadata(), &meta(1024 - 4));
    // 1030 bytes still seal into the 1040-byte ciphertext bound, but are refused.
    let over = postcard::to_stdvec(&meta(1030 - 4)).unwrap();
    assert_eq!(over.len(), 1030);
    assert_eq!(
        open(&over).unwrap_err(),
        HandshakeError::Malformed("metadata")
    );
}
