//! Long-term RSA identities: generation, PKCS#8 encoding, public keys and
//! fingerprints, and the key policy (PROTOCOL.md §1).
//!
//! Only 3072- and 4096-bit moduli with e = 65537 are accepted, everywhere: when a
//! key is parsed, when a peer's public key arrives, when one is pinned. A
//! fingerprint is SHA-256 of the SubjectPublicKeyInfo DER, printed as
//! `SHA256:<base64>` like OpenSSH. Key files (their modes, owners, where they
//! live) are the agent's business, not this module's.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use rsa::pkcs8::{
    DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding,
};
use rsa::traits::PublicKeyParts;
use rsa::{RsaPrivateKey, RsaPublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::crypto::sign::{self, Signer};
use crate::crypto::{AuthError, wrap};

/// Default identity key size.
pub const DEFAULT_KEY_BITS: usize = 3072;
/// The only accepted moduli sizes.
pub const ACCEPTED_KEY_BITS: [u32; 2] = [3072, 4096];
/// Largest SubjectPublicKeyInfo DER accepted (a 4096-bit key's is 550 bytes).
pub const MAX_SPKI_LEN: usize = 1024;

/// Keys keyferry refuses.
#[derive(Debug, Error)]
pub enum KeyError {
    /// The key is RSA but of a size or exponent keyferry does not accept.
    #[error(
        "RSA key of {bits} bits refused: only 3072- or 4096-bit keys with e = 65537 are accepted"
    )]
    Policy {
        /// Modulus size.
        bits: u32,
    },
    /// Bytes that should be a public key are not a canonical RSA SubjectPublicKeyInfo.
    #[error("not a valid RSA public key (SubjectPublicKeyInfo DER)")]
    Spki,
    /// RSA key generation failed.
    #[error("RSA key generation failed")]
    Generate,
    /// PKCS#8 encoding of the private key failed.
    #[error("PKCS#8 encoding of the private key failed")]
    Encode,
    /// The private key could not be prepared for signing.
    #[error(transparent)]
    Signer(#[from] sign::SignerError),
}

/// SHA-256 of a SubjectPublicKeyInfo DER.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// Fingerprint of `spki_der`.
    pub fn of_spki(spki_der: &[u8]) -> Self {
        Self(Sha256::digest(spki_der).into())
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SHA256:{}", STANDARD_NO_PAD.encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A string that is not a `SHA256:<base64>` fingerprint.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("not a fingerprint: expected SHA256: followed by 43 base64 characters")]
pub struct BadFingerprint;

impl std::str::FromStr for Fingerprint {
    type Err = BadFingerprint;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b64 = s.strip_prefix("SHA256:").ok_or(BadFingerprint)?;
        if b64.len() != 43 {
            return Err(BadFingerprint);
        }
        let bytes = STANDARD_NO_PAD.decode(b64).map_err(|_| BadFingerprint)?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| BadFingerprint)?;
        Ok(Self(arr))
    }
}

fn check_policy(key: &RsaPublicKey) -> Result<(), KeyError> {
    let bits = key.n().bits();
    if ACCEPTED_KEY_BITS.contains(&bits) && *key.e_bytes() == [1, 0, 1] {
        Ok(())
    } else {
        Err(KeyError::Policy { bits })
    }
}

/// A peer's (or our own) RSA public key, checked against the key policy.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    key: RsaPublicKey,
    spki: Vec<u8>,
    fingerprint: Fingerprint,
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.fingerprint)
    }
}

impl PublicKey {
    /// Parses a SubjectPublicKeyInfo DER; refuses non-canonical encodings and keys
    /// outside the policy, so the fingerprint is a function of the key alone.
    pub fn from_spki_der(der: &[u8]) -> Result<Self, KeyError> {
        if der.len() > MAX_SPKI_LEN {
            return Err(KeyError::Spki);
        }
        let key = RsaPublicKey::from_public_key_der(der).map_err(|_| KeyError::Spki)?;
        check_policy(&key)?;
        let key = Self::from_rsa(key)?;
        if key.spki != der {
            return Err(KeyError::Spki);
        }
        Ok(key)
    }

    fn from_rsa(key: RsaPublicKey) -> Result<Self, KeyError> {
        let spki = key
            .to_public_key_der()
            .map_err(|_| KeyError::Spki)?
            .into_vec();
        let fingerprint = Fingerprint::of_spki(&spki);
        Ok(Self {
            key,
            spki,
            fingerprint,
        })
    }

    /// The SubjectPublicKeyInfo DER.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki
    }

    /// The key's fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// The RSA key itself.
    pub fn rsa(&self) -> &RsaPublicKey {
        &self.key
    }

    /// Verifies a signature made under `context`.
    pub fn verify(&self, context: &str, message: &[u8], signature: &[u8]) -> Result<(), AuthError> {
        sign::verify(&self.key, context, message, signature)
    }
}

/// An agent's (or the broker's) long-term identity: the private key and its
/// public half.
pub struct Identity {
    signer: Signer,
    public: PublicKey,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({})", self.public.fingerprint)
    }
}

impl Identity {
    /// Generates a new identity of `bits` (3072 or 4096).
    pub fn generate(bits: usize) -> Result<Self, KeyError> {
        let key = RsaPrivateKey::new(&mut rand::rng(), bits).map_err(|_| KeyError::Generate)?;
        Self::from_private(key)
    }

    fn from_private(key: RsaPrivateKey) -> Result<Self, KeyError> {
        let public = RsaPublicKey::from(&key);
        check_policy(&public)?;
        Ok(Self {
            public: PublicKey::from_rsa(public)?,
            signer: Signer::new(key)?,
        })
    }

    /// Parses a PKCS#8 PEM private key.
    pub fn from_pkcs8_pem(pem: &str) -> Option<Result<Self, KeyError>> {
        RsaPrivateKey::from_pkcs8_pem(pem)
            .ok()
            .map(Self::from_private)
    }

    /// The public half.
    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    /// The fingerprint of the public half.
    pub fn fingerprint(&self) -> Fingerprint {
        self.public.fingerprint
    }

    /// Signs `message` under `context` (RSA-PSS-SHA256, by ring).
    pub fn sign(&self, context: &str, message: &[u8]) -> Vec<u8> {
        self.signer.sign(context, message)
    }

    /// The private key, for the blinded OAEP unwrap of a verified offer.
    pub(crate) fn private_key(&self) -> &RsaPrivateKey {
        self.signer.private_key()
    }

    /// Unwraps a master key addressed to this identity (random key on failure).
    pub(crate) fn unwrap_master_key(
        &self,
        label: &[u8],
        ciphertext: &[u8],
    ) -> crate::crypto::keys::MasterKey {
        wrap::unwrap_master_key(self.private_key(), label, ciphertext)
    }

    /// The private key as PKCS#8 PEM, for the agent's key file (erased on drop).
    pub fn to_pkcs8_pem(&self) -> Result<zeroize::Zeroizing<String>, KeyError> {
        self.private_key()
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|_| KeyError::Encode)
    }
}
