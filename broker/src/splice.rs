//! Moving the body of a record from one socket to another through a pipe
//! with `splice(2)`: the bytes stay in the kernel, so the broker spends no
//! copy and no user-space buffer on them. The relay reads and checks each
//! frame's head itself ([`crate::relay`]); only the bytes the check already
//! let through go this way, exactly as many as it says.
//!
//! Waiting follows tokio's readiness rules: the socket we read from is only
//! waited on when the pipe is empty (so a would-block can only mean the
//! socket has nothing), the one we write to only when the pipe holds bytes.
//!
//! A record trickling in while the way out is fast is gathered: when what
//! the sender brought since the relay last waited for it is little, and at
//! the rate it came a pause of [`GATHER`] fills at most a quarter of the
//! sender's socket buffer, the relay pauses before it waits again. Without
//! that it wakes for nearly every packet of a long inbound leg (the outbound
//! socket never fills, so nothing else holds it back) and spends several
//! times the CPU per byte of a relay whose two legs are alike. A fast sender
//! (a pause would fill the buffer's window) is read as it comes, as before.

use std::io;
use std::os::fd::{AsFd as _, OwnedFd};
use std::time::{Duration, Instant};

use rustix::pipe::{PipeFlags, SpliceFlags, fcntl_setpipe_size, pipe_with, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::quiet::Quiet;
use crate::shutdown::Shutdown;

/// The pipe size asked for: half a default chunk. The kernel bounds the
/// pipe pages one user may hold (`pipe-user-pages-soft`, 64 MiB by default),
/// so this allows 256 transfers before pipes shrink.
const PIPE_SIZE: usize = 256 << 10;

/// A smaller pipe (the kernel refused to enlarge it) costs more splices per
/// record than copying: below this, the relay copies instead.
const MIN_PIPE: usize = 64 << 10;

/// Less than this (or half the pipe, if smaller) from the sender between two
/// waits for it is a trickle; the last bytes of a record are never paused
/// for.
const SMALL_FILL: usize = 128 << 10;

/// How long a trickle is left to gather. tokio's timer counts in whole
/// milliseconds, so this is 3-4 ms ([`GATHER_MOST`]): at 200 Mbit/s,
/// 75-100 KiB per wake-up where there were some 50 (one per 1448-byte
/// packet). Measured against 1 ms (docs/BENCHMARKS.md): a little less CPU,
/// the same throughput.
const GATHER: Duration = Duration::from_millis(3);

/// [`GATHER`] and one tick of the timer: the longest a pause lasts.
const GATHER_MOST: Duration = Duration::from_millis(4);

/// Gathering needs the sender's socket to hold what arrives meanwhile
/// without closing its window (the kernel offers about half the receive
/// buffer as window): a pause may fill at most this share of it, at the
/// rate the bytes came since the last wait...
const ROOM_SHARE: u128 = 4;

/// ...and the buffer must be at least this large: one the kernel did not
/// grow (a short inbound leg) is read as the bytes come, as before.
const GATHER_ROOM: usize = 2 << 20;

/// A pipe between two sockets.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Its capacity in bytes.
    cap: usize,
}

impl Pipe {
    /// A non-blocking pipe of at least [`MIN_PIPE`] bytes, or an error
    /// (then the relay copies).
    pub fn new() -> io::Result<Self> {
        let (read, write) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        let cap = fcntl_setpipe_size(&write, PIPE_SIZE)
            .or_else(|_| rustix::pipe::fcntl_getpipe_size(&write))?;
        if cap < MIN_PIPE {
            return Err(io::Error::other("the kernel gives only a small pipe"));
        }
        Ok(Self { read, write, cap })
    }
}

/// Why the bytes did not all go through.
#[derive(Debug)]
pub enum Stop {
    /// `from` closed first.
    Closed,
    /// Reading `from` failed.
    From(io::Error),
    /// Writing `to` failed.
    To(io::Error),
    /// `from` sent nothing for the idle limit.
    Silent,
    /// `to` took nothing for the idle limit.
    Stalled,
    /// The broker's grace period is over.
    Shutdown,
}

