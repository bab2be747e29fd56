//! A sender's session: lookups and lists, then one offer — checked against
//! the connection's own name and key, its rate and concurrency — routed to
//! the receiver's control connection; its answer relayed back; on accept, the
//! tickets (the receiver's on its own control connection), the two data
//! connections, and the relay of the transfer.

use std::time::Instant;

use keyferry_common::ids::{StreamId, TransferId};
use keyferry_common::name::AgentName;
use keyferry_common::wire::message::{AbortReason, ErrorCode, Message, OnlineAgent};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::{Agent, BrokerConn, next, refuse};
use crate::error::SessionError;
use crate::fanout;
use crate::registry::Unreachable;
use crate::relay::relay;
use crate::shutdown::Shutdown;
use crate::state::State;
use crate::tickets::{Arrival, Joiner};
use crate::transfers::{Answer, OfferLimit};

/// Counts a sender connection in the registry while it lives.
struct SenderCount<'a>(&'a State, AgentName);

impl Drop for SenderCount<'_> {
    fn drop(&mut self) {
        self.0.registry.sender_connected(&self.1, false);
    }
}

/// Everyone online, as the `Online` message lists them.
pub(super) fn online(state: &State) -> Message {
    Message::Online {
        agents: state
            .registry
            .present()
            .into_iter()
            .map(|p| OnlineAgent {
                incoming: state.transfers.incoming(&p.name),
                name: p.name,
                receiving: p.receiving,
                senders: p.senders,
            })
            .collect(),
    }
}

