//! Relaying one upload to several receivers (PROTOCOL.md §2.5): the sender
//! writes its sealed stream once; the broker copies each record to every
//! receiver still in the copy, and brings each receiver's receipt (or abort)
//! back to the sender. Like the one-to-one relay it opens no record; it only
//! checks each frame is allowed: forward, the `Root` of one of the upload's
//! transfers (to that receiver only), `Manifest`, `KeyUpdate`, `Chunk`,
//! `Trailer` of the stream (to everyone), an `Abort` of one of its transfers
//! (to that receiver); back, each receiver's own `Proceed` (if it asked
//! its user), then its `Receipt` or `Abort`.
//!
//! Memory is bounded: each receiver has a queue of at most [`QUEUE`] frames
//! (at most 8 MiB, 4 MiB at the senders' chunk size). A receiver whose queue
//! is full holds the upload for at most [`LAG`]; then it is dropped from the
//! copy (its connection closed, the sender told `Abort{Timeout}` for it) and
//! the others go on at their own speed. A dropped receiver keeps what it
//! verified and is completed afterwards by a resume (PROTOCOL.md §6.4).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyferry_common::ids::{StreamId, TransferId};
use keyferry_common::io::connection::FrameReader;
use keyferry_common::wire::chunk::chunk_record;
use keyferry_common::wire::frame::{LEN_PREFIX, MAX_FRAME_LEN};
use keyferry_common::wire::message::{self, AbortReason, Message};
use tokio::io::AsyncWriteExt as _;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use crate::metrics::Meters;
use crate::quiet::Quiet;
use crate::relay::{DataConn, RelayEnd, RelayReport};
use crate::shutdown::Shutdown;

/// Frames one receiver may be behind the sender.
pub const QUEUE: usize = 8;
/// How long a full queue may hold the upload before its receiver is dropped.
pub const LAG: Duration = Duration::from_secs(2);
/// The same for a feed to another broker: longer, so that the other broker
/// drops its own slow receiver first rather than this one dropping the
/// feed and every receiver behind it.
pub const FEED_LAG: Duration = Duration::from_secs(5);
/// The largest frame a receiver sends back (a receipt or an abort).
const BACK_MAX: usize = 1024;

/// One receiver of the upload, or one feed to another broker carrying a
/// copy for its receivers of the upload ([`crate::feed`]).
#[derive(Debug)]
pub struct Receiver {
    /// Its transfer (a feed's: several).
    pub tids: Vec<TransferId>,
    /// Whether it is a feed to another broker ([`FEED_LAG`]).
    pub feed: bool,
    /// Its data connection.
    pub conn: DataConn,
    /// Tells its transfer's task that the relay ended (when dropped).
    pub done: Option<oneshot::Sender<()>>,
}

fn frame_of(msg: &Message) -> Vec<u8> {
    // Messages the broker makes itself are small and always encode.
    message::encode(msg, MAX_FRAME_LEN).unwrap_or_default()
}

/// Writes the frames of `rx` to a receiver until the queue closes, then
/// half-closes; stops at the first failed or stalled write. Each frame
/// written is movement on the upload's `quiet` clock.
async fn write_out(
    mut to: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Arc<[u8]>>,
    (idle, quiet): (Duration, Arc<Quiet>),
) {
    while let Some(f) = rx.recv().await {
        if !matches!(
            tokio::time::timeout(idle, to.write_all(&f)).await,
            Ok(Ok(()))
        ) {
            return;
        }
        quiet.moved();
    }
    let _ = to.shutdown().await;
}

