//! Where a broker keeps its mailbox: on its own disk ([`Mailbox`], a
//! standalone broker) or in the cluster's JetStream ([`SharedMailbox`],
//! `--cluster`). [`Storage`] gives callers one async interface to either;
//! the disk's blocking calls run on tokio's blocking threads.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keyferry_common::ids::TransferId;
use keyferry_common::name::AgentName;
use tokio::io::{AsyncRead, AsyncReadExt as _};

use super::shared::{SharedDelivery, SharedMailbox, SharedUpload};
use super::{
    Delivering, Mailbox, MailboxError, MailboxLimits, Outcome, Prekey, ReceiptRecord, Refusal,
    StoredMeta, TakeError, Upload, UploadError, WithdrawError,
};

/// The broker's mailbox, wherever it lives. Cheap to clone.
#[derive(Clone)]
pub enum Storage {
    /// A standalone broker's, under its data dir.
    Disk(Arc<Mailbox>),
    /// A cluster's, in NATS JetStream.
    Shared(Arc<SharedMailbox>),
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Disk(_) => "Storage::Disk",
            Self::Shared(_) => "Storage::Shared",
        })
    }
}

/// Runs a blocking mailbox call off the async threads.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, MailboxError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| MailboxError::Shared(format!("a mailbox task failed: {e}")))
}

impl Storage {
    /// Its limits.
    pub fn limits(&self) -> &MailboxLimits {
        match self {
            Self::Disk(m) => m.limits(),
            Self::Shared(m) => m.limits(),
        }
    }

    /// How often to look for expired transfers: the disk's index is in
    /// memory; the cluster's is read over the network.
    pub fn sweep_every(&self) -> Duration {
        match self {
            Self::Disk(_) => Duration::from_secs(1),
            Self::Shared(_) => Duration::from_secs(5),
        }
    }

    /// How often a receiver's courier looks again for what waits for it,
    /// unwoken: `None` where every store wakes it (one broker's disk); in a
    /// cluster, where the news of a transfer stored through another broker
    /// ([`super::shared::STORED_SUBJECT`]) may be lost, now and then.
    pub fn poll_every(&self) -> Option<Duration> {
        match self {
            Self::Disk(_) => None,
            Self::Shared(_) => Some(Duration::from_secs(30)),
        }
    }

    /// Adds `receiver`'s bundles; the one-time bundles held after.
    pub async fn put_prekeys(
        &self,
        receiver: &AgentName,
        one_time: Vec<Vec<u8>>,
        last_resort: Option<Vec<u8>>,
    ) -> Result<u32, MailboxError> {
        match self {
            Self::Disk(m) => {
                let (m, r) = (Arc::clone(m), receiver.clone());
                blocking(move || m.put_prekeys(&r, one_time, last_resort)).await?
            }
            Self::Shared(m) => m.put_prekeys(receiver, one_time, last_resort).await,
        }
    }

    /// One-time bundles held for `receiver` (an error: the cluster cannot
    /// say, which is not "none").
    pub async fn prekey_count(&self, receiver: &AgentName) -> Result<u32, MailboxError> {
        match self {
            Self::Disk(m) => Ok(m.prekey_count(receiver)),
            Self::Shared(m) => m.prekey_count(receiver).await,
        }
    }

    /// `receiver`'s last-resort bundle, if it deposited one.
    pub async fn last_resort(&self, receiver: &AgentName) -> Result<Option<Vec<u8>>, MailboxError> {
        match self {
            Self::Disk(m) => Ok(m.last_resort(receiver)),
            Self::Shared(m) => m.last_resort(receiver).await,
        }
    }

    /// A bundle of `receiver`'s for `sender` (see [`Mailbox::take_prekey`]).
    pub async fn take_prekey(
        &self,
        sender: &AgentName,
        receiver: &AgentName,
        now: Instant,
    ) -> Result<Option<Prekey>, TakeError> {
        match self {
            Self::Disk(m) => {
                let (m, s, r) = (Arc::clone(m), sender.clone(), receiver.clone());
                blocking(move || m.take_prekey(&s, &r, now)).await?
            }
            Self::Shared(m) => m.take_prekey(sender, receiver, now).await,
        }
    }

    /// Keeps those of `receiver`'s one-time bundles for which `keep` holds.
    pub async fn retain_prekeys(
        &self,
        receiver: &AgentName,
        keep: impl Fn(&[u8]) -> bool + Send + 'static,
    ) -> Result<u32, MailboxError> {
        match self {
            Self::Disk(m) => {
                let (m, r) = (Arc::clone(m), receiver.clone());
                blocking(move || m.retain_prekeys(&r, keep)).await?
            }
            Self::Shared(m) => m.retain_prekeys(receiver, keep).await,
        }
    }

    /// Reserves room for `meta`'s transfer; refused before any byte if a
    /// limit would be exceeded or the id is known.
    pub async fn reserve(&self, meta: StoredMeta, now_unix: u64) -> Result<Sink, Refusal> {
        match self {
            Self::Disk(m) => {
                let m = Arc::clone(m);
                let upload = blocking(move || m.reserve(meta, now_unix)).await??;
                Ok(Sink::Disk(Some(upload)))
            }
            Self::Shared(m) => Ok(Sink::Shared(m.reserve(meta, now_unix).await?)),
        }
    }

