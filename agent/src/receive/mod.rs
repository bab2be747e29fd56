//! The receiver role: stay connected (reconnecting when the broker goes
//! away), check every offer ([`admit`]), answer it on the control
//! connection, receive each accepted transfer on its own data connection
//! ([`stream`], [`store`]) into a private staging directory ([`outdir`],
//! [`staging`], [`tree`]) that a journal makes resumable ([`journal`],
//! [`checkpoint`], [`resume`]), place it whole, and only then send the
//! receipt.

mod admit;
mod checkpoint;
pub mod filename;
mod journal;
pub mod outdir;
mod resume;
mod staging;
mod store;
mod stream;
mod tree;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyferry_common::crypto::keys::MacKey;
use keyferry_common::handshake::{DEFAULT_TIME_WINDOW_SECS, SignedOffer};
use keyferry_common::ids::TransferId;
use keyferry_common::io::connection::ConnError;
use keyferry_common::name::AgentName;
use keyferry_common::sync::lock;
use keyferry_common::transfer::{Expect, RecvStream};
use keyferry_common::wire::message::{AbortReason, Message, RefuseReason, Role};
use tokio::sync::{mpsc, oneshot};

use crate::client::{AgentConn, CONNECT_TIMEOUT, Ctx, Ticket, conn_error, connect, open_data};
use crate::error::AgentError;
use crate::home::now_unix;
use crate::trust::budget::RsaBudget;
use crate::trust::replay::ReplayGuard;
use outdir::OutDir;
use store::{Job, Want};

/// At most this many transfers at once.
pub const MAX_CONCURRENT: usize = 4;
/// At most this many transfers at once from one sender.
pub const MAX_PER_SENDER: usize = 1;
/// Free space that must remain after every accepted transfer.
pub const SPACE_MARGIN: u64 = 1 << 30;
/// Longest wait between two attempts to reach a broker that went away.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The receiver's options.
#[derive(Debug, Clone)]
pub struct RecvOptions {
    /// Where files go.
    pub out_dir: PathBuf,
    /// Exit after one transfer.
    pub once: bool,
    /// Largest transfer accepted.
    pub max_size: u64,
    /// A transfer without new verified data for this long fails.
    pub progress_timeout: Duration,
}

/// Transfers in progress: the receiver's capacity.
#[derive(Debug, Default)]
struct Limits {
    per_sender: HashMap<AgentName, usize>,
    active: usize,
    in_flight: u64,
}

/// Where an accepted transfer's ticket (or the broker's `Abort`) goes.
type TicketWaiter = oneshot::Sender<Result<Ticket, AbortReason>>;

/// What every incoming transfer of this receiver shares.
struct Shared {
    ctx: Ctx,
    opts: RecvOptions,
    out: Arc<OutDir>,
    journal_key: Arc<MacKey>,
    limits: Mutex<Limits>,
    replay: Mutex<ReplayGuard>,
    budget: Mutex<RsaBudget>,
    /// Accepted transfers waiting for their ticket on the control connection.
    tickets: Mutex<HashMap<TransferId, TicketWaiter>>,
}

/// Why one incoming transfer did not complete.
#[derive(Debug)]
enum Failure {
    /// Refused before accepting.
    Refused(RefuseReason, String),
    /// Failed after accepting.
    Failed(AbortReason, String),
}

