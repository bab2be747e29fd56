//! What is particular to transfers stored at the broker while this receiver
//! was offline (PROTOCOL.md §3.4, §6.7): topping up the prekeys the broker
//! hands to senders, and how such a transfer ends — the signed receipt the
//! broker keeps for the sender (placed, or refused for good), the prekey
//! deleted once it was used, or a "not now" that leaves it at the broker.

use keyferry_common::handshake::SignedOffer;
use keyferry_common::handshake::receipt::{Outcome, StoredReceipt};
use keyferry_common::handshake::stored::parse_stored;
use keyferry_common::identity::Fingerprint;
use keyferry_common::ids::TransferId;
use keyferry_common::name::AgentName;
use keyferry_common::sync::lock;
use keyferry_common::wire::message::{AbortReason, Message, RefuseReason};
use tokio::sync::mpsc;

use super::incoming::Ended;
use super::offers::{PrekeyUse, StoredGate};
use super::report::{self, Placed};
use super::{Failure, Shared};
use crate::direct::Path;
use crate::home::now_unix;
use crate::mailbox::prekeys::top_up as bundles_to_add;
use crate::mailbox::signed::{Found, Kept};
use crate::output::notice;

/// Most one-time bundles in one `Prekeys` message (each is at most about
/// 1.9 KiB with a 4096-bit key; a broker's control frames may be as small as
/// 9 KiB), the last-resort bundle in one of its own.
const PER_MESSAGE: usize = 4;
/// When a stored transfer failed for now (its data connection broke, the
/// disk is full), the broker offers it again after this long.
const AGAIN_IN: u32 = 30;

/// Deposits fresh prekeys when the broker holds fewer one-time bundles than
/// the low-water mark, or a last-resort bundle near its end.
pub(super) async fn top_up(shared: &Shared, held: (u32, u64), out: &mpsc::Sender<Message>) {
    let Some(prekeys) = shared.prekeys.clone() else {
        return;
    };
    let (identity, me) = (
        std::sync::Arc::clone(&shared.ctx.identity),
        shared.ctx.name.clone(),
    );
    let signed = shared.signed.clone();
    let made = tokio::task::spawn_blocking(move || {
        // Whatever no stored transfer can name any more goes first.
        prekeys.sweep(now_unix());
        if let Some(s) = signed {
            s.sweep();
        }
        bundles_to_add(&prekeys, &identity, &me, held, now_unix())
    })
    .await;
    let (fresh, last_resort) = match made {
        Ok(Ok(made)) => made,
        Ok(Err(e)) => {
            notice!("cannot make prekeys ({e}): transfers stored for this receiver may fail");
            return;
        }
        Err(_) => return,
    };
    if fresh.is_empty() && last_resort.is_empty() {
        return;
    }
    let mut messages: Vec<Message> = fresh
        .chunks(PER_MESSAGE)
        .map(|c| Message::Prekeys {
            bundles: c.iter().cloned().map(serde_bytes::ByteBuf::from).collect(),
            last_resort: Vec::new(),
        })
        .collect();
    if !last_resort.is_empty() {
        messages.push(Message::Prekeys {
            bundles: Vec::new(),
            last_resort,
        });
    }
    for msg in messages {
        if out.send(msg).await.is_err() {
            return;
        }
    }
}

/// One stored transfer, as it ended.
pub(super) struct End<'a> {
    pub from: &'a AgentName,
    pub offer: &'a SignedOffer,
    pub tid: TransferId,
    pub seconds: f64,
    /// How far it got through the gate.
    pub gate: StoredGate,
}

/// Whether a failure after the data began is for good (the receipt says
/// refused, and the broker deletes it) or for now (offered again later).
fn for_good(reason: AbortReason) -> bool {
    matches!(
        reason,
        AbortReason::VerificationFailed
            | AbortReason::Source
            | AbortReason::Policy
            | AbortReason::NoFreeName
            | AbortReason::Declined
            | AbortReason::NoAnswer
    )
}

