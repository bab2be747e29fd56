//! The receiver role: stay connected, check every offer (pins, limits, budgets,
//! signature, then RSA), receive each accepted transfer on its own data
//! connection into a temporary file, verify, place, and only then send the
//! receipt.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyferry_common::budget::{NEW_KEY_AGE_SECS, RsaBudget};
use keyferry_common::connection::ConnError;
use keyferry_common::filename;
use keyferry_common::frame;
use keyferry_common::handshake::{self, DEFAULT_TIME_WINDOW_SECS, Kind, Metadata, SignedOffer};
use keyferry_common::identity::PublicKey;
use keyferry_common::ids::TransferId;
use keyferry_common::message::{self, AbortReason, Message, RefuseReason, Role};
use keyferry_common::name::AgentName;
use keyferry_common::pins::{PinCheck, PinError};
use keyferry_common::replay::ReplayGuard;
use keyferry_common::text::escape;
use keyferry_common::transfer::{RecvError, RecvStream};
use tokio::sync::mpsc;

use crate::client::{AgentConn, Ctx, DataConn, await_ticket, conn_error, connect, open_data};
use crate::error::AgentError;
use crate::home::now_unix;
use crate::output::{Incoming, OutDir};
use crate::send::MAX_MESSAGE;

/// At most this many transfers at once.
pub const MAX_CONCURRENT: usize = 4;
/// At most this many transfers at once from one sender.
pub const MAX_PER_SENDER: usize = 1;
/// Free space that must remain after every accepted transfer.
pub const SPACE_MARGIN: u64 = 1 << 30;

/// The receiver's options.
#[derive(Debug, Clone)]
pub struct RecvOptions {
    /// Where files go.
    pub out_dir: PathBuf,
    /// Exit after one transfer.
    pub once: bool,
    /// Largest file accepted.
    pub max_size: u64,
    /// A transfer without new verified data for this long fails.
    pub progress_timeout: Duration,
}

#[derive(Debug, Default)]
struct Limits {
    per_sender: HashMap<AgentName, usize>,
    active: usize,
    in_flight: u64,
}

