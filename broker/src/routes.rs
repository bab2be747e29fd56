//! The sender tickets of routed transfers, as this broker handed them to its
//! senders (PROTOCOL.md §2.6): transfer id and sender → the receiver's
//! broker, the ticket and the stream. A sender uploading one stream to
//! receivers on several brokers presents them here, on its upload to this
//! broker, and this broker feeds each of those brokers a copy
//! ([`crate::feed`]). Each is good for one redemption, compared in constant
//! time, and forgotten after a while; a transfer id another sender also used
//! is another entry, so no sender can displace another's. Plain state, no
//! sockets.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use keyferry_common::ids::{StreamId, TransferId};
use keyferry_common::name::AgentName;
use keyferry_common::sync::lock;
use subtle::ConstantTimeEq as _;

/// Most routed tickets kept at once; the oldest go first beyond it.
pub const MOST: usize = 4096;

/// A routed transfer's sender ticket, at the broker that holds its receiver.
#[derive(Clone)]
pub struct Remote {
    /// The transfer.
    pub tid: TransferId,
    /// Where its receiver's broker takes data connections.
    pub address: String,
    /// The sender ticket that broker issued.
    pub ticket: [u8; 32],
    /// The transfer's stream.
    pub stream: StreamId,
    /// Its sender.
    pub from: AgentName,
    /// Until when it may be redeemed here.
    until: Instant,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the ticket.
        f.debug_struct("Remote")
            .field("tid", &self.tid)
            .field("address", &self.address)
            .field("from", &self.from)
            .finish_non_exhaustive()
    }
}

impl Remote {
    /// The routed ticket of `tid` from `from`, to redeem at `address`.
    pub fn new(
        tid: TransferId,
        address: String,
        ticket: [u8; 32],
        stream: StreamId,
        from: AgentName,
    ) -> Self {
        Self {
            tid,
            address,
            ticket,
            stream,
            from,
            until: Instant::now(),
        }
    }
}

/// Routed tickets waiting to be redeemed through this broker.
#[derive(Default)]
pub struct Routes {
    inner: Mutex<HashMap<(TransferId, AgentName), Remote>>,
}

impl std::fmt::Debug for Routes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routes")
            .field("kept", &lock(&self.inner).len())
            .finish()
    }
}

impl Routes {
    /// Keeps `remote` until `now + keep` (the same sender's same transfer
    /// id again replaces it); entries past their time go.
    pub fn remember(&self, mut remote: Remote, now: Instant, keep: Duration) {
        remote.until = now + keep;
        let mut map = lock(&self.inner);
        map.retain(|_, r| r.until > now);
        if map.len() >= MOST
            && let Some(oldest) = map
                .iter()
                .min_by_key(|(_, r)| r.until)
                .map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
        map.insert((remote.tid, remote.from.clone()), remote);
    }

    /// The routed ticket of `tid` if `ticket` is one kept for it and not
    /// expired, taken (once).
    pub fn take(&self, tid: &TransferId, ticket: &[u8; 32], now: Instant) -> Option<Remote> {
        let mut map = lock(&self.inner);
        let key = map
            .iter()
            .find(|((t, _), r)| t == tid && bool::from(r.ticket.ct_eq(ticket)) && r.until > now)
            .map(|(k, _)| k.clone())?;
        map.remove(&key)
    }

    /// Puts back what [`Self::take`] took for an upload that was then
    /// refused, unless it was kept again meanwhile.
    pub fn restore(&self, remote: Remote) {
        let mut map = lock(&self.inner);
        map.entry((remote.tid, remote.from.clone()))
            .or_insert(remote);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(n: u8, from: &str) -> Remote {
        Remote::new(
            TransferId([n; 16]),
            "127.0.0.1:9".into(),
            [n; 32],
            StreamId([1; 16]),
            AgentName::new(from).unwrap(),
        )
    }

    #[test]
    fn a_routed_ticket_is_taken_once_with_its_ticket_before_it_expires() {
        let routes = Routes::default();
        let t0 = Instant::now();
        let keep = Duration::from_secs(10);
        routes.remember(remote(1, "alice"), t0, keep);
        routes.remember(remote(2, "alice"), t0, keep);
        assert!(routes.take(&TransferId([1; 16]), &[9; 32], t0).is_none());
        let taken = routes.take(&TransferId([1; 16]), &[1; 32], t0).unwrap();
        assert!(routes.take(&TransferId([1; 16]), &[1; 32], t0).is_none());
        routes.restore(taken);
        assert!(routes.take(&TransferId([1; 16]), &[1; 32], t0).is_some());
        assert!(
            routes
                .take(&TransferId([2; 16]), &[2; 32], t0 + keep)
                .is_none()
        );
        assert!(!format!("{:?}", remote(3, "bob")).contains("3, 3, 3"));
    }

    #[test]
    fn another_sender_with_the_same_transfer_id_displaces_nothing() {
        let routes = Routes::default();
        let (t0, keep) = (Instant::now(), Duration::from_secs(10));
        routes.remember(remote(1, "alice"), t0, keep);
        let mut mallory = remote(1, "mallory");
        mallory.ticket = [7; 32];
        routes.remember(mallory, t0, keep);
        let alice = routes.take(&TransferId([1; 16]), &[1; 32], t0).unwrap();
        assert_eq!(alice.from.as_str(), "alice");
        assert!(routes.take(&TransferId([1; 16]), &[7; 32], t0).is_some());
    }
}
