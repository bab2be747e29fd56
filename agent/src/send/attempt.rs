//! One attempt at a transfer, to one receiver or several at once: for each
//! receiver, its handshake ([`super::offer`]: connect, look it up and check
//! its pin, offer, saying which earlier transfer this one may continue, and
//! check its accept); then the path ([`super::path`]) and one
//! upload for all of them, whose stream starts where the receiver's verified
//! prefix ends (one receiver: its claim is checked against our own bytes, any
//! mismatch starts from byte 0; several: always byte 0), streamed through
//! [`super::pipeline`]; then each receiver's receipt. Every attempt is a new
//! transfer per receiver: new transfer and stream ids, new master keys, new
//! ephemeral shares, a new stream root.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use keyferry_common::identity::Fingerprint;
use keyferry_common::ids::{StreamId, TransferId};
use keyferry_common::name::AgentName;
use keyferry_common::transfer::{RekeyPolicy, SendStream, StreamStart};
use keyferry_common::wire::message::{AbortReason, Message};
use keyferry_common::wire::record::manifest_hash;
use tokio::task::JoinSet;

use super::marks::MarkLog;
pub use super::offer::Failed;
pub(crate) use super::offer::{Handshake, offer_to};
pub(super) use super::offer::{after, before, handshake};
use super::reader::Reader;
use super::resume;
use super::source::Source;
use super::{RECEIPT_TIMEOUT, SendOptions, pipeline};
use crate::client::Ctx;
use crate::direct::Path;
use crate::early::Early;
use crate::error::AgentError;
use crate::progress::Progress;

/// A verified transfer to one receiver.
#[derive(Debug)]
pub struct Done {
    /// Its transfer id.
    pub transfer_id: TransferId,
    /// SHA-256 of the whole data, confirmed by the receipt.
    pub sha256: [u8; 32],
    /// Session keys the stream used.
    pub session_keys: u64,
    /// Bytes the receiver already held verified.
    pub resumed_from: u64,
    /// Plaintext bytes in all (for standard input, only known at the end).
    pub bytes: u64,
    /// Seconds from the upload's start to the verified receipt.
    pub seconds: f64,
    /// Which path carried the stream.
    pub path: Path,
    /// How many connections carried it (from the sender: to the receiver
    /// directly, or to the broker).
    pub connections: u8,
}

/// What one attempt gives each receiver.
pub type Outcome = Vec<(AgentName, Result<Done, Failed>)>;

/// Runs one attempt to every receiver in `to` (see the module docs).
pub async fn run(
    ctx: &Ctx,
    opts: &SendOptions,
    source: &Arc<Source>,
    to: &[AgentName],
    progress: &Progress,
) -> Outcome {
    // Random for every attempt: the broker sees stream ids, and must not be
    // able to link two attempts (or two runs) of one transfer.
    let stream_id = StreamId::random();
    let count = u32::try_from(to.len()).unwrap_or(u32::MAX);
    // An upload that will likely take the relay opens its data connection
    // now, beside the offers.
    let relayed = !super::path::may_dial(opts, source, to.len());
    let lanes = super::path::relay_lanes(opts, source, to.len());
    let early = relayed.then(|| Early::open(ctx.broker.clone(), lanes));
    let mut tasks = JoinSet::new();
    for (i, name) in to.iter().enumerate() {
        let job = handshake(
            ctx.clone(),
            opts.clone(),
            Arc::clone(source),
            name.clone(),
            stream_id,
            count,
        );
        tasks.spawn(async move { (i, job.await) });
    }
    let mut shakes: Vec<Option<Result<Handshake, Failed>>> = (0..to.len()).map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        if let Ok((i, r)) = joined {
            shakes[i] = Some(r);
        }
    }
    let mut outcome: Outcome = Vec::new();
    let mut ready = Vec::new();
    for (name, shake) in to.iter().zip(shakes) {
        match shake {
            Some(Ok(h)) => ready.push(h),
            Some(Err(f)) => outcome.push((name.clone(), Err(f))),
            None => outcome.push((
                name.clone(),
                Err(before(AgentError::Internal(
                    "the offer's task failed".into(),
                ))),
            )),
        }
    }
    if ready.is_empty() {
        return outcome;
    }
    let results = upload(ctx, opts, source, (stream_id, early), ready, progress).await;
    outcome.extend(results);
    // In the order the receivers were named.
    outcome.sort_by_key(|(n, _)| to.iter().position(|t| t == n));
    outcome
}

