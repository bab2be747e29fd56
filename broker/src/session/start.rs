//! Starting an accepted transfer, wherever its offer came from (a sender on
//! this broker, or another broker of the cluster): the two tickets (the
//! receiver's queued on its control connection), then the wait for both data
//! connections, then the relay — one to one, or one upload to several
//! receivers.

use std::time::Instant;

use keyferry_common::ids::{StreamId, TransferId};
use keyferry_common::name::AgentName;
use keyferry_common::wire::message::{AbortReason, ErrorCode, Message};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::cluster::ClusterError;
use crate::fanout;
use crate::metrics::{End, Limit, Path};
use crate::relay::{DataConn, relay};
use crate::shutdown::Shutdown;
use crate::state::State;
use crate::tickets::{Arrival, Issued, Joiner};
use crate::transfers::{OfferLimit, OfferSlot};

/// The receiver's control connection, for its ticket. If the transfer ends
/// before the ticket went there, the receiver is told `Abort(PeerGone)`
/// instead of being left waiting.
pub(crate) struct ReceiverLink {
    queue: mpsc::Sender<Box<Message>>,
    tid: TransferId,
    told: bool,
}

impl ReceiverLink {
    /// The link to the receiver's control connection `queue`, for `tid`.
    pub(crate) fn new(queue: mpsc::Sender<Box<Message>>, tid: TransferId) -> Self {
        Self {
            queue,
            tid,
            told: false,
        }
    }
}

impl ReceiverLink {
    /// Queues the receiver's ticket; `false` if its connection is gone or
    /// not reading.
    fn ticket(&mut self, ticket: [u8; 32]) -> bool {
        self.told = self
            .queue
            .try_send(Box::new(Message::Ticket {
                transfer_id: self.tid,
                ticket,
                address: String::new(),
            }))
            .is_ok();
        self.told
    }
}

impl Drop for ReceiverLink {
    fn drop(&mut self) {
        if !self.told {
            let _ = self.queue.try_send(Box::new(Message::Abort {
                transfer_id: self.tid,
                reason: AbortReason::PeerGone,
            }));
        }
    }
}

/// Counts an offer of stream `sid` by `from` against the offer rate and
/// the concurrent transfers; the detail for the sender when refused
/// (`at` says where, in a cluster).
pub(crate) fn offer_slot<'a>(
    state: &'a State,
    from: &AgentName,
    sid: StreamId,
    at: &str,
) -> Result<OfferSlot<'a>, String> {
    let limits = &state.limits;
    let (rate, concurrent) = (limits.offers_per_minute, limits.max_transfers_per_agent);
    state
        .transfers
        .take_offer_slot(from, sid, rate, concurrent, Instant::now())
        .map_err(|limit| match limit {
            OfferLimit::Rate => {
                state.metrics.refused_by(Limit::OffersPerMinute);
                format!("more than {rate} offers in a minute{at}")
            }
            OfferLimit::Concurrent => {
                state.metrics.refused_by(Limit::TransfersPerAgent);
                format!("more than {concurrent} transfers at once{at}")
            }
        })
}

/// Counts an offer by `name` against the offer rate of the whole cluster
/// (with `--cluster`); the detail for the sender when refused. A cluster that
/// does not answer leaves the count to this broker alone.
pub(crate) async fn cluster_rate(state: &State, name: &AgentName) -> Result<(), String> {
    let Some(cluster) = &state.cluster else {
        return Ok(());
    };
    if !cluster.connected() {
        // Not a 2 s wait per offer for an answer that will not come.
        return Ok(());
    }
    let rate = state.limits.offers_per_minute;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    match cluster.take_offer(name, rate, now).await {
        Ok(true) => Ok(()),
        Ok(false) => {
            state.metrics.refused_by(Limit::OffersPerMinute);
            Err(format!(
                "more than {rate} offers in a minute through the brokers of this cluster"
            ))
        }
        Err(ClusterError::Contended(_)) => {
            // Only offers of this name racing through several brokers get
            // here; refusing is the safe side.
            state.metrics.refused_by(Limit::OffersPerMinute);
            Err(format!(
                "too many offers at once through the brokers of this cluster (at most {rate} a minute)"
            ))
        }
        Err(e) => {
            warn!(error = %e, "cluster unreachable: the offer rate counted on this broker only");
            Ok(())
        }
    }
}

