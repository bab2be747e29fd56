//! The mailbox's limits and their defaults, and the one rule that bounds an
//! upload's length by the size its sender announced.
//!
//! Limits are checked against the in-memory index before a byte is stored;
//! nothing here reads the disk except [`MailboxLimits::defaults_for`], which
//! asks the file system how much room it has once, at start.

use std::path::Path;
use std::time::Duration;

use keyferry_common::name::AgentName;

use super::error::Refusal;
use super::types::StoredMeta;

/// Largest share of the total: 10 GiB.
const TOTAL_CAP: u64 = 10 << 30;

/// Limits on what the mailbox stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxLimits {
    /// Bytes stored and reserved by uploads in progress, for everyone.
    pub total: u64,
    /// Bytes stored and reserved for one receiver.
    pub per_receiver: u64,
    /// Bytes stored and reserved from one sender.
    pub per_sender: u64,
    /// How long a stored transfer waits before it is deleted as expired; also
    /// how long a receipt record is kept after its transfer ended.
    pub max_age: Duration,
    /// Transfers stored and reserved for one receiver.
    pub per_receiver_count: usize,
    /// Prekey fetches one sender name may make in a sliding minute.
    pub fetches_per_minute: usize,
}

impl MailboxLimits {
    /// The defaults for a mailbox kept in `dir`: a total of a quarter of the
    /// free space of the file system holding `dir` (or of its nearest existing
    /// parent), at most 10 GiB; 2 GiB per receiver and per sender; 7 days; 32
    /// transfers per receiver; 10 prekey fetches per minute.
    ///
    /// If the free space cannot be measured, the total is 0 (nothing is
    /// stored) with a warning: refusing is better than filling a disk.
    pub fn defaults_for(dir: &Path) -> Self {
        let total = match free_space(dir) {
            Some(free) => (free / 4).min(TOTAL_CAP),
            None => {
                tracing::warn!(
                    dir = %dir.display(),
                    "mailbox: the free space of its file system is unknown; nothing will be stored"
                );
                0
            }
        };
        Self {
            total,
            per_receiver: 2 << 30,
            per_sender: 2 << 30,
            max_age: Duration::from_secs(7 * 24 * 3600),
            per_receiver_count: 32,
            fetches_per_minute: 10,
        }
    }

    /// `max_age` in whole seconds, for unix-time arithmetic.
    pub(super) fn max_age_secs(&self) -> u64 {
        self.max_age.as_secs()
    }
}

/// The most bytes an upload announced as `size` may write: `size` plus
/// `size / 64 + 64 KiB` for the records' headers and tags (a sender's
/// `size` counts the data, its manifest and 64 KiB already). It is also what
/// a reservation counts against the limits until its upload is committed.
pub fn max_upload(size: u64) -> u64 {
    size.saturating_add(size / 64).saturating_add(64 << 10)
}

/// Whether a transfer `meta` that counts `needed` bytes fits beside
/// `charges` (sender, receiver and bytes of every transfer stored or being
/// uploaded), checked in the order [`Refusal`] lists.
pub(super) fn admit<'a>(
    limits: &MailboxLimits,
    charges: impl Iterator<Item = (&'a AgentName, &'a AgentName, u64)>,
    meta: &StoredMeta,
    needed: u64,
) -> Result<(), Refusal> {
    let (mut count, mut to_receiver, mut from_sender, mut used) = (0, 0u64, 0u64, 0u64);
    for (from, to, bytes) in charges {
        if *to == meta.to {
            count += 1;
            to_receiver = to_receiver.saturating_add(bytes);
        }
        if *from == meta.from {
            from_sender = from_sender.saturating_add(bytes);
        }
        used = used.saturating_add(bytes);
    }
    let l = limits;
    let over = |waiting: u64, limit: u64| waiting.saturating_add(needed) > limit;
    if count >= l.per_receiver_count {
        Err(Refusal::ReceiverCount {
            receiver: meta.to.clone(),
            limit: l.per_receiver_count,
            waiting: count,
        })
    } else if over(to_receiver, l.per_receiver) {
        Err(Refusal::ReceiverBytes {
            receiver: meta.to.clone(),
            limit: l.per_receiver,
            waiting: to_receiver,
            needed,
        })
    } else if over(from_sender, l.per_sender) {
        Err(Refusal::SenderBytes {
            sender: meta.from.clone(),
            limit: l.per_sender,
            waiting: from_sender,
            needed,
        })
    } else if over(used, l.total) {
        Err(Refusal::Total {
            limit: l.total,
            used,
            needed,
        })
    } else {
        Ok(())
    }
}

/// Free bytes for an unprivileged user on the file system holding `dir`, or
/// on that of its nearest existing ancestor.
fn free_space(dir: &Path) -> Option<u64> {
    dir.ancestors().find_map(|p| {
        let st = rustix::fs::statvfs(p).ok()?;
        let block = if st.f_frsize != 0 {
            st.f_frsize
        } else {
            st.f_bsize
        };
        Some(st.f_bavail.saturating_mul(block))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_take_a_quarter_of_the_free_space_at_most_10_gib() {
        let dir = std::env::temp_dir().join("keyferry-no-such-dir/below");
        let l = MailboxLimits::defaults_for(&dir);
        let free = free_space(&std::env::temp_dir()).unwrap();
        assert_eq!(l.total, (free / 4).min(10 << 30));
        assert_eq!(l.per_receiver, 2 << 30);
        assert_eq!(l.per_sender, 2 << 30);
        assert_eq!(l.max_age, Duration::from_secs(604_800));
        assert_eq!((l.per_receiver_count, l.fetches_per_minute), (32, 10));
    }

    #[test]
    fn the_overhead_is_a_64th_plus_64_kib_and_never_overflows() {
        assert_eq!(max_upload(0), 64 << 10);
        assert_eq!(max_upload(64 << 20), (65 << 20) + (64 << 10));
        assert_eq!(max_upload(u64::MAX), u64::MAX);
    }
}