pub(super) async fn session(
    state: &State,
    mut conn: BrokerConn,
    agent: Agent,
    mut shutdown: Shutdown,
) -> Result<(), SessionError> {
    let registry = &state.registry;
    registry.sender_connected(&agent.name, true);
    let _count = SenderCount(state, agent.name.clone());
    loop {
        let idle = Some(state.limits.idle_timeout);
        let Some(msg) = next(&mut conn, idle, &mut shutdown).await? else {
            return Ok(());
        };
        match msg {
            Message::List => conn.writer.write(&online(state)).await?,
            Message::Ping { nonce } => conn.writer.write(&Message::Pong { nonce }).await?,
            Message::Lookup { name } => {
                let reply = match registry.key_of(&name) {
                    Ok(Some(spki)) if registry.is_receiving(&name) => {
                        Message::PeerKey { name, spki }
                    }
                    Ok(Some(_)) => Message::Error {
                        code: ErrorCode::PeerOffline,
                        detail: format!("{name} is not connected as a receiver"),
                    },
                    Ok(None) => Message::Error {
                        code: ErrorCode::UnknownPeer,
                        detail: format!(
                            "no agent named {name} has ever registered with this broker"
                        ),
                    },
                    Err(e) => {
                        warn!(error = %e, "registry database error");
                        Message::Error {
                            code: ErrorCode::Protocol,
                            detail: "broker database error".into(),
                        }
                    }
                };
                conn.writer.write(&reply).await?;
            }
            Message::Offer { to, offer } => {
                let Ok(fields) = offer.parse() else {
                    return Err(
                        refuse(&mut conn, ErrorCode::Protocol, "malformed offer".into()).await,
                    );
                };
                if fields.sender != agent.name
                    || fields.sender_fp != agent.fingerprint
                    || fields.receiver != to
                {
                    warn!(agent = %agent.name, "offer names another sender or receiver");
                    return Err(refuse(
                        &mut conn,
                        ErrorCode::Protocol,
                        "the offer must name this connection's agent and key as its sender".into(),
                    )
                    .await);
                }
                let tid = fields.transfer_id;
                let limits = &state.limits;
                let slot = match state.transfers.take_offer_slot(
                    &agent.name,
                    fields.stream_id,
                    limits.offers_per_minute,
                    limits.max_transfers_per_agent,
                    Instant::now(),
                ) {
                    Ok(slot) => slot,
                    Err(limit) => {
                        let detail = match limit {
                            OfferLimit::Rate => {
                                format!("more than {} offers in a minute", limits.offers_per_minute)
                            }
                            OfferLimit::Concurrent => format!(
                                "more than {} transfers at once",
                                limits.max_transfers_per_agent
                            ),
                        };
                        warn!(agent = %agent.name, %detail, "offer refused by rate limit");
                        return Err(refuse(&mut conn, ErrorCode::RateLimited, detail).await);
                    }
                };
                let offered = Message::Offered {
                    from: agent.name.clone(),
                    spki: agent.spki.clone(),
                    offer,
                };
                // Waiting for the answer first, so that even a receiver that
                // answers at once finds the offer.
                let answer = state.transfers.offer(tid, &to);
                let delivered = match answer {
                    Some(answer) => match registry.push(&to, offered) {
                        Ok(()) => Some(answer),
                        Err(Unreachable::Offline | Unreachable::Full) => {
                            state.transfers.cancel(&tid);
                            None
                        }
                    },
                    None => None,
                };
                let Some(answer) = delivered else {
                    conn.writer
                        .write(&Message::Error {
                            code: ErrorCode::PeerOffline,
                            detail: format!(
                                "{to} is not connected as a receiver, or cannot take offers now"
                            ),
                        })
                        .await?;
                    continue;
                };
                info!(transfer = %tid, from = %agent.name, to = %to, "transfer offered");
                match tokio::time::timeout(state.limits.answer_timeout, answer).await {
                    Err(_) => {
                        state.transfers.cancel(&tid);
                        info!(transfer = %tid, "receiver did not answer in time");
                        return Err(refuse(
                            &mut conn,
                            ErrorCode::PeerOffline,
                            format!("{to} did not answer the offer"),
                        )
                        .await);
                    }
                    Ok(Err(_)) => {
                        info!(transfer = %tid, "receiver left before answering");
                        return Err(refuse(
                            &mut conn,
                            ErrorCode::PeerOffline,
                            format!("{to} disconnected"),
                        )
                        .await);
                    }
                    Ok(Ok(Answer::Refused(reason))) => {
                        info!(transfer = %tid, ?reason, "transfer refused by receiver");
                        drop(slot);
                        conn.writer
                            .write(&Message::Refuse {
                                transfer_id: tid,
                                reason,
                            })
                            .await?;
                    }
                    Ok(Ok(Answer::Accepted { accept, receiver })) => {
                        let _incoming = state.transfers.relaying(&to);
                        let receiver = ReceiverLink {
                            queue: receiver,
                            tid,
                            told: false,
                        };
                        let ids = (tid, fields.stream_id);
                        let result = start_transfer(
                            state,
                            conn,
                            receiver,
                            ids,
                            accept,
                            shutdown,
                            &agent.name,
                        )
                        .await;
                        drop(slot);
                        return result;
                    }
                }
            }
            other => {
                let what = format!("unexpected {} from a sender", other.kind());
                return Err(refuse(&mut conn, ErrorCode::Protocol, what).await);
            }
        }
    }
}

/// The receiver's control connection, for its ticket. If the transfer ends
/// before the ticket went there, the receiver is told `Abort(PeerGone)`
/// instead of being left waiting.
struct ReceiverLink {
    queue: mpsc::Sender<Box<Message>>,
    tid: TransferId,
    told: bool,
}

impl ReceiverLink {
    /// Queues the receiver's ticket; `false` if its connection is gone or
    /// not reading.
    fn ticket(&mut self, ticket: [u8; 32]) -> bool {
        self.told = self
            .queue
            .try_send(Box::new(Message::Ticket {
                transfer_id: self.tid,
                ticket,
                address: String::new(),
            }))
            .is_ok();
        self.told
    }
}

impl Drop for ReceiverLink {
    fn drop(&mut self) {
        if !self.told {
            let _ = self.queue.try_send(Box::new(Message::Abort {
                transfer_id: self.tid,
                reason: AbortReason::PeerGone,
            }));
        }
    }
}

