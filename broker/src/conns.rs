//! Places under the connection limits: a permit from the global cap, a place
//! among an address's connections, and, until the connection authenticated,
//! one of the address's few unauthenticated places (PROTOCOL.md §2.4).
//!
//! When an address's unauthenticated places are full, a newer connection from
//! it cuts the oldest one still in its handshake, so idle handshakes can never
//! lock out the agents behind an address. Plain state: no sockets.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use keyferry_common::sync::lock;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

/// One address's connections: how many there are in all, and which of them
/// have not authenticated yet (oldest first, each with the means to cut it).
#[derive(Debug, Default)]
struct PerIp {
    total: usize,
    pending: VecDeque<(u64, oneshot::Sender<()>)>,
}

/// Every connection's place, by address.
#[derive(Debug)]
pub struct Conns {
    permits: Arc<Semaphore>,
    per_ip: Mutex<HashMap<IpAddr, PerIp>>,
    next_id: AtomicU64,
    max_per_ip: usize,
    max_unauthenticated_per_ip: usize,
}

/// The address outbound connections are counted under: no connection ever
/// comes from it.
const OUTBOUND: IpAddr = IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);

/// Why a new connection gets no place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoPlace {
    /// The broker holds its maximum of connections.
    Total,
    /// The address holds its maximum of connections.
    PerIp,
}

impl Conns {
    /// Limits: `max` in all, `max_per_ip` per address, of which
    /// `max_unauthenticated_per_ip` may be unauthenticated.
    pub fn new(max: usize, max_per_ip: usize, max_unauthenticated_per_ip: usize) -> Arc<Self> {
        Arc::new(Self {
            permits: Arc::new(Semaphore::new(max.max(1))),
            per_ip: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            max_per_ip: max_per_ip.max(1),
            max_unauthenticated_per_ip: max_unauthenticated_per_ip.max(1),
        })
    }

    /// A place for a new connection from `ip`, unauthenticated.
    pub fn admit_new(self: &Arc<Self>, ip: IpAddr) -> Result<ConnGuard, NoPlace> {
        let permit = Arc::clone(&self.permits)
            .try_acquire_owned()
            .map_err(|_| NoPlace::Total)?;
        let mut map = lock(&self.per_ip);
        let entry = map.entry(ip).or_default();
        if entry.total >= self.max_per_ip {
            return Err(NoPlace::PerIp);
        }
        if entry.pending.len() >= self.max_unauthenticated_per_ip
            && let Some((_, cut)) = entry.pending.pop_front()
        {
            let _ = cut.send(());
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (cut, eviction) = oneshot::channel();
        entry.total += 1;
        entry.pending.push_back((id, cut));
        Ok(ConnGuard {
            _permit: permit,
            conns: Arc::clone(self),
            ip,
            id,
            eviction: Some(eviction),
        })
    }

    /// A place for a connection this broker opens itself (a feed to another
    /// broker of its cluster): under the global cap only, counted apart from
    /// any address, and already admitted.
    pub fn admit_outbound(self: &Arc<Self>) -> Result<ConnGuard, NoPlace> {
        let permit = Arc::clone(&self.permits)
            .try_acquire_owned()
            .map_err(|_| NoPlace::Total)?;
        let mut map = lock(&self.per_ip);
        map.entry(OUTBOUND).or_default().total += 1;
        Ok(ConnGuard {
            _permit: permit,
            conns: Arc::clone(self),
            ip: OUTBOUND,
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            eviction: None,
        })
    }

    /// Connections now open in all, and how many of them are not yet
    /// authenticated (for the metrics).
    pub fn totals(&self) -> (usize, usize) {
        let map = lock(&self.per_ip);
        map.values()
            .fold((0, 0), |(t, p), e| (t + e.total, p + e.pending.len()))
    }

    /// Connections now open from `ip` (for tests and logs).
    pub fn count(&self, ip: IpAddr) -> (usize, usize) {
        lock(&self.per_ip)
            .get(&ip)
            .map_or((0, 0), |e| (e.total, e.pending.len()))
    }
}

/// A connection's place under the connection limits, released when dropped.
///
/// Until [`ConnGuard::admit`] (after authentication, or a valid ticket) the
/// connection also holds one of its address's unauthenticated places, and a
/// newer connection from that address may cut it ([`ConnGuard::evicted`]). A
/// data connection hands its guard on to the relay that uses the connection.
#[derive(Debug)]
pub struct ConnGuard {
    _permit: OwnedSemaphorePermit,
    conns: Arc<Conns>,
    ip: IpAddr,
    id: u64,
    /// Fires when a newer connection from the same address took our
    /// unauthenticated place; `None` once admitted.
    eviction: Option<oneshot::Receiver<()>>,
}

impl ConnGuard {
    /// Resolves when this connection, still unauthenticated, was cut to make
    /// room for a newer one from its address; never once admitted.
    pub async fn evicted(&mut self) {
        match &mut self.eviction {
            Some(rx) => {
                if rx.await.is_err() {
                    // The table let go of us without a cut: keep waiting.
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    }

    /// The connection authenticated (or redeemed a ticket): it leaves the
    /// unauthenticated places and can no longer be evicted.
    pub fn admit(&mut self) {
        if self.eviction.take().is_some() {
            let mut map = lock(&self.conns.per_ip);
            if let Some(entry) = map.get_mut(&self.ip) {
                entry.pending.retain(|(id, _)| *id != self.id);
            }
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut map = lock(&self.conns.per_ip);
        if let Some(entry) = map.get_mut(&self.ip) {
            entry.total -= 1;
            entry.pending.retain(|(id, _)| *id != self.id);
            if entry.total == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[tokio::test]
    async fn the_oldest_unauthenticated_place_goes_to_a_newer_connection() {
        let conns = Conns::new(100, 10, 3);
        let mut first = conns.admit_new(IP).unwrap();
        let mut second = conns.admit_new(IP).unwrap();
        second.admit();
        let _third = conns.admit_new(IP).unwrap();
        let _fourth = conns.admit_new(IP).unwrap();
        assert_eq!(conns.count(IP), (4, 3));
        // A fifth cuts the oldest still unauthenticated (the first), never
        // the admitted second.
        let _fifth = conns.admit_new(IP).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(1), first.evicted())
            .await
            .unwrap();
        let not_cut =
            tokio::time::timeout(std::time::Duration::from_millis(50), second.evicted()).await;
        assert!(not_cut.is_err());
        drop(first);
        assert_eq!(conns.count(IP), (4, 3));
    }

    #[test]
    fn the_per_address_and_total_limits_refuse_the_excess() {
        let conns = Conns::new(100, 2, 2);
        let (a, b) = (conns.admit_new(IP).unwrap(), conns.admit_new(IP).unwrap());
        assert_eq!(conns.admit_new(IP).unwrap_err(), NoPlace::PerIp);
        drop((a, b));
        assert_eq!(conns.count(IP), (0, 0));
        let conns = Conns::new(1, 10, 10);
        let _a = conns.admit_new(IP).unwrap();
        assert_eq!(conns.admit_new(IP).unwrap_err(), NoPlace::Total);
    }
}
