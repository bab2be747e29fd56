//! The cluster mailbox's transfers after their upload: what waits for a
//! receiver, a delivery and its marker, the ends (delivered, refused,
//! withdrawn, expired) and the receipt records a sender reads.
//!
//! A broker works on a transfer — delivers, withdraws or expires it — only
//! under its marker ([`super::marker`]), so never two at once; a delivery
//! whose marker is lost stops. Every end creates the transfer's `e.` record
//! first; a `w.` key found beside one is cleaned up, never offered.

use std::sync::Arc;

use async_nats::jetstream::object_store::Object;
use keyferry_common::ids::TransferId;
use keyferry_common::name::AgentName;

use super::marker::Marker;
use super::{SharedMailbox, hex_id, hex_name, id_in, op};
use crate::mailbox::ending::MAX_ENDED_PER_SENDER;
use crate::mailbox::error::{MailboxError, WithdrawError};
use crate::mailbox::format::{End, Ended, MetaFile, waiting_record};
use crate::mailbox::types::{Outcome, ReceiptRecord, StoredMeta};

fn waiting_key(meta: &StoredMeta) -> String {
    format!("w.{}.{}", hex_name(&meta.to), hex_id(&meta.id))
}

fn ended_key(meta: &StoredMeta) -> String {
    format!("e.{}.{}", hex_name(&meta.from), hex_id(&meta.id))
}

impl SharedMailbox {
    /// Every waiting transfer matching `filter` (below `w.`), with its length.
    async fn waiting(&self, filter: &str) -> Result<Vec<(StoredMeta, u64)>, MailboxError> {
        let found = self.scan(&format!("w.{filter}")).await?;
        Ok(found
            .iter()
            .filter_map(|s| MetaFile::decode(&s.value, &id_in(&s.key)?))
            .collect())
    }

    /// The transfers waiting for `receiver`, not expired at `now_unix`,
    /// oldest first.
    pub async fn waiting_for(
        &self,
        receiver: &AgentName,
        now_unix: u64,
    ) -> Result<Vec<StoredMeta>, MailboxError> {
        let mut waiting: Vec<StoredMeta> = self
            .waiting(&format!("{}.*", hex_name(receiver)))
            .await?
            .into_iter()
            .map(|(m, _)| m)
            .filter(|m| m.to == *receiver && now_unix < m.expires)
            .collect();
        waiting.sort_by_key(|m| (m.order, m.id));
        Ok(waiting)
    }

    /// Takes waiting transfer `meta` for delivery by this broker; `None` if
    /// it ended, or another broker is working on it. One whose end was
    /// recorded but not cleaned up (a broker lost the cluster half way) is
    /// cleaned up now instead.
    pub async fn begin_delivery(self: &Arc<Self>, meta: &StoredMeta) -> Option<SharedDelivery> {
        let marker = self.claim(&meta.id).await.ok()??;
        // Read again under the marker: an end may have come since the list.
        let record = match self.entry(&waiting_key(meta)).await {
            Ok(Some(record)) => record,
            _ => {
                marker.release().await;
                return None;
            }
        };
        let Some((meta, len)) = MetaFile::decode(&record.value, &meta.id) else {
            marker.release().await;
            return None;
        };
        match self.entry(&ended_key(&meta)).await {
            Ok(None) => {}
            Ok(Some(_)) => {
                self.clean_up(&meta).await;
                marker.release().await;
                return None;
            }
            // Not known now: left as it is, for a later look.
            Err(_) => {
                marker.release().await;
                return None;
            }
        }
        Some(SharedDelivery {
            shared: Arc::clone(self),
            meta,
            len,
            marker: Some(marker),
        })
    }

    /// Removes an ended transfer's `w.` key and object (again).
    async fn clean_up(&self, meta: &StoredMeta) {
        if let Err(e) = self.purge(&waiting_key(meta)).await {
            tracing::warn!(transfer = %meta.id, error = %e, "mailbox: cleanup postponed");
        }
        self.drop_object(&meta.id).await;
    }

    /// Ends waiting transfer `meta` with `end` at `at`: its `e.` record is
    /// created (the step that decides; `false` if another broker ended it
    /// first), then its `w.` key and object go.
    async fn end(&self, meta: &StoredMeta, end: End, at: u64) -> Result<bool, MailboxError> {
        let ended = Ended {
            from: meta.from.clone(),
            to: meta.to.clone(),
            size: meta.size,
            stored_at: meta.stored_at,
            end,
            at,
        };
        let first = self
            .create(&ended_key(meta), ended.encode(&meta.id))
            .await?;
        // Ended: what follows is cleanup, which the next delivery attempt or
        // sweep redoes.
        self.clean_up(meta).await;
        Ok(first)
    }

    /// Withdraws `sender`'s waiting transfer `id`, unless a broker is
    /// delivering it.
    pub async fn withdraw(
        self: &Arc<Self>,
        sender: &AgentName,
        id: &TransferId,
        now_unix: u64,
    ) -> Result<(), WithdrawError> {
        let found = self.waiting(&format!("*.{}", hex_id(id))).await?;
        let Some((meta, _)) = found.into_iter().find(|(m, _)| m.from == *sender) else {
            return Err(WithdrawError::NotWaiting { id: *id });
        };
        // Under the transfer's marker, as a delivery: never both at once.
        let Some(marker) = self.claim(id).await? else {
            return Err(WithdrawError::Delivering { id: *id });
        };
        let ended = self.end(&meta, End::Withdrawn, now_unix).await;
        marker.release().await;
        if ended? {
            Ok(())
        } else {
            Err(WithdrawError::NotWaiting { id: *id })
        }
    }