/// Runs the receiver until it fails (or after one transfer with `--once`).
pub async fn receive(ctx: Ctx, opts: RecvOptions) -> Result<(), AgentError> {
    let dir_err = |source| AgentError::OutDir {
        path: opts.out_dir.clone(),
        source,
    };
    let out = OutDir::open(&opts.out_dir).map_err(dir_err)?;
    let journal_key = Arc::new(ctx.home.journal_key()?);
    let cleaned = out.clean_stale(&journal_key, now_unix()).map_err(dir_err)?;
    if cleaned.removed > 0 {
        eprintln!(
            "removed {} unfinished transfer(s) left in {}",
            cleaned.removed,
            opts.out_dir.display()
        );
    }
    if cleaned.kept > 0 {
        eprintln!(
            "kept {} interrupted transfer(s) in {} to resume when their senders retry",
            cleaned.kept,
            opts.out_dir.display()
        );
    }
    let mut conn = connect(&ctx, Role::Receiver).await?;
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
        journal_key,
        limits: Mutex::new(Limits::default()),
        replay: Mutex::new(ReplayGuard::new(DEFAULT_TIME_WINDOW_SECS)),
        budget: Mutex::new(RsaBudget::new()),
        tickets: Mutex::new(HashMap::new()),
    });
    // Answers go out on whichever control connection is current; results
    // come back for --once.
    let (out_tx, mut out_rx) = mpsc::channel::<Message>(64);
    let (done_tx, mut done_rx) = mpsc::channel::<bool>(16);
    loop {
        let lost = control_loop(&shared, conn, &out_tx, &mut out_rx, &done_tx, &mut done_rx).await;
        let why = match lost {
            Ok(done) => return done,
            Err(why) => why,
        };
        // Accepted transfers still waiting for a ticket will not get one.
        lock(&shared.tickets).clear();
        eprintln!("lost the broker ({why}); reconnecting");
        // A --once receiver whose transfer ends meanwhile is done.
        conn = tokio::select! {
            c = reconnect(&shared.ctx) => c,
            Some(ok) = done_rx.recv(), if shared.opts.once => return once(ok),
        };
        eprintln!("reconnected to the broker");
    }
}

/// How a --once receiver ends, after its one transfer.
fn once(ok: bool) -> Result<(), AgentError> {
    if ok {
        Ok(())
    } else {
        Err(AgentError::Verification(
            "the transfer did not complete (see above)".into(),
        ))
    }
}

/// Connects again, waiting longer after each failure (up to [`MAX_BACKOFF`]).
async fn reconnect(ctx: &Ctx) -> AgentConn {
    let mut wait = Duration::from_secs(1);
    loop {
        tokio::time::sleep(wait).await;
        match connect(ctx, Role::Receiver).await {
            Ok(conn) => return conn,
            Err(_) => wait = (wait * 2).min(MAX_BACKOFF),
        }
    }
}

/// Serves one control connection. `Ok` ends the receiver (with its result);
/// `Err` says why the connection was lost, to reconnect.
async fn control_loop(
    shared: &Arc<Shared>,
    mut conn: AgentConn,
    out_tx: &mpsc::Sender<Message>,
    out_rx: &mut mpsc::Receiver<Message>,
    done_tx: &mpsc::Sender<bool>,
    done_rx: &mut mpsc::Receiver<bool>,
) -> Result<Result<(), AgentError>, AgentError> {
    let lost = |e| Err(conn_error(&shared.ctx, e));
    loop {
        tokio::select! {
            // Biased, answers first: a transfer task queues its Refuse before it
            // reports being done, so a --once receiver never exits with the
            // Refuse still queued (the sender would see "offline" instead).
            biased;
            Some(msg) = out_rx.recv() => {
                if let Err(e) = conn.writer.write(&msg).await {
                    return lost(e);
                }
            }
            Some(ok) = done_rx.recv() => {
                if shared.opts.once {
                    return Ok(once(ok));
                }
            }
            msg = conn.reader.read() => match msg {
                Ok(Some(Message::Offered { from, spki, offer })) => {
                    let (shared, out_tx, done_tx) = (Arc::clone(shared), out_tx.clone(), done_tx.clone());
                    tokio::spawn(async move {
                        let ok = incoming(&shared, from, spki, offer, &out_tx).await;
                        let _ = done_tx.send(ok).await;
                    });
                }
                Ok(Some(Message::Ticket { transfer_id, ticket, address })) => {
                    if let Some(waiter) = lock(&shared.tickets).remove(&transfer_id) {
                        let _ = waiter.send(Ok(Ticket { ticket, address }));
                    }
                }
                Ok(Some(Message::Abort { transfer_id, reason })) => {
                    if let Some(waiter) = lock(&shared.tickets).remove(&transfer_id) {
                        let _ = waiter.send(Err(reason));
                    }
                }
                Ok(Some(Message::Pong { .. })) => {}
                Ok(Some(Message::Error { detail, .. })) => {
                    return Ok(Err(AgentError::SessionEnded(detail)));
                }
                Ok(Some(_)) => {
                    return Ok(Err(AgentError::Protocol("unexpected message from the broker")));
                }
                Ok(None) => return lost(ConnError::Truncated),
                Err(e) => return lost(e),
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
    out: &mpsc::Sender<Message>,
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
            let _ = out
                .send(Message::Refuse {
                    transfer_id: tid,
                    reason: RefuseReason::VerificationFailed,
                })
                .await;
            return false;
        }
    };
    match accept_and_receive(shared, &from, &spki, &offer, tid, out).await {
        Ok(line) => {
            println!("{line}");
            true
        }
        Err(Failure::Refused(reason, why)) => {
            eprintln!("refused transfer {tid} from {from}: {why}");
            let _ = out
                .send(Message::Refuse {
                    transfer_id: tid,
                    reason,
                })
                .await;
            false
        }
        Err(Failure::Failed(_, why)) => {
            eprintln!("transfer {tid} from {from} failed: {why}; nothing was placed");
            false
        }
    }
}

/// Removes a transfer's ticket waiter however its wait ends.
struct Waiting<'a>(&'a Shared, TransferId);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        lock(&self.0.tickets).remove(&self.1);
    }
}

