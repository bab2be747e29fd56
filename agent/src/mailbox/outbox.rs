//! A sender's record of its stored transfers: one small JSON file per
//! transfer in `<home>/stored/` (mode 0600), written when the broker said it
//! stored one. `agent --receipts` checks each receipt the broker returns
//! against it: the receiver and its key, and the SHA-256 of what was sent.

use std::fs;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};

use keyferry_common::io::fs::{Place, write_private};
use serde::{Deserialize, Serialize};

/// What the sender keeps of one stored transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sent {
    /// Transfer id (hex).
    pub id: String,
    /// The receiver.
    pub to: String,
    /// The receiver's key fingerprint it was sealed to.
    pub fingerprint: String,
    /// SHA-256 of the data (hex).
    pub sha256: String,
    /// Bytes of data.
    pub bytes: u64,
    /// When the broker stored it (Unix seconds, our clock).
    pub stored: u64,
    /// When the broker deletes it undelivered (Unix seconds).
    pub expires: u64,
    /// Whether it was sealed to the receiver's last-resort bundle.
    pub last_resort: bool,
}

/// The outbox of one home.
#[derive(Debug, Clone)]
pub struct Outbox {
    dir: PathBuf,
}

impl Outbox {
    /// The outbox of `home` (made, 0700, if missing).
    pub fn open(home: &Path) -> std::io::Result<Self> {
        let dir = home.join("stored");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        Ok(Self { dir })
    }

    fn path(&self, id: &str) -> Option<PathBuf> {
        // Ids are 32 hex digits; anything else names no file of ours.
        (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| self.dir.join(id.to_ascii_lowercase()))
    }

    /// Records one stored transfer.
    pub fn record(&self, sent: &Sent) -> std::io::Result<()> {
        let path = self
            .path(&sent.id)
            .ok_or_else(|| std::io::Error::other("not a transfer id"))?;
        let json = serde_json::to_vec(sent).map_err(std::io::Error::other)?;
        write_private(&path, &json, Place::Replace)
    }

    /// The record of `id`, if there is one (a damaged file counts as none).
    pub fn get(&self, id: &str) -> Option<Sent> {
        let path = self.path(id)?;
        fs::symlink_metadata(&path).ok()?;
        let bytes = crate::home::read_private(&path, 64 << 10).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Forgets `id` (withdrawn).
    pub fn forget(&self, id: &str) {
        if let Some(path) = self.path(id) {
            let _ = fs::remove_file(path);
        }
    }
}
