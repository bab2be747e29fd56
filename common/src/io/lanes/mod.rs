//! One stream over several TCP connections, its **lanes** (PROTOCOL.md §2.7),
//! for a path whose bandwidth × round trip is more than one connection's send
//! buffer carries. The sender cuts what it writes into segments, each
//! `seq: u64 ‖ len: u32 ‖ len bytes`, numbered from 0 in the order written,
//! and each lane takes the next segment as soon as its socket took the last
//! ([`Spread`]); the receiver reads them back in `seq` order ([`Gather`]).
//! Each lane carries its segments in increasing order, so the next segment is
//! always at the head of some lane: the receiver holds at most one segment
//! head per lane and no data, whatever the lanes' speeds (a lane that runs
//! ahead waits in its socket buffers, and TCP's flow control holds back the
//! sender there). The other direction (receiver → sender) is the first
//! lane's bytes, unchanged.
//!
//! [`Pipe`] is what a data connection runs on: one TCP connection, or lanes.

mod gather;
mod spread;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

pub use gather::Gather;
pub use spread::Spread;

/// Bytes in a segment's head.
pub const SEGMENT_HEAD: usize = 12;
/// Largest segment a receiver takes.
pub const MAX_SEGMENT: usize = 1 << 20;
/// Largest segment this sender writes.
const SEGMENT: usize = 128 << 10;

fn invalid(why: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

/// A read side, with the bytes read from it before it became a lane served
/// first.
#[derive(Debug)]
struct Ahead<R> {
    io: R,
    ahead: Vec<u8>,
    at: usize,
}

impl<R: AsyncRead + Unpin> Ahead<R> {
    fn new(io: R, ahead: Vec<u8>) -> Self {
        Self { io, ahead, at: 0 }
    }

    fn poll_raw(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        if self.at < self.ahead.len() {
            let n = buf.len().min(self.ahead.len() - self.at);
            buf[..n].copy_from_slice(&self.ahead[self.at..self.at + n]);
            self.at += n;
            if self.at == self.ahead.len() {
                self.ahead = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(n));
        }
        let mut rb = ReadBuf::new(buf);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
        Poll::Ready(Ok(rb.filled().len()))
    }
}

/// What a data connection runs on: one TCP connection, or a stream's lanes.
#[derive(Debug)]
pub enum Pipe {
    /// One connection (to the broker, or straight to the other agent).
    Tcp(TcpStream),
    /// The sender's end of several connections to the other agent.
    Spread(Box<Spread<OwnedReadHalf>>),
    /// The receiver's end of several connections from the other agent.
    Gather(Box<Gather<OwnedReadHalf, OwnedWriteHalf>>),
}

impl Pipe {
    /// The sender's end of a stream over `first` (with the bytes already
    /// read from it) and the further lanes `rest`.
    pub fn spread(first: (TcpStream, Vec<u8>), rest: Vec<TcpStream>) -> Self {
        let (r, w) = first.0.into_split();
        let mut writers = vec![w];
        for tcp in rest {
            // Nothing comes back on a further lane: its read side is unused.
            writers.push(tcp.into_split().1);
        }
        Self::Spread(Box::new(Spread::new((r, first.1), writers)))
    }

    /// The receiver's end of a stream over `first` and the further lanes
    /// `rest`, each with the bytes already read from it.
    pub fn gather(first: (TcpStream, Vec<u8>), rest: Vec<(TcpStream, Vec<u8>)>) -> Self {
        let (r, w) = first.0.into_split();
        let (mut readers, mut others) = (vec![(r, first.1)], Vec::new());
        for (tcp, ahead) in rest {
            let (r, w) = tcp.into_split();
            readers.push((r, ahead));
            others.push(w);
        }
        Self::Gather(Box::new(Gather::new(readers, w, others)))
    }

    /// How many connections carry it.
    pub fn count(&self) -> usize {
        match self {
            Self::Tcp(_) => 1,
            Self::Spread(s) => s.count(),
            Self::Gather(g) => g.count(),
        }
    }
}

impl From<TcpStream> for Pipe {
    fn from(tcp: TcpStream) -> Self {
        Self::Tcp(tcp)
    }
}

impl AsyncRead for Pipe {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(t) => Pin::new(t).poll_read(cx, buf),
            Self::Spread(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Self::Gather(g) => Pin::new(g.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Pipe {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(t) => Pin::new(t).poll_write(cx, buf),
            Self::Spread(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Self::Gather(g) => Pin::new(g.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(t) => Pin::new(t).poll_write_vectored(cx, bufs),
            other => {
                let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| b);
                Pin::new(other).poll_write(cx, first)
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        matches!(self, Self::Tcp(t) if t.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(t) => Pin::new(t).poll_flush(cx),
            Self::Spread(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Self::Gather(g) => Pin::new(g.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(t) => Pin::new(t).poll_shutdown(cx),
            Self::Spread(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Self::Gather(g) => Pin::new(g.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests;
