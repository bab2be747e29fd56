//! Relaying one transfer between the sender's and the receiver's data
//! connections. The broker never opens a record: it only checks that each frame
//! is a message allowed in that direction for that transfer.
//!
//! Forward (sender → receiver): the root (for this transfer), the manifest,
//! key updates, chunks and the trailer (of this transfer's stream), an abort.
//! Back (receiver → sender): the receipt, an abort (of this transfer). Anything else, EOF, an error
//! or a silence longer than the idle limit ends that direction and tells the
//! other side `Abort(PeerGone)`, which ends the other direction in turn.
//!
//! Bytes are forwarded as they arrive, unchanged and without copying frames
//! out: a chunk is checked from its first 27 bytes ([`peek_chunk`]) and the
//! rest of its record moved socket to socket by `splice(2)` ([`crate::splice`];
//! copied through the read buffer if no pipe can be had); other (small)
//! messages are decoded whole before they go on. Each direction holds at most
//! one read buffer, and reads again only after it wrote what it read:
//! backpressure is end to end.

use std::time::{Duration, Instant};

use keyferry_common::ids::{StreamId, TransferId};
use keyferry_common::wire::chunk::{CHUNK_HEAD_MAX, peek_chunk};
use keyferry_common::wire::frame::{self, LEN_PREFIX, MAX_FRAME_LEN};
use keyferry_common::wire::message::{self, AbortReason, Message};
use thiserror::Error;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tracing::info;

use crate::conns::ConnGuard;
use crate::metrics::{End, Meters, Metrics};
use crate::shutdown::Shutdown;
use crate::splice::{self, Pipe, Stop};

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

#[derive(Debug, Clone, Copy)]
enum Dir {
    Forward,
    Back,
}

impl Dir {
    fn source(self) -> &'static str {
        match self {
            Self::Forward => "sender",
            Self::Back => "receiver",
        }
    }

    fn destination(self) -> &'static str {
        match self {
            Self::Forward => "receiver",
            Self::Back => "sender",
        }
    }

    /// `Some(ends)` if `msg` may travel this way for transfer `tid` of
    /// stream `sid`; `ends` if it is the last message of this direction.
    fn allows(self, msg: &Message, (tid, sid): &(TransferId, StreamId)) -> Option<bool> {
        let (ours, ends) = match (self, msg) {
            (Self::Forward, Message::Root { transfer_id, .. }) => (transfer_id == tid, false),
            (Self::Forward, Message::Manifest { stream_id, .. })
            | (Self::Forward, Message::KeyUpdate { stream_id, .. })
            | (Self::Forward, Message::Chunk { stream_id, .. }) => (stream_id == sid, false),
            (Self::Forward, Message::Trailer { stream_id, .. }) => (stream_id == sid, true),
            (Self::Back, Message::Proceed { transfer_id }) => (transfer_id == tid, false),
            (Self::Back, Message::Receipt { transfer_id, .. })
            | (_, Message::Abort { transfer_id, .. }) => (transfer_id == tid, true),
            _ => return None,
        };
        ours.then_some(ends)
    }
}

/// What the start of a buffer holds.
enum Scan {
    /// `n` bytes may go on; `ends` if they finish this direction.
    Forward { n: usize, ends: bool },
    /// More bytes are needed to decide.
    NeedMore,
    /// A frame that may not pass.
    Refuse(RelayEnd),
}

/// One direction's parser: where it stands in the byte stream.
struct Checker {
    dir: Dir,
    ids: (TransferId, StreamId),
    /// Bytes of an approved chunk frame that are still to come.
    passing: usize,
}

impl Checker {
    /// Decides about the start of `buf`.
    fn scan(&mut self, buf: &[u8]) -> Scan {
        if self.passing > 0 {
            let n = self.passing.min(buf.len());
            self.passing -= n;
            return if n == 0 {
                Scan::NeedMore
            } else {
                Scan::Forward { n, ends: false }
            };
        }
        let len = match frame::peek_len(buf, MAX_FRAME_LEN) {
            Ok(Some(len)) => len,
            Ok(None) => return Scan::NeedMore,
            Err(e) => {
                return Scan::Refuse(RelayEnd::Refused {
                    side: self.dir.source(),
                    what: format!("a bad frame: {e}"),
                });
            }
        };
        let payload = &buf[LEN_PREFIX..];
        let head = len.min(CHUNK_HEAD_MAX);
        if payload.len() < head {
            return Scan::NeedMore;
        }
        let chunk = match self.dir {
            Dir::Forward => peek_chunk(&payload[..head], len),
            Dir::Back => None,
        };
        if let Some(sid) = chunk {
            if sid != self.ids.1 {
                return self.not_allowed();
            }
            self.passing = LEN_PREFIX + len;
            return self.scan(buf);
        }
        // Anything else is small: decode it whole.
        let Some(payload) = payload.get(..len) else {
            return Scan::NeedMore;
        };
        match message::decode_payload(payload)
            .ok()
            .and_then(|m| self.dir.allows(&m, &self.ids))
        {
            Some(ends) => Scan::Forward {
                n: LEN_PREFIX + len,
                ends,
            },
            None => self.not_allowed(),
        }
    }