struct Shared {
    ctx: Ctx,
    opts: RecvOptions,
    out: Arc<OutDir>,
    limits: Mutex<Limits>,
    replay: Mutex<ReplayGuard>,
    budget: Mutex<RsaBudget>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why one incoming transfer did not complete.
#[derive(Debug)]
enum Failure {
    /// Refused before accepting.
    Refused(RefuseReason, String),
    /// Failed after accepting.
    Failed(AbortReason, String),
}

/// Runs the receiver until the broker connection ends (or after one transfer with `--once`).
pub async fn receive(ctx: Ctx, opts: RecvOptions) -> Result<(), AgentError> {
    let dir_err = |e: std::io::Error| {
        AgentError::Other(format!(
            "cannot use out dir {}: {e}",
            opts.out_dir.display()
        ))
    };
    let out = OutDir::open(&opts.out_dir).map_err(dir_err)?;
    let stale = out.clean_stale().map_err(dir_err)?;
    if stale > 0 {
        eprintln!(
            "removed {stale} unfinished temporary file(s) left in {}",
            opts.out_dir.display()
        );
    }
    let conn = connect(&ctx, Role::Receiver).await?;
    println!(
        "receiving as {} ({}) into {}",
        ctx.name,
        ctx.identity.fingerprint(),
        opts.out_dir.display()
    );
    let shared = Arc::new(Shared {
        ctx,
        opts,
        out,
        limits: Mutex::new(Limits::default()),
        replay: Mutex::new(ReplayGuard::new(DEFAULT_TIME_WINDOW_SECS)),
        budget: Mutex::new(RsaBudget::new()),
    });
    control_loop(shared, conn).await
}

async fn control_loop(shared: Arc<Shared>, mut conn: AgentConn) -> Result<(), AgentError> {
    // Refusals go back on the control connection; results come back for --once.
    let (refuse_tx, mut refuse_rx) = mpsc::channel::<Message>(16);
    let (done_tx, mut done_rx) = mpsc::channel::<bool>(16);
    loop {
        tokio::select! {
            // Biased, refusals first: a transfer task queues its Refuse before it
            // reports being done, so a --once receiver never exits with the
            // Refuse still queued (the sender would see "offline" instead).
            biased;
            Some(msg) = refuse_rx.recv() => {
                conn.writer.write(&msg).await.map_err(|e| conn_error(&shared.ctx, e))?;
            }
            Some(ok) = done_rx.recv() => {
                if shared.opts.once {
                    return if ok {
                        Ok(())
                    } else {
                        Err(AgentError::Verification("the transfer did not complete (see above)".into()))
                    };
                }
            }
            msg = conn.reader.read() => match msg {
                Ok(Some(Message::Offered { from, spki, offer })) => {
                    let (shared, refuse_tx, done_tx) = (Arc::clone(&shared), refuse_tx.clone(), done_tx.clone());
                    tokio::spawn(async move {
                        let ok = incoming(&shared, from, spki, offer, &refuse_tx).await;
                        let _ = done_tx.send(ok).await;
                    });
                }
                Ok(Some(Message::Error { detail, .. })) => {
                    return Err(AgentError::Other(format!("the broker ended the session: {detail}")));
                }
                Ok(Some(_)) => return Err(AgentError::Other("unexpected message from the broker".into())),
                Ok(None) => return Err(conn_error(&shared.ctx, ConnError::Truncated)),
                Err(e) => return Err(conn_error(&shared.ctx, e)),
            }
        }
    }
}

/// Handles one offer end to end; prints one line; returns whether it succeeded.
async fn incoming(
    shared: &Shared,
    from: AgentName,
    spki: Vec<u8>,
    offer: SignedOffer,
    refuse: &mpsc::Sender<Message>,
) -> bool {
    let tid = match offer.parse() {
        Ok(f) => f.transfer_id,
        Err(e) => {
            // Refused if its transfer id can be read (bytes 2..18 of the
            // body), so the sender hears at once; otherwise only logged.
            let Some(tid) = offer.body.get(2..18).and_then(|b| b.try_into().ok()) else {
                eprintln!("ignored an unreadable offer from {from}: {e}");
                return false;
            };
            let tid = TransferId(tid);
            eprintln!("refused transfer {tid} from {from}: unreadable offer: {e}");
            let _ = refuse
                .send(Message::Refuse {
                    transfer_id: tid,
                    reason: RefuseReason::VerificationFailed,
                })
                .await;
            return false;
        }
    };
    match accept_and_receive(shared, &from, &spki, &offer, tid).await {
        Ok(line) => {
            println!("{line}");
            true
        }
        Err(Failure::Refused(reason, why)) => {
            eprintln!("refused transfer {tid} from {from}: {why}");
            let _ = refuse
                .send(Message::Refuse {
                    transfer_id: tid,
                    reason,
                })
                .await;
            false
        }
        Err(Failure::Failed(_, why)) => {
            eprintln!("transfer {tid} from {from} failed: {why}; nothing was saved");
            false
        }
    }
}

/// Releases a transfer's slot when dropped.
struct Slot<'a> {
    shared: &'a Shared,
    sender: AgentName,
    size: u64,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut l = lock(&self.shared.limits);
        l.active -= 1;
        l.in_flight -= self.size;
        if let Some(n) = l.per_sender.get_mut(&self.sender) {
            *n -= 1;
            if *n == 0 {
                l.per_sender.remove(&self.sender);
            }
        }
    }
}

