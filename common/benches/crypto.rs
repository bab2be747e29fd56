//! Micro-benchmarks of the hot path: sealing and opening a chunk, a key update,
//! SHA-256 of the plaintext, and the frame codec. Run with `cargo bench -p
//! keyferry-common`; the throughput lines show whether the AES-NI / SHA-NI
//! paths are in use (without them sealing falls to tens of MB/s).

#![allow(clippy::unwrap_used)] // benchmark code: a panic is a bug in the benchmark

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use keyferry_common::crypto::keys::{MasterKey, SharedSecret};
use keyferry_common::ids::{Nonce, TransferId};
use keyferry_common::schedule::{StreamKeys, derive_stream_keys};
use keyferry_common::transfer::{RecvStream, RekeyPolicy, SendStream};
use keyferry_common::wire::frame::MAX_FRAME_LEN;
use keyferry_common::wire::message::{self, Message};
use keyferry_common::wire::record::DEFAULT_CHUNK;
use sha2::Digest as _;

fn keys() -> StreamKeys {
    derive_stream_keys(
        MasterKey::from_bytes([1; 32]),
        SharedSecret::from_bytes([2; 32]),
        &Nonce([3; 32]),
        &Nonce([4; 32]),
        &TransferId([5; 16]),
        &[6; 32],
    )
    .1
}

const BIG: u64 = 1 << 50;

fn chunk_path(c: &mut Criterion) {
    let plain = vec![0x5a; DEFAULT_CHUNK];
    let mut g = c.benchmark_group("chunk");
    g.throughput(Throughput::Bytes(DEFAULT_CHUNK as u64));
    g.measurement_time(Duration::from_secs(3));

    let mut sender = SendStream::new(
        keys(),
        BIG,
        RekeyPolicy::with_interval(Duration::from_secs(3600)),
        Instant::now(),
    );
    // As the agent does it: the plaintext copied into a reused frame buffer
    // (the agent reads it there from the file), sealed in place.
    let mut buf = Vec::new();
    g.bench_function("seal (push + AES-256-CBC + HMAC + SHA-256)", |b| {
        b.iter(|| {
            let mut frame = sender
                .chunk_frame(std::mem::take(&mut buf), plain.len())
                .unwrap();
            frame.plaintext_mut().copy_from_slice(&plain);
            let sent = sender.push_frame(frame, false, Instant::now()).unwrap();
            buf = black_box(sent.chunk.seal()).into_frame();
        })
    });

    // Open needs records in sequence: seal a batch once, open it repeatedly
    // with fresh receivers.
    let mut s = SendStream::new(
        keys(),
        BIG,
        RekeyPolicy::with_interval(Duration::from_secs(3600)),
        Instant::now(),
    );
    let records: Vec<Vec<u8>> = (0..64)
        .map(|_| {
            s.push(plain.clone(), false, Instant::now())
                .unwrap()
                .chunk
                .seal()
                .record()
                .to_vec()
        })
        .collect();
    g.bench_function("open (HMAC check + AES-256-CBC decrypt + SHA-256)", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut done = 0;
            while done < iters {
                let mut r = RecvStream::new(keys(), BIG);
                let n = (iters - done).min(records.len() as u64) as usize;
                let mut batch = records[..n].to_vec();
                let start = Instant::now();
                for rec in &mut batch {
                    black_box(r.open_chunk_in_place(rec).unwrap());
                }
                total += start.elapsed();
                done += n as u64;
            }
            total
        })
    });

    g.bench_function("SHA-256 alone", |b| {
        b.iter(|| black_box(sha2::Sha256::digest(&plain)))
    });

    let msg = Message::Chunk {
        transfer_id: TransferId([5; 16]),
        record: records[0].clone(),
    };
    g.bench_function("frame encode", |b| {
        b.iter(|| black_box(message::encode(&msg, MAX_FRAME_LEN).unwrap()))
    });
    let encoded = message::encode(&msg, MAX_FRAME_LEN).unwrap();
    g.bench_function("frame decode", |b| {
        b.iter(|| black_box(message::decode(&encoded, MAX_FRAME_LEN).unwrap()))
    });
    g.finish();
}

fn key_update(c: &mut Criterion) {
    let mut g = c.benchmark_group("key-update");
    let mut sender = SendStream::new(
        keys(),
        BIG,
        RekeyPolicy::with_interval(Duration::from_nanos(1)),
        Instant::now(),
    );
    let mut t = Instant::now();
    sender.push(vec![1], false, t).unwrap();
    g.bench_function("rekey + 1-byte chunk (sender)", |b| {
        b.iter(|| {
            t += Duration::from_millis(1);
            let sent = sender.push(vec![1], false, t).unwrap();
            black_box((sent.key_update, sent.chunk.seal()))
        })
    });
    g.finish();
}

criterion_group!(benches, chunk_path, key_update);
criterion_main!(benches);
