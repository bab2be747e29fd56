//! Plain data connections (PROTOCOL.md §2.5).
//!
//! Once a receiver accepts, the broker gives each side a one-time ticket over
//! its authenticated TLS connection. Each side then opens a plain TCP
//! connection whose first frame is `Redeem{transfer_id, ticket}`; the stream
//! itself is sealed end to end, so TLS around it would only encrypt it twice.
//! A ticket is compared in constant time, admits one connection, and is gone
//! when its transfer's wait ends (arrived, timed out or failed).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use keyferry_common::connection::{ConnError, FrameReader, FrameWriter};
use keyferry_common::crypto::random_array;
use keyferry_common::ids::TransferId;
use keyferry_common::message::{ErrorCode, Message};
use subtle::ConstantTimeEq as _;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::handler::HandlerError;
use crate::server::{ConnGuard, Shared};

/// The largest frame a data connection may send before it is admitted
/// (`Redeem` is 50 bytes).
const REDEEM_MAX: usize = 64;

/// An admitted data connection: the socket, what was read past `Redeem`, and
/// its place under the connection limits.
#[derive(Debug)]
pub struct DataConn {
    /// The socket.
    pub tcp: TcpStream,
    /// Bytes already read after the `Redeem` frame (the stream's start).
    pub leftover: Vec<u8>,
    /// Released when the relay ends.
    pub guard: ConnGuard,
}

/// One side's ticket and where its connection goes.
struct Slot {
    ticket: [u8; 32],
    to: Option<oneshot::Sender<DataConn>>,
}

/// Tickets of accepted transfers whose data connections have not all arrived.
#[derive(Debug, Default)]
pub struct Tickets {
    waiting: Arc<Mutex<HashMap<TransferId, [Slot; 2]>>>,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The broker's side of one transfer's tickets: the tickets to hand out and
/// the two connections to wait for. Dropping it withdraws both tickets.
#[derive(Debug)]
pub struct Issued {
    tid: TransferId,
    waiting: Arc<Mutex<HashMap<TransferId, [Slot; 2]>>>,
    /// The sender's ticket.
    pub sender_ticket: [u8; 32],
    /// The receiver's ticket.
    pub receiver_ticket: [u8; 32],
    sender: oneshot::Receiver<DataConn>,
    receiver: oneshot::Receiver<DataConn>,
}

impl Issued {
    /// Both data connections, sender's first; `None` if a ticket was
    /// withdrawn. The caller bounds the wait.
    pub async fn arrivals(&mut self) -> Option<(DataConn, DataConn)> {
        let (s, r) = tokio::join!(&mut self.sender, &mut self.receiver);
        Some((s.ok()?, r.ok()?))
    }
}

impl Drop for Issued {
    fn drop(&mut self) {
        lock(&self.waiting).remove(&self.tid);
    }
}

impl Tickets {
    /// Draws the two tickets of transfer `tid`; `None` if it already has some.
    pub fn issue(&self, tid: TransferId) -> Option<Issued> {
        let (sender_ticket, receiver_ticket) = (random_array(), random_array());
        let (s_tx, s_rx) = oneshot::channel();
        let (r_tx, r_rx) = oneshot::channel();
        let mut waiting = lock(&self.waiting);
        if waiting.contains_key(&tid) {
            return None;
        }
        waiting.insert(
            tid,
            [
                Slot {
                    ticket: sender_ticket,
                    to: Some(s_tx),
                },
                Slot {
                    ticket: receiver_ticket,
                    to: Some(r_tx),
                },
            ],
        );
        Some(Issued {
            tid,
            waiting: Arc::clone(&self.waiting),
            sender_ticket,
            receiver_ticket,
            sender: s_rx,
            receiver: r_rx,
        })
    }

    /// Takes the place of `ticket` for `tid`, once.
    fn redeem(&self, tid: &TransferId, ticket: &[u8; 32]) -> Option<oneshot::Sender<DataConn>> {
        let mut waiting = lock(&self.waiting);
        let slots = waiting.get_mut(tid)?;
        // Both compared, in constant time, whichever matches.
        let matches = slots.each_ref().map(|s| bool::from(s.ticket.ct_eq(ticket)));
        let slot = matches.iter().position(|m| *m)?;
        slots[slot].to.take()
    }

    /// How many transfers wait for data connections.
    pub fn len(&self) -> usize {
        lock(&self.waiting).len()
    }

    /// Whether no transfer waits for data connections.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Serves a connection that did not start with TLS: it must be a data
/// connection presenting a valid ticket before `deadline` (the handshake
/// timeout, counted from the accept).
pub async fn admit(
    shared: Arc<Shared>,
    mut tcp: TcpStream,
    mut guard: ConnGuard,
    deadline: tokio::time::Instant,
) -> Result<(), HandlerError> {
    let mut reader = FrameReader::new(&mut tcp, REDEEM_MAX);
    let first = tokio::select! {
        r = tokio::time::timeout_at(deadline, reader.read()) => {
            r.unwrap_or(Err(ConnError::Timeout(shared.limits.handshake_timeout)))
        }
        () = guard.evicted() => {
            return Err(HandlerError::Refused(
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
    let Some(to) = shared.tickets.redeem(&tid, &ticket) else {
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
async fn refuse(tcp: &mut TcpStream, code: ErrorCode, detail: &str) -> HandlerError {
    let _ = FrameWriter::new(tcp, REDEEM_MAX)
        .write(&Message::Error {
            code,
            detail: detail.to_owned(),
        })
        .await;
    HandlerError::Refused(detail.to_owned())
}
