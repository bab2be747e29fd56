//! The broker's offline mailbox: sealed transfers stored on disk for receivers
//! that are offline, the receipts their senders read back, and the prekey
//! bundles receivers deposit for senders to fetch. State only: nothing here
//! holds a socket, and every byte string it is given is opaque (the broker
//! never decrypts, parses or verifies one); only names, sizes, ids and times
//! mean anything to it.
//!
//! Guarantees:
//!
//! * **No partial transfer is ever offered.** An upload is written to
//!   `<id>.part`; its metadata is made durable first, then the data file is
//!   fsynced and renamed to `<id>.data` — the single commit point. At
//!   [`Mailbox::open`] an object counts only if both its metadata and its data
//!   are there and agree (see [`disk`] for the layout, [`recover`] for the
//!   rules); anything else is removed.
//! * **An ended transfer stays ended.** Delivering, refusing, withdrawing or
//!   expiring one writes its receipt record durably first (that rename is the
//!   commit point of the end), then removes its files; an open that finds
//!   both finishes the removal.
//! * **Limits are checked before a byte is stored**, against an in-memory
//!   index loaded at open, counting uploads in progress at the most they may
//!   write ([`max_upload`]).
//! * A transfer being delivered is neither withdrawn nor expired under its
//!   reader ([`Mailbox::begin_delivery`]).
//!
//! Every method may block on the disk (fsync): async callers run them with
//! `spawn_blocking`. What it does not do: decide who may store for whom,
//! speak the protocol, or schedule [`Mailbox::expire`] — callers do.
//!
//! The brokers of a cluster keep the same records in NATS JetStream instead
//! ([`shared`]); [`Storage`] is the one async interface callers use to either.

mod delivery;
mod disk;
mod ending;
mod error;
mod format;
mod limits;
mod prekeys;
mod recover;
pub mod shared;
mod storage;
mod types;
mod upload;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_delivery;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use keyferry_common::ids::TransferId;
use keyferry_common::name::AgentName;
use keyferry_common::sync::lock;

pub use delivery::Delivering;
pub use error::{Limited, MailboxError, Refusal, TakeError, UploadError, WithdrawError};
pub use format::{MAX_BUNDLE, MAX_ONE_TIME};
pub use limits::{MailboxLimits, max_upload};
pub use storage::{Handout, Sink, Storage};
pub use types::{Outcome, Prekey, ReceiptRecord, State, StoredMeta, Usage};
pub use upload::Upload;

use disk::Layout;
use format::Ended;
use prekeys::Prekeys;

/// A committed transfer, waiting for its receiver.
#[derive(Debug)]
struct Stored {
    meta: StoredMeta,
    /// Bytes in its data file.
    len: u64,
    /// The token of the delivery running, if one is.
    delivery: Option<u64>,
}

/// An upload in progress.
#[derive(Debug)]
struct Reserved {
    from: AgentName,
    to: AgentName,
    /// The most it may write.
    charge: u64,
}

/// What the mailbox holds, in memory; the disk agrees with it.
#[derive(Debug, Default)]
struct Index {
    stored: HashMap<TransferId, Stored>,
    reserved: HashMap<TransferId, Reserved>,
    ended: HashMap<TransferId, Ended>,
    next_delivery: u64,
    /// The latest [`StoredMeta::order`] given.
    last_order: u64,
}

impl Index {
    /// Sender, receiver and bytes counted of every stored or reserved transfer.
    fn charges(&self) -> impl Iterator<Item = (&AgentName, &AgentName, u64)> {
        let stored = self
            .stored
            .values()
            .map(|s| (&s.meta.from, &s.meta.to, s.len));
        let reserved = self.reserved.values().map(|r| (&r.from, &r.to, r.charge));
        stored.chain(reserved)
    }
}

/// The offline mailbox. Share it as an `Arc<Mailbox>`.
#[derive(Debug)]
pub struct Mailbox {
    layout: Layout,
    limits: MailboxLimits,
    index: Mutex<Index>,
    prekeys: Prekeys,
}

impl Mailbox {
    /// Opens the mailbox in `dir`, creating it (0700, parents too) if
    /// missing, and removes whatever a crash left half done.
    pub fn open(dir: &Path, limits: MailboxLimits) -> Result<Self, MailboxError> {
        let layout = Layout::create(dir)?;
        let (stored, ended) = recover::load(&layout)?;
        let prekeys = Prekeys::load(layout.prekeys.clone())?;
        let last_order = stored.values().map(|s| s.meta.order).max().unwrap_or(0);
        let index = Index {
            stored,
            ended,
            last_order,
            ..Index::default()
        };
        Ok(Self {
            layout,
            limits,
            index: Mutex::new(index),
            prekeys,
        })
    }

    /// Its limits.
    pub fn limits(&self) -> &MailboxLimits {
        &self.limits
    }

    /// Adds `receiver`'s one-time bundles (each 1 to [`MAX_BUNDLE`] bytes;
    /// past [`MAX_ONE_TIME`] held, the rest are dropped) and replaces its
    /// last-resort bundle if one is given; durable on return. Returns the
    /// one-time bundles now held.
    pub fn put_prekeys(
        &self,
        receiver: &AgentName,
        one_time: Vec<Vec<u8>>,
        last_resort: Option<Vec<u8>>,
    ) -> Result<u32, MailboxError> {
        self.prekeys.put(receiver, one_time, last_resort)
    }

    /// One-time bundles held for `receiver`.
    pub fn prekey_count(&self, receiver: &AgentName) -> u32 {
        self.prekeys.count(receiver)
    }

    /// `receiver`'s own last-resort bundle, if it deposited one (so that it
    /// can be told until when it holds).
    pub fn last_resort(&self, receiver: &AgentName) -> Option<Vec<u8>> {
        self.prekeys.last_resort(receiver)
    }

    /// A bundle of `receiver`'s for `sender`: a one-time one, removed durably
    /// before it is returned; when none is left the last-resort one (kept);
    /// `None` if the receiver deposited none. More than
    /// [`MailboxLimits::fetches_per_minute`] fetches by `sender` in 60 s are
    /// refused with [`TakeError::Limited`].
    pub fn take_prekey(
        &self,
        sender: &AgentName,
        receiver: &AgentName,
        now: Instant,
    ) -> Result<Option<Prekey>, TakeError> {
        let per_minute = self.limits.fetches_per_minute;
        self.prekeys.take(sender, receiver, now, per_minute)
    }

    /// Keeps only those of `receiver`'s one-time bundles for which `keep`
    /// holds (the caller parses them; this module does not); durable on
    /// return. Returns how many are held now.
    pub fn retain_prekeys(
        &self,
        receiver: &AgentName,
        keep: impl Fn(&[u8]) -> bool,
    ) -> Result<u32, MailboxError> {
        self.prekeys.retain(receiver, keep)
    }

    /// Drops all of `receiver`'s bundles (when its key changes).
    pub fn forget_prekeys(&self, receiver: &AgentName) -> Result<(), MailboxError> {
        self.prekeys.forget(receiver)
    }

    /// What is stored and reserved now.
    pub fn usage(&self) -> Usage {
        let index = lock(&self.index);
        Usage {
            bytes: index
                .charges()
                .fold(0, |sum, (_, _, bytes)| sum.saturating_add(bytes)),
            transfers: index.stored.len(),
            uploads: index.reserved.len(),
        }
    }
}
