//! Ephemeral ML-KEM-768 (FIPS 203, RustCrypto `ml-kem`), beside X25519, so
//! that recording a transfer today and breaking X25519 later reveals nothing
//! (PROTOCOL.md §3.3, §4).
//!
//! The sender makes a fresh key pair per transfer and puts the 1,184-byte
//! encapsulation key in its signed offer; the receiver encapsulates to it and
//! returns the 1,088-byte ciphertext in its accept. The decapsulation key is
//! consumed by [`KemKeyPair::decapsulate`] and erased on drop; the shared
//! secrets are [`SharedSecret`]s, erased on drop.

use ml_kem::array::Array;
use ml_kem::kem::{Decapsulate, Encapsulate, Generate, KeyExport};
use ml_kem::{DecapsulationKey, EncapsulationKey, MlKem768};

use super::AuthError;
use super::keys::SharedSecret;

/// Length of an ML-KEM-768 encapsulation key.
pub const EK_LEN: usize = 1184;
/// Length of an ML-KEM-768 ciphertext.
pub const CT_LEN: usize = 1088;

/// The sender's ephemeral ML-KEM-768 key pair for one transfer.
pub struct KemKeyPair {
    dk: DecapsulationKey<MlKem768>,
    ek: [u8; EK_LEN],
}

impl std::fmt::Debug for KemKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KemKeyPair").finish_non_exhaustive()
    }
}

fn secret(k: &[u8]) -> SharedSecret {
    let mut out = [0u8; 32];
    out.copy_from_slice(k);
    SharedSecret::from_bytes(out)
}

impl KemKeyPair {
    /// A fresh key pair from the operating system's CSPRNG (through `rand`).
    pub fn generate() -> Self {
        Self::from_dk(DecapsulationKey::<MlKem768>::generate_from_rng(
            &mut rand::rng(),
        ))
    }

    /// The key pair of a 64-byte seed (`d ‖ z`, FIPS 203): for known-answer
    /// tests only; a transfer always uses [`Self::generate`].
    pub fn from_seed(seed: [u8; 64]) -> Self {
        Self::from_dk(DecapsulationKey::<MlKem768>::from_seed(Array::from(seed)))
    }

    fn from_dk(dk: DecapsulationKey<MlKem768>) -> Self {
        let mut ek = [0u8; EK_LEN];
        ek.copy_from_slice(&dk.encapsulation_key().to_bytes());
        Self { dk, ek }
    }

    /// The encapsulation key to put in the offer.
    pub fn encapsulation_key(&self) -> &[u8; EK_LEN] {
        &self.ek
    }

    /// Decapsulates the receiver's ciphertext, consuming (and so erasing) the
    /// decapsulation key. ML-KEM rejects implicitly: a ciphertext not made for
    /// this key yields an unrelated secret, and the accept's MAC then fails.
    pub fn decapsulate(self, ct: &[u8; CT_LEN]) -> SharedSecret {
        let ct = Array::from(*ct);
        secret(&self.dk.decapsulate(&ct))
    }
}

/// Encapsulates a fresh secret to `ek`; refuses an encapsulation key that is
/// not well formed (FIPS 203's modulus check).
pub fn encapsulate(ek: &[u8; EK_LEN]) -> Result<([u8; CT_LEN], SharedSecret), AuthError> {
    let ek = EncapsulationKey::<MlKem768>::new(&Array::from(*ek)).map_err(|_| AuthError)?;
    let (ct, k) = ek.encapsulate_with_rng(&mut rand::rng());
    let mut out = [0u8; CT_LEN];
    out.copy_from_slice(&ct);
    Ok((out, secret(&k)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_agree_and_an_altered_ciphertext_yields_another_secret() {
        let (a, b) = (KemKeyPair::generate(), KemKeyPair::generate());
        let (ct, sent) = encapsulate(a.encapsulation_key()).unwrap();
        let mut flipped = ct;
        flipped[7] ^= 1;
        // Implicit rejection: a wrong ciphertext is not an error, it is
        // another secret (the accept MAC then fails).
        assert_ne!(b.decapsulate(&ct).expose(), sent.expose());
        let same = KemKeyPair::from_seed([9; 64]);
        assert_eq!(
            same.encapsulation_key(),
            KemKeyPair::from_seed([9; 64]).encapsulation_key()
        );
        assert_ne!(same.decapsulate(&flipped).expose(), sent.expose());
        assert_eq!(a.decapsulate(&ct).expose(), sent.expose());
    }

    #[test]
    fn a_malformed_encapsulation_key_is_refused() {
        // Every coefficient 0xFFF (≥ q = 3329): fails the modulus check.
        assert_eq!(encapsulate(&[0xff; EK_LEN]).unwrap_err(), AuthError);
    }
}
