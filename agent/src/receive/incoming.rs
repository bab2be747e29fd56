//! One offer, end to end: the gate ([`super::admit`]), the accept on the
//! control connection, the ticket, the data connection, the stream
//! ([`super::stream`]), the receipt once the data is in place, and the
//! report ([`super::report`]).

use std::sync::Arc;
use std::time::Instant;

use keyferry_common::handshake::direct::DirectMode;
use keyferry_common::handshake::stored::parse_stored;
use keyferry_common::handshake::{Kind, SignedOffer};
use keyferry_common::ids::TransferId;
use keyferry_common::name::AgentName;
use keyferry_common::sync::lock;
use keyferry_common::transfer::{Expect, RecvStream};
use keyferry_common::wire::message::{AbortReason, Message, RefuseReason};
use tokio::sync::{mpsc, oneshot};

use super::consent::Consent;
use super::job::{Job, Want};
use super::offers::{Incoming, StoredGate};
use super::report::{self, Placed};
use super::stored::Again;
use super::{Failure, Shared, admit, path, stream};
use crate::client::CONNECT_TIMEOUT;
use crate::direct::Path;
use crate::early::Early;
use crate::relay_lanes::Lanes;

/// How one offer ended, for a `--once` receiver: `None` if it does not count
/// as its one transfer (refused as busy while another runs), else the exit
/// code (0 for a verified transfer) and what happened.
pub(super) type Ended = Option<Result<(), (u8, String)>>;

/// Handles one offer end to end and reports it: a live one, or (`stored`)
/// one the broker kept while this receiver was offline.
pub(super) async fn incoming(
    shared: &Shared,
    from: AgentName,
    spki: Vec<u8>,
    (offer, stored): (SignedOffer, bool),
    out: &mpsc::Sender<Message>,
) -> Ended {
    let json = shared.opts.json;
    let parsed = if stored {
        parse_stored(&offer).map(|f| f.transfer_id)
    } else {
        offer.parse().map(|f| f.transfer_id)
    };
    let tid = match parsed {
        Ok(tid) => tid,
        Err(e) => {
            // Refused if its transfer id can be read (bytes 2..18 of the
            // body), so the sender hears at once; otherwise only logged.
            let Some(tid) = offer.body.get(2..18).and_then(|b| b.try_into().ok()) else {
                report::refused(None, &from, &format!("unreadable offer: {e}"), json);
                return Some(Err((
                    crate::error::exit::REFUSED,
                    format!("an unreadable offer from {from}"),
                )));
            };
            let tid = TransferId(tid);
            let why = format!("unreadable offer: {e}");
            let _ = out
                .send(Message::Refuse {
                    transfer_id: tid,
                    reason: RefuseReason::VerificationFailed,
                })
                .await;
            report::refused(Some(tid), &from, &why, json);
            return Some(Err((crate::error::exit::REFUSED, why)));
        }
    };
    let _running = if stored {
        // Its receipt went out already (and was lost): the same again.
        match super::stored::receipt_again(shared, tid).await {
            Again::No => {}
            Again::Send(receipt) => {
                let again = Message::StoredReceipt {
                    transfer_id: tid,
                    receipt,
                };
                let _ = out.send(again).await;
                return None;
            }
            Again::NotNow => {
                let later = Message::Refuse {
                    transfer_id: tid,
                    reason: RefuseReason::TryLater { seconds: 60 },
                };
                let _ = out.send(later).await;
                return None;
            }
        }
        // Offered twice at once (a broker's doing): the second is busy.
        match Running::start(shared, tid) {
            Some(r) => Some(r),
            None => {
                let busy = Message::Refuse {
                    transfer_id: tid,
                    reason: RefuseReason::Busy,
                };
                let _ = out.send(busy).await;
                return None;
            }
        }
    } else {
        None
    };
    let started = Instant::now();
    let input = if stored {
        Incoming::Stored(&offer)
    } else {
        Incoming::Live(&offer)
    };
    let mut gate = StoredGate::default();
    let result = accept_and_receive(shared, &from, &spki, input, tid, out, &mut gate).await;
    if stored {
        let seconds = started.elapsed().as_secs_f64();
        let end = super::stored::End {
            from: &from,
            offer: &offer,
            tid,
            seconds,
            gate,
        };
        return super::stored::ended(shared, end, result, out).await;
    }
    // A chat stream's end is the chat's to show (its peer left).
    if lock(&shared.chats).remove(&tid) {
        return match result {
            Ok(_) | Err(Failure::Failed(..)) => None,
            Err(Failure::Refused(reason, why)) => {
                let _ = out
                    .send(Message::Refuse {
                        transfer_id: tid,
                        reason,
                    })
                    .await;
                report::refused(Some(tid), &from, &why, json);
                None
            }
        };
    }
    match result {
        Ok((placed, via)) => {
            let seconds = started.elapsed().as_secs_f64();
            report::received(tid, &from, &placed, (seconds, via, false), json);
            Some(Ok(()))
        }
        Err(failure) => {
            let code = report::exit_code(&failure);
            match &failure {
                Failure::Refused(reason, why) => {
                    // The sender hears first; the report may block (a
                    // stdout nobody reads).
                    let _ = out
                        .send(Message::Refuse {
                            transfer_id: tid,
                            reason: *reason,
                        })
                        .await;
                    report::refused(Some(tid), &from, why, json);
                    // Busy: this receiver is taken by another transfer,
                    // which is the one a --once receiver waits for; and a
                    // sender told to come back later is still to come.
                    // Nor does a sender this receiver does not take from.
                    let later = matches!(
                        reason,
                        RefuseReason::Busy
                            | RefuseReason::TryLater { .. }
                            | RefuseReason::NotListed
                            | RefuseReason::NotKnown
                    );
                    (!later).then(|| Err((code, why.clone())))
                }
                // The user said no (or nothing): a refusal, and a --once
                // receiver goes on waiting for the transfer it wants.
                Failure::Failed(AbortReason::Declined | AbortReason::NoAnswer, why) => {
                    report::refused(Some(tid), &from, why, json);
                    None
                }
                Failure::Failed(_, why) => {
                    let kept = if shared.opts.stdout {
                        "what reached standard output before it verified chunk by chunk, \
                         but is incomplete"
                    } else {
                        "nothing was placed"
                    };
                    report::failed(tid, &from, &failure, kept, json);
                    Some(Err((code, why.clone())))
                }
            }
        }
    }
}

