//! The stream state machines against a hostile network, without any network:
//! bit flips, reordering, replay, drops, splices, truncation, key-update abuse,
//! rekeying at exactly its limits. Modelled on the age test kit.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::time::{Duration, Instant};

use keyferry_common::ids::TransferId;
use keyferry_common::schedule::StreamKeys;
use keyferry_common::transfer::{Opened, RecvError, RekeyPolicy, SendError, SendStream};

mod kit;

#[derive(Debug, Clone, PartialEq)]
enum Rec {
    KeyUpdate(Vec<u8>),
    Chunk(Vec<u8>),
    Trailer(Vec<u8>),
}

struct Sent {
    transfer: u8,
    records: Vec<Rec>,
    stream: SendStream,
    sha256: [u8; 32],
}

impl Sent {
    /// Checks a receipt the way Alice does.
    fn check(&self, receipt: &[u8; 32]) -> bool {
        self.stream
            .check_receipt(&kit::pair(self.transfer), receipt)
            .is_ok()
    }
}

/// Sends `data` as transfer `transfer` in chunks of `chunk` bytes; the clock
/// advances `step` per chunk. The records after the root and manifest.
fn send(transfer: u8, data: &[u8], chunk: usize, policy: RekeyPolicy, step: Duration) -> Sent {
    let t0 = Instant::now();
    let mut s = kit::sender(transfer, data.len() as u64, policy, t0);
    let mut records = Vec::new();
    let pieces: Vec<&[u8]> = if data.is_empty() {
        vec![&[]]
    } else {
        data.chunks(chunk).collect()
    };
    let n = pieces.len();
    for (i, piece) in pieces.into_iter().enumerate() {
        let out = s
            .push(piece, i + 1 == n, t0 + step * i as u32)
            .expect("push");
        if let Some(ku) = out.key_update {
            records.push(Rec::KeyUpdate(ku.record().to_vec()));
        }
        records.push(Rec::Chunk(out.chunk.seal().record().to_vec()));
    }
    let (trailer, sha256) = kit::trailer(&mut s);
    records.push(Rec::Trailer(trailer.record().to_vec()));
    Sent {
        transfer,
        records,
        stream: s,
        sha256,
    }
}

/// Feeds records to a receiver that has its root and manifest; returns the
/// data and receipt, or the error with the index of the record that caused it
/// (`records.len()` = at the end).
fn receive(
    transfer: u8,
    declared: u64,
    records: &[Rec],
) -> Result<(Vec<u8>, [u8; 32]), (usize, RecvError)> {
    let mut r = kit::receiver(transfer, declared);
    let mut data = Vec::new();
    let mut receipt = None;
    for (i, rec) in records.iter().enumerate() {
        match rec {
            Rec::KeyUpdate(b) => r.open_key_update(b).map(|_| ()),
            Rec::Chunk(b) => r.open_chunk(b).map(|(p, _)| data.extend_from_slice(&p)),
            Rec::Trailer(b) => r.open_trailer(b).map(|t| receipt = Some(t.receipt)),
        }
        .map_err(|e| (i, e))?;
    }
    r.end_of_stream().map_err(|e| (records.len(), e))?;
    Ok((data, receipt.expect("a verified stream has a receipt")))
}

fn every_chunk_rekeys() -> RekeyPolicy {
    RekeyPolicy::with_interval(Duration::from_millis(1))
}

const STEP: Duration = Duration::from_millis(2);

fn data(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 + i / 251) as u8).collect()
}

#[test]
fn one_mib_with_a_tiny_rekey_interval_spans_many_epochs_and_round_trips() {
    let d = data(1 << 20);
    let sent = send(1, &d, 64 << 10, every_chunk_rekeys(), STEP);
    let updates = sent
        .records
        .iter()
        .filter(|r| matches!(r, Rec::KeyUpdate(_)))
        .count();
    assert_eq!(
        updates, 15,
        "16 chunks, a new key before each after the first"
    );
    assert_eq!(sent.stream.session_keys(), 16);
    let (got, receipt) = receive(1, d.len() as u64, &sent.records).unwrap();
    assert_eq!(got, d);
    assert!(sent.check(&receipt));
    let mut bad = receipt;
    bad[0] ^= 1;
    assert!(!sent.check(&bad));
    assert_eq!(
        sent.sha256,
        <sha2::Sha256 as sha2::Digest>::digest(&d).as_slice()
    );
}

