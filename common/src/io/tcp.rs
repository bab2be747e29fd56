//! Socket options for long-lived TCP connections, so that a peer whose
//! machine froze or whose network vanished is noticed by the kernel, not only
//! when an application timer runs out: TCP keepalive probes on an idle
//! connection, and `TCP_USER_TIMEOUT` for data sent and never acknowledged.

use std::io;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};

/// Idle time before the first keepalive probe.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(20);
/// Time between unanswered probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes before the kernel drops the connection.
pub const KEEPALIVE_PROBES: u32 = 3;
/// How long sent data may stay unacknowledged before the kernel drops the
/// connection (`TCP_USER_TIMEOUT`; Linux).
pub const USER_TIMEOUT: Duration = Duration::from_secs(60);

/// Sets keepalive and, on Linux, `TCP_USER_TIMEOUT` on `stream`.
pub fn keep_alive(stream: &tokio::net::TcpStream) -> io::Result<()> {
    let keepalive = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    set_timeouts(stream, &keepalive, USER_TIMEOUT)
}

/// Keepalive `keepalive` and, on Linux, `TCP_USER_TIMEOUT` `user` on `stream`.
fn set_timeouts(
    stream: &tokio::net::TcpStream,
    keepalive: &TcpKeepalive,
    user: Duration,
) -> io::Result<()> {
    let sock = SockRef::from(stream);
    sock.set_tcp_keepalive(keepalive)?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    sock.set_tcp_user_timeout(Some(user))?;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = user;
    Ok(())
}

/// How long data sent on a direct connection between agents may stay
/// unacknowledged, and how long such a connection may hear nothing at all
/// (5 s idle, then 3 probes 2 s apart), before the kernel drops it: a dead
/// direct path is given up quickly, since the relay is there to take over.
pub const DIRECT_USER_TIMEOUT: Duration = Duration::from_secs(10);

/// Sets the options of a direct connection between agents: no Nagle delay,
/// and the short keepalive and `TCP_USER_TIMEOUT` of [`DIRECT_USER_TIMEOUT`].
pub fn direct(stream: &tokio::net::TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(5))
        .with_interval(Duration::from_secs(2))
        .with_retries(3);
    set_timeouts(stream, &keepalive, DIRECT_USER_TIMEOUT)
}

/// Most bytes a sender's lane holds unsent in the kernel (`TCP_NOTSENT_LOWAT`).
pub const LANE_UNSENT: u32 = 128 << 10;

/// The socket buffer a lane asks for (the kernel caps it at its
/// `net.core.wmem_max`/`rmem_max`, and doubles it for its bookkeeping).
pub const LANE_BUFFER: usize = 4 << 20;

/// A sender's lane (one of several connections carrying one stream,
/// [`super::lanes`]) takes new data only while it has little unsent
/// (`TCP_NOTSENT_LOWAT`, Linux): so a segment goes to a connection that
/// sends it soon, and the segments reach the receiver nearly in order,
/// instead of one waiting behind megabytes queued on a slower connection.
/// Its send buffer is [`LANE_BUFFER`] from the start, not grown from 16 KiB
/// as the connection speeds up, where the system allows that much.
pub fn lane_out(stream: &tokio::net::TcpStream) -> io::Result<()> {
    let sock = SockRef::from(stream);
    if allows("wmem_max") {
        sock.set_send_buffer_size(LANE_BUFFER)?;
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    sock.set_tcp_notsent_lowat(LANE_UNSENT)?;
    Ok(())
}

/// A receiver's lane: a receive buffer as large as the system allows from
/// the start, since the receiver reads the lanes in turn (segment order),
/// and a lane it is not reading at the moment must hold what arrives.
pub fn lane_in(stream: &tokio::net::TcpStream) -> io::Result<()> {
    if allows("rmem_max") {
        SockRef::from(stream).set_recv_buffer_size(LANE_BUFFER)?;
    }
    Ok(())
}

/// How many bytes the kernel may hold for `stream` before we read them: its
/// receive buffer (`SO_RCVBUF`, which the kernel grows on its own on a long
/// path unless it was set by hand).
pub fn receive_room(stream: &tokio::net::TcpStream) -> io::Result<usize> {
    SockRef::from(stream).recv_buffer_size()
}

/// Whether the system lets a socket set a buffer of [`LANE_BUFFER`]
/// (`net.core.<which>`, Linux). A buffer set by hand is no longer grown by
/// the kernel, and one capped lower (the stock cap is 208 KiB) would carry
/// less than the kernel's own growing one (to 4 MiB and more): then the
/// kernel's is kept.
fn allows(which: &str) -> bool {
    std::fs::read_to_string(format!("/proc/sys/net/core/{which}"))
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .is_some_and(|max| max >= LANE_BUFFER)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test]
    async fn both_ends_of_a_connection_get_the_options() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let (client, (server, _)) = (client.unwrap(), accepted.unwrap());
        for s in [&client, &server] {
            let before = SockRef::from(s);
            assert!(!before.keepalive().unwrap());
            keep_alive(s).unwrap();
            let sock = SockRef::from(s);
            assert!(sock.keepalive().unwrap());
            assert_eq!(sock.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
            assert_eq!(sock.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
            assert_eq!(sock.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
            #[cfg(target_os = "linux")]
            assert_eq!(sock.tcp_user_timeout().unwrap(), Some(USER_TIMEOUT));
        }
    }
}
