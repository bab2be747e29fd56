//! The parts of a version-2 stream around the chunks: the root sealed for
//! each receiver, the manifest that says where the data starts, resumption
//! from a verified prefix, and the trailer's signature that names the
//! receivers. Hostile variants of each are refused where they stand.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::time::Instant;

use keyferry_common::transfer::{
    Expect, ReadyFrame, RecvError, RecvStream, RekeyPolicy, Resume, SendStream, StreamStart,
};
use keyferry_common::wire::record::manifest_hash;
use sha2::{Digest, Sha256};

mod kit;

fn data(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 13) as u8).collect()
}

/// Pushes `data` through `s` in 1000-byte chunks;
/// returns the chunk records.
fn chunks(s: &mut SendStream, data: &[u8]) -> Vec<Vec<u8>> {
    let t0 = Instant::now();
    let pieces: Vec<&[u8]> = if data.is_empty() {
        vec![&[]]
    } else {
        data.chunks(1000).collect()
    };
    let n = pieces.len();
    pieces
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let out = s.push(p, i + 1 == n, t0).unwrap();
            assert!(out.key_update.is_none());
            out.chunk.seal().record().to_vec()
        })
        .collect()
}

#[test]
fn every_bit_flip_in_the_root_or_the_manifest_is_refused() {
    let (root, manifest) = kit::head_frames(1, 10);
    for bit in 0..root.record().len() * 8 {
        let mut b = root.record().to_vec();
        b[bit / 8] ^= 1 << (bit % 8);
        let mut r = kit::bare_receiver(1, 10);
        assert!(r.open_root(&b).is_err(), "root bit {bit}");
    }
    for bit in 0..manifest.record().len() * 8 {
        let mut b = manifest.record().to_vec();
        b[bit / 8] ^= 1 << (bit % 8);
        let mut r = kit::bare_receiver(1, 10);
        r.open_root(root.record()).unwrap();
        assert!(r.open_manifest(&b).is_err(), "manifest bit {bit}");
    }
}

#[test]
fn the_root_and_manifest_come_first_and_once() {
    let (root, manifest) = kit::head_frames(2, 10);
    let mut r = kit::bare_receiver(2, 10);
    assert_eq!(
        r.open_manifest(manifest.record()).unwrap_err(),
        RecvError::Early("manifest")
    );
    let mut r = kit::bare_receiver(2, 10);
    r.open_root(root.record()).unwrap();
    assert!(r.open_root(root.record()).is_err(), "a second root");
    let mut r = kit::bare_receiver(2, 10);
    r.open_root(root.record()).unwrap();
    let mut s = kit::sender(2, 10, RekeyPolicy::default(), Instant::now());
    let c = chunks(&mut s, &[1; 10]);
    assert!(r.open_chunk(&c[0]).is_err(), "a chunk before the manifest");
    let mut r = kit::receiver(2, 10);
    assert!(
        r.open_manifest(manifest.record()).is_err(),
        "a second manifest"
    );
}

#[test]
fn a_root_sealed_for_another_receiver_does_not_open() {
    // Alice fans one stream out: the root she seals for transfer 3's
    // receiver is useless to the receiver of transfer 4, and vice versa.
    let s = kit::bare_sender(3, 10, RekeyPolicy::default(), Instant::now());
    let theirs = s.root_for(&kit::pair(4));
    let mut r = kit::bare_receiver(3, 10);
    assert_eq!(r.open_root(theirs.record()).unwrap_err(), RecvError::Auth);
}

#[test]
fn the_trailer_must_be_signed_by_the_sender_and_name_this_receiver() {
    let d = data(2500);
    let n = d.len() as u64;
    let carol = kit::fixture("carol");
    let mallory = kit::fixture("mallory");
    let signers = [
        (kit::alice(), kit::bob_only(), true),
        // Bob among several receivers of one stream.
        (
            kit::alice(),
            vec![
                (kit::name("carol"), carol.fingerprint()),
                (kit::name("bob"), kit::bob().fingerprint()),
            ],
            true,
        ),
        (&mallory, kit::bob_only(), false),
        (
            kit::alice(),
            vec![(kit::name("carol"), carol.fingerprint())],
            false,
        ),
        // Bob's name with another key: not this Bob.
        (
            kit::alice(),
            vec![(kit::name("bob"), carol.fingerprint())],
            false,
        ),
        (
            kit::alice(),
            vec![(kit::name("bobby"), kit::bob().fingerprint())],
            false,
        ),
    ];
    for (i, (who, receivers, ok)) in signers.into_iter().enumerate() {
        let mut s = kit::sender(5, n, RekeyPolicy::default(), Instant::now());
        let recs = chunks(&mut s, &d);
        let (trailer, _) = s.trailer(who, &receivers).unwrap();
        // As many receivers as the trailer lists, as Alice's offer said.
        let mut r = kit::receiver_of(5, n, receivers.len() as u32, false);
        for c in &recs {
            r.open_chunk(c).unwrap();
        }
        let got = r.open_trailer(trailer.record());
        assert_eq!(got.is_ok(), ok, "case {i}: {got:?}");
        if !ok {
            assert_eq!(got.unwrap_err(), RecvError::Signature, "case {i}");
        }
    }
}

