//! One-time tickets for data connections that end at the broker itself
//! (PROTOCOL.md §2.8): a sender's upload of a stored transfer, and a
//! receiver's delivery of one. A ticket is 32 random bytes given over the
//! agent's authenticated TLS connection, compared in constant time, good for
//! one connection within the handshake timeout. State only: the admitted
//! connection goes to the waiting task through a oneshot channel.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use keyferry_common::crypto::random_array;
use keyferry_common::ids::TransferId;
use keyferry_common::sync::lock;
use subtle::ConstantTimeEq as _;
use tokio::sync::oneshot;

use crate::relay::DataConn;

struct Waiting {
    ticket: [u8; 32],
    until: Instant,
    to: oneshot::Sender<DataConn>,
}

/// Tickets waiting for their data connection.
#[derive(Default)]
pub struct Handoffs {
    waiting: Mutex<HashMap<TransferId, Waiting>>,
}

impl std::fmt::Debug for Handoffs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handoffs").finish_non_exhaustive()
    }
}

/// At most this many tickets wait at once; older expired ones go first.
const MOST: usize = 4096;

impl Handoffs {
    /// A fresh ticket for `tid`, valid for `within`; the connection that
    /// redeems it arrives on the receiver returned. `None` if one is
    /// already waiting for `tid`, or too many wait.
    pub fn issue(
        &self,
        tid: TransferId,
        within: Duration,
    ) -> Option<([u8; 32], oneshot::Receiver<DataConn>)> {
        let mut w = lock(&self.waiting);
        let now = Instant::now();
        w.retain(|_, t| t.until > now && !t.to.is_closed());
        if w.len() >= MOST || w.contains_key(&tid) {
            return None;
        }
        let ticket = random_array();
        let (to, from) = oneshot::channel();
        let until = now + within;
        w.insert(tid, Waiting { ticket, until, to });
        Some((ticket, from))
    }

    /// Takes the wait for `tid` if `ticket` is its ticket (constant-time
    /// compare) and it has not expired: where its connection goes.
    pub fn redeem(&self, tid: &TransferId, ticket: &[u8; 32]) -> Option<oneshot::Sender<DataConn>> {
        let mut w = lock(&self.waiting);
        let ok = w
            .get(tid)
            .is_some_and(|t| bool::from(t.ticket.ct_eq(ticket)) && t.until > Instant::now());
        ok.then(|| w.remove(tid)).flatten().map(|t| t.to)
    }
}
