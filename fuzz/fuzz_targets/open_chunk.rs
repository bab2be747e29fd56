//! The receiver's stream state machine fed arbitrary records and frame
//! payloads: never panics,
//! and never accepts a forged record (any record it accepts would have to
//! carry a valid tag under keys the fuzzer does not know).
#![no_main]

use keyferry_common::crypto::keys::{MasterKey, SharedSecret};
use keyferry_common::ids::{Nonce, TransferId};
use keyferry_common::schedule::derive_stream_keys;
use keyferry_common::transfer::RecvStream;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let keys = derive_stream_keys(
        MasterKey::from_bytes([1; 32]),
        SharedSecret::from_bytes([2; 32]),
        &Nonce([3; 32]),
        &Nonce([4; 32]),
        &TransferId([5; 16]),
        &[6; 32],
    )
    .1;
    let mut stream = RecvStream::new(keys, 1 << 20);
    // Each record: a kind byte, a u16 length, the bytes.
    let mut rest = data;
    while rest.len() >= 3 {
        let kind = rest[0];
        let len = usize::from(u16::from_be_bytes([rest[1], rest[2]])).min(rest.len() - 3);
        let record = &rest[3..3 + len];
        rest = &rest[3 + len..];
        let accepted = match kind % 4 {
            0 => stream.open_chunk(record).is_ok(),
            1 => stream.open_key_update(record).is_ok(),
            2 => stream.open_trailer(record).is_ok(),
            // The one door the agent uses: a whole frame payload.
            _ => stream.open(&mut record.to_vec()).is_ok(),
        };
        assert!(!accepted, "a record forged without the keys was accepted");
    }
    assert!(stream.end_of_stream().is_err());
});
