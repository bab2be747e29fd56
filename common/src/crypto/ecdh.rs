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

/// A receiver's X25519 prekey (PROTOCOL.md §3.4): kept on disk until the one
/// stored transfer made to it is opened, then deleted with its file. Unlike
/// an [`Ephemeral`], it can be saved and loaded, so it is x25519-dalek's
/// static secret (ring has ephemeral agreement only); it is zeroized on drop.
pub struct PrekeySecret(x25519_dalek::StaticSecret);

impl std::fmt::Debug for PrekeySecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrekeySecret([redacted])")
    }
}

impl PrekeySecret {
    /// A fresh secret from the operating system's CSPRNG.
    pub fn generate() -> Self {
        Self::from_bytes(super::random_array())
    }

    /// The secret saved by [`Self::to_bytes`].
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(x25519_dalek::StaticSecret::from(bytes))
    }

    /// The secret's bytes, to save (the caller erases its copy).
    pub fn to_bytes(&self) -> zeroize::Zeroizing<[u8; 32]> {
        zeroize::Zeroizing::new(self.0.to_bytes())
    }

    /// The public share, for the signed bundle.
    pub fn public(&self) -> [u8; SHARE_LEN] {
        x25519_dalek::PublicKey::from(&self.0).to_bytes()
    }

    /// Agrees with a sender's share; an all-zero result (a small-order
    /// share) is refused, as for [`Ephemeral::agree`].
    pub fn agree(&self, peer: &[u8; SHARE_LEN]) -> Result<SharedSecret, AuthError> {
        let shared = self.0.diffie_hellman(&x25519_dalek::PublicKey::from(*peer));
        if !shared.was_contributory() {
            return Err(AuthError);
        }
        Ok(SharedSecret::from_bytes(shared.to_bytes()))
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

    #[test]
    fn a_prekey_agrees_with_an_ephemeral_share_and_survives_a_save() {
        let prekey = PrekeySecret::generate();
        let saved = PrekeySecret::from_bytes(*prekey.to_bytes());
        assert_eq!(saved.public(), prekey.public());
        let sender = Ephemeral::generate();
        let share = sender.public();
        let sent = sender.agree(&prekey.public()).unwrap();
        assert_eq!(saved.agree(&share).unwrap().expose(), sent.expose());
        assert!(prekey.agree(&[0u8; 32]).is_err());
    }
}