/// Brings back to the sender, for each of the transfers `tids` a
/// connection carries, its `Proceed` (at most one, if it asked its user)
/// and then its `Receipt` or `Abort`. A feed's broker may say more about a
/// transfer it already answered for (an `Abort` of its own, then its
/// receiver's): that is passed over. Anything else — a frame of another
/// transfer, a bad frame, the connection's end, its silence while the whole
/// upload is `quiet` for `idle` — becomes `Abort{PeerGone}` for every
/// transfer not yet answered.
async fn read_back(
    from: tokio::net::tcp::OwnedReadHalf,
    leftover: Vec<u8>,
    tids: Vec<TransferId>,
    back: mpsc::Sender<Vec<u8>>,
    (idle, quiet): (Duration, Arc<Quiet>),
) {
    let mut reader = FrameReader::with_buffer(from, leftover, BACK_MAX);
    let mut open = tids.clone();
    let mut proceeded = Vec::new();
    while !open.is_empty() {
        let read = quiet.within(idle, reader.read()).await;
        if let Some(Ok(Some(_))) = read {
            quiet.moved();
        }
        let frame = match read.and_then(Result::ok).flatten() {
            Some(m @ Message::Proceed { transfer_id })
                if open.contains(&transfer_id) && !proceeded.contains(&transfer_id) =>
            {
                proceeded.push(transfer_id);
                frame_of(&m)
            }
            Some(m @ Message::Receipt { transfer_id, .. })
            | Some(m @ Message::Abort { transfer_id, .. })
                if open.contains(&transfer_id) =>
            {
                open.retain(|t| *t != transfer_id);
                frame_of(&m)
            }
            Some(
                Message::Proceed { transfer_id }
                | Message::Receipt { transfer_id, .. }
                | Message::Abort { transfer_id, .. },
            ) if tids.contains(&transfer_id) => continue,
            _ => break,
        };
        if back.send(frame).await.is_err() {
            return;
        }
    }
    for tid in open {
        let gone = Message::Abort {
            transfer_id: tid,
            reason: AbortReason::PeerGone,
        };
        let _ = back.send(frame_of(&gone)).await;
    }
}

/// Where one frame of the sender's goes.
enum Route {
    One(TransferId),
    All { ends: bool },
}

/// One copy's way out: a receiver's connection, or a feed carrying the
/// copy of several transfers.
struct Lane {
    tids: Vec<TransferId>,
    tx: mpsc::Sender<Arc<[u8]>>,
    lag: Duration,
}

/// Decides about one frame payload of the sender's; `tids` maps the
/// upload's transfers to their lanes.
fn route(payload: &[u8], sid: &StreamId, tids: &HashMap<TransferId, usize>) -> Option<Route> {
    if let Some((s, _)) = chunk_record(payload) {
        return (s == *sid).then_some(Route::All { ends: false });
    }
    match message::decode_payload(payload).ok()? {
        Message::Root { transfer_id, .. } | Message::Abort { transfer_id, .. }
            if tids.contains_key(&transfer_id) =>
        {
            Some(Route::One(transfer_id))
        }
        Message::Manifest { stream_id, .. } | Message::KeyUpdate { stream_id, .. }
            if stream_id == *sid =>
        {
            Some(Route::All { ends: false })
        }
        Message::Trailer { stream_id, .. } if stream_id == *sid => Some(Route::All { ends: true }),
        _ => None,
    }
}

