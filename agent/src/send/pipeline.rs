//! The sender's pipeline: one blocking thread reads the file and feeds the
//! [`SendStream`] in order (sequence numbers, rekeying, SHA-256), a pool of
//! sealing threads seals the chunks (AES-256-GCM) in parallel, and the writer
//! task puts the frames on the data connection in order. Every queue is
//! bounded, so a slow receiver slows the reader instead of growing a buffer;
//! frame buffers go back to the reader once written.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keyferry_common::identity::{Fingerprint, Identity};
use keyferry_common::ids::TransferId;
use keyferry_common::io::connection::ConnError;
use keyferry_common::name::AgentName;
use keyferry_common::transfer::{ChunkJob, ReadyFrame, SendStream};
use keyferry_common::wire::message::{AbortReason, Message};
use keyferry_common::wire::record::DEFAULT_CHUNK;

use super::attempt::Ended;
use super::marks::{EVERY as MARKS_EVERY, MarkLog};
use super::reader::Reader;
use super::resume::SourceCheck;
use crate::client::{Ctx, DataConn, broker_error, conn_error};
use crate::error::AgentError;
use crate::progress::Progress;

/// A write failed: if the broker told us why (an `Abort` waiting to be read),
/// that is the better error; otherwise the connection was lost.
async fn why_write_failed(ctx: &Ctx, conn: &mut DataConn, e: ConnError) -> AgentError {
    match tokio::time::timeout(Duration::from_secs(2), conn.reader.read()).await {
        Ok(Ok(Some(Message::Abort { reason, .. }))) => AgentError::ReceiverAborted(reason),
        _ => conn_error(ctx, e),
    }
}

/// Waits for the go-ahead of every receiver that asks its user (its accept
/// said how long it may take): no chunk goes out before it. A receiver that
/// declines, or says nothing in time, is out of the upload; if none is
/// left, that is the error.
async fn wait_for_go(
    ctx: &Ctx,
    conn: &mut DataConn,
    tids: &[TransferId],
    asks: &[u32],
    ended: &mut Ended,
    progress: &Progress,
) -> Result<(), AgentError> {
    let mut waiting: Vec<TransferId> = tids
        .iter()
        .zip(asks)
        .filter(|(_, s)| **s > 0)
        .map(|(t, _)| *t)
        .collect();
    let Some(most) = asks.iter().max().filter(|s| **s > 0) else {
        return Ok(());
    };
    // The receiver's own time, bounded, and a margin for the way back.
    let most = Duration::from_secs(u64::from(*most).min(ASK_MAX_SECS) + 15);
    let deadline = tokio::time::Instant::now() + most;
    progress.suspend("waiting for the receiver's user to accept");
    while !waiting.is_empty() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let e = match conn.reader.read_timeout(left).await {
            Ok(Some(Message::Proceed { transfer_id })) if waiting.contains(&transfer_id) => {
                waiting.retain(|t| *t != transfer_id);
                continue;
            }
            Ok(Some(Message::Abort {
                transfer_id,
                reason,
            })) if tids.contains(&transfer_id) => {
                waiting.retain(|t| *t != transfer_id);
                ended
                    .entry(transfer_id)
                    .or_insert(Err(AgentError::ReceiverAborted(reason)));
                if ended.len() < tids.len() {
                    continue;
                }
                AgentError::ReceiverAborted(reason)
            }
            Err(ConnError::Timeout(_)) => {
                for t in waiting.drain(..) {
                    ended
                        .entry(t)
                        .or_insert(Err(AgentError::ReceiverAborted(AbortReason::NoAnswer)));
                }
                if ended.len() < tids.len() {
                    break;
                }
                AgentError::ReceiverAborted(AbortReason::NoAnswer)
            }
            Ok(Some(Message::Error { code, detail })) => broker_error(code, detail),
            Ok(Some(_)) => {
                AgentError::Protocol("unexpected message before the receiver's go-ahead")
            }
            Ok(None) => conn_error(ctx, ConnError::Truncated),
            Err(e) => conn_error(ctx, e),
        };
        return Err(e);
    }
    Ok(())
}

/// Longest a receiver may say it takes to ask its user (PROTOCOL.md §6.5).
const ASK_MAX_SECS: u64 = 100;

/// Standard input went on past the bound the offer declared.
fn too_long(bound: u64) -> AgentError {
    AgentError::FileUnreadable {
        path: "-".into(),
        detail: format!(
            "standard input is longer than --max-size ({bound} bytes); the receiver placed \
             nothing (one with --stdout has written a part, and fails). Raise --max-size (the \
             receiver's --max-size must allow it too)"
        ),
    }
}

