//! AES-256-CBC with PKCS#7 padding: the raw mode, without authentication.
//!
//! Only [`super::seal`] may call [`decrypt`] or [`decrypt_in_place`], and only
//! after the tag has been verified; so a padding error here is reachable only
//! with a valid tag and never becomes a padding oracle.
//!
//! The in-place forms are the core (the chunk path seals and opens where the
//! bytes lie); the `Vec` forms wrap them, so the known-answer tests that run
//! through [`encrypt`] and [`decrypt`] exercise the same code.

use aes::Aes256;
use cbc::cipher::{BlockModeDecrypt, BlockModeEncrypt, KeyIvInit, block_padding::Pkcs7};

use super::AuthError;

/// AES block size, and the CBC IV size.
pub const BLOCK: usize = 16;

/// Length of the ciphertext for `plaintext_len` bytes (PKCS#7 always adds 1..=16).
pub const fn ciphertext_len(plaintext_len: usize) -> usize {
    (plaintext_len / BLOCK + 1) * BLOCK
}

/// Encrypts `plaintext` under a 256-bit key with the given IV.
pub fn encrypt(key: &[u8; 32], iv: &[u8; BLOCK], plaintext: &[u8]) -> Vec<u8> {
    let mut buf = vec![0; ciphertext_len(plaintext.len())];
    buf[..plaintext.len()].copy_from_slice(plaintext);
    encrypt_in_place(key, iv, &mut buf, plaintext.len());
    buf
}

/// Encrypts the first `plaintext_len` bytes of `buf` in place, padding into the
/// rest; `buf` must be exactly [`ciphertext_len`]`(plaintext_len)` bytes.
///
/// # Panics
/// If `buf` has another length: a bug in the caller, never a property of input.
pub fn encrypt_in_place(key: &[u8; 32], iv: &[u8; BLOCK], buf: &mut [u8], plaintext_len: usize) {
    assert_eq!(
        buf.len(),
        ciphertext_len(plaintext_len),
        "buffer sized for the padded ciphertext"
    );
    cbc::Encryptor::<Aes256>::new(key.into(), iv.into())
        .encrypt_padded::<Pkcs7>(buf, plaintext_len)
        .expect("the buffer holds the padding");
}

/// Decrypts and removes the padding; any malformed input is the opaque error.
pub fn decrypt(key: &[u8; 32], iv: &[u8; BLOCK], ciphertext: &[u8]) -> Result<Vec<u8>, AuthError> {
    let mut buf = ciphertext.to_vec();
    let len = decrypt_in_place(key, iv, &mut buf)?.len();
    buf.truncate(len);
    Ok(buf)
}

/// Decrypts `buf` in place and returns the plaintext at its start, without the
/// padding; any malformed input is the opaque error.
pub fn decrypt_in_place<'a>(
    key: &[u8; 32],
    iv: &[u8; BLOCK],
    buf: &'a mut [u8],
) -> Result<&'a [u8], AuthError> {
    if buf.is_empty() || !buf.len().is_multiple_of(BLOCK) {
        return Err(AuthError);
    }
    cbc::Decryptor::<Aes256>::new(key.into(), iv.into())
        .decrypt_padded::<Pkcs7>(buf)
        .map_err(|_| AuthError)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_match_pkcs7() {
        for n in [0usize, 1, 15, 16, 17, 31, 32, 1000] {
            assert_eq!(
                encrypt(&[1; 32], &[2; 16], &vec![0; n]).len(),
                ciphertext_len(n)
            );
        }
    }
}
