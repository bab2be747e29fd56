//! One side of a relay, a leg: one data connection, or several carrying one
//! stream (lanes, PROTOCOL.md §2.5) — a sender's read back in order
//! ([`Gather`]), a receiver's written out over them ([`Spread`]). Either way
//! a read side and a write side, and the socket under them when there is
//! one (only then may the relay splice).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use keyferry_common::io::lanes::{Gather, Spread};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::DataConn;
use crate::conns::ConnGuard;

/// A sender's lanes, read back in order; what goes back to the sender is
/// written to the first.
type Gathered = Gather<OwnedReadHalf, OwnedWriteHalf>;
/// A receiver's lanes: what goes to it is spread over them; what it sends
/// comes on the first.
type Spreading = Spread<OwnedReadHalf>;

/// A leg's read side.
#[derive(Debug)]
pub(super) enum LegRead {
    Tcp(OwnedReadHalf),
    Gathered(ReadHalf<Gathered>),
    Spread(ReadHalf<Spreading>),
}

/// A leg's write side.
#[derive(Debug)]
pub(super) enum LegWrite {
    Tcp(OwnedWriteHalf),
    Gathered(WriteHalf<Gathered>),
    Spread(WriteHalf<Spreading>),
}

/// Which side a leg is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Of {
    /// The stream comes from it.
    Sender,
    /// The stream goes to it.
    Receiver,
}

/// The leg of `conn`, with the bytes already read from it (none for lanes:
/// what each lane read ahead is in them); the places under the limits of
/// its connections go to `guards`.
pub(super) fn open(
    conn: DataConn,
    of: Of,
    guards: &mut Vec<ConnGuard>,
) -> (LegRead, Vec<u8>, LegWrite) {
    guards.push(conn.guard);
    if conn.further.is_empty() {
        let (r, w) = conn.tcp.into_split();
        return (LegRead::Tcp(r), conn.leftover, LegWrite::Tcp(w));
    }
    let tune = match of {
        Of::Sender => keyferry_common::io::tcp::lane_in,
        Of::Receiver => keyferry_common::io::tcp::lane_out,
    };
    let _ = tune(&conn.tcp);
    let (first_read, first_write) = conn.tcp.into_split();
    let (mut readers, mut writers) = (vec![(first_read, conn.leftover)], Vec::new());
    for lane in conn.further {
        let _ = tune(&lane.tcp);
        let (r, w) = lane.tcp.into_split();
        readers.push((r, lane.leftover));
        writers.push(w);
        guards.push(lane.guard);
    }
    match of {
        Of::Sender => {
            let (r, w) = tokio::io::split(Gather::new(readers, first_write, writers));
            (LegRead::Gathered(r), Vec::new(), LegWrite::Gathered(w))
        }
        Of::Receiver => {
            // Nothing comes on a further lane: their read sides are unused.
            let first = readers.swap_remove(0);
            writers.insert(0, first_write);
            let (r, w) = tokio::io::split(Spread::new(first, writers));
            (LegRead::Spread(r), Vec::new(), LegWrite::Spread(w))
        }
    }
}

/// Reads and discards what a leg still sends, until it closes or `grace`
/// passes: closing a socket with unread data makes the kernel send a reset,
/// which can destroy the `Abort` just written to it before it is read. A
/// sender's lanes are drained each on its own (the stream's order no longer
/// matters).
pub(super) async fn drain(read: LegRead, write: LegWrite, grace: std::time::Duration) {
    match (read, write) {
        (LegRead::Gathered(r), LegWrite::Gathered(w)) => {
            let mut lanes = r.unsplit(w).into_readers();
            let drains = lanes.iter_mut().map(|l| drain_one(l, grace));
            futures_util::future::join_all(drains).await;
        }
        (mut r, _) => drain_one(&mut r, grace).await,
    }
}

async fn drain_one<R: AsyncRead + Unpin>(from: &mut R, grace: std::time::Duration) {
    use tokio::io::AsyncReadExt as _;
    let mut sink = vec![0u8; 64 << 10];
    let _ = tokio::time::timeout(grace, async {
        while let Ok(n) = from.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// A leg end, and the socket under it if it is one connection.
pub(super) trait Socket: Unpin {
    fn socket(&self) -> Option<&TcpStream>;
}

impl Socket for LegRead {
    fn socket(&self) -> Option<&TcpStream> {
        match self {
            Self::Tcp(t) => Some(t.as_ref()),
            _ => None,
        }
    }
}

impl Socket for LegWrite {
    fn socket(&self) -> Option<&TcpStream> {
        match self {
            Self::Tcp(t) => Some(t.as_ref()),
            _ => None,
        }
    }
}

impl AsyncRead for LegRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(t) => Pin::new(t).poll_read(cx, buf),
            Self::Gathered(g) => Pin::new(g).poll_read(cx, buf),
            Self::Spread(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for LegWrite {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(t) => Pin::new(t).poll_write(cx, buf),
            Self::Gathered(g) => Pin::new(g).poll_write(cx, buf),
            Self::Spread(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(t) => Pin::new(t).poll_flush(cx),
            Self::Gathered(g) => Pin::new(g).poll_flush(cx),
            Self::Spread(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(t) => Pin::new(t).poll_shutdown(cx),
            Self::Gathered(g) => Pin::new(g).poll_shutdown(cx),
            Self::Spread(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
