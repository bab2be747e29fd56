//! AES-256-CBC with PKCS#7 padding: the raw mode, without authentication.
//!
//! Only [`super::seal`] may call [`decrypt`], and only after the tag has been
//! verified; so a padding error here is reachable only with a valid tag and never
//! becomes a padding oracle.

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
    cbc::Encryptor::<Aes256>::new(key.into(), iv.into()).encrypt_padded_vec::<Pkcs7>(plaintext)
}

/// Decrypts and removes the padding; any malformed input is the opaque error.
pub fn decrypt(key: &[u8; 32], iv: &[u8; BLOCK], ciphertext: &[u8]) -> Result<Vec<u8>, AuthError> {
    if ciphertext.is_empty() || !ciphertext.len().is_multiple_of(BLOCK) {
        return Err(AuthError);
    }
    cbc::Decryptor::<Aes256>::new(key.into(), iv.into())
        .decrypt_padded_vec::<Pkcs7>(ciphertext)
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
