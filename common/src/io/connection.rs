//! Reading and writing frames over any async byte stream (as mini-redis'
//! `connection.rs`), with the limits of [`crate::wire::frame`].
//!
//! A frame's length is checked against the maximum before the buffer grows for
//! it, and the buffer then grows only as the frame's bytes arrive (at most
//! [`GROW_STEP`] ahead of them), never to the announced length at once: a peer
//! that announces a large frame and sends nothing costs nothing. EOF between
//! frames is a clean end (`Ok(None)`), EOF inside one is an error.
//!
//! An idle connection costs little: before a frame's length is known a read
//! asks for [`HEAD_STEP`] bytes, and a buffer left empty and large after a
//! message is given back, so ten thousand idle receivers hold a few KiB each.

use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::wire::frame::{self, FrameError, LEN_PREFIX};
use crate::wire::message::{self, Message};

/// How far a read buffer may grow ahead of the bytes that arrived.
pub const GROW_STEP: usize = 64 << 10;

/// What a read asks for while no frame length is known yet (most control
/// messages fit).
pub const HEAD_STEP: usize = 1 << 10;

/// An empty buffer larger than this is freed after a message.
const IDLE_KEEP: usize = 16 << 10;

/// Makes room in `buf` for the next read of at most `need` bytes: uses spare
/// capacity where there is some, else grows by at most [`GROW_STEP`].
fn room_for(buf: &mut Vec<u8>, need: usize) -> usize {
    if buf.capacity() == buf.len() {
        buf.reserve(need.min(GROW_STEP));
    }
    (buf.capacity() - buf.len()).min(need)
}

/// A failure on a connection.
#[derive(Debug, Error)]
pub enum ConnError {
    /// The socket failed.
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    /// The peer sent a frame that cannot be accepted.
    #[error("bad frame from peer: {0}")]
    Frame(#[from] FrameError),
    /// The peer closed the connection in the middle of a frame.
    #[error("connection closed in the middle of a frame")]
    Truncated,
    /// A deadline passed while waiting for the peer.
    #[error("timed out after {0:?} waiting for the peer")]
    Timeout(Duration),
}

/// Reads frames from `R`.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    max: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Reads frames of at most `max` bytes from `inner`.
    pub fn new(inner: R, max: usize) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            max,
        }
    }

    /// Continues reading from `inner` with bytes already read from it (see
    /// [`Self::into_parts`]).
    pub fn with_buffer(inner: R, buf: Vec<u8>, max: usize) -> Self {
        Self { inner, buf, max }
    }

    /// Changes the largest frame accepted from now on.
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    /// The stream and the bytes read from it but not yet returned as frames.
    pub fn into_parts(self) -> (R, Vec<u8>) {
        (self.inner, self.buf)
    }

    /// Reads until a whole frame is buffered; returns its end in the buffer,
    /// `Ok(None)` on a clean EOF.
    async fn fill_frame(&mut self) -> Result<Option<usize>, ConnError> {
        loop {
            let need = match frame::peek_len(&self.buf, self.max)? {
                Some(len) if self.buf.len() >= LEN_PREFIX + len => {
                    return Ok(Some(LEN_PREFIX + len));
                }
                Some(len) => LEN_PREFIX + len - self.buf.len(),
                None => HEAD_STEP,
            };
            room_for(&mut self.buf, need);
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ConnError::Truncated)
                };
            }
        }
    }

    /// Reads the next message; `Ok(None)` on a clean EOF. The message is
    /// decoded straight from the read buffer.
    pub async fn read(&mut self) -> Result<Option<Message>, ConnError> {
        let Some(end) = self.fill_frame().await? else {
            return Ok(None);
        };
        let msg = message::decode_payload(&self.buf[LEN_PREFIX..end])?;
        self.buf.drain(..end);
        if self.buf.is_empty() && self.buf.capacity() > IDLE_KEEP {
            self.buf = Vec::new();
        }
        Ok(Some(msg))
    }

    /// Reads the next frame's payload into `out` (its allocation reused)
    /// without decoding it; `Ok(false)` on a clean EOF. The bulk path: most of
    /// a large payload goes from the socket straight into `out`, and the
    /// caller can open a chunk record where it lies.
    ///
    /// Not cancel-safe: a future dropped in the middle of a frame leaves the
    /// stream in an unknown place, and the connection must be abandoned.
    pub async fn read_payload_into(&mut self, out: &mut Vec<u8>) -> Result<bool, ConnError> {
        while self.buf.len() < LEN_PREFIX {
            room_for(&mut self.buf, GROW_STEP);
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(false)
                } else {
                    Err(ConnError::Truncated)
                };
            }
        }
        let Some(len) = frame::peek_len(&self.buf, self.max)? else {
            return Err(ConnError::Truncated);
        };
        let buffered = (self.buf.len() - LEN_PREFIX).min(len);
        out.clear();
        out.extend_from_slice(&self.buf[LEN_PREFIX..LEN_PREFIX + buffered]);
        self.buf.drain(..LEN_PREFIX + buffered);
        // Read into the spare capacity as it is (no zeroing first), growing
        // the buffer only as the bytes arrive.
        while out.len() < len {
            let room = room_for(out, len - out.len());
            if (&mut self.inner).take(room as u64).read_buf(out).await? == 0 {
                return Err(ConnError::Truncated);
            }
        }
        Ok(true)
    }

    /// The next frame's length (not checked against the maximum), reading
    /// until its length prefix is buffered; `Ok(None)` on a clean EOF.
    pub async fn peek_len(&mut self) -> Result<Option<usize>, ConnError> {
        while self.buf.len() < LEN_PREFIX {
            room_for(&mut self.buf, GROW_STEP);
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ConnError::Truncated)
                };
            }
        }
        let mut len = [0u8; LEN_PREFIX];
        len.copy_from_slice(&self.buf[..LEN_PREFIX]);
        Ok(Some(u32::from_be_bytes(len) as usize))
    }

    /// The next message, decoded but left in the buffer: [`Self::consume_peeked`]
    /// takes it, anything else reads it again. `Ok(None)` on a clean EOF.
    pub async fn peek_message(&mut self) -> Result<Option<Message>, ConnError> {
        let Some(end) = self.fill_frame().await? else {
            return Ok(None);
        };
        Ok(Some(message::decode_payload(&self.buf[LEN_PREFIX..end])?))
    }

    /// Drops the frame [`Self::peek_message`] returned.
    pub fn consume_peeked(&mut self) {
        if let Ok(Some(len)) = frame::peek_len(&self.buf, self.max)
            && self.buf.len() >= LEN_PREFIX + len
        {
            self.buf.drain(..LEN_PREFIX + len);
        }
    }

    /// [`Self::read`] with a deadline.
    pub async fn read_timeout(&mut self, limit: Duration) -> Result<Option<Message>, ConnError> {
        tokio::time::timeout(limit, self.read())
            .await
            .map_err(|_| ConnError::Timeout(limit))?
    }
}