/// A stored transfer being received: held from its offer to its end.
struct Running<'a>(&'a Shared, TransferId);

impl<'a> Running<'a> {
    fn start(shared: &'a Shared, tid: TransferId) -> Option<Self> {
        lock(&shared.stored_running)
            .insert(tid)
            .then_some(Self(shared, tid))
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        lock(&self.0.stored_running).remove(&self.1);
    }
}

/// Removes a transfer's ticket waiter however its wait ends.
struct Waiting<'a>(&'a Shared, TransferId);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        lock(&self.0.tickets).remove(&self.1);
    }
}

async fn accept_and_receive(
    shared: &Shared,
    from: &AgentName,
    spki: &[u8],
    offer: Incoming<'_>,
    tid: TransferId,
    out: &mpsc::Sender<Message>,
    gate: &mut StoredGate,
) -> Result<(Placed, Path), Failure> {
    // A stored transfer never resumes from a kept prefix (the broker sends
    // it whole again): a failed one keeps none.
    let resumable = matches!(offer, Incoming::Live(_));
    let admitted = admit::admit(shared, from, spki, offer, tid, gate).await?;
    let ctx = &shared.ctx;
    // Waiting for the ticket before the accept goes out, so that even an
    // immediate ticket finds its waiter.
    let (ticket_tx, ticket_rx) = oneshot::channel();
    lock(&shared.tickets).insert(tid, ticket_tx);
    let waiting = Waiting(shared, tid);
    // Waiting for the sender's direct connection, too, before it can come.
    let mut expected = shared
        .direct
        .as_ref()
        .filter(|_| admitted.direct != DirectMode::Never)
        .map(|l| l.expect(tid, Arc::clone(&admitted.pair.direct)));
    if let (Some(e), Some(plan)) = (expected.as_mut(), admitted.punch) {
        e.punch(plan);
    }
    // The relay's data connection is opened now, while the accept travels
    // (PROTOCOL.md §2.5), unless only a direct connection will do: over
    // several connections for a stream to this receiver alone that is not
    // small, as the round trip says.
    let lanes = relay_lanes(shared, &admitted.terms, resumable);
    let mut watch = LanesWatch {
        shared,
        armed: false,
    };
    let early =
        (admitted.direct != DirectMode::Only).then(|| Early::open(ctx.broker.clone(), lanes));
    let accept = Message::Accept {
        transfer_id: tid,
        accept: admitted.accept,
    };
    let ticket = async {
        out.send(accept)
            .await
            .map_err(|_| "the control connection is gone".to_owned())?;
        match tokio::time::timeout(CONNECT_TIMEOUT * 3, ticket_rx).await {
            Ok(Ok(Ok(ticket))) => Ok(ticket),
            Ok(Ok(Err(reason))) => Err(format!("the broker ended it before it began ({reason:?})")),
            Ok(Err(_)) => Err("the broker connection was lost before it began".to_owned()),
            Err(_) => Err("the broker sent no ticket".to_owned()),
        }
    }
    .await;
    drop(waiting);
    let ticket = match ticket {
        Ok(t) => t,
        Err(why) => {
            if let Some(place) = admitted.place {
                place.discard_if_empty();
            }
            return Err(Failure::Failed(AbortReason::PeerGone, why));
        }
    };
    // The stream comes over a plain connection: it is sealed end to end.
    let opened = path::open(
        ctx,
        (tid, ticket),
        expected,
        admitted.direct,
        (early.as_ref(), lanes),
    )
    .await;
    drop(early);
    let (mut data, via) = match opened {
        Ok((conn, via, n)) => {
            watch.armed = via == Path::Relay && n > 1;
            (conn, via)
        }
        Err(why) => {
            // No path at all: the relay's connections may be why.
            watch.armed = lanes != Lanes::One && admitted.direct != DirectMode::Only;
            if let Some(place) = admitted.place {
                place.discard_if_empty();
            }
            return Err(Failure::Failed(AbortReason::PeerGone, why));
        }
    };
    let terms = admitted.terms;
    // Asked users answer through the stream's task, which tells the sender.
    let (asks, asked) = match admitted.ask {
        Some(within) => {
            let (tx, rx) = mpsc::channel(1);
            let consent = Consent {
                from: from.clone(),
                fp: admitted.sender_key.fingerprint(),
                first_contact: admitted.first_contact,
                pins: ctx.home.known_peers(),
                within,
                asks: tx,
            };
            (Some(consent), Some(rx))
        }
        None => (None, None),
    };
    let sender_key = admitted.sender_key;
    let expect = Expect {
        declared: terms.size,
        size_known: terms.size_known,
        resume: admitted.place.as_ref().and_then(|p| p.resume.clone()),
        sender: sender_key.clone(),
        me: ctx.name.clone(),
        my_fp: ctx.identity.fingerprint(),
        receivers: terms.receivers,
        trust_sender_hash: shared.opts.trust_sender_hash,
    };
    let job = Job {
        stream: RecvStream::new(admitted.pair, expect),
        want: Want {
            kind: terms.kind,
            declared: terms.size,
            size_known: terms.size_known,
            key: Arc::clone(&shared.journal_key),
            stdout: shared.opts.stdout,
            preserve: shared.opts.preserve,
            consent: asks,
            receivers: terms.receivers,
            resumed_from: admitted.place.as_ref().map_or(0, |p| p.point.offset),
            // A resume the user was not asked about must stay the transfer
            // the user took when it began.
            took: admitted
                .place
                .as_ref()
                .filter(|p| p.point.offset > 0 && shared.opts.policy.asks().is_some())
                .map(|p| p.point.manifest_hash),
            chat: shared
                .opts
                .chat
                .clone()
                .map(|link| (link, from.clone(), sender_key.clone())),
        },
        place: admitted.place,
    };
    let receiving = stream::receive_stream(shared, &mut data, job, admitted.slot, asked, resumable);
    match receiving.await {
        Ok(done) => {
            // The receipt goes out only once the data is in place and durable.
            let _ = data
                .writer
                .write(&Message::Receipt {
                    transfer_id: tid,
                    tag: done.receipt,
                })
                .await;
            let _ = data.writer.shutdown().await;
            watch.armed = false;
            Ok((done.placed, via))
        }
        Err(Failure::Failed(reason, why)) => {
            // Only a stream that broke counts against several connections.
            watch.armed &= matches!(reason, AbortReason::PeerGone | AbortReason::Timeout);
            let _ = data
                .writer
                .write(&Message::Abort {
                    transfer_id: tid,
                    reason,
                })
                .await;
            Err(Failure::Failed(reason, why))
        }
        Err(other) => {
            watch.armed = false;
            Err(other)
        }
    }
}

/// How long after a stream over several connections from the relay failed
/// this receiver's streams take one.
const LANES_REST: std::time::Duration = std::time::Duration::from_secs(600);

/// How many connections a stream of `terms` takes from the relay: several
/// for a live stream (not a stored delivery) to this receiver alone that is
/// not small and no chat (as the round trip or `--streams` says), unless
/// such a stream failed lately.
fn relay_lanes(shared: &Shared, terms: &keyferry_common::handshake::Terms, live: bool) -> Lanes {
    let small = terms.size_known && terms.size < crate::streams::WORTH_IT;
    let failed = lock(&shared.lanes_failed).is_some_and(|at| at.elapsed() < LANES_REST);
    if live && terms.receivers == 1 && terms.kind != Kind::Chat && !small && !failed {
        Lanes::Auto(shared.opts.streams)
    } else {
        Lanes::One
    }
}

/// Marks, when dropped armed, that a stream over several connections from
/// the relay failed (whatever cut it may be what keeps them from working).
struct LanesWatch<'a> {
    shared: &'a Shared,
    armed: bool,
}

impl Drop for LanesWatch<'_> {
    fn drop(&mut self) {
        if self.armed {
            *lock(&self.shared.lanes_failed) = Some(Instant::now());
        }
    }
}