/// The receiver's journal after `held` bytes of `d`.
fn held(d: &[u8], held: usize) -> Resume {
    Resume {
        offset: held as u64,
        hasher: Sha256::new().chain_update(&d[..held]),
        manifest_hash: manifest_hash(&kit::manifest_body(d.len() as u64)),
    }
}

/// Alice resuming transfer `t` at `from` with manifest `body`: her stream,
/// and the root and manifest frames she sends first.
fn resuming(t: u8, d: &[u8], from: usize, body: &[u8]) -> (SendStream, ReadyFrame, ReadyFrame) {
    let mut s = SendStream::with_root(
        kit::root(t),
        kit::sid(t),
        d.len() as u64,
        true,
        StreamStart {
            offset: from as u64,
            hasher: Sha256::new().chain_update(&d[..from]),
        },
        RekeyPolicy::default(),
        Instant::now(),
    );
    let root = s.root_for(&kit::pair(t));
    let manifest = s.manifest(body).unwrap();
    (s, root, manifest)
}

fn resuming_receiver(t: u8, d: &[u8], resume: Option<Resume>) -> RecvStream {
    RecvStream::new(
        kit::pair(t),
        Expect {
            resume,
            ..kit::expect(d.len() as u64)
        },
    )
}

#[test]
fn a_resumed_stream_carries_only_the_rest_and_verifies_the_whole() {
    // Whether Bob hashes (running on from the prefix's state) or takes
    // Alice's hash, the whole data's hash is what comes out.
    for trust_sender_hash in [false, true] {
        let d = data(5000);
        let body = kit::manifest_body(d.len() as u64);
        let (mut s, root, manifest) = resuming(6, &d, 3000, &body);
        let mut r = RecvStream::new(
            kit::pair(6),
            Expect {
                resume: Some(held(&d, 3000)),
                trust_sender_hash,
                ..kit::expect(d.len() as u64)
            },
        );
        r.open_root(root.record()).unwrap();
        assert_eq!(r.open_manifest(manifest.record()).unwrap(), (3000, body));
        assert_eq!((r.resumed_from(), r.total()), (3000, 3000));
        let mut got = Vec::new();
        for c in chunks(&mut s, &d[3000..]) {
            got.extend(r.open_chunk(&c).unwrap().0);
        }
        assert_eq!(got, d[3000..]);
        let (trailer, sha) = kit::trailer(&mut s);
        let done = r.open_trailer(trailer.record()).unwrap();
        assert_eq!(done.total, 5000);
        assert_eq!(sha, <[u8; 32]>::from(Sha256::digest(&d)));
        assert_eq!((done.sha256, done.own_hash), (sha, !trust_sender_hash));
        s.check_receipt(&kit::pair(6), &done.receipt).unwrap();
    }
}

#[test]
fn a_resume_point_the_receiver_did_not_offer_is_refused() {
    let d = data(5000);
    let n = d.len() as u64;
    let body = kit::manifest_body(n);
    let other = kit::manifest_body(n + 1);
    let bad = |at| {
        Err(RecvError::BadResume {
            offered_by_sender: at,
        })
    };
    let cases = [
        // Bob holds nothing; Alice starts at 3000.
        (None, 3000, &body, bad(3000)),
        // Bob holds 3000; Alice starts at 2000, or at 4000.
        (Some(held(&d, 3000)), 2000, &body, bad(2000)),
        (Some(held(&d, 3000)), 4000, &body, bad(4000)),
        // Bob holds 3000 of another manifest.
        (Some(held(&d, 3000)), 3000, &other, bad(3000)),
        // Alice starts over: Bob's prefix is dropped, not trusted.
        (Some(held(&d, 3000)), 0, &body, Ok(0)),
    ];
    for (i, (resume, from, body, want)) in cases.into_iter().enumerate() {
        let (_, root, manifest) = resuming(7, &d, from, body);
        let mut r = resuming_receiver(7, &d, resume);
        r.open_root(root.record()).unwrap();
        let got = r.open_manifest(manifest.record()).map(|(from, _)| from);
        assert_eq!(got, want, "case {i}");
    }
}

#[test]
fn chunks_of_a_resumed_stream_carry_their_offset() {
    // Alice resumes at 3000, but a hostile sender seals the first chunk as
    // if it began at 0: the offset is in the chunk's associated data.
    let d = data(5000);
    let (_, root, manifest) = resuming(8, &d, 3000, &kit::manifest_body(5000));
    let mut r = resuming_receiver(8, &d, Some(held(&d, 3000)));
    r.open_root(root.record()).unwrap();
    r.open_manifest(manifest.record()).unwrap();
    let mut from_zero = kit::sender(8, 5000, RekeyPolicy::default(), Instant::now());
    let c = from_zero
        .push(&d[3000..4000], false, Instant::now())
        .unwrap();
    assert_eq!(
        r.open_chunk(c.chunk.seal().record()).unwrap_err(),
        RecvError::Auth
    );
}

