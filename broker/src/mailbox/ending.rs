//! The ends of a stored transfer other than a delivery's (withdrawn by its
//! sender, expired), the one step every end goes through, and the receipt
//! records senders read.
//!
//! Every end writes the transfer's receipt record durably *before* removing
//! its files: the record's rename is the commit point. A crash after it
//! leaves files that the next open removes (see [`super::recover`]); a crash
//! before it leaves the transfer waiting, as if the end had not begun.

use keyferry_common::ids::TransferId;
use keyferry_common::name::AgentName;
use keyferry_common::sync::lock;

use super::disk;
use super::error::{MailboxError, WithdrawError};
use super::format::{End, Ended, waiting_record};
use super::{Index, Mailbox, ReceiptRecord, StoredMeta};

/// Most records of ended transfers kept per sender (the newest).
pub const MAX_ENDED_PER_SENDER: usize = 256;

impl Mailbox {
    /// Ends stored transfer `id` with `end` at `at`, under the index lock.
    pub(super) fn end(
        &self,
        index: &mut Index,
        id: &TransferId,
        end: End,
        at: u64,
    ) -> Result<StoredMeta, MailboxError> {
        let stored = index
            .stored
            .get(id)
            .ok_or(MailboxError::NotWaiting { id: *id })?;
        let ended = Ended {
            from: stored.meta.from.clone(),
            to: stored.meta.to.clone(),
            size: stored.meta.size,
            stored_at: stored.meta.stored_at,
            end,
            at,
        };
        let receipts = &self.layout.receipts;
        disk::write_atomic(receipts, &hex::encode(id.0), &ended.encode(id))?;
        // Ended: what follows is cleanup, which the next open redoes.
        disk::remove_or_warn(&self.layout.data(id));
        disk::remove_or_warn(&self.layout.meta(id));
        let from = ended.from.clone();
        index.ended.insert(*id, ended);
        self.cap_ended(index, &from);
        let stored = index
            .stored
            .remove(id)
            .ok_or(MailboxError::NotWaiting { id: *id })?;
        Ok(stored.meta)
    }

    /// Keeps at most [`MAX_ENDED_PER_SENDER`] records of `sender`'s ended
    /// transfers, the newest: a sender cannot grow the broker's records (and
    /// the scan of `Receipts`) without bound by storing and withdrawing.
    fn cap_ended(&self, index: &mut Index, sender: &AgentName) {
        let mut theirs: Vec<(u64, TransferId)> = index
            .ended
            .iter()
            .filter(|(_, e)| e.from == *sender)
            .map(|(id, e)| (e.at, *id))
            .collect();
        if theirs.len() <= MAX_ENDED_PER_SENDER {
            return;
        }
        theirs.sort_unstable();
        let drop = theirs.len() - MAX_ENDED_PER_SENDER;
        for (_, id) in theirs.into_iter().take(drop) {
            index.ended.remove(&id);
            disk::remove_or_warn(&self.layout.receipt(&id));
        }
    }

    /// Withdraws `sender`'s waiting transfer `id`: its data is removed and
    /// its receipt record says withdrawn. Refused while it is being delivered.
    pub fn withdraw(
        &self,
        sender: &AgentName,
        id: &TransferId,
        now_unix: u64,
    ) -> Result<(), WithdrawError> {
        let mut index = lock(&self.index);
        match index.stored.get(id) {
            Some(s) if s.meta.from == *sender => {
                if s.delivery.is_some() {
                    return Err(WithdrawError::Delivering { id: *id });
                }
            }
            _ => return Err(WithdrawError::NotWaiting { id: *id }),
        }
        self.end(&mut index, id, End::Withdrawn, now_unix)?;
        Ok(())
    }

    /// `sender`'s stored transfers, waiting or ended less than the maximum
    /// age before `now_unix`, oldest first. One past its expiry that
    /// [`Mailbox::expire`] has not removed yet shows as expired.
    pub fn receipts(&self, sender: &AgentName, now_unix: u64) -> Vec<ReceiptRecord> {
        let keep = self.limits.max_age_secs();
        let index = lock(&self.index);
        let waiting = index
            .stored
            .values()
            .filter(|s| s.meta.from == *sender)
            .map(|s| waiting_record(&s.meta, now_unix));
        let ended = index
            .ended
            .iter()
            .filter(|(_, e)| e.from == *sender && now_unix < e.at.saturating_add(keep))
            .map(|(id, e)| e.record(*id));
        let mut records: Vec<ReceiptRecord> = waiting.chain(ended).collect();
        records.sort_by_key(|r| (r.stored_at, r.id));
        records
    }

    /// Housekeeping at `now_unix`: removes the transfers past their expiry
    /// (not those being delivered) with an expired receipt record, and the
    /// receipt records older than the maximum age. Returns what expired.
    pub fn expire(&self, now_unix: u64) -> Vec<StoredMeta> {
        let keep = self.limits.max_age_secs();
        let mut index = lock(&self.index);
        let mut due: Vec<(u64, TransferId)> = index
            .stored
            .values()
            .filter(|s| s.meta.expires <= now_unix && s.delivery.is_none())
            .map(|s| (s.meta.expires, s.meta.id))
            .collect();
        due.sort_unstable();
        let mut expired = Vec::new();
        for (expires, id) in due {
            match self.end(&mut index, &id, End::Expired, expires) {
                Ok(meta) => expired.push(meta),
                Err(e) => tracing::warn!(transfer = %id, error = %e, "mailbox: expiry postponed"),
            }
        }
        let layout = &self.layout;
        index.ended.retain(|id, e| {
            let kept = now_unix < e.at.saturating_add(keep);
            if !kept {
                disk::remove_or_warn(&layout.receipt(id));
            }
            kept
        });
        expired
    }
}
