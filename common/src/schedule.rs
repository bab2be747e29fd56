//! The key schedule (PROTOCOL.md §4): every key of a transfer, each from its own
//! HKDF-SHA256 call with its own label.
//!
//! * Metadata keys: salt = sender nonce, IKM = M, context = hash of the signed
//!   offer header. They exist before the receiver's nonce does.
//! * Everything after the accept: salt = sender nonce ‖ receiver nonce,
//!   IKM = M ‖ X25519 shared secret, context = transcript hash. M and the shared
//!   secret are consumed (and erased) by [`derive_stream_keys`].
//! * Session keys: epoch 0 from the schedule; each next one =
//!   HKDF(salt = fresh random bytes, IKM = previous session key), so a leaked
//!   session key reveals no earlier epoch. Each epoch's AES and HMAC keys are
//!   derived from its session key.

use crate::crypto::kdf::derive;
use crate::crypto::keys::{AesKey, MacKey, MasterKey, SealKeys, SessionKey, SharedSecret};
use crate::ids::{Nonce, TransferId};

/// HKDF labels, one per key purpose.
pub mod label {
    /// Metadata encryption key.
    pub const METADATA_AES: &str = "keyferry/v1 metadata-aes";
    /// Metadata MAC key.
    pub const METADATA_MAC: &str = "keyferry/v1 metadata-mac";
    /// Accept proof MAC key.
    pub const ACCEPT_MAC: &str = "keyferry/v1 accept-mac";
    /// Key-update (session key wrapping) encryption key.
    pub const WRAP_AES: &str = "keyferry/v1 wrap-aes";
    /// Key-update MAC key.
    pub const WRAP_MAC: &str = "keyferry/v1 wrap-mac";
    /// Session key of epoch 0.
    pub const EPOCH_ZERO: &str = "keyferry/v1 session-0";
    /// Trailer encryption key.
    pub const TRAILER_AES: &str = "keyferry/v1 trailer-aes";
    /// Trailer MAC key.
    pub const TRAILER_MAC: &str = "keyferry/v1 trailer-mac";
    /// Receipt MAC key.
    pub const RECEIPT_MAC: &str = "keyferry/v1 receipt-mac";
    /// Next session key from the previous one and fresh bytes.
    pub const SESSION_NEXT: &str = "keyferry/v1 session-next";
    /// An epoch's chunk encryption key.
    pub const EPOCH_AES: &str = "keyferry/v1 epoch-aes";
    /// An epoch's chunk MAC key.
    pub const EPOCH_MAC: &str = "keyferry/v1 epoch-mac";
}

/// Keys that seal the file metadata inside the offer.
pub fn metadata_keys(
    master: &MasterKey,
    sender_nonce: &Nonce,
    transfer_id: &TransferId,
    header_hash: &[u8; 32],
) -> SealKeys {
    let d = |l| {
        derive(
            Some(&sender_nonce.0),
            &[master.expose()],
            l,
            &transfer_id.0,
            header_hash,
        )
    };
    SealKeys {
        aes: AesKey::from_bytes(d(label::METADATA_AES)),
        mac: MacKey::from_bytes(d(label::METADATA_MAC)),
    }
}

/// Everything a transfer's stream needs after the handshake.
#[derive(Debug)]
pub struct StreamKeys {
    /// The transfer these keys belong to.
    pub transfer_id: TransferId,
    /// Wraps the fresh bytes of key updates.
    pub wrap: SealKeys,
    /// Session key of epoch 0.
    pub epoch0: SessionKey,
    /// Seals the trailer.
    pub trailer: SealKeys,
    /// Authenticates the receipt.
    pub receipt: MacKey,
}