/// A chunk sealed by hand under `k` (epoch 0), as anyone holding the stream
/// keys can.
fn forged_chunk(
    k: &keyferry_common::schedule::StreamKeys,
    seq: u64,
    offset: u64,
    last: bool,
    plain: &[u8],
) -> Vec<u8> {
    use keyferry_common::wire::record::seal_chunk;
    let key = k.epoch0.epoch_key(&k.stream_id, 0);
    seal_chunk(&key, &k.stream_id, 0, seq, offset, last, plain)
}

#[test]
fn a_receiver_holding_the_stream_keys_cannot_forge_a_file_for_another() {
    use keyferry_common::crypto::seal;
    use keyferry_common::wire::record::{
        StreamCommitment, TrailerPlain, encode_sealed, label, stream_signed, trailer_ad,
    };
    // Alice's stream 9 goes to bob and carol: one root, sealed for each, so
    // carol holds every stream key. She forges bob's data: chunks whose tags
    // verify, and a trailer over them.
    let carol = kit::fixture("carol");
    let k = kit::stream_keys(9);
    let forged = data(2000);
    let forgeries = [
        forged_chunk(&k, 0, 0, false, &forged[..1000]),
        forged_chunk(&k, 1, 1000, true, &forged[1000..]),
    ];
    let sha: [u8; 32] = Sha256::digest(&forged).into();
    let receivers = vec![
        (kit::name("bob"), kit::bob().fingerprint()),
        (kit::name("carol"), carol.fingerprint()),
    ];
    let trailer = |signature: Vec<u8>| {
        let plain = TrailerPlain {
            total: 2000,
            sha256: sha,
            signature,
            receivers: receivers.clone(),
        };
        encode_sealed(&seal::seal(
            &k.trailer,
            &trailer_ad(&k.stream_id, 2, 0),
            &plain.encode(),
        ))
    };
    let commitment = |fp| {
        stream_signed(&StreamCommitment {
            stream_id: &k.stream_id,
            sender_fp: fp,
            total: 2000,
            sha256: &sha,
            chunks: 2,
            resume_from: 0,
            manifest_hash: &manifest_hash(&kit::manifest_body(2000)),
            receivers: &receivers,
        })
    };
    // Signed by carol (over alice's name or her own): not alice's signature.
    for signature in [
        carol.sign(
            label::STREAM_SIGNATURE,
            &commitment(&kit::alice().fingerprint()),
        ),
        carol.sign(label::STREAM_SIGNATURE, &commitment(&carol.fingerprint())),
        // An alice signature of another purpose does not serve either.
        kit::alice().sign(
            "keyferry/v2 offer",
            &commitment(&kit::alice().fingerprint()),
        ),
    ] {
        let mut bob = kit::receiver_of(9, 2000, 2, true);
        for c in &forgeries {
            bob.open_chunk(c).unwrap();
        }
        assert_eq!(
            bob.open_trailer(&trailer(signature)).unwrap_err(),
            RecvError::Signature
        );
        assert!(!bob.is_complete());
    }
    // Alice's real trailer with carol's data: its hash is not the data's.
    let mut alice = kit::sender(9, 2000, RekeyPolicy::default(), Instant::now());
    let other: Vec<u8> = data(2000).iter().map(|b| b ^ 1).collect();
    let _ = chunks(&mut alice, &other);
    let (real, _) = alice.trailer(kit::alice(), &receivers).unwrap();
    // With two receivers Bob hashes, whether or not he was asked to trust
    // the sender's hash. Had Alice's offer told him he was her only
    // receiver, so that a Bob who trusts her hash does not hash, her trailer
    // still lists carol: refused all the same.
    for receivers in [2, 1] {
        let mut bob = kit::receiver_of(9, 2000, receivers, true);
        for c in &forgeries {
            bob.open_chunk(c).unwrap();
        }
        assert_eq!(
            bob.open_trailer(real.record()).unwrap_err(),
            RecvError::TrailerMismatch,
            "{receivers} receiver(s)"
        );
    }
}

#[test]
fn only_a_sole_receiver_asked_to_trust_the_senders_hash_goes_without_its_own() {
    let d = data(3000);
    let sha: [u8; 32] = Sha256::digest(&d).into();
    for (receivers, trust, own) in [(1, false, true), (1, true, false), (2, true, true)] {
        let mut alice = kit::sender(10, 3000, RekeyPolicy::default(), Instant::now());
        let mut bob = kit::receiver_of(10, 3000, receivers, trust);
        for c in chunks(&mut alice, &d) {
            bob.open_chunk(&c).unwrap();
        }
        let (trailer, signed) = kit::trailer(&mut alice);
        assert_eq!(signed, sha);
        let done = bob.open_trailer(trailer.record()).unwrap();
        let case = format!("{receivers} receiver(s), trust {trust}");
        assert_eq!((done.sha256, done.own_hash), (sha, own), "{case}");
        alice.check_receipt(&kit::pair(10), &done.receipt).unwrap();
    }
}
