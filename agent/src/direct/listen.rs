//! The receiver's side of a direct connection (PROTOCOL.md §2.7): one
//! listening socket for the life of the receiver, the addresses it announces
//! in an accept, and the accepted transfers waiting for their sender to
//! connect. A connection is handed to a transfer only after it proved,
//! under that transfer's direct key and over a challenge of ours, that it
//! comes from that transfer's sender; anything else (a stranger who
//! connected first, a copied or foreign proof, silence) is closed after at
//! most [`super::PROOF_TIMEOUT`] and changes nothing for the transfer.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use keyferry_common::crypto::keys::MacKey;
use keyferry_common::crypto::random_array;
use keyferry_common::handshake::Kind;
use keyferry_common::handshake::direct::{
    Challenges, DirectTerms, LaneProof, MAX_CANDIDATES, MAX_LANES, dialable, receiver_proof,
};
use keyferry_common::ids::TransferId;
use keyferry_common::io::connection::Connection;
use keyferry_common::io::task::AbortOnDrop;
use keyferry_common::sync::lock;
use keyferry_common::wire::message::Message;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};

use super::PROOF_TIMEOUT;
use super::lanes::{Arrival, Gathering};
use super::punch::{self, PunchPort};
use super::seen::Seen;
use crate::client::DataConn;

/// Most connections proving themselves at once; any more are closed at once
/// (so a sender dials early lanes to one address only).
const MAX_PROVING: usize = 16;
/// Largest frame on a direct connection before it is proved (a
/// `DirectHello` is 49 bytes, a `DirectLanes` 34).
const MAX_FIRST_FRAME: usize = 64;

/// A transfer waiting for its sender's direct connections.
#[derive(Debug)]
struct Waiter {
    key: Arc<MacKey>,
    arrivals: mpsc::UnboundedSender<Arrival>,
    /// Which connections proved themselves: bit 0 the first, bit `n`
    /// further number `n`.
    proved: u16,
}

type Waiters = Arc<Mutex<HashMap<TransferId, Waiter>>>;

/// The receiver's direct listener.
#[derive(Debug, Clone)]
pub struct Listener {
    port: u16,
    ipv6: bool,
    waiters: Waiters,
    /// Stops the accepting task (and frees the port) with the last listener.
    _task: Arc<AbortOnDrop>,
}

/// A listening socket on `addr`; an IPv6 one takes IPv4 connections too.
fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(128)?;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}

impl Listener {
    /// Listens on every interface, on `port` (0: one the system picks), and
    /// serves it from a task of its own until the last clone is dropped.
    pub fn open(port: u16) -> io::Result<Self> {
        // One socket for both families where the system has IPv6 (told to
        // take IPv4 too, whatever the system's default), else IPv4 only.
        let (socket, ipv6) = match bind(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port)) {
            Ok(s) => (s, true),
            Err(_) => (
                bind(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port))?,
                false,
            ),
        };
        let port = socket.local_addr()?.port();
        let waiters: Waiters = Arc::default();
        let task = tokio::spawn(serve(socket, Arc::clone(&waiters)));
        Ok(Self {
            port,
            ipv6,
            waiters,
            _task: Arc::new(AbortOnDrop(task)),
        })
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The addresses to announce, best first, at most [`MAX_CANDIDATES`]:
    /// the one this machine reaches `broker` from (the likeliest to be
    /// reachable by a peer of that broker; loopback when the broker is on
    /// this machine), then every other interface address that is neither
    /// loopback nor link-local.
    pub async fn candidates(&self, broker: &str) -> Vec<SocketAddr> {
        let first = route_source(broker).await;
        let mut ips: Vec<IpAddr> = first.map(|ip| ip.to_canonical()).into_iter().collect();
        if let Ok(interfaces) = if_addrs::get_if_addrs() {
            for i in interfaces {
                if !(i.is_loopback() || i.is_link_local()) {
                    ips.push(i.ip());
                }
            }
        }
        let mut out: Vec<SocketAddr> = Vec::new();
        for ip in ips {
            let usable = self.ipv6 || ip.is_ipv4();
            let addr = SocketAddr::new(ip, self.port);
            if usable && !ip.is_unspecified() && !out.contains(&addr) {
                out.push(addr);
            }
        }
        out.truncate(MAX_CANDIDATES);
        out
    }

    /// Waits for transfer `tid`'s sender to connect and prove itself with
    /// `key`; the wait ends when the returned receiver is dropped.
    pub fn expect(&self, tid: TransferId, key: Arc<MacKey>) -> Expected {
        let (tx, rx) = mpsc::unbounded_channel();
        let waiter = Waiter {
            key,
            arrivals: tx,
            proved: 0,
        };
        lock(&self.waiters).insert(tid, waiter);
        Expected {
            tid,
            conn: Gathering::new(rx),
            waiters: Arc::clone(&self.waiters),
            punching: None,
        }
    }
}

