//! Receivers' prekey bundles in the cluster's mailbox: one `p.<hex name>`
//! entry per receiver, changed only by revision-checked writes, so that a
//! one-time bundle goes to one sender however many brokers are asked at
//! once. The fetch rate is counted here by each broker for its own
//! connections; the session counts it across the cluster as well
//! (`keyferry-rates`).

use std::time::Instant;

use async_nats::jetstream::kv::{self, CreateErrorKind, UpdateErrorKind};
use bytes::Bytes;
use keyferry_common::name::AgentName;
use keyferry_common::sync::lock;

use super::{SharedMailbox, TRIES, count_u32, hex_name, op, shared};
use crate::mailbox::error::{MailboxError, TakeError};
use crate::mailbox::format::Bundles;
use crate::mailbox::types::Prekey;

impl SharedMailbox {
    /// Applies `change` to `receiver`'s bundles as the cluster holds them,
    /// written back only if it changed them and only over the revision it
    /// read (read again on a lost race). Returns `change`'s result and the
    /// bundles now held.
    async fn change_prekeys<T>(
        &self,
        receiver: &AgentName,
        change: impl Fn(&mut Bundles) -> Result<T, MailboxError>,
    ) -> Result<(T, Bundles), MailboxError> {
        let key = format!("p.{}", hex_name(receiver));
        for _ in 0..TRIES {
            let entry = op("reading prekeys", self.kv.entry(key.as_str())).await?;
            let live = entry
                .as_ref()
                .filter(|e| e.operation == kv::Operation::Put && !e.value.is_empty());
            let held = match live {
                Some(e) => Bundles::decode(&e.value).unwrap_or_else(|| {
                    tracing::warn!(agent = %receiver, "mailbox: corrupt prekeys in the cluster dropped");
                    Bundles::default()
                }),
                None => Bundles::default(),
            };
            let mut next = held.clone();
            let out = change(&mut next)?;
            if next == held {
                return Ok((out, next));
            }
            let value = Bytes::from(next.encode());
            let written = match &entry {
                Some(e) => match self.kv.update(key.as_str(), value, e.revision).await {
                    Ok(_) => Ok(()),
                    Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => continue,
                    Err(e) => Err(shared("writing prekeys", e)),
                },
                None => match self.kv.create(key.as_str(), value).await {
                    Ok(_) => Ok(()),
                    Err(e) if e.kind() == CreateErrorKind::AlreadyExists => continue,
                    Err(e) => Err(shared("writing prekeys", e)),
                },
            };
            return written.map(|()| (out, next));
        }
        Err(MailboxError::Shared(format!(
            "{receiver}'s prekeys kept changing under this broker"
        )))
    }

    /// Adds `receiver`'s bundles, as [`super::Mailbox::put_prekeys`].
    pub async fn put_prekeys(
        &self,
        receiver: &AgentName,
        one_time: Vec<Vec<u8>>,
        last_resort: Option<Vec<u8>>,
    ) -> Result<u32, MailboxError> {
        let (_, held) = self
            .change_prekeys(receiver, |b| b.add(one_time.clone(), last_resort.clone()))
            .await?;
        Ok(count_u32(held.one_time.len()))
    }

    /// `receiver`'s bundles as held now (a corrupt entry counts as none).
    async fn bundles(&self, receiver: &AgentName) -> Result<Bundles, MailboxError> {
        let key = format!("p.{}", hex_name(receiver));
        Ok(match self.entry(&key).await? {
            Some(e) => Bundles::decode(&e.value).unwrap_or_default(),
            None => Bundles::default(),
        })
    }

    /// One-time bundles held for `receiver`.
    pub async fn prekey_count(&self, receiver: &AgentName) -> Result<u32, MailboxError> {
        Ok(count_u32(self.bundles(receiver).await?.one_time.len()))
    }

    /// `receiver`'s last-resort bundle, if it deposited one.
    pub async fn last_resort(&self, receiver: &AgentName) -> Result<Option<Vec<u8>>, MailboxError> {
        Ok(self.bundles(receiver).await?.last_resort)
    }

    /// A bundle of `receiver`'s for `sender`, as
    /// [`super::Mailbox::take_prekey`]; the fetch rate is counted here by
    /// this broker (the session counts it across the cluster before).
    pub async fn take_prekey(
        &self,
        sender: &AgentName,
        receiver: &AgentName,
        now: Instant,
    ) -> Result<Option<Prekey>, TakeError> {
        let per_minute = self.limits.fetches_per_minute;
        lock(&self.local).fetches.charge(sender, now, per_minute)?;
        let (taken, _) = self
            .change_prekeys(receiver, |b| Ok(b.take()))
            .await
            .map_err(TakeError::Storage)?;
        Ok(taken)
    }

    /// Keeps those of `receiver`'s one-time bundles for which `keep` holds.
    pub async fn retain_prekeys(
        &self,
        receiver: &AgentName,
        keep: impl Fn(&[u8]) -> bool,
    ) -> Result<u32, MailboxError> {
        let (_, held) = self
            .change_prekeys(receiver, |b| {
                b.one_time.retain(|x| keep(x));
                Ok(())
            })
            .await?;
        Ok(count_u32(held.one_time.len()))
    }
}
