//! Storing one transfer in the cluster: the reservation (the limits checked
//! against every transfer the cluster holds and this broker's uploads in
//! progress), the upload staged in a file of this broker's, and the commit —
//! the whole file put into the object store, then the `w.` key.
//!
//! Nothing of an upload reaches NATS before its trailer: one cut half way
//! (its sender gone, the broker gone) leaves only a staging file, which is
//! removed (at once, or at the next start), never uncounted bytes in the
//! cluster. A put that fails half way (NATS lost meanwhile) leaves chunks no
//! object names; the object store's maximum age removes them.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_nats::jetstream::object_store::ObjectMetadata;
use keyferry_common::sync::lock;

use super::{STORED_SUBJECT, SharedMailbox, hex_id, hex_name, id_in, op};
use crate::mailbox::Reserved;
use crate::mailbox::error::{MailboxError, Refusal, UploadError};
use crate::mailbox::format::{MetaFile, stamp};
use crate::mailbox::limits::{admit, max_upload};
use crate::mailbox::storage::blocking;
use crate::mailbox::types::StoredMeta;

/// The most bytes the object store publishes at once: NATS' default
/// largest payload (1 MiB) less room for the message's headers; less if the
/// server allows less.
const CHUNK: usize = (1 << 20) - (4 << 10);

fn io_error(path: &Path, e: std::io::Error) -> MailboxError {
    MailboxError::Io {
        path: path.to_owned(),
        source: e,
    }
}

/// The chunk size for the server `client` is connected to.
fn chunk_size(client: &async_nats::Client) -> usize {
    let most = client.server_info().max_payload;
    if most == 0 {
        return 128 << 10;
    }
    CHUNK.min(most.saturating_sub(4 << 10)).max(1 << 10)
}

/// Makes the staging directory (0700) and empties it of what an earlier run
/// left.
pub(super) fn clear_staging(dir: &Path) -> Result<(), MailboxError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io_error(dir, e))?;
    for entry in fs::read_dir(dir).map_err(|e| io_error(dir, e))?.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            let _ = fs::remove_file(entry.path());
        }
    }
    Ok(())
}

impl SharedMailbox {
    /// Reserves room for `meta`'s transfer (its `stored_at` and `expires`
    /// set from `now_unix`) and creates its staging file. Refused, before
    /// any byte, if the cluster knows the id or a limit would be exceeded.
    pub async fn reserve(
        self: &Arc<Self>,
        mut meta: StoredMeta,
        now_unix: u64,
    ) -> Result<SharedUpload, Refusal> {
        stamp(&mut meta, now_unix, self.limits.max_age.as_secs())?;
        let id = meta.id;
        let waiting = self.scan("w.>").await?;
        let ended = self.scan(&format!("e.*.{}", hex_id(&id))).await?;
        // An object of that name (an upload of the same id committing
        // through another broker right now) is not overwritten.
        let object = self.objects.info(&hex_id(&id)).await.is_ok();
        let stored: Vec<(StoredMeta, u64)> = waiting
            .iter()
            .filter_map(|s| MetaFile::decode(&s.value, &id_in(&s.key)?))
            .collect();
        let charge = max_upload(meta.size);
        {
            let mut local = lock(&self.local);
            let known = stored.iter().any(|(m, _)| m.id == id)
                || !ended.is_empty()
                || object
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
        let path = self.staging.join(format!("{}.part", hex_id(&id)));
        let mut upload = SharedUpload {
            shared: Arc::clone(self),
            meta,
            path: path.clone(),
            file: None,
            written: 0,
            limit: charge,
            committed: false,
        };
        let file = blocking(move || {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| io_error(&path, e))
        })
        .await??;
        upload.file = Some(BufWriter::with_capacity(256 << 10, file));
        Ok(upload)
    }
}

/// One transfer being uploaded into the cluster's mailbox. Dropping it
/// without [`SharedUpload::commit`] removes its staging file and frees the
/// reservation.
pub struct SharedUpload {
    shared: Arc<SharedMailbox>,
    meta: StoredMeta,
    path: PathBuf,
    /// `None` only while a blocking write holds it.
    file: Option<BufWriter<File>>,
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

    fn gone(&self) -> UploadError {
        MailboxError::Shared(format!(
            "transfer {}: the staging file is gone",
            self.meta.id
        ))
        .into()
    }

    /// Appends `bytes` (past the limit, nothing is written and
    /// [`UploadError::TooLong`] is returned); hands the buffer back.
    pub async fn write(&mut self, bytes: Vec<u8>) -> Result<Vec<u8>, UploadError> {
        let total = (bytes.len() as u64).saturating_add(self.written);
        if total > self.limit {
            return Err(UploadError::TooLong {
                id: self.meta.id,
                limit: self.limit,
            });
        }
        let mut file = self.file.take().ok_or_else(|| self.gone())?;
        let path = self.path.clone();
        let (file, bytes, done) = blocking(move || {
            let done = file.write_all(&bytes).map_err(|e| io_error(&path, e));
            (file, bytes, done)
        })
        .await?;
        self.file = Some(file);
        done?;
        self.written = total;
        Ok(bytes)
    }

    /// Puts the whole upload into the object store, then writes the
    /// transfer's `w.` key: from then on it is stored, and offered to its
    /// receiver by any broker.
    pub async fn commit(mut self) -> Result<StoredMeta, UploadError> {
        let id = self.meta.id;
        let mut file = self.file.take().ok_or_else(|| self.gone())?;
        let path = self.path.clone();
        blocking(move || file.flush().map_err(|e| io_error(&path, e))).await??;
        let mut data = tokio::fs::File::open(&self.path)
            .await
            .map_err(|e| io_error(&self.path, e))?;
        let shared = Arc::clone(&self.shared);
        let object = ObjectMetadata {
            name: hex_id(&id),
            chunk_size: Some(chunk_size(&shared.client)),
            ..Default::default()
        };
        let info = shared
            .objects
            .put(object, &mut data)
            .await
            .map_err(|e| MailboxError::Shared(format!("storing transfer {id}: {e}")))?;
        if info.size as u64 != self.written {
            shared.drop_object(&id).await;
            let why = format!(
                "transfer {id}: {} bytes stored of {}",
                info.size, self.written
            );
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
        // The commit point. An answer lost on the way leaves the object: the
        // key may have been written (then it is delivered), and if it was
        // not, the object store's maximum age removes the object.
        match shared.create(&key, record).await {
            Ok(true) => {}
            Ok(false) => {
                return Err(
                    MailboxError::Shared(format!("transfer {id} is stored already")).into(),
                );
            }
            Err(e) => return Err(e.into()),
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
        // The staging copy goes either way: once committed, the cluster has
        // the data.
        self.file = None;
        let _ = fs::remove_file(&self.path);
        if !self.committed {
            lock(&self.shared.local).reserved.remove(&self.meta.id);
        }
    }
}

impl SharedMailbox {
    /// Deletes transfer `id`'s object, if there is one (a failure is logged:
    /// the object store's maximum age removes it in the end).
    pub(super) async fn drop_object(&self, id: &keyferry_common::ids::TransferId) {
        let name = hex_id(id);
        if let Err(e) = op("deleting an object", self.objects.delete(&name)).await {
            tracing::debug!(transfer = %id, error = %e, "mailbox: object not deleted");
        }
    }
}
