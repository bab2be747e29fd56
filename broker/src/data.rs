//! Admitting a plain data connection (PROTOCOL.md §2.5).
//!
//! Once a receiver accepts, the broker gives each side a one-time ticket over
//! its authenticated TLS connection. Each side then opens a plain TCP
//! connection whose first frame is `Redeem{transfer_id, ticket}`; the stream
//! itself is sealed end to end, so TLS around it would only encrypt it twice.
//! A ticket is compared in constant time, admits one connection, and is gone
//! when its transfer's wait ends ([`crate::tickets`]). A sender's connection
//! may redeem the sender tickets of several transfers of one stream (one
//! upload to several receivers). Either side of a transfer with one receiver
//! may spread its data connection over several instead, its lanes
//! (`RedeemLanes` on the first, `RedeemLane` on each other): the transfer gets
//! all of a side's, or none.
//! What the connections then carry is the relay's business
//! ([`crate::relay`], [`crate::fanout`]).

use std::sync::Arc;

use keyferry_common::ids::{StreamId, TransferId};
use keyferry_common::io::connection::{ConnError, FrameReader, FrameWriter};
use keyferry_common::name::AgentName;
use keyferry_common::wire::message::{ErrorCode, Message};
use tokio::net::TcpStream;

use crate::conns::ConnGuard;
use crate::error::SessionError;
use crate::feed;
use crate::metrics::Handshake;
use crate::relay::DataConn;
use crate::routes::Remote;
use crate::state::State;
use crate::tickets::{Further, LanesRedeemed, MAX_FANOUT, Redeemed};

/// The largest frame a data connection may send before it is admitted
/// (`Redeem` is 50 bytes).
const REDEEM_MAX: usize = 64;
/// How long an upload's further `Redeem`s may take to follow its first.
const MORE_REDEEMS: std::time::Duration = std::time::Duration::from_secs(1);
/// The largest refusal this broker sends on a data connection.
const REFUSAL_MAX: usize = 256;
/// How long a stream's further lanes may take to come after its first.
const MORE_LANES: std::time::Duration = std::time::Duration::from_secs(3);