#[test]
fn every_single_bit_flip_in_any_record_is_refused_at_that_record() {
    let d = data(2500);
    let sent = send(2, &d, 1000, every_chunk_rekeys(), STEP);
    // C0 KU1 C1 KU2 C2(last) T
    let kinds: Vec<&str> = sent
        .records
        .iter()
        .map(|r| match r {
            Rec::KeyUpdate(_) => "ku",
            Rec::Chunk(_) => "c",
            Rec::Trailer(_) => "t",
        })
        .collect();
    assert_eq!(kinds, ["c", "ku", "c", "ku", "c", "t"]);
    let mut flips = 0;
    for (i, rec) in sent.records.iter().enumerate() {
        let bytes = match rec {
            Rec::KeyUpdate(b) | Rec::Chunk(b) | Rec::Trailer(b) => b,
        };
        for bit in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            let mut recs = sent.records.clone();
            recs[i] = match rec {
                Rec::KeyUpdate(_) => Rec::KeyUpdate(b),
                Rec::Chunk(_) => Rec::Chunk(b),
                Rec::Trailer(_) => Rec::Trailer(b),
            };
            let (at, _) = receive(2, d.len() as u64, &recs).expect_err("flipped bit accepted");
            assert_eq!(at, i, "record {i} bit {bit} was not refused where it stood");
            flips += 1;
        }
    }
    assert!(flips > 20_000);
}

fn chunks_of(recs: &[Rec]) -> Vec<usize> {
    recs.iter()
        .enumerate()
        .filter(|(_, r)| matches!(r, Rec::Chunk(_)))
        .map(|(i, _)| i)
        .collect()
}

fn sent_without_rekey(transfer: u8, d: &[u8]) -> Sent {
    send(transfer, d, 1000, RekeyPolicy::default(), STEP)
}

#[test]
fn reordered_replayed_dropped_duplicated_and_spliced_chunks_are_refused() {
    let d = data(4000);
    let sent = sent_without_rekey(3, &d);
    let c = chunks_of(&sent.records);
    assert_eq!(c.len(), 4);
    let declared = d.len() as u64;

    let mut reordered = sent.records.clone();
    reordered.swap(c[1], c[2]);
    assert!(matches!(
        receive(3, declared, &reordered),
        Err((
            1,
            RecvError::OutOfOrder {
                expected: 1,
                got: 2
            }
        ))
    ));

    let mut replayed = sent.records.clone();
    replayed.insert(c[2], sent.records[c[0]].clone());
    assert!(matches!(
        receive(3, declared, &replayed),
        Err((
            2,
            RecvError::OutOfOrder {
                expected: 2,
                got: 0
            }
        ))
    ));

    let mut duplicated = sent.records.clone();
    duplicated.insert(c[1] + 1, sent.records[c[1]].clone());
    assert!(matches!(
        receive(3, declared, &duplicated),
        Err((
            2,
            RecvError::OutOfOrder {
                expected: 2,
                got: 1
            }
        ))
    ));

    let mut dropped = sent.records.clone();
    dropped.remove(c[1]);
    assert!(matches!(
        receive(3, declared, &dropped),
        Err((
            1,
            RecvError::OutOfOrder {
                expected: 1,
                got: 2
            }
        ))
    ));

    // Same position, same epoch, same length: only the transfer differs.
    let other = sent_without_rekey(4, &d);
    let mut spliced = sent.records.clone();
    spliced[c[1]] = other.records[c[1]].clone();
    assert!(matches!(
        receive(3, declared, &spliced),
        Err((1, RecvError::Auth))
    ));
    let mut foreign_trailer = sent.records.clone();
    *foreign_trailer.last_mut().unwrap() = other.records.last().unwrap().clone();
    assert!(matches!(
        receive(3, declared, &foreign_trailer),
        Err((4, RecvError::Auth))
    ));
}

