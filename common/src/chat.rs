//! Chat records (PROTOCOL.md §6.6): what one chunk of a chat stream carries.
//! A chat is a stream of kind `Chat` from each member to the others; every
//! chunk is exactly one record: a line (signed by its author, so that no
//! other member of a group can put words in its mouth), an acknowledgement
//! of another member's line, or a keepalive that also keeps the session key
//! rotating while nobody types. Hand-built, bounded, nothing left over.

use crate::encode::{Decoder, Encoder};
use crate::ids::StreamId;
use crate::name::{AgentName, MAX_NAME_LEN};

/// The bound a chat stream's terms declare (`size_known = false`): a chat
/// carries at most this many bytes of records, then starts a new stream.
pub const CHAT_BOUND: u64 = 1 << 30;
/// The longest line of text, in bytes.
pub const MAX_LINE: usize = 4096;
/// The longest signature (a 4096-bit key's).
pub const MAX_SIGNATURE: usize = 512;
/// The context of a line's signature.
pub const LINE_SIGNATURE: &str = "keyferry/v4 chat-line";

const LINE: u8 = 1;
const ACK: u8 = 2;
const KEEPALIVE: u8 = 0;

/// One record of a chat stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A line typed by the stream's sender.
    Line {
        /// Its number among the sender's lines in this chat (from 1).
        seq: u32,
        /// When it was typed, milliseconds since the Unix epoch (the
        /// sender's clock).
        time_ms: u64,
        /// The text (UTF-8, at most [`MAX_LINE`] bytes).
        text: String,
        /// The sender's signature over [`line_signed`].
        signature: Vec<u8>,
    },
    /// The stream's sender has shown line `seq` of `author`.
    Ack {
        /// The line's author.
        author: AgentName,
        /// The line's number.
        seq: u32,
    },
    /// Nothing; keeps the stream (and its key rotation) going.
    Keepalive,
}

/// Why a record was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a chat record that is not well formed")]
pub struct BadRecord;

/// The bytes a line's signature covers: the stream, the line's number and
/// time, and its text.
pub fn line_signed(stream_id: &StreamId, seq: u32, time_ms: u64, text: &str) -> Vec<u8> {
    Encoder::default()
        .fixed(&stream_id.0)
        .u32(seq)
        .u64(time_ms)
        .bytes(text.as_bytes())
        .finish()
}

impl Record {
    /// The record as a chunk's plaintext.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        match self {
            Self::Line {
                seq,
                time_ms,
                text,
                signature,
            } => e
                .u8(LINE)
                .u32(*seq)
                .u64(*time_ms)
                .bytes(text.as_bytes())
                .bytes(signature),
            Self::Ack { author, seq } => e.u8(ACK).bytes(author.as_str().as_bytes()).u32(*seq),
            Self::Keepalive => e.u8(KEEPALIVE),
        };
        e.finish()
    }

    /// Parses a chunk's plaintext as exactly one record.
    pub fn decode(bytes: &[u8]) -> Result<Self, BadRecord> {
        let mut d = Decoder::new(bytes);
        let record = match d.u8().map_err(|_| BadRecord)? {
            LINE => {
                let seq = d.u32().map_err(|_| BadRecord)?;
                let time_ms = d.u64().map_err(|_| BadRecord)?;
                let text = d.bytes(MAX_LINE).map_err(|_| BadRecord)?;
                let text = std::str::from_utf8(text).map_err(|_| BadRecord)?.to_owned();
                let signature = d.bytes(MAX_SIGNATURE).map_err(|_| BadRecord)?.to_vec();
                Self::Line {
                    seq,
                    time_ms,
                    text,
                    signature,
                }
            }
            ACK => {
                let name = d.bytes(MAX_NAME_LEN).map_err(|_| BadRecord)?;
                let name = std::str::from_utf8(name).map_err(|_| BadRecord)?;
                let author = AgentName::new(name).map_err(|_| BadRecord)?;
                let seq = d.u32().map_err(|_| BadRecord)?;
                Self::Ack { author, seq }
            }
            KEEPALIVE => Self::Keepalive,
            _ => return Err(BadRecord),
        };
        d.finish().map_err(|_| BadRecord)?;
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn records_round_trip_and_nothing_else_parses() {
        let line = Record::Line {
            seq: 7,
            time_ms: 1_800_000_000_123,
            text: "hello".into(),
            signature: vec![9; 384],
        };
        let ack = Record::Ack {
            author: AgentName::new("bob").unwrap(),
            seq: 3,
        };
        for r in [line, ack, Record::Keepalive] {
            let bytes = r.encode();
            assert_eq!(Record::decode(&bytes).unwrap(), r);
            let mut longer = bytes.clone();
            longer.push(0);
            assert_eq!(Record::decode(&longer), Err(BadRecord));
            assert_eq!(Record::decode(&bytes[..bytes.len() - 1]), Err(BadRecord));
        }
        // Exact bytes: an ack of bob's line 3.
        assert_eq!(
            Record::Ack {
                author: AgentName::new("bob").unwrap(),
                seq: 3
            }
            .encode(),
            [2, 0, 0, 0, 3, b'b', b'o', b'b', 0, 0, 0, 3]
        );
        assert_eq!(Record::decode(&[3]), Err(BadRecord));
        assert_eq!(Record::decode(&[]), Err(BadRecord));
        let bad_name = [2, 0, 0, 0, 1, b'B', 0, 0, 0, 1];
        assert_eq!(Record::decode(&bad_name), Err(BadRecord));
        let long = Record::Line {
            seq: 1,
            time_ms: 0,
            text: "x".repeat(MAX_LINE + 1),
            signature: vec![],
        };
        assert_eq!(Record::decode(&long.encode()), Err(BadRecord));
    }
}
