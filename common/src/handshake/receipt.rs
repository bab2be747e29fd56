//! The stored receipt (PROTOCOL.md §3.4): the receiver's signed word on how a
//! stored transfer ended — placed, with the SHA-256 it verified, or refused,
//! with a reason in words — which the broker keeps for the sender, and the
//! sender checks with its pin for the receiver.

use crate::PROTOCOL_VERSION;
use crate::encode::{Decoder, Encoder};
use crate::identity::{Fingerprint, Identity, PublicKey};
use crate::ids::TransferId;

use super::{HandshakeError, MAX_WRAPPED_LEN};

/// Signature context of a stored receipt.
pub const LABEL: &str = "keyferry/v7 stored-receipt";

/// How a stored transfer ended, in the receiver's signed word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Verified and placed; `digest` is the SHA-256 of the data the sender
    /// signed in its trailer (§5.5) and the receiver checked.
    Delivered {
        /// SHA-256 of the data.
        digest: [u8; 32],
    },
    /// Not taken; `why` says so in words (at most 200 bytes of UTF-8).
    Refused {
        /// The reason, for the sender's user.
        why: String,
    },
}

/// A receiver's signed receipt for one stored transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredReceipt {
    /// The transfer.
    pub transfer_id: TransferId,
    /// Its sender's key fingerprint.
    pub sender_fp: Fingerprint,
    /// The receiver's key fingerprint.
    pub receiver_fp: Fingerprint,
    /// When the receiver ended it (its clock, Unix seconds).
    pub time: u64,
    /// How.
    pub outcome: Outcome,
}

/// Longest reason in a refused receipt.
pub const MAX_REASON_LEN: usize = 200;

impl StoredReceipt {
    fn body(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        e.u16(PROTOCOL_VERSION)
            .fixed(&self.transfer_id.0)
            .fixed(&self.sender_fp.0)
            .fixed(&self.receiver_fp.0)
            .u64(self.time);
        match &self.outcome {
            Outcome::Delivered { digest } => e.u8(0).fixed(digest),
            Outcome::Refused { why } => e.u8(1).bytes(why.as_bytes()),
        };
        e.finish()
    }

    /// Signs it with the receiver's identity: the bytes for the broker. A
    /// reason longer than [`MAX_REASON_LEN`] is cut at a character boundary.
    pub fn sign(mut self, me: &Identity) -> Vec<u8> {
        if let Outcome::Refused { why } = &mut self.outcome
            && why.len() > MAX_REASON_LEN
        {
            let mut cut = MAX_REASON_LEN;
            while !why.is_char_boundary(cut) {
                cut -= 1;
            }
            why.truncate(cut);
        }
        let body = self.body();
        let signature = me.sign(LABEL, &body);
        Encoder::default().bytes(&body).bytes(&signature).finish()
    }

    /// Parses and verifies a signed receipt with the receiver's key (the
    /// sender's pin for that receiver).
    pub fn verify(signed: &[u8], receiver_key: &PublicKey) -> Result<Self, HandshakeError> {
        let bad = |_| HandshakeError::Malformed("stored receipt");
        let mut outer = Decoder::new(signed);
        let body = outer.bytes(1024).map_err(bad)?;
        let signature = outer.bytes(MAX_WRAPPED_LEN).map_err(bad)?;
        outer.finish().map_err(bad)?;
        receiver_key.verify(LABEL, body, signature)?;
        let mut d = Decoder::new(body);
        let version = d.u16().map_err(bad)?;
        if version != PROTOCOL_VERSION {
            return Err(HandshakeError::Version(version));
        }
        let transfer_id = TransferId(d.array().map_err(bad)?);
        let sender_fp = Fingerprint(d.array().map_err(bad)?);
        let receiver_fp = Fingerprint(d.array().map_err(bad)?);
        let time = d.u64().map_err(bad)?;
        let outcome = match d.u8().map_err(bad)? {
            0 => Outcome::Delivered {
                digest: d.array().map_err(bad)?,
            },
            1 => {
                let why = d.bytes(MAX_REASON_LEN).map_err(bad)?;
                Outcome::Refused {
                    why: String::from_utf8(why.to_vec())
                        .map_err(|_| HandshakeError::Malformed("stored receipt"))?,
                }
            }
            _ => return Err(HandshakeError::Malformed("stored receipt")),
        };
        d.finish().map_err(bad)?;
        if receiver_fp != receiver_key.fingerprint() {
            return Err(HandshakeError::Auth);
        }
        Ok(Self {
            transfer_id,
            sender_fp,
            receiver_fp,
            time,
            outcome,
        })
    }
}
