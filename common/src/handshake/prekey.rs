//! Prekey bundles (PROTOCOL.md §3.4): what a receiver leaves at its broker so
//! that a sender can seal a transfer to it while it is offline. A bundle is a
//! fresh X25519 public key and a fresh ML-KEM-768 encapsulation key, with an
//! id, the receiver's name and key fingerprint, and a validity period, signed
//! with the receiver's identity key. The private halves ([`PrekeyKeys`]) stay
//! in the receiver's home until the transfer that used them is opened.

use crate::PROTOCOL_VERSION;
use crate::crypto::ecdh::{PrekeySecret, SHARE_LEN};
use crate::crypto::kem::{EK_LEN, KemKeyPair};
use crate::encode::{Decoder, Encoder};
use crate::identity::{Fingerprint, Identity, PublicKey};
use crate::name::{AgentName, MAX_NAME_LEN};

use super::HandshakeError;

/// Signature context of a bundle.
pub const LABEL: &str = "keyferry/v7 prekey";
/// Longest a bundle may be valid (`expires − created`), in seconds: 35 days.
pub const MAX_VALIDITY_SECS: u64 = 35 * 24 * 3600;
/// Largest encoded signed bundle.
pub const MAX_BUNDLE_LEN: usize = 2048;
/// How far a bundle's creation time may lie in the sender's future.
pub const CLOCK_SKEW_SECS: u64 = 300;

/// A bundle is used once, or (the last resort) by every sender while no
/// one-time bundle is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleKind {
    /// Handed out once by the broker (byte 1).
    OneTime,
    /// Kept by the broker and handed to every sender while no one-time bundle
    /// is left; rotated by the receiver (byte 2).
    LastResort,
}

impl BundleKind {
    fn byte(self) -> u8 {
        match self {
            Self::OneTime => 1,
            Self::LastResort => 2,
        }
    }
}

/// A bundle's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// One-time or last resort.
    pub kind: BundleKind,
    /// Names the private halves in the receiver's home.
    pub id: [u8; 16],
    /// The receiver's name.
    pub receiver: AgentName,
    /// The receiver's key fingerprint.
    pub receiver_fp: Fingerprint,
    /// When it was made (receiver's clock, Unix seconds).
    pub created: u64,
    /// After this (Unix seconds) no sender may use it.
    pub expires: u64,
    /// X25519 public key.
    pub share: [u8; SHARE_LEN],
    /// ML-KEM-768 encapsulation key.
    pub kem_key: Box<[u8; EK_LEN]>,
    /// The exact signed bytes (part of every stored transfer's transcript).
    pub body: Vec<u8>,
}

/// The private halves of one bundle.
#[derive(Debug)]
pub struct PrekeyKeys {
    /// The X25519 secret.
    pub x25519: PrekeySecret,
    /// The ML-KEM-768 key pair's 64-byte seed (FIPS 203 `d ‖ z`).
    pub kem_seed: zeroize::Zeroizing<[u8; 64]>,
}

impl PrekeyKeys {
    /// The ML-KEM key pair of the seed.
    pub fn kem(&self) -> KemKeyPair {
        KemKeyPair::from_seed(*self.kem_seed)
    }
}

fn encode_body(b: &Bundle) -> Vec<u8> {
    Encoder::default()
        .u16(PROTOCOL_VERSION)
        .u8(b.kind.byte())
        .fixed(&b.id)
        .bytes(b.receiver.as_str().as_bytes())
        .fixed(&b.receiver_fp.0)
        .u64(b.created)
        .u64(b.expires)
        .fixed(&b.share)
        .fixed(&b.kem_key[..])
        .finish()
}

