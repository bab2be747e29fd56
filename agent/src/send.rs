//! The sender role: look up the peer, check its pin, offer, stream, and exit
//! successfully only after the receiver's receipt verified.
//!
//! Reading and sealing run on a blocking thread (the `SendStream` lives there);
//! sealed frames reach the socket through a small bounded channel, so a slow
//! receiver slows the reader instead of growing a buffer.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyferry_common::frame::{self, ChunkFrame, MAX_FRAME_LEN};
use keyferry_common::handshake::{Kind, Metadata, OfferParams, make_offer};
use keyferry_common::identity::{Fingerprint, PublicKey};
use keyferry_common::ids::TransferId;
use keyferry_common::message::{AbortReason, ErrorCode, Message, Role};
use keyferry_common::name::AgentName;
use keyferry_common::pins::{PinCheck, PinError};
use keyferry_common::record::DEFAULT_CHUNK;
use keyferry_common::transfer::{RekeyPolicy, SendStream};
use serde::Serialize;

use crate::client::{
    AgentConn, Ctx, DataConn, await_ticket, broker_error, conn_error, connect, open_data,
};
use crate::error::AgentError;
use crate::home::now_unix;
use crate::progress::Progress;

/// Longest text message.
pub const MAX_MESSAGE: usize = 64 << 10;
/// How long to wait for the receiver to accept or refuse.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(75);
/// How long to wait for the receipt after the trailer (the receiver fsyncs).
pub const RECEIPT_TIMEOUT: Duration = Duration::from_secs(120);

/// What to send.
#[derive(Debug, Clone)]
pub enum Payload {
    /// A file.
    File(PathBuf),
    /// A short text.
    Message(String),
}

/// The sender's options.
#[derive(Debug, Clone)]
pub struct SendOptions {
    /// Receiver's name.
    pub to: AgentName,
    /// What to send.
    pub payload: Payload,
    /// Session key lifetime.
    pub rekey_interval: Duration,
    /// A key the receiver must have (`--peer-fingerprint`).
    pub peer_fingerprint: Option<Fingerprint>,
    /// Draw a progress bar.
    pub progress: bool,
}

/// One finished transfer, as `--json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Transfer id (hex).
    pub transfer_id: String,
    /// Receiver's name.
    pub peer: String,
    /// File name sent (empty for a message).
    pub file: String,
    /// Bytes of plaintext.
    pub bytes: u64,
    /// SHA-256 of the plaintext (hex), confirmed by the receipt.
    pub sha256: String,
    /// Seconds from the accept to the verified receipt.
    pub seconds: f64,
    /// Session keys used (1 + key updates).
    pub session_keys: u64,
}

enum Source {
    File(File, PathBuf),
    Bytes(Vec<u8>, usize),
}

impl Source {
    /// Reads the frame's plaintext; running out early means the file shrank.
    fn fill(&mut self, frame: &mut ChunkFrame) -> std::io::Result<()> {
        match self {
            Self::File(f, _) => frame.fill_from(f),
            Self::Bytes(b, pos) => {
                let out = frame.plaintext_mut();
                let end = *pos + out.len();
                let src = b.get(*pos..end).ok_or(std::io::ErrorKind::UnexpectedEof)?;
                out.copy_from_slice(src);
                *pos = end;
                Ok(())
            }
        }
    }
}

fn open_payload(p: &Payload) -> Result<(Source, Metadata), AgentError> {
    match p {
        Payload::Message(text) => {
            if text.len() > MAX_MESSAGE {
                return Err(AgentError::Other(format!(
                    "message of {} bytes is longer than the {MAX_MESSAGE}-byte limit; send it as a file",
                    text.len()
                )));
            }
            Ok((
                Source::Bytes(text.as_bytes().to_vec(), 0),
                Metadata {
                    kind: Kind::Message,
                    name: String::new(),
                    size: text.len() as u64,
                },
            ))
        }
        Payload::File(path) => {
            let unreadable = |detail: String| AgentError::FileUnreadable {
                path: path.clone(),
                detail,
            };
            let file = File::open(path).map_err(|e| unreadable(e.to_string()))?;
            let meta = file.metadata().map_err(|e| unreadable(e.to_string()))?;
            if !meta.is_file() {
                return Err(unreadable("not a regular file".into()));
            }
            let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
                unreadable("the file name is not valid UTF-8; rename the file".into())
            })?;
            keyferry_common::filename::check(name)
                .map_err(|e| unreadable(format!("{e}; rename the file")))?;
            Ok((
                Source::File(file, path.clone()),
                Metadata {
                    kind: Kind::File,
                    name: name.to_owned(),
                    size: meta.len(),
                },
            ))
        }
    }
}

