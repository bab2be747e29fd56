//! A receiver's sessions: its one long-lived control connection, on which
//! the broker pushes offers and the receiver refuses them, and the accept
//! connection (role `Data` on the wire) it opens for each transfer it
//! accepts, which carries the `Accept` and brings back its ticket.

use tokio::sync::mpsc;
use tracing::info;

use keyferry_common::wire::message::{ErrorCode, Message};

use super::{Agent, BrokerConn, next, refuse, sender::online};
use crate::error::SessionError;
use crate::shutdown::Shutdown;
use crate::state::State;
use crate::transfers::{Answer, Ticketing};

/// How many pushed messages (offers) may wait for a receiver's connection.
const PUSH_QUEUE: usize = 32;

pub(super) async fn session(
    state: &State,
    mut conn: BrokerConn,
    agent: Agent,
    mut shutdown: Shutdown,
) -> Result<(), SessionError> {
    let registry = &state.registry;
    let conn_id = state.receiver_id();
    let (tx, mut rx) = mpsc::channel::<Message>(PUSH_QUEUE);
    if !registry.add_receiver(&agent.name, conn_id, tx) {
        return Err(refuse(
            &mut conn,
            ErrorCode::ReceiverConnected,
            format!("a receiver named {} is already connected", agent.name),
        )
        .await);
    }
    info!(agent = %agent.name, "receiver online");
    let result = async {
        loop {
            tokio::select! {
                Some(out) = rx.recv() => conn.writer.write(&out).await?,
                msg = next(&mut conn, None, &mut shutdown) => match msg? {
                    None => return Ok(()),
                    Some(Message::Refuse { transfer_id, reason }) => {
                        // Only the receiver the offer named may answer it.
                        let _ = state.transfers.answer(&transfer_id, &agent.name, Answer::Refused(reason));
                    }
                    Some(Message::List) => conn.writer.write(&online(state)).await?,
                    Some(other) => {
                        let what = format!("unexpected {} from a receiver", other.kind());
                        return Err(refuse(&mut conn, ErrorCode::Protocol, what).await);
                    }
                },
            }
        }
    }
    .await;
    registry.remove_receiver(&agent.name, conn_id);
    // Offers still waiting for this receiver's answer fail now.
    state.transfers.receiver_gone(&agent.name);
    info!(agent = %agent.name, "receiver offline");
    result
}

/// The accept connection: one `Accept`, then its ticket back, held open until
/// the wait for the data connections ends.
pub(super) async fn accept_session(
    state: &State,
    mut conn: BrokerConn,
    agent: Agent,
) -> Result<(), SessionError> {
    let limit = state.limits.handshake_timeout;
    let first = conn.reader.read_timeout(limit).await?;
    let Some(Message::Accept {
        transfer_id,
        accept,
    }) = first
    else {
        return Err(refuse(
            &mut conn,
            ErrorCode::Protocol,
            "a data connection starts with Accept".into(),
        )
        .await);
    };
    let (ticket_tx, ticket_rx) = tokio::sync::oneshot::channel();
    let answer = Answer::Accepted {
        accept,
        ticket: ticket_tx,
    };
    if state
        .transfers
        .answer(&transfer_id, &agent.name, answer)
        .is_err()
    {
        return Err(refuse(
            &mut conn,
            ErrorCode::UnknownTransfer,
            format!("no transfer {transfer_id} awaits {}", agent.name),
        )
        .await);
    }
    // The sender's side answers at once (it is waiting for this accept).
    match ticket_rx.await {
        Ok(Ticketing::Ticket { ticket, wait }) => {
            conn.writer
                .write(&Message::Ticket {
                    transfer_id,
                    ticket,
                })
                .await?;
            let _ = wait.await;
            Ok(())
        }
        Ok(Ticketing::Refused(detail)) => Err(refuse(&mut conn, ErrorCode::Protocol, detail).await),
        // The sender's side is gone: the connection's end is the answer.
        Err(_) => Ok(()),
    }
}