/// Derives the accept MAC key and the stream keys, consuming M and the shared
/// secret so that neither outlives this call.
pub fn derive_stream_keys(
    master: MasterKey,
    shared: SharedSecret,
    sender_nonce: &Nonce,
    receiver_nonce: &Nonce,
    transfer_id: &TransferId,
    transcript_hash: &[u8; 32],
) -> (MacKey, StreamKeys) {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(&sender_nonce.0);
    salt[32..].copy_from_slice(&receiver_nonce.0);
    let ikm: [&[u8]; 2] = [master.expose(), shared.expose()];
    let d = |l| derive(Some(&salt), &ikm, l, &transfer_id.0, transcript_hash);
    let accept = MacKey::from_bytes(d(label::ACCEPT_MAC));
    let keys = StreamKeys {
        transfer_id: *transfer_id,
        wrap: SealKeys {
            aes: AesKey::from_bytes(d(label::WRAP_AES)),
            mac: MacKey::from_bytes(d(label::WRAP_MAC)),
        },
        epoch0: SessionKey::from_bytes(d(label::EPOCH_ZERO)),
        trailer: SealKeys {
            aes: AesKey::from_bytes(d(label::TRAILER_AES)),
            mac: MacKey::from_bytes(d(label::TRAILER_MAC)),
        },
        receipt: MacKey::from_bytes(d(label::RECEIPT_MAC)),
    };
    (accept, keys)
}

impl SessionKey {
    /// The chunk keys of `epoch`, derived from this session key.
    pub fn epoch_keys(&self, transfer_id: &TransferId, epoch: u32) -> SealKeys {
        let ctx = epoch.to_be_bytes();
        let d = |l| derive(None, &[self.expose()], l, &transfer_id.0, &ctx);
        SealKeys {
            aes: AesKey::from_bytes(d(label::EPOCH_AES)),
            mac: MacKey::from_bytes(d(label::EPOCH_MAC)),
        }
    }

    /// The session key of `next_epoch`: HKDF(salt = fresh, IKM = this key).
    pub fn ratchet(
        &self,
        fresh: &[u8; 32],
        transfer_id: &TransferId,
        next_epoch: u32,
    ) -> SessionKey {
        SessionKey::from_bytes(derive(
            Some(fresh),
            &[self.expose()],
            label::SESSION_NEXT,
            &transfer_id.0,
            &next_epoch.to_be_bytes(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_of_a_transfer_is_distinct() {
        let tid = TransferId([1; 16]);
        let (accept, k) = derive_stream_keys(
            MasterKey::from_bytes([2; 32]),
            SharedSecret::from_bytes([3; 32]),
            &Nonce([4; 32]),
            &Nonce([5; 32]),
            &tid,
            &[6; 32],
        );
        let meta = metadata_keys(
            &MasterKey::from_bytes([2; 32]),
            &Nonce([4; 32]),
            &tid,
            &[6; 32],
        );
        let e0 = k.epoch0.epoch_keys(&tid, 0);
        let s1 = k.epoch0.ratchet(&[7; 32], &tid, 1);
        let e1 = s1.epoch_keys(&tid, 1);
        let all: Vec<[u8; 32]> = vec![
            *accept.expose(),
            *k.wrap.aes.expose(),
            *k.wrap.mac.expose(),
            *k.epoch0.expose(),
            *k.trailer.aes.expose(),
            *k.trailer.mac.expose(),
            *k.receipt.expose(),
            *meta.aes.expose(),
            *meta.mac.expose(),
            *e0.aes.expose(),
            *e0.mac.expose(),
            *s1.expose(),
            *e1.aes.expose(),
            *e1.mac.expose(),
        ];
        for i in 0..all.len() {
            for j in i + 1..all.len() {
                assert_ne!(all[i], all[j], "keys {i} and {j} collide");
            }
        }
    }

    #[test]
    fn the_receiver_nonce_changes_every_later_key() {
        let tid = TransferId([1; 16]);
        let derive_with = |r: u8| {
            derive_stream_keys(
                MasterKey::from_bytes([2; 32]),
                SharedSecret::from_bytes([3; 32]),
                &Nonce([4; 32]),
                &Nonce([r; 32]),
                &tid,
                &[6; 32],
            )
            .1
        };
        assert_ne!(
            derive_with(5).epoch0.expose(),
            derive_with(9).epoch0.expose()
        );
    }
}
