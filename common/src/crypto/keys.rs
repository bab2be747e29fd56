//! Secret key types: owned bytes, zeroized on drop, never printed.
//!
//! Each purpose has its own type (PROTOCOL.md §4) so that a key derived for one
//! job cannot be passed where another is meant. None of them implements
//! `Display`, `Clone` or `Serialize`; `Debug` prints only the type name.

use zeroize::{Zeroize, ZeroizeOnDrop};

macro_rules! secret {
    ($(#[$doc:meta])* $name:ident, $len:expr) => {
        $(#[$doc])*
        #[derive(Zeroize, ZeroizeOnDrop)]
        pub struct $name([u8; $len]);

        impl $name {
            /// Wraps key bytes. The caller's copy should be erased by the caller.
            pub fn from_bytes(bytes: [u8; $len]) -> Self {
                Self(bytes)
            }

            /// The key bytes, for the primitive that uses them.
            pub fn expose(&self) -> &[u8; $len] {
                &self.0
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(concat!(stringify!($name), "([redacted])"))
            }
        }
    };
}

secret!(
    /// An AES-256 key.
    AesKey,
    32
);
secret!(
    /// An HMAC-SHA256 key (32 bytes; never shared with an AES key).
    MacKey,
    32
);
secret!(
    /// The 256-bit master key M a sender draws for one transfer.
    MasterKey,
    32
);
secret!(
    /// A session key: the root of one epoch's chunk key (AES-256-GCM).
    SessionKey,
    32
);
secret!(
    /// An ephemeral shared secret of one transfer (X25519 or ML-KEM).
    SharedSecret,
    32
);
secret!(
    /// The root of one stream's keys: drawn by the sender per upload and
    /// wrapped for each of its receivers.
    StreamRoot,
    32
);

impl MasterKey {
    /// Draws a fresh random master key.
    pub fn random() -> Self {
        Self(super::random_array())
    }
}

impl StreamRoot {
    /// Draws a fresh random stream root.
    pub fn random() -> Self {
        Self(super::random_array())
    }
}

/// An AES key and its own HMAC key: what encrypt-then-MAC sealing needs.
#[derive(Debug)]
pub struct SealKeys {
    /// Encryption key.
    pub aes: AesKey,
    /// Authentication key.
    pub mac: MacKey,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_key_bytes() {
        let k = AesKey::from_bytes([0xab; 32]);
        let s = format!("{k:?}");
        assert_eq!(s, "AesKey([redacted])");
        assert!(!s.contains("ab") && !s.contains("171"));
    }
}
