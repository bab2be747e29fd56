//! A receiver's session: its one long-lived control connection. The broker
//! pushes offers on it; the receiver answers each there, with `Refuse` or
//! `Accept`, and gets its ticket for an accepted transfer (or an `Abort` if
//! the transfer cannot start) on the same connection. The broker pings it
//! every `--keepalive`; a receiver that has said nothing for two intervals
//! is dropped, so a frozen one does not stay "online".

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{info, warn};

use keyferry_common::wire::message::{AbortReason, ErrorCode, Message};

use super::deliver::{Answer as Stored, Courier, drop_stale_prekeys, prekey_count};
use super::{Agent, BrokerConn, next, refuse, sender::online};
use crate::cluster::presence::Claim;
use crate::error::SessionError;
use crate::shutdown::Shutdown;
use crate::state::State;
use crate::transfers::Answer;

/// How many pushed messages (offers, tickets) may wait for a receiver's
/// connection.
const PUSH_QUEUE: usize = 32;
/// Most `Prekeys` a receiver may send on one connection (a top-up takes 5).
const MAX_DEPOSITS: u32 = 16;

pub(super) async fn session(
    state: &Arc<State>,
    mut conn: BrokerConn,
    agent: Agent,
    welcome: Message,
    mut shutdown: Shutdown,
) -> Result<(), SessionError> {
    let registry = &state.registry;
    let conn_id = state.receiver_id();
    // Boxed: the channel allocates its slots in blocks of 32, and an idle
    // receiver then holds 32 pointers instead of 32 messages.
    let (tx, mut rx) = mpsc::channel::<Box<Message>>(PUSH_QUEUE);
    if !registry.add_receiver(&agent.name, conn_id, tx.clone()) {
        return Err(refuse(
            &mut conn,
            ErrorCode::ReceiverConnected,
            format!(
                "a receiver named {} is already connected to this broker; stop it, or receive \
                 under another --name",
                agent.name
            ),
        )
        .await);
    }
    if let Some(held_by) = claim(state, &agent).await {
        registry.remove_receiver(&agent.name, conn_id);
        let detail = format!(
            "a receiver named {} is already connected to broker {held_by} of this cluster; stop \
             it, or receive under another --name",
            agent.name
        );
        return Err(refuse(&mut conn, ErrorCode::ReceiverConnected, detail).await);
    }
    if let Err(e) = conn.writer.write(&welcome).await {
        registry.remove_receiver(&agent.name, conn_id);
        release(state, &agent).await;
        return Err(e.into());
    }
    info!(agent = %agent.name, "receiver online");
    // Its prekeys and what waits for it in the mailbox (this broker's, or
    // its cluster's: PROTOCOL.md §2.8).
    let mailbox = state.mailbox.clone();
    let courier = match &mailbox {
        Some(m) => {
            drop_stale_prekeys(m, &agent.name).await;
            if let Some(count) = prekey_count(m, &agent.name).await
                && let Err(e) = conn.writer.write(&count).await
            {
                registry.remove_receiver(&agent.name, conn_id);
                return Err(e.into());
            }
            let who = (agent.name.clone(), agent.spki.clone());
            Some(Courier::start(
                Arc::clone(state),
                m.clone(),
                who,
                tx.clone(),
            ))
        }
        None => None,
    };
    let every = state.limits.keepalive;
    let mut ping = tokio::time::interval_at(Instant::now() + every, every);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let (mut heard, mut nonce) = (Instant::now(), 0u64);
    let mut deposits = 0u32;
    let result = async {
        loop {
            tokio::select! {
                Some(out) = rx.recv() => {
                    conn.writer.write(&out).await?;
                    // An error pushed here ends the session (the cluster
                    // gave the name to a receiver on another broker).
                    if let Message::Error { detail, .. } = *out {
                        return Err(SessionError::Refused(detail));
                    }
                }
                _ = ping.tick() => {
                    // Two intervals of silence: frozen, or its network is gone.
                    if heard.elapsed() >= every * 2 {
                        warn!(agent = %agent.name, silent_seconds = heard.elapsed().as_secs(), "receiver answers no keepalive: dropped");
                        return Err(SessionError::Refused(format!(
                            "no answer to keepalive pings for {} s",
                            heard.elapsed().as_secs()
                        )));
                    }
                    nonce = nonce.wrapping_add(1);
                    conn.writer.write(&Message::Ping { nonce }).await?;
                }
                msg = next(&mut conn, None, &mut shutdown) => match msg.inspect(|_| heard = Instant::now())? {
                    None => return Ok(()),
                    Some(Message::Pong { .. }) => {}
                    // Only the receiver the offer named may answer it.
                    Some(Message::Refuse { transfer_id, reason }) if courier.as_ref().is_some_and(|c| c.offering(&transfer_id)) => {
                        if let Some(c) = &courier {
                            c.answer(Stored::NotNow(transfer_id, reason)).await;
                        }
                    }
                    Some(Message::Accept { transfer_id, .. }) if courier.as_ref().is_some_and(|c| c.offering(&transfer_id)) => {
                        if let Some(c) = &courier {
                            c.answer(Stored::Accept(transfer_id)).await;
                        }
                    }
                    // A receipt for what is not being offered now (late, or
                    // not ours) is dropped: the transfer is offered again.
                    Some(Message::StoredReceipt { transfer_id, receipt }) => {
                        if let Some(c) = courier.as_ref().filter(|c| c.offering(&transfer_id)) {
                            c.answer(Stored::Receipt(transfer_id, receipt)).await;
                        }
                    }
                    Some(Message::Prekeys { .. }) if deposits >= MAX_DEPOSITS => {
                        let what = format!("more than {MAX_DEPOSITS} prekey deposits on one connection");
                        return Err(refuse(&mut conn, ErrorCode::RateLimited, what).await);
                    }
                    Some(Message::Prekeys { bundles, last_resort }) if mailbox.is_some() => {
                        deposits += 1;
                        if let Some(m) = &mailbox {
                            let bundles = bundles.into_iter().map(|b| b.into_vec()).collect();
                            let last = (!last_resort.is_empty()).then_some(last_resort);
                            match m.put_prekeys(&agent.name, bundles, last).await {
                                Ok(_) => {
                                    if let Some(count) = prekey_count(m, &agent.name).await {
                                        if let Message::PrekeyCount { one_time, .. } = &count {
                                            info!(agent = %agent.name, one_time, "prekeys deposited");
                                        }
                                        conn.writer.write(&count).await?;
                                    }
                                }
                                Err(e) => warn!(agent = %agent.name, error = %e, "prekeys not kept"),
                            }
                        }
                    }
                    Some(Message::Refuse { transfer_id, reason }) => {
                        let _ = state.transfers.answer(&transfer_id, &agent.name, Answer::Refused(reason));
                    }
                    Some(Message::Accept { transfer_id, accept }) => {
                        let answer = Answer::Accepted { accept, receiver: tx.clone() };
                        if state.transfers.answer(&transfer_id, &agent.name, answer).is_err() {
                            // Too late (the sender gave up) or not ours: the
                            // receiver stops waiting for a ticket.
                            conn.writer
                                .write(&Message::Abort { transfer_id, reason: AbortReason::PeerGone })
                                .await?;
                        }
                    }
                    Some(Message::List) => conn.writer.write(&online(state).await).await?,
                    Some(Message::Ping { nonce }) => conn.writer.write(&Message::Pong { nonce }).await?,
                    Some(other) => {
                        let what = format!("unexpected {} from a receiver", other.kind());
                        return Err(refuse(&mut conn, ErrorCode::Protocol, what).await);
                    }
                },
            }
        }
    }
    .await;
    if registry.remove_receiver(&agent.name, conn_id) {
        release(state, &agent).await;
    }
    // Offers still waiting for this receiver's answer fail now.
    state.transfers.receiver_gone(&agent.name);
    drop(courier);
    info!(agent = %agent.name, "receiver offline");
    result
}

/// In cluster mode, claims the receiver's presence for this broker; the id
/// of the broker that holds a receiver of that name, if another does. A
/// claim that fails (the cluster out of reach) does not keep a receiver
/// out: the next heartbeat claims its presence, and cuts it then if another
/// broker turns out to hold one.
async fn claim(state: &State, agent: &Agent) -> Option<String> {
    let cluster = state.cluster.as_ref()?;
    match cluster.claim(&agent.name, 0).await {
        Ok(Claim::Claimed) => None,
        Ok(Claim::HeldBy(id)) => Some(id),
        Err(e) => {
            warn!(agent = %agent.name, error = %e, "receiver online here only: its presence will be claimed when the cluster is back");
            None
        }
    }
}

/// In cluster mode, gives the receiver's presence up.
async fn release(state: &State, agent: &Agent) {
    if let Some(cluster) = &state.cluster {
        cluster.release(&agent.name).await;
    }
}
