//! The key schedule (PROTOCOL.md §4): every key of a transfer, each from its own
//! HKDF-SHA256 call with its own label.
//!
//! * Terms keys: salt = sender nonce, IKM = M, context = hash of the signed
//!   offer header. They exist before the receiver's nonce does, and seal only
//!   what the receiver must decide on before accepting (kind, size).
//! * Pair keys, one set per sender–receiver handshake: salt = sender nonce ‖
//!   receiver nonce, IKM = M ‖ X25519 secret ‖ ML-KEM secret (the hybrid
//!   combiner: HKDF-Extract over the concatenation; both shares are in the
//!   transcript, which is every pair key's context). M and both secrets are
//!   consumed (and erased) by [`derive_pair_keys`]. The pair's root keys wrap
//!   the stream root.
//! * Stream keys: IKM = the stream root (32 random bytes, one per upload,
//!   shared by every receiver of it), salt = stream id. Session keys: epoch 0
//!   from the stream keys; each next one = HKDF(salt = fresh random bytes,
//!   IKM = previous session key), so a leaked session key reveals no earlier
//!   epoch. Each epoch's AES-256-GCM chunk key is derived from its session key.

use zeroize::Zeroizing;

use crate::crypto::aead::ChunkKey;
use crate::crypto::kdf::derive;
use crate::crypto::keys::{
    AesKey, MacKey, MasterKey, SealKeys, SessionKey, SharedSecret, StreamRoot,
};
use crate::ids::{Nonce, StreamId, TransferId};

/// HKDF labels, one per key purpose.
pub mod label {
    /// Terms (what is offered) encryption key.
    pub const TERMS_AES: &str = "keyferry/v2 terms-aes";
    /// Terms MAC key.
    pub const TERMS_MAC: &str = "keyferry/v2 terms-mac";
    /// Accept proof MAC key.
    pub const ACCEPT_MAC: &str = "keyferry/v2 accept-mac";
    /// Resume proof MAC key.
    pub const RESUME_MAC: &str = "keyferry/v2 resume-mac";
    /// Stream-root wrapping encryption key.
    pub const ROOT_AES: &str = "keyferry/v2 root-aes";
    /// Stream-root wrapping MAC key.
    pub const ROOT_MAC: &str = "keyferry/v2 root-mac";
    /// Receipt MAC key.
    pub const RECEIPT_MAC: &str = "keyferry/v2 receipt-mac";
    /// Proves a direct connection between the agents (PROTOCOL.md §2.7).
    pub const DIRECT_MAC: &str = "keyferry/v5 direct-mac";
    /// Key-update (session key wrapping) encryption key.
    pub const WRAP_AES: &str = "keyferry/v2 wrap-aes";
    /// Key-update MAC key.
    pub const WRAP_MAC: &str = "keyferry/v2 wrap-mac";
    /// Manifest encryption key.
    pub const MANIFEST_AES: &str = "keyferry/v2 manifest-aes";
    /// Manifest MAC key.
    pub const MANIFEST_MAC: &str = "keyferry/v2 manifest-mac";
    /// Trailer encryption key.
    pub const TRAILER_AES: &str = "keyferry/v2 trailer-aes";
    /// Trailer MAC key.
    pub const TRAILER_MAC: &str = "keyferry/v2 trailer-mac";
    /// Session key of epoch 0.
    pub const EPOCH_ZERO: &str = "keyferry/v2 session-0";
    /// Next session key from the previous one and fresh bytes.
    pub const SESSION_NEXT: &str = "keyferry/v2 session-next";
    /// An epoch's chunk key (AES-256-GCM; version 3).
    pub const EPOCH_GCM: &str = "keyferry/v3 epoch-gcm";
}

/// Keys that seal the offer's terms.
pub fn terms_keys(
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
        aes: AesKey::from_bytes(d(label::TERMS_AES)),
        mac: MacKey::from_bytes(d(label::TERMS_MAC)),
    }
}

/// The secrets one handshake agreed on: the master key and the two
/// ephemeral shared secrets.
#[derive(Debug)]
pub struct Secrets {
    /// The RSA-wrapped master key.
    pub master: MasterKey,
    /// The X25519 shared secret.
    pub x25519: SharedSecret,
    /// The ML-KEM-768 shared secret.
    pub mlkem: SharedSecret,
}

