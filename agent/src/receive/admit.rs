//! The offer gate, in the order PROTOCOL.md §3.3 gives: who sent it, which
//! key, the pin, capacity, a transfer id already seen, the signature,
//! addressee and time, the id recorded (on disk), the RSA
//! budget, and only then the RSA decryption and the terms; a first-contact
//! key is pinned once all of that verified. Then the place the data goes
//! ([`super::resume`]: fresh, or what an earlier attempt left), the free
//! space it needs, and the accept. Nothing here touches a socket; a refusal
//! says which reason goes back to the sender.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use keyferry_common::chat::CHAT_BOUND;
use keyferry_common::handshake::direct::{DirectMode, DirectTerms, punch_from_bytes};
use keyferry_common::handshake::{
    self, DEFAULT_TIME_WINDOW_SECS, Kind, MAX_MESSAGE_LEN as MAX_MESSAGE, ResumePoint, Terms,
};
use keyferry_common::identity::PublicKey;
use keyferry_common::ids::TransferId;
use keyferry_common::name::AgentName;
use keyferry_common::schedule::PairKeys;
use keyferry_common::sync::lock;
use keyferry_common::transfer::MAX_RECEIVERS;
use keyferry_common::wire::message::RefuseReason;

use super::offers::{Incoming, Opened, StoredGate, Verified, precheck_stored};
use super::resume::{Origin, Place, prepare};
use super::{Failure, MAX_CONCURRENT, MAX_PER_SENDER, SPACE_MARGIN, Shared};
use crate::direct::listen::{Punch, terms_for};
use crate::home::now_unix;
use crate::trust::budget::NEW_KEY_AGE_SECS;
use crate::trust::pins::{PinCheck, PinError};
use crate::trust::replay::{ReplayGuard, Replayed};

/// An offer that passed the gate: what the stream needs, and its place among
/// the receiver's transfers (released when dropped).
pub(super) struct Admitted<'a> {
    /// The accept bytes for the sender.
    pub accept: Vec<u8>,
    /// The pair's keys.
    pub pair: PairKeys,
    /// The authenticated terms.
    pub terms: Terms,
    /// The sender's verified key.
    pub sender_key: PublicKey,
    /// Whether that key was not pinned before this offer.
    pub first_contact: bool,
    /// How long the user has to answer, if the user is asked (the accept
    /// told the sender to wait for the go-ahead).
    pub ask: Option<std::time::Duration>,
    /// Where files go (none for a message).
    pub place: Option<Place>,
    /// Held until the transfer's stream ends.
    pub slot: Slot<'a>,
    /// Which paths the accept said the stream may take.
    pub direct: DirectMode,
    /// The simultaneous open to try beside the listener, if any.
    pub punch: Option<Punch>,
}

