//! A sender's session: lookups and lists, then one offer — checked against
//! the connection's own name and key, its rate and concurrency — routed to
//! the receiver's control connection (or, for a receiver on another broker
//! of the cluster, to that broker: [`super::routed`]); its answer relayed
//! back; on accept, the tickets (the receiver's on its own control
//! connection), the two data connections, and the relay of the transfer
//! ([`super::start`]).

use keyferry_common::ids::{StreamId, TransferId};
use keyferry_common::name::AgentName;
use keyferry_common::wire::message::{ErrorCode, Message, OnlineAgent};
use tracing::{info, warn};

use super::start::{self, ReceiverLink};
use super::{Agent, BrokerConn, next, refuse};
use super::{place, routed, stored};
use crate::cluster::names;
use crate::cluster::wire::RoutedAnswer;
use crate::error::SessionError;
use crate::metrics::{Offer, Path};
use crate::registry::Unreachable;
use crate::routes::Remote;
use crate::shutdown::Shutdown;
use crate::state::State;
use crate::transfers::Answer;

/// Counts a sender connection in the registry while it lives.
struct SenderCount<'a>(&'a State, AgentName);

impl Drop for SenderCount<'_> {
    fn drop(&mut self) {
        self.0.registry.sender_connected(&self.1, false);
    }
}

/// Everyone online, as the `Online` message lists them: this broker's
/// agents and, in cluster mode, every receiver of the cluster (with how busy
/// it was at its broker's last heartbeat).
pub(super) async fn online(state: &State) -> Message {
    // In a cluster every receiver is named with its broker, this one's too.
    let own = state
        .cluster
        .as_ref()
        .map(|c| c.member().id.clone())
        .unwrap_or_default();
    let mut agents: Vec<OnlineAgent> = state
        .registry
        .present()
        .into_iter()
        .map(|p| OnlineAgent {
            incoming: state.transfers.incoming(&p.name),
            broker: if p.receiving {
                own.clone()
            } else {
                String::new()
            },
            name: p.name,
            receiving: p.receiving,
            senders: p.senders,
        })
        .collect();
    if let Some(cluster) = &state.cluster {
        match cluster.receivers().await {
            Ok(remote) => {
                for (name, presence) in remote {
                    if presence.broker == cluster.member().id {
                        continue;
                    }
                    match agents.iter_mut().find(|a| a.name == name) {
                        Some(a) if !a.receiving => {
                            a.receiving = true;
                            a.incoming = presence.incoming;
                            a.broker = presence.broker;
                        }
                        Some(_) => {}
                        None => agents.push(OnlineAgent {
                            name,
                            receiving: true,
                            incoming: presence.incoming,
                            senders: 0,
                            broker: presence.broker,
                        }),
                    }
                }
                agents.sort_by(|a, b| a.name.cmp(&b.name));
            }
            Err(e) => {
                warn!(error = %e, "cluster unreachable: the list shows this broker's agents only")
            }
        }
    }
    Message::Online { agents }
}

/// The answer to `Lookup{name}`: its key if a receiver of that name is
/// connected here or (cluster mode) anywhere in the cluster. When the cluster
/// cannot be asked and no receiver of that name is here, the answer says so
/// rather than calling the name unknown or its receiver offline.
async fn lookup(state: &State, name: AgentName) -> Message {
    let registry = &state.registry;
    let names::Found { key, mut unreached } = match &state.cluster {
        Some(cluster) => names::key_of(cluster, registry, &name).await,
        None => names::Found {
            key: registry.key_of(&name).map_err(|e| {
                warn!(error = %e, "registry database error");
                "broker database error".to_owned()
            }),
            unreached: None,
        },
    };
    let receiving = registry.is_receiving(&name)
        || match &state.cluster {
            // Not asked again when it just failed to give the key.
            Some(cluster) if matches!(key, Ok(Some(_))) && unreached.is_none() => {
                match cluster.locate(&name).await {
                    Ok(found) => found.is_some(),
                    Err(e) => {
                        warn!(error = %e, "cluster unreachable: receiver looked up here only");
                        unreached = Some(e.to_string());
                        false
                    }
                }
            }
            _ => false,
        };
    match key {
        Ok(Some(spki)) if receiving => Message::PeerKey { name, spki },
        Ok(_) if let Some(why) = unreached => Message::Error {
            code: ErrorCode::Protocol,
            detail: format!(
                "this broker cannot reach its cluster to find {name} ({why}), and no receiver \
                 of that name is connected here; try again once the cluster is back"
            ),
        },
        Ok(Some(_)) => Message::Error {
            code: ErrorCode::PeerOffline,
            detail: format!("{name} is not connected as a receiver"),
        },
        Ok(None) => Message::Error {
            code: ErrorCode::UnknownPeer,
            detail: format!("no agent named {name} has ever registered with this broker"),
        },
        Err(detail) => Message::Error {
            code: ErrorCode::Protocol,
            detail,
        },
    }
}

/// Tells the sender its offer was accepted, and gives it its ticket for
/// the data connection at `address` (empty: this broker).
async fn accepted(
    conn: &mut BrokerConn,
    tid: TransferId,
    accept: Vec<u8>,
    ticket: [u8; 32],
    address: String,
) -> Result<(), SessionError> {
    conn.writer
        .write(&Message::Accept {
            transfer_id: tid,
            accept,
        })
        .await?;
    conn.writer
        .write(&Message::Ticket {
            transfer_id: tid,
            ticket,
            address,
        })
        .await?;
    Ok(())
}