/// Writes frames to `W`.
#[derive(Debug)]
pub struct FrameWriter<W> {
    inner: W,
    max: usize,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// Writes frames of at most `max` bytes to `inner`.
    pub fn new(inner: W, max: usize) -> Self {
        Self { inner, max }
    }

    /// Writes one message and flushes it.
    pub async fn write(&mut self, msg: &Message) -> Result<(), ConnError> {
        let bytes = message::encode(msg, self.max)?;
        self.write_frame(&bytes).await
    }

    /// Writes an already encoded frame and flushes it.
    pub async fn write_frame(&mut self, bytes: &[u8]) -> Result<(), ConnError> {
        self.write_frame_unflushed(bytes).await?;
        self.flush().await
    }

    /// Writes an already encoded frame without waiting for it to reach the
    /// socket: for a stream's data frames, which a [`Self::flush`] follows
    /// (over one TCP connection the same as [`Self::write_frame`]; over
    /// lanes, the writer goes on while the lanes write).
    pub async fn write_frame_unflushed(&mut self, bytes: &[u8]) -> Result<(), ConnError> {
        self.inner.write_all(bytes).await?;
        Ok(())
    }

    /// Waits until everything written reached the socket(s).
    pub async fn flush(&mut self) -> Result<(), ConnError> {
        self.inner.flush().await?;
        Ok(())
    }

    /// Closes the write side.
    pub async fn shutdown(&mut self) -> Result<(), ConnError> {
        self.inner.shutdown().await?;
        Ok(())
    }
}

/// Both directions of one stream.
#[derive(Debug)]
pub struct Connection<S> {
    /// Incoming frames.
    pub reader: FrameReader<tokio::io::ReadHalf<S>>,
    /// Outgoing frames.
    pub writer: FrameWriter<tokio::io::WriteHalf<S>>,
}

impl<S: AsyncRead + AsyncWrite> Connection<S> {
    /// Splits `stream` into a frame reader and writer with the default maximum.
    pub fn new(stream: S) -> Self {
        Self::with_buffer(stream, Vec::new())
    }

    /// Like [`Self::new`], for a stream of which `buf` was already read.
    pub fn with_buffer(stream: S, buf: Vec<u8>) -> Self {
        let (r, w) = tokio::io::split(stream);
        Self {
            reader: FrameReader::with_buffer(r, buf, frame::MAX_FRAME_LEN),
            writer: FrameWriter::new(w, frame::MAX_FRAME_LEN),
        }
    }

