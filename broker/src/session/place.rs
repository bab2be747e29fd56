//! An offer's place under the limits (PROTOCOL.md §2.4, §2.6): this
//! broker's offer rate and concurrent transfers per sender, and with
//! `--cluster` the whole cluster's, held from the offer to the end of its
//! transfer ([`Held`]). A cluster that does not answer leaves the counting to
//! this broker, as names fall back to its cache.

use std::time::Instant;

use keyferry_common::ids::StreamId;
use keyferry_common::name::AgentName;
use tracing::{debug, warn};

use crate::cluster::ClusterError;
use crate::cluster::rates::Counted;
use crate::metrics::Limit;
use crate::state::State;
use crate::transfers::{OfferLimit, OfferSlot};

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
    let rate = state.limits.offers_per_minute;
    cluster_count(state, Counted::Offers, name, rate).await.map_err(|over| {
        state.metrics.refused_by(Limit::OffersPerMinute);
        match over {
            Over::Full => {
                format!("more than {rate} offers in a minute through the brokers of this cluster")
            }
            Over::Contended => format!(
                "too many offers at once through the brokers of this cluster (at most {rate} a minute)"
            ),
        }
    })
}

/// Why a cluster-wide count refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Over {
    /// The last minute holds `rate` already.
    Full,
    /// Others of the same name raced through several brokers for every
    /// try; refusing is the safe side.
    Contended,
}

/// Counts one of `what` by `name` against `rate` a minute across the
/// cluster (with `--cluster`). A cluster that does not answer leaves the
/// count to this broker alone: `Ok`.
pub(crate) async fn cluster_count(
    state: &State,
    what: Counted,
    name: &AgentName,
    rate: usize,
) -> Result<(), Over> {
    let Some(cluster) = &state.cluster else {
        return Ok(());
    };
    if !cluster.connected() {
        // Not a 2 s wait per request for an answer that will not come.
        return Ok(());
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    match cluster.take(what, name, rate, now).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(Over::Full),
        Err(ClusterError::Contended(_)) => Err(Over::Contended),
        Err(e) => {
            warn!(error = %e, ?what, "cluster unreachable: counted on this broker only");
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