/// Serves a connection that did not start with TLS: it must be a data
/// connection presenting a valid ticket before `deadline` (the handshake
/// timeout, counted from the accept).
pub async fn admit(
    state: Arc<State>,
    mut tcp: TcpStream,
    mut guard: ConnGuard,
    deadline: tokio::time::Instant,
) -> Result<(), SessionError> {
    let mut reader = FrameReader::new(&mut tcp, REDEEM_MAX);
    let first = tokio::select! {
        r = tokio::time::timeout_at(deadline, reader.read()) => {
            r.unwrap_or(Err(ConnError::Timeout(state.limits.handshake_timeout)))
        }
        () = guard.evicted() => {
            state.metrics.handshake_failed(Handshake::Evicted);
            return Err(SessionError::Refused(
                "a newer connection from the same address took its place before it redeemed a ticket".into(),
            ));
        }
    };
    let (tid, ticket) = match first {
        Ok(Some(Message::Redeem {
            transfer_id,
            ticket,
        })) => (transfer_id, ticket),
        Ok(Some(Message::RedeemLanes {
            transfer_id,
            ticket,
            lanes,
        })) => {
            let Some(redeemed) = state.tickets.redeem_lanes(&transfer_id, &ticket, lanes) else {
                drop(reader);
                state.metrics.handshake_failed(Handshake::Ticket);
                return Err(refuse(&mut tcp, ErrorCode::UnknownTransfer, UNKNOWN_LANES).await);
            };
            let conn = admitted(reader.into_parts().1, tcp, guard);
            if let LanesRedeemed::Sender(..) = redeemed {
                ready_to_receive(&conn.tcp);
            }
            let until = deadline.min(tokio::time::Instant::now() + MORE_LANES);
            // Without all of them, the stream cannot be carried: the
            // connections close, and the sender tries again. If the wait
            // just ended, the connections are dropped.
            match redeemed {
                LanesRedeemed::Sender(first, further) => {
                    let conn = gather(&state, conn, further, (lanes, until), "sender").await?;
                    let _ = state.tickets.redeem_upload(first, &[], &[], conn);
                }
                LanesRedeemed::Receiver(to, further) => {
                    let conn = gather(&state, conn, further, (lanes, until), "receiver").await?;
                    let _ = to.send(conn);
                }
            }
            return Ok(());
        }
        Ok(Some(Message::RedeemLane {
            transfer_id,
            ticket,
            lane,
        })) => {
            let conn = admitted(reader.into_parts().1, tcp, guard);
            if state.tickets.is_sender_ticket(&transfer_id, &ticket) {
                ready_to_receive(&conn.tcp);
            }
            if let Err(mut conn) = state.tickets.redeem_lane(&transfer_id, &ticket, lane, conn) {
                state.metrics.handshake_failed(Handshake::Ticket);
                return Err(refuse(&mut conn.tcp, ErrorCode::UnknownTransfer, UNKNOWN_LANES).await);
            }
            return Ok(());
        }
        Ok(None) | Err(ConnError::Io(_)) => return Ok(()),
        Ok(Some(_)) | Err(ConnError::Frame(_)) => {
            drop(reader);
            state.metrics.handshake_failed(Handshake::Protocol);
            return Err(refuse(
                &mut tcp,
                ErrorCode::Protocol,
                "neither TLS nor a data connection starting with Redeem",
            )
            .await);
        }
        Err(e) => {
            state.metrics.handshake_failed(Handshake::Timeout);
            return Err(e.into());
        }
    };
    let unknown = "no transfer waits for this ticket (unknown, used or expired)";
    // A data connection that ends here: a stored upload or delivery.
    if let Some(to) = state.handoffs.redeem(&tid, &ticket) {
        let _ = to.send(admitted(reader.into_parts().1, tcp, guard));
        return Ok(());
    }
    match state.tickets.redeem(&tid, &ticket) {
        None => {
            // Not ours: perhaps a routed transfer's ticket, of an upload
            // whose receivers are all on other brokers (crate::feed).
            let now = std::time::Instant::now();
            let Some(first) = state.routes.take(&tid, &ticket, now) else {
                drop(reader);
                state.metrics.handshake_failed(Handshake::Ticket);
                return Err(refuse(&mut tcp, ErrorCode::UnknownTransfer, unknown).await);
            };
            let Some(all) = more_of_upload(&mut reader, deadline).await else {
                return Ok(());
            };
            let (stream, from) = (first.stream, first.from.clone());
            let (local, mut remote) = split(&state, &all, stream, &from);
            remote.insert(0, first);
            if !local.is_empty() {
                // Tickets of this broker's receivers go first.
                for r in remote {
                    state.routes.restore(r);
                }
                drop(reader);
                state.metrics.handshake_failed(Handshake::Ticket);
                return Err(refuse(&mut tcp, ErrorCode::UnknownTransfer, unknown).await);
            }
            let conn = admitted(reader.into_parts().1, tcp, guard);
            feed::upload(state, conn, remote).await;
            Ok(())
        }
        Some(Redeemed::Receiver(to)) => {
            // If the wait just ended, the connection is dropped, which is its answer.
            let _ = to.send(admitted(reader.into_parts().1, tcp, guard));
            Ok(())
        }
        Some(Redeemed::Sender(first)) => {
            // An upload may redeem the sender tickets of several transfers of
            // one stream, frame after frame; its stream follows them.
            // A sender writes all its `Redeem`s and its stream's first frame
            // at once; one that sends nothing more for a moment has redeemed
            // what it had.
            let Some(all) = more_of_upload(&mut reader, deadline).await else {
                return Ok(());
            };
            let (local, remote) = split(&state, &all, first.stream(), first.from());
            let conn = admitted(reader.into_parts().1, tcp, guard);
            let remote_tids: Vec<TransferId> = remote.iter().map(|r| r.tid).collect();
            match state
                .tickets
                .redeem_upload(first, &local, &remote_tids, conn)
            {
                Ok(feeds) => {
                    if let Some(hub) = feeds {
                        for group in feed::by_broker(remote) {
                            tokio::spawn(feed::join(Arc::clone(&state), group, hub.clone()));
                        }
                    }
                    Ok(())
                }
                Err(mut conn) => {
                    for r in remote {
                        state.routes.restore(r);
                    }
                    state.metrics.handshake_failed(Handshake::Ticket);
                    Err(refuse(&mut conn.tcp, ErrorCode::UnknownTransfer, unknown).await)
                }
            }
        }
    }
}

/// Gives a sender's lane its large receive buffer as soon as its ticket is
/// known good: the sender streams at once, and its segments wait here until
/// the relay starts (the receiver's side may still be coming). Set only
/// after that wait, the buffer was set on a connection whose default one
/// had filled, and the kernel kept its window at about 80 KiB for the rest
/// of the transfer (measured: 2 MB/s instead of 20 on a 150 ms path).
fn ready_to_receive(tcp: &TcpStream) {
    let _ = keyferry_common::io::tcp::lane_in(tcp);
}

