//! The marker a broker holds on a stored transfer while it works on it — a
//! delivery, a withdrawal, an expiry: `d.<hex id>`, whose value names the
//! broker and this piece of work (`<broker id> <16 hex digits>`). Taken by a
//! `create`, or over one not rewritten for [`MARK_STALE`] seconds (its broker
//! died or lost the cluster) by an update at its revision; rewritten every
//! [`MARK_EVERY`] while held; released by removing it only if it is still
//! this holder's. A holder whose rewrite fails learns that it lost the
//! marker ([`Marker::lost`]) and must stop: another broker may take it a
//! minute later.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use keyferry_common::ids::TransferId;
use keyferry_common::io::task::AbortOnDrop;
use tokio::sync::watch;

use super::{SharedMailbox, hex_id, op, unix_now};
use crate::cluster::bounded;
use crate::mailbox::error::MailboxError;

/// How often a holder rewrites its marker.
const MARK_EVERY: Duration = Duration::from_secs(20);
/// A marker not rewritten for this many seconds is no longer its holder's.
pub(super) const MARK_STALE: i64 = 60;

fn marker_key(id: &TransferId) -> String {
    format!("d.{}", hex_id(id))
}

/// A marker this broker holds.
pub(super) struct Marker {
    shared: Arc<SharedMailbox>,
    key: String,
    value: Bytes,
    revision: Arc<AtomicU64>,
    lost: watch::Receiver<bool>,
    refresh: Option<AbortOnDrop>,
    released: bool,
}

impl SharedMailbox {
    /// Takes transfer `id`'s marker; `None` if another broker holds a fresh
    /// one, or took it first.
    pub(super) async fn claim(
        self: &Arc<Self>,
        id: &TransferId,
    ) -> Result<Option<Marker>, MailboxError> {
        let key = marker_key(id);
        let nonce: [u8; 8] = keyferry_common::crypto::random_array();
        let value = Bytes::from(format!("{} {}", self.broker, hex::encode(nonce)));
        let there = op("reading a marker", self.kv.entry(key.as_str())).await?;
        let live = there.as_ref().filter(|e| {
            e.operation == async_nats::jetstream::kv::Operation::Put && !e.value.is_empty()
        });
        let written = match live {
            Some(e) if unix_now() - e.created.unix_timestamp() < MARK_STALE => return Ok(None),
            Some(e) => {
                let update = self.kv.update(key.as_str(), value.clone(), e.revision);
                bounded("taking over a marker", update)
                    .await
                    .map_err(|e| e.to_string())
            }
            None => {
                let create = self.kv.create(key.as_str(), value.clone());
                bounded("taking a marker", create)
                    .await
                    .map_err(|e| e.to_string())
            }
        };
        // A write whose answer was lost is ours if the value is.
        let revision = match written {
            Ok(r) => r,
            Err(_) => match self.entry(&key).await? {
                Some(e) if e.value == value => e.revision,
                _ => return Ok(None),
            },
        };
        let revision = Arc::new(AtomicU64::new(revision));
        let (lose, lost) = watch::channel(false);
        let (kv, k, v, rev) = (
            self.kv.clone(),
            key.clone(),
            value.clone(),
            Arc::clone(&revision),
        );
        let refresh = AbortOnDrop(tokio::spawn(async move {
            loop {
                tokio::time::sleep(MARK_EVERY).await;
                let update = kv.update(k.as_str(), v.clone(), rev.load(Ordering::SeqCst));
                match op("refreshing a marker", update).await {
                    Ok(r) => rev.store(r, Ordering::SeqCst),
                    Err(e) => {
                        let kept = op("reading a marker", kv.entry(k.as_str())).await;
                        match kept {
                            Ok(Some(there)) if there.value == v => {
                                rev.store(there.revision, Ordering::SeqCst);
                            }
                            _ => {
                                tracing::warn!(error = %e, "mailbox: a marker was lost");
                                let _ = lose.send(true);
                                return;
                            }
                        }
                    }
                }
            }
        }));
        Ok(Some(Marker {
            shared: Arc::clone(self),
            key,
            value,
            revision,
            lost,
            refresh: Some(refresh),
            released: false,
        }))
    }

    /// Removes the marker `key` if it is still `value` at `revision`.
    async fn release_marker(&self, key: &str, value: &[u8], revision: u64) {
        match self.entry(key).await {
            Ok(Some(e)) if e.value == value && e.revision == revision => {
                if let Err(e) = self.purge(key).await {
                    tracing::debug!(error = %e, "mailbox: a marker left to go stale");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "mailbox: a marker left to go stale"),
        }
    }
}

impl Marker {
    /// Whether its rewrite failed: another broker may hold it soon.
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// Waits until it is lost (for ever if it never is).
    pub async fn lost(&self) {
        let mut lost = self.lost.clone();
        if lost.wait_for(|l| *l).await.is_err() {
            // The refresher ended without losing it: it is dropped.
            std::future::pending::<()>().await;
        }
    }

    /// Lets it go.
    pub async fn release(mut self) {
        self.refresh = None;
        self.released = true;
        let revision = self.revision.load(Ordering::SeqCst);
        self.shared
            .release_marker(&self.key, &self.value, revision)
            .await;
    }
}

impl Drop for Marker {
    fn drop(&mut self) {
        self.refresh = None;
        if self.released {
            return;
        }
        let (shared, key, value) = (
            Arc::clone(&self.shared),
            self.key.clone(),
            self.value.clone(),
        );
        let revision = self.revision.load(Ordering::SeqCst);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { shared.release_marker(&key, &value, revision).await });
        }
    }
}