/// What the sender reads in a refused receipt: the reason, never a local
/// detail (a path, an error text).
fn refused_because(me: &AgentName, refusal: &Failure) -> String {
    match refusal {
        Failure::Refused(RefuseReason::NotListed, _) => {
            format!("{me} takes transfers only from senders it names")
        }
        Failure::Refused(RefuseReason::NotKnown, _) => {
            format!("{me} accepts only known senders")
        }
        Failure::Refused(RefuseReason::TooLarge { most }, _) => {
            format!("too large for {me}, which takes at most {most} bytes now")
        }
        Failure::Refused(RefuseReason::KeyMismatch, _) => {
            format!("{me} has another key pinned for the sender")
        }
        Failure::Refused(RefuseReason::Policy, _) | Failure::Failed(AbortReason::Policy, _) => {
            format!("{me}'s rules refuse it")
        }
        Failure::Failed(AbortReason::Declined, _) => format!("{me} declined"),
        Failure::Failed(AbortReason::NoAnswer, _) => format!("no answer from {me}'s user in time"),
        Failure::Failed(AbortReason::NoFreeName, _) => {
            format!("{me} has no free name left for it")
        }
        _ => format!("it did not verify at {me}"),
    }
}

/// Most signed receipts kept to send again.
const KEEP_RECEIPTS: usize = 1024;

/// Reports a stored transfer's end, and tells the broker: a signed receipt
/// when it is over for good and its offer verified; a bare refusal when it is
/// over for good but nothing about it may be signed (an offer that did not
/// verify, a replay, a prekey no longer held; or data that did not verify,
/// which the broker or the network may have damaged); or a "not now".
pub(super) async fn ended(
    shared: &Shared,
    end: End<'_>,
    result: Result<(Placed, Path), Failure>,
    out: &mpsc::Sender<Message>,
) -> Ended {
    let (json, me) = (shared.opts.json, &shared.ctx.name);
    let End {
        from,
        offer,
        tid,
        seconds,
        gate,
    } = end;
    let not_now = |reason| Message::Refuse {
        transfer_id: tid,
        reason,
    };
    // As for a live offer, a --once receiver goes on waiting after what is
    // not its one transfer: a refusal by its rules or its user, a "not now".
    let once = |failure: &Failure| -> Ended {
        let later = matches!(
            failure,
            Failure::Refused(
                RefuseReason::Busy
                    | RefuseReason::TryLater { .. }
                    | RefuseReason::NotListed
                    | RefuseReason::NotKnown,
                _
            ) | Failure::Failed(AbortReason::Declined | AbortReason::NoAnswer, _)
        );
        (!later).then(|| Err((report::exit_code(failure), why_of(failure))))
    };
    let outcome = match &result {
        Ok((placed, via)) => {
            if let Some(p) = gate.prekey.filter(|p| p.last_resort) {
                notice!(
                    "the transfer from {from} was sealed to this receiver's last-resort prekey \
                     {}: its forward secrecy is weaker until that prekey is rotated (within 7 days)",
                    hex::encode(p.id)
                );
            }
            report::received(tid, from, placed, (seconds, *via, true), json);
            Outcome::Delivered {
                digest: placed.sha256,
            }
        }
        Err(
            failure @ Failure::Refused(
                reason @ (RefuseReason::Busy | RefuseReason::TryLater { .. }),
                why,
            ),
        ) => {
            let _ = out.send(not_now(*reason)).await;
            report::refused(
                Some(tid),
                from,
                &format!("{why}; the broker keeps it"),
                json,
            );
            return once(failure);
        }
        Err(failure @ Failure::Failed(reason, _)) if !for_good(*reason) => {
            let _ = out
                .send(not_now(RefuseReason::TryLater { seconds: AGAIN_IN }))
                .await;
            let kept = "nothing was placed; the broker keeps it and offers it again";
            report::failed(tid, from, failure, kept, json);
            return None;
        }
        Err(failure) => {
            match failure {
                Failure::Refused(_, why) => report::refused(Some(tid), from, why, json),
                Failure::Failed(..) => {
                    report::failed(tid, from, failure, "nothing was placed", json)
                }
            }
            let damaged = matches!(
                failure,
                Failure::Failed(AbortReason::VerificationFailed | AbortReason::Source, _)
            );
            if !gate.signable || damaged {
                // Nothing signed about what may be the broker's own doing:
                // the refusal's reason says it is over for good.
                let reason = match failure {
                    Failure::Refused(r, _) => *r,
                    Failure::Failed(..) => RefuseReason::VerificationFailed,
                };
                let _ = out.send(not_now(reason)).await;
                if gate.signable {
                    used_up(shared, tid, &gate).await;
                }
                return once(failure);
            }
            Outcome::Refused {
                why: refused_because(me, failure),
            }
        }
    };
    let sender_fp = parse_stored(offer).map_or(Fingerprint([0; 32]), |f| f.sender_fp);
    let receipt = StoredReceipt {
        transfer_id: tid,
        sender_fp,
        receiver_fp: shared.ctx.identity.fingerprint(),
        time: now_unix(),
        outcome,
    };
    let identity = std::sync::Arc::clone(&shared.ctx.identity);
    let signed = tokio::task::spawn_blocking(move || receipt.sign(&identity))
        .await
        .ok();
    if let Some(signed) = &signed {
        let mut kept = lock(&shared.stored_receipts);
        if kept.len() >= KEEP_RECEIPTS {
            kept.clear();
        }
        kept.insert(tid, signed.clone());
    }
    // The receipt is kept in the home before the prekey that opens the
    // transfer goes: a restart in between can still answer an offer again.
    // (Not kept, the prekey goes all the same: forward secrecy first.)
    if let (Some(signed), Some(keep)) = (&signed, &shared.signed) {
        let kept = Kept {
            receipt: signed.clone(),
            prekey: gate.prekey.map(|p| (p.id, p.last_resort)),
            offer_time: gate.time,
        };
        let keep = keep.clone();
        let done = tokio::task::spawn_blocking(move || keep.keep(&tid, &kept)).await;
        if !matches!(done, Ok(Ok(()))) {
            notice!("cannot keep the receipt of stored transfer {tid} in the home");
        }
    }
    used_up(shared, tid, &gate).await;
    if let Some(signed) = signed {
        let _ = out
            .send(Message::StoredReceipt {
                transfer_id: tid,
                receipt: signed,
            })
            .await;
    }
    match result {
        Ok(_) => Some(Ok(())),
        Err(failure) => once(&failure),
    }
}

