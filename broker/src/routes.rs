//! The sender tickets of routed transfers, as this broker handed them to its
//! senders (PROTOCOL.md §2.6): transfer id → the receiver's broker, the
//! ticket, the stream and the sender. A sender uploading one stream to
//! receivers on several brokers presents them here, on its upload to this
//! broker, and this broker feeds each of those brokers a copy
//! ([`crate::feed`]). Each is good for one redemption, compared in constant
//! time, and forgotten after a while. Plain state, no sockets.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use keyferry_common::ids::{StreamId, TransferId};
use keyferry_common::name::AgentName;
use keyferry_common::sync::lock;
use subtle::ConstantTimeEq as _;

/// Most routed tickets kept at once; the oldest go first beyond it.
const MOST: usize = 4096;

/// A routed transfer's sender ticket, at the broker that holds its receiver.
#[derive(Debug, Clone)]
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
}

/// Routed tickets waiting to be redeemed through this broker.
#[derive(Debug, Default)]
pub struct Routes {
    inner: Mutex<HashMap<TransferId, (Remote, Instant)>>,
}

impl Routes {
    /// Keeps `remote` until `now + keep`; entries past their time go.
    pub fn remember(&self, remote: Remote, now: Instant, keep: Duration) {
        let mut map = lock(&self.inner);
        map.retain(|_, (_, until)| *until > now);
        if map.len() >= MOST
            && let Some(oldest) = map.iter().min_by_key(|(_, (_, t))| *t).map(|(k, _)| *k)
        {
            map.remove(&oldest);
        }
        map.insert(remote.tid, (remote, now + keep));
    }

    /// The routed ticket of `tid` if `ticket` is it and it has not expired,
    /// once.
    pub fn take(&self, tid: &TransferId, ticket: &[u8; 32], now: Instant) -> Option<Remote> {
        let mut map = lock(&self.inner);
        let (remote, until) = map.get(tid)?;
        if !bool::from(remote.ticket.ct_eq(ticket)) || *until <= now {
            return None;
        }
        map.remove(tid).map(|(r, _)| r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_routed_ticket_is_taken_once_with_its_ticket_before_it_expires() {
        let routes = Routes::default();
        let t0 = Instant::now();
        let remote = |n: u8| Remote {
            tid: TransferId([n; 16]),
            address: "127.0.0.1:9".into(),
            ticket: [n; 32],
            stream: StreamId([1; 16]),
            from: AgentName::new("alice").unwrap(),
        };
        let keep = Duration::from_secs(10);
        routes.remember(remote(1), t0, keep);
        routes.remember(remote(2), t0, keep);
        assert!(routes.take(&TransferId([1; 16]), &[9; 32], t0).is_none());
        assert!(routes.take(&TransferId([1; 16]), &[1; 32], t0).is_some());
        assert!(routes.take(&TransferId([1; 16]), &[1; 32], t0).is_none());
        assert!(
            routes
                .take(&TransferId([2; 16]), &[2; 32], t0 + keep)
                .is_none()
        );
    }
}