#[test]
fn truncation_anywhere_is_detected_including_at_epoch_boundaries() {
    let d = data(2500);
    let sent = send(5, &d, 1000, every_chunk_rekeys(), STEP);
    // C0 KU1 C1 KU2 C2(last) T: every proper prefix must fail at the end.
    for cut in 0..sent.records.len() {
        let got = receive(5, d.len() as u64, &sent.records[..cut]);
        assert!(
            matches!(got, Err((at, RecvError::Truncated)) if at == cut),
            "prefix of {cut} records: {got:?}"
        );
    }
}

#[test]
fn no_final_chunk_two_final_chunks_and_bytes_after_the_end_are_refused() {
    let d = data(2000);
    // A sender that declared 2000 bytes but stops before its last chunk.
    let full = sent_without_rekey(6, &d);
    let no_final: Vec<Rec> = full.records[..1].to_vec();
    assert!(matches!(
        receive(6, 2000, &no_final),
        Err((1, RecvError::Truncated))
    ));
    // Trailer before the last chunk.
    let early_trailer = vec![full.records[0].clone(), full.records[2].clone()];
    assert!(matches!(
        receive(6, 2000, &early_trailer),
        Err((1, RecvError::EarlyTrailer))
    ));

    // Two final chunks, both validly sealed under the transfer's keys: one
    // sender declared 1000 bytes (chunk 0 is final), another 2000.
    let short = send(6, &d[..1000], 1000, RekeyPolicy::default(), STEP);
    let two_finals = vec![short.records[0].clone(), full.records[1].clone()];
    assert!(matches!(
        receive(6, 1000, &two_finals),
        Err((1, RecvError::AfterEnd))
    ));

    // Anything after the trailer.
    let mut after = full.records.clone();
    after.push(full.records[1].clone());
    assert!(matches!(
        receive(6, 2000, &after),
        Err((3, RecvError::AfterEnd))
    ));
    let mut two_trailers = full.records.clone();
    two_trailers.push(full.records[2].clone());
    assert!(matches!(
        receive(6, 2000, &two_trailers),
        Err((3, RecvError::AfterEnd))
    ));

    // More data than the offer declared, or a final chunk short of it.
    assert!(matches!(
        receive(6, 1999, &full.records),
        Err((0, RecvError::Length { .. })) | Err((1, RecvError::Length { .. }))
    ));
    assert!(matches!(
        receive(6, 2001, &full.records),
        Err((1, RecvError::Length { .. }))
    ));
}

#[test]
fn missing_replayed_and_early_key_updates_are_refused() {
    let d = data(3000);
    let sent = send(7, &d, 1000, every_chunk_rekeys(), STEP);
    let declared = d.len() as u64;
    // C0 KU1 C1 KU2 C2(last) T
    let mut missing = sent.records.clone();
    missing.remove(1);
    assert!(matches!(
        receive(7, declared, &missing),
        Err((
            1,
            RecvError::WrongEpoch {
                expected: 0,
                got: 1
            }
        ))
    ));

    let mut replayed = sent.records.clone();
    replayed.insert(4, sent.records[1].clone());
    assert!(matches!(
        receive(7, declared, &replayed),
        Err((
            4,
            RecvError::BadKeyUpdate {
                expected: 3,
                got: 1
            }
        ))
    ));

    // KU1 (first_seq 1) moved before chunk 0.
    let mut early = sent.records.clone();
    early.swap(0, 1);
    assert!(matches!(
        receive(7, declared, &early),
        Err((
            0,
            RecvError::OutOfOrder {
                expected: 0,
                got: 1
            }
        ))
    ));

    // A chunk of a retired epoch after a key update.
    let mut retired = sent.records.clone();
    retired.insert(2, sent.records[0].clone());
    assert!(matches!(
        receive(7, declared, &retired),
        Err((
            2,
            RecvError::WrongEpoch {
                expected: 1,
                got: 0
            }
        ))
    ));
}

