//! The receiver's end of a stream over lanes: segments read back in `seq`
//! order, holding at most one segment head per lane and never a segment's
//! data; what the receiver writes goes to the first lane as it is.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{Ahead, MAX_SEGMENT, SEGMENT_HEAD, invalid};

/// One lane's read side.
#[derive(Debug)]
struct Lane<R> {
    io: Ahead<R>,
    /// A segment head as far as it has come.
    head: [u8; SEGMENT_HEAD],
    head_len: usize,
    /// The next segment on this lane (`seq`, `len`), head read.
    next: Option<(u64, usize)>,
    /// The lane ended between segments.
    eof: bool,
}

impl<R: AsyncRead + Unpin> Lane<R> {
    /// Reads the next segment's head into `next` (or marks a clean end).
    fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.head_len < SEGMENT_HEAD {
            let mut head = self.head;
            let n = ready!(self.io.poll_raw(cx, &mut head[self.head_len..]))?;
            self.head = head;
            if n == 0 {
                if self.head_len == 0 {
                    self.eof = true;
                    return Poll::Ready(Ok(()));
                }
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
            self.head_len += n;
        }
        self.head_len = 0;
        let (seq, len) = self.head.split_at(8);
        let seq = u64::from_be_bytes(seq.try_into().map_err(|_| invalid("segment head"))?);
        let len = u32::from_be_bytes(len.try_into().map_err(|_| invalid("segment head"))?);
        let len = usize::try_from(len).map_err(|_| invalid("segment length"))?;
        if len == 0 || len > MAX_SEGMENT {
            return Poll::Ready(Err(invalid("a segment of the stream has a bad length")));
        }
        self.next = Some((seq, len));
        Poll::Ready(Ok(()))
    }
}

/// The receiver's end: reads the stream from all lanes, writes to the first.
#[derive(Debug)]
pub struct Gather<R, W> {
    lanes: Vec<Lane<R>>,
    first: W,
    /// The other lanes' write sides, kept unused (dropping one would shut
    /// its direction).
    _others: Vec<W>,
    /// The segment it waits for.
    seq: u64,
    /// The lane and bytes left of the segment being read.
    reading: Option<(usize, usize)>,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Gather<R, W> {
    /// The lanes' read sides, the first first, each with the bytes already
    /// read from it; the first lane's write side, and the others' (kept,
    /// never written to).
    pub fn new(lanes: Vec<(R, Vec<u8>)>, first: W, others: Vec<W>) -> Self {
        let lanes = lanes
            .into_iter()
            .map(|(io, ahead)| Lane {
                io: Ahead::new(io, ahead),
                head: [0; SEGMENT_HEAD],
                head_len: 0,
                next: None,
                eof: false,
            })
            .collect();
        Self {
            lanes,
            first,
            _others: others,
            seq: 0,
            reading: None,
        }
    }

    /// The lanes' read sides, for one that reads no more of the stream but
    /// must not leave bytes unread (a socket closed with unread bytes is
    /// reset); what was read ahead is dropped, as is the first lane's write
    /// side.
    pub fn into_readers(self) -> Vec<R> {
        self.lanes.into_iter().map(|l| l.io.io).collect()
    }

    /// How many connections carry the stream.
    pub fn count(&self) -> usize {
        self.lanes.len()
    }
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> AsyncRead for Gather<R, W> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if let Some((i, left)) = this.reading {
                let want = left.min(buf.remaining());
                if want == 0 {
                    return Poll::Ready(Ok(()));
                }
                let lane = this.lanes.get_mut(i).ok_or_else(|| invalid("lane"))?;
                let n = ready!(lane.io.poll_raw(cx, &mut buf.initialize_unfilled()[..want]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                }
                buf.advance(n);
                this.reading = if n == left {
                    this.seq += 1;
                    None
                } else {
                    Some((i, left - n))
                };
                return Poll::Ready(Ok(()));
            }
            let mut waiting = false;
            let mut found = None;
            for (i, lane) in this.lanes.iter_mut().enumerate() {
                if lane.next.is_none() && !lane.eof && lane.poll_head(cx)?.is_pending() {
                    waiting = true;
                    continue;
                }
                match lane.next {
                    Some((seq, _)) if seq < this.seq => {
                        return Poll::Ready(Err(invalid("a segment of the stream came twice")));
                    }
                    Some((seq, len)) if seq == this.seq => {
                        lane.next = None;
                        found = Some((i, len));
                        break;
                    }
                    _ => {}
                }
            }
            if found.is_some() {
                this.reading = found;
                continue;
            }
            if waiting {
                return Poll::Pending;
            }
            // Every lane ended or holds a later segment: the next never comes.
            if this.lanes.iter().all(|l| l.eof) {
                return Poll::Ready(Ok(()));
            }
            return Poll::Ready(Err(invalid("a segment of the stream is missing")));
        }
    }
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> AsyncWrite for Gather<R, W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().first).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().first).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().first).poll_shutdown(cx)
    }
}
