//! The lanes against in-memory pipes: a stream cut into segments over lanes
//! of different speeds comes back whole and in order, both directions work,
//! and a peer that breaks the segment rules is refused.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf, duplex, split};

use super::*;

type Sender = Spread<ReadHalf<DuplexStream>>;
type Receiver = Gather<ReadHalf<DuplexStream>, WriteHalf<DuplexStream>>;

/// Both ends of lanes of pipes with room for `room[i]` bytes each way.
fn lanes(room: &[usize]) -> (Sender, Receiver) {
    let (mut writers, mut readers) = (Vec::new(), Vec::new());
    let (mut ours, mut theirs) = (None, None);
    for r in room {
        let (a, b) = duplex(*r);
        let ((ar, aw), (br, bw)) = (split(a), split(b));
        writers.push(aw);
        readers.push((br, Vec::new()));
        ours.get_or_insert(ar);
        theirs.get_or_insert(bw);
    }
    let sender = Spread::new((ours.unwrap(), Vec::new()), writers);
    (sender, Gather::new(readers, theirs.unwrap(), Vec::new()))
}

fn pseudo_random(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn segment(seq: u64, data: &[u8]) -> Vec<u8> {
    let mut out = seq.to_be_bytes().to_vec();
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

#[tokio::test]
async fn a_stream_over_uneven_lanes_arrives_whole_and_in_order_both_ways() {
    // Lanes of very different room, so segments overtake each other.
    let (mut sender, mut receiver) = lanes(&[4 << 10, 300 << 10, 64 << 10, 1 << 20]);
    let data = pseudo_random(5 << 20, 1);
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        // Writes of odd sizes, some flushed, as frames would be.
        let mut at = 0;
        let mut size = 1;
        while at < sent.len() {
            let end = (at + size).min(sent.len());
            sender.write_all(&sent[at..end]).await.unwrap();
            if size % 3 == 0 {
                sender.flush().await.unwrap();
            }
            at = end;
            size = (size * 7 + 1) % 700_000 + 1;
        }
        sender.flush().await.unwrap();
        // The answer comes back on the first lane.
        let mut answer = [0u8; 5];
        sender.read_exact(&mut answer).await.unwrap();
        sender.shutdown().await.unwrap();
        answer
    });
    let mut got = vec![0u8; data.len()];
    // Reads of a slow reader, in small pieces.
    let mut at = 0;
    while at < got.len() {
        let end = (at + 4099).min(got.len());
        let n = receiver.read(&mut got[at..end]).await.unwrap();
        assert!(n > 0);
        at += n;
    }
    assert!(got == data, "the stream came back changed");
    receiver.write_all(b"thank").await.unwrap();
    receiver.flush().await.unwrap();
    assert_eq!(&writer.await.unwrap(), b"thank");
    // The sender shut every lane: a clean end.
    assert_eq!(receiver.read(&mut [0u8; 8]).await.unwrap(), 0);
}

#[tokio::test]
async fn a_flush_waits_for_the_lanes_so_a_sender_dropped_after_it_loses_nothing() {
    // Lanes with little room: most of what is written waits in the queue.
    let (mut sender, mut receiver) = lanes(&[1 << 10, 2 << 10, 1 << 10]);
    let data = pseudo_random(300 << 10, 3);
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        sender.write_all(&sent).await.unwrap();
        sender.flush().await.unwrap();
        // Dropped at once, without a shutdown.
    });
    let mut got = vec![0u8; data.len()];
    receiver.read_exact(&mut got).await.unwrap();
    writer.await.unwrap();
    assert!(got == data, "the stream came back changed");
}

#[tokio::test]
async fn bytes_read_before_the_lanes_are_served_first() {
    // The receiver's first lane already holds segment 0 and the head of 1.
    let (a, mut b) = duplex(1 << 16);
    let (c, mut d) = duplex(1 << 16);
    let mut ahead = segment(0, b"hello ");
    let one = segment(1, b"there");
    ahead.extend_from_slice(&one[..5]);
    b.write_all(&one[5..]).await.unwrap();
    d.write_all(&segment(2, b"!")).await.unwrap();
    drop((b, d));
    let ((ar, aw), (cr, _)) = (split(a), split(c));
    let mut receiver = Gather::new(vec![(ar, ahead), (cr, Vec::new())], aw, Vec::new());
    let mut got = String::new();
    receiver.read_to_string(&mut got).await.unwrap();
    assert_eq!(got, "hello there!");
}

/// What a receiver over two lanes makes of `lane0` and `lane1`, sent and closed.
async fn receive(lane0: Vec<u8>, lane1: Vec<u8>) -> io::Result<Vec<u8>> {
    let (a, mut b) = duplex(1 << 16);
    let (c, mut d) = duplex(1 << 16);
    b.write_all(&lane0).await.unwrap();
    d.write_all(&lane1).await.unwrap();
    drop((b, d));
    let ((ar, aw), (cr, _)) = (split(a), split(c));
    let mut receiver = Gather::new(vec![(ar, Vec::new()), (cr, Vec::new())], aw, Vec::new());
    let mut got = Vec::new();
    let read = receiver.read_to_end(&mut got);
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("a broken stream must end, not hang")?;
    Ok(got)
}

#[tokio::test]
async fn segments_that_break_the_rules_are_refused() {
    let ok = receive(
        segment(0, b"a"),
        [segment(1, b"b"), segment(2, b"c")].concat(),
    );
    assert_eq!(ok.await.unwrap(), b"abc");

    let twice = receive(
        segment(0, b"a"),
        [segment(0, b"a"), segment(1, b"b")].concat(),
    );
    assert_eq!(twice.await.unwrap_err().kind(), io::ErrorKind::InvalidData);

    let missing = receive(segment(1, b"b"), segment(2, b"c"));
    assert_eq!(
        missing.await.unwrap_err().kind(),
        io::ErrorKind::InvalidData
    );

    let mut empty = segment(0, b"");
    empty.truncate(SEGMENT_HEAD);
    let e = receive(empty, Vec::new()).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);

    let mut huge = 0u64.to_be_bytes().to_vec();
    huge.extend_from_slice(&(MAX_SEGMENT as u32 + 1).to_be_bytes());
    let e = receive(huge, Vec::new()).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);

    let mut cut = segment(0, b"abcdef");
    cut.truncate(SEGMENT_HEAD + 2);
    let e = receive(cut, Vec::new()).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);

    let half_head = segment(0, b"abc")[..5].to_vec();
    let e = receive(half_head, Vec::new()).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
}
