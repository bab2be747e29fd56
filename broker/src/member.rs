//! This broker's life as a member of a cluster: it answers on its own
//! subjects — routed offers for its receivers ([`crate::session::routed`])
//! and "do you hold this receiver?" — and every [`HEARTBEAT`] refreshes its
//! receivers' presence and its own entry in the brokers bucket. A receiver
//! whose name another broker took over is told so and cut; a receiver that
//! came while the cluster was away gets its presence claimed now.

use std::sync::Arc;

use futures_util::StreamExt as _;
use keyferry_common::name::AgentName;
use keyferry_common::wire::message::{ErrorCode, Message};
use tokio::time::MissedTickBehavior;
use tracing::{info, warn};

use crate::cluster::presence::{Claim, HOLDS_YES};
use crate::cluster::{Cluster, HEARTBEAT};
use crate::session::routed;
use crate::state::State;

/// Serves this broker's subjects and beats its heart until the broker drains.
pub async fn run(state: Arc<State>, cluster: Arc<Cluster>) {
    let id = cluster.member().id.clone();
    let client = cluster.client().clone();
    let (offers, holds) = match (
        client.subscribe(Cluster::subject(&id, "offer")).await,
        client.subscribe(Cluster::subject(&id, "holds")).await,
    ) {
        (Ok(o), Ok(h)) => (o, h),
        (Err(e), _) | (_, Err(e)) => {
            warn!(error = %e, "cannot subscribe to this broker's cluster subjects: offers from other brokers will not arrive");
            return;
        }
    };
    let (mut offers, mut holds) = (offers, holds);
    let mut beat = tokio::time::interval(HEARTBEAT);
    beat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut shutdown = state.shutdown();
    let mut reachable = true;
    info!(broker = %id, advertise = %cluster.member().advertise, "cluster member serving");
    loop {
        tokio::select! {
            () = shutdown.draining() => break,
            Some(msg) = offers.next() => {
                let Some(reply) = msg.reply else { continue };
                let (state, cluster) = (Arc::clone(&state), Arc::clone(&cluster));
                let shutdown = state.shutdown();
                tokio::spawn(async move {
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
            _ = beat.tick() => {
                let now = heartbeat(&state, &cluster).await;
                if now != reachable {
                    if now {
                        info!("cluster reachable again: presence refreshed");
                    }
                    reachable = now;
                }
            }
        }
    }
}

/// One heartbeat; whether the cluster answered.
async fn heartbeat(state: &State, cluster: &Cluster) -> bool {
    let incoming = |n: &AgentName| state.transfers.incoming(n);
    let lost = match cluster.refresh(incoming).await {
        Ok(lost) => lost,
        Err(e) => {
            warn!(error = %e, "presence not refreshed: the cluster is unreachable");
            return false;
        }
    };
    for (name, holder) in &lost {
        cut(state, name, &format!("broker {holder}"));
    }
    // Receivers that came while the cluster was away.
    for name in state.registry.receivers() {
        if cluster.holds_locally(&name) {
            continue;
        }
        match cluster.claim(&name, incoming(&name)).await {
            Ok(Claim::Claimed) => info!(agent = %name, "receiver's presence claimed"),
            Ok(Claim::HeldBy(other)) => cut(state, &name, &format!("broker {other}")),
            Err(_) => return false,
        }
    }
    if let Err(e) = cluster.announce().await {
        warn!(error = %e, "this broker's entry in the cluster not refreshed");
        return false;
    }
    true
}

/// Ends the local receiver `name`, whose name `holder` holds now.
fn cut(state: &State, name: &AgentName, holder: &str) {
    warn!(agent = %name, %holder, "receiver's name taken over in the cluster: this connection is cut");
    let _ = state.registry.push(
        name,
        Message::Error {
            code: ErrorCode::ReceiverConnected,
            detail: format!("a receiver named {name} is now connected to {holder}"),
        },
    );
}