    /// `sender`'s stored transfers, waiting or ended less than the maximum
    /// age before `now_unix`, oldest first.
    pub async fn receipts(
        &self,
        sender: &AgentName,
        now_unix: u64,
    ) -> Result<Vec<ReceiptRecord>, MailboxError> {
        let keep = self.limits.max_age.as_secs();
        let waiting = self.waiting(">").await?;
        let ended = self.scan(&format!("e.{}.*", hex_name(sender))).await?;
        let waiting = waiting
            .into_iter()
            .filter(|(m, _)| m.from == *sender)
            .map(|(m, _)| waiting_record(&m, now_unix));
        let ended = ended.iter().filter_map(|s| {
            let id = id_in(&s.key)?;
            let e = Ended::decode(&s.value, &id)?;
            (e.from == *sender && now_unix < e.at.saturating_add(keep)).then(|| e.record(id))
        });
        // An ended record wins over a `w.` key its end has not removed yet
        // (the sort is stable; the ended come first).
        let mut records: Vec<ReceiptRecord> = ended.chain(waiting).collect();
        records.sort_by_key(|r| (r.stored_at, r.id));
        records.dedup_by_key(|r| r.id);
        Ok(records)
    }

    /// Housekeeping at `now_unix`, as [`crate::mailbox::Mailbox::expire`]:
    /// transfers past their expiry that no broker is delivering end as
    /// expired; records older than the maximum age, and a sender's beyond
    /// its newest [`MAX_ENDED_PER_SENDER`], go. Returns what this broker
    /// expired.
    pub async fn expire(self: &Arc<Self>, now_unix: u64) -> Result<Vec<StoredMeta>, MailboxError> {
        let mut expired = Vec::new();
        let waiting = self.waiting(">").await?;
        let ended = self.scan("e.>").await?;
        let ended_ids: std::collections::HashSet<TransferId> =
            ended.iter().filter_map(|s| id_in(&s.key)).collect();
        for (meta, _) in waiting {
            if ended_ids.contains(&meta.id) {
                // Ended, not cleaned up: done now.
                self.clean_up(&meta).await;
                continue;
            }
            if meta.expires > now_unix {
                continue;
            }
            // Under its marker: not while a broker delivers it.
            let Some(marker) = self.claim(&meta.id).await? else {
                continue;
            };
            let ended = self.end(&meta, End::Expired, meta.expires).await;
            marker.release().await;
            if ended? {
                expired.push(meta);
            }
        }
        let keep = self.limits.max_age.as_secs();
        let mut by_sender: std::collections::HashMap<String, Vec<(u64, String)>> =
            std::collections::HashMap::new();
        for s in ended {
            let Some(e) = id_in(&s.key).and_then(|id| Ended::decode(&s.value, &id)) else {
                self.purge(&s.key).await?;
                continue;
            };
            if now_unix >= e.at.saturating_add(keep) {
                self.purge(&s.key).await?;
            } else {
                by_sender
                    .entry(e.from.as_str().to_owned())
                    .or_default()
                    .push((e.at, s.key));
            }
        }
        for (_, mut records) in by_sender {
            if records.len() > MAX_ENDED_PER_SENDER {
                records.sort_unstable();
                let extra = records.len() - MAX_ENDED_PER_SENDER;
                for (_, key) in records.into_iter().take(extra) {
                    self.purge(&key).await?;
                }
            }
        }
        Ok(expired)
    }
}

/// A stored transfer this broker is delivering. Dropping it without
/// [`SharedDelivery::finish`] leaves the transfer waiting (its marker is
/// removed, or goes stale).
pub struct SharedDelivery {
    shared: Arc<SharedMailbox>,
    meta: StoredMeta,
    len: u64,
    marker: Option<Marker>,
}

impl std::fmt::Debug for SharedDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedDelivery")
            .field("id", &self.meta.id)
            .finish_non_exhaustive()
    }
}

impl SharedDelivery {
    /// The transfer's metadata.
    pub fn meta(&self) -> &StoredMeta {
        &self.meta
    }

    /// Bytes of its data.
    pub fn data_len(&self) -> u64 {
        self.len
    }

    /// Its data, read from the object store.
    pub async fn open_data(&self) -> Result<Object, MailboxError> {
        let name = hex_id(&self.meta.id);
        op("reading a stored transfer", self.shared.objects.get(&name)).await
    }

    /// Waits until this broker lost the transfer's marker (for ever if it
    /// never does): the delivery must stop, another broker may take over.
    pub async fn lost(&self) {
        match &self.marker {
            Some(m) => m.lost().await,
            None => std::future::pending().await,
        }
    }

    /// Ends the delivery as the receiver answered: the record first, then
    /// the data; on an error (the marker lost included) the transfer stays
    /// waiting.
    pub async fn finish(mut self, outcome: Outcome, now_unix: u64) -> Result<(), MailboxError> {
        let end = End::of(&self.meta.id, outcome)?;
        let marker = self.marker.take();
        if marker.as_ref().is_none_or(Marker::is_lost) {
            return Err(MailboxError::Shared(format!(
                "transfer {}: this broker lost its delivery marker",
                self.meta.id
            )));
        }
        let ended = self.shared.end(&self.meta, end, now_unix).await;
        if let Some(m) = marker {
            m.release().await;
        }
        if !ended? {
            return Err(MailboxError::NotWaiting { id: self.meta.id });
        }
        Ok(())
    }
}
