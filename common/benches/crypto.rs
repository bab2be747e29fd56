//! Micro-benchmarks of the hot path: sealing and opening a chunk, a key update,
//! SHA-256 of the plaintext, and the frame codec. Run with `cargo bench -p
//! keyferry-common`; the throughput lines show whether the AES-NI / SHA-NI
//! paths are in use (without them sealing falls to tens of MB/s).

#![allow(clippy::unwrap_used)] // benchmark code: a panic is a bug in the benchmark

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use keyferry_common::crypto::keys::{MasterKey, SharedSecret, StreamRoot};
use keyferry_common::handshake::{Kind, OfferParams, ResumePoint, Terms, make_offer, verify_offer};
use keyferry_common::identity::Identity;
use keyferry_common::ids::{Nonce, StreamId, TransferId};
use keyferry_common::manifest::Manifest;
use keyferry_common::name::AgentName;
use keyferry_common::schedule::{PairKeys, Secrets, derive_pair_keys};
use keyferry_common::transfer::{Expect, RecvStream, RekeyPolicy, SendStream, StreamStart};
use keyferry_common::wire::frame::MAX_FRAME_LEN;
use keyferry_common::wire::message::{self, Message};
use keyferry_common::wire::record::DEFAULT_CHUNK;
use sha2::Digest as _;

fn identity(pem: &str) -> Identity {
    Identity::from_pkcs8_pem(pem).unwrap().unwrap()
}

fn alice() -> Identity {
    identity(include_str!("../tests/fixtures/alice.pem"))
}

fn bob() -> Identity {
    identity(include_str!("../tests/fixtures/bob.pem"))
}

const SID: StreamId = StreamId([5; 16]);

fn pair() -> PairKeys {
    let secrets = Secrets {
        master: MasterKey::from_bytes([1; 32]),
        x25519: SharedSecret::from_bytes([2; 32]),
        mlkem: SharedSecret::from_bytes([7; 32]),
    };
    derive_pair_keys(
        secrets,
        &Nonce([3; 32]),
        &Nonce([4; 32]),
        &TransferId([5; 16]),
        &SID,
        &[6; 32],
    )
    .1
}

/// A sender of an endless stream (its manifest made), with a fixed root so
/// that [`receiver`] can open what it seals.
fn sender(policy: RekeyPolicy) -> SendStream {
    let mut s = SendStream::with_root(
        StreamRoot::from_bytes([2; 32]),
        SID,
        BIG,
        true,
        StreamStart::fresh(),
        policy,
        Instant::now(),
    );
    s.manifest(&Manifest::single_file("big", BIG).encode())
        .unwrap();
    s
}

/// A receiver of [`sender`]'s stream, ready for its first chunk.
fn receiver(alice: &Identity, bob: &Identity) -> RecvStream {
    let mut twin = SendStream::with_root(
        StreamRoot::from_bytes([2; 32]),
        SID,
        BIG,
        true,
        StreamStart::fresh(),
        RekeyPolicy::default(),
        Instant::now(),
    );
    let mut r = RecvStream::new(
        pair(),
        Expect {
            declared: BIG,
            size_known: true,
            resume: None,
            sender: alice.public().clone(),
            me: AgentName::new("bob").unwrap(),
            my_fp: bob.fingerprint(),
            receivers: 1,
            trust_sender_hash: false,
        },
    );
    r.open_root(twin.root_for(&pair()).record()).unwrap();
    let manifest = twin
        .manifest(&Manifest::single_file("big", BIG).encode())
        .unwrap();
    r.open_manifest(manifest.record()).unwrap();
    r
}

const BIG: u64 = 1 << 50;

fn chunk_path(c: &mut Criterion) {
    let plain = vec![0x5a; DEFAULT_CHUNK];
    let mut g = c.benchmark_group("chunk");
    g.throughput(Throughput::Bytes(DEFAULT_CHUNK as u64));
    g.measurement_time(Duration::from_secs(3));

    let mut sender = sender(RekeyPolicy::with_interval(Duration::from_secs(3600)));
    // As the agent does it: the plaintext copied into a reused frame buffer
    // (the agent reads it there from the file), sealed in place.
    let mut buf = Vec::new();
    g.bench_function("seal (push + AES-256-GCM + SHA-256)", |b| {
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
    let (alice, bob) = (alice(), bob());
    let mut s = self::sender(RekeyPolicy::with_interval(Duration::from_secs(3600)));
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
    g.bench_function("open (AES-256-GCM + SHA-256)", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut done = 0;
            while done < iters {
                let mut r = receiver(&alice, &bob);
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
        stream_id: SID,
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
    let mut sender = sender(RekeyPolicy::with_interval(Duration::from_nanos(1)));
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

/// The version-2 handshake with real keys: the sender's offer (RSA-OAEP
/// wrap, X25519 and ML-KEM-768 key generation, RSA-PSS signature), the
/// receiver's verify + open + accept (signature check, blinded OAEP unwrap,
/// X25519, ML-KEM encapsulation), and the sender's check of the accept.
fn handshake(c: &mut Criterion) {
    let (alice, bob) = (alice(), bob());
    let name = |s| AgentName::new(s).unwrap();
    let offer = || {
        make_offer(OfferParams {
            identity: &alice,
            sender: name("alice"),
            receiver: name("bob"),
            receiver_key: bob.public(),
            stream_id: StreamId::random(),
            terms: Terms {
                kind: Kind::Files,
                size: 1 << 30,
                size_known: true,
                resumes: None,
                receivers: 1,
                punch: Vec::new(),
            },
            now_unix: 1_800_000_000,
        })
        .unwrap()
    };
    let accept = |o: &keyferry_common::handshake::SignedOffer| {
        verify_offer(
            o,
            alice.public(),
            &name("bob"),
            bob.fingerprint(),
            1_800_000_000,
            300,
        )
        .unwrap()
        .open(&bob)
        .unwrap()
        .accept(ResumePoint::none())
        .unwrap()
    };
    let mut g = c.benchmark_group("handshake");
    g.sample_size(20);
    g.bench_function("sender: make offer", |b| b.iter(|| black_box(offer())));
    let (_, o) = offer();
    g.bench_function("receiver: verify, open, accept", |b| {
        b.iter(|| black_box(accept(&o)))
    });
    g.bench_function("sender: check accept", |b| {
        b.iter_batched(
            || {
                let (pending, o) = offer();
                (pending, accept(&o).0)
            },
            |(pending, a)| black_box(pending.handle_accept(&a).unwrap()),
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, chunk_path, key_update, handshake);
criterion_main!(benches);