/// Sends the accept and the tickets, waits for both data connections, relays.
async fn start_transfer(
    state: &State,
    mut conn: BrokerConn,
    mut receiver: ReceiverLink,
    (tid, sid): (TransferId, StreamId),
    accept: Vec<u8>,
    shutdown: Shutdown,
    from: &AgentName,
) -> Result<(), SessionError> {
    let Some(mut issued) = state.tickets.issue(tid, sid, from) else {
        let detail = format!("transfer {tid} is already under way");
        return Err(refuse(&mut conn, ErrorCode::Protocol, detail).await);
    };
    if !receiver.ticket(issued.receiver_ticket) {
        info!(transfer = %tid, "receiver left before its ticket");
        return Err(refuse(
            &mut conn,
            ErrorCode::PeerOffline,
            "the receiver disconnected after accepting".into(),
        )
        .await);
    }
    conn.writer
        .write(&Message::Accept {
            transfer_id: tid,
            accept,
        })
        .await?;
    conn.writer
        .write(&Message::Ticket {
            transfer_id: tid,
            ticket: issued.sender_ticket,
            address: String::new(),
        })
        .await?;
    let deadline = tokio::time::Instant::now() + state.limits.handshake_timeout;
    let arrival = tokio::time::timeout_at(deadline, &mut issued.sender).await;
    let mine = tokio::time::timeout_at(deadline, &mut issued.receiver).await;
    drop(issued);
    let mine = mine.ok().and_then(Result::ok);
    let (sender, others, mut joiners) = match arrival {
        Ok(Ok(Arrival::Upload {
            conn: sender,
            others,
            joiners,
        })) => (sender, others, joiners),
        Ok(Ok(Arrival::Joined { hub })) => {
            // Another transfer's task relays this stream; this receiver's
            // connection goes there, and this task waits for the relay.
            let Some(mine) = mine else {
                info!(transfer = %tid, "data connection did not arrive in time");
                return Ok(());
            };
            let (done, relayed) = oneshot::channel();
            let joiner = Joiner {
                tid,
                conn: mine,
                done,
            };
            if hub.send(joiner).await.is_ok() {
                let _ = relayed.await;
            }
            return Ok(());
        }
        _ => {
            info!(transfer = %tid, "data connections did not arrive in time");
            return Ok(());
        }
    };
    // The TLS connection has done its part; the sender closes its own too.
    drop(conn);
    let ids = (tid, sid);
    let idle = state.limits.idle_timeout;
    if others.is_empty() {
        let Some(receiver) = mine else {
            info!(transfer = %tid, "data connections did not arrive in time");
            return Ok(());
        };
        info!(transfer = %tid, "transfer started");
        let report = relay(sender, receiver, ids, idle, shutdown).await;
        log_report(tid, &report);
        return Ok(());
    }
    // One upload to several receivers: those whose connections arrive in
    // time take part; the others' transfers have failed.
    let mut receivers: Vec<fanout::Receiver> = mine
        .map(|conn| fanout::Receiver {
            tid,
            conn,
            done: None,
        })
        .into_iter()
        .collect();
    for _ in 0..others.len() {
        match tokio::time::timeout_at(deadline, joiners.recv()).await {
            Ok(Some(j)) => receivers.push(fanout::Receiver {
                tid: j.tid,
                conn: j.conn,
                done: Some(j.done),
            }),
            _ => break,
        }
    }
    info!(transfer = %tid, receivers = receivers.len(), "upload to several receivers started");
    let report = fanout::relay(sender, receivers, sid, idle, shutdown).await;
    log_report(tid, &report);
    Ok(())
}

fn log_report(tid: TransferId, report: &crate::relay::RelayReport) {
    let seconds = format!("{:.3}", report.elapsed.as_secs_f64());
    match &report.result {
        Ok(()) => info!(transfer = %tid, bytes = report.bytes, seconds, "transfer finished"),
        Err(why) => info!(transfer = %tid, bytes = report.bytes, seconds, %why, "transfer failed"),
    }
}