async fn accept_and_receive(
    shared: &Shared,
    from: &AgentName,
    spki: &[u8],
    offer: &SignedOffer,
    tid: TransferId,
) -> Result<String, Failure> {
    let refuse = |r, why: String| Failure::Refused(r, why);
    let ctx = &shared.ctx;
    let fields = offer
        .parse()
        .map_err(|e| refuse(RefuseReason::VerificationFailed, e.to_string()))?;
    if &fields.sender != from {
        return Err(refuse(
            RefuseReason::VerificationFailed,
            "the offer names another sender than the broker reports".into(),
        ));
    }
    let key = PublicKey::from_spki_der(spki)
        .map_err(|e| refuse(RefuseReason::Policy, format!("sender key refused: {e}")))?;
    // A key the signed offer itself contradicts is refused before it can be
    // pinned: otherwise a broker could plant it and lock the real sender out.
    if key.fingerprint() != fields.sender_fp {
        let pins = ctx.home.known_peers();
        return Err(match pins.get(from.as_str()) {
            Ok(Some(pin)) if pin.fingerprint != key.fingerprint() => refuse(
                RefuseReason::KeyMismatch,
                PinError::Mismatch {
                    key: from.to_string(),
                    pinned: pin.fingerprint,
                    presented: key.fingerprint(),
                    file: pins.path().to_owned(),
                }
                .to_string(),
            ),
            _ => refuse(
                RefuseReason::VerificationFailed,
                format!(
                    "the broker gave key {} for {from}, but the signed offer names {}; \
                     nothing was pinned",
                    key.fingerprint(),
                    fields.sender_fp
                ),
            ),
        });
    }
    // A pin that exists must match; a first-contact key is pinned only once
    // the offer's signature and metadata verified (below), so a refused offer
    // pins nothing.
    let pins = ctx.home.known_peers();
    let pinned_at = match pins.get(from.as_str()) {
        Ok(Some(pin)) if pin.fingerprint == key.fingerprint() => Some(pin.pinned_at),
        Ok(Some(pin)) => {
            return Err(refuse(
                RefuseReason::KeyMismatch,
                PinError::Mismatch {
                    key: from.to_string(),
                    pinned: pin.fingerprint,
                    presented: key.fingerprint(),
                    file: pins.path().to_owned(),
                }
                .to_string(),
            ));
        }
        Ok(None) => None,
        Err(e) => return Err(refuse(RefuseReason::Policy, e.to_string())),
    };

    // Capacity, before any RSA operation.
    {
        let mut l = lock(&shared.limits);
        if l.active >= MAX_CONCURRENT
            || l.per_sender.get(from).copied().unwrap_or(0) >= MAX_PER_SENDER
        {
            return Err(refuse(
                RefuseReason::Busy,
                "too many transfers in progress".into(),
            ));
        }
        l.active += 1;
        *l.per_sender.entry(from.clone()).or_default() += 1;
    }
    let mut slot = Slot {
        shared,
        sender: from.clone(),
        size: 0,
    };

    let verified = handshake::verify_offer(
        offer,
        &key,
        &ctx.name,
        ctx.identity.fingerprint(),
        now_unix(),
        DEFAULT_TIME_WINDOW_SECS,
    )
    .map_err(|e| refuse(RefuseReason::VerificationFailed, e.to_string()))?;
    lock(&shared.replay)
        .check_and_insert(tid, verified.fields().time, now_unix())
        .map_err(|e| refuse(RefuseReason::VerificationFailed, e.to_string()))?;
    // A first contact is as new as a key can be.
    let age = pinned_at.map_or(0, |at| now_unix().saturating_sub(at));
    if !lock(&shared.budget).try_take(key.fingerprint(), age, Instant::now()) {
        let which = if age < NEW_KEY_AGE_SECS {
            "recently pinned key"
        } else {
            "key"
        };
        return Err(refuse(
            RefuseReason::Policy,
            format!("RSA decryption budget for this {which} exhausted; try later"),
        ));
    }
    let identity = Arc::clone(&ctx.identity);
    let opened = tokio::task::spawn_blocking(move || verified.open(&identity))
        .await
        .map_err(|e| refuse(RefuseReason::VerificationFailed, e.to_string()))?
        .map_err(|e| refuse(RefuseReason::VerificationFailed, e.to_string()))?;
    let metadata = opened.metadata().clone();
    let stored_name = check_metadata(shared, &metadata, &mut slot)?;
    if pinned_at.is_none() {
        // Signature and metadata verified: only now is the key worth a pin.
        match pins.check_or_pin(from.as_str(), key.fingerprint(), now_unix()) {
            Ok(PinCheck::NewlyPinned(_)) => eprintln!(
                "NEW KEY for {from} {} — first contact, verify out of band",
                key.fingerprint()
            ),
            Ok(PinCheck::Known(_)) => {}
            Err(e @ PinError::Mismatch { .. }) => {
                return Err(refuse(RefuseReason::KeyMismatch, e.to_string()));
            }
            Err(e) => return Err(refuse(RefuseReason::Policy, e.to_string())),
        }
    }

    let (accept, keys) = opened
        .accept()
        .map_err(|e| refuse(RefuseReason::VerificationFailed, e.to_string()))?;
    let gone = |e: AgentError| Failure::Failed(AbortReason::PeerGone, e.to_string());
    let mut control = connect(ctx, Role::Data).await.map_err(gone)?;
    control
        .writer
        .write(&Message::Accept {
            transfer_id: tid,
            accept,
        })
        .await
        .map_err(|e| gone(conn_error(ctx, e)))?;
    // The stream comes over a plain connection: it is sealed end to end.
    let ticket = await_ticket(ctx, &mut control, tid).await.map_err(gone)?;
    drop(control);
    let mut data = open_data(ctx, tid, ticket).await.map_err(gone)?;

    let stream = RecvStream::new(keys, metadata.size);
    let result = receive_stream(
        shared,
        &mut data,
        tid,
        stream,
        &metadata,
        stored_name.as_deref(),
    )
    .await;
    match result {
        Ok((line, receipt)) => {
            // The receipt goes out only once the file is in place and durable.
            let _ = data
                .writer
                .write(&Message::Receipt {
                    transfer_id: tid,
                    tag: receipt,
                })
                .await;
            let _ = data.writer.shutdown().await;
            Ok(format!("{line} from {from}"))
        }
        Err(Failure::Failed(reason, why)) => {
            let _ = data
                .writer
                .write(&Message::Abort {
                    transfer_id: tid,
                    reason,
                })
                .await;
            Err(Failure::Failed(reason, why))
        }
        Err(other) => Err(other),
    }
}

