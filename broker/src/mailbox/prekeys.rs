//! Receivers' prekey bundles, deposited while online and fetched by senders
//! one at a time, with a per-sender fetch rate.
//!
//! Each receiver's bundles live in `prekeys/<receiver>`, replaced atomically
//! on every change and *before* the change is visible in memory: a one-time
//! bundle handed out is gone from the disk before the sender gets it, so a
//! restart can never hand it out twice. Bundles are opaque; the broker never
//! checks their signatures (senders do).

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use keyferry_common::name::AgentName;
use keyferry_common::sync::lock;

use super::disk::{self, TMP_PREFIX};
use super::error::{Limited, MailboxError, TakeError};
use super::format::{Bundles, MAX_PREKEY_FILE};
use super::types::Prekey;

/// The window of the fetch rate.
const RATE_WINDOW: Duration = Duration::from_secs(60);
/// Senders tracked before the idle ones are swept from the rate table.
const SWEEP_AT: usize = 1024;

#[derive(Debug, Default)]
struct State {
    held: HashMap<AgentName, Bundles>,
    fetches: FetchRate,
}

/// Every sender's prekey fetches in the last minute.
#[derive(Debug, Default)]
pub(super) struct FetchRate(HashMap<AgentName, VecDeque<Instant>>);

impl FetchRate {
    /// Counts a fetch by `sender` at `now`, or refuses it if `sender` made
    /// `per_minute` of them in the minute before.
    pub fn charge(
        &mut self,
        sender: &AgentName,
        now: Instant,
        per_minute: usize,
    ) -> Result<(), Limited> {
        if self.0.len() >= SWEEP_AT {
            self.0.retain(|_, w| {
                w.back()
                    .is_some_and(|&t| now.saturating_duration_since(t) < RATE_WINDOW)
            });
        }
        let window = self.0.entry(sender.clone()).or_default();
        while window
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) >= RATE_WINDOW)
        {
            window.pop_front();
        }
        if window.len() >= per_minute {
            let oldest = window.front().copied().unwrap_or(now);
            let left = RATE_WINDOW.saturating_sub(now.saturating_duration_since(oldest));
            // Round up: retrying after the advertised time must succeed.
            let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            return Err(Limited {
                retry_after_secs: secs.max(1),
            });
        }
        window.push_back(now);
        Ok(())
    }
}

/// Every receiver's prekeys, and every sender's recent fetches.
#[derive(Debug)]
pub(super) struct Prekeys {
    dir: PathBuf,
    state: Mutex<State>,
}

impl Prekeys {
    /// Loads the bundles in `dir`, dropping corrupt files and leftovers.
    pub fn load(dir: PathBuf) -> Result<Self, MailboxError> {
        let mut held = HashMap::new();
        for name in disk::list(&dir)? {
            let path = dir.join(&name);
            if name.starts_with(TMP_PREFIX) {
                disk::remove_or_warn(&path);
                continue;
            }
            let Ok(receiver) = AgentName::new(&name) else {
                tracing::warn!(path = %path.display(), "mailbox: a file not of ours is left alone");
                continue;
            };
            let bundles = disk::read_bounded(&path, MAX_PREKEY_FILE)
                .map_err(|e| tracing::warn!(error = %e, "mailbox: prekeys unreadable"))
                .ok()
                .flatten()
                .and_then(|bytes| Bundles::decode(&bytes));
            match bundles {
                Some(b) if !b.is_empty() => {
                    held.insert(receiver, b);
                }
                Some(_) => disk::remove_or_warn(&path),
                None => {
                    tracing::warn!(path = %path.display(), "mailbox: corrupt prekey file dropped");
                    disk::remove_or_warn(&path);
                }
            }
        }
        Ok(Self {
            dir,
            state: Mutex::new(State {
                held,
                fetches: FetchRate::default(),
            }),
        })
    }

