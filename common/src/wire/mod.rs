//! What travels, as bytes, below the handshake and the stream state machines:
//! the record layouts and what each tag covers ([`record`]), the
//! length-prefixed frame codec ([`frame`]), the message vocabulary and its
//! frames ([`message`]), and the chunk fast path that writes and recognises a
//! chunk's envelope without copying its record ([`chunk`]).
//!
//! Layers inside, bottom up: `record` ← `frame` ← `message` ← `chunk` (its
//! tests check it against `message`). Nothing here authenticates anything.

pub mod chunk;
pub mod frame;
pub mod message;
pub mod record;