/// The keys of one sender–receiver pair, besides the accept's two MAC keys.
#[derive(Debug)]
pub struct PairKeys {
    /// The pair's transfer.
    pub transfer_id: TransferId,
    /// The stream it receives.
    pub stream_id: StreamId,
    /// Wraps the stream root for this receiver.
    pub root: SealKeys,
    /// Authenticates this receiver's receipt.
    pub receipt: MacKey,
    /// Proves a direct connection between the two agents (shared with the
    /// task that sets that connection up).
    pub direct: std::sync::Arc<MacKey>,
}

/// The accept's MAC keys: one over the accept, one over the resume point.
#[derive(Debug)]
pub struct AcceptKeys {
    /// Authenticates the accept's fixed fields.
    pub accept: MacKey,
    /// Authenticates the resume point (which never travels in clear).
    pub resume: MacKey,
}

/// Derives a pair's keys, consuming the secrets so that none outlives this call.
pub fn derive_pair_keys(
    secrets: Secrets,
    sender_nonce: &Nonce,
    receiver_nonce: &Nonce,
    transfer_id: &TransferId,
    stream_id: &StreamId,
    transcript_hash: &[u8; 32],
) -> (AcceptKeys, PairKeys) {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(&sender_nonce.0);
    salt[32..].copy_from_slice(&receiver_nonce.0);
    let ikm: [&[u8]; 3] = [
        secrets.master.expose(),
        secrets.x25519.expose(),
        secrets.mlkem.expose(),
    ];
    let d = |l| derive(Some(&salt), &ikm, l, &transfer_id.0, transcript_hash);
    let accept = AcceptKeys {
        accept: MacKey::from_bytes(d(label::ACCEPT_MAC)),
        resume: MacKey::from_bytes(d(label::RESUME_MAC)),
    };
    let pair = PairKeys {
        transfer_id: *transfer_id,
        stream_id: *stream_id,
        root: SealKeys {
            aes: AesKey::from_bytes(d(label::ROOT_AES)),
            mac: MacKey::from_bytes(d(label::ROOT_MAC)),
        },
        receipt: MacKey::from_bytes(d(label::RECEIPT_MAC)),
        direct: std::sync::Arc::new(MacKey::from_bytes(d(label::DIRECT_MAC))),
    };
    (accept, pair)
}

/// Everything a stream needs, shared by every receiver of it.
#[derive(Debug)]
pub struct StreamKeys {
    /// The stream these keys belong to.
    pub stream_id: StreamId,
    /// Wraps the fresh bytes of key updates.
    pub wrap: SealKeys,
    /// Session key of epoch 0.
    pub epoch0: SessionKey,
    /// Seals the manifest.
    pub manifest: SealKeys,
    /// Seals the trailer.
    pub trailer: SealKeys,
}

/// The stream keys of `root`.
pub fn derive_stream_keys(root: &StreamRoot, stream_id: &StreamId) -> StreamKeys {
    let d = |l| derive(Some(&stream_id.0), &[root.expose()], l, &stream_id.0, b"");
    StreamKeys {
        stream_id: *stream_id,
        wrap: SealKeys {
            aes: AesKey::from_bytes(d(label::WRAP_AES)),
            mac: MacKey::from_bytes(d(label::WRAP_MAC)),
        },
        epoch0: SessionKey::from_bytes(d(label::EPOCH_ZERO)),
        manifest: SealKeys {
            aes: AesKey::from_bytes(d(label::MANIFEST_AES)),
            mac: MacKey::from_bytes(d(label::MANIFEST_MAC)),
        },
        trailer: SealKeys {
            aes: AesKey::from_bytes(d(label::TRAILER_AES)),
            mac: MacKey::from_bytes(d(label::TRAILER_MAC)),
        },
    }
}

impl SessionKey {
    /// The chunk key of `epoch`, derived from this session key.
    pub fn epoch_key(&self, stream_id: &StreamId, epoch: u32) -> ChunkKey {
        ChunkKey::from_bytes(self.epoch_key_bytes(stream_id, epoch))
    }

