//! RSA-OAEP-SHA256 (MGF1-SHA256) key wrapping, the only RSA encryption in use.
//!
//! Decryption always uses the blinded (randomized) private-key operation
//! (RUSTSEC-2023-0071). [`unwrap_master_key`] never fails: on any error it returns
//! a random key, so that the caller goes on to the metadata tag check, which then
//! fails. A peer sees one error and one timing path whatever went wrong.

use rsa::{Oaep, RsaPrivateKey, RsaPublicKey};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::AuthError;
use super::keys::MasterKey;

/// Encrypts `msg` to `key` with OAEP and the given label.
///
/// Fails only if `msg` is too long for the key, which the protocol never asks.
pub fn oaep_encrypt(key: &RsaPublicKey, label: &[u8], msg: &[u8]) -> Result<Vec<u8>, AuthError> {
    key.encrypt(
        &mut rand::rng(),
        Oaep::<Sha256>::new_with_label(label.to_vec()),
        msg,
    )
    .map_err(|_| AuthError)
}

/// Decrypts with blinding; every failure is the same opaque error.
pub fn oaep_decrypt(
    key: &RsaPrivateKey,
    label: &[u8],
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, AuthError> {
    key.decrypt_blinded(
        &mut rand::rng(),
        Oaep::<Sha256>::new_with_label(label.to_vec()),
        ciphertext,
    )
    .map(Zeroizing::new)
    .map_err(|_| AuthError)
}

/// Wraps a master key for `key`.
pub fn wrap_master_key(key: &RsaPublicKey, label: &[u8], master: &MasterKey) -> Vec<u8> {
    oaep_encrypt(key, label, master.expose())
        .expect("a 32-byte message fits every accepted (3072/4096-bit) OAEP key")
}

/// Unwraps a master key; on any failure returns a random key instead (see module docs).
pub fn unwrap_master_key(key: &RsaPrivateKey, label: &[u8], ciphertext: &[u8]) -> MasterKey {
    match oaep_decrypt(key, label, ciphertext) {
        Ok(bytes) if bytes.len() == 32 => {
            let mut out = [0u8; 32];
            out.copy_from_slice(&bytes);
            MasterKey::from_bytes(out)
        }
        _ => MasterKey::random(),
    }
}