/// A simultaneous open the receiver tries beside its listener: from a port
/// named in its accept to the sender's named addresses.
#[derive(Debug)]
pub struct Punch {
    port: PunchPort,
    to: Vec<SocketAddr>,
}

/// What a receiver's accept says about direct connections for a stream of
/// `kind`: nothing without a listener or for a chat stream (those take the
/// relay), else the mode of `--direct` and the listener's addresses. When
/// the sender named addresses for a simultaneous open (`punch_to`), a
/// router translates this receiver's addresses (`seen`) and some of those
/// addresses may be tried, a port of its own for that too, named with its
/// outside address as a simultaneous-open address, and the plan.
pub async fn terms_for(
    listener: Option<&Listener>,
    opt: super::DirectOpt,
    kind: Kind,
    broker: &str,
    (punch_to, seen): (&[SocketAddr], &Seen),
) -> (DirectTerms, Option<Punch>) {
    let Some(l) = listener.filter(|_| kind != Kind::Chat) else {
        return (DirectTerms::never(), None);
    };
    let mut candidates = l.candidates(broker).await;
    let mut plan = None;
    if opt != super::DirectOpt::Never
        && !punch_to.is_empty()
        && let Some(outside) = seen.translated()
    {
        let to: Vec<SocketAddr> = punch_targets(punch_to, &candidates)
            .filter(|a| a.is_ipv4() == outside.is_ipv4())
            .collect();
        if !to.is_empty()
            && let Ok(port) = PunchPort::reserve(outside)
        {
            candidates.truncate(MAX_CANDIDATES - 1);
            plan = Some(Punch { port, to });
        }
    }
    let terms = DirectTerms {
        mode: opt.mode(),
        candidates,
        punch: plan.iter().map(|p| p.port.outside).collect(),
    };
    (terms, plan)
}

/// The sender's `punch` addresses this receiver connects to: worth a
/// connection (see [`dialable`]) and none of this machine's own — not
/// loopback, not link-local, not one of the addresses it names itself
/// (`own`) — so a sender cannot make it knock on itself.
fn punch_targets<'a>(
    punch_to: &'a [SocketAddr],
    own: &'a [SocketAddr],
) -> impl Iterator<Item = SocketAddr> + 'a {
    let mut seen = Vec::new();
    punch_to.iter().filter_map(dialable).filter(move |a| {
        // Each once (`::ffff:X` is X).
        if seen.contains(a) {
            return false;
        }
        seen.push(*a);
        let ip = a.ip();
        let link_local = match ip {
            IpAddr::V4(v4) => v4.is_link_local(),
            IpAddr::V6(v6) => v6.is_unicast_link_local(),
        };
        !(ip.is_loopback() || link_local || own.iter().any(|o| o.ip().to_canonical() == ip))
    })
}

/// The source address this machine's routes give a packet to `broker`
/// (a UDP socket's connect sends nothing).
async fn route_source(broker: &str) -> Option<IpAddr> {
    let target = super::resolve(broker).await?;
    let any: IpAddr = if target.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let socket = tokio::net::UdpSocket::bind(SocketAddr::new(any, 0))
        .await
        .ok()?;
    socket.connect(target).await.ok()?;
    Some(socket.local_addr().ok()?.ip())
}

/// One transfer's wait for its direct connection.
#[derive(Debug)]
pub struct Expected {
    tid: TransferId,
    conn: Gathering,
    waiters: Waiters,
    /// The simultaneous open, while it runs.
    punching: Option<AbortOnDrop>,
}

impl Expected {
    /// Runs `plan` beside the wait, for at most the simultaneous open's
    /// window, and at most one connection per target: it must prove itself
    /// as one the listener accepted (a target whose connection does not is
    /// not tried again); all stops when the wait ends (this is dropped).
    pub fn punch(&mut self, plan: Punch) {
        let waiters = Arc::clone(&self.waiters);
        let task = tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + punch::RECEIVER_WINDOW;
            let port = Arc::new(plan.port);
            let mut tries = tokio::task::JoinSet::new();
            for to in plan.to {
                let (port, waiters) = (Arc::clone(&port), Arc::clone(&waiters));
                tries.spawn(async move {
                    if let Ok(tcp) = port.connect(to, deadline).await {
                        let _ = tokio::time::timeout(PROOF_TIMEOUT, prove(tcp, &waiters)).await;
                    }
                });
            }
            while tries.join_next().await.is_some() {}
        });
        self.punching = Some(AbortOnDrop(task));
    }

    /// The proved connection (all of the stream's, if it takes several);
    /// never returns if none comes. Safe to cancel.
    pub async fn connection(&mut self) -> DataConn {
        let conn = self.conn.connection().await;
        // Later connections naming this transfer find no wait.
        lock(&self.waiters).remove(&self.tid);
        conn
    }
}

