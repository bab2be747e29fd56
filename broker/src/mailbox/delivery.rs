//! Handing stored transfers to their receiver: what is waiting for whom, the
//! data read back, and the [`Delivering`] guard that keeps a transfer from
//! being withdrawn or expired while its receiver is being sent it.
//!
//! Only the guard can end a delivery with an outcome ([`Delivering::finish`]),
//! so a transfer cannot be marked delivered by a task that is not delivering
//! it.

use std::fs::File;
use std::sync::Arc;

use keyferry_common::ids::TransferId;
use keyferry_common::name::AgentName;
use keyferry_common::sync::lock;

use super::error::MailboxError;
use super::format::End;
use super::{Mailbox, Outcome, StoredMeta};

impl Mailbox {
    /// The committed transfers waiting for `receiver` and not expired at
    /// `now_unix`, oldest first (in the order they were committed). Those being
    /// delivered are listed too: [`Mailbox::begin_delivery`] decides.
    pub fn waiting_for(&self, receiver: &AgentName, now_unix: u64) -> Vec<StoredMeta> {
        let mut waiting: Vec<StoredMeta> = lock(&self.index)
            .stored
            .values()
            .filter(|s| s.meta.to == *receiver && now_unix < s.meta.expires)
            .map(|s| s.meta.clone())
            .collect();
        waiting.sort_by_key(|m| (m.order, m.id));
        waiting
    }

    /// The data of waiting transfer `id`, opened read-only.
    pub fn open_data(&self, id: &TransferId) -> Result<File, MailboxError> {
        if !lock(&self.index).stored.contains_key(id) {
            return Err(MailboxError::NotWaiting { id: *id });
        }
        let path = self.layout.data(id);
        // An open file stays readable even if the transfer is removed later.
        File::open(&path).map_err(|e| MailboxError::io(path, e))
    }

    /// Bytes of waiting transfer `id`'s data.
    pub fn data_len(&self, id: &TransferId) -> Result<u64, MailboxError> {
        lock(&self.index)
            .stored
            .get(id)
            .map(|s| s.len)
            .ok_or(MailboxError::NotWaiting { id: *id })
    }

    /// Marks waiting transfer `id` as being delivered; `None` if it is not
    /// waiting (never stored, ended) or is being delivered already.
    pub fn begin_delivery(self: &Arc<Self>, id: &TransferId) -> Option<Delivering> {
        let mut index = lock(&self.index);
        let token = index.next_delivery;
        index.next_delivery = token.wrapping_add(1);
        let stored = index.stored.get_mut(id)?;
        if stored.delivery.is_some() {
            return None;
        }
        stored.delivery = Some(token);
        Some(Delivering {
            mailbox: Arc::clone(self),
            meta: stored.meta.clone(),
            len: stored.len,
            token,
        })
    }
}

/// A stored transfer being delivered. Dropping it without
/// [`Delivering::finish`] leaves the transfer waiting, for a later delivery.
#[derive(Debug)]
pub struct Delivering {
    mailbox: Arc<Mailbox>,
    meta: StoredMeta,
    len: u64,
    token: u64,
}

impl Delivering {
    /// The transfer's metadata.
    pub fn meta(&self) -> &StoredMeta {
        &self.meta
    }

    /// Bytes of its data.
    pub fn data_len(&self) -> u64 {
        self.len
    }

    /// Its data, opened read-only.
    pub fn open_data(&self) -> Result<File, MailboxError> {
        self.mailbox.open_data(&self.meta.id)
    }

    /// Ends the delivery as the receiver answered: the receipt record is
    /// written durably for the sender (kept until `now_unix` plus the maximum
    /// age), then the data is removed. On an error nothing changed and the
    /// transfer stays waiting.
    pub fn finish(self, outcome: Outcome, now_unix: u64) -> Result<(), MailboxError> {
        let end = End::of(&self.meta.id, outcome)?;
        let mut index = lock(&self.mailbox.index);
        self.mailbox
            .end(&mut index, &self.meta.id, end, now_unix)
            .map(drop)
    }
}

impl Drop for Delivering {
    fn drop(&mut self) {
        let mut index = lock(&self.mailbox.index);
        if let Some(stored) = index.stored.get_mut(&self.meta.id)
            && stored.delivery == Some(self.token)
        {
            stored.delivery = None;
        }
    }
}
