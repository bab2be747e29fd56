//! One upload to receivers on several brokers of a cluster (PROTOCOL.md
//! §2.6): the sender uploads once, to the broker it is connected to, and
//! presents there the sender tickets of its routed transfers; this broker
//! opens a data connection to each of those receivers' brokers, redeems the
//! tickets there as the sender would have, and feeds it one copy of the
//! stream — one per broker, however many of its receivers the upload has —
//! like any receiver of the upload ([`crate::fanout`]). The other broker
//! relays it to its receivers as usual (one upload to several, if several),
//! and their answers come back the same way. The records stay sealed end to end: this broker reads none
//! of them, as before.

use std::sync::Arc;
use std::time::Duration;

use keyferry_common::wire::frame::MAX_FRAME_LEN;
use keyferry_common::wire::message::{self, Message, ticket_address_ok};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::fanout;
use crate::metrics::Path;
use crate::relay::DataConn;
use crate::routes::Remote;
use crate::state::State;
use crate::tickets::Joiner;

/// How long connecting to another broker may take.
const CONNECT: Duration = Duration::from_secs(5);

/// `remotes` grouped by the broker they go to, in the order first seen.
pub fn by_broker(remotes: Vec<Remote>) -> Vec<Vec<Remote>> {
    let mut groups: Vec<Vec<Remote>> = Vec::new();
    for r in remotes {
        match groups.iter_mut().find(|g| g[0].address == r.address) {
            Some(g) => g.push(r),
            None => groups.push(vec![r]),
        }
    }
    groups
}

/// A data connection to the broker of `group` (transfers whose receivers
/// it holds) that redeemed each of their tickets there, as one upload.
pub async fn open(state: &State, group: &[Remote]) -> Result<DataConn, String> {
    let Some(first) = group.first() else {
        return Err("no transfer to feed".into());
    };
    let address = &first.address;
    if !ticket_address_ok(address) {
        return Err("an invalid address".into());
    }
    let tcp = tokio::time::timeout(CONNECT, TcpStream::connect(address))
        .await
        .map_err(|_| format!("{address}: no connection within 5 s"))?
        .map_err(|e| format!("{address}: {e}"))?;
    // Our own connection counts against the connection cap too (not against
    // any address's: the agents behind one are not cut for it).
    let guard = state
        .conns
        .admit_outbound()
        .map_err(|_| "this broker holds --max-connections already".to_owned())?;
    let _ = tcp.set_nodelay(true);
    let _ = keyferry_common::io::tcp::keep_alive(&tcp);
    let mut frames = Vec::new();
    for r in group {
        let redeem = Message::Redeem {
            transfer_id: r.tid,
            ticket: r.ticket,
        };
        frames.extend(message::encode(&redeem, MAX_FRAME_LEN).map_err(|e| e.to_string())?);
    }
    let mut tcp = tcp;
    tokio::time::timeout(CONNECT, tcp.write_all(&frames))
        .await
        .map_err(|_| format!("{address}: the tickets could not be sent"))?
        .map_err(|e| format!("{address}: {e}"))?;
    Ok(DataConn {
        tcp,
        leftover: Vec::new(),
        guard,
        further: Vec::new(),
    })
}

/// Opens the feed of `group` and hands it to the upload's relay at `hub`,
/// as a receiver's connection would be.
pub async fn join(state: Arc<State>, group: Vec<Remote>, hub: mpsc::Sender<Joiner<DataConn>>) {
    let tids: Vec<_> = group.iter().map(|r| r.tid).collect();
    match open(&state, &group).await {
        Ok(conn) => {
            let (done, relayed) = oneshot::channel();
            let joiner = Joiner {
                tids,
                feed: true,
                conn,
                done,
            };
            if hub.send(joiner).await.is_ok() {
                let _ = relayed.await;
            }
        }
        Err(e) => {
            warn!(transfers = tids.len(), error = %e, "the receivers' broker could not be fed")
        }
    }
}

/// Relays an upload whose receivers are all on other brokers: `sender`'s
/// stream goes to one feed for each of their brokers.
pub async fn upload(state: Arc<State>, sender: DataConn, remotes: Vec<Remote>) {
    let Some(first) = remotes.first() else {
        return;
    };
    let (tid, sid) = (first.tid, first.stream);
    let mut opening = JoinSet::new();
    for group in by_broker(remotes) {
        let state = Arc::clone(&state);
        opening.spawn(async move {
            let opened = open(&state, &group).await;
            (group.iter().map(|r| r.tid).collect::<Vec<_>>(), opened)
        });
    }
    let mut receivers = Vec::new();
    while let Some(joined) = opening.join_next().await {
        match joined {
            Ok((tids, Ok(conn))) => receivers.push(fanout::Receiver {
                tids,
                feed: true,
                conn,
                done: None,
            }),
            Ok((tids, Err(e))) => {
                warn!(transfers = tids.len(), error = %e, "the receivers' broker could not be fed")
            }
            Err(_) => {}
        }
    }
    if receivers.is_empty() {
        return;
    }
    info!(transfer = %tid, brokers = receivers.len(), "upload fed to other brokers started");
    let (idle, shutdown) = (state.limits.idle_timeout, state.shutdown());
    let meters = state.metrics.meters(Path::Fanout);
    let report = fanout::relay(sender, receivers, sid, idle, shutdown, meters).await;
    report.log(tid, &state.metrics);
}