/// Relays the upload on `sender` to `receivers` until the trailer went to
/// every receiver still in the copy and each answered, or the upload fails.
pub async fn relay(
    sender: DataConn,
    receivers: Vec<Receiver>,
    sid: StreamId,
    idle: Duration,
    mut shutdown: Shutdown,
    meters: Meters,
) -> RelayReport {
    // Only one receiver's relay takes a sender over several connections.
    debug_assert!(sender.further.is_empty(), "an upload over lanes");
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    let transfers: usize = receivers.iter().map(|r| r.tids.len()).sum();
    let (back_tx, mut back_rx) = mpsc::channel::<Vec<u8>>(2 * transfers + 2);
    let mut lanes: Vec<Option<Lane>> = Vec::new();
    let mut lane_of = HashMap::new();
    let mut done = Vec::new();
    // A receiver says nothing while the stream comes in: silence counts only
    // when nothing moves either way.
    let quiet = Arc::new(Quiet::new());
    for r in receivers {
        let (rd, wr) = r.conn.tcp.into_split();
        let (tx, rx) = mpsc::channel::<Arc<[u8]>>(QUEUE);
        tasks.spawn(write_out(wr, rx, (idle, Arc::clone(&quiet))));
        let tids = r.tids.clone();
        let clock = (idle, Arc::clone(&quiet));
        tasks.spawn(read_back(rd, r.conn.leftover, tids, back_tx.clone(), clock));
        for tid in &r.tids {
            lane_of.insert(*tid, lanes.len());
        }
        let lag = if r.feed { FEED_LAG } else { LAG };
        lanes.push(Some(Lane {
            tids: r.tids,
            tx,
            lag,
        }));
        done.push((r.conn.guard, r.done));
    }
    let (s_read, mut s_write) = sender.tcp.into_split();
    let notices = back_tx;
    // Back: everything the receivers answer, to the sender, until they all did.
    let moved = Arc::clone(&quiet);
    let back = tokio::spawn(async move {
        while let Some(f) = back_rx.recv().await {
            if !matches!(
                tokio::time::timeout(idle, s_write.write_all(&f)).await,
                Ok(Ok(()))
            ) {
                break;
            }
            moved.moved();
        }
        let _ = s_write.shutdown().await;
    });

    let mut reader = FrameReader::with_buffer(s_read, sender.leftover, MAX_FRAME_LEN);
    let mut bytes = 0u64;
    let mut payload = Vec::new();
    let result: Result<(), RelayEnd> = loop {
        let read = tokio::select! {
            r = quiet.within(idle, reader.read_payload_into(&mut payload)) => r,
            () = shutdown.cut() => break Err(RelayEnd::Shutdown),
        };
        match read {
            Some(Ok(true)) => quiet.moved(),
            Some(Ok(false)) => break Err(RelayEnd::Disconnected("sender")),
            Some(Err(e)) => {
                break Err(RelayEnd::Refused {
                    side: "sender",
                    what: format!("a bad frame: {e}"),
                });
            }
            None => {
                break Err(RelayEnd::Silent {
                    side: "sender",
                    secs: idle.as_secs(),
                });
            }
        }
        let Some(to) = route(&payload, &sid, &lane_of) else {
            break Err(RelayEnd::Refused {
                side: "sender",
                what: "a message not allowed here".into(),
            });
        };
        let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        let mut frame = Vec::with_capacity(LEN_PREFIX + payload.len());
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(&payload);
        let frame: Arc<[u8]> = frame.into();
        bytes += frame.len() as u64;
        meters.received.inc_by(frame.len() as u64);
        let (targets, ends): (Vec<usize>, bool) = match to {
            Route::One(tid) => (lane_of.get(&tid).copied().into_iter().collect(), false),
            Route::All { ends } => ((0..lanes.len()).collect(), ends),
        };
        for i in targets {
            let Some(Some(lane)) = lanes.get(i) else {
                continue;
            };
            let (tx, lag) = (&lane.tx, lane.lag);
            let sent = match tx.try_send(Arc::clone(&frame)) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(f)) => {
                    matches!(tokio::time::timeout(lag, tx.send(f)).await, Ok(Ok(())))
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            };
            if sent {
                meters.relayed.inc_by(frame.len() as u64);
            }
            if !sent && let Some(lane) = lanes.get_mut(i).and_then(Option::take) {
                // Too far behind, or gone: out of the copy; it resumes later.
                for tid in lane.tids {
                    lane_of.remove(&tid);
                    let gone = Message::Abort {
                        transfer_id: tid,
                        reason: AbortReason::Timeout,
                    };
                    let _ = notices.send(frame_of(&gone)).await;
                }
            }
        }
        if ends {
            break Ok(());
        }
        if lanes.iter().all(Option::is_none) {
            break Err(RelayEnd::Disconnected("every receiver"));
        }
    };
    // The queues close: each writer sends what it holds and half-closes.
    let failed = result.is_err();
    drop(lanes);
    if failed {
        // The receivers still in the copy get no trailer; their readers
        // report them gone, and the sender is told.
        tasks.abort_all();
    }
    drop(notices);
    let _ = tokio::time::timeout(idle + Duration::from_secs(5), back).await;
    tasks.abort_all();
    drop(done);
    RelayReport {
        bytes,
        elapsed: start.elapsed(),
        result,
    }
}