    /// Writes `bundles` as `receiver`'s (removes the file if empty).
    fn persist(&self, receiver: &AgentName, bundles: &Bundles) -> Result<(), MailboxError> {
        if bundles.is_empty() {
            disk::remove(&self.dir.join(receiver.as_str()))?;
            disk::sync_dir(&self.dir)
        } else {
            disk::write_atomic(&self.dir, receiver.as_str(), &bundles.encode())
        }
    }

    /// Adds one-time bundles (past [`super::format::MAX_ONE_TIME`] held, the rest are
    /// dropped) and replaces the last-resort one if given. Returns the
    /// one-time bundles now held.
    pub fn put(
        &self,
        receiver: &AgentName,
        one_time: Vec<Vec<u8>>,
        last_resort: Option<Vec<u8>>,
    ) -> Result<u32, MailboxError> {
        let mut state = lock(&self.state);
        let mut next = state.held.get(receiver).cloned().unwrap_or_default();
        next.add(one_time, last_resort)?;
        self.persist(receiver, &next)?;
        let count = next.one_time.len();
        state.held.insert(receiver.clone(), next);
        Ok(count_u32(count))
    }

    /// One-time bundles held for `receiver`.
    pub fn count(&self, receiver: &AgentName) -> u32 {
        count_u32(
            lock(&self.state)
                .held
                .get(receiver)
                .map_or(0, |b| b.one_time.len()),
        )
    }

    /// `receiver`'s last-resort bundle, if it deposited one.
    pub fn last_resort(&self, receiver: &AgentName) -> Option<Vec<u8>> {
        lock(&self.state).held.get(receiver)?.last_resort.clone()
    }

    /// A bundle of `receiver`'s for `sender`: a one-time one (removed), else
    /// the last-resort one (kept), else `None`. Every fetch counts against
    /// `per_minute`, those that find nothing too.
    pub fn take(
        &self,
        sender: &AgentName,
        receiver: &AgentName,
        now: Instant,
        per_minute: usize,
    ) -> Result<Option<Prekey>, TakeError> {
        let mut state = lock(&self.state);
        let state = &mut *state;
        state.fetches.charge(sender, now, per_minute)?;
        let Some(bundles) = state.held.get(receiver) else {
            return Ok(None);
        };
        let mut next = bundles.clone();
        let taken = next.take();
        if taken.as_ref().is_none_or(|p| p.last_resort) {
            return Ok(taken);
        }
        self.persist(receiver, &next)?;
        if next.is_empty() {
            state.held.remove(receiver);
        } else {
            state.held.insert(receiver.clone(), next);
        }
        Ok(taken)
    }

    /// Keeps only the one-time bundles of `receiver` for which `keep` holds
    /// (the caller's judgement, e.g. not expired); durable on return.
    /// Returns the one-time bundles now held.
    pub fn retain(
        &self,
        receiver: &AgentName,
        keep: impl Fn(&[u8]) -> bool,
    ) -> Result<u32, MailboxError> {
        let mut state = lock(&self.state);
        let Some(held) = state.held.get(receiver) else {
            return Ok(0);
        };
        let mut next = held.clone();
        next.one_time.retain(|b| keep(b));
        if next.one_time.len() == held.one_time.len() {
            return Ok(count_u32(next.one_time.len()));
        }
        self.persist(receiver, &next)?;
        let count = next.one_time.len();
        if next.is_empty() {
            state.held.remove(receiver);
        } else {
            state.held.insert(receiver.clone(), next);
        }
        Ok(count_u32(count))
    }

    /// Drops all of `receiver`'s bundles.
    pub fn forget(&self, receiver: &AgentName) -> Result<(), MailboxError> {
        let mut state = lock(&self.state);
        self.persist(receiver, &Bundles::default())?;
        state.held.remove(receiver);
        Ok(())
    }
}

fn count_u32(n: usize) -> u32 {
    // At most MAX_ONE_TIME.
    u32::try_from(n).unwrap_or(u32::MAX)
}
