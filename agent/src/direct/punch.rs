//! The simultaneous open (PROTOCOL.md §2.7): when a router translates this
//! agent's addresses, a peer's connection reaches it only through a mapping
//! its router made for a connection going out. So both agents connect at
//! once, each from a port it named (the sender in its terms, the receiver
//! among its accept's addresses) to the other's outside address: each
//! router then takes the other's packets for answers to its own, and the two
//! attempts meet as one TCP connection. It then carries the same proofs as
//! any direct connection; the sender speaks first on it, as always.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

/// The pause after an attempt that failed (refused: the other side's router
/// or host answered before its mapping was there) before the next.
const PAUSE: Duration = Duration::from_millis(250);
/// How long the sender keeps trying (a dial that finds no path costs this
/// much before the relay carries the stream).
pub const SENDER_WINDOW: Duration = Duration::from_secs(2);
/// How long the receiver keeps trying: it starts when it sends its accept,
/// before the sender can begin, and its attempts cost nobody a wait.
pub const RECEIVER_WINDOW: Duration = Duration::from_secs(4);

/// A local port kept for a simultaneous open, from the moment it is named to
/// the peer until the attempts end: bound, never listening, so no other
/// socket of this machine takes it meanwhile (ours bind beside it).
#[derive(Debug)]
pub struct PunchPort {
    _held: TcpSocket,
    local: SocketAddr,
    /// The outside address the port is named with.
    pub outside: SocketAddr,
}

/// A socket of `local`'s family with address reuse on (so that several
/// sockets may share one local port, none listening).
fn socket_for(local: SocketAddr) -> io::Result<TcpSocket> {
    let socket = if local.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    Ok(socket)
}

impl PunchPort {
    /// A fresh port of the family of `outside_ip` (this agent's address as
    /// its broker sees it), named to the peer as that address and the port:
    /// the routers this is for keep a connection's port when they translate it.
    pub fn reserve(outside_ip: IpAddr) -> io::Result<Self> {
        let any: IpAddr = if outside_ip.is_ipv4() {
            Ipv4Addr::UNSPECIFIED.into()
        } else {
            Ipv6Addr::UNSPECIFIED.into()
        };
        let held = socket_for(SocketAddr::new(any, 0))?;
        held.bind(SocketAddr::new(any, 0))?;
        let local = held.local_addr()?;
        Ok(Self {
            _held: held,
            local,
            outside: SocketAddr::new(outside_ip, local.port()),
        })
    }

    /// Whether `to` is of this port's family.
    pub fn reaches(&self, to: &SocketAddr) -> bool {
        self.local.is_ipv4() == to.ip().to_canonical().is_ipv4()
    }

    /// Connects from this port to `to` until `deadline`: one attempt waits
    /// as long as the deadline allows (the kernel resends its SYN; the other
    /// side's SYN, once its own router's mapping is there, meets it), and one
    /// that fails (a reset) is followed by a new socket on the same port
    /// after [`PAUSE`]. The last error if none connects.
    pub async fn connect(&self, to: SocketAddr, deadline: Instant) -> Result<TcpStream, String> {
        let mut why = String::from("no answer");
        loop {
            let attempt = async {
                let socket = socket_for(self.local)?;
                socket.bind(self.local)?;
                socket.connect(to).await
            };
            match tokio::time::timeout_at(deadline, attempt).await {
                Ok(Ok(tcp)) => return Ok(tcp),
                Ok(Err(e)) => why = e.to_string(),
                Err(_) => return Err(why),
            }
            if Instant::now() + PAUSE >= deadline {
                return Err(why);
            }
            tokio::time::sleep(PAUSE).await;
        }
    }
}
