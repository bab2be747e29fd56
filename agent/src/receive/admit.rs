//! The offer gate, in the order PROTOCOL.md §3.3 gives: who sent it, which
//! key, the pin, capacity, the signature, addressee and time, replay, the RSA
//! budget, and only then the RSA decryption and the metadata; a first-contact
//! key is pinned last, once all of that verified. Nothing here touches a
//! socket; a refusal says which reason goes back to the sender.

use std::sync::Arc;
use std::time::Instant;

use keyferry_common::handshake::{
    self, DEFAULT_TIME_WINDOW_SECS, Kind, MAX_MESSAGE_LEN as MAX_MESSAGE, Metadata, SignedOffer,
};
use keyferry_common::identity::PublicKey;
use keyferry_common::ids::TransferId;
use keyferry_common::name::AgentName;
use keyferry_common::schedule::StreamKeys;
use keyferry_common::sync::lock;
use keyferry_common::wire::message::RefuseReason;

use super::{Failure, MAX_CONCURRENT, MAX_PER_SENDER, SPACE_MARGIN, Shared, filename};
use crate::home::now_unix;
use crate::trust::budget::NEW_KEY_AGE_SECS;
use crate::trust::pins::{PinCheck, PinError};

/// An offer that passed the gate: what the stream needs, and its place among
/// the receiver's transfers (released when dropped).
pub(super) struct Admitted<'a> {
    /// The accept bytes for the sender.
    pub accept: Vec<u8>,
    /// The stream keys.
    pub keys: StreamKeys,
    /// The authenticated metadata.
    pub metadata: Metadata,
    /// For a file, the name to store it under (checked).
    pub stored_name: Option<String>,
    /// Held until the transfer ends.
    pub _slot: Slot<'a>,
}

/// Runs the gate on one offer for transfer `tid` (its id already read).
pub(super) async fn admit<'a>(
    shared: &'a Shared,
    from: &AgentName,
    spki: &[u8],
    offer: &SignedOffer,
    tid: TransferId,
) -> Result<Admitted<'a>, Failure> {
    let refuse = |r, why: String| Failure::Refused(r, why);
    let ctx = &shared.ctx;
    let fields = offer
        .parse()
        .map_err(|e| refuse(RefuseReason::VerificationFailed, e.to_string()))?;
    if &fields.sender != from {
        return Err(refuse(
            RefuseReason::VerificationFailed,
            "the offer names another sender than the broker reports".into(),
        ));
    }
    let key = PublicKey::from_spki_der(spki)
        .map_err(|e| refuse(RefuseReason::Policy, format!("sender key refused: {e}")))?;
    // A key the signed offer itself contradicts is refused before it can be
    // pinned: otherwise a broker could plant it and lock the real sender out.
    if key.fingerprint() != fields.sender_fp {
        let pins = ctx.home.known_peers();
        return Err(match pins.get(from.as_str()) {
            Ok(Some(pin)) if pin.fingerprint != key.fingerprint() => refuse(
                RefuseReason::KeyMismatch,
                PinError::Mismatch {
                    key: from.to_string(),
                    pinned: pin.fingerprint,
                    presented: key.fingerprint(),
                    file: pins.path().to_owned(),
                }
                .to_string(),
            ),
            _ => refuse(
                RefuseReason::VerificationFailed,
                format!(
                    "the broker gave key {} for {from}, but the signed offer names {}; \
                     nothing was pinned",
                    key.fingerprint(),
                    fields.sender_fp
                ),
            ),
        });
    }
    // A pin that exists must match; a first-contact key is pinned only once
    // the offer's signature and metadata verified (below), so a refused offer
    // pins nothing.
    let pins = ctx.home.known_peers();
    let pinned_at = match pins.get(from.as_str()) {
        Ok(Some(pin)) if pin.fingerprint == key.fingerprint() => Some(pin.pinned_at),
        Ok(Some(pin)) => {
            return Err(refuse(
                RefuseReason::KeyMismatch,
                PinError::Mismatch {
                    key: from.to_string(),
                    pinned: pin.fingerprint,
                    presented: key.fingerprint(),
                    file: pins.path().to_owned(),
                }
                .to_string(),
            ));
        }
        Ok(None) => None,
        Err(e) => return Err(refuse(RefuseReason::Policy, e.to_string())),
    };

    // Capacity, before any RSA operation.
    {
        let mut l = lock(&shared.limits);
        if l.active >= MAX_CONCURRENT
            || l.per_sender.get(from).copied().unwrap_or(0) >= MAX_PER_SENDER
        {
            return Err(refuse(
                RefuseReason::Busy,
                "too many transfers in progress".into(),
            ));
        }
        l.active += 1;
        *l.per_sender.entry(from.clone()).or_default() += 1;
    }
    let mut slot = Slot {
        shared,
        sender: from.clone(),
        size: 0,
    };

    let verified = handshake::verify_offer(
        offer,
        &key,
        &ctx.name,
        ctx.identity.fingerprint(),
        now_unix(),
        DEFAULT_TIME_WINDOW_SECS,
    )
    .map_err(|e| refuse(RefuseReason::VerificationFailed, e.to_string()))?;
    lock(&shared.replay)
        .check_and_insert(tid, verified.fields().time, now_unix())
        .map_err(|e| refuse(RefuseReason::VerificationFailed, e.to_string()))?;
    // A first contact is as new as a key can be.
    let age = pinned_at.map_or(0, |at| now_unix().saturating_sub(at));
    if !lock(&shared.budget).try_take(key.fingerprint(), age, Instant::now()) {
        let which = if age < NEW_KEY_AGE_SECS {
            "recently pinned key"
        } else {
            "key"
        };
        return Err(refuse(
            RefuseReason::Policy,
            format!("RSA decryption budget for this {which} exhausted; try later"),
        ));
    }
    let identity = Arc::clone(&ctx.identity);
    let opened = tokio::task::spawn_blocking(move || verified.open(&identity))
        .await
        .map_err(|e| refuse(RefuseReason::VerificationFailed, e.to_string()))?
        .map_err(|e| refuse(RefuseReason::VerificationFailed, e.to_string()))?;
    let metadata = opened.metadata().clone();
    let stored_name = check_metadata(shared, &metadata, &mut slot)?;
    if pinned_at.is_none() {
        // Signature and metadata verified: only now is the key worth a pin.
        match pins.check_or_pin(from.as_str(), key.fingerprint(), now_unix()) {
            Ok(PinCheck::NewlyPinned(_)) => eprintln!(
                "NEW KEY for {from} {} — first contact, verify out of band",
                key.fingerprint()
            ),
            Ok(PinCheck::Known(_)) => {}
            Err(e @ PinError::Mismatch { .. }) => {
                return Err(refuse(RefuseReason::KeyMismatch, e.to_string()));
            }
            Err(e) => return Err(refuse(RefuseReason::Policy, e.to_string())),
        }
    }

    let (accept, keys) = opened
        .accept()
        .map_err(|e| refuse(RefuseReason::VerificationFailed, e.to_string()))?;
    Ok(Admitted {
        accept,
        keys,
        metadata,
        stored_name,
        _slot: slot,
    })
}

