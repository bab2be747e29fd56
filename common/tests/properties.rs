//! Property tests: codec round trips and seal/open over random sizes, including
//! empty payloads and exact multiples of the chunk size.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::time::{Duration, Instant};

use keyferry_common::crypto::keys::{AesKey, MacKey, SealKeys};
use keyferry_common::crypto::seal;
use keyferry_common::handshake::SignedOffer;
use keyferry_common::ids::{StreamId, TransferId};
use keyferry_common::name::AgentName;
use keyferry_common::transfer::RekeyPolicy;
use keyferry_common::wire::frame::MAX_FRAME_LEN;
use keyferry_common::wire::message::{self, AbortReason, Message, RefuseReason};
use proptest::prelude::*;

mod kit;

fn arb_message() -> impl Strategy<Value = Message> {
    let tid = any::<[u8; 16]>().prop_map(TransferId);
    let sid = any::<[u8; 16]>().prop_map(StreamId);
    let bytes = proptest::collection::vec(any::<u8>(), 0..2048);
    prop_oneof![
        any::<u16>().prop_map(|version| Message::Hello { version }),
        ("[a-z0-9][a-z0-9._-]{0,31}", bytes.clone(), bytes.clone()).prop_map(
            |(to, body, signature)| {
                Message::Offer {
                    to: AgentName::new(&to).unwrap(),
                    offer: SignedOffer { body, signature },
                }
            }
        ),
        (tid.clone(), bytes.clone()).prop_map(|(transfer_id, accept)| Message::Accept {
            transfer_id,
            accept
        }),
        (tid.clone(), any::<u64>()).prop_map(|(transfer_id, most)| Message::Refuse {
            transfer_id,
            reason: RefuseReason::TooLarge { most }
        }),
        (sid.clone(), bytes.clone())
            .prop_map(|(stream_id, record)| Message::KeyUpdate { stream_id, record }),
        (sid.clone(), bytes.clone())
            .prop_map(|(stream_id, record)| Message::Chunk { stream_id, record }),
        (sid.clone(), bytes.clone())
            .prop_map(|(stream_id, record)| Message::Trailer { stream_id, record }),
        (sid, bytes.clone())
            .prop_map(|(stream_id, record)| Message::Manifest { stream_id, record }),
        (tid.clone(), bytes).prop_map(|(transfer_id, record)| Message::Root {
            transfer_id,
            record
        }),
        (tid.clone(), any::<[u8; 32]>(), "[ -~]{0,64}").prop_map(
            |(transfer_id, ticket, address)| {
                Message::Ticket {
                    transfer_id,
                    ticket,
                    address,
                }
            }
        ),
        any::<u64>().prop_map(|nonce| Message::Ping { nonce }),
        any::<u64>().prop_map(|nonce| Message::Pong { nonce }),
        (tid.clone(), any::<[u8; 32]>())
            .prop_map(|(transfer_id, tag)| Message::Receipt { transfer_id, tag }),
        tid.prop_map(|transfer_id| Message::Abort {
            transfer_id,
            reason: AbortReason::Timeout
        }),
    ]
}

proptest! {
    #[test]
    fn frames_round_trip_whole_and_split(msg in arb_message(), split in 0usize..64) {
        let bytes = message::encode(&msg, MAX_FRAME_LEN).unwrap();
        let (back, used) = message::decode(&bytes, MAX_FRAME_LEN).unwrap().unwrap();
        prop_assert_eq!(&back, &msg);
        prop_assert_eq!(used, bytes.len());
        let cut = split.min(bytes.len() - 1);
        prop_assert_eq!(message::decode(&bytes[..cut], MAX_FRAME_LEN).unwrap(), None);
        // Two frames back to back decode one at a time.
        let two = [bytes.clone(), bytes.clone()].concat();
        let (_, first) = message::decode(&two, MAX_FRAME_LEN).unwrap().unwrap();
        prop_assert_eq!(message::decode(&two[first..], MAX_FRAME_LEN).unwrap().unwrap().0, msg);
    }

    #[test]
    fn the_frame_decoder_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = message::decode(&bytes, MAX_FRAME_LEN);
    }

    #[test]
    fn seal_open_round_trips_any_size(len in 0usize..5000, ad in proptest::collection::vec(any::<u8>(), 0..64)) {
        let keys = SealKeys { aes: AesKey::from_bytes([1; 32]), mac: MacKey::from_bytes([2; 32]) };
        let plain: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let s = seal::seal(&keys, &ad, &plain);
        prop_assert_eq!(s.ciphertext.len(), (len / 16 + 1) * 16);
        let back = seal::open(&keys, &ad, &s.iv, &s.ciphertext, &s.tag, 8192).unwrap();
        prop_assert_eq!(back, plain);
    }

    #[test]
    fn streams_round_trip_any_size_and_chunking(
        chunks in 0usize..6,
        extra in prop_oneof![Just(0usize), 1usize..1024],
        chunk in prop_oneof![Just(16usize), Just(1024usize), 1usize..3000],
        rekey_ms in 0u64..3,
    ) {
        // chunks * chunk + extra covers 0 bytes and exact multiples of the chunk size.
        let len = chunks * chunk + extra;
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let t0 = Instant::now();
        let policy = RekeyPolicy::with_interval(Duration::from_millis(rekey_ms));
        let mut s = kit::sender(1, len as u64, policy, t0);
        let mut r = kit::receiver(1, len as u64);
        let pieces: Vec<&[u8]> = if data.is_empty() { vec![&[]] } else { data.chunks(chunk).collect() };
        let n = pieces.len();
        let mut got = Vec::new();
        for (i, p) in pieces.into_iter().enumerate() {
            let out = s.push(p, i + 1 == n, t0 + Duration::from_millis(i as u64)).unwrap();
            if let Some(ku) = out.key_update {
                r.open_key_update(ku.record()).unwrap();
            }
            let (plain, last) = r.open_chunk(out.chunk.seal().record()).unwrap();
            prop_assert_eq!(last, i + 1 == n);
            got.extend_from_slice(&plain);
        }
        let (trailer, _) = kit::trailer(&mut s);
        let done = r.open_trailer(trailer.record()).unwrap();
        prop_assert_eq!(&got, &data);
        prop_assert_eq!(done.total, len as u64);
        prop_assert!(s.check_receipt(&kit::pair(1), &done.receipt).is_ok());
        prop_assert!(r.end_of_stream().is_ok());
    }
}
