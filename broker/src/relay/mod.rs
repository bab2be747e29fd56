//! Relaying one transfer between the sender's and the receiver's data
//! connections. The broker never opens a record: it only checks that each frame
//! is a message allowed in that direction for that transfer.
//!
//! Forward (sender → receiver): the root (for this transfer), the manifest,
//! key updates, chunks and the trailer (of this transfer's stream), an abort.
//! Back (receiver → sender): the receipt, an abort (of this transfer). Anything else, EOF, an error
//! or a silence longer than the idle limit ends that direction and tells the
//! other side `Abort(PeerGone)`, which ends the other direction in turn. A
//! direction is silent only while the other is too ([`Quiet`]): the receiver
//! says nothing while the stream comes in.
//!
//! Bytes are forwarded as they arrive, unchanged and without copying frames
//! out: a chunk is checked from its first 27 bytes (`check.rs`) and the
//! rest of its record moved socket to socket by `splice(2)` ([`crate::splice`];
//! copied through the read buffer if no pipe can be had); other (small)
//! messages are decoded whole before they go on. Each direction holds at most
//! one read buffer, and reads again only after it wrote what it read:
//! backpressure is end to end. A side whose data connection is several
//! (lanes, PROTOCOL.md §2.5) is read back in order, or written out over them
//! (`leg.rs`), and copied, not spliced; what goes the other way takes its
//! first connection.

use std::time::{Duration, Instant};

use keyferry_common::ids::{StreamId, TransferId};
use keyferry_common::wire::frame::MAX_FRAME_LEN;
use keyferry_common::wire::message::{self, AbortReason, Message};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tracing::info;

use crate::conns::ConnGuard;
use crate::metrics::{End, Meters, Metrics};
use crate::quiet::Quiet;
use crate::shutdown::Shutdown;
use crate::splice::{self, Pipe, Stop};

mod check;
mod leg;

use check::{Checker, Dir, Scan};
use leg::{Of, Socket as Side};

/// An admitted data connection: the socket, what was read past its `Redeem`,
/// and its place under the connection limits.
#[derive(Debug)]
pub struct DataConn {
    /// The socket.
    pub tcp: TcpStream,
    /// Bytes already read after the `Redeem` frame (the stream's start).
    pub leftover: Vec<u8>,
    /// Released when the relay ends.
    pub guard: ConnGuard,
    /// Its further lanes, in order (none but for one side of a relayed
    /// stream over several connections).
    pub further: Vec<DataConn>,
}

impl RelayReport {
    /// Logs how the relay of `tid` ended, and counts it.
    pub fn log(&self, tid: TransferId, metrics: &Metrics) {
        let end = if self.result.is_ok() {
            End::Finished
        } else {
            End::Failed
        };
        metrics.transfer_ended(end, self.bytes, self.elapsed);
        let (bytes, seconds) = (self.bytes, format!("{:.3}", self.elapsed.as_secs_f64()));
        match &self.result {
            Ok(()) => info!(transfer = %tid, bytes, seconds, "transfer finished"),
            Err(why) => info!(transfer = %tid, bytes, seconds, %why, "transfer failed"),
        }
    }
}