/// Releases a transfer's slot when dropped.
pub(super) struct Slot<'a> {
    shared: &'a Shared,
    sender: AgentName,
    size: u64,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut l = lock(&self.shared.limits);
        l.active -= 1;
        l.in_flight -= self.size;
        if let Some(n) = l.per_sender.get_mut(&self.sender) {
            *n -= 1;
            if *n == 0 {
                l.per_sender.remove(&self.sender);
            }
        }
    }
}

/// Checks size and name; reserves the declared size. Returns the name to store a file under.
fn check_metadata(
    shared: &Shared,
    m: &Metadata,
    slot: &mut Slot<'_>,
) -> Result<Option<String>, Failure> {
    let refuse = |r, why: String| Failure::Refused(r, why);
    let name = match m.kind {
        Kind::Message => {
            if m.size > MAX_MESSAGE as u64 {
                return Err(refuse(
                    RefuseReason::TooLarge,
                    format!("a message of {} bytes", m.size),
                ));
            }
            None
        }
        Kind::File => Some(
            filename::check(&m.name).map_err(|e| refuse(RefuseReason::Policy, e.to_string()))?,
        ),
    };
    if m.size > shared.opts.max_size {
        return Err(refuse(
            RefuseReason::TooLarge,
            format!(
                "{} bytes is more than --max-size {}",
                m.size, shared.opts.max_size
            ),
        ));
    }
    let mut l = lock(&shared.limits);
    if m.kind == Kind::File {
        let free = shared.out.free_space().unwrap_or(0);
        let needed = m
            .size
            .saturating_add(l.in_flight)
            .saturating_add(SPACE_MARGIN);
        if needed > free {
            return Err(refuse(
                RefuseReason::TooLarge,
                format!(
                    "{} bytes does not fit: {free} bytes free, keeping 1 GiB spare",
                    m.size
                ),
            ));
        }
    }
    l.in_flight += m.size;
    slot.size = m.size;
    Ok(name)
}