/// A stored transfer is over for good: its one-time prekey's private halves
/// are deleted (forward secrecy; a replay then finds nothing to open it
/// with), or, sealed to the last-resort prekey that stays, its id is
/// recorded so that a replay is refused.
async fn used_up(shared: &Shared, tid: TransferId, gate: &StoredGate) {
    let Some(p) = gate.prekey else {
        return;
    };
    if p.last_resort {
        let guard = std::sync::Arc::clone(&shared.stored_replay);
        let time = gate.time;
        let recorded = tokio::task::spawn_blocking(move || {
            lock(&guard).check_and_insert(tid, time, now_unix())
        })
        .await;
        if !matches!(recorded, Ok(Ok(()))) {
            notice!(
                "cannot record stored transfer {tid} as seen: a replay of it may be taken again"
            );
        }
    } else if let Some(prekeys) = &shared.prekeys
        && let Err(e) = prekeys.remove(&p.id)
    {
        notice!("cannot delete used prekey {}: {e}", hex::encode(p.id));
    }
}

/// What to answer a stored transfer offered again whose receipt went out
/// already (the broker did not get it).
pub(super) enum Again {
    /// Not one this receiver ended.
    No,
    /// Its receipt, to send again.
    Send(Vec<u8>),
    /// Its record cannot be read now: not now.
    NotNow,
}

/// The signed receipt this receiver sent for `tid`, if any: from this run,
/// or kept in the home — then checked to be its own for that transfer, and
/// the prekey it names deleted (or its id recorded) if a stop came between
/// keeping the receipt and that step.
pub(super) async fn receipt_again(shared: &Shared, tid: TransferId) -> Again {
    if let Some(receipt) = lock(&shared.stored_receipts).get(&tid).cloned() {
        return Again::Send(receipt);
    }
    let Some(signed) = shared.signed.clone() else {
        return Again::No;
    };
    let me = shared.ctx.identity.public().clone();
    let found = tokio::task::spawn_blocking(move || {
        let found = signed.get(&tid);
        if let Found::Kept(k) = &found {
            let ours = StoredReceipt::verify(&k.receipt, &me).is_ok_and(|r| {
                r.transfer_id == tid && r.receiver_fp == Fingerprint::of_spki(me.spki_der())
            });
            if !ours {
                signed.forget(&tid);
                return Found::Nothing;
            }
        }
        found
    })
    .await;
    match found {
        Ok(Found::Kept(k)) => {
            let gate = StoredGate {
                signable: true,
                prekey: k
                    .prekey
                    .map(|(id, last_resort)| PrekeyUse { id, last_resort }),
                time: k.offer_time,
            };
            used_up(shared, tid, &gate).await;
            Again::Send(k.receipt)
        }
        Ok(Found::Unreadable(why)) => {
            notice!("cannot read the kept receipt of stored transfer {tid} ({why})");
            Again::NotNow
        }
        Ok(Found::Nothing) | Err(_) => Again::No,
    }
}

fn why_of(failure: &Failure) -> String {
    match failure {
        Failure::Refused(_, why) | Failure::Failed(_, why) => why.clone(),
    }
}
