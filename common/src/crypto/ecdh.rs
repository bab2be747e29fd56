//! Ephemeral X25519 agreement (ring), for forward secrecy per transfer.
//!
//! A private share is consumed by the agreement (ring erases nothing explicitly,
//! but the key cannot be used twice and is dropped at once). An all-zero shared
//! secret, the result of a small-order public share, is refused.

use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, X25519};
use ring::rand::SystemRandom;

use super::AuthError;
use super::keys::SharedSecret;

/// Length of an X25519 public share.
pub const SHARE_LEN: usize = 32;

/// One side's ephemeral X25519 key pair.
pub struct Ephemeral {
    private: EphemeralPrivateKey,
    public: [u8; SHARE_LEN],
}

impl std::fmt::Debug for Ephemeral {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ephemeral").finish_non_exhaustive()
    }
}

impl Ephemeral {
    /// Generates a fresh key pair from the operating system's CSPRNG.
    pub fn generate() -> Self {
        let rng = SystemRandom::new();
        let private = EphemeralPrivateKey::generate(&X25519, &rng)
            .expect("the system RNG is available to generate an X25519 key");
        let public_key = private
            .compute_public_key()
            .expect("an X25519 public key can be computed from a fresh private key");
        let mut public = [0u8; SHARE_LEN];
        public.copy_from_slice(public_key.as_ref());
        Self { private, public }
    }

    /// The public share to send to the peer.
    pub fn public(&self) -> [u8; SHARE_LEN] {
        self.public
    }

    /// Agrees with the peer's share, consuming (and so erasing) the private key.
    pub fn agree(self, peer: &[u8; SHARE_LEN]) -> Result<SharedSecret, AuthError> {
        let peer = UnparsedPublicKey::new(&X25519, peer);
        let secret = agreement::agree_ephemeral(self.private, &peer, |ss| {
            let mut out = [0u8; 32];
            out.copy_from_slice(ss);
            out
        })
        .map_err(|_| AuthError)?;
        if secret.iter().all(|&b| b == 0) {
            return Err(AuthError);
        }
        Ok(SharedSecret::from_bytes(secret))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_agree_and_small_order_points_are_refused() {
        let a = Ephemeral::generate();
        let b = Ephemeral::generate();
        let (pa, pb) = (a.public(), b.public());
        let sa = a.agree(&pb).unwrap();
        let sb = b.agree(&pa).unwrap();
        assert_eq!(sa.expose(), sb.expose());
        // The all-zero point has small order: the shared secret would be zero.
        assert!(Ephemeral::generate().agree(&[0u8; 32]).is_err());
        let mut one = [0u8; 32];
        one[0] = 1;
        assert!(Ephemeral::generate().agree(&one).is_err());
    }
}