#[test]
fn an_empty_file_is_exactly_one_empty_final_chunk() {
    let sent = send(8, &[], 1000, RekeyPolicy::default(), STEP);
    assert_eq!(sent.records.len(), 2);
    match &sent.records[0] {
        // 17-byte header, no ciphertext, 16-byte tag.
        Rec::Chunk(b) => assert_eq!(b.len(), 17 + 16),
        other => panic!("{other:?}"),
    }
    let (got, receipt) = receive(8, 0, &sent.records).unwrap();
    assert!(got.is_empty());
    assert!(sent.check(&receipt));

    // The sender refuses an empty chunk that is not the last one.
    let mut s = kit::sender(8, 10, RekeyPolicy::default(), Instant::now());
    assert_eq!(
        s.push(Vec::new(), false, Instant::now()).unwrap_err(),
        SendError::ChunkLength(0)
    );
}

#[test]
fn rekeying_happens_exactly_at_the_soft_limit_and_sealing_stops_at_the_hard_limit() {
    let t0 = Instant::now();
    let policy = RekeyPolicy {
        interval: Duration::from_secs(3600),
        soft_bytes: 4096,
        hard_bytes: 8192,
    };
    let mut s = kit::sender(9, 10_000, policy, t0);
    for _ in 0..4 {
        assert!(
            s.push(vec![0; 1024], false, t0)
                .unwrap()
                .key_update
                .is_none()
        );
    }
    assert_eq!(s.epoch(), 0, "exactly 4096 bytes under one key is allowed");
    assert!(s.push(vec![0; 1], false, t0).unwrap().key_update.is_some());
    assert_eq!(s.epoch(), 1);

    let no_soft = RekeyPolicy {
        interval: Duration::from_secs(3600),
        soft_bytes: u64::MAX,
        hard_bytes: 4096,
    };
    let mut s = kit::sender(9, 10_000, no_soft, t0);
    for _ in 0..4 {
        s.push(vec![0; 1024], false, t0).unwrap();
    }
    assert_eq!(
        s.push(vec![0; 1], false, t0).unwrap_err(),
        SendError::KeyExhausted(4096)
    );
}

#[test]
fn rekeying_happens_exactly_when_the_interval_has_passed() {
    let t0 = Instant::now();
    let interval = Duration::from_millis(100);
    let mut s = kit::sender(10, 10_000, RekeyPolicy::with_interval(interval), t0);
    assert!(s.push(vec![1; 10], false, t0).unwrap().key_update.is_none());
    let just_before = t0 + interval - Duration::from_nanos(1);
    assert!(
        s.push(vec![1; 10], false, just_before)
            .unwrap()
            .key_update
            .is_none()
    );
    let ku = s
        .push(vec![1; 10], false, t0 + interval)
        .unwrap()
        .key_update;
    let ku = ku.map(|k| keyferry_common::wire::record::KeyUpdateRecord::parse(k.record()).unwrap());
    assert_eq!(ku.map(|k| (k.epoch, k.first_seq)), Some((1, 2)));
}

#[test]
fn the_sender_refuses_a_file_that_grew_or_shrank() {
    let t0 = Instant::now();
    let mut s = kit::sender(11, 100, RekeyPolicy::default(), t0);
    assert_eq!(
        s.push(vec![0; 101], false, t0).unwrap_err(),
        SendError::Oversize { declared: 100 }
    );
    assert_eq!(
        s.push(vec![0; 99], true, t0).unwrap_err(),
        SendError::Undersize {
            sent: 99,
            declared: 100
        }
    );
    assert_eq!(
        s.trailer(kit::alice(), &kit::bob_only()).unwrap_err(),
        SendError::Order
    );
    s.push(vec![0; 100], true, t0).unwrap();
    assert_eq!(s.push(vec![0; 1], true, t0).unwrap_err(), SendError::Order);
}