/// A place for an offer by `from` of stream `sid` made here: under this
/// broker's rate and concurrency limits, then (with `--cluster`) the whole
/// cluster's; the detail for the sender when refused.
pub(crate) async fn offer_place<'a>(
    state: &'a State,
    from: &AgentName,
    sid: StreamId,
) -> Result<Held<'a>, String> {
    let slot = offer_slot(state, from, sid, "")?;
    let start = Instant::now();
    cluster_rate(state, from).await?;
    let held = cluster_slot(state, from, sid, slot, true).await;
    if state.cluster.is_some() {
        let micros = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
        debug!(agent = %from, micros, "offer counted against the cluster's limits");
    }
    held
}

/// An offer slot whose stream is also counted in the cluster
/// (`keyferry-sending`): when the last slot of the stream here goes, its key
/// there is deleted.
pub(crate) struct Held<'a> {
    slot: Option<OfferSlot<'a>>,
    state: &'a State,
    name: AgentName,
    sid: StreamId,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        drop(self.slot.take());
        // Also when it was not written (the cluster was away then): a
        // heartbeat may have written it since.
        if !self.state.transfers.holds(&self.name, self.sid)
            && let Some(cluster) = self.state.cluster.clone()
        {
            let (name, sid) = (self.name.clone(), self.sid);
            tokio::spawn(async move { cluster.sending_delete(&name, sid).await });
        }
    }
}

/// Counts stream `sid` of `from` (whose `slot` this broker granted) against
/// the concurrency limit of the whole cluster, with `--cluster`; the detail
/// for the sender when refused. `refuse` is false where the offer was
/// already let through (a routed one: the sender's broker decided), which
/// only counts it. A cluster that does not answer leaves it to this broker.
pub(crate) async fn cluster_slot<'a>(
    state: &'a State,
    from: &AgentName,
    sid: StreamId,
    slot: OfferSlot<'a>,
    refuse: bool,
) -> Result<Held<'a>, String> {
    let held = Held {
        slot: Some(slot),
        state,
        name: from.clone(),
        sid,
    };
    let Some(cluster) = state.cluster.as_ref().filter(|c| c.connected()) else {
        return Ok(held);
    };
    let most = state.limits.max_transfers_per_agent;
    if refuse {
        match cluster.streams_sending(from, sid).await {
            Ok(n) if n >= most => {
                state.metrics.refused_by(Limit::TransfersPerAgent);
                return Err(format!(
                    "more than {most} transfers at once through the brokers of this cluster"
                ));
            }
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "cluster unreachable: concurrent transfers counted on this broker only");
                return Ok(held);
            }
        }
    }
    if let Err(e) = cluster.sending_put(from, sid).await {
        warn!(error = %e, "this stream is not counted in the cluster until the next heartbeat");
    }
    Ok(held)
}

/// Draws the transfer's tickets and queues the receiver's; the sender's
/// ticket is in the result. On failure, what to tell the sender.
pub(crate) fn issue<'a>(
    state: &'a State,
    receiver: &mut ReceiverLink,
    (tid, sid): (TransferId, StreamId),
    from: &AgentName,
) -> Result<Issued<'a, DataConn>, (ErrorCode, String)> {
    let Some(issued) = state.tickets.issue(tid, sid, from) else {
        return Err((
            ErrorCode::Protocol,
            format!("transfer {tid} is already under way"),
        ));
    };
    if !receiver.ticket(issued.receiver_ticket) {
        info!(transfer = %tid, "receiver left before its ticket");
        return Err((
            ErrorCode::PeerOffline,
            "the receiver disconnected after accepting".into(),
        ));
    }
    Ok(issued)
}