    /// The stream back, and the bytes read from it but not yet returned as
    /// frames.
    pub fn into_inner(self) -> (S, Vec<u8>)
    where
        S: Unpin,
    {
        let (r, buf) = self.reader.into_parts();
        (r.unsplit(self.writer.inner), buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn payloads_read_into_a_reused_buffer_match_the_frames() {
        let big = Message::Chunk {
            stream_id: crate::ids::StreamId([3; 16]),
            record: (0..100_000u32).map(|i| i as u8).collect(),
        };
        let small = Message::Hello { version: 1 };
        let frames: Vec<Vec<u8>> = [&small, &big, &big, &small, &big]
            .iter()
            .map(|m| message::encode(m, frame::MAX_FRAME_LEN).unwrap())
            .collect();
        let all = frames.concat();
        // Odd-sized writes, so frames and prefixes straddle reads.
        let (a, mut b) = tokio::io::duplex(4096);
        let writer = tokio::spawn(async move {
            for piece in all.chunks(7919) {
                b.write_all(piece).await.unwrap();
            }
        });
        let mut reader = FrameReader::new(a, frame::MAX_FRAME_LEN);
        let mut out = vec![0xee; 3];
        for (i, f) in frames.iter().enumerate() {
            if i == 3 {
                // The decoding read still works between the raw ones.
                assert_eq!(reader.read().await.unwrap(), Some(small.clone()));
                continue;
            }
            assert!(reader.read_payload_into(&mut out).await.unwrap());
            assert_eq!(out, f[LEN_PREFIX..], "frame {i}");
        }
        writer.await.unwrap();
        assert!(!reader.read_payload_into(&mut out).await.unwrap());

        // Cut inside a payload, and a length over the limit.
        let f = message::encode(&big, frame::MAX_FRAME_LEN).unwrap();
        let mut reader = FrameReader::new(&f[..f.len() - 1], frame::MAX_FRAME_LEN);
        assert!(matches!(
            reader.read_payload_into(&mut out).await,
            Err(ConnError::Truncated)
        ));
        let mut reader = FrameReader::new(&f[..], 1000);
        assert!(matches!(
            reader.read_payload_into(&mut out).await,
            Err(ConnError::Frame(FrameError::TooLarge { .. }))
        ));
    }

    #[tokio::test]
    async fn an_announced_frame_is_not_allocated_before_its_bytes_arrive() {
        // A peer announces a 1 MiB frame, sends ten bytes of it and goes quiet.
        let (a, mut b) = tokio::io::duplex(64 << 10);
        let mut announce = (1u32 << 20).to_be_bytes().to_vec();
        announce.extend_from_slice(&[5; 10]);
        b.write_all(&announce).await.unwrap();
        let quiet = Duration::from_millis(50);
        let mut reader = FrameReader::new(a, frame::MAX_FRAME_LEN);
        assert!(matches!(
            reader.read_timeout(quiet).await,
            Err(ConnError::Timeout(_))
        ));
        assert!(
            reader.buf.capacity() <= 2 * GROW_STEP,
            "{}",
            reader.buf.capacity()
        );

        let (a, mut b) = tokio::io::duplex(64 << 10);
        b.write_all(&announce).await.unwrap();
        let mut reader = FrameReader::new(a, frame::MAX_FRAME_LEN);
        let mut out = Vec::new();
        let _ = tokio::time::timeout(quiet, reader.read_payload_into(&mut out)).await;
        assert!(out.capacity() <= 2 * GROW_STEP, "{}", out.capacity());
        drop(b);
    }

    #[tokio::test]
    async fn reads_frames_across_partial_writes_and_refuses_oversize() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut reader = FrameReader::new(a, 1024);
        let frame = message::encode(&Message::Hello { version: 1 }, 1024).unwrap();
        let writer = tokio::spawn(async move {
            for byte in frame.iter().chain(frame.iter()) {
                b.write_all(&[*byte]).await.unwrap();
            }
            b.write_all(&[0xff, 0xff, 0xff, 0xff]).await.unwrap();
            b
        });
        assert_eq!(
            reader.read().await.unwrap(),
            Some(Message::Hello { version: 1 })
        );
        assert_eq!(
            reader.read().await.unwrap(),
            Some(Message::Hello { version: 1 })
        );
        assert!(matches!(
            reader.read().await,
            Err(ConnError::Frame(FrameError::TooLarge { .. }))
        ));
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn eof_between_frames_is_clean_and_inside_a_frame_is_an_error() {
        let (a, mut b) = tokio::io::duplex(64);
        b.write_all(&[0, 0, 0, 2, 0]).await.unwrap();
        drop(b);
        let mut reader = FrameReader::new(a, 1024);
        assert!(matches!(reader.read().await, Err(ConnError::Truncated)));

        let (a, b) = tokio::io::duplex(64);
        drop(b);
        assert!(FrameReader::new(a, 1024).read().await.unwrap().is_none());
    }
}
