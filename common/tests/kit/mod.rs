//! What the stream tests share: the RSA fixtures, and the keys of a
//! sender–receiver pair made deterministic from one byte, so that a test can
//! build, forge and splice records of "transfer 3" or "transfer 4" by number.
//!
//! Transfer `t` has transfer id and stream id `[t; 16]`, a stream root of
//! `[t ^ 0x5a; 32]`, and one file called `data` in its manifest. Alice sends,
//! Bob receives.

#![allow(dead_code, clippy::unwrap_used)] // each test file uses part of the kit

use std::sync::OnceLock;
use std::time::Instant;

use keyferry_common::crypto::keys::{MasterKey, SharedSecret, StreamRoot};
use keyferry_common::identity::{Fingerprint, Identity};
use keyferry_common::ids::{Nonce, StreamId, TransferId};
use keyferry_common::manifest::Manifest;
use keyferry_common::name::AgentName;
use keyferry_common::schedule::{
    PairKeys, Secrets, StreamKeys, derive_pair_keys, derive_stream_keys,
};
use keyferry_common::transfer::{
    Expect, ReadyFrame, RecvStream, RekeyPolicy, SendStream, StreamStart,
};

/// A checked-in RSA key (`tests/fixtures/<name>.pem`).
pub fn fixture(name: &str) -> Identity {
    let path = format!("{}/tests/fixtures/{name}.pem", env!("CARGO_MANIFEST_DIR"));
    let pem = std::fs::read_to_string(path).expect("fixture exists");
    Identity::from_pkcs8_pem(&pem)
        .expect("fixture is PKCS#8")
        .expect("fixture fits the key policy")
}

/// Alice, the sender of every kit stream.
pub fn alice() -> &'static Identity {
    static ALICE: OnceLock<Identity> = OnceLock::new();
    ALICE.get_or_init(|| fixture("alice"))
}

/// Bob, the receiver of every kit stream.
pub fn bob() -> &'static Identity {
    static BOB: OnceLock<Identity> = OnceLock::new();
    BOB.get_or_init(|| fixture("bob"))
}

pub fn name(s: &str) -> AgentName {
    AgentName::new(s).unwrap()
}

/// The receivers a kit trailer is signed for: Bob alone.
pub fn bob_only() -> Vec<(AgentName, Fingerprint)> {
    vec![(name("bob"), bob().fingerprint())]
}

pub fn tid(t: u8) -> TransferId {
    TransferId([t; 16])
}

pub fn sid(t: u8) -> StreamId {
    StreamId([t; 16])
}

/// One side's copy of transfer `t`'s pair keys (both sides derive the same).
pub fn pair(t: u8) -> PairKeys {
    let secrets = Secrets {
        master: MasterKey::from_bytes([t; 32]),
        x25519: SharedSecret::from_bytes([3; 32]),
        mlkem: SharedSecret::from_bytes([7; 32]),
    };
    derive_pair_keys(
        secrets,
        &Nonce([4; 32]),
        &Nonce([5; 32]),
        &tid(t),
        &sid(t),
        &[6; 32],
    )
    .1
}

pub fn root(t: u8) -> StreamRoot {
    StreamRoot::from_bytes([t ^ 0x5a; 32])
}

/// The stream keys of transfer `t` (what a hostile sender holds).
pub fn stream_keys(t: u8) -> StreamKeys {
    derive_stream_keys(&root(t), &sid(t))
}

/// The manifest body of a kit stream of `declared` bytes.
pub fn manifest_body(declared: u64) -> Vec<u8> {
    Manifest::single_file("data", declared).encode()
}

/// Transfer `t`'s sender with its manifest made (the frame is dropped: the
/// kit's receivers make their own copy, see [`receiver`]).
pub fn sender(t: u8, declared: u64, policy: RekeyPolicy, now: Instant) -> SendStream {
    let mut s = bare_sender(t, declared, policy, now);
    s.manifest(&manifest_body(declared)).unwrap();
    s
}

/// Transfer `t`'s sender before its manifest.
pub fn bare_sender(t: u8, declared: u64, policy: RekeyPolicy, now: Instant) -> SendStream {
    SendStream::with_root(
        root(t),
        sid(t),
        declared,
        true,
        StreamStart::fresh(),
        policy,
        now,
    )
}

/// The root and manifest frames of transfer `t` for Bob.
pub fn head_frames(t: u8, declared: u64) -> (ReadyFrame, ReadyFrame) {
    let mut s = bare_sender(t, declared, RekeyPolicy::default(), Instant::now());
    let root = s.root_for(&pair(t));
    let manifest = s.manifest(&manifest_body(declared)).unwrap();
    (root, manifest)
}

/// What Bob knows before transfer `t`'s stream.
pub fn expect(declared: u64) -> Expect {
    Expect {
        declared,
        size_known: true,
        resume: None,
        sender: alice().public().clone(),
        me: name("bob"),
        my_fp: bob().fingerprint(),
        receivers: 1,
        trust_sender_hash: false,
    }
}

/// Bob's receiver of transfer `t` before anything arrived.
pub fn bare_receiver(t: u8, declared: u64) -> RecvStream {
    RecvStream::new(pair(t), expect(declared))
}

/// Bob's receiver of transfer `t` with the root and manifest opened: ready
/// for the first chunk.
pub fn receiver(t: u8, declared: u64) -> RecvStream {
    receiver_of(t, declared, 1, false)
}

/// [`receiver`] for a stream that the offer says goes to `receivers`
/// receivers, taking the sender's hash if `trust_sender_hash`.
pub fn receiver_of(t: u8, declared: u64, receivers: u32, trust_sender_hash: bool) -> RecvStream {
    let mut r = RecvStream::new(
        pair(t),
        Expect {
            receivers,
            trust_sender_hash,
            ..expect(declared)
        },
    );
    let (root, manifest) = head_frames(t, declared);
    r.open_root(root.record()).unwrap();
    let (from, body) = r.open_manifest(manifest.record()).unwrap();
    assert_eq!((from, body), (0, manifest_body(declared)));
    r
}

/// Alice's trailer for Bob.
pub fn trailer(s: &mut SendStream) -> (ReadyFrame, [u8; 32]) {
    s.trailer(alice(), &bob_only()).unwrap()
}