/// Relays a routed offer's answer to the sender; `true` when the transfer
/// goes ahead at the other broker (this session's part is done).
async fn answer_routed(
    conn: &mut BrokerConn,
    tid: TransferId,
    answer: RoutedAnswer,
    wait: std::time::Duration,
) -> Result<bool, SessionError> {
    match answer {
        RoutedAnswer::Accepted {
            accept,
            ticket,
            address,
        } => {
            accepted(conn, tid, accept, ticket, address).await?;
            // Until the sender closes (it has what it needs), or a while.
            let _ = tokio::time::timeout(wait, conn.reader.read()).await;
            Ok(true)
        }
        RoutedAnswer::Refused(reason) => {
            conn.writer
                .write(&Message::Refuse {
                    transfer_id: tid,
                    reason,
                })
                .await?;
            Ok(false)
        }
        RoutedAnswer::Failed { code, detail } => {
            conn.writer.write(&Message::Error { code, detail }).await?;
            Ok(false)
        }
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
            Message::List => conn.writer.write(&online(state).await).await?,
            Message::Ping { nonce } => conn.writer.write(&Message::Pong { nonce }).await?,
            Message::Lookup { name } => {
                let reply = lookup(state, name).await;
                conn.writer.write(&reply).await?;
            }
            Message::FetchPrekey { name } => {
                let reply = stored::fetch(state, &agent, name).await;
                conn.writer.write(&reply).await?;
            }
            Message::Store { to, offer, size } => {
                return stored::store(state, conn, &agent, (to, offer, size)).await;
            }
            Message::Receipts => {
                let reply = stored::receipts(state, &agent).await;
                conn.writer.write(&reply).await?;
            }
            Message::Withdraw { transfer_id } => {
                let reply = stored::withdraw(state, &agent, transfer_id).await;
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
                let slot = match place::offer_place(state, &agent.name, fields.stream_id).await {
                    Ok(slot) => slot,
                    Err(detail) => {
                        state.metrics.offer(&agent.name, Offer::RateLimited);
                        warn!(agent = %agent.name, %detail, "offer refused by rate limit");
                        return Err(refuse(&mut conn, ErrorCode::RateLimited, detail).await);
                    }
                };
                if let Some(cluster) = &state.cluster
                    && !registry.is_receiving(&to)
                {
                    info!(transfer = %tid, from = %agent.name, to = %to, "offer routed through the cluster");
                    let answer = routed::offer(state, cluster, &agent, &to, offer).await;
                    let outcome = match &answer {
                        RoutedAnswer::Accepted { .. } => Offer::Accepted,
                        RoutedAnswer::Refused(reason) => Offer::Refused(*reason),
                        RoutedAnswer::Failed { code, .. } if *code == ErrorCode::PeerOffline => {
                            Offer::Offline
                        }
                        RoutedAnswer::Failed { .. } => Offer::Failed,
                    };
                    state.metrics.offer(&agent.name, outcome);
                    if let RoutedAnswer::Accepted {
                        ticket, address, ..
                    } = &answer
                    {
                        // The sender may upload here instead, with others
                        // of the stream on other brokers (crate::feed).
                        let (sid, from) = (fields.stream_id, agent.name.clone());
                        let remote = Remote::new(tid, address.clone(), *ticket, sid, from);
                        let keep = state.limits.handshake_timeout;
                        state
                            .routes
                            .remember(remote, std::time::Instant::now(), keep);
                    }
                    let wait = state.limits.handshake_timeout;
                    if answer_routed(&mut conn, tid, answer, wait).await? {
                        return Ok(());
                    }
                    drop(slot);
                    continue;
                }
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
                    state.metrics.offer(&agent.name, Offer::Offline);
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
                        state.metrics.offer(&agent.name, Offer::TimedOut);
                        info!(transfer = %tid, "receiver did not answer in time");
                        return Err(refuse(
                            &mut conn,
                            ErrorCode::PeerOffline,
                            format!("{to} did not answer the offer"),
                        )
                        .await);
                    }
                    Ok(Err(_)) => {
                        state.metrics.offer(&agent.name, Offer::ReceiverLeft);
                        info!(transfer = %tid, "receiver left before answering");
                        return Err(refuse(
                            &mut conn,
                            ErrorCode::PeerOffline,
                            format!("{to} disconnected"),
                        )
                        .await);
                    }
                    Ok(Ok(Answer::Refused(reason))) => {
                        state.metrics.offer(&agent.name, Offer::Refused(reason));
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
                        state.metrics.offer(&agent.name, Offer::Accepted);
                        let _incoming = state.transfers.relaying(&to);
                        let receiver = ReceiverLink::new(receiver, tid);
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

/// Sends the accept and the tickets, waits for both data connections, relays.
async fn start_transfer(
    state: &State,
    mut conn: BrokerConn,
    mut receiver: ReceiverLink,
    ids: (TransferId, StreamId),
    accept: Vec<u8>,
    shutdown: Shutdown,
    from: &AgentName,
) -> Result<(), SessionError> {
    let tid = ids.0;
    let issued = match start::issue(state, &mut receiver, ids, from) {
        Ok(issued) => issued,
        Err((code, detail)) => return Err(refuse(&mut conn, code, detail).await),
    };
    accepted(&mut conn, tid, accept, issued.sender_ticket, String::new()).await?;
    let hold = (conn, receiver);
    start::relay_when_connected(state, issued, ids, Path::Local, shutdown, hold).await;
    Ok(())
}