    /// `sender`'s stored transfers, waiting or ended.
    pub async fn receipts(
        &self,
        sender: &AgentName,
        now_unix: u64,
    ) -> Result<Vec<ReceiptRecord>, MailboxError> {
        match self {
            Self::Disk(m) => {
                let (m, s) = (Arc::clone(m), sender.clone());
                blocking(move || m.receipts(&s, now_unix)).await
            }
            Self::Shared(m) => m.receipts(sender, now_unix).await,
        }
    }

    /// Withdraws `sender`'s waiting transfer `id`.
    pub async fn withdraw(
        &self,
        sender: &AgentName,
        id: &TransferId,
        now_unix: u64,
    ) -> Result<(), WithdrawError> {
        match self {
            Self::Disk(m) => {
                let (m, s, id) = (Arc::clone(m), sender.clone(), *id);
                blocking(move || m.withdraw(&s, &id, now_unix)).await?
            }
            Self::Shared(m) => m.withdraw(sender, id, now_unix).await,
        }
    }

    /// What waits for `receiver`, oldest first.
    pub async fn waiting_for(
        &self,
        receiver: &AgentName,
        now_unix: u64,
    ) -> Result<Vec<StoredMeta>, MailboxError> {
        match self {
            Self::Disk(m) => Ok(m.waiting_for(receiver, now_unix)),
            Self::Shared(m) => m.waiting_for(receiver, now_unix).await,
        }
    }

    /// Takes waiting transfer `meta` for delivery; `None` if it ended or is
    /// being delivered.
    pub async fn begin_delivery(&self, meta: &StoredMeta) -> Option<Handout> {
        match self {
            Self::Disk(m) => m.begin_delivery(&meta.id).map(Handout::Disk),
            Self::Shared(m) => m.begin_delivery(meta).await.map(Handout::Shared),
        }
    }

    /// Ends what expired by `now_unix`; what this broker ended.
    pub async fn expire(&self, now_unix: u64) -> Result<Vec<StoredMeta>, MailboxError> {
        match self {
            Self::Disk(m) => {
                let m = Arc::clone(m);
                blocking(move || m.expire(now_unix)).await
            }
            Self::Shared(m) => m.expire(now_unix).await,
        }
    }
}

/// An upload in progress, into either mailbox.
#[derive(Debug)]
pub enum Sink {
    /// Into the disk (`None` only while a blocking write holds it).
    Disk(Option<Upload>),
    /// Into the cluster.
    Shared(SharedUpload),
}

impl Sink {
    fn gone() -> UploadError {
        MailboxError::Shared("the upload is gone".into()).into()
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        match self {
            Self::Disk(u) => u.as_ref().map_or(0, Upload::written),
            Self::Shared(u) => u.written(),
        }
    }

    /// The most bytes it may hold in all.
    pub fn limit(&self) -> u64 {
        match self {
            Self::Disk(u) => u.as_ref().map_or(0, Upload::limit),
            Self::Shared(u) => u.limit(),
        }
    }

    /// Appends `bytes`; hands the buffer back (emptied) for reuse where it
    /// can.
    pub async fn write(&mut self, bytes: Vec<u8>) -> Result<Vec<u8>, UploadError> {
        match self {
            Self::Disk(slot) => {
                let mut up = slot.take().ok_or_else(Self::gone)?;
                let (up, mut bytes, written) = blocking(move || {
                    let written = up.write(&bytes);
                    (up, bytes, written)
                })
                .await?;
                *slot = Some(up);
                written?;
                bytes.clear();
                Ok(bytes)
            }
            Self::Shared(up) => {
                let mut bytes = up.write(bytes).await?;
                bytes.clear();
                Ok(bytes)
            }
        }
    }

    /// Makes the transfer stored and deliverable.
    pub async fn commit(self) -> Result<StoredMeta, UploadError> {
        match self {
            Self::Disk(slot) => {
                let up = slot.ok_or_else(Self::gone)?;
                blocking(move || up.commit()).await?
            }
            Self::Shared(up) => up.commit().await,
        }
    }
}

/// A stored transfer being delivered, from either mailbox.
#[derive(Debug)]
pub enum Handout {
    /// From the disk.
    Disk(Delivering),
    /// From the cluster.
    Shared(SharedDelivery),
}

impl Handout {
    /// The transfer's metadata.
    pub fn meta(&self) -> &StoredMeta {
        match self {
            Self::Disk(d) => d.meta(),
            Self::Shared(d) => d.meta(),
        }
    }

    /// Bytes of its data.
    pub fn data_len(&self) -> u64 {
        match self {
            Self::Disk(d) => d.data_len(),
            Self::Shared(d) => d.data_len(),
        }
    }

    /// Its data, to read from the start: at most [`Handout::data_len`]
    /// bytes.
    pub async fn open_data(&self) -> Result<Box<dyn AsyncRead + Send + Unpin>, MailboxError> {
        let len = self.data_len();
        match self {
            Self::Disk(d) => Ok(Box::new(
                tokio::fs::File::from_std(d.open_data()?).take(len),
            )),
            Self::Shared(d) => Ok(Box::new(d.open_data().await?.take(len))),
        }
    }

    /// Waits until the delivery must stop because another broker may take
    /// the transfer over (never, on one broker's disk).
    pub async fn lost(&self) {
        match self {
            Self::Disk(_) => std::future::pending().await,
            Self::Shared(d) => d.lost().await,
        }
    }

    /// Ends the delivery as the receiver answered.
    pub async fn finish(self, outcome: Outcome, now_unix: u64) -> Result<(), MailboxError> {
        match self {
            Self::Disk(d) => blocking(move || d.finish(outcome, now_unix)).await?,
            Self::Shared(d) => d.finish(outcome, now_unix).await,
        }
    }
}