impl Drop for Expected {
    fn drop(&mut self) {
        lock(&self.waiters).remove(&self.tid);
    }
}

/// Accepts connections until aborted; each proves itself on a task of its
/// own, at most [`MAX_PROVING`] at once (one more is closed at once).
async fn serve(socket: TcpListener, waiters: Waiters) {
    let proving = Arc::new(Semaphore::new(MAX_PROVING));
    loop {
        let Ok((tcp, _)) = socket.accept().await else {
            // Out of descriptors, say: do not spin.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let Ok(permit) = Arc::clone(&proving).try_acquire_owned() else {
            continue;
        };
        let waiters = Arc::clone(&waiters);
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(PROOF_TIMEOUT, prove(tcp, &waiters)).await;
        });
    }
}

/// The exchange of PROTOCOL.md §2.7 on one accepted connection: the
/// sender's `DirectHello` naming a transfer that waits, our challenge and
/// proof, the sender's proof over both challenges; then the connection is
/// that transfer's (its first, of one or several, or a further one of a
/// stream over several, each number once). Anything else drops (closes)
/// the connection.
async fn prove(tcp: TcpStream, waiters: &Waiters) {
    let _ = keyferry_common::io::tcp::direct(&tcp);
    let mut conn = Connection::new(tcp);
    conn.reader.set_max(MAX_FIRST_FRAME);
    let Ok(Some(Message::DirectHello { transfer_id, nonce })) = conn.reader.read().await else {
        return;
    };
    let key = match lock(waiters).get(&transfer_id) {
        Some(w) => Arc::clone(&w.key),
        None => return,
    };
    let c = Challenges {
        sender: nonce,
        receiver: random_array(),
    };
    let challenge = Message::DirectChallenge {
        nonce: c.receiver,
        proof: receiver_proof(&key, &transfer_id, &c),
    };
    if conn.writer.write(&challenge).await.is_err() {
        return;
    }
    let (said, proof) = match conn.reader.read().await {
        Ok(Some(Message::DirectProof { proof })) => (LaneProof::First(1), proof),
        Ok(Some(Message::DirectLanes { lanes, proof })) if (2..=MAX_LANES).contains(&lanes) => {
            (LaneProof::First(lanes), proof)
        }
        Ok(Some(Message::DirectLane { lane, proof })) if (1..MAX_LANES).contains(&lane) => {
            (LaneProof::Further(lane), proof)
        }
        _ => return,
    };
    if said.verify(&key, &transfer_id, &c, &proof).is_err() {
        return;
    }
    // Proved: the first once (bit 0), each further number `n` once (bit `n`).
    let mut waiters = lock(waiters);
    let Some(waiter) = waiters.get_mut(&transfer_id) else {
        return;
    };
    let (bit, arrival) = match said {
        LaneProof::First(n) => (1, Arrival::First(n, conn)),
        LaneProof::Further(n) => (1 << n, Arrival::Further(n, conn)),
    };
    if waiter.proved & bit != 0 {
        return;
    }
    waiter.proved |= bit;
    let _ = waiter.arrivals.send(arrival);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sender_cannot_make_the_receiver_knock_on_itself() {
        let own: Vec<SocketAddr> = vec!["192.168.1.5:4000".parse().unwrap()];
        let named: Vec<SocketAddr> = [
            "127.0.0.1:80",
            "[::1]:80",
            "169.254.1.1:80",
            "[fe80::1]:80",
            "0.0.0.0:80",
            "224.0.0.1:80",
            "255.255.255.255:80",
            "192.168.1.5:22",
            "[::ffff:192.168.1.5]:22",
            "[::ffff:203.0.113.7]:40000",
            "198.51.100.2:40001",
            "[::ffff:198.51.100.2]:40001",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        let kept: Vec<SocketAddr> = punch_targets(&named, &own).collect();
        let expected: Vec<SocketAddr> = ["203.0.113.7:40000", "198.51.100.2:40001"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(kept, expected);
    }
}