/// A chunk's frames, sealed and ready to be written in order.
struct Sealed {
    key_update: Option<ReadyFrame>,
    /// The chunk's frame; its buffer goes back to the reader afterwards.
    chunk: Vec<u8>,
    trailer: Option<ReadyFrame>,
    done: u64,
    epoch: u32,
}

/// A chunk on its way to a sealing thread, with what must travel with it.
struct Job {
    index: u64,
    key_update: Option<ReadyFrame>,
    chunk: ChunkJob,
    trailer: Option<ReadyFrame>,
    done: u64,
    epoch: u32,
}

impl Job {
    fn seal(self) -> (u64, Sealed) {
        (
            self.index,
            Sealed {
                key_update: self.key_update,
                chunk: self.chunk.seal().into_frame(),
                trailer: self.trailer,
                done: self.done,
                epoch: self.epoch,
            },
        )
    }
}

/// Threads that seal chunks: one per core, at most four.
fn sealing_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

/// Who an upload goes to, and what opens its stream.
pub(super) struct Upload<'a> {
    /// The stream's first frames: a root for each receiver, the manifest.
    pub head: &'a [ReadyFrame],
    /// Every receiver, as the trailer is signed for.
    pub receivers: Vec<(AgentName, Fingerprint)>,
    /// Their transfers.
    pub tids: &'a [TransferId],
    /// How long each receiver said it may take to ask its user (0: it does
    /// not ask), in the order of `tids`.
    pub asks: Vec<u32>,
    /// Where the marks of what is read go (for a later resume).
    pub marks: Option<Arc<MarkLog>>,
    /// The check of a resumed prefix, which the trailer waits for.
    pub check: Option<SourceCheck>,
}

