//! Storing one transfer in the cluster: the reservation (the limits checked
//! against every transfer the cluster holds and this broker's uploads in
//! progress), the data streamed into the object store as it arrives, and the
//! commit — the `w.` key, written only once the object is whole.
//!
//! The object store reads the upload from a channel that ends cleanly only
//! when [`SharedUpload::commit`] says so: an upload dropped half way ends it
//! with an error, so the object store never completes a partial object.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_nats::jetstream::object_store::ObjectMetadata;
use keyferry_common::ids::TransferId;
use keyferry_common::sync::lock;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::mpsc;

use super::{STORED_SUBJECT, SharedMailbox, hex_id, hex_name, id_in, op};
use crate::mailbox::Reserved;
use crate::mailbox::error::{MailboxError, Refusal, UploadError};
use crate::mailbox::format::{MetaFile, stamp};
use crate::mailbox::limits::{admit, max_upload};
use crate::mailbox::types::StoredMeta;

/// Bytes the object store publishes at once (below NATS' 1 MiB payload).
const CHUNK: usize = 512 << 10;

/// What the upload hands the object store.
enum Piece {
    Data(Vec<u8>),
    /// The upload is whole: end of data.
    End,
}

/// The object store's side of the channel: data, then a clean end only
/// after [`Piece::End`]; a channel closed without it is an error.
struct PieceReader {
    rx: mpsc::Receiver<Piece>,
    current: Vec<u8>,
    at: usize,
    ended: bool,
}

impl AsyncRead for PieceReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        while this.at == this.current.len() {
            if this.ended {
                return Poll::Ready(Ok(()));
            }
            match this.rx.poll_recv(cx) {
                Poll::Ready(Some(Piece::Data(d))) => (this.current, this.at) = (d, 0),
                Poll::Ready(Some(Piece::End)) => this.ended = true,
                Poll::Ready(None) => {
                    return Poll::Ready(Err(std::io::Error::other("the upload was abandoned")));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        let n = buf.remaining().min(this.current.len() - this.at);
        buf.put_slice(&this.current[this.at..this.at + n]);
        this.at += n;
        Poll::Ready(Ok(()))
    }
}

impl SharedMailbox {
    /// Reserves room for `meta`'s transfer (its `stored_at` and `expires`
    /// set from `now_unix`) and starts its object. Refused, before any
    /// byte, if the cluster knows the id or a limit would be exceeded.
    pub async fn reserve(
        self: &Arc<Self>,
        mut meta: StoredMeta,
        now_unix: u64,
    ) -> Result<SharedUpload, Refusal> {
        stamp(&mut meta, now_unix, self.limits.max_age.as_secs())?;
        let id = meta.id;
        let waiting = self.scan("w.>").await?;
        let ended = self.scan(&format!("e.*.{}", hex_id(&id))).await?;
        let stored: Vec<(StoredMeta, u64)> = waiting
            .iter()
            .filter_map(|s| MetaFile::decode(&s.value, &id_in(&s.key)?))
            .collect();
        let charge = max_upload(meta.size);
        {
            let mut local = lock(&self.local);
            let known = stored.iter().any(|(m, _)| m.id == id)
                || !ended.is_empty()
                || local.reserved.contains_key(&id);
            if known {
                return Err(Refusal::Duplicate { id });
            }
            let charges = stored
                .iter()
                .map(|(m, len)| (&m.from, &m.to, *len))
                .chain(local.reserved.values().map(|r| (&r.from, &r.to, r.charge)));
            admit(&self.limits, charges, &meta, charge)?;
            let reserved = Reserved {
                from: meta.from.clone(),
                to: meta.to.clone(),
                charge,
            };
            local.reserved.insert(id, reserved);
        }
        let (tx, rx) = mpsc::channel(2);
        let objects = self.objects.clone();
        let name = hex_id(&id);
        let put = tokio::spawn(async move {
            let mut reader = PieceReader {
                rx,
                current: Vec::new(),
                at: 0,
                ended: false,
            };
            let object = ObjectMetadata {
                name,
                chunk_size: Some(CHUNK),
                ..Default::default()
            };
            objects
                .put(object, &mut reader)
                .await
                .map(|info| info.size as u64)
                .map_err(|e| e.to_string())
        });
        Ok(SharedUpload {
            shared: Arc::clone(self),
            meta,
            tx: Some(tx),
            put: Some(put),
            written: 0,
            limit: charge,
            committed: false,
        })
    }
}

/// One transfer being uploaded into the cluster's mailbox. Dropping it
/// without [`SharedUpload::commit`] abandons the object and frees the
/// reservation.
pub struct SharedUpload {
    shared: Arc<SharedMailbox>,
    meta: StoredMeta,
    tx: Option<mpsc::Sender<Piece>>,
    put: Option<tokio::task::JoinHandle<Result<u64, String>>>,
    written: u64,
    limit: u64,
    committed: bool,
}

impl std::fmt::Debug for SharedUpload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedUpload")
            .field("id", &self.meta.id)
            .field("written", &self.written)
            .finish_non_exhaustive()
    }
}