/// What the sender tells its receivers when its stream fails with `e`.
fn abort_reason(e: &AgentError) -> AbortReason {
    match e {
        AgentError::FileUnreadable { .. } | AgentError::PrefixChanged(_) => AbortReason::Source,
        AgentError::Interrupted => AbortReason::Interrupted,
        // The relay, the path or a receiver went away: the receivers still
        // listening hear that, not that something did not verify (a broker
        // cut mid-transfer reached them as a verification failure, exit 9).
        AgentError::ReceiverAborted(_)
        | AgentError::BrokerUnreachable { .. }
        | AgentError::DirectLost(_) => AbortReason::PeerGone,
        _ => AbortReason::VerificationFailed,
    }
}

/// Streams once to every receiver in `ready` and collects their receipts.
async fn upload(
    ctx: &Ctx,
    opts: &SendOptions,
    source: &Arc<Source>,
    (stream_id, early): (StreamId, Option<Early>),
    ready: Vec<Handshake>,
    progress: &Progress,
) -> Outcome {
    let all_fail = |ready: &[Handshake], e: &dyn Fn() -> AgentError| -> Outcome {
        ready
            .iter()
            .map(|h| (h.to.clone(), Err(after(e()))))
            .collect()
    };
    let small = super::path::small(source);
    let opened = super::path::open(ctx, opts, &ready, small, early.as_ref()).await;
    drop(early);
    let (mut data, path, connections) = match opened {
        Ok(d) => d,
        Err(AgentError::NoDirectPath(why)) => {
            return all_fail(&ready, &|| AgentError::NoDirectPath(why.clone()));
        }
        Err(e) => {
            let text = e.to_string();
            return all_fail(&ready, &|| AgentError::BrokerUnreachable {
                addr: ctx.broker.clone(),
                detail: text.clone(),
            });
        }
    };
    // A direct path that breaks is not tried again by this run's retries;
    // nor are several connections to the relay (whatever cut them may be
    // what keeps them from working).
    let broke = || {
        if path == Path::Direct {
            opts.direct_failed.store(true, Ordering::Relaxed);
        } else if connections > 1 {
            opts.lanes_failed.store(true, Ordering::Relaxed);
        }
    };
    // The sender's marks of what it reads (a resume later starts from them).
    let marks = marks_for(ctx, source);
    // One receiver resumes from its prefix; an upload to several starts at 0.
    let (start, check) = match &ready[..] {
        [one] => match resume::start_for(source, &one.accepted, marks.as_ref()).await {
            Ok(s) => s,
            Err(f) => return vec![(one.to.clone(), Err(f))],
        },
        _ => (StreamStart::fresh(), None),
    };
    let resumed_from = start.offset;
    // An upload from byte 0 marks its data afresh.
    if resumed_from == 0
        && let Some(log) = &marks
    {
        log.restart();
    }
    let began = Instant::now();
    let policy = RekeyPolicy::with_interval(opts.rekey_interval);
    let mut stream = SendStream::new(
        stream_id,
        source.total,
        source.size_known,
        start,
        policy,
        began,
    );
    let mut head: Vec<_> = ready
        .iter()
        .map(|h| stream.root_for(&h.accepted.pair))
        .collect();
    match stream.manifest(&source.manifest.encode()) {
        Ok(m) => head.push(m),
        Err(e) => {
            let text = e.to_string();
            return all_fail(&ready, &|| AgentError::Internal(text.clone()));
        }
    }
    progress.start_at(resumed_from);
    let receivers: Vec<(AgentName, Fingerprint)> =
        ready.iter().map(|h| (h.to.clone(), h.fp)).collect();
    let tids: Vec<TransferId> = ready.iter().map(|h| h.accepted.pair.transfer_id).collect();
    let reader = Reader::at(Arc::clone(source), resumed_from);
    let upload = pipeline::Upload {
        head: &head,
        receivers,
        tids: &tids,
        asks: ready.iter().map(|h| h.accepted.ask_secs).collect(),
        marks,
        check,
    };
    let streamed = pipeline::stream_out(ctx, &mut data, reader, stream, upload, progress).await;
    let (stream, sha256, mut ended) = match streamed {
        Ok(done) => done,
        Err(e) => {
            broke();
            let e = match e {
                AgentError::BrokerUnreachable { detail, .. } if path == Path::Direct => {
                    AgentError::DirectLost(detail)
                }
                e => e,
            };
            let reason = abort_reason(&e);
            for tid in &tids {
                let abort = Message::Abort {
                    transfer_id: *tid,
                    reason,
                };
                let _ = data.writer.write(&abort).await;
            }
            let text = e.to_string();
            let code_of = move || match &e {
                AgentError::ReceiverAborted(r) => AgentError::ReceiverAborted(*r),
                AgentError::BrokerUnreachable { addr, detail } => AgentError::BrokerUnreachable {
                    addr: addr.clone(),
                    detail: detail.clone(),
                },
                AgentError::FileUnreadable { path, detail } => AgentError::FileUnreadable {
                    path: path.clone(),
                    detail: detail.clone(),
                },
                AgentError::Interrupted => AgentError::Interrupted,
                AgentError::PrefixChanged(what) => AgentError::PrefixChanged(what.clone()),
                AgentError::DirectLost(why) => AgentError::DirectLost(why.clone()),
                _ => AgentError::Verification(text.clone()),
            };
            return all_fail(&ready, &code_of);
        }
    };
    // Each receiver's answer: its receipt, or why not (a resumed receiver
    // places nothing before its check of the prefix is done).
    let deadline = tokio::time::Instant::now()
        + RECEIPT_TIMEOUT
        + crate::receive::prefix_read_time(resumed_from);
    while ended.len() < tids.len() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match data.reader.read_timeout(left).await {
            Ok(Some(Message::Receipt { transfer_id, tag })) if tids.contains(&transfer_id) => {
                let h = ready
                    .iter()
                    .find(|h| h.accepted.pair.transfer_id == transfer_id);
                let ok = h.is_some_and(|h| stream.check_receipt(&h.accepted.pair, &tag).is_ok());
                ended.entry(transfer_id).or_insert(if ok {
                    Ok(())
                } else {
                    Err(AgentError::Verification(
                        "the receipt does not confirm the length and SHA-256 we sent".into(),
                    ))
                });
            }
            Ok(Some(Message::Abort {
                transfer_id,
                reason,
            })) if tids.contains(&transfer_id) => {
                ended
                    .entry(transfer_id)
                    .or_insert(Err(AgentError::ReceiverAborted(reason)));
            }
            Ok(_) => break,
            Err(e) => {
                broke();
                let text = e.to_string();
                for tid in &tids {
                    ended.entry(*tid).or_insert(Err(if path == Path::Direct {
                        AgentError::DirectLost(text.clone())
                    } else {
                        AgentError::BrokerUnreachable {
                            addr: ctx.broker.clone(),
                            detail: text.clone(),
                        }
                    }));
                }
            }
        }
    }
    let failed = ended.values().filter(|r| r.is_err()).count();
    // Several connections to the relay that ended without every receipt
    // (the relay's `Abort`, or the connection's end) are not tried again.
    if path == Path::Relay && connections > 1 && (failed > 0 || ended.len() < tids.len()) {
        opts.lanes_failed.store(true, Ordering::Relaxed);
    }
    progress.done(tids.len() - failed, tids.len());
    let seconds = began.elapsed().as_secs_f64();
    ready
        .into_iter()
        .map(|h| {
            let tid = h.accepted.pair.transfer_id;
            let r = match ended.remove(&tid) {
                Some(Ok(())) => Ok(Done {
                    transfer_id: tid,
                    sha256,
                    session_keys: stream.session_keys(),
                    resumed_from,
                    bytes: stream.total(),
                    seconds,
                    path,
                    connections,
                }),
                Some(Err(e)) => Err(after(e)),
                None => Err(after(AgentError::Unconfirmed(
                    "the connection ended before the receiver's receipt".into(),
                ))),
            };
            (h.to, r)
        })
        .collect::<Vec<_>>()
}