    fn not_allowed(&self) -> Scan {
        Scan::Refuse(RelayEnd::Refused {
            side: self.dir.source(),
            what: "a message not allowed here".into(),
        })
    }
}

/// Relays one direction until it ends; returns the bytes forwarded. With a
/// `pipe`, the bodies of chunk records are spliced; a `meter` counts the
/// bytes as they pass.
#[allow(clippy::too_many_arguments)]
async fn pump(
    dir: Dir,
    ids: (TransferId, StreamId),
    idle: Duration,
    from: &mut OwnedReadHalf,
    mut buf: Vec<u8>,
    to: &mut OwnedWriteHalf,
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
            buf.drain(..ok);
        }
        if ends {
            return (bytes, Ok(()));
        }
        // The rest of an approved chunk record goes socket to socket.
        if let Some(pipe) = &pipe
            && checker.passing > 0
            && buf.is_empty()
        {
            let n = checker.passing;
            let spliced =
                splice::exactly(from.as_ref(), to.as_ref(), pipe, n, idle, &mut shutdown).await;
            if let Err(stop) = spliced {
                break 'relay Err(stopped(dir, idle, stop));
            }
            checker.passing = 0;
            bytes += n as u64;
            count(n);
            continue;
        }
        // A small message is decoded whole, so it must fit; chunks stream.
        let most = if pipe.is_some() { HEAD_READ } else { READ_SIZE };
        buf.reserve(most);
        let mut limited = (&mut *from).take(most as u64);
        let read = tokio::select! {
            r = tokio::time::timeout(idle, limited.read_buf(&mut buf)) => r,
            () = shutdown.cut() => break Err(RelayEnd::Shutdown),
        };
        let side = dir.source();
        match read {
            Ok(Ok(0)) => break Err(RelayEnd::Disconnected(side)),
            Ok(Ok(_)) => {}
            Ok(Err(source)) => break Err(RelayEnd::Io { side, source }),
            Err(_) => {
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
    let _ = to.shutdown().await;
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

/// Reads and discards what a peer still sends, until it closes or `grace`
/// passes: closing a socket with unread data makes the kernel send a reset,
/// which can destroy the `Abort` just written to that peer before it reads it.
async fn drain(from: &mut OwnedReadHalf, grace: Duration) {
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
    let (mut s_read, mut s_write) = sender.tcp.into_split();
    let (mut r_read, mut r_write) = receiver.tcp.into_split();
    let (forward, back) = tokio::join!(
        pump(
            Dir::Forward,
            ids,
            idle,
            &mut s_read,
            sender.leftover,
            &mut r_write,
            shutdown.clone(),
            (Pipe::new().ok(), Some(&meters)),
        ),
        pump(
            Dir::Back,
            ids,
            idle,
            &mut r_read,
            receiver.leftover,
            &mut s_write,
            shutdown,
            (None, None),
        ),
    );
    if forward.1.is_err() || back.1.is_err() {
        // The failing direction told the other side; let both read that
        // before the sockets close.
        tokio::join!(
            drain(&mut s_read, DRAIN_GRACE),
            drain(&mut r_read, DRAIN_GRACE)
        );
    }
    drop((sender.guard, receiver.guard));
    RelayReport {
        bytes: forward.0,
        elapsed: start.elapsed(),
        result: forward.1.and(back.1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_of(msg: &Message) -> Vec<u8> {
        message::encode(msg, MAX_FRAME_LEN).unwrap()
    }

    /// Runs a checker over `stream` fed in pieces of `step` bytes, as the pump
    /// does; returns how many bytes it let through and how it stopped.
    const IDS: (TransferId, StreamId) = (TransferId([1; 16]), StreamId([7; 16]));

    fn check(dir: Dir, stream: &[u8], step: usize) -> (usize, Option<String>) {
        let mut checker = Checker {
            dir,
            ids: IDS,
            passing: 0,
        };
        let (mut buf, mut fed, mut passed) = (Vec::new(), 0, 0);
        loop {
            let mut ok = 0;
            loop {
                match checker.scan(&buf[ok..]) {
                    Scan::Forward { n, ends } => {
                        ok += n;
                        if ends {
                            return (passed + ok, None);
                        }
                    }
                    Scan::NeedMore => break,
                    Scan::Refuse(why) => return (passed + ok, Some(why.to_string())),
                }
            }
            passed += ok;
            buf.drain(..ok);
            if fed == stream.len() {
                return (passed, Some("end".into()));
            }
            let next = (fed + step).min(stream.len());
            buf.extend_from_slice(&stream[fed..next]);
            fed = next;
        }
    }

    #[test]
    fn passes_a_whole_stream_in_any_pieces_and_stops_after_the_trailer() {
        let (tid, sid) = IDS;
        let stream = [
            frame_of(&Message::Root {
                transfer_id: tid,
                record: vec![1; 96],
            }),
            frame_of(&Message::Manifest {
                stream_id: sid,
                record: vec![2; 200],
            }),
            frame_of(&Message::Chunk {
                stream_id: sid,
                record: vec![3; 5000],
            }),
            frame_of(&Message::KeyUpdate {
                stream_id: sid,
                record: vec![4; 108],
            }),
            frame_of(&Message::Chunk {
                stream_id: sid,
                record: vec![],
            }),
            frame_of(&Message::Trailer {
                stream_id: sid,
                record: vec![5; 96],
            }),
        ]
        .concat();
        let extra = [stream.clone(), vec![0xff; 10]].concat();
        for step in [1, 3, 27, 31, 4096, 1 << 20] {
            assert_eq!(check(Dir::Forward, &extra, step), (stream.len(), None));
        }
    }

    #[test]
    fn refuses_what_may_not_pass_and_forwards_nothing_of_it() {
        let (tid, sid) = IDS;
        let (other_t, other_s) = (TransferId([2; 16]), StreamId([2; 16]));
        let good = frame_of(&Message::Chunk {
            stream_id: sid,
            record: vec![3; 300],
        });
        let bad: Vec<(Dir, Vec<u8>)> = vec![
            (
                Dir::Forward,
                frame_of(&Message::Chunk {
                    stream_id: other_s,
                    record: vec![3; 300],
                }),
            ),
            // Another transfer's root, another stream's manifest: a broker
            // bug or a sender that mixes streams.
            (
                Dir::Forward,
                frame_of(&Message::Root {
                    transfer_id: other_t,
                    record: vec![1; 96],
                }),
            ),
            (
                Dir::Forward,
                frame_of(&Message::Manifest {
                    stream_id: other_s,
                    record: vec![1; 96],
                }),
            ),
            // The stream id where a transfer id belongs (they differ).
            (
                Dir::Forward,
                frame_of(&Message::Root {
                    transfer_id: TransferId(sid.0),
                    record: vec![1; 96],
                }),
            ),
            (
                Dir::Back,
                frame_of(&Message::Chunk {
                    stream_id: sid,
                    record: vec![3; 300],
                }),
            ),
            (
                Dir::Back,
                frame_of(&Message::Receipt {
                    transfer_id: other_t,
                    tag: [0; 32],
                }),
            ),
            (
                Dir::Forward,
                frame_of(&Message::Receipt {
                    transfer_id: tid,
                    tag: [0; 32],
                }),
            ),
            (Dir::Forward, frame_of(&Message::List)),
            (Dir::Forward, frame_of(&Message::Ping { nonce: 1 })),
            // A chunk whose record length disagrees with the frame.
            (Dir::Forward, {
                let mut f = good.clone();
                f[LEN_PREFIX + 17] ^= 1;
                f
            }),
            (Dir::Forward, vec![0, 0, 0, 0]),
            (Dir::Forward, u32::MAX.to_be_bytes().to_vec()),
        ];
        for (i, (dir, frame)) in bad.into_iter().enumerate() {
            let stream = [good.clone(), frame.clone()].concat();
            let ahead = if matches!(dir, Dir::Forward) {
                good.len()
            } else {
                0
            };
            let stream = if matches!(dir, Dir::Forward) {
                stream
            } else {
                frame
            };
            for step in [1, 64, 1 << 20] {
                let (passed, why) = check(dir, &stream, step);
                assert_eq!(passed, ahead, "case {i} {dir:?} step {step}");
                assert!(
                    why.is_some_and(|w| w != "end"),
                    "case {i} {dir:?} step {step}"
                );
            }
        }
    }
}