    fn epoch_key_bytes(&self, stream_id: &StreamId, epoch: u32) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(derive(
            None,
            &[self.expose()],
            label::EPOCH_GCM,
            &stream_id.0,
            &epoch.to_be_bytes(),
        ))
    }

    /// The session key of `next_epoch`: HKDF(salt = fresh, IKM = this key).
    pub fn ratchet(&self, fresh: &[u8; 32], stream_id: &StreamId, next_epoch: u32) -> SessionKey {
        SessionKey::from_bytes(derive(
            Some(fresh),
            &[self.expose()],
            label::SESSION_NEXT,
            &stream_id.0,
            &next_epoch.to_be_bytes(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets(m: u8) -> Secrets {
        Secrets {
            master: MasterKey::from_bytes([m; 32]),
            x25519: SharedSecret::from_bytes([3; 32]),
            mlkem: SharedSecret::from_bytes([8; 32]),
        }
    }

    #[test]
    fn every_key_of_a_transfer_is_distinct() {
        let (tid, sid) = (TransferId([1; 16]), StreamId([1; 16]));
        let (accept, pair) = derive_pair_keys(
            secrets(2),
            &Nonce([4; 32]),
            &Nonce([5; 32]),
            &tid,
            &sid,
            &[6; 32],
        );
        let terms = terms_keys(
            &MasterKey::from_bytes([2; 32]),
            &Nonce([4; 32]),
            &tid,
            &[6; 32],
        );
        let k = derive_stream_keys(&StreamRoot::from_bytes([2; 32]), &sid);
        let e0 = k.epoch0.epoch_key_bytes(&sid, 0);
        let s1 = k.epoch0.ratchet(&[7; 32], &sid, 1);
        let e1 = s1.epoch_key_bytes(&sid, 1);
        let all: Vec<[u8; 32]> = vec![
            *accept.accept.expose(),
            *accept.resume.expose(),
            *pair.root.aes.expose(),
            *pair.root.mac.expose(),
            *pair.receipt.expose(),
            *terms.aes.expose(),
            *terms.mac.expose(),
            *k.wrap.aes.expose(),
            *k.wrap.mac.expose(),
            *k.epoch0.expose(),
            *k.manifest.aes.expose(),
            *k.manifest.mac.expose(),
            *k.trailer.aes.expose(),
            *k.trailer.mac.expose(),
            *e0,
            *s1.expose(),
            *e1,
        ];
        for i in 0..all.len() {
            for j in i + 1..all.len() {
                assert_ne!(all[i], all[j], "keys {i} and {j} collide");
            }
        }
    }

    #[test]
    fn every_secret_and_the_receiver_nonce_change_every_pair_key() {
        let (tid, sid) = (TransferId([1; 16]), StreamId([1; 16]));
        let derive_with = |s: Secrets, r: u8| {
            derive_pair_keys(s, &Nonce([4; 32]), &Nonce([r; 32]), &tid, &sid, &[6; 32])
                .1
                .root
                .aes
                .expose()
                .to_owned()
        };
        let base = derive_with(secrets(2), 5);
        assert_ne!(base, derive_with(secrets(2), 9));
        assert_ne!(base, derive_with(secrets(3), 5));
        let mut other_x = secrets(2);
        other_x.x25519 = SharedSecret::from_bytes([4; 32]);
        assert_ne!(base, derive_with(other_x, 5));
        let mut other_k = secrets(2);
        other_k.mlkem = SharedSecret::from_bytes([9; 32]);
        assert_ne!(base, derive_with(other_k, 5));
    }
}

#[cfg(test)]
mod chunk_vector {
    use super::*;
    use crate::wire::record::{chunk_ad, seal_chunk};

    /// The version 3 chunk example of PROTOCOL.md §5.3, from the stream root
    /// to the record: a second implementation can check its HKDF, AD and GCM
    /// against these bytes.
    #[test]
    fn the_protocol_md_chunk_example() {
        let sid = StreamId([0x22; 16]);
        let keys = derive_stream_keys(&StreamRoot::from_bytes([0x11; 32]), &sid);
        let g0 = keys.epoch0.epoch_key_bytes(&sid, 0);
        let ad = chunk_ad(&sid, 0, 0, 0, true);
        let record = seal_chunk(
            &keys.epoch0.epoch_key(&sid, 0),
            &sid,
            0,
            0,
            0,
            true,
            b"hello",
        );
        // Checked against an implementation from the text alone
        // (scripts/chunk-vector.py, Python's `cryptography`).
        assert_eq!(
            hex::encode(keys.epoch0.expose()),
            "77ed786f2765095c67517a270c75927d13b3462b9dd89972e824d84915f19d7b"
        );
        assert_eq!(
            hex::encode(*g0),
            "7c0173b637a240cf879f471523b61cce3f624808a3cf1e8d364488b4341df76f"
        );
        assert_eq!(
            hex::encode(&ad),
            "116b657966657272792f7633206368756e6b2222222222222222222222222222\
             2222000000000000000000000000000000000000000001"
        );
        assert_eq!(
            hex::encode(&record),
            "000000000000000000000000010000000566dbc8c8e4dbfb289c7b3411ffe5c6e787658e8887"
        );
    }
}
