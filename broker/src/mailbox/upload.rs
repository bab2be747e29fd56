//! Storing one transfer: the reservation (every limit checked before a byte
//! is written), the upload into `<id>.part`, and its commit.
//!
//! The commit makes the metadata durable (`<id>.meta`, written atomically),
//! fsyncs the data, and renames `<id>.part` to `<id>.data`: that rename is
//! the commit point. Before it, a crash leaves nothing deliverable (a `.part`,
//! perhaps a `.meta` alone, both removed at open); after it, the whole
//! transfer. An [`Upload`] dropped without a commit removes its files and
//! frees its reservation.

use std::fs::{self, File};
use std::io::{BufWriter, Write as _};
use std::sync::Arc;

use keyferry_common::sync::lock;

use super::disk::{self, Layout};
use super::error::{MailboxError, Refusal, UploadError};
use super::format::{MetaFile, stamp};
use super::limits::{admit, max_upload};
use super::{Index, Mailbox, Reserved, Stored, StoredMeta};

/// Bytes buffered before they are written to the file.
const BUFFER: usize = 256 << 10;

impl Mailbox {
    /// Reserves room for `meta`'s transfer (its `stored_at` and `expires` are
    /// set here, from `now_unix` and the maximum age) and creates its upload
    /// file. Refused, before any byte, if the id is known or a limit would be
    /// exceeded; see [`Refusal`].
    pub fn reserve(
        self: &Arc<Self>,
        mut meta: StoredMeta,
        now_unix: u64,
    ) -> Result<Upload, Refusal> {
        stamp(&mut meta, now_unix, self.limits.max_age_secs())?;
        let charge = max_upload(meta.size);
        {
            let mut index = lock(&self.index);
            self.admit(&index, &meta, charge)?;
            let reserved = Reserved {
                from: meta.from.clone(),
                to: meta.to.clone(),
                charge,
            };
            index.reserved.insert(meta.id, reserved);
        }
        let file = match disk::create_new(&self.layout.part(&meta.id)) {
            Ok(file) => file,
            Err(e) => {
                lock(&self.index).reserved.remove(&meta.id);
                return Err(e.into());
            }
        };
        Ok(Upload {
            mailbox: Arc::clone(self),
            meta,
            file: BufWriter::with_capacity(BUFFER, file),
            written: 0,
            limit: charge,
            committed: false,
        })
    }

    /// Whether a transfer `meta` that counts `needed` bytes fits.
    fn admit(&self, index: &Index, meta: &StoredMeta, needed: u64) -> Result<(), Refusal> {
        let id = meta.id;
        if index.stored.contains_key(&id)
            || index.reserved.contains_key(&id)
            || index.ended.contains_key(&id)
        {
            return Err(Refusal::Duplicate { id });
        }
        admit(&self.limits, index.charges(), meta, needed)
    }
}

/// One transfer being uploaded into the mailbox. Owned, so that it can live
/// in a task; dropping it without [`Upload::commit`] removes what was written
/// and frees its reservation.
#[derive(Debug)]
pub struct Upload {
    mailbox: Arc<Mailbox>,
    meta: StoredMeta,
    file: BufWriter<File>,
    written: u64,
    limit: u64,
    committed: bool,
}

impl Upload {
    /// The transfer's metadata (with `stored_at` and `expires` set).
    pub fn meta(&self) -> &StoredMeta {
        &self.meta
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The most bytes it may hold in all ([`max_upload`] of its size).
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Appends `bytes`. Past [`max_upload`] of the announced size in all,
    /// nothing is written and [`UploadError::TooLong`] is returned.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), UploadError> {
        let total = u64::try_from(bytes.len())
            .unwrap_or(u64::MAX)
            .saturating_add(self.written);
        if total > self.limit {
            return Err(UploadError::TooLong {
                id: self.meta.id,
                limit: self.limit,
            });
        }
        self.file
            .write_all(bytes)
            .map_err(|e| MailboxError::io(self.mailbox.layout.part(&self.meta.id), e))?;
        self.written = total;
        Ok(())
    }

    /// Makes the transfer durable and deliverable; see the module doc for
    /// the order of the steps. Returns its metadata.
    pub fn commit(mut self) -> Result<StoredMeta, UploadError> {
        let layout = &self.mailbox.layout;
        let id = self.meta.id;
        let part = layout.part(&id);
        self.file
            .flush()
            .and_then(|()| self.file.get_ref().sync_all())
            .map_err(|e| MailboxError::io(&part, e))?;
        {
            // Strictly after every transfer committed before it.
            let mut index = lock(&self.mailbox.index);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
            self.meta.order = now.max(index.last_order.saturating_add(1));
            index.last_order = self.meta.order;
        }
        let record = MetaFile::encode(&self.meta, self.written);
        disk::write_atomic(&layout.objects, &Layout::meta_name(&id), &record)?;
        let data = layout.data(&id);
        // The commit point.
        fs::rename(&part, &data).map_err(|e| MailboxError::io(&data, e))?;
        // Until this returns the rename may not survive a crash; if it fails,
        // drop removes both files and the sender is told it failed.
        disk::sync_dir(&layout.objects)?;
        let stored = Stored {
            meta: self.meta.clone(),
            len: self.written,
            delivery: None,
        };
        {
            let mut index = lock(&self.mailbox.index);
            index.reserved.remove(&id);
            index.stored.insert(id, stored);
        }
        self.committed = true;
        Ok(self.meta.clone())
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        let layout = &self.mailbox.layout;
        let id = &self.meta.id;
        // The data file first: it is what makes an object whole.
        disk::remove_or_warn(&layout.data(id));
        disk::remove_or_warn(&layout.meta(id));
        disk::remove_or_warn(&layout.part(id));
        lock(&self.mailbox.index).reserved.remove(id);
    }
}