impl SharedUpload {
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The most bytes it may hold in all.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Why the object store stopped taking data.
    async fn failure(&mut self) -> UploadError {
        let why = match self.put.take() {
            Some(put) => match put.await {
                Ok(Err(e)) => e,
                Ok(Ok(_)) => "the object ended early".into(),
                Err(e) => e.to_string(),
            },
            None => "the object store is gone".into(),
        };
        MailboxError::Shared(format!("storing transfer {}: {why}", self.meta.id)).into()
    }

    /// Appends `bytes` (past the limit, nothing is written and
    /// [`UploadError::TooLong`] is returned).
    pub async fn write(&mut self, bytes: Vec<u8>) -> Result<(), UploadError> {
        let total = (bytes.len() as u64).saturating_add(self.written);
        if total > self.limit {
            return Err(UploadError::TooLong {
                id: self.meta.id,
                limit: self.limit,
            });
        }
        let sent = match &self.tx {
            Some(tx) => tx.send(Piece::Data(bytes)).await.is_ok(),
            None => false,
        };
        if !sent {
            return Err(self.failure().await);
        }
        self.written = total;
        Ok(())
    }

    /// Ends the object, then writes the transfer's `w.` key: from then on
    /// it is stored, and offered to its receiver by any broker.
    pub async fn commit(mut self) -> Result<StoredMeta, UploadError> {
        let id = self.meta.id;
        let ended = self.tx.as_ref().map(|tx| tx.try_send(Piece::End));
        if !matches!(ended, Some(Ok(()))) {
            // The channel is full only if the store stopped reading.
            let sent = match self.tx.as_ref() {
                Some(tx) => tx.send(Piece::End).await.is_ok(),
                None => false,
            };
            if !sent {
                return Err(self.failure().await);
            }
        }
        self.tx = None;
        let size = match self.put.take() {
            Some(put) => put
                .await
                .map_err(|e| MailboxError::Shared(e.to_string()))?
                .map_err(|e| MailboxError::Shared(format!("storing transfer {id}: {e}")))?,
            None => return Err(MailboxError::Shared("the object store is gone".into()).into()),
        };
        let shared = Arc::clone(&self.shared);
        if size != self.written {
            shared.drop_object(&id).await;
            let why = format!("transfer {id}: {size} bytes stored of {}", self.written);
            return Err(MailboxError::Shared(why).into());
        }
        {
            let mut local = lock(&shared.local);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
            self.meta.order = now.max(local.last_order.saturating_add(1));
            local.last_order = self.meta.order;
        }
        let key = format!("w.{}.{}", hex_name(&self.meta.to), hex_id(&id));
        let record = MetaFile::encode(&self.meta, self.written);
        // The commit point.
        match shared.create(&key, record).await {
            Ok(true) => {}
            Ok(false) => {
                return Err(
                    MailboxError::Shared(format!("transfer {id} is stored already")).into(),
                );
            }
            Err(e) => {
                shared.drop_object(&id).await;
                return Err(e.into());
            }
        }
        lock(&shared.local).reserved.remove(&id);
        self.committed = true;
        // Stored: the receiver's broker may offer it now (if this is lost,
        // its next look finds it).
        let news = shared
            .client
            .publish(STORED_SUBJECT, self.meta.to.as_str().to_owned().into());
        if let Err(e) = op("announcing a stored transfer", news).await {
            tracing::debug!(transfer = %id, error = %e, "mailbox: not announced");
        }
        Ok(self.meta.clone())
    }
}

impl Drop for SharedUpload {
    fn drop(&mut self) {
        // Stop the object store first, then close its channel without an
        // end: whichever it sees, it cannot complete the object.
        if let Some(put) = self.put.take() {
            put.abort();
        }
        self.tx = None;
        if !self.committed {
            lock(&self.shared.local).reserved.remove(&self.meta.id);
        }
    }
}

impl SharedMailbox {
    /// Deletes transfer `id`'s object, if there is one (a failure is logged:
    /// the object store's maximum age removes it in the end).
    pub(super) async fn drop_object(&self, id: &TransferId) {
        let name = hex_id(id);
        if let Err(e) = op("deleting an object", self.objects.delete(&name)).await {
            tracing::debug!(transfer = %id, error = %e, "mailbox: object not deleted");
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt as _;

    use super::*;

    fn reader() -> (mpsc::Sender<Piece>, PieceReader) {
        let (tx, rx) = mpsc::channel(4);
        let reader = PieceReader {
            rx,
            current: Vec::new(),
            at: 0,
            ended: false,
        };
        (tx, reader)
    }

    #[tokio::test]
    async fn the_object_store_sees_an_end_only_when_the_upload_says_so() {
        let (tx, mut r) = reader();
        tx.send(Piece::Data(b"sealed ".to_vec())).await.unwrap();
        tx.send(Piece::Data(b"frames".to_vec())).await.unwrap();
        tx.send(Piece::End).await.unwrap();
        drop(tx);
        let mut all = Vec::new();
        r.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"sealed frames");
    }

    #[tokio::test]
    async fn an_upload_dropped_half_way_is_an_error_not_an_end() {
        let (tx, mut r) = reader();
        tx.send(Piece::Data(b"half".to_vec())).await.unwrap();
        drop(tx);
        let mut all = Vec::new();
        let err = r.read_to_end(&mut all).await.unwrap_err();
        assert!(err.to_string().contains("abandoned"), "{err}");
        assert_eq!(all, b"half");
    }
}
