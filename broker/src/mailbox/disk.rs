//! The mailbox's files: where each one lives, and the few operations every
//! durable change is built from (create a private directory, create a file
//! exclusively, replace a file atomically, read a file with a bound).
//!
//! ```text
//! <dir>/objects/<hex id>.part   an upload in progress (never offered)
//! <dir>/objects/<hex id>.meta   a stored transfer's metadata
//! <dir>/objects/<hex id>.data   its sealed bytes: present only once committed
//! <dir>/receipts/<hex id>       a transfer that ended: how, and its receipt
//! <dir>/prekeys/<receiver>      a receiver's prekey bundles
//! <dir>/*/.tmp-<name>           a replacement being written
//! ```
//!
//! Receiver names are used as file names as they are: an [`AgentName`] is 1 to
//! 32 of `a-z 0-9 . _ -` starting with a letter or digit, so it is never `.`,
//! `..`, a path or a `.tmp-` name. Directories are 0700, files 0600.
//!
//! [`AgentName`]: keyferry_common::name::AgentName

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use keyferry_common::ids::TransferId;

use super::error::MailboxError;

/// The prefix of a file being written before it replaces `<name>`.
pub(super) const TMP_PREFIX: &str = ".tmp-";

/// The mailbox's directories.
#[derive(Debug)]
pub(super) struct Layout {
    pub objects: PathBuf,
    pub receipts: PathBuf,
    pub prekeys: PathBuf,
}

impl Layout {
    /// Creates `dir` (with its parents) and its subdirectories, 0700.
    pub fn create(dir: &Path) -> Result<Self, MailboxError> {
        let layout = Self {
            objects: dir.join("objects"),
            receipts: dir.join("receipts"),
            prekeys: dir.join("prekeys"),
        };
        create_dir(dir)?;
        for sub in [&layout.objects, &layout.receipts, &layout.prekeys] {
            create_dir(sub)?;
        }
        Ok(layout)
    }

    pub fn part(&self, id: &TransferId) -> PathBuf {
        self.objects.join(format!("{}.part", hex::encode(id.0)))
    }

    pub fn data(&self, id: &TransferId) -> PathBuf {
        self.objects.join(format!("{}.data", hex::encode(id.0)))
    }

    pub fn meta_name(id: &TransferId) -> String {
        format!("{}.meta", hex::encode(id.0))
    }

    pub fn meta(&self, id: &TransferId) -> PathBuf {
        self.objects.join(Self::meta_name(id))
    }

    pub fn receipt(&self, id: &TransferId) -> PathBuf {
        self.receipts.join(hex::encode(id.0))
    }
}

/// Parses a hex transfer id as written in a file name.
pub(super) fn parse_id(hex_id: &str) -> Option<TransferId> {
    let mut id = [0; 16];
    hex::decode_to_slice(hex_id, &mut id).ok()?;
    // Only the lowercase spelling this module writes names a file of ours.
    (hex::encode(id) == hex_id).then_some(TransferId(id))
}

fn create_dir(dir: &Path) -> Result<(), MailboxError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| MailboxError::io(dir, e))
}

/// Creates `path` for writing, 0600; fails if it exists.
pub(super) fn create_new(path: &Path) -> Result<File, MailboxError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| MailboxError::io(path, e))
}

/// Makes the entries of `dir` (creations, renames) durable.
pub(super) fn sync_dir(dir: &Path) -> Result<(), MailboxError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| MailboxError::io(dir, e))
}

/// Replaces `dir/name` with `bytes`, durably and atomically: a reader (or a
/// restart) sees the old file or the new one, never a mix.
pub(super) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), MailboxError> {
    let tmp = dir.join(format!("{TMP_PREFIX}{name}"));
    let path = dir.join(name);
    let written = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        });
    if let Err(e) = written.and_then(|()| fs::rename(&tmp, &path)) {
        let _ = fs::remove_file(&tmp);
        return Err(MailboxError::io(path, e));
    }
    sync_dir(dir)
}

/// Removes `path`; a file already gone is not an error.
pub(super) fn remove(path: &Path) -> Result<(), MailboxError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(MailboxError::io(path, e)),
        _ => Ok(()),
    }
}

/// Removes `path`, logging a failure: for cleanups that a later open redoes.
pub(super) fn remove_or_warn(path: &Path) {
    if let Err(e) = remove(path) {
        tracing::warn!(error = %e, "mailbox: a file could not be removed; it will be at the next start");
    }
}

/// Reads `path` whole if it is at most `max` bytes; `Ok(None)` if it is longer.
pub(super) fn read_bounded(path: &Path, max: usize) -> Result<Option<Vec<u8>>, MailboxError> {
    let file = File::open(path).map_err(|e| MailboxError::io(path, e))?;
    let mut bytes = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    file.take(limit)
        .read_to_end(&mut bytes)
        .map_err(|e| MailboxError::io(path, e))?;
    Ok((bytes.len() <= max).then_some(bytes))
}

/// The names in `dir` (names that are not UTF-8 are skipped with a warning).
pub(super) fn list(dir: &Path) -> Result<Vec<String>, MailboxError> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| MailboxError::io(dir, e))? {
        let entry = entry.map_err(|e| MailboxError::io(dir, e))?;
        match entry.file_name().into_string() {
            Ok(name) => names.push(name),
            Err(name) => tracing::warn!(
                dir = %dir.display(), ?name, "mailbox: a file not of ours is left alone"
            ),
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_only_as_written() {
        let id = TransferId([0xab; 16]);
        assert_eq!(parse_id(&hex::encode(id.0)), Some(id));
        assert_eq!(parse_id(&hex::encode(id.0).to_uppercase()), None);
        assert_eq!(parse_id("ab"), None);
        assert_eq!(parse_id(&"g".repeat(32)), None);
    }
}
