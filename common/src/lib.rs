//! keyferry's shared core: everything the broker and the agents must agree on.
//!
//! Layers, bottom up — nothing lower imports anything higher:
//!
//! * [`encode`]: hand-built, unambiguous encodings of everything signed or MACed.
//! * [`crypto`]: AES-256-CBC, HMAC-SHA256, HKDF, RSA-OAEP/PSS, X25519, behind typed,
//!   zeroizing keys and one opaque authentication error.
//! * [`identity`], [`name`], [`pins`]: RSA identities and key files, agent names,
//!   trust-on-first-use pin files.
//! * [`schedule`], [`record`], [`handshake`], [`transfer`]: the key schedule, the
//!   byte layouts of the records, the offer/accept handshake and the sender's and
//!   receiver's stream state machines. No I/O: bytes in, bytes or errors out.
//! * [`message`], [`frame`], [`connection`]: postcard messages in length-prefixed
//!   frames with a hard size limit, read and written over any async stream.
//! * [`auth`], [`tls`]: what an agent signs to authenticate to the broker; TLS 1.3
//!   configurations and the agents' pinning certificate verifier.
//! * [`filename`], [`text`], [`budget`], [`replay`]: receiver-side guards — file
//!   names from the wire, escaping of printed peer text, RSA decryption budgets,
//!   replayed offers.
//!
//! `docs/PROTOCOL.md` in the repository is the specification this crate implements.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod auth;
pub mod budget;
pub mod connection;
pub mod crypto;
pub mod encode;
pub mod filename;
pub mod frame;
pub mod fsutil;
pub mod handshake;
pub mod identity;
pub mod ids;
pub mod message;
pub mod name;
pub mod pins;
pub mod record;
pub mod replay;
pub mod schedule;
pub mod text;
pub mod tls;
pub mod transfer;
pub mod units;

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 1;