#[test]
fn after_one_error_the_receiver_accepts_nothing() {
    let d = data(3000);
    let sent = sent_without_rekey(12, &d);
    let mut r = kit::receiver(12, d.len() as u64);
    let Rec::Chunk(c0) = &sent.records[0] else {
        panic!()
    };
    let mut bad = c0.clone();
    bad[40] ^= 1;
    assert_eq!(r.open_chunk(&bad).unwrap_err(), RecvError::Auth);
    // The genuine chunk 0 is refused now too: the stream is dead.
    assert!(r.open_chunk(c0).is_err());
}

/// What a hostile sender holding the stream keys can put on the wire: a key
/// update for any epoch and position (the honest `SendStream` never makes
/// these).
fn forged_key_update(k: &StreamKeys, epoch: u32, first_seq: u64) -> Rec {
    use keyferry_common::crypto::seal;
    use keyferry_common::wire::record::{KeyUpdateRecord, key_update_ad};
    let ad = key_update_ad(&k.stream_id, epoch, first_seq);
    Rec::KeyUpdate(
        KeyUpdateRecord {
            epoch,
            first_seq,
            sealed: seal::seal(&k.wrap, &ad, &[9; 32]),
        }
        .encode(),
    )
}

/// A chunk of epoch 0 sealed by hand, with whatever `last` flag a hostile
/// sender likes.
fn forged_chunk(k: &StreamKeys, seq: u64, offset: u64, last: bool, plain: &[u8]) -> Rec {
    use keyferry_common::wire::record::seal_chunk;
    let key = k.epoch0.epoch_key(&k.stream_id, 0);
    let record = seal_chunk(&key, &k.stream_id, 0, seq, offset, last, plain);
    Rec::Chunk(record)
}

#[test]
fn an_epoch_without_a_chunk_is_refused() {
    let k = kit::stream_keys(12);
    // A key update before the first chunk of the transfer.
    let early = vec![forged_key_update(&k, 1, 0)];
    assert!(matches!(
        receive(12, 100, &early),
        Err((0, RecvError::EmptyEpoch { epoch: 1 }))
    ));
    // Two key updates back to back after a chunk: the second opens nothing.
    let stream = vec![
        forged_chunk(&k, 0, 0, false, b"first"),
        forged_key_update(&k, 1, 1),
        forged_key_update(&k, 2, 1),
    ];
    assert!(matches!(
        receive(12, 100, &stream),
        Err((2, RecvError::EmptyEpoch { epoch: 2 }))
    ));
    // One key update after a chunk is fine (the honest sender's rule).
    assert!(matches!(
        receive(12, 100, &stream[..2]),
        Err((2, RecvError::Truncated))
    ));
}

#[test]
fn the_chunk_that_reaches_the_declared_size_must_be_the_last() {
    let k = kit::stream_keys(13);
    // Two full chunks, the second not flagged last although it reaches the size.
    let unflagged = vec![
        forged_chunk(&k, 0, 0, false, &[1; 10]),
        forged_chunk(&k, 1, 10, false, &[2; 10]),
    ];
    assert!(matches!(
        receive(13, 20, &unflagged),
        Err((1, RecvError::Length { declared: 20 }))
    ));
    // ... and so no empty last chunk may follow a full stream.
    let mut trailing_empty = unflagged.clone();
    trailing_empty[1] = forged_chunk(&k, 1, 10, true, &[2; 10]);
    trailing_empty.push(forged_chunk(&k, 2, 20, true, &[]));
    assert!(matches!(
        receive(13, 20, &trailing_empty),
        Err((2, RecvError::AfterEnd))
    ));
    // The honest sender flags the k-th of k full chunks and refuses otherwise.
    let d = data(2000);
    let sent = send(13, &d, 1000, RekeyPolicy::default(), STEP);
    assert_eq!(chunks_of(&sent.records).len(), 2);
    let mut s = kit::sender(13, 10, RekeyPolicy::default(), Instant::now());
    assert_eq!(
        s.push([0; 10], false, Instant::now()).unwrap_err(),
        SendError::Order
    );
}