async fn accept_and_receive(
    shared: &Shared,
    from: &AgentName,
    spki: &[u8],
    offer: &SignedOffer,
    tid: TransferId,
    out: &mpsc::Sender<Message>,
) -> Result<String, Failure> {
    let admitted = admit::admit(shared, from, spki, offer, tid).await?;
    let ctx = &shared.ctx;
    let gone = |e: AgentError| Failure::Failed(AbortReason::PeerGone, e.to_string());
    // Waiting for the ticket before the accept goes out, so that even an
    // immediate ticket finds its waiter.
    let (ticket_tx, ticket_rx) = oneshot::channel();
    lock(&shared.tickets).insert(tid, ticket_tx);
    let waiting = Waiting(shared, tid);
    let accept = Message::Accept {
        transfer_id: tid,
        accept: admitted.accept,
    };
    let ticket = async {
        out.send(accept)
            .await
            .map_err(|_| "the control connection is gone".to_owned())?;
        match tokio::time::timeout(CONNECT_TIMEOUT * 3, ticket_rx).await {
            Ok(Ok(Ok(ticket))) => Ok(ticket),
            Ok(Ok(Err(reason))) => Err(format!("the broker ended it before it began ({reason:?})")),
            Ok(Err(_)) => Err("the broker connection was lost before it began".to_owned()),
            Err(_) => Err("the broker sent no ticket".to_owned()),
        }
    }
    .await;
    drop(waiting);
    let ticket = match ticket {
        Ok(t) => t,
        Err(why) => {
            if let Some(place) = admitted.place {
                place.discard_if_empty();
            }
            return Err(Failure::Failed(AbortReason::PeerGone, why));
        }
    };
    // The stream comes over a plain connection: it is sealed end to end.
    let mut data = match open_data(ctx, tid, ticket).await {
        Ok(d) => d,
        Err(e) => {
            if let Some(place) = admitted.place {
                place.discard_if_empty();
            }
            return Err(gone(e));
        }
    };
    let terms = admitted.terms;
    let expect = Expect {
        declared: terms.size,
        size_known: terms.size_known,
        resume: admitted.place.as_ref().and_then(|p| p.resume.clone()),
        sender: admitted.sender_key,
        me: ctx.name.clone(),
        my_fp: ctx.identity.fingerprint(),
    };
    let job = Job {
        stream: RecvStream::new(admitted.pair, expect),
        want: Want {
            kind: terms.kind,
            declared: terms.size,
            size_known: terms.size_known,
            key: Arc::clone(&shared.journal_key),
        },
        place: admitted.place,
    };
    match stream::receive_stream(shared, &mut data, job).await {
        Ok(done) => {
            // The receipt goes out only once the data is in place and durable.
            let _ = data
                .writer
                .write(&Message::Receipt {
                    transfer_id: tid,
                    tag: done.receipt,
                })
                .await;
            let _ = data.writer.shutdown().await;
            Ok(format!("{} from {from}", done.line))
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
