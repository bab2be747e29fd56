//! Cryptographic building blocks, each a thin, typed layer over a RustCrypto or
//! ring primitive (PROTOCOL.md §3).
//!
//! Nothing here knows about sockets or files. Keys own their bytes, are erased on
//! drop, and print as `[redacted]`. Every authentication failure leaves this
//! module as the one opaque [`AuthError`]: callers cannot learn which check failed.

pub mod aead;
pub mod cipher;
pub mod ecdh;
pub mod kdf;
pub mod kem;
pub mod keys;
pub mod mac;
pub mod seal;
pub mod sign;
pub mod wrap;

use thiserror::Error;

/// The one error for every failed tag, padding, signature or RSA check.
///
/// It deliberately carries no detail: a peer that learns *which* check failed
/// learns something about the key (padding oracles, Manger's attack).
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
#[error("authentication failed")]
pub struct AuthError;

/// Fills a fresh array from the operating system's CSPRNG (through `rand`'s
/// thread-local generator, which is reseeded from it).
pub fn random_array<const N: usize>() -> [u8; N] {
    use rand::Rng as _;
    let mut out = [0u8; N];
    rand::rng().fill_bytes(&mut out);
    out
}
