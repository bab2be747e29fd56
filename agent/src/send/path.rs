//! Which connection an upload's stream takes (PROTOCOL.md §2.7): straight
//! to the receiver when its accept names addresses and one of them proves
//! itself, the broker's relay otherwise; or a clear refusal when one side
//! wants only the path the other will not take. An upload to several
//! receivers always takes the relay (the broker copies it).

use std::sync::atomic::Ordering;

use keyferry_common::handshake::direct::DirectMode;
use keyferry_common::ids::TransferId;
use keyferry_common::wire::message::{AbortReason, Message};

use super::SendOptions;
use super::offer::Handshake;
use super::source::Source;
use crate::client::{Ctx, DataConn, Ticket, open_upload, open_upload_lanes};
use crate::direct::{DirectOpt, Path, dial};
use crate::early::Early;
use crate::error::AgentError;
use crate::output::notice;
use crate::relay_lanes::{Lanes, Leg};

/// The smallest stream `--direct auto` dials for: below it the dial and the
/// proofs (two round trips between the agents) cost more than the relay's
/// detour saves, so a small file or a message takes the relay.
pub(super) const DIRECT_FROM: u64 = crate::streams::WORTH_IT;

/// Whether `source` is a small stream, which `--direct auto` on both
/// sides sends through the relay.
pub(super) fn small(source: &Source) -> bool {
    source.size_known && source.total < DIRECT_FROM
}

/// How many connections an upload of `source` to `receivers` receivers
/// may take to the relay: several for one receiver and a stream that is
/// not `small` (as the round trip or `--streams` says), else one.
pub(super) fn relay_lanes(opts: &SendOptions, source: &Source, receivers: usize) -> Lanes {
    lanes_for(opts, receivers == 1 && opts.to.len() == 1 && !small(source))
}

/// Several connections to the relay if `worth` it, and not after they broke.
fn lanes_for(opts: &SendOptions, worth: bool) -> Lanes {
    if worth && !opts.lanes_failed.load(Ordering::Relaxed) {
        Lanes::Auto(opts.streams)
    } else {
        Lanes::One
    }
}

/// Whether, by this side's options, an upload of `source` to `receivers`
/// receivers tries a direct path: one receiver, not `--direct never`, and
/// under `auto` neither a small stream nor a retry after a direct path
/// broke (a receiver's `--direct only` can still make it dial).
pub(super) fn may_dial(opts: &SendOptions, source: &Source, receivers: usize) -> bool {
    let broken = opts.direct_failed.load(Ordering::Relaxed);
    receivers == 1
        && match opts.direct {
            DirectOpt::Never => false,
            DirectOpt::Auto => !small(source) && !broken,
            DirectOpt::Only => true,
        }
}

/// Opens the stream's connection: direct if it can and may (and, with
/// `--direct auto` on both sides, if the stream is not `small`), else the
/// relay. With no path it may take, the receivers that wait on the relay
/// are told (`Abort{Policy}`), so that they free their place at once.
pub(super) async fn open(
    ctx: &Ctx,
    opts: &SendOptions,
    ready: &[Handshake],
    small: bool,
    early: Option<&Early>,
) -> Result<(DataConn, Path, u8), AgentError> {
    let chosen = choose(ctx, opts, ready, small, early).await;
    if let Err(AgentError::NoDirectPath(_)) = &chosen {
        give_up(ctx, ready).await;
    }
    chosen
}

/// Tells the receivers that wait on the relay (all but those that take
/// only a direct connection) that the stream will not come.
async fn give_up(ctx: &Ctx, ready: &[Handshake]) {
    let tickets: Vec<(TransferId, Ticket)> = ready
        .iter()
        .filter(|h| h.accepted.direct.mode != DirectMode::Only)
        .map(|h| (h.accepted.pair.transfer_id, h.ticket.clone()))
        .collect();
    abort_waiting(ctx, &tickets, AbortReason::Policy).await;
}

