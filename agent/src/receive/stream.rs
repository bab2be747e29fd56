//! One accepted transfer's stream: frames read from the data connection by
//! this task, and handed to a blocking thread that opens them through the
//! stream's one door and stores them ([`super::store`]). Network, crypto and
//! disk work overlap; every queue between them is bounded.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use keyferry_common::handshake::Kind;
use keyferry_common::ids::TransferId;
use keyferry_common::io::connection::{ConnError, FrameWriter};
use keyferry_common::io::lanes;
use keyferry_common::transfer::RecvError;
use keyferry_common::wire::message::{AbortReason, Message};
use tokio::io::WriteHalf;
use tokio::sync::mpsc;

use super::admit::Slot;
use super::consent::{Asked, MAX_ASK};
use super::job::{Job, Pipe, Received, Stopped};
use super::store::open_and_store;
use super::{Failure, Shared};
use crate::client::DataConn;
use crate::progress::Progress;
use crate::prompt::Answer;

/// Receives the stream into its staging tree (or memory, for a message),
/// verifies it, and places it ([`super::store`]). Returns the line to print
/// and the receipt.
///
/// This task only reads frames; a blocking thread opens them (tag check,
/// decryption, hashing) and writes the file, so network, crypto and disk work
/// overlap. The channel between them is bounded: a slow disk slows the reads.
/// Payloads are read into buffers the thread hands back once it wrote them,
/// and chunks are opened where they lie.
///
/// The transfer fails after `--progress-timeout` (60 s) without new verified
/// plaintext (frames that carry none, such as key updates, do not count), and
/// at once when the opening thread refused a record, whatever the peer does
/// next. The failure reported is the first real cause: a refused record, a
/// storage error, a timeout, a bad frame, or the connection's end.
pub(super) async fn receive_stream(
    shared: &Shared,
    conn: &mut DataConn,
    job: Job,
    slot: Slot<'_>,
    mut asks: Option<mpsc::Receiver<Asked>>,
    resumable: bool,
) -> Result<Received, Failure> {
    let tid = job.stream.transfer_id();
    let (tx, rx) = mpsc::channel::<Vec<u8>>(8);
    // Buffers the opening thread is done with. The channel above bounds how
    // many payloads are in flight, and so how many buffers exist.
    let (free_tx, free_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let progress = Arc::new(AtomicU64::new(0));
    let epoch = Arc::new(AtomicU32::new(0));
    // A bar for files (on a terminal, without --quiet); a text needs none.
    let bar = Progress::new(
        job.want.size_known.then_some(job.want.declared),
        job.want.kind == Kind::Files && shared.opts.chat.is_none(),
    );
    let pipe = Pipe {
        payloads: rx,
        free: free_tx,
        progress: Arc::clone(&progress),
        epoch: Arc::clone(&epoch),
    };
    let (declared, size_known) = (job.want.declared, job.want.size_known);
    let (receivers, resumed_from) = (job.want.receivers, job.want.resumed_from);
    let mut worker = tokio::task::spawn_blocking(move || open_and_store(job, pipe));
    let timeout = shared.opts.progress_timeout;
    // Before the first byte of an upload to several, another receiver's
    // user may be asked (PROTOCOL.md §6.5): the sender waits for them.
    let first = if receivers > 1 {
        timeout.max(MAX_ASK + Duration::from_secs(15))
    } else {
        timeout
    };
    let (mut verified, mut deadline) = (0, tokio::time::Instant::now() + first);
    let mut finished = None;
    let read_result = loop {
        let mut payload = free_rx.try_recv().unwrap_or_default();
        // One read per frame, kept across the questions put to the user
        // meanwhile (a read is not cancel-safe mid-frame).
        let read = {
            let reading = conn.reader.read_payload_into(&mut payload);
            tokio::pin!(reading);
            loop {
                tokio::select! {
                    // The opening thread stopped (a verified trailer, or a refused
                    // record): stop now, not at the next frame the peer may never send.
                    done = &mut worker => {
                        finished = Some(done);
                        break None;
                    }
                    read = &mut reading => break Some(Ok(read)),
                    () = tokio::time::sleep_until(deadline) => break Some(Err(())),
                    Some(asked) = next_question(&mut asks) => {
                        // The sender waits for our go-ahead: no progress is due
                        // while the user thinks.
                        answer(shared, &mut conn.writer, tid, asked).await;
                        deadline = tokio::time::Instant::now() + timeout;
                    }
                }
            }
        };
        let Some(read) = read else {
            break Ok(());
        };
        match read {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => break Err(ended()),
            Err(_) => {
                break Err(Failure::Failed(
                    AbortReason::Timeout,
                    format!(
                        "no progress for {} s (no new verified data)",
                        timeout.as_secs()
                    ),
                ));
            }
            Ok(Err(e)) => break Err(read_failure(e)),
        }
        // Progress is verified plaintext, nothing else.
        let now_verified = progress.load(Ordering::Relaxed);
        if now_verified > verified {
            verified = now_verified;
            deadline = tokio::time::Instant::now() + timeout;
            // All of a resumed transfer's data is in: its trailer may wait
            // for the sender's check of its prefix (PROTOCOL.md §6.4).
            if size_known && verified == declared {
                deadline += prefix_read_time(resumed_from);
            }
            bar.update(verified, epoch.load(Ordering::Relaxed));
        }
        // The worker takes the payload when it can; a question it puts
        // meanwhile is answered (it waits for that, not for the payload).
        let permit = loop {
            tokio::select! {
                permit = tx.reserve() => break permit.ok(),
                Some(asked) = next_question(&mut asks) => {
                    answer(shared, &mut conn.writer, tid, asked).await;
                    deadline = tokio::time::Instant::now() + timeout;
                }
            }
        };
        let Some(permit) = permit else {
            // The worker stopped; it says why.
            break Ok(());
        };
        permit.send(payload);
    };
    drop(tx);
    bar.finish();
    let worked = match finished {
        Some(done) => done,
        None => worker.await,
    }
    .map_err(|e| Failure::Failed(AbortReason::Storage, e.to_string()))?;
    // A refusal or storage failure the worker saw explains more than a read
    // error that followed from it; a worker whose input ended leaves the
    // explanation to the reading task.
    let (stopped, leftover) = match worked {
        Ok(done) => return Ok(done),
        Err(failed) => failed,
    };
    let failure = match (stopped, read_result) {
        (Stopped::Failed(e), _) | (Stopped::InputEnded, Err(e)) => e,
        (Stopped::InputEnded, Ok(())) => ended(),
    };
    let reason = match &failure {
        Failure::Failed(reason, _) => *reason,
        Failure::Refused(..) => AbortReason::VerificationFailed,
    };
    // The stream is over: its place among this receiver's transfers is
    // free at once, so that the sender's next attempt is not refused as
    // busy while this one winds down (that attempt waits for the staging
    // directory's lock instead, PROTOCOL.md §7.4).
    drop(slot);
    // Journalling the prefix syncs the disk: not on this task's thread.
    let _ = tokio::task::spawn_blocking(move || leftover.settle(reason, resumable)).await;
    Err(failure)
}

/// Puts the opening thread's question to the user, tells the sender to go
/// on if the answer is yes, and gives the answer back.
async fn answer(
    shared: &Shared,
    writer: &mut FrameWriter<WriteHalf<lanes::Pipe>>,
    tid: TransferId,
    asked: Asked,
) {
    let answer = shared.prompter.ask(asked.question, asked.within).await;
    if answer == Answer::Yes {
        let _ = writer.write(&Message::Proceed { transfer_id: tid }).await;
    }
    let _ = asked.answer.send(answer);
}

/// How long a sender may spend checking a resumed prefix of `bytes` after
/// its last chunk, before its trailer: as if read at 50 MB/s.
pub(crate) fn prefix_read_time(bytes: u64) -> Duration {
    Duration::from_secs(bytes / 50_000_000)
}

/// The next question the opening thread asks, if it may ask; never ready
/// once it may not any more.
async fn next_question(asks: &mut Option<mpsc::Receiver<Asked>>) -> Option<Asked> {
    if let Some(rx) = asks {
        match rx.recv().await {
            Some(asked) => return Some(asked),
            None => *asks = None,
        }
    }
    std::future::pending().await
}

/// The data connection ended before the stream did: the sender, the broker
/// or the network went away (what verified so far stays good for a resume).
fn ended() -> Failure {
    Failure::Failed(AbortReason::PeerGone, RecvError::Truncated.to_string())
}

/// What a failed read of the data connection means.
fn read_failure(e: ConnError) -> Failure {
    match e {
        ConnError::Frame(f) => Failure::Failed(
            AbortReason::VerificationFailed,
            format!("bad frame from the sender: {f}"),
        ),
        ConnError::Truncated => ended(),
        ConnError::Timeout(d) => Failure::Failed(
            AbortReason::Timeout,
            format!("no progress for {} s", d.as_secs()),
        ),
        ConnError::Io(e) => Failure::Failed(AbortReason::PeerGone, format!("connection lost: {e}")),
    }
}
