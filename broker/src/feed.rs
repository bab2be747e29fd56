//! One upload to receivers on several brokers of a cluster (PROTOCOL.md
//! §2.6): the sender uploads once, to the broker it is connected to, and
//! presents there the sender tickets of its routed transfers; this broker
//! opens a data connection to each of those receivers' brokers, redeems the
//! ticket there as the sender would have, and feeds it a copy of the stream
//! like any receiver of the upload ([`crate::fanout`]). The other broker
//! relays it to its receiver as usual, and its receiver's answers come back
//! the same way. The records stay sealed end to end: this broker reads none
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

/// A data connection to `remote`'s broker that redeemed its ticket there.
pub async fn open(state: &State, remote: &Remote) -> Result<DataConn, String> {
    if !ticket_address_ok(&remote.address) {
        return Err("an invalid address".into());
    }
    let tcp = tokio::time::timeout(CONNECT, TcpStream::connect(&remote.address))
        .await
        .map_err(|_| format!("{}: no connection within 5 s", remote.address))?
        .map_err(|e| format!("{}: {e}", remote.address))?;
    // Our own connection counts against the connection cap too (not against
    // any address's: the agents behind one are not cut for it).
    let guard = state
        .conns
        .admit_outbound()
        .map_err(|_| "this broker holds --max-connections already".to_owned())?;
    let _ = tcp.set_nodelay(true);
    let _ = keyferry_common::io::tcp::keep_alive(&tcp);
    let redeem = Message::Redeem {
        transfer_id: remote.tid,
        ticket: remote.ticket,
    };
    let frame = message::encode(&redeem, MAX_FRAME_LEN).map_err(|e| e.to_string())?;
    let mut tcp = tcp;
    tokio::time::timeout(CONNECT, tcp.write_all(&frame))
        .await
        .map_err(|_| format!("{}: the ticket could not be sent", remote.address))?
        .map_err(|e| format!("{}: {e}", remote.address))?;
    Ok(DataConn {
        tcp,
        leftover: Vec::new(),
        guard,
    })
}

/// Opens `remote`'s feed and hands it to the upload's relay at `hub`, as a
/// receiver's connection would be.
pub async fn join(state: Arc<State>, remote: Remote, hub: mpsc::Sender<Joiner<DataConn>>) {
    match open(&state, &remote).await {
        Ok(conn) => {
            let (done, relayed) = oneshot::channel();
            let joiner = Joiner {
                tid: remote.tid,
                conn,
                done,
            };
            if hub.send(joiner).await.is_ok() {
                let _ = relayed.await;
            }
        }
        Err(e) => {
            warn!(transfer = %remote.tid, error = %e, "the receiver's broker could not be fed")
        }
    }
}

/// Relays an upload whose receivers are all on other brokers: `sender`'s
/// stream goes to a feed for each of `remotes`.
pub async fn upload(state: Arc<State>, sender: DataConn, remotes: Vec<Remote>) {
    let Some(first) = remotes.first() else {
        return;
    };
    let (tid, sid) = (first.tid, first.stream);
    let mut opening = JoinSet::new();
    for remote in remotes {
        let state = Arc::clone(&state);
        opening.spawn(async move {
            let opened = open(&state, &remote).await;
            (remote.tid, opened)
        });
    }
    let mut receivers = Vec::new();
    while let Some(joined) = opening.join_next().await {
        match joined {
            Ok((tid, Ok(conn))) => receivers.push(fanout::Receiver {
                tid,
                conn,
                done: None,
            }),
            Ok((tid, Err(e))) => {
                warn!(transfer = %tid, error = %e, "the receiver's broker could not be fed")
            }
            Err(_) => {}
        }
    }
    if receivers.is_empty() {
        return;
    }
    info!(transfer = %tid, receivers = receivers.len(), "upload fed to other brokers started");
    let (idle, shutdown) = (state.limits.idle_timeout, state.shutdown());
    let meters = state.metrics.meters(Path::Fanout);
    let report = fanout::relay(sender, receivers, sid, idle, shutdown, meters).await;
    report.log(tid, &state.metrics);
}
