//! Small file-system helpers shared by key files and pin files.

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use crate::crypto::random_array;

/// A fresh, unpredictable temporary name beside `path` (`.<name>.tmp-<hex>`).
pub fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let suffix: String = random_array::<8>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    path.with_file_name(format!(".{name}.tmp-{suffix}"))
}

/// fsyncs the directory holding `path`, so a rename or link into it is durable.
pub fn sync_parent(path: &Path) -> std::io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

/// How [`write_private`] puts the file in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// Hard-link: fails if `path` exists, so nothing is ever replaced.
    New,
    /// Rename over whatever is at `path`.
    Replace,
}

/// Writes `contents` durably to `path` with mode 0600: a fresh temporary file
/// beside it, fsync, link or rename into place, fsync of the directory. A crash
/// leaves either the old file or the new one, never a half-written one.
pub fn write_private(path: &Path, contents: &[u8], place: Place) -> std::io::Result<()> {
    let tmp = temp_sibling(path);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        match place {
            Place::New => fs::hard_link(&tmp, path)?,
            Place::Replace => fs::rename(&tmp, path)?,
        }
        sync_parent(path)
    })();
    // After a hard link the temporary name must go; after a rename it is gone.
    if place == Place::New || result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}
