//! A stored transfer's bytes (PROTOCOL.md §2.8), between a data connection
//! and the [`crate::mailbox`]: the sender's upload in, frame by frame, each
//! checked to be a message of this transfer's stream in its place (the root
//! of this transfer, the manifest, key updates and chunks, the trailer) but
//! never opened; and a delivery out, the stored frames copied as they are to
//! the receiver's data connection, whose receipt (or abort) says how it went.

use std::time::Duration;

use keyferry_common::ids::{StreamId, TransferId};
use keyferry_common::io::connection::{ConnError, FrameReader, FrameWriter};
use keyferry_common::wire::chunk::chunk_record;
use keyferry_common::wire::frame::MAX_FRAME_LEN;
use keyferry_common::wire::message::{self, Message};
use tokio::io::{AsyncRead, AsyncWriteExt as _};

use crate::mailbox::{Sink, StoredMeta};
use crate::metrics::Meters;
use crate::relay::DataConn;

/// Whether the (not chunk) frame `payload` may come `next` in the upload of
/// `tid`, `sid`: `Ok(true)` for the trailer, which ends it.
fn check(payload: &[u8], next: Next, (tid, sid): (TransferId, StreamId)) -> Result<bool, String> {
    let msg = message::decode_payload(payload).map_err(|e| format!("a malformed frame: {e}"))?;
    let (ok, last) = match (&msg, next) {
        (Message::Root { transfer_id, .. }, Next::Root) => (*transfer_id == tid, false),
        (Message::Manifest { stream_id, .. }, Next::Manifest) => (*stream_id == sid, false),
        (Message::KeyUpdate { stream_id, .. }, Next::Data) => (*stream_id == sid, false),
        (Message::Trailer { stream_id, .. }, Next::Data) => (*stream_id == sid, true),
        (Message::Abort { .. }, _) => return Err("the sender aborted the upload".into()),
        _ => (false, false),
    };
    if !ok {
        return Err(format!("the sender sent {} out of place", msg.kind()));
    }
    Ok(last)
}

/// Bytes of frames written to the mailbox at once.
const BATCH: usize = 4 << 20;

/// Where an upload stands: what may come next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    Root,
    Manifest,
    Data,
}

/// Takes an upload from the sender's data connection into `sink` until
/// its trailer, then commits it and tells the sender `Stored`. Any frame out
/// of place, a silence of `idle`, an `Abort` or a lost connection voids the
/// upload (nothing of it is ever offered).
pub async fn take_upload(
    conn: DataConn,
    mut sink: Sink,
    (tid, sid): (TransferId, StreamId),
    idle: Duration,
    meters: Meters,
) -> Result<StoredMeta, String> {
    // A stored upload redeems one ticket with `Redeem`: never over lanes.
    debug_assert!(conn.further.is_empty(), "a stored upload over lanes");
    let DataConn {
        tcp,
        leftover,
        guard,
        ..
    } = conn;
    let (rd, wr) = tcp.into_split();
    let mut reader = FrameReader::with_buffer(rd, leftover, MAX_FRAME_LEN);
    let mut next = Next::Root;
    let mut payload = Vec::new();
    // Frames go to the mailbox in batches (a disk's off the async threads).
    let mut batch: Vec<u8> = Vec::with_capacity(BATCH + MAX_FRAME_LEN);
    loop {
        let read = tokio::time::timeout(idle, reader.read_payload_into(&mut payload)).await;
        match read {
            Err(_) => return Err(format!("the sender was silent for {} s", idle.as_secs())),
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => return Err("the sender closed before its trailer".into()),
            Ok(Err(e)) => return Err(format!("the sender's connection failed: {e}")),
        }
        // A chunk (the bulk of an upload) is checked where it lies, without
        // copying its record out; anything else is small, and decoded.
        let last = match chunk_record(&payload) {
            Some((stream_id, _)) if next == Next::Data && stream_id == sid => false,
            Some(_) => return Err("the sender sent Chunk out of place".into()),
            None => check(&payload, next, (tid, sid))?,
        };
        next = match next {
            Next::Root => Next::Manifest,
            Next::Manifest | Next::Data => Next::Data,
        };
        let len = u32::try_from(payload.len()).map_err(|_| "a frame too long".to_owned())?;
        // Checked frame by frame, not only when a batch is written.
        let total = sink.written() + batch.len() as u64 + u64::from(len) + 4;
        if total > sink.limit() {
            return Err(format!(
                "the sender sent more than the {} bytes its announced size allows",
                sink.limit()
            ));
        }
        batch.extend_from_slice(&len.to_be_bytes());
        batch.extend_from_slice(&payload);
        meters.received.inc_by(u64::from(len) + 4);
        if batch.len() >= BATCH || last {
            batch = sink
                .write(std::mem::take(&mut batch))
                .await
                .map_err(|e| e.to_string())?;
        }
        if last {
            break;
        }
    }
    let meta = sink.commit().await.map_err(|e| e.to_string())?;
    let mut writer = FrameWriter::new(wr, 1024);
    let stored = Message::Stored {
        transfer_id: tid,
        expires: meta.expires,
    };
    // Stored is stored, whether or not the sender hears it.
    let _ = writer.write(&stored).await;
    drop(guard);
    Ok(meta)
}

/// How a delivery went, on the data connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// The receiver's receipt came back: it placed the data (its signed
    /// receipt comes on its control connection).
    Receipt,
    /// The receiver aborted, or went away, or fell silent.
    Failed,
}

/// Copies the stored frames in `file` (as they were uploaded) to the
/// receiver's data connection, and waits for its `Receipt` or `Abort` for
/// `tid`. `idle` bounds every wait for the receiver: to read, and to answer.
pub async fn deliver(
    conn: DataConn,
    mut file: Box<dyn AsyncRead + Send + Unpin>,
    tid: TransferId,
    idle: Duration,
    meters: Meters,
) -> Delivered {
    let DataConn { tcp, guard, .. } = conn;
    let (rd, mut wr) = tcp.into_split();
    let copy = async {
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = tokio::io::AsyncReadExt::read(&mut file, &mut buf).await?;
            if n == 0 {
                return Ok::<(), std::io::Error>(());
            }
            tokio::time::timeout(idle, wr.write_all(&buf[..n]))
                .await
                .map_err(|_| std::io::Error::other("the receiver stopped reading"))??;
            meters.relayed.inc_by(n as u64);
        }
    };
    let answer = async {
        let mut reader = FrameReader::new(rd, 1024);
        loop {
            match reader.read().await {
                Ok(Some(Message::Receipt { transfer_id, .. })) if transfer_id == tid => {
                    return Delivered::Receipt;
                }
                // Its user's go-ahead concerns nobody here: the data is sent.
                Ok(Some(Message::Proceed { .. })) => {}
                Ok(_) | Err(ConnError::Io(_) | ConnError::Frame(_) | ConnError::Truncated) => {
                    return Delivered::Failed;
                }
                Err(_) => return Delivered::Failed,
            }
        }
    };
    tokio::pin!(answer);
    let result = tokio::select! {
        copied = copy => match copied {
            // All of it is out: the receiver verifies, places, answers.
            Ok(()) => tokio::time::timeout(idle, &mut answer).await.unwrap_or(Delivered::Failed),
            Err(_) => Delivered::Failed,
        },
        early = &mut answer => early,
    };
    drop(guard);
    result
}
