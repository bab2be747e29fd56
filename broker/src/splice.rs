//! Moving the body of a record from one socket to another through a pipe
//! with `splice(2)`: the bytes stay in the kernel, so the broker spends no
//! copy and no user-space buffer on them. The relay reads and checks each
//! frame's head itself ([`crate::relay`]); only the bytes the check already
//! let through go this way, exactly as many as it says.
//!
//! Waiting follows tokio's readiness rules: the socket we read from is only
//! waited on when the pipe is empty (so a would-block can only mean the
//! socket has nothing), the one we write to only when the pipe holds bytes.

use std::io;
use std::os::fd::{AsFd as _, OwnedFd};
use std::time::Duration;

use rustix::pipe::{PipeFlags, SpliceFlags, fcntl_setpipe_size, pipe_with, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::shutdown::Shutdown;

/// The pipe size asked for: half a default chunk. The kernel bounds the
/// pipe pages one user may hold (`pipe-user-pages-soft`, 64 MiB by default),
/// so this allows 256 transfers before pipes shrink.
const PIPE_SIZE: usize = 256 << 10;

/// A smaller pipe (the kernel refused to enlarge it) costs more splices per
/// record than copying: below this, the relay copies instead.
const MIN_PIPE: usize = 64 << 10;

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

/// Moves exactly `n` bytes from `from` to `to` through `pipe`.
pub async fn exactly(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    mut n: usize,
    idle: Duration,
    shutdown: &mut Shutdown,
) -> Result<(), Stop> {
    let flags = SpliceFlags::NONBLOCK | SpliceFlags::MOVE;
    let mut held = 0usize;
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
                    n -= k;
                    held += k;
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
            wait(from.readable(), idle, shutdown, Stop::From)
                .await
                .map_err(|e| e.unwrap_or(Stop::Silent))?;
        }
    }
    Ok(())
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
