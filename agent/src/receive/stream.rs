//! One accepted transfer's stream: frames read from the data connection by
//! this task, opened by a blocking thread through the stream's one door
//! ([`RecvStream::open`]) and written to the out dir ([`super::output`]);
//! the file placed once the trailer verified. Network, crypto and disk work
//! overlap; every queue between them is bounded.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use keyferry_common::handshake::Metadata;
use keyferry_common::ids::TransferId;
use keyferry_common::io::connection::ConnError;
use keyferry_common::text::escape;
use keyferry_common::transfer::{Opened, RecvError, RecvStream};
use keyferry_common::wire::message::AbortReason;
use tokio::sync::mpsc;

use super::output::Incoming;
use super::{Failure, Shared};
use crate::client::DataConn;

fn verification(e: RecvError) -> Failure {
    let reason = match e {
        RecvError::Aborted(reason) => reason,
        _ => AbortReason::VerificationFailed,
    };
    Failure::Failed(reason, e.to_string())
}

/// The opening thread's ends of the channels: frame payloads in, empty
/// buffers back, and the count of verified plaintext bytes out (the stream's
/// progress).
struct Pipe {
    payloads: mpsc::Receiver<Vec<u8>>,
    free: std::sync::mpsc::Sender<Vec<u8>>,
    progress: Arc<AtomicU64>,
}

/// Why the opening thread stopped without a verified stream.
enum Stopped {
    /// It refused something, or could not store it: the real cause.
    Failed(Failure),
    /// Its input ended: the reading task knows why.
    InputEnded,
}

/// Receives the stream into a file being received (or memory, for a
/// message), verifies it, and places it. Returns the line to print and the
/// receipt.
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
    tid: TransferId,
    stream: RecvStream,
    metadata: &Metadata,
    stored_name: Option<&str>,
) -> Result<(String, [u8; 32]), Failure> {
    let out_dir = shared.opts.out_dir.clone();
    let file = match stored_name {
        Some(_) => Some(shared.out.create(&tid).map_err(|e| storage(&out_dir, e))?),
        None => None,
    };
    let (tx, rx) = mpsc::channel::<Vec<u8>>(8);
    // Buffers the opening thread is done with. The channel above bounds how
    // many payloads are in flight, and so how many buffers exist.
    let (free_tx, free_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let progress = Arc::new(AtomicU64::new(0));
    let (name, display_name) = (stored_name.map(str::to_owned), escape(&metadata.name));
    let pipe = Pipe {
        payloads: rx,
        free: free_tx,
        progress: Arc::clone(&progress),
    };
    let mut worker = tokio::task::spawn_blocking(move || {
        open_and_store(stream, file, pipe, &out_dir, name, display_name)
    });
    let timeout = shared.opts.progress_timeout;
    let (mut verified, mut deadline) = (0, tokio::time::Instant::now() + timeout);
    let mut finished = None;
    let read_result = loop {
        let mut payload = free_rx.try_recv().unwrap_or_default();
        let read = tokio::select! {
            // The opening thread stopped (a verified trailer, or a refused
            // record): stop now, not at the next frame the peer may never send.
            done = &mut worker => {
                finished = Some(done);
                break Ok(());
            }
            read = tokio::time::timeout_at(deadline, conn.reader.read_payload_into(&mut payload)) => read,
        };
        match read {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => break Err(verification(RecvError::Truncated)),
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
        }
        if tx.send(payload).await.is_err() {
            // The worker stopped; it says why.
            break Ok(());
        }
    };
    drop(tx);
    let worked = match finished {
        Some(done) => done,
        None => worker.await,
    }
    .map_err(|e| Failure::Failed(AbortReason::Storage, e.to_string()))?;
    // A refusal or storage failure the worker saw explains more than a read
    // error that followed from it; a worker whose input ended leaves the
    // explanation to the reading task.
    match (worked, read_result) {
        (Ok(done), _) => Ok(done),
        (Err(Stopped::Failed(e)), _) | (Err(Stopped::InputEnded), Err(e)) => Err(e),
        (Err(Stopped::InputEnded), Ok(())) => Err(verification(RecvError::Truncated)),
    }
}

/// What a failed read of the data connection means.
fn read_failure(e: ConnError) -> Failure {
    match e {
        ConnError::Frame(f) => Failure::Failed(
            AbortReason::VerificationFailed,
            format!("bad frame from the sender: {f}"),
        ),
        ConnError::Truncated => verification(RecvError::Truncated),
        ConnError::Timeout(d) => Failure::Failed(
            AbortReason::Timeout,
            format!("no progress for {} s", d.as_secs()),
        ),
        ConnError::Io(e) => Failure::Failed(AbortReason::PeerGone, format!("connection lost: {e}")),
    }
}

fn storage(dir: &Path, e: std::io::Error) -> Failure {
    Failure::Failed(
        AbortReason::Storage,
        format!("cannot write in {}: {e}", dir.display()),
    )
}

/// The blocking half of [`receive_stream`]: opens every frame through the
/// stream's door, in order, and stores the plaintext; places the file once
/// the trailer verified.
fn open_and_store(
    mut stream: RecvStream,
    mut file: Option<Incoming>,
    mut pipe: Pipe,
    out_dir: &Path,
    stored_name: Option<String>,
    display_name: String,
) -> Result<(String, [u8; 32]), Stopped> {
    let failed = |e: Failure| Stopped::Failed(e);
    let mut text = Vec::new();
    let verified = loop {
        let Some(mut payload) = pipe.payloads.blocking_recv() else {
            return Err(Stopped::InputEnded);
        };
        match stream.open(&mut payload) {
            Ok(Opened::Chunk { plaintext, .. }) => {
                match &mut file {
                    Some(f) => f
                        .write(plaintext)
                        .map_err(|e| failed(storage(out_dir, e)))?,
                    None => text.extend_from_slice(plaintext),
                }
                pipe.progress.store(stream.total(), Ordering::Relaxed);
            }
            Ok(Opened::KeyUpdate(_)) => {}
            Ok(Opened::Trailer(verified)) => break verified,
            Err(e) => return Err(failed(verification(e))),
        }
        // The reader may have stopped; then the buffer is freed.
        let _ = pipe.free.send(payload);
    };
    let sha = hex::encode(verified.sha256);
    let line = match (file, stored_name) {
        (Some(f), Some(name)) => {
            let path = f.finish(&name).map_err(|e| failed(storage(out_dir, e)))?;
            format!(
                "received {display_name} ({} bytes, sha256 {sha}) -> {}",
                verified.total,
                path.display()
            )
        }
        _ => format!(
            "message ({} bytes): {}",
            verified.total,
            escape(&String::from_utf8_lossy(&text))
        ),
    };
    Ok((line, verified.receipt))
}
