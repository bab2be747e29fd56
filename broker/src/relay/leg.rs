//! One side of a relay, a leg: one data connection, or several carrying one
//! stream (lanes, PROTOCOL.md §2.5) — a sender's read back in order
//! ([`Pipe::Gather`]), a receiver's written out over them ([`Pipe::Spread`]). Either way
//! a read side and a write side, and the socket under them when there is
//! one (only then may the relay splice).

use keyferry_common::io::lanes::Pipe;
use tokio::io::{AsyncRead, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::either::Either;

use super::DataConn;
use crate::conns::ConnGuard;

/// A leg's read side: one connection's (`Left`), or (`Right`) a sender's
/// lanes read back in order ([`Pipe::Gather`]) or the first of a
/// receiver's ([`Pipe::Spread`]).
pub(super) type LegRead = Either<OwnedReadHalf, ReadHalf<Pipe>>;

/// A leg's write side: one connection's (`Left`), or (`Right`) the first of
/// a sender's lanes or a receiver's lanes written out.
pub(super) type LegWrite = Either<OwnedWriteHalf, WriteHalf<Pipe>>;

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
        return (Either::Left(r), conn.leftover, Either::Left(w));
    }
    // A sender's lanes got their receive buffers when they were admitted
    // (`crate::data`); a receiver's get their send side here.
    let tune = |tcp: &TcpStream| {
        if of == Of::Receiver {
            let _ = keyferry_common::io::tcp::lane_out(tcp);
        }
    };
    tune(&conn.tcp);
    let mut rest = Vec::new();
    for lane in conn.further {
        tune(&lane.tcp);
        rest.push((lane.tcp, lane.leftover));
        guards.push(lane.guard);
    }
    let first = (conn.tcp, conn.leftover);
    let pipe = match of {
        Of::Sender => Pipe::gather(first, rest),
        // Nothing comes on a receiver's further lanes.
        Of::Receiver => Pipe::spread(first, rest.into_iter().map(|(t, _)| t).collect()),
    };
    let (r, w) = tokio::io::split(pipe);
    (Either::Right(r), Vec::new(), Either::Right(w))
}

/// Reads and discards what a leg still sends, until it closes or `grace`
/// passes: closing a socket with unread data makes the kernel send a reset,
/// which can destroy the `Abort` just written to it before it is read. A
/// sender's lanes are drained each on its own (the stream's order no longer
/// matters).
pub(super) async fn drain(read: LegRead, write: LegWrite, grace: std::time::Duration) {
    match (read, write) {
        (Either::Right(r), Either::Right(w)) => match r.unsplit(w) {
            Pipe::Gather(g) => {
                let mut lanes = g.into_readers();
                let drains = lanes.iter_mut().map(|l| drain_one(l, grace));
                futures_util::future::join_all(drains).await;
            }
            mut pipe => drain_one(&mut pipe, grace).await,
        },
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
            Either::Left(t) => Some(t.as_ref()),
            Either::Right(_) => None,
        }
    }
}

impl Socket for LegWrite {
    fn socket(&self) -> Option<&TcpStream> {
        match self {
            Either::Left(t) => Some(t.as_ref()),
            Either::Right(_) => None,
        }
    }
}
