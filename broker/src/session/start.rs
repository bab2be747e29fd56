//! Starting an accepted transfer, wherever its offer came from (a sender on
//! this broker, or another broker of the cluster): the two tickets (the
//! receiver's queued on its control connection), then the wait for both data
//! connections, then the relay — one to one, or one upload to several
//! receivers.

use keyferry_common::ids::{StreamId, TransferId};
use keyferry_common::name::AgentName;
use keyferry_common::wire::message::{AbortReason, ErrorCode, Message};
use tokio::sync::{mpsc, oneshot};
use tracing::info;

use crate::fanout;
use crate::metrics::{End, Path};
use crate::relay::{DataConn, relay};
use crate::shutdown::Shutdown;
use crate::state::State;
use crate::tickets::{Arrival, Issued, Joiner};

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
            info!(transfer = %tid, "the sender's data connection did not come (a direct connection, a sender gone, or not all of its connections)");
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
        let (lanes, receiver_lanes) = (sender.further.len() + 1, receiver.further.len() + 1);
        info!(transfer = %tid, lanes, receiver_lanes, "transfer started");
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