/// Why a relay ended before both directions completed.
#[derive(Debug, Error)]
pub enum RelayEnd {
    /// A side sent a frame that may not pass (bad length, wrong message or
    /// transfer).
    #[error("{side} sent {what}")]
    Refused {
        /// Which side.
        side: &'static str,
        /// What it sent.
        what: String,
    },
    /// A side closed its connection early.
    #[error("{0} disconnected")]
    Disconnected(&'static str),
    /// Reading from or writing to a side failed.
    #[error("{side}: {source}")]
    Io {
        /// Which side.
        side: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// A side sent nothing for the idle limit.
    #[error("{side} silent for {secs}s")]
    Silent {
        /// Which side.
        side: &'static str,
        /// The limit.
        secs: u64,
    },
    /// The other side of a side stopped reading for the idle limit.
    #[error("peer of {0} stopped reading")]
    Stalled(&'static str),
    /// The broker is shutting down and the grace period is over.
    #[error("cut by the broker's shutdown")]
    Shutdown,
}

/// How much one read may bring in.
const READ_SIZE: usize = 128 << 10;
/// How much one read may bring in when record bodies are spliced: the next
/// frame's head, and little of its body.
const HEAD_READ: usize = 4 << 10;

/// How a relay ended.
#[derive(Debug)]
pub struct RelayReport {
    /// Bytes relayed forward.
    pub bytes: u64,
    /// How long the relay ran.
    pub elapsed: Duration,
    /// `Ok` if the trailer went forward and the receipt went back.
    pub result: Result<(), RelayEnd>,
}

/// Relays one direction until it ends; returns the bytes forwarded. With a
/// `pipe`, the bodies of chunk records are spliced; a `meter` counts the
/// bytes as they pass. It waits for bytes until the transfer has been
/// `quiet` in both directions for `idle`, and for a write to go through at
/// most `idle`.
#[allow(clippy::too_many_arguments)]
async fn pump<R: AsyncRead + Side, W: AsyncWrite + Side>(
    dir: Dir,
    ids: (TransferId, StreamId),
    (idle, quiet): (Duration, &Quiet),
    from: &mut R,
    mut buf: Vec<u8>,
    to: &mut W,
    mut shutdown: Shutdown,
    (pipe, meters): (Option<Pipe>, Option<&Meters>),
) -> (u64, Result<(), RelayEnd>) {
    let count = |n: usize| {
        if let Some(m) = meters {
            m.received.inc_by(n as u64);
            m.relayed.inc_by(n as u64);
        }
    };
    let mut checker = Checker {
        dir,
        ids,
        passing: 0,
    };
    let mut bytes = 0u64;
    let result = 'relay: loop {
        // Everything at the start of the buffer that may go on, goes on.
        let mut ok = 0;
        let mut ends = false;
        while !ends {
            match checker.scan(&buf[ok..]) {
                Scan::Forward { n, ends: e } => {
                    ok += n;
                    ends = e;
                }
                Scan::NeedMore => break,
                Scan::Refuse(why) => break 'relay Err(why),
            }
        }
        if ok > 0 {
            let written = tokio::select! {
                w = tokio::time::timeout(idle, to.write_all(&buf[..ok])) => w,
                () = shutdown.cut() => break 'relay Err(RelayEnd::Shutdown),
            };
            match written {
                Ok(Ok(())) => {}
                Ok(Err(source)) => {
                    let side = dir.destination();
                    return (bytes, Err(RelayEnd::Io { side, source }));
                }
                Err(_) => return (bytes, Err(RelayEnd::Stalled(dir.source()))),
            }
            bytes += ok as u64;
            count(ok);
            quiet.moved();
            buf.drain(..ok);
        }
        if ends {
            return (bytes, Ok(()));
        }
        // The rest of an approved chunk record goes socket to socket.
        if let (Some(pipe), Some(from_tcp), Some(to_tcp)) = (&pipe, from.socket(), to.socket())
            && checker.passing > 0
            && buf.is_empty()
        {
            let n = checker.passing;
            let clock = (idle, quiet);
            let spliced = splice::exactly(from_tcp, to_tcp, pipe, n, clock, &mut shutdown).await;
            if let Err(stop) = spliced {
                break 'relay Err(stopped(dir, idle, stop));
            }
            checker.passing = 0;
            bytes += n as u64;
            count(n);
            quiet.moved();
            continue;
        }
        // A small message is decoded whole, so it must fit; chunks stream.
        let spliced = pipe.is_some() && from.socket().is_some() && to.socket().is_some();
        let most = if spliced { HEAD_READ } else { READ_SIZE };
        buf.reserve(most);
        let mut limited = (&mut *from).take(most as u64);
        let read = tokio::select! {
            r = quiet.within(idle, limited.read_buf(&mut buf)) => r,
            () = shutdown.cut() => break Err(RelayEnd::Shutdown),
        };
        let side = dir.source();
        match read {
            Some(Ok(0)) => break Err(RelayEnd::Disconnected(side)),
            Some(Ok(_)) => quiet.moved(),
            Some(Err(source)) => break Err(RelayEnd::Io { side, source }),
            None => {
                break Err(RelayEnd::Silent {
                    side,
                    secs: idle.as_secs(),
                });
            }
        }
    };
    // Mid-frame, an abort would corrupt the stream; the close says enough then.
    if checker.passing == 0 {
        let gone = Message::Abort {
            transfer_id: ids.0,
            reason: AbortReason::PeerGone,
        };
        if let Ok(frame) = message::encode(&gone, MAX_FRAME_LEN) {
            let _ = tokio::time::timeout(Duration::from_secs(5), to.write_all(&frame)).await;
        }
    }
    // Bounded: a receiver's lanes flush what is queued before they shut,
    // which a receiver that stopped reading would hold up for ever.
    let _ = tokio::time::timeout(Duration::from_secs(5), to.shutdown()).await;
    (bytes, result)
}

/// What a splice that stopped means for this direction.
fn stopped(dir: Dir, idle: Duration, stop: Stop) -> RelayEnd {
    let side = dir.source();
    match stop {
        Stop::Closed => RelayEnd::Disconnected(side),
        Stop::From(source) => RelayEnd::Io { side, source },
        Stop::To(source) => RelayEnd::Io {
            side: dir.destination(),
            source,
        },
        Stop::Silent => RelayEnd::Silent {
            side,
            secs: idle.as_secs(),
        },
        Stop::Stalled => RelayEnd::Stalled(side),
        Stop::Shutdown => RelayEnd::Shutdown,
    }
}

/// How long a failed relay keeps reading, so its `Abort` reaches both sides.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Relays transfer `ids.0` (of stream `ids.1`) until both directions ended
/// (or `shutdown` cuts it).
pub async fn relay(
    sender: DataConn,
    receiver: DataConn,
    ids: (TransferId, StreamId),
    idle: Duration,
    shutdown: Shutdown,
    meters: Meters,
) -> RelayReport {
    let start = Instant::now();
    let mut guards = Vec::new();
    let (mut s_read, s_start, mut s_write) = leg::open(sender, Of::Sender, &mut guards);
    let (mut r_read, r_start, mut r_write) = leg::open(receiver, Of::Receiver, &mut guards);
    // Record bodies are spliced between two single connections.
    let plain = s_read.socket().is_some() && r_write.socket().is_some();
    let pipe = plain.then(|| Pipe::new().ok()).flatten();
    let quiet = Quiet::new();
    let (bytes, result) = both(
        (&mut s_read, s_start, &mut s_write),
        (&mut r_read, r_start, &mut r_write),
        (ids, (idle, &quiet), shutdown),
        (pipe, meters),
    )
    .await;
    if result.is_err() {
        // The failing direction told the other side; let both read that
        // before the sockets close.
        tokio::join!(
            leg::drain(s_read, s_write, DRAIN_GRACE),
            leg::drain(r_read, r_write, DRAIN_GRACE)
        );
    }
    drop(guards);
    RelayReport {
        bytes,
        elapsed: start.elapsed(),
        result,
    }
}

/// Runs both directions between the sender's side and the receiver's (each
/// a read side, what was read from it already, and a write side) until both
/// ended. With a `pipe`, chunk bodies are spliced where both ends are
/// sockets.
async fn both<SR, SW, RR, RW>(
    (s_read, s_start, s_write): (&mut SR, Vec<u8>, &mut SW),
    (r_read, r_start, r_write): (&mut RR, Vec<u8>, &mut RW),
    (ids, clock, shutdown): ((TransferId, StreamId), (Duration, &Quiet), Shutdown),
    (pipe, meters): (Option<Pipe>, Meters),
) -> (u64, Result<(), RelayEnd>)
where
    SR: AsyncRead + Side,
    SW: AsyncWrite + Side,
    RR: AsyncRead + Side,
    RW: AsyncWrite + Side,
{
    let (forward, back) = tokio::join!(
        pump(
            Dir::Forward,
            ids,
            clock,
            s_read,
            s_start,
            r_write,
            shutdown.clone(),
            (pipe, Some(&meters)),
        ),
        pump(
            Dir::Back,
            ids,
            clock,
            r_read,
            r_start,
            s_write,
            shutdown,
            (None, None),
        ),
    );
    (forward.0, forward.1.and(back.1))
}
