//! An agent's data connection to the broker's relay over several TCP
//! connections, its lanes (PROTOCOL.md §2.5, "Several connections"): one
//! connection carries at most its send buffer per round trip, so an agent far
//! from the broker fills its link only with more. It picks how many from the
//! round trip its first connect took (as a direct stream does, §2.7, aiming
//! lower: [`crate::streams::RELAY`]), or `--streams`; dials the others to the
//! address the first reached, at once; redeems its ticket on each
//! (`RedeemLane` with its place on the others, then `RedeemLanes` with their
//! number on the first); and a sender spreads its stream over them, a
//! receiver reads it back from them in order
//! ([`keyferry_common::io::lanes`]). An upload to several receivers, a chat
//! and a small stream take one connection.

use std::time::{Duration, Instant};

use keyferry_common::handshake::direct::MAX_LANES;
use keyferry_common::ids::TransferId;
use keyferry_common::io::connection::{ConnError, FrameWriter};
use keyferry_common::io::lanes::Pipe;
use keyferry_common::wire::message::Message;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// How long connecting to the broker may take (as for its TLS connection).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How many connections a data connection to the relay may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lanes {
    /// One (a receiver, an upload to several receivers, a small stream).
    One,
    /// As many as the round trip asks for, or the number given
    /// (`--streams`).
    Auto(Option<u8>),
}

/// Which side of a transfer a data connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leg {
    /// The stream goes out on it, spread over its lanes.
    Sender,
    /// The stream comes in on it, gathered from its lanes.
    Receiver,
}

/// TCP connections to a broker, opened for one data connection.
#[derive(Debug)]
pub struct Opened {
    /// The first: its `Redeem` or `RedeemLanes` goes there, and what the
    /// broker sends back comes there.
    pub first: TcpStream,
    /// The further lanes, connected to the address the first reached.
    pub more: Vec<TcpStream>,
}

/// Connects to `addr` (`HOST:PORT`) and, as `lanes` says, opens further
/// connections to the address reached, beside each other. A further one that
/// does not connect within twice the first's round trip and a second is left
/// out.
pub async fn connect(addr: &str, lanes: Lanes) -> std::io::Result<Opened> {
    let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out");
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    // The name is looked up first, so that the round trip is the connect's.
    let to: Vec<_> = tokio::time::timeout_at(deadline, tokio::net::lookup_host(addr))
        .await
        .map_err(|_| timed_out())??
        .collect();
    let (first, rtt) = tokio::time::timeout_at(deadline, first_of(&to))
        .await
        .map_err(|_| timed_out())??;
    let more = match lanes {
        Lanes::One => Vec::new(),
        Lanes::Auto(asked) => {
            let n = crate::streams::count(rtt, asked, crate::streams::RELAY);
            match first.peer_addr() {
                Ok(to) if n > 1 => more(to, n - 1, rtt).await,
                _ => Vec::new(),
            }
        }
    };
    Ok(Opened { first, more })
}

