//! The sender's end of a stream over lanes: what it writes is cut into
//! segments and queued; each lane has a task of its own that takes the next
//! segment from the queue as soon as its socket took the last one. So a lane
//! is never idle while there is data (whatever the others do), a fast lane
//! carries more segments than a slow one, and the writer waits only when the
//! queue is full. What the receiver sends comes on the first lane as it is.

use std::collections::VecDeque;
use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker, ready};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::{Ahead, SEGMENT, SEGMENT_HEAD};
use crate::sync::lock;

/// Segments queued for the lanes, at most.
const QUEUED: usize = 8;

/// What the writer and the lanes share.
#[derive(Debug, Default)]
struct Feed {
    state: Mutex<FeedState>,
    /// Wakes a lane waiting for a segment (or for the end).
    more: Notify,
}

#[derive(Debug, Default)]
struct FeedState {
    queue: VecDeque<Vec<u8>>,
    /// Segment buffers the lanes are done with.
    spare: Vec<Vec<u8>>,
    /// No more segments will come: the lanes end once the queue is empty.
    closed: bool,
    /// Why a lane failed (the stream fails with it).
    failed: Option<(io::ErrorKind, String)>,
    /// The writer, waiting for room in the queue.
    writer: Option<Waker>,
    /// The reader, to learn of a failure.
    reader: Option<Waker>,
    /// Lanes in the middle of writing a segment.
    writing: usize,
    /// A flush, waiting for the queue to empty and the lanes to finish.
    flusher: Option<Waker>,
}

impl FeedState {
    fn error(&self) -> Option<io::Error> {
        self.failed
            .as_ref()
            .map(|(kind, why)| io::Error::new(*kind, why.clone()))
    }

    /// Everything queued reached a socket.
    fn drained(&self) -> bool {
        self.queue.is_empty() && self.writing == 0
    }

    fn wake_all(&mut self) {
        for w in [self.writer.take(), self.reader.take(), self.flusher.take()]
            .into_iter()
            .flatten()
        {
            w.wake();
        }
    }
}

/// One lane: writes the queue's segments as it takes them, then shuts its
/// write side once the queue is closed and empty.
async fn run_lane<W: AsyncWrite + Unpin>(mut io: W, feed: Arc<Feed>) {
    loop {
        let more = feed.more.notified();
        tokio::pin!(more);
        more.as_mut().enable();
        let (next, closed) = {
            let mut s = lock(&feed.state);
            let next = s.queue.pop_front();
            if next.is_some() {
                s.writing += 1;
                if let Some(w) = s.writer.take() {
                    w.wake();
                }
            }
            (next, s.closed)
        };
        match next {
            Some(segment) => {
                if let Err(e) = io.write_all(&segment).await {
                    let mut s = lock(&feed.state);
                    s.failed
                        .get_or_insert((e.kind(), format!("a lane of the stream: {e}")));
                    s.wake_all();
                    return;
                }
                let mut s = lock(&feed.state);
                s.spare.push(segment);
                s.writing -= 1;
                if s.drained()
                    && let Some(w) = s.flusher.take()
                {
                    w.wake();
                }
            }
            None if closed => {
                let _ = io.shutdown().await;
                return;
            }
            None => more.await,
        }
    }
}

/// The sender's end: writes the stream over all lanes, reads the first.
#[derive(Debug)]
pub struct Spread<R> {
    first: Ahead<R>,
    feed: Arc<Feed>,
    lanes: Vec<JoinHandle<()>>,
    /// The next segment's number.
    seq: u64,
}

impl<R: AsyncRead + Unpin> Spread<R> {
    /// The first lane's read side (with the bytes already read from it) and
    /// every lane's write side, the first first; each write side goes to a
    /// task of its own (on the current tokio runtime).
    pub fn new<W>(first: (R, Vec<u8>), writers: Vec<W>) -> Self
    where
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let feed = Arc::new(Feed::default());
        let lanes = writers
            .into_iter()
            .map(|w| tokio::spawn(run_lane(w, Arc::clone(&feed))))
            .collect();
        Self {
            first: Ahead::new(first.0, first.1),
            feed,
            lanes,
            seq: 0,
        }
    }

    /// How many connections carry the stream.
    pub fn count(&self) -> usize {
        self.lanes.len()
    }
}

/// Stops the lanes: what was flushed is on their sockets already; what was
/// written and not flushed is given up with the stream.
impl<R> Drop for Spread<R> {
    fn drop(&mut self) {
        for lane in &self.lanes {
            lane.abort();
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Spread<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        {
            let mut s = lock(&this.feed.state);
            if let Some(e) = s.error() {
                return Poll::Ready(Err(e));
            }
            s.reader = Some(cx.waker().clone());
        }
        let n = ready!(this.first.poll_raw(cx, buf.initialize_unfilled()))?;
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<R: AsyncRead + Unpin> AsyncWrite for Spread<R> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let mut segment = {
            let mut s = lock(&this.feed.state);
            if let Some(e) = s.error() {
                return Poll::Ready(Err(e));
            }
            if s.closed {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
            if s.queue.len() >= QUEUED {
                s.writer = Some(cx.waker().clone());
                return Poll::Pending;
            }
            s.spare.pop().unwrap_or_default()
        };
        let data = &buf[..buf.len().min(SEGMENT)];
        let len = u32::try_from(data.len()).map_err(|_| io::Error::other("segment length"))?;
        segment.clear();
        segment.reserve(SEGMENT_HEAD + data.len());
        segment.extend_from_slice(&this.seq.to_be_bytes());
        segment.extend_from_slice(&len.to_be_bytes());
        segment.extend_from_slice(data);
        this.seq += 1;
        lock(&this.feed.state).queue.push_back(segment);
        this.feed.more.notify_one();
        Poll::Ready(Ok(data.len()))
    }

    /// Waits until the lanes wrote everything queued to their sockets.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut s = lock(&self.feed.state);
        if let Some(e) = s.error() {
            return Poll::Ready(Err(e));
        }
        if s.drained() {
            return Poll::Ready(Ok(()));
        }
        s.flusher = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Lets the lanes write what is queued, then shut their write sides.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let newly = {
            let mut s = lock(&this.feed.state);
            !std::mem::replace(&mut s.closed, true)
        };
        if newly {
            this.feed.more.notify_waiters();
        }
        for lane in &mut this.lanes {
            if !lane.is_finished() {
                let _ = ready!(Pin::new(lane).poll(cx));
            }
        }
        match lock(&this.feed.state).error() {
            Some(e) => Poll::Ready(Err(e)),
            None => Poll::Ready(Ok(())),
        }
    }
}