/// Waits for the transfer's data connections, then relays it. `hold` (the
/// sender's control connection, if on this broker) is dropped once the data
/// connections arrived.
pub(crate) async fn relay_when_connected<T>(
    state: &State,
    mut issued: Issued<'_, DataConn>,
    (tid, sid): (TransferId, StreamId),
    path: Path,
    shutdown: Shutdown,
    hold: T,
) {
    let deadline = tokio::time::Instant::now() + state.limits.handshake_timeout;
    let not_relayed = || {
        let nothing = std::time::Duration::ZERO;
        state.metrics.transfer_ended(End::NotRelayed, 0, nothing);
    };
    let Some((arrival, mine)) = arrivals(state, &mut issued, deadline, tid).await else {
        not_relayed();
        return;
    };
    drop(issued);
    let (sender, others, mut joiners) = match arrival {
        Some(Arrival::Upload {
            conn: sender,
            others,
            joiners,
        }) => (sender, others, joiners),
        Some(Arrival::Joined { hub }) => {
            // Another transfer's task relays this stream; this receiver's
            // connection goes there, and this task waits for the relay.
            let Some(mine) = mine else {
                info!(transfer = %tid, "data connection did not arrive in time");
                not_relayed();
                return;
            };
            let (done, relayed) = oneshot::channel();
            let joiner = Joiner {
                tids: vec![tid],
                feed: false,
                conn: mine,
                done,
            };
            if hub.send(joiner).await.is_ok() {
                let _ = relayed.await;
            }
            return;
        }
        _ if mine.is_some() => {
            // Nothing relayed: the agents may have connected to each other.
            info!(transfer = %tid, "the sender's data connection did not come (a direct connection, or a sender gone)");
            not_relayed();
            return;
        }
        _ => {
            info!(transfer = %tid, "data connections did not arrive in time");
            not_relayed();
            return;
        }
    };
    // The TLS connection has done its part; the sender closes its own too.
    drop(hold);
    let ids = (tid, sid);
    let idle = state.limits.idle_timeout;
    if others.is_empty() {
        let Some(receiver) = mine else {
            info!(transfer = %tid, "data connections did not arrive in time");
            not_relayed();
            return;
        };
        info!(transfer = %tid, "transfer started");
        let meters = state.metrics.meters(path);
        let report = relay(sender, receiver, ids, idle, shutdown, meters).await;
        report.log(tid, &state.metrics);
        return;
    }
    // One upload to several receivers: those whose connections arrive in
    // time take part; the others' transfers have failed.
    let mut receivers: Vec<fanout::Receiver> = mine
        .map(|conn| fanout::Receiver {
            tids: vec![tid],
            feed: false,
            conn,
            done: None,
        })
        .into_iter()
        .collect();
    // A feed to another broker may bring several of the others at once.
    let mut expected = others.len();
    while expected > 0 {
        match tokio::time::timeout_at(deadline, joiners.recv()).await {
            Ok(Some(j)) => {
                expected = expected.saturating_sub(j.tids.len());
                receivers.push(fanout::Receiver {
                    tids: j.tids,
                    feed: j.feed,
                    conn: j.conn,
                    done: Some(j.done),
                });
            }
            _ => break,
        }
    }
    // A receiver or feed that comes later is left out now, not held open.
    joiners.close();
    while joiners.try_recv().is_ok() {}
    info!(transfer = %tid, receivers = receivers.len(), "upload to several receivers started");
    let meters = state.metrics.meters(Path::Fanout);
    let report = fanout::relay(sender, receivers, sid, idle, shutdown, meters).await;
    report.log(tid, &state.metrics);
}

/// Waits until `deadline` for the sender's arrival and the receiver's data
/// connection, in whichever order they come. A receiver connection that
/// closes before the sender's came ends the wait at once (`None`): its
/// agent took a direct connection instead (PROTOCOL.md §2.7), or left; so
/// the transfer stops counting against the broker's limits then, not at
/// the deadline. Not in an upload to several receivers (which never goes
/// direct): there the sender's upload needs every ticket still waiting,
/// and that receiver is simply missing from the copy.
async fn arrivals(
    state: &State,
    issued: &mut Issued<'_, DataConn>,
    deadline: tokio::time::Instant,
    tid: TransferId,
) -> Option<(Option<Arrival<DataConn>>, Option<DataConn>)> {
    let (mut mine, mut receiver_done) = (None::<DataConn>, false);
    let arrival = loop {
        tokio::select! {
            a = &mut issued.sender => break a.ok(),
            m = &mut issued.receiver, if !receiver_done => {
                receiver_done = true;
                mine = m.ok();
            }
            () = closed(mine.as_ref()), if mine.is_some() => {
                if state.tickets.shares_stream(&tid) {
                    mine = None;
                    continue;
                }
                info!(transfer = %tid, "the receiver closed its data connection before the sender's came (a direct connection, or a receiver gone)");
                return None;
            }
            () = tokio::time::sleep_until(deadline) => break None,
        }
    };
    if !receiver_done {
        mine = tokio::time::timeout_at(deadline, &mut issued.receiver)
            .await
            .ok()
            .and_then(Result::ok);
    }
    Some((arrival, mine))
}

/// Returns once `conn` is closed (or fails); never for `None` or a
/// connection that sends data (before its sender came, a receiver has
/// nothing to say: such bytes wait for the relay, which refuses them).
async fn closed(conn: Option<&DataConn>) {
    if let Some(conn) = conn
        && matches!(conn.tcp.peek(&mut [0u8; 1]).await, Ok(0) | Err(_))
    {
        return;
    }
    std::future::pending().await
}
