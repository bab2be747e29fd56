//! Long-term RSA identities: generation, key files, public keys and fingerprints
//! (PROTOCOL.md §1).
//!
//! Only 3072- and 4096-bit moduli with e = 65537 are accepted, everywhere: when a
//! key file is loaded, when a peer's public key arrives, when one is pinned. The
//! private key file is PKCS#8 PEM, created with mode 0600, and refused when group
//! or others may read it. A fingerprint is SHA-256 of the SubjectPublicKeyInfo
//! DER, printed as `SHA256:<base64>` like OpenSSH.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

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
use crate::fsutil;

/// Default identity key size.
pub const DEFAULT_KEY_BITS: usize = 3072;
/// The only accepted moduli sizes.
pub const ACCEPTED_KEY_BITS: [u32; 2] = [3072, 4096];
/// Largest SubjectPublicKeyInfo DER accepted (a 4096-bit key's is 550 bytes).
pub const MAX_SPKI_LEN: usize = 1024;

/// Errors with key files and keys.
#[derive(Debug, Error)]
pub enum KeyError {
    /// The key file could not be read.
    #[error("cannot read key file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The key file could not be written.
    #[error("cannot write key file {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The key file's name is a symbolic link (or not a regular file).
    #[error(
        "key file {path} is a symbolic link or not a regular file; refusing to use it. \
         Put the key itself there (mode 0600)"
    )]
    NotAFile {
        /// The file.
        path: PathBuf,
    },
    /// The key file belongs to another user.
    #[error("key file {path} belongs to another user; refusing to use it")]
    Owner {
        /// The file.
        path: PathBuf,
    },
    /// Group or others may read the private key file.
    #[error(
        "key file {path} is accessible by other users (mode {mode:03o}); refusing to use it. \
         Run `chmod 600 {path}` if the key is still secret, or move it away to create a new one"
    )]
    Insecure {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file is not a PKCS#8 PEM RSA private key.
    #[error(
        "key file {path} is not a PKCS#8 PEM RSA private key; move it away to create a new one"
    )]
    Parse {
        /// The file.
        path: PathBuf,
    },
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
            signer: Signer::new(key),
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

    /// Signs `message` under `context` (blinded RSA-PSS-SHA256).
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

    /// Loads the key file at `path`, refusing one that others may read.
    ///
    /// The file is opened once, without following a symbolic link, and its
    /// type, owner and mode are checked on the open descriptor, which is then
    /// read: no name is looked up twice, so nothing can be swapped in between.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        use rustix::fs::{FileType, Mode, OFlags};
        use std::io::Read as _;
        let read_err = |source| KeyError::Read {
            path: path.to_owned(),
            source,
        };
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let fd = match rustix::fs::open(path, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::LOOP) => {
                return Err(KeyError::NotAFile {
                    path: path.to_owned(),
                });
            }
            Err(e) => return Err(read_err(e.into())),
        };
        let st = rustix::fs::fstat(&fd).map_err(|e| read_err(e.into()))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(KeyError::NotAFile {
                path: path.to_owned(),
            });
        }
        if st.st_uid != rustix::process::geteuid().as_raw() {
            return Err(KeyError::Owner {
                path: path.to_owned(),
            });
        }
        let mode = st.st_mode & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Insecure {
                path: path.to_owned(),
                mode,
            });
        }
        // Sized up front, so no copy of the key is left behind by a regrowth.
        let size = usize::try_from(st.st_size).unwrap_or(0).min(64 << 10);
        let mut pem = zeroize::Zeroizing::new(String::with_capacity(size + 1));
        fs::File::from(fd)
            .read_to_string(&mut pem)
            .map_err(read_err)?;
        Self::from_pkcs8_pem(&pem).unwrap_or_else(|| {
            Err(KeyError::Parse {
                path: path.to_owned(),
            })
        })
    }

    /// Writes the key to a new file at `path` (mode 0600); never replaces a file.
    ///
    /// The PEM goes to a temporary file first and is hard-linked into place, so a
    /// crash never leaves a half-written key under the real name.
    pub fn save(&self, path: &Path) -> Result<(), KeyError> {
        let write_err = |source| KeyError::Write {
            path: path.to_owned(),
            source,
        };
        let pem = self
            .private_key()
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|_| write_err(std::io::Error::other("PKCS#8 encoding failed")))?;
        fsutil::write_private(path, pem.as_bytes(), fsutil::Place::New).map_err(write_err)
    }

    /// Loads the key at `path`, or creates and saves a new one if there is none.
    /// Returns whether it was created.
    pub fn load_or_create(path: &Path, bits: usize) -> Result<(Self, bool), KeyError> {
        match fs::symlink_metadata(path) {
            Ok(_) => Ok((Self::load(path)?, false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = Self::generate(bits)?;
                id.save(path)?;
                Ok((id, true))
            }
            Err(source) => Err(KeyError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }
}
