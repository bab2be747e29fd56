//! What the sender's stream hands out: frames ready to be written, and chunks
//! ready to be sealed (on any thread) into such frames.

use std::sync::Arc;

use crate::crypto::aead::{self, ChunkKey};
use crate::wire::chunk::ChunkFrame;
use crate::wire::frame::MAX_FRAME_LEN;
use crate::wire::message::{self, Message};
use crate::wire::record::chunk_header;

/// One frame ready to be written, exactly as it goes on the wire: a
/// `Message::Root`, `Manifest`, `KeyUpdate`, `Chunk` or `Trailer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyFrame {
    frame: Vec<u8>,
    record_at: usize,
}

impl ReadyFrame {
    /// A frame for the record of a small message (everything but a chunk).
    pub(crate) fn small(msg: &Message, record_len: usize) -> Self {
        let frame = message::encode(msg, MAX_FRAME_LEN)
            .expect("records other than chunks are far below the frame limit");
        Self {
            record_at: frame.len() - record_len,
            frame,
        }
    }

    /// The frame's bytes.
    pub fn frame(&self) -> &[u8] {
        &self.frame
    }

    /// The record inside the frame (what the message carries).
    pub fn record(&self) -> &[u8] {
        &self.frame[self.record_at..]
    }

    /// The frame's buffer, to be written and then reused for another chunk.
    pub fn into_frame(self) -> Vec<u8> {
        self.frame
    }
}

/// A chunk ready to be sealed, possibly on another thread.
pub struct ChunkJob {
    pub(crate) key: Arc<ChunkKey>,
    pub(crate) ad: Vec<u8>,
    pub(crate) epoch: u32,
    pub(crate) seq: u64,
    pub(crate) last: bool,
    pub(crate) frame: ChunkFrame,
}

impl std::fmt::Debug for ChunkJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkJob")
            .field("epoch", &self.epoch)
            .field("seq", &self.seq)
            .field("last", &self.last)
            .field("len", &self.frame.plaintext_len())
            .finish_non_exhaustive()
    }
}

impl ChunkJob {
    /// Seals the chunk where it lies (AES-256-GCM, the nonce made of its epoch
    /// and sequence number) and completes its frame.
    pub fn seal(mut self) -> ReadyFrame {
        let nonce = aead::chunk_nonce(self.epoch, self.seq);
        let (header, ciphertext, tag) = self.frame.record_parts_mut();
        *tag = aead::seal_in_place(&self.key, &nonce, &self.ad, ciphertext);
        *header = chunk_header(self.epoch, self.seq, self.last, ciphertext.len());
        ReadyFrame {
            record_at: self.frame.record_at(),
            frame: self.frame.into_bytes(),
        }
    }

    /// Plaintext length of this chunk.
    pub fn len(&self) -> usize {
        self.frame.plaintext_len()
    }

    /// Whether the chunk is empty (only a final chunk with nothing left is).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