async fn peer_key(
    ctx: &Ctx,
    conn: &mut AgentConn,
    opts: &SendOptions,
) -> Result<PublicKey, AgentError> {
    let to = &opts.to;
    conn.writer
        .write(&Message::Lookup { name: to.clone() })
        .await
        .map_err(|e| conn_error(ctx, e))?;
    let reply = conn
        .reader
        .read_timeout(Duration::from_secs(30))
        .await
        .map_err(|e| conn_error(ctx, e))?;
    let spki = match reply {
        Some(Message::PeerKey { name, spki }) if &name == to => spki,
        Some(Message::Error {
            code: ErrorCode::UnknownPeer,
            ..
        }) => return Err(AgentError::UnknownPeer(to.to_string())),
        Some(Message::Error {
            code: ErrorCode::PeerOffline,
            ..
        }) => return Err(AgentError::PeerOffline(to.to_string())),
        Some(Message::Error { code, detail }) => return Err(broker_error(code, detail)),
        _ => {
            return Err(AgentError::Other(
                "the broker did not answer the lookup".into(),
            ));
        }
    };
    let key = PublicKey::from_spki_der(&spki).map_err(|e| {
        AgentError::Verification(format!("the key the broker gave for {to} is refused: {e}"))
    })?;
    let pins = ctx.home.known_peers();
    let check = match opts.peer_fingerprint {
        Some(fp) => pins.require(to.as_str(), fp, key.fingerprint(), now_unix()),
        None => pins.check_or_pin(to.as_str(), key.fingerprint(), now_unix()),
    };
    match check {
        Ok(PinCheck::NewlyPinned(_)) if opts.peer_fingerprint.is_none() => {
            eprintln!(
                "NEW KEY for {to} {} — first contact, verify out of band",
                key.fingerprint()
            );
        }
        Ok(_) => {}
        Err(e @ PinError::Mismatch { .. }) => {
            return Err(AgentError::PeerKeyMismatch(e.to_string()));
        }
        Err(e) => return Err(AgentError::Other(e.to_string())),
    }
    Ok(key)
}