/// Moves exactly `n` bytes from `from` to `to` through `pipe`, telling
/// `quiet` of each piece that came.
pub async fn exactly(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    mut n: usize,
    (idle, quiet): (Duration, &Quiet),
    shutdown: &mut Shutdown,
) -> Result<(), Stop> {
    let flags = SpliceFlags::NONBLOCK | SpliceFlags::MOVE;
    let mut held = 0usize;
    // What `from` brought since the last wait for it began (none yet).
    let mut since: Option<Since> = None;
    while n > 0 || held > 0 {
        if n > 0 && held < pipe.cap {
            let want = n.min(pipe.cap - held);
            let fill = || {
                splice(from.as_fd(), None, pipe.write.as_fd(), None, want, flags)
                    .map_err(io::Error::from)
            };
            // With an empty pipe a would-block is the socket's: let tokio
            // clear its readiness. Otherwise it may be the pipe's: leave it.
            let got = if held == 0 {
                from.try_io(Interest::READABLE, fill)
            } else {
                fill()
            };
            match got {
                Ok(0) => return Err(Stop::Closed),
                Ok(k) => {
                    quiet.moved();
                    n -= k;
                    held += k;
                    if let Some(s) = &mut since {
                        s.bytes += k;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(Stop::From(e)),
            }
        }
        if held > 0 {
            let drain = || {
                splice(pipe.read.as_fd(), None, to.as_fd(), None, held, flags)
                    .map_err(io::Error::from)
            };
            match to.try_io(Interest::WRITABLE, drain) {
                // A pipe with bytes in it never drains nothing.
                Ok(0) => return Err(Stop::To(io::ErrorKind::WriteZero.into())),
                Ok(k) => held -= k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait(to.writable(), idle, shutdown, Stop::To)
                        .await
                        .map_err(|e| e.unwrap_or(Stop::Stalled))?;
                }
                Err(e) => return Err(Stop::To(e)),
            }
        } else if n > 0 {
            let trickle = since
                .as_ref()
                .is_some_and(|s| n >= SMALL_FILL && s.worth_gathering(from, pipe.cap));
            since = Some(Since {
                at: Instant::now(),
                bytes: 0,
            });
            if trickle {
                tokio::select! {
                    () = tokio::time::sleep(GATHER) => {}
                    () = shutdown.cut() => return Err(Stop::Shutdown),
                }
            }
            wait(from.readable(), idle, shutdown, Stop::From)
                .await
                .map_err(|e| e.unwrap_or(Stop::Silent))?;
        }
    }
    Ok(())
}

/// What the sender brought since the relay last began to wait for it.
#[derive(Debug)]
struct Since {
    at: Instant,
    bytes: usize,
}

impl Since {
    /// Whether a pause before the next wait gathers a trickle: little came
    /// since the last wait, and a pause at the rate it came fills at most
    /// [`ROOM_SHARE`] of `from`'s receive buffer (of at least
    /// [`GATHER_ROOM`]).
    fn worth_gathering(&self, from: &TcpStream, pipe_cap: usize) -> bool {
        let room = || keyferry_common::io::tcp::receive_room(from).ok();
        worth(self.bytes, self.at.elapsed(), room, pipe_cap)
    }
}

/// [`Since::worth_gathering`] for `bytes` in `elapsed`, a pipe of
/// `pipe_cap`, and the receive buffer `room` tells (asked only when the
/// bytes were few: it is a system call).
fn worth(
    bytes: usize,
    elapsed: Duration,
    room: impl FnOnce() -> Option<usize>,
    pipe_cap: usize,
) -> bool {
    if bytes >= SMALL_FILL.min(pipe_cap / 2) {
        return false;
    }
    let during = bytes as u128 * GATHER_MOST.as_micros() / elapsed.as_micros().max(1);
    room().is_some_and(|room| {
        room >= GATHER_ROOM && during.saturating_mul(ROOM_SHARE) <= room as u128
    })
}

/// Waits for `ready`, at most `idle` (then `Err(None)`), unless the
/// shutdown cuts first.
async fn wait(
    ready: impl Future<Output = io::Result<()>>,
    idle: Duration,
    shutdown: &mut Shutdown,
    failed: fn(io::Error) -> Stop,
) -> Result<(), Option<Stop>> {
    tokio::select! {
        r = tokio::time::timeout(idle, ready) => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Some(failed(e))),
            Err(_) => Err(None),
        },
        () = shutdown.cut() => Err(Some(Stop::Shutdown)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a panic is a test failure

    use std::time::Duration;

    use keyferry_common::io::tcp;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::watch;

    use std::time::Instant;

    use super::{GATHER_ROOM, PIPE_SIZE, Pipe, Quiet, SMALL_FILL, Since, Stop, exactly, worth};
    use crate::shutdown::{Phase, Shutdown};

    /// Two connected sockets on 127.0.0.1: (the far end, ours).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let far = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        (far, l.accept().await.unwrap().0)
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i % 251) as u8).collect()
    }

    /// A sender that trickles (a packet's worth at a time, pausing) into a
    /// socket with room to gather: every byte still goes through, in order,
    /// and no more than asked.
    #[tokio::test]
    async fn a_trickle_is_gathered_and_passed_on_whole() {
        let (mut sender, from) = pair().await;
        let (to, mut receiver) = pair().await;
        // Where the system allows it, big enough that the relay gathers.
        tcp::lane_in(&from).unwrap();
        let gathers = tcp::receive_room(&from).unwrap() >= GATHER_ROOM;
        println!("the relay gathers: {gathers}");

        let want = pattern(600 << 10);
        let sent = want.clone();
        let writer = tokio::spawn(async move {
            for piece in sent.chunks(1448) {
                sender.write_all(piece).await.unwrap();
                tokio::time::sleep(Duration::from_micros(100)).await;
            }
            // One byte more than the relay is asked for: it must stay.
            sender.write_all(b"!").await.unwrap();
            sender
        });
        let reader = tokio::spawn(async move {
            let mut got = vec![0; 600 << 10];
            receiver.read_exact(&mut got).await.unwrap();
            got
        });
        let (_tx, rx) = watch::channel(Phase::Serving);
        let mut shutdown = Shutdown::new(rx);
        let pipe = Pipe::new().unwrap();
        let idle = Duration::from_secs(10);
        let quiet = Quiet::new();
        exactly(&from, &to, &pipe, 600 << 10, (idle, &quiet), &mut shutdown)
            .await
            .unwrap();
        assert!(reader.await.unwrap() == want, "the bytes passed on differ");
        let _sender = writer.await.unwrap();
        let mut rest = [0u8; 1];
        let mut from = from;
        tokio::time::timeout(Duration::from_secs(5), from.read_exact(&mut rest))
            .await
            .expect("the byte past the record was taken by the relay")
            .unwrap();
        assert_eq!(&rest, b"!");
    }

    /// The pause is for a slow trickle into a socket with room, only.
    #[test]
    fn the_pause_is_taken_only_for_a_slow_trickle_with_room() {
        let us = Duration::from_micros;
        let (cap, room) = (PIPE_SIZE, || Some(8 << 20));
        // A packet per 60 us (25 MB/s): 97 KB in a pause, a quarter of
        // 8 MiB holds it.
        assert!(worth(1448, us(60), room, cap));
        // A receive buffer the kernel did not grow: never.
        assert!(!worth(1448, us(60), || Some(GATHER_ROOM - 1), cap));
        // Plenty since the last wait: read on.
        assert!(!worth(SMALL_FILL, us(5000), room, cap));
        // Little, but at a rate where a pause would fill the window
        // (64 KiB in 10 us): read on.
        assert!(!worth(64 << 10, us(10), room, cap));
        // The rate's edge: 2 MiB in a pause is a quarter of 8 MiB.
        assert!(worth(1 << 10, us(2), room, cap));
        assert!(!worth(1 << 10, us(1), room, cap));
        // Half a small pipe is plenty too.
        assert!(!worth(40 << 10, us(5000), room, 64 << 10));
    }

    /// The socket's own room is read: one the kernel has not grown is
    /// never paused for.
    #[tokio::test]
    async fn a_socket_that_did_not_grow_is_never_paused_for() {
        let (_far, small) = pair().await;
        let since = Since {
            at: Instant::now() - Duration::from_micros(1000),
            bytes: 1448,
        };
        if tcp::receive_room(&small).unwrap() < GATHER_ROOM {
            assert!(!since.worth_gathering(&small, PIPE_SIZE));
        }
    }

    /// A relay gathering a trickle (napping or waiting, wherever the cut
    /// finds it) still ends when the broker's grace period does.
    #[tokio::test]
    async fn a_cut_ends_a_gathering_relay() {
        let (mut sender, from) = pair().await;
        let (to, _receiver) = pair().await;
        tcp::lane_in(&from).unwrap();
        let (tx, rx) = watch::channel(Phase::Serving);
        let mut shutdown = Shutdown::new(rx);
        let pipe = Pipe::new().unwrap();
        let trickle = tokio::spawn(async move {
            while sender.write_all(&pattern(4096)).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        let relay = tokio::spawn(async move {
            let quiet = Quiet::new();
            exactly(
                &from,
                &to,
                &pipe,
                1 << 20,
                (Duration::from_secs(30), &quiet),
                &mut shutdown,
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        tx.send(Phase::Cut).unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(5), relay)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(ended, Err(Stop::Shutdown)), "{ended:?}");
        trickle.abort();
    }
}
