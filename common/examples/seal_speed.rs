//! One core's speed at sealing and opening a stream through the protocol's own
//! code (sequence numbers, SHA-256 of the whole stream, AES-256-GCM, the chunk
//! frame). `scripts/bench.sh` prints it to show that the hardware
//! AES and SHA paths are in use: without them sealing falls to about 35 MB/s.
//!
//! `cargo run --release --example seal_speed [MiB]` (default 256).

use std::time::{Duration, Instant};

use keyferry_common::crypto::keys::{MasterKey, SharedSecret};
use keyferry_common::identity::Identity;
use keyferry_common::ids::{Nonce, StreamId, TransferId};
use keyferry_common::manifest::Manifest;
use keyferry_common::name::AgentName;
use keyferry_common::schedule::{PairKeys, Secrets, derive_pair_keys};
use keyferry_common::transfer::{Expect, RecvStream, RekeyPolicy, SendStream, StreamStart};
use keyferry_common::wire::frame::LEN_PREFIX;
use keyferry_common::wire::record::DEFAULT_CHUNK;

const SID: StreamId = StreamId([5; 16]);

/// One side's copy of a pair's keys, as a handshake would leave them.
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

fn identity(pem: &str) -> Result<Identity, Box<dyn std::error::Error>> {
    Ok(Identity::from_pkcs8_pem(pem).ok_or("not PKCS#8")??)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mib: u64 = match std::env::args().nth(1) {
        Some(a) => a.parse()?,
        None => 256,
    };
    let size = mib << 20;
    let chunks = size.div_ceil(DEFAULT_CHUNK as u64);
    let hour = Duration::from_secs(3600);

    // Each chunk is sealed, then opened, in one reused buffer; the two are
    // timed apart.
    let alice = identity(include_str!("../tests/fixtures/alice.pem"))?;
    let bob = identity(include_str!("../tests/fixtures/bob.pem"))?;
    let mut sender = SendStream::new(
        SID,
        size,
        true,
        StreamStart::fresh(),
        RekeyPolicy::with_interval(hour),
        Instant::now(),
    );
    let mut receiver = RecvStream::new(
        pair(),
        Expect {
            declared: size,
            size_known: true,
            resume: None,
            sender: alice.public().clone(),
            me: AgentName::new("bob")?,
            my_fp: bob.fingerprint(),
            receivers: 1,
            trust_sender_hash: false,
        },
    );
    let body = Manifest::single_file("speed", size).encode();
    for mut head in [
        sender.root_for(&pair()).into_frame(),
        sender.manifest(&body)?.into_frame(),
    ] {
        receiver.open(&mut head[LEN_PREFIX..])?;
    }
    let (mut seal, mut open) = (Duration::ZERO, Duration::ZERO);
    let mut buf = Vec::new();
    let mut sent = 0u64;
    for i in 0..chunks {
        let start = Instant::now();
        let len = (size - sent).min(DEFAULT_CHUNK as u64);
        let mut frame = sender.chunk_frame(buf, usize::try_from(len)?)?;
        frame.plaintext_mut().fill(i as u8);
        sent += len;
        let out = sender.push_frame(frame, sent == size, Instant::now())?;
        buf = out.chunk.seal().into_frame();
        let sealed = Instant::now();
        // The receiver's one door, on the frame's payload as it arrives.
        receiver.open(&mut buf[LEN_PREFIX..])?;
        open += sealed.elapsed();
        seal += sealed - start;
    }
    let start = Instant::now();
    let receivers = [(AgentName::new("bob")?, bob.fingerprint())];
    let mut trailer = sender.trailer(&alice, &receivers)?.0.into_frame();
    let sealed = Instant::now();
    receiver.open(&mut trailer[LEN_PREFIX..])?;
    open += sealed.elapsed();
    seal += sealed - start;

    let mbps = |t: Duration| size as f64 / t.as_secs_f64() / 1e6;
    println!(
        "seal {:.0} MB/s, open {:.0} MB/s (one core, {mib} MiB in {} KiB chunks)",
        mbps(seal),
        mbps(open),
        DEFAULT_CHUNK >> 10
    );
    Ok(())
}
