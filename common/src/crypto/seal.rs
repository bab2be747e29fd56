//! Encrypt-then-MAC sealing: AES-256-CBC with a random IV, then HMAC-SHA256 over
//! the record's associated data, the ciphertext length, the IV and the ciphertext
//! (PROTOCOL.md §3.2).
//!
//! Opening checks the ciphertext length (a non-zero multiple of 16 within the
//! caller's bound) first, then the tag in constant time, and decrypts only after
//! both passed. Every failure is the same [`AuthError`].

use super::keys::SealKeys;
use super::{AuthError, cipher, mac, random_array};

pub use super::cipher::BLOCK as IV_LEN;
pub use super::mac::TAG_LEN;

/// A sealed payload: IV, ciphertext and tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// Random CBC IV.
    pub iv: [u8; IV_LEN],
    /// AES-256-CBC ciphertext, PKCS#7-padded.
    pub ciphertext: Vec<u8>,
    /// HMAC-SHA256 over `ad ‖ u32 len(ciphertext) ‖ iv ‖ ciphertext`.
    pub tag: [u8; TAG_LEN],
}

fn tag_input_len(ciphertext: &[u8]) -> [u8; 4] {
    u32::try_from(ciphertext.len())
        .expect("sealed payloads are bounded far below 4 GiB")
        .to_be_bytes()
}

/// Seals `plaintext` with a fresh random IV.
pub fn seal(keys: &SealKeys, ad: &[u8], plaintext: &[u8]) -> Sealed {
    seal_with_iv(keys, ad, random_array(), plaintext)
}

/// Seals with a caller-chosen IV; only tests pin the IV.
pub(crate) fn seal_with_iv(
    keys: &SealKeys,
    ad: &[u8],
    iv: [u8; IV_LEN],
    plaintext: &[u8],
) -> Sealed {
    let mut ciphertext = vec![0; cipher::ciphertext_len(plaintext.len())];
    ciphertext[..plaintext.len()].copy_from_slice(plaintext);
    let tag = seal_in_place(keys, ad, &iv, &mut ciphertext, plaintext.len());
    Sealed {
        iv,
        ciphertext,
        tag,
    }
}

/// Seals the first `plaintext_len` bytes of `buf` where they lie: `buf` must be
/// exactly [`cipher::ciphertext_len`]`(plaintext_len)` bytes and holds the
/// ciphertext afterwards; returns the tag. The caller picks a fresh random IV.
///
/// # Panics
/// If `buf` has another length (a bug in the caller).
pub fn seal_in_place(
    keys: &SealKeys,
    ad: &[u8],
    iv: &[u8; IV_LEN],
    buf: &mut [u8],
    plaintext_len: usize,
) -> [u8; TAG_LEN] {
    cipher::encrypt_in_place(keys.aes.expose(), iv, buf, plaintext_len);
    mac::tag(&keys.mac, &[ad, &tag_input_len(buf), iv, buf])
}

/// Opens a sealed payload whose ciphertext may be at most `max_ciphertext` bytes.
pub fn open(
    keys: &SealKeys,
    ad: &[u8],
    iv: &[u8; IV_LEN],
    ciphertext: &[u8],
    tag: &[u8],
    max_ciphertext: usize,
) -> Result<Vec<u8>, AuthError> {
    let mut buf = ciphertext.to_vec();
    let len = open_in_place(keys, ad, iv, &mut buf, tag, max_ciphertext)?.len();
    buf.truncate(len);
    Ok(buf)
}

/// Opens a sealed payload where it lies: checks the length and the tag, and
/// only then decrypts `ciphertext` in place; returns the plaintext at its start.
/// On failure the buffer's contents are unspecified (and must be discarded).
pub fn open_in_place<'a>(
    keys: &SealKeys,
    ad: &[u8],
    iv: &[u8; IV_LEN],
    ciphertext: &'a mut [u8],
    tag: &[u8],
    max_ciphertext: usize,
) -> Result<&'a [u8], AuthError> {
    if ciphertext.is_empty()
        || !ciphertext.len().is_multiple_of(IV_LEN)
        || ciphertext.len() > max_ciphertext
    {
        return Err(AuthError);
    }
    mac::verify(
        &keys.mac,
        &[ad, &tag_input_len(ciphertext), iv, ciphertext],
        tag,
    )?;
    cipher::decrypt_in_place(keys.aes.expose(), iv, ciphertext)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::keys::{AesKey, MacKey};

    fn keys() -> SealKeys {
        SealKeys {
            aes: AesKey::from_bytes([1; 32]),
            mac: MacKey::from_bytes([2; 32]),
        }
    }

    #[test]
    fn every_single_bit_flip_is_refused() {
        let k = keys();
        let s = seal(&k, b"ad", b"hello world, sealed");
        assert_eq!(
            open(&k, b"ad", &s.iv, &s.ciphertext, &s.tag, 64).unwrap(),
            b"hello world, sealed"
        );
        for i in 0..s.iv.len() * 8 {
            let mut iv = s.iv;
            iv[i / 8] ^= 1 << (i % 8);
            assert_eq!(
                open(&k, b"ad", &iv, &s.ciphertext, &s.tag, 64),
                Err(AuthError)
            );
        }
        for i in 0..s.ciphertext.len() * 8 {
            let mut ct = s.ciphertext.clone();
            ct[i / 8] ^= 1 << (i % 8);
            assert_eq!(open(&k, b"ad", &s.iv, &ct, &s.tag, 64), Err(AuthError));
        }
        for i in 0..TAG_LEN * 8 {
            let mut tag = s.tag;
            tag[i / 8] ^= 1 << (i % 8);
            assert_eq!(
                open(&k, b"ad", &s.iv, &s.ciphertext, &tag, 64),
                Err(AuthError)
            );
        }
        assert_eq!(
            open(&k, b"ae", &s.iv, &s.ciphertext, &s.tag, 64),
            Err(AuthError)
        );
    }

    #[test]
    fn bad_lengths_are_refused_before_the_tag() {
        let k = keys();
        let s = seal(&k, b"", &[0; 40]);
        assert_eq!(s.ciphertext.len(), 48);
        assert_eq!(
            open(&k, b"", &s.iv, &s.ciphertext, &s.tag, 47),
            Err(AuthError)
        );
        assert_eq!(
            open(&k, b"", &s.iv, &s.ciphertext[..47], &s.tag, 64),
            Err(AuthError)
        );
        assert_eq!(open(&k, b"", &s.iv, &[], &s.tag, 64), Err(AuthError));
    }
}