/// Sends one file or message; returns the verified report.
pub async fn send(ctx: &Ctx, opts: SendOptions) -> Result<Report, AgentError> {
    let (source, metadata) = open_payload(&opts.payload)?;
    let mut conn = connect(ctx, Role::Sender).await?;
    let receiver_key = peer_key(ctx, &mut conn, &opts).await?;

    let identity = Arc::clone(&ctx.identity);
    let (sender, receiver) = (ctx.name.clone(), opts.to.clone());
    let meta = metadata.clone();
    let (pending, offer) = tokio::task::spawn_blocking(move || {
        make_offer(OfferParams {
            identity: &identity,
            sender,
            receiver,
            receiver_key: &receiver_key,
            metadata: meta,
            now_unix: now_unix(),
        })
    })
    .await
    .map_err(|e| AgentError::Other(e.to_string()))?
    .map_err(|e| AgentError::Other(format!("cannot build the offer: {e}")))?;
    let tid = pending.transfer_id();
    conn.writer
        .write(&Message::Offer {
            to: opts.to.clone(),
            offer,
        })
        .await
        .map_err(|e| conn_error(ctx, e))?;

    let answer = conn.reader.read_timeout(ANSWER_TIMEOUT).await;
    let accept = match answer {
        Ok(Some(Message::Accept {
            transfer_id,
            accept,
        })) if transfer_id == tid => accept,
        Ok(Some(Message::Refuse {
            transfer_id,
            reason,
        })) if transfer_id == tid => {
            return Err(AgentError::Refused {
                peer: opts.to.to_string(),
                reason,
            });
        }
        Ok(Some(Message::Error {
            code: ErrorCode::PeerOffline,
            ..
        })) => return Err(AgentError::PeerOffline(opts.to.to_string())),
        Ok(Some(Message::Error { code, detail })) => return Err(broker_error(code, detail)),
        Ok(Some(_)) => return Err(AgentError::Other("unexpected answer to the offer".into())),
        Ok(None) => {
            return Err(conn_error(
                ctx,
                keyferry_common::connection::ConnError::Truncated,
            ));
        }
        Err(e) => return Err(conn_error(ctx, e)),
    };
    let keys = pending.handle_accept(&accept).map_err(|e| {
        AgentError::Verification(format!("the receiver's accept did not verify ({e})"))
    })?;
    // The stream goes over a plain connection: it is sealed end to end.
    let ticket = await_ticket(ctx, &mut conn, tid).await?;
    drop(conn);
    let mut conn = open_data(ctx, tid, ticket).await?;

    let start = Instant::now();
    let stream = SendStream::new(
        keys,
        metadata.size,
        RekeyPolicy::with_interval(opts.rekey_interval),
        start,
    );
    let progress = Progress::new(metadata.size, opts.progress);
    let result = stream_out(
        ctx,
        &mut conn,
        tid,
        source,
        stream,
        metadata.size,
        &progress,
    )
    .await;
    progress.finish();
    let (stream, digest) = match result {
        Ok(done) => done,
        Err(e) => {
            let reason = match &e {
                AgentError::FileUnreadable { .. } => AbortReason::Source,
                AgentError::Interrupted => AbortReason::Interrupted,
                _ => AbortReason::VerificationFailed,
            };
            let _ = conn
                .writer
                .write(&Message::Abort {
                    transfer_id: tid,
                    reason,
                })
                .await;
            return Err(e);
        }
    };

    let receipt = conn.reader.read_timeout(RECEIPT_TIMEOUT).await;
    match receipt {
        Ok(Some(Message::Receipt { transfer_id, tag })) if transfer_id == tid => {
            stream.check_receipt(&tag).map_err(|_| {
                AgentError::Verification(
                    "the receipt does not confirm the length and SHA-256 we sent".into(),
                )
            })?;
        }
        Ok(Some(Message::Abort { reason, .. })) => {
            return Err(aborted_by_receiver(reason));
        }
        Ok(_) => {
            return Err(AgentError::Verification(
                "the receiver sent no receipt".into(),
            ));
        }
        Err(e) => return Err(conn_error(ctx, e)),
    }
    Ok(Report {
        transfer_id: tid.to_string(),
        peer: opts.to.to_string(),
        file: metadata.name,
        bytes: metadata.size,
        sha256: hex::encode(digest),
        seconds: start.elapsed().as_secs_f64(),
        session_keys: stream.session_keys(),
    })
}

fn aborted_by_receiver(reason: AbortReason) -> AgentError {
    match reason {
        AbortReason::Storage => AgentError::Other(
            "the receiver could not store the file (disk full or out dir not writable)".into(),
        ),
        AbortReason::PeerGone => {
            AgentError::Other("the receiver disconnected before the transfer completed".into())
        }
        AbortReason::Timeout => AgentError::Other("the receiver gave up waiting".into()),
        AbortReason::Interrupted => AgentError::Other("the receiver was interrupted".into()),
        AbortReason::VerificationFailed | AbortReason::Source => {
            AgentError::Verification("the receiver refused the data (it did not verify)".into())
        }
    }
}

/// A write failed: if the broker told us why (an `Abort` waiting to be read),
/// that is the better error; otherwise the connection was lost.
async fn why_write_failed(
    ctx: &Ctx,
    conn: &mut DataConn,
    e: keyferry_common::connection::ConnError,
) -> AgentError {
    match tokio::time::timeout(Duration::from_secs(2), conn.reader.read()).await {
        Ok(Ok(Some(Message::Abort { reason, .. }))) => aborted_by_receiver(reason),
        _ => conn_error(ctx, e),
    }
}

struct Sealed {
    key_update: Option<Vec<u8>>,
    /// The chunk's frame; its buffer goes back to the reader afterwards.
    chunk: Vec<u8>,
    trailer: Option<Vec<u8>>,
    done: u64,
    epoch: u32,
}

/// A chunk on its way to a sealing thread, with what must travel with it.
struct Job {
    index: u64,
    key_update: Option<Message>,
    chunk: keyferry_common::transfer::ChunkJob,
    trailer: Option<Message>,
    done: u64,
    epoch: u32,
}