/// The log of marks for what `source` sends, if it can be resumed at all.
pub(super) fn marks_for(ctx: &Ctx, source: &Source) -> Option<Arc<MarkLog>> {
    let id = source.data_id()?;
    let key = ctx.home.journal_key().ok()?;
    let manifest = manifest_hash(&source.manifest.encode());
    Some(Arc::new(MarkLog::new(
        ctx.home.dir(),
        key,
        &id,
        &manifest,
        source.total,
    )))
}

/// The receivers' answers so far, by transfer.
pub type Ended = HashMap<TransferId, Result<(), AgentError>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_that_lost_its_relay_or_receiver_says_so_not_that_it_did_not_verify() {
        let gone = [
            AgentError::ReceiverAborted(AbortReason::PeerGone),
            AgentError::BrokerUnreachable {
                addr: "127.0.0.1:1".into(),
                detail: "connection lost".into(),
            },
            AgentError::DirectLost("reset".into()),
        ];
        for e in &gone {
            assert_eq!(abort_reason(e), AbortReason::PeerGone, "{e}");
        }
        assert_eq!(
            abort_reason(&AgentError::Interrupted),
            AbortReason::Interrupted
        );
        let other = AgentError::Protocol("a record out of place");
        assert_eq!(abort_reason(&other), AbortReason::VerificationFailed);
    }
}