/// Connects to the first of `to` that answers, in turn; how long that
/// connect took.
async fn first_of(to: &[std::net::SocketAddr]) -> std::io::Result<(TcpStream, Duration)> {
    let mut last = std::io::Error::new(std::io::ErrorKind::InvalidInput, "the name has no address");
    for addr in to {
        let began = Instant::now();
        match TcpStream::connect(addr).await {
            Ok(tcp) => return Ok((tcp, began.elapsed())),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Opens `n` connections to `to` at once; those that connect in time.
async fn more(to: std::net::SocketAddr, n: u8, rtt: Duration) -> Vec<TcpStream> {
    let limit = (rtt.saturating_mul(2) + Duration::from_secs(1)).min(CONNECT_TIMEOUT);
    let deadline = tokio::time::Instant::now() + limit;
    let mut tries = JoinSet::new();
    for _ in 0..n {
        tries.spawn(TcpStream::connect(to));
    }
    let mut connected = Vec::new();
    // Those still connecting at the deadline are dropped with `tries`.
    while let Ok(Some(joined)) = tokio::time::timeout_at(deadline, tries.join_next()).await {
        if let Ok(Ok(tcp)) = joined {
            connected.push(tcp);
        }
    }
    connected
}

/// Redeems the ticket `ticket` of `tid` (the `leg`'s) on `opened`: on each
/// further connection its place, then on the first how many there are (or a
/// plain `Redeem` if it is alone). Returns the connection the stream goes
/// on, and how many carry it.
pub async fn redeem(
    opened: Opened,
    tid: TransferId,
    ticket: [u8; 32],
    leg: Leg,
) -> Result<(Pipe, u8), ConnError> {
    let Opened { mut first, more } = opened;
    for tcp in std::iter::once(&first).chain(&more) {
        let _ = tcp.set_nodelay(true);
        let _ = keyferry_common::io::tcp::keep_alive(tcp);
    }
    let lanes = crate::streams::number(more, |lane, mut tcp: TcpStream| async move {
        let redeem = Message::RedeemLane {
            transfer_id: tid,
            ticket,
            lane,
        };
        write(&mut tcp, &redeem).await.ok().map(|()| tcp)
    })
    .await;
    let n = u8::try_from(lanes.len() + 1).unwrap_or(MAX_LANES);
    let redeem = match n {
        1 => Message::Redeem {
            transfer_id: tid,
            ticket,
        },
        n => Message::RedeemLanes {
            transfer_id: tid,
            ticket,
            lanes: n,
        },
    };
    write(&mut first, &redeem).await?;
    if n == 1 {
        return Ok((Pipe::Tcp(first), 1));
    }
    let pipe = match leg {
        Leg::Sender => {
            for lane in std::iter::once(&first).chain(&lanes) {
                let _ = keyferry_common::io::tcp::lane_out(lane);
            }
            Pipe::spread((first, Vec::new()), lanes)
        }
        Leg::Receiver => {
            for lane in std::iter::once(&first).chain(&lanes) {
                let _ = keyferry_common::io::tcp::lane_in(lane);
            }
            let rest = lanes.into_iter().map(|l| (l, Vec::new())).collect();
            Pipe::gather((first, Vec::new()), rest)
        }
    };
    Ok((pipe, n))
}

/// Writes `msg`, a data connection's first frame (at most 64 bytes).
async fn write(tcp: &mut TcpStream, msg: &Message) -> Result<(), ConnError> {
    FrameWriter::new(tcp, 64).write(msg).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyferry_common::wire::message;
    use tokio::io::AsyncReadExt as _;
    use tokio::net::TcpListener;

    /// What a broker reads first on each connection it accepts.
    async fn first_frames(listener: &TcpListener, n: usize) -> Vec<Message> {
        let mut got = Vec::new();
        for _ in 0..n {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut len = [0u8; 4];
            tcp.read_exact(&mut len).await.unwrap();
            let mut payload = vec![0u8; u32::from_be_bytes(len) as usize];
            tcp.read_exact(&mut payload).await.unwrap();
            got.push(message::decode_payload(&payload).unwrap());
        }
        got
    }

    #[tokio::test]
    async fn the_lanes_are_numbered_without_gaps_and_the_first_says_how_many() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (tid, ticket) = (TransferId([7; 16]), [9; 32]);
        let opened = connect(&addr, Lanes::Auto(Some(3))).await.unwrap();
        assert_eq!(opened.more.len(), 2, "--streams 3 on a short path");
        let (pipe, n) = redeem(opened, tid, ticket, Leg::Sender).await.unwrap();
        assert_eq!((n, pipe.count()), (3, 3));
        let mut frames = first_frames(&listener, 3).await;
        frames.sort_by_key(|m| match m {
            Message::RedeemLanes { .. } => 0,
            Message::RedeemLane { lane, .. } => *lane,
            _ => 99,
        });
        assert_eq!(
            frames,
            vec![
                Message::RedeemLanes {
                    transfer_id: tid,
                    ticket,
                    lanes: 3
                },
                Message::RedeemLane {
                    transfer_id: tid,
                    ticket,
                    lane: 1
                },
                Message::RedeemLane {
                    transfer_id: tid,
                    ticket,
                    lane: 2
                },
            ]
        );
        // On a short path, without --streams, or where one is wanted: one
        // connection and a plain Redeem.
        for lanes in [Lanes::Auto(None), Lanes::One] {
            let opened = connect(&addr, lanes).await.unwrap();
            assert!(opened.more.is_empty(), "{lanes:?}");
            let (pipe, n) = redeem(opened, tid, ticket, Leg::Sender).await.unwrap();
            assert_eq!((n, pipe.count()), (1, 1));
            let frames = first_frames(&listener, 1).await;
            assert_eq!(
                frames,
                vec![Message::Redeem {
                    transfer_id: tid,
                    ticket
                }]
            );
        }
    }
}