/// Runs the gate on one offer for transfer `tid` (its id already read).
pub(super) async fn admit<'a>(
    shared: &'a Shared,
    from: &AgentName,
    spki: &[u8],
    offer: Incoming<'_>,
    tid: TransferId,
    gate: &mut StoredGate,
) -> Result<Admitted<'a>, Failure> {
    let refuse = |r, why: String| Failure::Refused(r, why);
    let ctx = &shared.ctx;
    let (sender, sender_fp) = offer
        .sender()
        .map_err(|e| refuse(RefuseReason::VerificationFailed, e))?;
    if &sender != from {
        return Err(refuse(
            RefuseReason::VerificationFailed,
            "the offer names another sender than the broker reports".into(),
        ));
    }
    let key = PublicKey::from_spki_der(spki)
        .map_err(|e| refuse(RefuseReason::Policy, format!("sender key refused: {e}")))?;
    // A key the signed offer itself contradicts is refused before it can be
    // pinned: otherwise a broker could plant it and lock the real sender out.
    if key.fingerprint() != sender_fp {
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
                    sender_fp
                ),
            ),
        });
    }
    // A pin that exists must match; a first-contact key is pinned only once
    // the offer's signature and terms verified (below), so a refused offer
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
    // A stored offer's replay, or one its prekey cannot open, is refused
    // first and unsigned; anything refused after this is the sender's for
    // good, and signed (PROTOCOL.md §3.4).
    let mut stored = None;
    if let Incoming::Stored(o) = offer {
        not_seen(&shared.stored_replay, tid).await?;
        let me = (&ctx.name, ctx.identity.fingerprint());
        let (checked, verified) =
            precheck_stored(o, &key, me, shared.prekeys.as_ref(), now_unix())?;
        *gate = checked;
        stored = Some(verified);
    }
    // Whom this receiver takes at all (--accept-from), before any RSA work.
    let policy = &shared.opts.policy;
    policy.admits(from, pinned_at.is_some())?;

    // Capacity, before any RSA operation.
    {
        let mut l = lock(&shared.limits);
        // Standard output takes one stream at a time.
        // A chat takes each peer's chat stream besides a transfer of files.
        let (most, per_sender) = match &shared.opts.chat {
            _ if shared.opts.stdout => (1, MAX_PER_SENDER),
            Some(chat) => (MAX_CONCURRENT + chat.peers.len(), MAX_PER_SENDER + 1),
            None => (MAX_CONCURRENT, MAX_PER_SENDER),
        };
        if l.active >= most || l.per_sender.get(from).copied().unwrap_or(0) >= per_sender {
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

    // An id already seen is refused before any RSA work (a look-up costs
    // nothing); it is recorded only once the signature verified, below.
    let replayed = |e: Replayed| refuse(RefuseReason::VerificationFailed, e.to_string());
    if let Incoming::Live(_) = offer {
        not_seen(&shared.replay, tid).await?;
    }
    let unverified =
        |e: handshake::HandshakeError| refuse(RefuseReason::VerificationFailed, e.to_string());
    let (me, my_fp) = (&ctx.name, ctx.identity.fingerprint());
    // A stored offer's signature was checked first (above).
    let verified = match (offer, stored) {
        (Incoming::Live(o), _) => Verified::Live(
            handshake::verify_offer(o, &key, me, my_fp, now_unix(), DEFAULT_TIME_WINDOW_SECS)
                .map_err(unverified)?,
        ),
        (Incoming::Stored(_), Some(v)) => Verified::Stored(v),
        (Incoming::Stored(_), None) => {
            return Err(refuse(
                RefuseReason::Policy,
                "a stored offer not checked".into(),
            ));
        }
    };
    // Synced to disk before the offer is answered. A stored offer is the
    // same offer each time the broker makes it: its id is recorded when it
    // ends for good (`super::stored`), not now.
    if let Verified::Live(v) = &verified {
        let (guard, time) = (Arc::clone(&shared.replay), v.fields().time);
        tokio::task::spawn_blocking(move || lock(&guard).check_and_insert(tid, time, now_unix()))
            .await
            .map_err(|e| refuse(RefuseReason::Policy, e.to_string()))?
            .map_err(replayed)?;
    }
    // A first contact is as new as a key can be; a sender this receiver's
    // user named (--accept-from) counts as established (docs/SECURITY.md).
    let age = if policy.names(from) {
        NEW_KEY_AGE_SECS
    } else {
        pinned_at.map_or(0, |at| now_unix().saturating_sub(at))
    };
    if let Err(wait) = lock(&shared.budget).try_take(key.fingerprint(), age, Instant::now()) {
        let which = if age < NEW_KEY_AGE_SECS {
            "a recently pinned key"
        } else {
            "a key"
        };
        // Whole seconds, rounded up: the sender must not come back too early.
        let seconds = u32::try_from(wait.as_secs() + u64::from(wait.subsec_nanos() > 0))
            .unwrap_or(u32::MAX)
            .max(1);
        return Err(refuse(
            RefuseReason::TryLater { seconds },
            format!(
                "the RSA decryption budget for {which} is spent; {from} was told to come back in {seconds} s"
            ),
        ));
    }
    let identity = Arc::clone(&ctx.identity);
    let prekeys = shared.prekeys.clone();
    let opened = tokio::task::spawn_blocking(move || verified.open(&identity, prekeys.as_ref()))
        .await
        .map_err(|e| refuse(RefuseReason::VerificationFailed, e.to_string()))??;
    let terms = opened.terms().clone();
    // A stored transfer goes to this receiver alone, from byte 0, and is
    // never a chat.
    if matches!(opened, Opened::Stored { .. })
        && (terms.receivers != 1 || terms.resumes.is_some() || terms.kind == Kind::Chat)
    {
        return Err(refuse(
            RefuseReason::Policy,
            "a stored transfer that is a chat, or names other receivers or an earlier attempt"
                .into(),
        ));
    }
    check_terms(shared, from, &terms, &mut slot)?;
    if terms.kind == Kind::Chat {
        lock(&shared.chats).insert(tid);
    }
    // Asked users pin a first contact only once they said yes; a chat's
    // peers were named by the user who started it, and are not asked about.
    let ask = policy.asks().filter(|_| terms.kind != Kind::Chat);
    if pinned_at.is_none() && ask.is_none() {
        // Signature and terms verified: only now is the key worth a pin.
        match pins.check_or_pin(from.as_str(), key.fingerprint(), now_unix()) {
            Ok(PinCheck::NewlyPinned(_)) => crate::output::err_line(&format!(
                "NEW KEY for {from} {} — first contact, verify out of band",
                key.fingerprint()
            )),
            Ok(PinCheck::Known(_)) => {}
            Err(e @ PinError::Mismatch { .. }) => {
                return Err(refuse(RefuseReason::KeyMismatch, e.to_string()));
            }
            Err(e) => return Err(refuse(RefuseReason::Policy, e.to_string())),
        }
    }
    let stream_id = match &opened {
        Opened::Live(o) => o.fields().stream_id,
        Opened::Stored { pair, .. } => pair.stream_id,
    };
    let place = match terms.kind {
        Kind::Message | Kind::Chat => None,
        // Straight to standard output: nothing staged, nothing to resume.
        Kind::Files if shared.opts.stdout => None,
        Kind::Files => {
            let origin = Origin {
                origin: terms.resumes.unwrap_or(stream_id),
                resumes: terms.resumes.is_some(),
                sender: from.clone(),
                sender_fp: key.fingerprint(),
                total: terms.size,
                attempt: stream_id,
            };
            // A resume reads its whole prefix back: not on this task's thread.
            let (out, key) = (Arc::clone(&shared.out), Arc::clone(&shared.journal_key));
            let place =
                tokio::task::spawn_blocking(move || prepare(&out, &key, &origin, now_unix()))
                    .await
                    .map_err(|e| refuse(RefuseReason::Policy, e.to_string()))??;
            // A stream of unknown size declares only a bound: a disk that
            // fills up fails it cleanly instead.
            let needed = if terms.size_known {
                terms.size - place.point.offset.min(terms.size)
            } else {
                0
            };
            if let Err(e) = reserve_space(shared, needed, &mut slot) {
                place.discard_if_empty();
                return Err(e);
            }
            Some(place)
        }
    };
    let point = place.as_ref().map_or(ResumePoint::none(), |p| p.point);
    // A resumed transfer was asked about (and taken) when it began: its
    // journal is written only after the user's yes.
    let ask = ask.filter(|_| point.offset == 0);
    let ask_secs = ask.map_or(0, |t| u32::try_from(t.as_secs()).unwrap_or(u32::MAX));
    // Checked with the other terms (`check_terms`).
    let punch_to = punch_from_bytes(&terms.punch).unwrap_or_default();
    // A stored transfer's data comes from the broker, never directly.
    let (direct, punch) = if matches!(opened, Opened::Stored { .. }) {
        (DirectTerms::never(), None)
    } else {
        terms_for(
            shared.direct.as_ref(),
            shared.opts.direct,
            terms.kind,
            &ctx.broker,
            (&punch_to, &ctx.seen),
        )
        .await
    };
    let (accept, pair) = match opened {
        Opened::Live(opened) => match opened.accept_asking(point, ask_secs, &direct) {
            Ok(done) => done,
            Err(e) => {
                // An offer whose key exchange fails leaves nothing behind.
                if let Some(p) = place {
                    p.discard_if_empty();
                }
                return Err(refuse(RefuseReason::VerificationFailed, e.to_string()));
            }
        },
        // The keys are agreed already; the data is at the broker.
        Opened::Stored { pair, .. } => (Vec::new(), *pair),
    };

    Ok(Admitted {
        accept,
        pair,
        terms,
        first_contact: pinned_at.is_none(),
        ask,
        sender_key: key,
        place,
        slot,
        direct: direct.mode,
        punch,
    })
}

/// Refuses transfer id `tid` if the replay guard `guard` holds it (a
/// look-up only).
async fn not_seen(guard: &Arc<Mutex<ReplayGuard>>, tid: TransferId) -> Result<(), Failure> {
    let replayed = |e: Replayed| Failure::Refused(RefuseReason::VerificationFailed, e.to_string());
    let guard = Arc::clone(guard);
    let seen = tokio::task::spawn_blocking(move || lock(&guard).seen(&tid, now_unix()))
        .await
        .map_err(|e| Failure::Refused(RefuseReason::Policy, e.to_string()))?;
    if seen.map_err(replayed)? {
        return Err(replayed(Replayed::Seen));
    }
    Ok(())
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

/// Checks the kind and size against this receiver's limits.
fn check_terms(
    shared: &Shared,
    from: &AgentName,
    t: &Terms,
    slot: &mut Slot<'_>,
) -> Result<(), Failure> {
    let refuse = |r, why: String| Failure::Refused(r, why);
    if t.receivers == 0 || t.receivers as usize > MAX_RECEIVERS {
        return Err(refuse(
            RefuseReason::Policy,
            format!("a stream to {} receivers", t.receivers),
        ));
    }
    if punch_from_bytes(&t.punch).is_err() {
        return Err(refuse(
            RefuseReason::VerificationFailed,
            "the offer's terms name malformed addresses".into(),
        ));
    }
    // A chat stream goes only to a chat, from one of its peers, with the
    // chat's bound and nothing to resume.
    if t.kind == Kind::Chat {
        let ours = shared
            .opts
            .chat
            .as_ref()
            .is_some_and(|c| c.peers.contains(from));
        if !ours || t.size_known || t.size > CHAT_BOUND || t.resumes.is_some() {
            return Err(refuse(
                RefuseReason::Policy,
                format!("a chat from {from}, who is not in a chat with this receiver"),
            ));
        }
    }
    if t.kind == Kind::Message && (t.size > MAX_MESSAGE as u64 || t.resumes.is_some()) {
        return Err(refuse(
            RefuseReason::TooLarge {
                most: MAX_MESSAGE as u64,
            },
            format!("a message of {} bytes", t.size),
        ));
    }
    // Standard output carries one file's bytes and nothing else.
    if shared.opts.stdout && t.kind == Kind::Message {
        return Err(refuse(
            RefuseReason::Policy,
            "a text message, but --stdout takes one file".into(),
        ));
    }
    // A stream of unknown size is never resumed (PROTOCOL.md §5.2).
    if !t.size_known && t.resumes.is_some() {
        return Err(refuse(
            RefuseReason::Policy,
            "a stream of unknown size that says it resumes".into(),
        ));
    }
    if let Some(max) = shared.opts.max_size
        && t.size > max
    {
        return Err(refuse(
            RefuseReason::TooLarge { most: max },
            format!("{} bytes is more than --max-size {max}", t.size),
        ));
    }
    if t.kind == Kind::Message {
        reserve(shared, t.size, slot);
    }
    Ok(())
}

fn reserve(shared: &Shared, size: u64, slot: &mut Slot<'_>) {
    lock(&shared.limits).in_flight += size;
    slot.size += size;
}

/// Reserves `needed` bytes of the out dir's free space, keeping a margin.
fn reserve_space(shared: &Shared, needed: u64, slot: &mut Slot<'_>) -> Result<(), Failure> {
    let l = lock(&shared.limits);
    let free = shared.out.free_space().unwrap_or(0);
    let all = needed
        .saturating_add(l.in_flight)
        .saturating_add(SPACE_MARGIN);
    drop(l);
    if all > free {
        // What would fit, for the sender to hear before any data moves.
        let most = free.saturating_sub(all - needed);
        return Err(Failure::Refused(
            RefuseReason::TooLarge { most },
            format!("{needed} more bytes do not fit: {free} bytes free, keeping 1 GiB spare"),
        ));
    }
    reserve(shared, needed, slot);
    Ok(())
}
