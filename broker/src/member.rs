//! This broker's life as a member of a cluster: it answers on its own
//! subjects — routed offers for its receivers ([`crate::session::routed`])
//! and "do you hold this receiver?" — and, in a task of its own so that
//! answers never wait for it, every [`HEARTBEAT`] refreshes its receivers'
//! presence and its own entry in the brokers bucket. A receiver whose name
//! another broker took over is told so and cut; a receiver that came while
//! the cluster was away gets its presence claimed then.

use std::sync::Arc;

use futures_util::StreamExt as _;
use keyferry_common::name::AgentName;
use keyferry_common::wire::message::{ErrorCode, Message};
use tokio::time::MissedTickBehavior;
use tracing::{info, warn};

use crate::cluster::presence::HOLDS_YES;
use crate::cluster::{Cluster, HEARTBEAT};
use crate::session::routed;
use crate::shutdown::Alive;
use crate::state::State;

/// This broker's subscriptions: routed offers, and "do you hold …?".
pub type Subjects = (async_nats::Subscriber, async_nats::Subscriber);

/// Serves this broker's subjects and beats its heart until the broker
/// drains; every routed transfer holds an `alive`, so a graceful shutdown
/// waits for them as for any other.
pub async fn run(state: Arc<State>, cluster: Arc<Cluster>, subjects: Subjects, alive: Alive) {
    let (mut offers, mut holds) = subjects;
    let client = cluster.client().clone();
    let mut shutdown = state.shutdown();
    {
        let (state, cluster, alive) = (Arc::clone(&state), Arc::clone(&cluster), alive.clone());
        tokio::spawn(async move {
            let _alive = alive;
            heartbeats(&state, &cluster).await;
        });
    }
    info!(broker = %cluster.member().id, advertise = %cluster.member().advertise, "cluster member serving");
    loop {
        tokio::select! {
            () = shutdown.draining() => break,
            Some(msg) = offers.next() => {
                let Some(reply) = msg.reply else { continue };
                let (state, cluster, alive) = (Arc::clone(&state), Arc::clone(&cluster), alive.clone());
                tokio::spawn(async move {
                    let _alive = alive;
                    let shutdown = state.shutdown();
                    routed::serve(&state, &cluster, &msg.payload, reply, shutdown).await;
                });
            }
            Some(msg) = holds.next() => {
                let Some(reply) = msg.reply else { continue };
                let held = std::str::from_utf8(&msg.payload)
                    .ok()
                    .and_then(|s| AgentName::new(s).ok())
                    .is_some_and(|n| state.registry.is_receiving(&n));
                let answer: &[u8] = if held { HOLDS_YES } else { b"no" };
                let _ = client.publish(reply, answer.into()).await;
            }
        }
    }
}

/// Beats every [`HEARTBEAT`] until the broker drains.
async fn heartbeats(state: &State, cluster: &Cluster) {
    let mut beat = tokio::time::interval(HEARTBEAT);
    beat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut shutdown = state.shutdown();
    let mut reachable = true;
    loop {
        tokio::select! {
            () = shutdown.draining() => return,
            _ = beat.tick() => {}
        }
        let now = heartbeat(state, cluster).await;
        if now && !reachable {
            info!("cluster reachable again: presence refreshed");
        }
        reachable = now;
    }
}

/// One heartbeat; whether the cluster answered.
async fn heartbeat(state: &State, cluster: &Cluster) -> bool {
    let incoming = |n: &AgentName| state.transfers.incoming(n);
    match cluster
        .refresh(|| state.registry.receivers(), incoming)
        .await
    {
        Ok(lost) => {
            for (name, holder) in &lost {
                cut(state, name, holder);
            }
        }
        Err(e) => {
            warn!(error = %e, "presence not refreshed: the cluster is unreachable");
            return false;
        }
    }
    if let Err(e) = cluster.announce().await {
        warn!(error = %e, "this broker's entry in the cluster not refreshed");
        return false;
    }
    if let Ok(n) = cluster.live_brokers().await {
        state.metrics.cluster_brokers(n);
    }
    // The streams in flight here stay counted in the cluster; one that
    // ended while its key was written is removed again.
    for (name, sid) in state.transfers.streams() {
        if let Err(e) = cluster.sending_put(&name, sid).await {
            warn!(error = %e, "streams in flight not refreshed in the cluster");
            break;
        }
        if !state.transfers.holds(&name, sid) {
            cluster.sending_delete(&name, sid).await;
        }
    }
    true
}

/// Ends the local receiver `name`, whose name broker `holder` holds now.
fn cut(state: &State, name: &AgentName, holder: &str) {
    warn!(agent = %name, %holder, "receiver's name taken over in the cluster: this connection is cut");
    let _ = state.registry.push(
        name,
        Message::Error {
            code: ErrorCode::ReceiverConnected,
            detail: format!("a receiver named {name} is now connected to broker {holder}"),
        },
    );
}