/// Makes a fresh bundle for `receiver`, valid from `now` for `validity`
/// seconds (at most [`MAX_VALIDITY_SECS`]): the signed bytes to deposit, and
/// the private halves to keep.
pub fn make_bundle(
    identity: &Identity,
    receiver: &AgentName,
    kind: BundleKind,
    now: u64,
    validity: u64,
) -> (Vec<u8>, Bundle, PrekeyKeys) {
    let x25519 = PrekeySecret::generate();
    let kem_seed = zeroize::Zeroizing::new(crate::crypto::random_array::<64>());
    let kem = KemKeyPair::from_seed(*kem_seed);
    let mut bundle = Bundle {
        kind,
        id: crate::crypto::random_array(),
        receiver: receiver.clone(),
        receiver_fp: identity.fingerprint(),
        created: now,
        expires: now + validity.min(MAX_VALIDITY_SECS),
        share: x25519.public(),
        kem_key: Box::new(*kem.encapsulation_key()),
        body: Vec::new(),
    };
    bundle.body = encode_body(&bundle);
    let signature = identity.sign(LABEL, &bundle.body);
    let signed = Encoder::default()
        .bytes(&bundle.body)
        .bytes(&signature)
        .finish();
    (signed, bundle, PrekeyKeys { x25519, kem_seed })
}

/// Parses a bundle's signed bytes without checking the signature (the
/// receiver reading its own back, or a sender before it verifies).
fn parse(signed: &[u8]) -> Result<(Bundle, &[u8]), HandshakeError> {
    let bad = |_| HandshakeError::Malformed("prekey bundle");
    if signed.len() > MAX_BUNDLE_LEN {
        return Err(HandshakeError::Malformed("prekey bundle"));
    }
    let mut outer = Decoder::new(signed);
    let body = outer.bytes(MAX_BUNDLE_LEN).map_err(bad)?;
    let signature = outer.bytes(MAX_BUNDLE_LEN).map_err(bad)?;
    outer.finish().map_err(bad)?;
    let mut d = Decoder::new(body);
    let version = d.u16().map_err(bad)?;
    if version != PROTOCOL_VERSION {
        return Err(HandshakeError::Version(version));
    }
    let kind = match d.u8().map_err(bad)? {
        1 => BundleKind::OneTime,
        2 => BundleKind::LastResort,
        _ => return Err(HandshakeError::Malformed("prekey bundle")),
    };
    let id = d.array().map_err(bad)?;
    let name = d.bytes(MAX_NAME_LEN).map_err(bad)?;
    let receiver = std::str::from_utf8(name)
        .ok()
        .and_then(|s| AgentName::new(s).ok())
        .ok_or(HandshakeError::Malformed("prekey bundle"))?;
    let receiver_fp = Fingerprint(d.array().map_err(bad)?);
    let created = d.u64().map_err(bad)?;
    let expires = d.u64().map_err(bad)?;
    let share = d.array().map_err(bad)?;
    let kem_key = Box::new(d.array().map_err(bad)?);
    d.finish().map_err(bad)?;
    let bundle = Bundle {
        kind,
        id,
        receiver,
        receiver_fp,
        created,
        expires,
        share,
        kem_key,
        body: body.to_vec(),
    };
    Ok((bundle, signature))
}

/// The sender's checks of a bundle the broker handed over, in this order:
/// structure and version; the signature with `receiver_key` (already checked
/// against its pin); that it names `receiver` and that key; that it is valid
/// at `now` (`created ≤ now + 300`, `now < expires`, `expires − created ≤ 35
/// days`). Any failure means the broker (or the receiver) gave a bundle that
/// must not be used.
pub fn verify_bundle(
    signed: &[u8],
    receiver_key: &PublicKey,
    receiver: &AgentName,
    now: u64,
) -> Result<Bundle, HandshakeError> {
    let (bundle, signature) = parse(signed)?;
    receiver_key.verify(LABEL, &bundle.body, signature)?;
    if &bundle.receiver != receiver || bundle.receiver_fp != receiver_key.fingerprint() {
        return Err(HandshakeError::NotForUs {
            name: bundle.receiver.clone(),
            fingerprint: bundle.receiver_fp,
        });
    }
    let valid = bundle.created <= now.saturating_add(CLOCK_SKEW_SECS)
        && now < bundle.expires
        && bundle.expires.saturating_sub(bundle.created) <= MAX_VALIDITY_SECS;
    if !valid {
        return Err(HandshakeError::Stale {
            skew: now.abs_diff(bundle.expires),
            window: MAX_VALIDITY_SECS,
        });
    }
    Ok(bundle)
}

/// A receiver reading back one of its own bundles (from its home): parsed,
/// with the signature's presence but not its validity checked.
pub fn own_bundle(signed: &[u8]) -> Result<Bundle, HandshakeError> {
    parse(signed).map(|(b, _)| b)
}