/// Checks size and name; reserves the declared size. Returns the name to store a file under.
fn check_metadata(
    shared: &Shared,
    m: &Metadata,
    slot: &mut Slot<'_>,
) -> Result<Option<String>, Failure> {
    let refuse = |r, why: String| Failure::Refused(r, why);
    let name = match m.kind {
        Kind::Message => {
            if m.size > MAX_MESSAGE as u64 {
                return Err(refuse(
                    RefuseReason::TooLarge,
                    format!("a message of {} bytes", m.size),
                ));
            }
            None
        }
        Kind::File => Some(
            filename::check(&m.name).map_err(|e| refuse(RefuseReason::Policy, e.to_string()))?,
        ),
    };
    if m.size > shared.opts.max_size {
        return Err(refuse(
            RefuseReason::TooLarge,
            format!(
                "{} bytes is more than --max-size {}",
                m.size, shared.opts.max_size
            ),
        ));
    }
    let mut l = lock(&shared.limits);
    if m.kind == Kind::File {
        let free = shared.out.free_space().unwrap_or(0);
        let needed = m
            .size
            .saturating_add(l.in_flight)
            .saturating_add(SPACE_MARGIN);
        if needed > free {
            return Err(refuse(
                RefuseReason::TooLarge,
                format!(
                    "{} bytes does not fit: {free} bytes free, keeping 1 GiB spare",
                    m.size
                ),
            ));
        }
    }
    l.in_flight += m.size;
    slot.size = m.size;
    Ok(name)
}

fn verification(e: RecvError) -> Failure {
    Failure::Failed(AbortReason::VerificationFailed, e.to_string())
}

/// What the reading task hands the opening thread: a chunk still sealed, in
/// the frame payload it arrived in (record from `at` on), or another message.
enum Piece {
    Chunk {
        payload: Vec<u8>,
        transfer_id: TransferId,
        at: usize,
    },
    Other(Message),
}