/// The refusal of a lane whose ticket is no good.
const UNKNOWN_LANES: &str = "no transfer waits for this ticket on several connections (unknown, used, expired, or its place taken)";

/// The first of one side's `n` lanes with the others (numbered 1 to
/// `n − 1`), once all are there; an error (counted) if they are not by
/// `until`.
async fn gather(
    state: &State,
    mut first: DataConn,
    mut further: Further<DataConn>,
    (n, until): (u8, tokio::time::Instant),
    side: &str,
) -> Result<DataConn, SessionError> {
    let want = usize::from(n) - 1;
    while further.held.len() < want {
        match tokio::time::timeout_at(until, further.arriving.recv()).await {
            Ok(Some(lane)) => further.held.push(lane),
            _ => {
                state.metrics.handshake_failed(Handshake::Timeout);
                return Err(SessionError::Refused(format!(
                    "not all of a {side}'s {n} data connections came"
                )));
            }
        }
    }
    further.held.sort_by_key(|(k, _)| *k);
    first.further = further.held.into_iter().map(|(_, c)| c).collect();
    Ok(first)
}

/// A data connection whose tickets were good: out of the unauthenticated
/// places, with the bytes read after its `Redeem`s.
fn admitted(leftover: Vec<u8>, tcp: TcpStream, mut guard: ConnGuard) -> DataConn {
    guard.admit();
    DataConn {
        tcp,
        leftover,
        guard,
        further: Vec::new(),
    }
}

/// The tickets an upload presents after its first, read for at most
/// [`MORE_REDEEMS`]; `None` if the connection failed.
async fn more_of_upload(
    reader: &mut FrameReader<&mut TcpStream>,
    deadline: tokio::time::Instant,
) -> Option<Vec<(TransferId, [u8; 32])>> {
    let mut all = Vec::new();
    let until = deadline.min(tokio::time::Instant::now() + MORE_REDEEMS);
    let more = tokio::time::timeout_at(until, more_redeems(reader, &mut all)).await;
    (!matches!(more, Ok(Err(_)))).then_some(all)
}

/// Parts `all` into this broker's tickets and the routed tickets of
/// transfers of stream `stream` from `from` that it handed out (each taken,
/// once, for the caller to put back if the upload is refused); a routed
/// ticket of another stream or sender is left where it was and stays among
/// the others, to be refused with them.
fn split(
    state: &State,
    all: &[(TransferId, [u8; 32])],
    stream: StreamId,
    from: &AgentName,
) -> (Vec<(TransferId, [u8; 32])>, Vec<Remote>) {
    let now = std::time::Instant::now();
    let (mut local, mut remote) = (Vec::new(), Vec::new());
    for (tid, ticket) in all {
        match state.routes.take(tid, ticket, now) {
            Some(r) if r.stream == stream && &r.from == from => remote.push(r),
            Some(r) => {
                state.routes.restore(r);
                local.push((*tid, *ticket));
            }
            None => local.push((*tid, *ticket)),
        }
    }
    (local, remote)
}

/// Reads the `Redeem` frames that follow a sender's first one (at most
/// [`MAX_FANOUT`] in all), stopping at the first frame that is not one and
/// leaving it unread in the buffer.
async fn more_redeems(
    reader: &mut FrameReader<&mut TcpStream>,
    all: &mut Vec<(TransferId, [u8; 32])>,
) -> Result<(), ConnError> {
    while all.len() + 1 < MAX_FANOUT {
        // A frame longer than a Redeem is the stream itself.
        match reader.peek_len().await? {
            Some(len) if len <= REDEEM_MAX => {}
            _ => return Ok(()),
        }
        match reader.peek_message().await? {
            Some(Message::Redeem {
                transfer_id,
                ticket,
            }) => {
                reader.consume_peeked();
                all.push((transfer_id, ticket));
            }
            _ => return Ok(()),
        }
    }
    Ok(())
}

/// Tells a data connection why it is refused; the error to log.
async fn refuse(tcp: &mut TcpStream, code: ErrorCode, detail: &str) -> SessionError {
    // The refusal is ours, not bound by what a data connection may send.
    let _ = FrameWriter::new(tcp, REFUSAL_MAX)
        .write(&Message::Error {
            code,
            detail: detail.to_owned(),
        })
        .await;
    SessionError::Refused(detail.to_owned())
}
