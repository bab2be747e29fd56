//! Admitting a plain data connection (PROTOCOL.md §2.5).
//!
//! Once a receiver accepts, the broker gives each side a one-time ticket over
//! its authenticated TLS connection. Each side then opens a plain TCP
//! connection whose first frame is `Redeem{transfer_id, ticket}`; the stream
//! itself is sealed end to end, so TLS around it would only encrypt it twice.
//! A ticket is compared in constant time, admits one connection, and is gone
//! when its transfer's wait ends ([`crate::transfers`]). What the connection
//! then carries is the relay's business ([`crate::relay`]).

use std::sync::Arc;

use keyferry_common::io::connection::{ConnError, FrameReader, FrameWriter};
use keyferry_common::wire::message::{ErrorCode, Message};
use tokio::net::TcpStream;

use crate::conns::ConnGuard;
use crate::error::SessionError;
use crate::relay::DataConn;
use crate::state::State;

/// The largest frame a data connection may send before it is admitted
/// (`Redeem` is 50 bytes).
const REDEEM_MAX: usize = 64;

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
            return Err(SessionError::Refused(
                "a newer connection from the same address took its place before it redeemed a ticket".into(),
            ));
        }
    };
    let leftover = reader.into_parts().1;
    let (tid, ticket) = match first {
        Ok(Some(Message::Redeem {
            transfer_id,
            ticket,
        })) => (transfer_id, ticket),
        Ok(None) | Err(ConnError::Io(_)) => return Ok(()),
        Ok(Some(_)) | Err(ConnError::Frame(_)) => {
            return Err(refuse(
                &mut tcp,
                ErrorCode::Protocol,
                "neither TLS nor a data connection starting with Redeem",
            )
            .await);
        }
        Err(e) => return Err(e.into()),
    };
    let Some(to) = state.transfers.redeem(&tid, &ticket) else {
        return Err(refuse(
            &mut tcp,
            ErrorCode::UnknownTransfer,
            "no transfer waits for this ticket (unknown, used or expired)",
        )
        .await);
    };
    guard.admit();
    // If the wait just ended, the connection is dropped, which is its answer.
    let _ = to.send(DataConn {
        tcp,
        leftover,
        guard,
    });
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
