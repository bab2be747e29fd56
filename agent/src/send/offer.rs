//! One receiver's handshake for an attempt (see [`super::attempt`]): a
//! connection of its own to the broker, the receiver's key looked up and
//! checked against its pin, the signed offer, and the receiver's verified
//! accept and ticket; and how a failure says whether the receiver had
//! accepted (only then is there something to resume).

use std::sync::Arc;

use keyferry_common::handshake::direct::punch_to_bytes;
use keyferry_common::handshake::{Accepted, OfferParams, Terms, make_offer};
use keyferry_common::identity::Fingerprint;
use keyferry_common::ids::StreamId;
use keyferry_common::io::connection::ConnError;
use keyferry_common::name::AgentName;
use keyferry_common::wire::message::{AbortReason, ErrorCode, Message, Role};

use super::source::Source;
use super::{ANSWER_TIMEOUT, SendOptions, peer_key};
use crate::client::{Ctx, Ticket, await_ticket, broker_error, conn_error, connect_then};
use crate::direct::punch::PunchPort;
use crate::error::AgentError;
use crate::home::now_unix;

/// A failed transfer to one receiver, and whether the receiver had accepted
/// it (only then is there something to resume).
#[derive(Debug)]
pub struct Failed {
    /// Why.
    pub error: AgentError,
    /// Whether the receiver accepted.
    pub accepted: bool,
}

/// How long a sender whose accept did not verify spends telling the
/// receiver so before it reports the failure.
const TELL_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

pub(super) fn before(error: AgentError) -> Failed {
    Failed {
        error,
        accepted: false,
    }
}

pub(super) fn after(error: AgentError) -> Failed {
    Failed {
        error,
        accepted: true,
    }
}

/// One receiver's handshake, done.
pub(crate) struct Handshake {
    /// The receiver.
    pub to: AgentName,
    /// Its key's fingerprint.
    pub fp: Fingerprint,
    /// Its verified accept and the pair's keys.
    pub accepted: Accepted,
    /// Where its data connection goes.
    pub ticket: Ticket,
    /// The port named in the terms for a simultaneous open, if one was.
    /// Taken by the dial (and so released when it ends).
    pub punch: std::sync::Mutex<Option<PunchPort>>,
}

/// Offers stream `stream_id` of `source` to `to` on a connection of its
/// own and waits for its accept and ticket.
pub(super) async fn handshake(
    ctx: Ctx,
    opts: SendOptions,
    source: Arc<Source>,
    to: AgentName,
    stream_id: StreamId,
    receivers: u32,
) -> Result<Handshake, Failed> {
    // Behind address translation a receiver's router lets a direct
    // connection in only if both connect at once: name a port for that (the
    // receiver knows whether it needs it), unless no direct connection will
    // be tried (PROTOCOL.md §2.7): after a direct path broke, the retries
    // take the relay unless this side takes nothing else.
    let punch = super::path::may_dial(&opts, &source, receivers as usize);
    let terms = Terms {
        kind: opts.kind(),
        size: source.total,
        size_known: source.size_known,
        resumes: source.origin(&ctx.name, &to),
        receivers,
        punch: Vec::new(),
    };
    offer_to(ctx, to, stream_id, terms, opts.peer_fingerprint, punch).await
}

/// Offers stream `stream_id` with `terms` to `to` on a connection of its
/// own (checking the receiver's key against its pin, and against `required`
/// if given) and waits for its accept and ticket. With `punch`, a port is
/// named for a simultaneous open (unless the broker is on this machine).
pub(crate) async fn offer_to(
    ctx: Ctx,
    to: AgentName,
    stream_id: StreamId,
    mut terms: Terms,
    required: Option<Fingerprint>,
    punch: bool,
) -> Result<Handshake, Failed> {
    // The lookup goes in the authentication's flight.
    let lookup = Message::Lookup { name: to.clone() };
    let mut conn = connect_then(&ctx, Role::Sender, Some(&lookup))
        .await
        .map_err(before)?;
    let punch = match ctx.seen.outside().filter(|_| punch) {
        Some(outside) => PunchPort::reserve(outside).ok(),
        None => None,
    };
    if let Some(p) = &punch {
        terms.punch = punch_to_bytes(&[p.outside]);
    }
    let receiver_key = peer_key(&ctx, &mut conn, &to, required)
        .await
        .map_err(before)?;
    let fp = receiver_key.fingerprint();
    let (size, identity) = (terms.size, Arc::clone(&ctx.identity));
    let (sender, receiver) = (ctx.name.clone(), to.clone());
    let (pending, offer) = tokio::task::spawn_blocking(move || {
        make_offer(OfferParams {
            identity: &identity,
            sender,
            receiver,
            receiver_key: &receiver_key,
            stream_id,
            terms,
            now_unix: now_unix(),
        })
    })
    .await
    .map_err(|e| before(e.into()))?
    .map_err(|e| before(AgentError::Offer(e)))?;
    let tid = pending.transfer_id();
    conn.writer
        .write(&Message::Offer {
            to: to.clone(),
            offer,
        })
        .await
        .map_err(|e| before(conn_error(&ctx, e)))?;
    let accept = match conn.reader.read_timeout(ANSWER_TIMEOUT).await {
        Ok(Some(Message::Accept {
            transfer_id,
            accept,
        })) if transfer_id == tid => accept,
        Ok(Some(Message::Refuse {
            transfer_id,
            reason,
        })) if transfer_id == tid => {
            return Err(before(AgentError::Refused {
                peer: to.to_string(),
                reason,
                size,
            }));
        }
        Ok(Some(Message::Error {
            code: ErrorCode::PeerOffline,
            detail,
        })) => {
            return Err(before(AgentError::PeerUnavailable {
                peer: to.to_string(),
                why: keyferry_common::text::escape(&detail),
            }));
        }
        Ok(Some(Message::Error { code, detail })) => {
            return Err(before(broker_error(code, detail)));
        }
        Ok(Some(_)) => {
            return Err(before(AgentError::Protocol(
                "unexpected answer to the offer",
            )));
        }
        Ok(None) => return Err(before(conn_error(&ctx, ConnError::Truncated))),
        Err(e) => return Err(before(conn_error(&ctx, e))),
    };
    let accepted = match pending.handle_accept(&accept) {
        Ok(accepted) => accepted,
        Err(e) => {
            // The receiver (if it was the receiver) waits for the stream on
            // the relay: it learns at once that none will come. An honest
            // broker sends the ticket right behind the accept; no broker
            // holds the error back for long.
            let tell = async {
                if let Ok(ticket) = await_ticket(&ctx, &mut conn, tid).await {
                    let reason = AbortReason::VerificationFailed;
                    super::path::abort_waiting(&ctx, &[(tid, ticket)], reason).await;
                }
            };
            let _ = tokio::time::timeout(TELL_WITHIN, tell).await;
            return Err(before(AgentError::Verification(format!(
                "the receiver's accept did not verify ({e})"
            ))));
        }
    };
    let ticket = await_ticket(&ctx, &mut conn, tid).await.map_err(after)?;
    Ok(Handshake {
        to,
        fp,
        accepted,
        ticket,
        punch: std::sync::Mutex::new(punch),
    })
}
