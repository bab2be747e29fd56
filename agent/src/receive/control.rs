//! The receiver's control connection: offers in (each handled by its own task,
//! [`super::incoming`]), answers out, tickets and aborts routed to the
//! transfer waiting for them, and keepalive both ways: the broker's `Ping`s
//! are answered, and this side pings the broker every `--keepalive`; a broker
//! not heard from for two intervals is taken as gone, and the receiver
//! reconnects.

use std::sync::Arc;
use std::time::Duration;

use keyferry_common::io::connection::ConnError;
use keyferry_common::sync::lock;
use keyferry_common::text::escape;
use keyferry_common::wire::message::Message;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use super::incoming::{Ended, incoming};
use super::{Shared, once};
use crate::client::{AgentConn, Ticket, conn_error};
use crate::error::{AgentError, exit};

/// The channels between the control connection and the transfer tasks:
/// answers to send (on whichever connection is current) and, for `--once`,
/// how each offer ended.
pub(super) struct Channels {
    pub out_tx: mpsc::Sender<Message>,
    pub out_rx: mpsc::Receiver<Message>,
    pub done_tx: mpsc::Sender<Ended>,
    pub done_rx: mpsc::Receiver<Ended>,
}

/// Serves one control connection. `Ok` ends the receiver (with its result);
/// `Err` says why the connection was lost, to reconnect.
pub(super) async fn control_loop(
    shared: &Arc<Shared>,
    mut conn: AgentConn,
    ch: &mut Channels,
) -> Result<Result<(), AgentError>, AgentError> {
    let lost = |e| Err(conn_error(&shared.ctx, e));
    let every = shared.opts.keepalive;
    let mut ping = tokio::time::interval_at(Instant::now() + every, every);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut heard = Instant::now();
    let mut nonce = 0u64;
    let mut counted = false;
    loop {
        tokio::select! {
            // Biased, answers first: a transfer task queues its Refuse before it
            // reports being done, so a --once receiver never exits with the
            // Refuse still queued (the sender would see "offline" instead).
            biased;
            Some(msg) = ch.out_rx.recv() => {
                if let Err(e) = conn.writer.write(&msg).await {
                    return lost(e);
                }
            }
            Some(ended) = ch.done_rx.recv() => {
                if shared.opts.once && let Some(result) = ended {
                    return Ok(once(result));
                }
            }
            _ = ping.tick() => {
                if heard.elapsed() >= every * 2 {
                    return Err(silent(shared, heard.elapsed()));
                }
                nonce = nonce.wrapping_add(1);
                if let Err(e) = conn.writer.write(&Message::Ping { nonce }).await {
                    return lost(e);
                }
            }
            msg = conn.reader.read() => {
                heard = Instant::now();
                match msg {
                    Ok(Some(Message::Offered { from, spki, offer })) => {
                        let (shared, out_tx, done_tx) =
                            (Arc::clone(shared), ch.out_tx.clone(), ch.done_tx.clone());
                        tokio::spawn(async move {
                            // A task that failed (a bug) still ends a --once
                            // receiver, which would otherwise wait for ever.
                            let task = tokio::spawn(async move {
                                incoming(&shared, from, spki, (offer, false), &out_tx).await
                            });
                            let ended = task.await.unwrap_or_else(|e| {
                                Some(Err((exit::OTHER, format!("the transfer's task failed: {e}"))))
                            });
                            let _ = done_tx.send(ended).await;
                        });
                    }
                    Ok(Some(Message::StoredOffered { from, spki, offer, .. })) => {
                        let (shared, out_tx, done_tx) =
                            (Arc::clone(shared), ch.out_tx.clone(), ch.done_tx.clone());
                        tokio::spawn(async move {
                            let task = tokio::spawn(async move {
                                incoming(&shared, from, spki, (offer, true), &out_tx).await
                            });
                            let ended = task.await.unwrap_or_else(|e| {
                                Some(Err((exit::OTHER, format!("the transfer's task failed: {e}"))))
                            });
                            let _ = done_tx.send(ended).await;
                        });
                    }
                    // The first count of a connection says what the broker
                    // holds; the later ones answer our own deposits.
                    Ok(Some(Message::PrekeyCount { .. })) if counted => {}
                    Ok(Some(Message::PrekeyCount { one_time, last_resort_expires })) => {
                        counted = true;
                        let (shared, out_tx) = (Arc::clone(shared), ch.out_tx.clone());
                        tokio::spawn(async move {
                            super::stored::top_up(&shared, (one_time, last_resort_expires), &out_tx).await;
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
                    Ok(Some(Message::Ping { nonce })) => {
                        if let Err(e) = conn.writer.write(&Message::Pong { nonce }).await {
                            return lost(e);
                        }
                    }
                    Ok(Some(Message::Pong { .. })) => {}
                    Ok(Some(Message::Error { detail, .. })) => {
                        return Ok(Err(AgentError::SessionEnded(escape(&detail))));
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
}

/// The broker answered nothing for `for_`: it froze, or the network between
/// went away without a word.
fn silent(shared: &Shared, for_: Duration) -> AgentError {
    AgentError::BrokerUnreachable {
        addr: shared.ctx.broker.clone(),
        detail: format!("no answer to keepalive pings for {} s", for_.as_secs()),
    }
}
