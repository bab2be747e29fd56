//! RSA-PSS-SHA256 signatures with a fixed 32-byte salt, always under a context.
//!
//! Every signature covers `label(context) ‖ message`, so a signature made for one
//! purpose (`keyferry/v1 offer`) can never be presented for another
//! (`keyferry/v1 broker-auth`). Verification never detects the salt length
//! itself.
//!
//! Signing is ring's (`RSA_PSS_SHA256`: salt as long as the hash, 32 bytes), whose
//! private-key arithmetic is constant-time and about 1.7 times as fast here as the
//! `rsa` crate's blinded operation (2.5 against 4.2 ms for a 3072-bit key;
//! docs/BENCHMARKS.md): a sender signs three times per transfer (authentication,
//! offer, trailer). The `rsa` key is kept beside it for the blinded OAEP
//! decryption, which ring does not offer, and for the key file. Verification
//! stays with `rsa`, which checks the Wycheproof vectors
//! (`common/tests/wycheproof.rs`).

use ring::signature::{RSA_PSS_SHA256, RsaKeyPair};
use rsa::pkcs8::EncodePrivateKey as _;
use rsa::pss::{Signature, VerifyingKey};
use rsa::signature::Verifier;
use rsa::traits::PublicKeyParts;
use rsa::{RsaPrivateKey, RsaPublicKey};
use sha2::Sha256;

use super::AuthError;
use crate::encode::Encoder;

/// The PSS salt length, equal to the SHA-256 output length.
pub const PSS_SALT_LEN: usize = 32;

/// ring did not take a private key `rsa` accepted (it is built from the same
/// PKCS#8 encoding): ring is stricter, e.g. about primes of unequal length,
/// which keys keyferry generates never have.
#[derive(Debug, thiserror::Error)]
#[error("the private key could not be prepared for signing (ring: {0})")]
pub struct SignerError(String);

/// A PSS signer for one private key.
pub struct Signer {
    /// ring's form of the key, which signs.
    ring: RsaKeyPair,
    /// The same key, for OAEP decryption and its PKCS#8 encoding; erased on drop.
    /// (ring's form is not erased when it drops: docs/SECURITY.md.)
    key: RsaPrivateKey,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer([redacted])")
    }
}

impl Signer {
    /// Builds the signer; the key moves in (its `rsa` form is erased when the
    /// signer drops).
    pub fn new(key: RsaPrivateKey) -> Result<Self, SignerError> {
        // The DER is erased when it drops.
        let der = key
            .to_pkcs8_der()
            .map_err(|_| SignerError("the key cannot be encoded".into()))?;
        let ring = RsaKeyPair::from_pkcs8(der.as_bytes())
            .map_err(|rejected| SignerError(rejected.to_string()))?;
        Ok(Self { ring, key })
    }

    /// The private key, for OAEP decryption.
    pub fn private_key(&self) -> &RsaPrivateKey {
        &self.key
    }

    /// Signs `message` as it is (no context). The protocol calls [`Self::sign`].
    pub fn sign_raw(&self, message: &[u8]) -> Vec<u8> {
        let mut sig = vec![0; self.ring.public().modulus_len()];
        // ring fails only if the system RNG does (as `rand::rng()` would
        // panic), if the buffer is not the modulus' length (it is), or if
        // its check of the signature it made fails (a fault in this machine,
        // and a faulty signature must not go out).
        self.ring
            .sign(
                &RSA_PSS_SHA256,
                &ring::rand::SystemRandom::new(),
                message,
                &mut sig,
            )
            .expect("RSA-PSS signing needs the system random number generator");
        sig
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

#[cfg(test)]
mod tests {
    use rsa::pkcs8::DecodePrivateKey as _;
    use rsa::signature::RandomizedSigner as _;

    use super::*;

    fn alice() -> RsaPrivateKey {
        RsaPrivateKey::from_pkcs8_pem(include_str!("../../tests/fixtures/alice.pem")).unwrap()
    }

    #[test]
    fn ring_signs_what_the_verifier_accepts_under_its_context_only() {
        let key = alice();
        let public = RsaPublicKey::from(&key);
        let signer = Signer::new(key).unwrap();
        let sig = signer.sign("keyferry/test a", b"message");
        assert_eq!(sig.len(), public.size());
        verify(&public, "keyferry/test a", b"message", &sig).unwrap();
        assert!(verify(&public, "keyferry/test b", b"message", &sig).is_err());
        assert!(verify(&public, "keyferry/test a", b"messagf", &sig).is_err());
        // Randomised: two signatures of one message differ, and both verify.
        let again = signer.sign("keyferry/test a", b"message");
        assert_ne!(sig, again);
        verify(&public, "keyferry/test a", b"message", &again).unwrap();
    }

    #[test]
    fn signatures_of_the_rsa_crate_and_of_ring_are_the_same_scheme() {
        // What older agents sent (the `rsa` crate's blinded PSS signer, 32-byte
        // salt) verifies as before; what ring makes verifies with a verifier
        // that insists on the 32-byte salt, whichever way it is checked.
        let key = alice();
        let public = RsaPublicKey::from(&key);
        let old = rsa::pss::SigningKey::<Sha256>::new_with_salt_len(key.clone(), PSS_SALT_LEN)
            .sign_with_rng(&mut rand::rng(), b"raw message");
        verify_raw(&public, b"raw message", &Box::<[u8]>::from(old)).unwrap();
        let new = Signer::new(key).unwrap().sign_raw(b"raw message");
        verify_raw(&public, b"raw message", &new).unwrap();
        let wrong_salt = VerifyingKey::<Sha256>::new_with_salt_len(public, 20);
        let sig = Signature::try_from(&new[..]).unwrap();
        assert!(wrong_salt.verify(b"raw message", &sig).is_err());
    }
}