/// The opening thread's ends of the channels: pieces in, empty buffers back,
/// and the count of verified plaintext bytes out (the stream's progress).
struct Pipe {
    pieces: mpsc::Receiver<Piece>,
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

/// Receives the stream into a temporary file (or memory, for a message),
/// verifies it, and places it. Returns the line to print and the receipt.
///
/// This task only reads frames; a blocking thread opens the records (tag check,
/// decryption, hashing) and writes the file, so network, crypto and disk work
/// overlap. The channel between them is bounded: a slow disk slows the reads.
/// Chunk payloads are read into buffers the thread hands back once it wrote
/// them, and opened where they lie.
///
/// The transfer fails after `--progress-timeout` (60 s) without new verified
/// plaintext (frames that carry none, such as key updates, do not count), and
/// at once when the opening thread refused a record, whatever the peer does
/// next. The failure reported is the first real cause: a refused record, a
/// storage error, a timeout, a bad frame, or the connection's end.
async fn receive_stream(
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
    let (tx, rx) = mpsc::channel::<Piece>(8);
    // Buffers the opening thread is done with. The channel above bounds how
    // many pieces are in flight, and so how many buffers exist.
    let (free_tx, free_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let progress = Arc::new(AtomicU64::new(0));
    let (name, display_name) = (stored_name.map(str::to_owned), escape(&metadata.name));
    let pipe = Pipe {
        pieces: rx,
        free: free_tx,
        progress: Arc::clone(&progress),
    };
    let mut worker = tokio::task::spawn_blocking(move || {
        open_and_store(tid, stream, file, pipe, &out_dir, name, display_name)
    });
    let timeout = shared.opts.progress_timeout;
    let (mut verified, mut deadline) = (0, tokio::time::Instant::now() + timeout);
    let mut finished = None;
    let mut spare = Vec::new();
    let read_result = loop {
        let mut payload = match spare.capacity() {
            0 => free_rx.try_recv().unwrap_or_default(),
            _ => std::mem::take(&mut spare),
        };
        let read = tokio::select! {
            // The opening thread stopped (it refused a record): stop now,
            // not at the next frame the peer may never send.
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
        let piece = if let Some((transfer_id, at)) = message::chunk_record(&payload) {
            Piece::Chunk {
                payload,
                transfer_id,
                at,
            }
        } else {
            let msg = match frame::decode_payload(&payload) {
                Ok(m) => m,
                Err(e) => break Err(read_failure(e.into())),
            };
            spare = payload;
            match msg {
                Message::Abort { reason, .. } => {
                    break Err(Failure::Failed(
                        reason,
                        format!("the sender aborted ({reason:?})"),
                    ));
                }
                // A chunk in a form the fast path does not take (postcard
                // allows non-shortest varints): the same chunk.
                Message::Chunk {
                    transfer_id,
                    record,
                } => Piece::Chunk {
                    payload: record,
                    transfer_id,
                    at: 0,
                },
                msg => Piece::Other(msg),
            }
        };
        let is_trailer = matches!(piece, Piece::Other(Message::Trailer { .. }));
        if tx.send(piece).await.is_err() || is_trailer {
            // The worker stopped (it will say why), or the stream is complete.
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
        (Ok(done), Ok(())) => Ok(done),
        (Err(Stopped::Failed(e)), _) | (Ok(_), Err(e)) | (Err(Stopped::InputEnded), Err(e)) => {
            Err(e)
        }
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

/// The blocking half of [`receive_stream`]: opens records in order and stores
/// the plaintext; places the file once the trailer verified.
fn open_and_store(
    tid: TransferId,
    mut stream: RecvStream,
    mut file: Option<Incoming>,
    mut pipe: Pipe,
    out_dir: &Path,
    stored_name: Option<String>,
    display_name: String,
) -> Result<(String, [u8; 32]), Stopped> {
    let failed = |e: Failure| Stopped::Failed(e);
    let refused = |e: RecvError| Stopped::Failed(verification(e));
    let mut text = Vec::new();
    let verified = loop {
        let Some(piece) = pipe.pieces.blocking_recv() else {
            return Err(Stopped::InputEnded);
        };
        match piece {
            Piece::Chunk {
                mut payload,
                transfer_id,
                at,
            } if transfer_id == tid => {
                let (plain, _) = stream
                    .open_chunk_in_place(&mut payload[at..])
                    .map_err(refused)?;
                match &mut file {
                    Some(f) => f.write(plain).map_err(|e| failed(storage(out_dir, e)))?,
                    None => text.extend_from_slice(plain),
                }
                pipe.progress.store(stream.total(), Ordering::Relaxed);
                // The reader may have stopped; then the buffer is freed.
                let _ = pipe.free.send(payload);
            }
            Piece::Other(Message::KeyUpdate {
                transfer_id,
                record,
            }) if transfer_id == tid => {
                stream.open_key_update(&record).map_err(refused)?;
            }
            Piece::Other(Message::Trailer {
                transfer_id,
                record,
            }) if transfer_id == tid => {
                break stream.open_trailer(&record).map_err(refused)?;
            }
            _ => {
                return Err(failed(Failure::Failed(
                    AbortReason::VerificationFailed,
                    "unexpected message in the stream".into(),
                )));
            }
        }
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
