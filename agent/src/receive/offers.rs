//! The two kinds of offer a receiver takes (PROTOCOL.md §3.3, §3.4): a live
//! one, which the sender waits to have accepted, and one stored at the broker
//! while this receiver was offline, sealed to one of its prekeys. Here they
//! are told apart, verified and opened; [`super::admit`] runs the gate
//! around them, which is the same for both.

use keyferry_common::handshake::prekey::{Bundle, BundleKind, PrekeyKeys};
use keyferry_common::handshake::stored::{VerifiedStored, parse_stored, verify_stored};
use keyferry_common::handshake::{self, OpenedOffer, SignedOffer, Terms};
use keyferry_common::identity::{Fingerprint, Identity};
use keyferry_common::name::AgentName;
use keyferry_common::schedule::PairKeys;
use keyferry_common::wire::message::RefuseReason;

use super::Failure;
use crate::mailbox::prekeys::{LoadError, Prekeys};

/// An offer as it came: live (the sender waits for the accept), or stored
/// at the broker for this receiver while it was offline (PROTOCOL.md §3.4).
#[derive(Debug, Clone, Copy)]
pub(super) enum Incoming<'o> {
    /// `Offered`.
    Live(&'o SignedOffer),
    /// `StoredOffered`.
    Stored(&'o SignedOffer),
}

impl Incoming<'_> {
    /// Its sender's name and key fingerprint, unauthenticated.
    pub(super) fn sender(&self) -> Result<(AgentName, Fingerprint), String> {
        match self {
            Self::Live(o) => o.parse().map(|f| (f.sender, f.sender_fp)),
            Self::Stored(o) => parse_stored(o).map(|f| (f.sender, f.sender_fp)),
        }
        .map_err(|e| e.to_string())
    }
}

/// A verified offer, opened: a live one still to accept, or a stored one
/// with its pair keys and the prekey it used.
pub(super) enum Opened {
    Live(Box<OpenedOffer>),
    Stored {
        terms: Box<Terms>,
        pair: Box<PairKeys>,
    },
}

impl Opened {
    pub(super) fn terms(&self) -> &Terms {
        match self {
            Self::Live(o) => o.terms(),
            Self::Stored { terms, .. } => terms,
        }
    }
}

/// The prekey a stored transfer used, to delete once it is placed or refused.
#[derive(Debug, Clone, Copy)]
pub(super) struct PrekeyUse {
    /// The bundle's id.
    pub id: [u8; 16],
    /// Whether it was the last-resort bundle (kept for other senders until
    /// it is rotated away).
    pub last_resort: bool,
}

/// A prekey file this receiver cannot read now (its mode, the disk): not
/// the offer's fault, so "not now" (PROTOCOL.md §6.7).
fn unreadable(why: String) -> Failure {
    Failure::Refused(RefuseReason::TryLater { seconds: 60 }, why)
}

/// How far a stored offer got through the gate: what its end may say.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct StoredGate {
    /// Its sender's signature verified, its id was not seen, and the prekey
    /// it names is held here: from now on a refusal is signed, and the
    /// prekey goes with the transfer's end.
    pub signable: bool,
    /// That prekey.
    pub prekey: Option<PrekeyUse>,
    /// The offer's time.
    pub time: u64,
}

/// The first checks of a stored offer (PROTOCOL.md §3.4), before the gate's
/// policy: its id not seen before, the sender's signature, addressee and
/// time, and the prekey it names held in this home. What fails here is
/// answered without a signed receipt: it may be a broker's replay or
/// invention, and the receiver signs nothing about those.
/// Returns the verified offer too: the gate goes on with it, without a
/// second signature check.
pub(super) fn precheck_stored(
    offer: &SignedOffer,
    key: &keyferry_common::identity::PublicKey,
    (me, my_fp): (&AgentName, Fingerprint),
    prekeys: Option<&Prekeys>,
    now: u64,
) -> Result<(StoredGate, VerifiedStored), Failure> {
    let v = verify_stored(offer, key, me, my_fp, now).map_err(|e| failed(e.to_string()))?;
    let id = v.fields().bundle_id;
    let (bundle, _) = held_prekey(prekeys, &id)?;
    let gate = StoredGate {
        signable: true,
        prekey: Some(PrekeyUse {
            id,
            last_resort: bundle.kind == BundleKind::LastResort,
        }),
        time: v.fields().time,
    };
    Ok((gate, v))
}

fn failed(why: String) -> Failure {
    Failure::Refused(RefuseReason::VerificationFailed, why)
}

/// The prekey `id` and its private halves from this home: a file that
/// cannot be read now is "not now", one that is missing (used already,
/// expired) or no prekey file refuses the offer.
fn held_prekey(prekeys: Option<&Prekeys>, id: &[u8; 16]) -> Result<(Bundle, PrekeyKeys), Failure> {
    let held = prekeys
        .ok_or_else(|| failed("this receiver keeps no prekeys".into()))?
        .load(id)
        .map_err(|e| match e {
            LoadError::Unreadable(why) => unreadable(why),
            LoadError::Corrupt(why) => failed(why),
        })?;
    held.ok_or_else(|| {
        failed(format!(
            "it was sealed to prekey {}, which this receiver no longer holds (used \
             already, or expired): a replay, or a transfer made for another home",
            hex::encode(id)
        ))
    })
}

/// A verified offer, before any private key was used.
pub(super) enum Verified {
    Live(handshake::VerifiedOffer),
    Stored(VerifiedStored),
}

impl Verified {
    /// Opens it: the RSA unwrap and the terms, and for a stored offer the
    /// prekey it names (which this home must still hold: a used one-time
    /// prekey is gone, so a replayed stored offer fails here).
    pub(super) fn open(
        self,
        identity: &Identity,
        prekeys: Option<&Prekeys>,
    ) -> Result<Opened, Failure> {
        match self {
            Self::Live(v) => Ok(Opened::Live(Box::new(
                v.open(identity).map_err(|e| failed(e.to_string()))?,
            ))),
            Self::Stored(v) => {
                let (bundle, keys) = held_prekey(prekeys, &v.fields().bundle_id)?;
                let (terms, pair) = v
                    .open(identity, &bundle, &keys)
                    .map_err(|e| failed(e.to_string()))?;
                Ok(Opened::Stored {
                    terms: Box::new(terms),
                    pair: Box::new(pair),
                })
            }
        }
    }
}
