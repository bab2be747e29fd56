//! The receiver's stream state machine fed arbitrary records and frame
//! payloads: never panics, and never accepts a forged record (any record it
//! accepts would have to carry a valid tag under keys the fuzzer does not
//! know: not even the root, which is sealed under the pair's keys).
#![no_main]

use keyferry_common::crypto::keys::{MasterKey, SharedSecret};
use keyferry_common::identity::Identity;
use keyferry_common::ids::{Nonce, StreamId, TransferId};
use keyferry_common::manifest::Manifest;
use keyferry_common::name::AgentName;
use keyferry_common::schedule::{Secrets, derive_pair_keys};
use keyferry_common::transfer::{Expect, RecvStream};
use libfuzzer_sys::fuzz_target;

fn identity(pem: &str) -> Identity {
    Identity::from_pkcs8_pem(pem)
        .expect("PKCS#8")
        .expect("within the key policy")
}

fuzz_target!(|data: &[u8]| {
    let alice = identity(include_str!("../../common/tests/fixtures/alice.pem"));
    let bob = identity(include_str!("../../common/tests/fixtures/bob.pem"));
    let secrets = Secrets {
        master: MasterKey::from_bytes([1; 32]),
        x25519: SharedSecret::from_bytes([2; 32]),
        mlkem: SharedSecret::from_bytes([7; 32]),
    };
    let (_, pair) = derive_pair_keys(
        secrets,
        &Nonce([3; 32]),
        &Nonce([4; 32]),
        &TransferId([5; 16]),
        &StreamId([5; 16]),
        &[6; 32],
    );
    let mut stream = RecvStream::new(
        pair,
        Expect {
            declared: 1 << 20,
            size_known: true,
            resume: None,
            sender: alice.public().clone(),
            me: AgentName::new("bob").expect("a valid name"),
            my_fp: bob.fingerprint(),
        },
    );
    // Each record: a kind byte, a u16 length, the bytes.
    let mut rest = data;
    while rest.len() >= 3 {
        let kind = rest[0];
        let len = usize::from(u16::from_be_bytes([rest[1], rest[2]])).min(rest.len() - 3);
        let record = &rest[3..3 + len];
        rest = &rest[3 + len..];
        let accepted = match kind % 7 {
            0 => stream.open_chunk(record).is_ok(),
            1 => stream.open_key_update(record).is_ok(),
            2 => stream.open_trailer(record).is_ok(),
            3 => stream.open_root(record).is_ok(),
            4 => stream.open_manifest(record).is_ok(),
            // The manifest checks on their own: never panic.
            5 => {
                let _ = Manifest::decode(record);
                false
            }
            // The one door the agent uses: a whole frame payload.
            _ => stream.open(&mut record.to_vec()).is_ok(),
        };
        assert!(!accepted, "a record forged without the keys was accepted");
    }
    assert!(stream.end_of_stream().is_err());
});
