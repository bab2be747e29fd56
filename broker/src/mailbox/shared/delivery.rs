//! The cluster mailbox's transfers after their upload: what waits for a
//! receiver, a delivery and its marker, the ends (delivered, refused,
//! withdrawn, expired) and the receipt records a sender reads.
//!
//! A broker delivering a transfer holds its `d.` key, rewritten every
//! [`MARK_EVERY`]; a marker not rewritten for [`MARK_STALE`] belongs to a
//! broker that died or lost its cluster and is taken over. While a fresh one
//! stands, no other broker delivers, withdraws or expires the transfer.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::object_store::Object;
use keyferry_common::ids::TransferId;
use keyferry_common::io::task::AbortOnDrop;
use keyferry_common::name::AgentName;

use super::{SharedMailbox, hex_id, hex_name, id_in, op, unix_now};
use crate::mailbox::ending::MAX_ENDED_PER_SENDER;
use crate::mailbox::error::{MailboxError, WithdrawError};
use crate::mailbox::format::{End, Ended, MetaFile, waiting_record};
use crate::mailbox::types::{Outcome, ReceiptRecord, StoredMeta};

/// How often a delivering broker rewrites its marker.
const MARK_EVERY: Duration = Duration::from_secs(20);
/// A marker older than this is another broker's no longer.
const MARK_STALE: i64 = 60;

fn waiting_key(meta: &StoredMeta) -> String {
    format!("w.{}.{}", hex_name(&meta.to), hex_id(&meta.id))
}

fn marker_key(id: &TransferId) -> String {
    format!("d.{}", hex_id(id))
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
            .filter(|m| now_unix < m.expires)
            .collect();
        waiting.sort_by_key(|m| (m.order, m.id));
        Ok(waiting)
    }

    /// Whether a broker other than a dead one is delivering `id` now.
    async fn delivering(&self, id: &TransferId) -> Result<bool, MailboxError> {
        let marker = self.entry(&marker_key(id)).await?;
        Ok(marker.is_some_and(|e| unix_now() - e.created.unix_timestamp() < MARK_STALE))
    }

    /// Takes waiting transfer `meta` for delivery by this broker; `None` if
    /// it ended, or another broker is delivering it.
    pub async fn begin_delivery(self: &Arc<Self>, meta: &StoredMeta) -> Option<SharedDelivery> {
        let record = self.entry(&waiting_key(meta)).await.ok()??;
        let (meta, len) = MetaFile::decode(&record.value, &meta.id)?;
        let key = marker_key(&meta.id);
        let marker = op("reading a marker", self.kv.entry(key.as_str()))
            .await
            .ok()?;
        let mine = bytes::Bytes::from(self.broker.clone());
        let revision = match marker {
            Some(e)
                if e.operation == async_nats::jetstream::kv::Operation::Put
                    && !e.value.is_empty() =>
            {
                if unix_now() - e.created.unix_timestamp() < MARK_STALE {
                    return None;
                }
                let update = self.kv.update(key.as_str(), mine.clone(), e.revision);
                op("taking over a marker", update).await.ok()?
            }
            _ => op(
                "writing a marker",
                self.kv.create(key.as_str(), mine.clone()),
            )
            .await
            .ok()?,
        };
        let kv = self.kv.clone();
        let refresh = AbortOnDrop(tokio::spawn(async move {
            let mut revision = revision;
            loop {
                tokio::time::sleep(MARK_EVERY).await;
                let update = kv.update(key.as_str(), mine.clone(), revision);
                match op("refreshing a marker", update).await {
                    Ok(r) => revision = r,
                    Err(e) => {
                        tracing::warn!(error = %e, "mailbox: delivery marker lost");
                        return;
                    }
                }
            }
        }));
        Some(SharedDelivery {
            shared: Arc::clone(self),
            meta,
            len,
            refresh: Some(refresh),
        })
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
        let key = format!("e.{}.{}", hex_name(&meta.from), hex_id(&meta.id));
        let first = self.create(&key, ended.encode(&meta.id)).await?;
        // Ended: what follows is cleanup, which the next end or sweep redoes.
        if let Err(e) = self.purge(&waiting_key(meta)).await {
            tracing::warn!(transfer = %meta.id, error = %e, "mailbox: cleanup postponed");
        }
        self.drop_object(&meta.id).await;
        Ok(first)
    }

    /// Withdraws `sender`'s waiting transfer `id`, unless a broker is
    /// delivering it.
    pub async fn withdraw(
        &self,
        sender: &AgentName,
        id: &TransferId,
        now_unix: u64,
    ) -> Result<(), WithdrawError> {
        let found = self.waiting(&format!("*.{}", hex_id(id))).await?;
        let Some((meta, _)) = found.into_iter().find(|(m, _)| m.from == *sender) else {
            return Err(WithdrawError::NotWaiting { id: *id });
        };
        if self.delivering(id).await? {
            return Err(WithdrawError::Delivering { id: *id });
        }
        if self.end(&meta, End::Withdrawn, now_unix).await? {
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
    pub async fn expire(&self, now_unix: u64) -> Result<Vec<StoredMeta>, MailboxError> {
        let mut expired = Vec::new();
        for (meta, _) in self.waiting(">").await? {
            if meta.expires > now_unix || self.delivering(&meta.id).await? {
                continue;
            }
            if self.end(&meta, End::Expired, meta.expires).await? {
                expired.push(meta);
            }
        }
        let keep = self.limits.max_age.as_secs();
        let mut by_sender: std::collections::HashMap<String, Vec<(u64, String)>> =
            std::collections::HashMap::new();
        for s in self.scan("e.>").await? {
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
    refresh: Option<AbortOnDrop>,
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

    /// Ends the delivery as the receiver answered: the record first, then
    /// the data; on an error the transfer stays waiting.
    pub async fn finish(mut self, outcome: Outcome, now_unix: u64) -> Result<(), MailboxError> {
        let end = End::of(&self.meta.id, outcome)?;
        self.refresh = None;
        if !self.shared.end(&self.meta, end, now_unix).await? {
            return Err(MailboxError::NotWaiting { id: self.meta.id });
        }
        Ok(())
    }
}

impl Drop for SharedDelivery {
    fn drop(&mut self) {
        self.refresh = None;
        let (shared, key) = (Arc::clone(&self.shared), marker_key(&self.meta.id));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = shared.purge(&key).await;
            });
        }
    }
}
