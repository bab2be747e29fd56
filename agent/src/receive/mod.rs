//! The receiver role: stay connected, check every offer ([`admit`]), receive
//! each accepted transfer on its own data connection ([`stream`]) into a file
//! that has no name until it verified ([`output`]), place it, and only then
//! send the receipt.

mod admit;
pub mod filename;
pub mod output;
mod stream;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyferry_common::handshake::{DEFAULT_TIME_WINDOW_SECS, SignedOffer};
use keyferry_common::ids::TransferId;
use keyferry_common::io::connection::ConnError;
use keyferry_common::name::AgentName;
use keyferry_common::transfer::RecvStream;
use keyferry_common::wire::message::{AbortReason, Message, RefuseReason, Role};
use tokio::sync::mpsc;

use crate::client::{AgentConn, Ctx, await_ticket, conn_error, connect, open_data};
use crate::error::AgentError;
use crate::trust::budget::RsaBudget;
use crate::trust::replay::ReplayGuard;
use output::OutDir;

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

/// Transfers in progress: the receiver's capacity.
#[derive(Debug, Default)]
struct Limits {
    per_sender: HashMap<AgentName, usize>,
    active: usize,
    in_flight: u64,
}

/// What every incoming transfer of this receiver shares.
struct Shared {
    ctx: Ctx,
    opts: RecvOptions,
    out: Arc<OutDir>,
    limits: Mutex<Limits>,
    replay: Mutex<ReplayGuard>,
    budget: Mutex<RsaBudget>,
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
    let dir_err = |source| AgentError::OutDir {
        path: opts.out_dir.clone(),
        source,
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
                Ok(Some(Message::Error { detail, .. })) => return Err(AgentError::SessionEnded(detail)),
                Ok(Some(_)) => return Err(AgentError::Protocol("unexpected message from the broker")),
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

async fn accept_and_receive(
    shared: &Shared,
    from: &AgentName,
    spki: &[u8],
    offer: &SignedOffer,
    tid: TransferId,
) -> Result<String, Failure> {
    let admitted = admit::admit(shared, from, spki, offer, tid).await?;
    let ctx = &shared.ctx;
    let gone = |e: AgentError| Failure::Failed(AbortReason::PeerGone, e.to_string());
    let mut control = connect(ctx, Role::Data).await.map_err(gone)?;
    control
        .writer
        .write(&Message::Accept {
            transfer_id: tid,
            accept: admitted.accept,
        })
        .await
        .map_err(|e| gone(conn_error(ctx, e)))?;
    // The stream comes over a plain connection: it is sealed end to end.
    let ticket = await_ticket(ctx, &mut control, tid).await.map_err(gone)?;
    drop(control);
    let mut data = open_data(ctx, tid, ticket).await.map_err(gone)?;

    let stream = RecvStream::new(admitted.keys, admitted.metadata.size);
    let result = stream::receive_stream(
        shared,
        &mut data,
        tid,
        stream,
        &admitted.metadata,
        admitted.stored_name.as_deref(),
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
