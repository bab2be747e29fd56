//! One offer rate per agent name across the cluster (`keyferry-rates`): each
//! offer counts in the bucket under its sender's name and the current minute,
//! so an agent that offers through several brokers is held to
//! `--offers-per-minute` once, not once per broker (PROTOCOL.md §2.6). A
//! sender's prekey fetches are counted the same way, under their own keys
//! (`--prekey-fetches-per-minute`), so that fetching through every broker in
//! turn drains no more of a receiver's one-time prekeys than one broker allows.
//!
//! The window slides as the local one does, approximately: the previous
//! minute's count weighs in by the share of it still inside the last 60 s
//! (`previous × (60 − s)/60 + current`, s the seconds into this minute). A
//! count is raised by a revision-checked write, retried when another broker
//! wrote first, so no offer is lost between two brokers; every lost race is
//! another offer counted, so after `rate` of them the window is full and the
//! retries end. Entries expire with the bucket's max age. When the cluster
//! does not answer, the caller falls back on its own broker's count, as it
//! does for names.

use async_nats::jetstream::kv::{CreateErrorKind, Operation, UpdateErrorKind};
use keyferry_common::name::AgentName;

use super::names::key;
use super::{Cluster, ClusterError};

/// How often a write that lost a race is tried again, beyond the rate
/// (each lost race is an offer counted by another broker).
const EXTRA_TRIES: u64 = 16;

/// What a count counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// Offers (live, and `Store`s), by their sender.
    Offers,
    /// `FetchPrekey`s, by the sender that fetches.
    PrekeyFetches,
}

impl Counted {
    fn what(self) -> &'static str {
        match self {
            Self::Offers => "offer",
            Self::PrekeyFetches => "prekey fetch",
        }
    }
}

/// The bucket key of `name`'s count of `what` in minute `minute` (since the
/// epoch). An offer key is all hex digits and one `_`; a fetch key starts
/// with `fetch.`, which no offer key can.
fn slot(what: Counted, name: &AgentName, minute: u64) -> String {
    match what {
        Counted::Offers => format!("{}_{minute}", key(name)),
        Counted::PrekeyFetches => format!("fetch.{}_{minute}", key(name)),
    }
}

/// A count as stored: decimal ASCII; anything else counts as 0 (and is
/// overwritten at its revision).
fn count(value: &[u8]) -> u64 {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Whether the sliding estimate of offers in the last 60 s,
/// `previous × (60 − s)/60 + current`, has reached `rate` (compared exactly,
/// in sixtieths).
fn full(previous: u64, current: u64, seconds_in: u64, rate: u64) -> bool {
    let left = 60u64.saturating_sub(seconds_in.min(60));
    let sixtieths = previous
        .saturating_mul(left)
        .saturating_add(current.saturating_mul(60));
    sixtieths >= rate.saturating_mul(60)
}

impl Cluster {
    /// `name`'s count in `k` and its revision (`None`: no entry).
    async fn rate_entry(&self, k: &str) -> Result<Option<(u64, u64)>, ClusterError> {
        let entry = self.op("reading a count", self.rates.entry(k)).await?;
        Ok(entry
            .filter(|e| e.operation == Operation::Put)
            .map(|e| (count(&e.value), e.revision)))
    }

    /// Counts one of `what` by `name` at Unix time `now` if the
    /// cluster-wide estimate for the last minute is below `rate`; `Ok(false)`
    /// if it is not (nothing counted).
    pub async fn take(
        &self,
        what: Counted,
        name: &AgentName,
        rate: usize,
        now: u64,
    ) -> Result<bool, ClusterError> {
        let (minute, seconds_in) = (now / 60, now % 60);
        let previous = match minute.checked_sub(1) {
            Some(m) => self
                .rate_entry(&slot(what, name, m))
                .await?
                .map_or(0, |c| c.0),
            None => 0,
        };
        let k = slot(what, name, minute);
        let rate = u64::try_from(rate).unwrap_or(u64::MAX);
        for _ in 0..rate.saturating_add(EXTRA_TRIES) {
            let current = self.rate_entry(&k).await?;
            let n = current.map_or(0, |c| c.0);
            if full(previous, n, seconds_in, rate) {
                return Ok(false);
            }
            let value: bytes::Bytes = n.saturating_add(1).to_string().into();
            let written = match current {
                None => {
                    self.op("counting", async {
                        match self.rates.create(&k, value).await {
                            Ok(_) => Ok(true),
                            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Ok(false),
                            Err(e) => Err(e.to_string()),
                        }
                    })
                    .await?
                }
                Some((_, rev)) => {
                    self.op("counting", async {
                        match self.rates.update(&k, value, rev).await {
                            Ok(_) => Ok(true),
                            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => Ok(false),
                            Err(e) => Err(e.to_string()),
                        }
                    })
                    .await?
                }
            };
            if written {
                return Ok(true);
            }
        }
        Err(ClusterError::Contended(format!(
            "the {} count of {name} kept changing",
            what.what()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_slides_over_the_previous_minute() {
        assert!(!full(0, 0, 0, 1));
        assert!(full(30, 0, 0, 30));
        assert!(full(30, 0, 30, 15) && !full(30, 0, 30, 16));
        // One offer in the previous minute, rate 1: 90 s later it has left
        // the window (it weighs 30/60 at second 30, below 1).
        assert!(!full(1, 0, 30, 1));
        assert!(full(30, 5, 59, 5) && !full(30, 5, 59, 6));
        assert!(full(30, 5, 60, 5) && !full(30, 5, 60, 6));
        assert!(full(u64::MAX, u64::MAX, 0, u64::MAX));
        assert_eq!(count(b"12"), 12);
        assert_eq!(count(b"x"), 0);
        let bob = AgentName::new("bob").unwrap();
        assert_eq!(slot(Counted::Offers, &bob, 7), "626f62_7");
        assert_eq!(slot(Counted::PrekeyFetches, &bob, 7), "fetch.626f62_7");
    }
}