/// Writes the stream's first frames (`head`: the root and the manifest),
/// then reads, seals and writes the data from where `reader` stands to the
/// end, and the trailer signed for `receivers`.
///
/// One blocking thread reads the files and feeds the [`SendStream`] in order
/// (sequence numbers, rekeying, SHA-256); sealing threads seal the chunks
/// (AES-256-GCM) in parallel; this task writes them back in order. Every queue is
/// bounded, so a slow receiver slows the reader.
pub(super) async fn stream_out(
    ctx: &Ctx,
    conn: &mut DataConn,
    mut reader: Reader,
    mut stream: SendStream,
    upload: Upload<'_>,
    progress: &Progress,
) -> Result<(SendStream, [u8; 32], Ended), AgentError> {
    let Upload {
        head,
        receivers,
        tids,
        asks,
        marks,
        mut check,
    } = upload;
    // Receivers that gave up while the stream went out (an upload to
    // several goes on for the others).
    let mut ended = Ended::new();
    for f in head {
        if let Err(e) = conn.writer.write_frame(f.frame()).await {
            return Err(why_write_failed(ctx, conn, e).await);
        }
    }
    wait_for_go(ctx, conn, tids, &asks, &mut ended, progress).await?;
    let size = stream.declared();
    let identity: Arc<Identity> = Arc::clone(&ctx.identity);
    let workers = sealing_threads();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<(u64, Sealed), AgentError>>(2 * workers);
    // Frame buffers the writer is done with go back to the reader. The queues
    // bound how many chunks are in flight, and so how many buffers exist.
    let (free_tx, free_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let producer = tokio::task::spawn_blocking(move || -> Option<(SendStream, [u8; 32])> {
        let (job_tx, job_rx) = std::sync::mpsc::sync_channel::<Job>(2 * workers);
        // Each worker owns a handle on the queue: once they all stopped (the
        // writer went away), the queue closes and the reader stops too; and the
        // reader's end is moved into the scope, so every way out of it closes
        // the queue and lets the workers finish.
        let job_rx = Arc::new(std::sync::Mutex::new(job_rx));
        std::thread::scope(|scope| {
            let job_tx = job_tx;
            for _ in 0..workers {
                let (job_rx, tx) = (Arc::clone(&job_rx), tx.clone());
                scope.spawn(move || {
                    loop {
                        let job = match job_rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        let Ok(job) = job else { return };
                        if tx.blocking_send(Ok(job.seal())).is_err() {
                            return;
                        }
                    }
                });
            }
            drop(job_rx);
            let fail = |e: AgentError| {
                let _ = tx.blocking_send(Err(e));
                None
            };
            let mut sent = stream.total();
            let mut index = 0u64;
            let mut next_mark = sent + MARKS_EVERY;
            // Standard input goes on as it comes, a piece per read, so a
            // slow producer's bytes do not wait; its end is an empty last
            // chunk.
            let pipe = reader.is_pipe();
            loop {
                let (want, piece) = if pipe {
                    let piece = match Reader::stdin_piece(DEFAULT_CHUNK) {
                        Ok(p) => p,
                        Err(e) => return fail(e),
                    };
                    if sent + piece.len() as u64 > size {
                        return fail(too_long(size));
                    }
                    (piece.len(), Some(piece))
                } else {
                    let want = usize::try_from((size - sent).min(DEFAULT_CHUNK as u64))
                        .unwrap_or(DEFAULT_CHUNK);
                    (want, None)
                };
                // Reuse a buffer the writer is done with, if one came back.
                let buf = free_rx.try_recv().unwrap_or_default();
                let mut frame = match stream.chunk_frame(buf, want) {
                    Ok(f) => f,
                    Err(e) => return fail(e.into()),
                };
                match &piece {
                    Some(p) => frame.plaintext_mut().copy_from_slice(p),
                    None => {
                        if let Err(e) = reader.fill(&mut frame) {
                            return fail(e);
                        }
                    }
                }
                sent += want as u64;
                let last = if pipe { want == 0 } else { sent == size };
                let out = match stream.push_frame(frame, last, Instant::now()) {
                    Ok(o) => o,
                    Err(e) => return fail(e.into()),
                };
                if let Some(log) = &marks
                    && sent >= next_mark
                {
                    next_mark = sent + MARKS_EVERY;
                    let (state, digest) = stream.hash_mark();
                    log.append(sent, &state, &digest);
                }
                // The trailer vouches for the whole data: a resumed prefix
                // must have checked out first (a check that failed already
                // ends the upload at once).
                let settle = last || check.as_ref().is_some_and(SourceCheck::failed);
                if settle
                    && let Some(c) = check.take()
                    && let Err(e) = c.wait()
                {
                    return fail(e);
                }
                let (trailer, digest) = if last {
                    match stream.trailer(&identity, &receivers) {
                        Ok((t, d)) => (Some(t), Some(d)),
                        Err(e) => return fail(e.into()),
                    }
                } else {
                    (None, None)
                };
                let job = Job {
                    index,
                    key_update: out.key_update,
                    chunk: out.chunk,
                    trailer,
                    done: sent,
                    epoch: stream.epoch(),
                };
                index += 1;
                if job_tx.send(job).is_err() {
                    return None;
                }
                if let Some(d) = digest {
                    return Some((stream, d));
                }
            }
        })
    });

    // Sealed chunks arrive in any order; write them in sequence.
    let mut waiting = std::collections::BTreeMap::new();
    let mut next = 0u64;
    loop {
        tokio::select! {
            item = rx.recv() => match item {
                Some(Ok((index, sealed))) => {
                    waiting.insert(index, sealed);
                    let mut finished = false;
                    while let Some(sealed) = waiting.remove(&next) {
                        let frames = [
                            sealed.key_update.as_ref().map(ReadyFrame::frame),
                            Some(&sealed.chunk[..]),
                            sealed.trailer.as_ref().map(ReadyFrame::frame),
                        ];
                        for f in frames.into_iter().flatten() {
                            if let Err(e) = conn.writer.write_frame_unflushed(f).await {
                                return Err(why_write_failed(ctx, conn, e).await);
                            }
                        }
                        if sealed.trailer.is_some()
                            && let Err(e) = conn.writer.flush().await
                        {
                            return Err(why_write_failed(ctx, conn, e).await);
                        }
                        progress.update(sealed.done, sealed.epoch);
                        next += 1;
                        finished |= sealed.trailer.is_some();
                        // The reader may be gone (it read the last chunk); then
                        // the buffer is simply freed.
                        let _ = free_tx.send(sealed.chunk);
                    }
                    if finished {
                        // The receipt may follow at once: stop watching for aborts here.
                        break;
                    }
                }
                Some(Err(e)) => return Err(e),
                None => break,
            },
            msg = conn.reader.read() => {
                let e = match msg {
                    Ok(Some(Message::Abort { transfer_id, reason })) if tids.contains(&transfer_id) => {
                        ended.entry(transfer_id).or_insert(Err(AgentError::ReceiverAborted(reason)));
                        if ended.len() < tids.len() {
                            continue;
                        }
                        AgentError::ReceiverAborted(reason)
                    }
                    Ok(Some(Message::Error { code, detail })) => broker_error(code, detail),
                    Ok(Some(_)) => AgentError::Protocol("unexpected message during the transfer"),
                    Ok(None) => conn_error(ctx, ConnError::Truncated),
                    Err(e) => conn_error(ctx, e),
                };
                return Err(e);
            }
        }
    }
    let (stream, digest) = producer
        .await?
        .ok_or_else(|| AgentError::Internal("the sealing thread stopped".into()))?;
    Ok((stream, digest, ended))
}
