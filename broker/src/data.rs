//! Admitting a plain data connection (PROTOCOL.md §2.5).
//!
//! Once a receiver accepts, the broker gives each side a one-time ticket over
//! its authenticated TLS connection. Each side then opens a plain TCP
//! connection whose first frame is `Redeem{transfer_id, ticket}`; the stream
//! itself is sealed end to end, so TLS around it would only encrypt it twice.
//! A ticket is compared in constant time, admits one connection, and is gone
//! when its transfer's wait ends ([`crate::tickets`]). A sender's connection
//! may redeem the sender tickets of several transfers of one stream (one
//! upload to several receivers). What the connection then carries is the
//! relay's business ([`crate::relay`], [`crate::fanout`]).

use std::sync::Arc;

use keyferry_common::ids::TransferId;
use keyferry_common::io::connection::{ConnError, FrameReader, FrameWriter};
use keyferry_common::wire::message::{ErrorCode, Message};
use tokio::net::TcpStream;

use crate::conns::ConnGuard;
use crate::error::SessionError;
use crate::metrics::Handshake;
use crate::relay::DataConn;
use crate::state::State;
use crate::tickets::{MAX_FANOUT, Redeemed};

/// The largest frame a data connection may send before it is admitted
/// (`Redeem` is 50 bytes).
const REDEEM_MAX: usize = 64;
/// How long an upload's further `Redeem`s may take to follow its first.
const MORE_REDEEMS: std::time::Duration = std::time::Duration::from_secs(1);

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
    match state.tickets.redeem(&tid, &ticket) {
        None => {
            drop(reader);
            state.metrics.handshake_failed(Handshake::Ticket);
            Err(refuse(&mut tcp, ErrorCode::UnknownTransfer, unknown).await)
        }
        Some(Redeemed::Receiver(to)) => {
            let leftover = reader.into_parts().1;
            guard.admit();
            // If the wait just ended, the connection is dropped, which is its answer.
            let _ = to.send(DataConn {
                tcp,
                leftover,
                guard,
            });
            Ok(())
        }
        Some(Redeemed::Sender(first)) => {
            // An upload may redeem the sender tickets of several transfers of
            // one stream, frame after frame; its stream follows them.
            // A sender writes all its `Redeem`s and its stream's first frame
            // at once; one that sends nothing more for a moment has redeemed
            // what it had.
            let mut all = Vec::new();
            let until = deadline.min(tokio::time::Instant::now() + MORE_REDEEMS);
            let more = tokio::time::timeout_at(until, more_redeems(&mut reader, &mut all)).await;
            if matches!(more, Ok(Err(_))) {
                return Ok(());
            }
            let leftover = reader.into_parts().1;
            guard.admit();
            let conn = DataConn {
                tcp,
                leftover,
                guard,
            };
            match state.tickets.redeem_upload(first, &all, conn) {
                Ok(()) => Ok(()),
                Err(mut conn) => {
                    state.metrics.handshake_failed(Handshake::Ticket);
                    Err(refuse(&mut conn.tcp, ErrorCode::UnknownTransfer, unknown).await)
                }
            }
        }
    }
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
    let _ = FrameWriter::new(tcp, REDEEM_MAX)
        .write(&Message::Error {
            code,
            detail: detail.to_owned(),
        })
        .await;
    SessionError::Refused(detail.to_owned())
}