/// Redeems `tickets` at the broker only to send `Abort{reason}` for each,
/// so that receivers waiting on the relay for a stream that will not come
/// free their place at once instead of at their timeouts. Best effort: a
/// broker that is gone or refuses leaves them to those timeouts.
pub(super) async fn abort_waiting(
    ctx: &Ctx,
    tickets: &[(TransferId, Ticket)],
    reason: AbortReason,
) {
    if tickets.is_empty() {
        return;
    }
    if let Ok(mut conn) = open_upload(ctx, tickets).await {
        for (tid, _) in tickets {
            let abort = Message::Abort {
                transfer_id: *tid,
                reason,
            };
            let _ = conn.writer.write(&abort).await;
        }
        let _ = conn.writer.shutdown().await;
    }
}

/// [`open`]'s choice, and how many connections carry it.
async fn choose(
    ctx: &Ctx,
    opts: &SendOptions,
    ready: &[Handshake],
    small: bool,
    early: Option<&Early>,
) -> Result<(DataConn, Path, u8), AgentError> {
    if let [one] = ready {
        // The port named for a simultaneous open is the dial's, or nobody's.
        let punch = keyferry_common::sync::lock(&one.punch).take();
        let offered = &one.accepted.direct;
        let to = &one.to;
        let theirs_only = offered.mode == DirectMode::Only;
        let ours_only = opts.direct == DirectOpt::Only;
        match (opts.direct, offered.mode) {
            (DirectOpt::Only, DirectMode::Never) => {
                return Err(AgentError::NoDirectPath(format!(
                    "{to} takes only the relay (its --direct never or a chat), and this agent \
                     was told --direct only"
                )));
            }
            (DirectOpt::Never, DirectMode::Only) => {
                return Err(AgentError::NoDirectPath(format!(
                    "{to} takes only a direct connection (--direct only), and this agent was \
                     told --direct never"
                )));
            }
            (DirectOpt::Never, _) | (_, DirectMode::Never) => {}
            (DirectOpt::Auto, DirectMode::Auto) if small => {}
            _ => {
                // After a direct path broke mid-transfer, the retries take
                // the relay (unless one side takes nothing else).
                let broken = opts.direct_failed.load(Ordering::Relaxed);
                if !broken || ours_only || theirs_only {
                    let tid = one.accepted.pair.transfer_id;
                    let local = broker_is_local(ctx).await;
                    let key = &one.accepted.pair.direct;
                    match dial::dial(offered, key, tid, (local, opts.streams), punch).await {
                        Ok((conn, n)) => return Ok((conn, Path::Direct, n)),
                        Err(why) if ours_only || theirs_only => {
                            return Err(AgentError::NoDirectPath(format!(
                                "could not reach {to} directly ({why})"
                            )));
                        }
                        Err(why) => {
                            let why = keyferry_common::text::escape(&why);
                            notice!("no direct path to {to} ({why}): through the broker's relay");
                        }
                    }
                }
            }
        }
    } else if opts.direct == DirectOpt::Only
        || ready
            .iter()
            .any(|h| h.accepted.direct.mode == DirectMode::Only)
    {
        return Err(AgentError::NoDirectPath(
            "an upload to several receivers goes through the broker's relay; send to each \
             separately for a direct connection"
                .into(),
        ));
    }
    // Several connections only for a stream to one receiver named (another
    // named may still be waiting for the same stream at the broker).
    let one = opts.to.len() == 1 && ready.len() == 1;
    relay(ctx, ready, early, lanes_for(opts, one && !small)).await
}

/// The broker's relay: one data connection for every receiver (the one
/// opened beside the offers, if it is there), or, for one receiver, as many
/// as `lanes` says.
async fn relay(
    ctx: &Ctx,
    ready: &[Handshake],
    early: Option<&Early>,
    lanes: Lanes,
) -> Result<(DataConn, Path, u8), AgentError> {
    let tickets: Vec<(TransferId, Ticket)> = ready
        .iter()
        .map(|h| (h.accepted.pair.transfer_id, h.ticket.clone()))
        .collect();
    let early = early.and_then(Early::take);
    let (conn, n) = open_upload_lanes(ctx, &tickets, early, (lanes, Leg::Sender)).await?;
    Ok((conn, Path::Relay, n))
}

/// Whether the broker is on this machine (its address is a loopback one):
/// only then may a receiver's loopback addresses be dialled, since only
/// then can that receiver be on this machine too.
async fn broker_is_local(ctx: &Ctx) -> bool {
    crate::direct::resolve(&ctx.broker)
        .await
        .is_some_and(|a| a.ip().is_loopback())
}
