//! How this agent looks from outside: the address its broker sees its
//! connections come from (`Welcome.seen`, PROTOCOL.md §2.7). When that is
//! none of this machine's own addresses, a router translates them, and a
//! direct connection needs both agents to connect at once (a simultaneous
//! open) through the mappings their routers keep.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use keyferry_common::sync::lock;

/// The address the broker last reported, shared by every connection of
/// this agent.
#[derive(Debug, Clone, Default)]
pub struct Seen(Arc<Mutex<Option<IpAddr>>>);

impl Seen {
    /// Records a `Welcome`'s `seen` (`IP:PORT`); anything unparsable is
    /// "unknown".
    pub fn set(&self, seen: &str) {
        let ip = seen
            .parse::<SocketAddr>()
            .ok()
            .map(|a| a.ip().to_canonical());
        *lock(&self.0) = ip;
    }

    /// The address the broker sees, unless it is a loopback, unspecified or
    /// multicast one (the broker is on this machine, or says nonsense).
    pub fn outside(&self) -> Option<IpAddr> {
        let ip = (*lock(&self.0))?;
        (!(ip.is_loopback() || ip.is_unspecified() || ip.is_multicast())).then_some(ip)
    }

    /// [`Self::outside`], if it is none of this machine's own addresses (so
    /// a router translates this agent's addresses).
    pub fn translated(&self) -> Option<IpAddr> {
        let ip = self.outside()?;
        let own = if_addrs::get_if_addrs().ok()?;
        (!own.iter().any(|i| i.ip().to_canonical() == ip)).then_some(ip)
    }
}