#[test]
fn the_one_door_takes_whole_frames_and_checks_the_transfer() {
    use keyferry_common::wire::frame::{LEN_PREFIX, MAX_FRAME_LEN};
    use keyferry_common::wire::message::{AbortReason, Message, encode};
    let d = data(5000);
    let t0 = Instant::now();
    let mut s = kit::bare_sender(14, d.len() as u64, every_chunk_rekeys(), t0);
    let mut frames = vec![
        s.root_for(&kit::pair(14)).into_frame(),
        s.manifest(&kit::manifest_body(d.len() as u64))
            .unwrap()
            .into_frame(),
    ];
    for (i, piece) in d.chunks(2000).enumerate() {
        let out = s.push(piece, i == 2, t0 + STEP * i as u32).unwrap();
        frames.extend(out.key_update.map(|ku| ku.frame().to_vec()));
        frames.push(out.chunk.seal().into_frame());
    }
    frames.push(kit::trailer(&mut s).0.into_frame());
    // Through the door, frame by frame, exactly as they come off the wire.
    let mut r = kit::bare_receiver(14, d.len() as u64);
    let (mut got, mut epochs, mut done) = (Vec::new(), 0, None);
    for f in &frames {
        let mut payload = f[LEN_PREFIX..].to_vec();
        match r.open(&mut payload).unwrap() {
            Opened::Root => assert_eq!(r.epoch(), 0),
            Opened::Manifest { resume_from, body } => {
                assert_eq!(resume_from, 0);
                assert_eq!(body, kit::manifest_body(d.len() as u64));
            }
            Opened::Chunk { plaintext, .. } => got.extend_from_slice(plaintext),
            Opened::KeyUpdate(_) => epochs += 1,
            Opened::Trailer(t) => done = Some(t),
        }
    }
    assert_eq!(got, d);
    assert_eq!(epochs, 2);
    assert!(r.is_complete());
    s.check_receipt(&kit::pair(14), &done.unwrap().receipt)
        .unwrap();

    // Anything else through the door ends the stream, and says what it was.
    let payload = |m: &Message| encode(m, MAX_FRAME_LEN).unwrap()[LEN_PREFIX..].to_vec();
    let cases: Vec<(Vec<u8>, RecvError)> = vec![
        (
            payload(&Message::Abort {
                transfer_id: TransferId([14; 16]),
                reason: AbortReason::Interrupted,
            }),
            RecvError::Aborted(AbortReason::Interrupted),
        ),
        (
            payload(&Message::Abort {
                transfer_id: TransferId([15; 16]),
                reason: AbortReason::Interrupted,
            }),
            RecvError::OtherTransfer,
        ),
        (payload(&Message::List), RecvError::Unexpected("List")),
        (vec![0xff, 0xff], RecvError::NotAMessage),
        // Another transfer's root, and a chunk of another stream on the
        // fast path.
        (frames[0][LEN_PREFIX..].to_vec(), RecvError::OtherTransfer),
        (frames[2][LEN_PREFIX..].to_vec(), RecvError::OtherTransfer),
        // The transfer's own chunk before its root.
        (frames[2][LEN_PREFIX..].to_vec(), RecvError::Early("chunk")),
    ];
    for (i, (mut bad, want)) in cases.into_iter().enumerate() {
        let transfer = if i == 4 || i == 5 { 15 } else { 14 };
        let mut r = kit::bare_receiver(transfer, d.len() as u64);
        assert_eq!(r.open(&mut bad).unwrap_err(), want, "case {i}");
        assert_eq!(r.end_of_stream().unwrap_err(), RecvError::Truncated);
    }
}