impl Job {
    fn seal(self) -> Result<(u64, Sealed), AgentError> {
        let encode = |m: Option<Message>| {
            m.map(|m| frame::encode(&m, MAX_FRAME_LEN))
                .transpose()
                .map_err(|e| AgentError::Other(e.to_string()))
        };
        Ok((
            self.index,
            Sealed {
                key_update: encode(self.key_update)?,
                chunk: self.chunk.seal().into_frame(),
                trailer: encode(self.trailer)?,
                done: self.done,
                epoch: self.epoch,
            },
        ))
    }
}

/// Threads that seal chunks: one per core, at most four.
fn sealing_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

/// Reads, seals and writes the whole stream and the trailer.
///
/// One blocking thread reads the file and feeds the [`SendStream`] in order
/// (sequence numbers, rekeying, SHA-256); sealing threads encrypt and MAC the
/// chunks in parallel; this task writes them back in order. Every queue is
/// bounded, so a slow receiver slows the reader.
async fn stream_out(
    ctx: &Ctx,
    conn: &mut DataConn,
    tid: TransferId,
    mut source: Source,
    mut stream: SendStream,
    size: u64,
    progress: &Progress,
) -> Result<(SendStream, [u8; 32]), AgentError> {
    let workers = sealing_threads();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<(u64, Sealed), AgentError>>(2 * workers);
    // Frame buffers the writer is done with go back to the reader. The queues
    // bound how many chunks are in flight, and so how many buffers exist.
    let (free_tx, free_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let path = match &source {
        Source::File(_, p) => p.clone(),
        Source::Bytes(..) => PathBuf::from("(message)"),
    };
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
                        if tx.blocking_send(job.seal()).is_err() {
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
            let mut sent = 0u64;
            let mut index = 0u64;
            loop {
                let want = usize::try_from((size - sent).min(DEFAULT_CHUNK as u64))
                    .unwrap_or(DEFAULT_CHUNK);
                // Reuse a buffer the writer is done with, if one came back.
                let buf = free_rx.try_recv().unwrap_or_default();
                let mut frame = match stream.chunk_frame(buf, want) {
                    Ok(f) => f,
                    Err(e) => return fail(AgentError::Other(e.to_string())),
                };
                if let Err(e) = source.fill(&mut frame) {
                    let detail = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        "the file shrank while it was being sent".into()
                    } else {
                        e.to_string()
                    };
                    return fail(AgentError::FileUnreadable {
                        path: path.clone(),
                        detail,
                    });
                }
                sent += want as u64;
                let last = sent == size;
                let out = match stream.push_frame(frame, last, Instant::now()) {
                    Ok(o) => o,
                    Err(e) => return fail(AgentError::Other(e.to_string())),
                };
                let (trailer, digest) = if last {
                    match stream.trailer() {
                        Ok((t, d)) => (
                            Some(Message::Trailer {
                                transfer_id: tid,
                                record: t.encode(),
                            }),
                            Some(d),
                        ),
                        Err(e) => return fail(AgentError::Other(e.to_string())),
                    }
                } else {
                    (None, None)
                };
                let job = Job {
                    index,
                    key_update: out.key_update.map(|ku| Message::KeyUpdate {
                        transfer_id: tid,
                        record: ku.encode(),
                    }),
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
                            sealed.key_update.as_deref(),
                            Some(&sealed.chunk[..]),
                            sealed.trailer.as_deref(),
                        ];
                        for f in frames.into_iter().flatten() {
                            if let Err(e) = conn.writer.write_frame(f).await {
                                return Err(why_write_failed(ctx, conn, e).await);
                            }
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
                return Err(match msg {
                    Ok(Some(Message::Abort { reason, .. })) => aborted_by_receiver(reason),
                    Ok(Some(Message::Error { code, detail })) => broker_error(code, detail),
                    Ok(Some(_)) => AgentError::Other("unexpected message during the transfer".into()),
                    Ok(None) => conn_error(ctx, keyferry_common::connection::ConnError::Truncated),
                    Err(e) => conn_error(ctx, e),
                });
            }
        }
    }
    producer
        .await
        .map_err(|e| AgentError::Other(e.to_string()))?
        .ok_or_else(|| AgentError::Other("the sealing thread stopped".into()))
}
