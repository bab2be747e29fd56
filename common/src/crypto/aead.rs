//! AES-256-GCM for chunks (PROTOCOL.md §3.1, §5.3), from ring (its VAES and
//! carry-less-multiply code where the CPU has them).
//!
//! A [`ChunkKey`] owns only the epoch's 32 key bytes, erased on drop like every
//! key here. ring does not erase its expanded keys (AES round keys, GHASH
//! table), so none is kept: each seal or open builds ring's key on the stack
//! of the calling thread for that one chunk (a fraction of a microsecond
//! against about 100 µs of work) and drops it on return, where the next
//! chunk's overwrites it (docs/SECURITY.md).
//!
//! The nonce is never random: it is the chunk's epoch and sequence number, and
//! each epoch has its own key (§4), so a key never sees a nonce twice. ring
//! decrypts and authenticates in one pass, compares the tag in constant time,
//! and wipes the output if it fails: no plaintext leaves [`open_in_place`]
//! unless the tag verified. Every failure is the same [`AuthError`].

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, Tag, UnboundKey};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::AuthError;

/// GCM nonce length: `u32 epoch ‖ u64 seq`.
pub const NONCE_LEN: usize = 12;
/// GCM tag length; shorter tags are never made or accepted.
pub const TAG_LEN: usize = 16;

/// One epoch's chunk key: its 32 bytes, erased on drop.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct ChunkKey([u8; 32]);

impl std::fmt::Debug for ChunkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChunkKey([redacted])")
    }
}

impl ChunkKey {
    /// Takes the key's 32 bytes (the caller's copy is erased as it drops).
    pub fn from_bytes(bytes: Zeroizing<[u8; 32]>) -> Self {
        Self(*bytes)
    }

    /// ring's key for one call, on the caller's stack.
    fn ring(&self) -> LessSafeKey {
        LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &self.0).expect("AES-256-GCM takes 32-byte keys"),
        )
    }
}

/// The nonce of a chunk: `u32 epoch ‖ u64 seq`, big-endian.
pub fn chunk_nonce(epoch: u32, seq: u64) -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    n[..4].copy_from_slice(&epoch.to_be_bytes());
    n[4..].copy_from_slice(&seq.to_be_bytes());
    n
}

/// Encrypts `buf` in place and returns the tag over `ad` and the ciphertext.
pub fn seal_in_place(
    key: &ChunkKey,
    nonce: &[u8; NONCE_LEN],
    ad: &[u8],
    buf: &mut [u8],
) -> [u8; TAG_LEN] {
    let tag = key
        .ring()
        .seal_in_place_separate_tag(Nonce::assume_unique_for_key(*nonce), Aad::from(ad), buf)
        .expect("chunks are far below GCM's 64 GiB message limit");
    let mut out = [0u8; TAG_LEN];
    out.copy_from_slice(tag.as_ref());
    out
}

/// Opens `buf` in place: returns the plaintext only if `tag` verifies over
/// `ad` and the ciphertext. On failure the buffer's contents are unspecified
/// (ring wipes them) and must be discarded.
pub fn open_in_place<'a>(
    key: &ChunkKey,
    nonce: &[u8; NONCE_LEN],
    ad: &[u8],
    buf: &'a mut [u8],
    tag: &[u8; TAG_LEN],
) -> Result<&'a [u8], AuthError> {
    key.ring()
        .open_in_place_separate_tag(
            Nonce::assume_unique_for_key(*nonce),
            Aad::from(ad),
            Tag::from(*tag),
            buf,
            0..,
        )
        .map(|plain| &*plain)
        .map_err(|_| AuthError)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AES-256 test cases 13 and 14 of McGrew and Viega, "The Galois/Counter
    /// Mode of Operation (GCM)": zero key, zero 96-bit IV.
    #[test]
    fn known_answers() {
        let key = ChunkKey::from_bytes(Zeroizing::new([0; 32]));
        let mut empty = [];
        assert_eq!(
            seal_in_place(&key, &[0; 12], b"", &mut empty).to_vec(),
            hex::decode("530f8afbc74536b9a963b4f1c4cb738b").unwrap()
        );
        let mut block = [0u8; 16];
        let tag = seal_in_place(&key, &[0; 12], b"", &mut block);
        assert_eq!(
            block.to_vec(),
            hex::decode("cea7403d4d606b6e074ec5d3baf39d18").unwrap()
        );
        assert_eq!(
            tag.to_vec(),
            hex::decode("d0d1c8a799996bf0265b98b5d48ab919").unwrap()
        );
        assert_eq!(
            open_in_place(&key, &[0; 12], b"", &mut block, &tag).unwrap(),
            [0; 16]
        );
    }

    #[test]
    fn every_single_bit_flip_is_refused() {
        let key = ChunkKey::from_bytes(Zeroizing::new([3; 32]));
        let nonce = chunk_nonce(7, 1 << 40);
        assert_eq!(&nonce[..4], &[0, 0, 0, 7]);
        let mut ct = b"hello world, sealed".to_vec();
        let tag = seal_in_place(&key, &nonce, b"ad", &mut ct);
        let opens = |nonce: &[u8; 12], ad: &[u8], ct: &[u8], tag: &[u8; 16]| {
            let mut buf = ct.to_vec();
            open_in_place(&key, nonce, ad, &mut buf, tag).map(<[u8]>::to_vec)
        };
        assert_eq!(
            opens(&nonce, b"ad", &ct, &tag).unwrap(),
            b"hello world, sealed"
        );
        for i in 0..ct.len() * 8 {
            let mut bad = ct.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert_eq!(opens(&nonce, b"ad", &bad, &tag), Err(AuthError));
        }
        for i in 0..TAG_LEN * 8 {
            let mut bad = tag;
            bad[i / 8] ^= 1 << (i % 8);
            assert_eq!(opens(&nonce, b"ad", &ct, &bad), Err(AuthError));
        }
        for i in 0..NONCE_LEN * 8 {
            let mut bad = nonce;
            bad[i / 8] ^= 1 << (i % 8);
            assert_eq!(opens(&bad, b"ad", &ct, &tag), Err(AuthError));
        }
        assert_eq!(opens(&nonce, b"ae", &ct, &tag), Err(AuthError));
        assert_eq!(opens(&nonce, b"ad", &ct[1..], &tag), Err(AuthError));
        let other = ChunkKey::from_bytes(Zeroizing::new([4; 32]));
        let mut buf = ct.clone();
        assert_eq!(
            open_in_place(&other, &nonce, b"ad", &mut buf, &tag),
            Err(AuthError)
        );
    }
}
