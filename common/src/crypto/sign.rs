//! RSA-PSS-SHA256 signatures with a fixed 32-byte salt, always under a context.
//!
//! Every signature covers `label(context) ‖ message`, so a signature made for one
//! purpose (`keyferry/v1 offer`) can never be presented for another
//! (`keyferry/v1 broker-auth`). Signing uses the blinded private-key operation;
//! verification never detects the salt length itself.

use rsa::pss::{Signature, SigningKey, VerifyingKey};
use rsa::signature::{RandomizedSigner, Verifier};
use rsa::traits::PublicKeyParts;
use rsa::{RsaPrivateKey, RsaPublicKey};
use sha2::Sha256;

use super::AuthError;
use crate::encode::Encoder;

/// The PSS salt length, equal to the SHA-256 output length.
pub const PSS_SALT_LEN: usize = 32;

/// A blinded PSS signer for one private key.
pub struct Signer {
    // In rsa 0.10 `pss::SigningKey` always blinds the private-key operation with
    // the RNG it is given (`BlindedSigningKey` is a deprecated alias of it).
    key: SigningKey<Sha256>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer([redacted])")
    }
}

impl Signer {
    /// Builds the signer; the key moves in and is erased when the signer drops.
    pub fn new(key: RsaPrivateKey) -> Self {
        Self {
            key: SigningKey::new_with_salt_len(key, PSS_SALT_LEN),
        }
    }

    /// The private key, for OAEP decryption.
    pub fn private_key(&self) -> &RsaPrivateKey {
        self.key.as_ref()
    }

    /// Signs `message` as it is (no context). The protocol calls [`Self::sign`].
    pub fn sign_raw(&self, message: &[u8]) -> Vec<u8> {
        let sig: Signature = self.key.sign_with_rng(&mut rand::rng(), message);
        Box::<[u8]>::from(sig).into_vec()
    }

    /// Signs `label(context) ‖ message`.
    pub fn sign(&self, context: &str, message: &[u8]) -> Vec<u8> {
        self.sign_raw(&with_context(context, message))
    }
}

fn with_context(context: &str, message: &[u8]) -> Vec<u8> {
    let mut e = Encoder::new(context);
    e.fixed(message);
    e.finish()
}

/// Verifies a PSS signature over `message` as it is, with the fixed salt length.
pub fn verify_raw(key: &RsaPublicKey, message: &[u8], signature: &[u8]) -> Result<(), AuthError> {
    if signature.len() != key.size() {
        return Err(AuthError);
    }
    let sig = Signature::try_from(signature).map_err(|_| AuthError)?;
    VerifyingKey::<Sha256>::new_with_salt_len(key.clone(), PSS_SALT_LEN)
        .verify(message, &sig)
        .map_err(|_| AuthError)
}

/// Verifies a signature over `label(context) ‖ message`.
pub fn verify(
    key: &RsaPublicKey,
    context: &str,
    message: &[u8],
    signature: &[u8],
) -> Result<(), AuthError> {
    verify_raw(key, &with_context(context, message), signature)
}
