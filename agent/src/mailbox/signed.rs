//! The stored receipts a receiver signed, kept in `<home>/stored-receipts/`
//! (one 0600 file per transfer, named by its id in hex, in a 0700
//! directory) so that it can send one again when a broker offers the same
//! transfer again — its receipt lost on the way, this receiver restarted
//! meanwhile. Without it the receiver, which deleted the transfer's one-time
//! prekey, could only refuse the offer unsigned, and the sender would read
//! "refused" for a transfer that was placed. Files only: no socket here.
//!
//! A receipt is written before the prekey it ends is deleted; receipts older
//! than a stored offer can live ([`MAX_STORED_AGE_SECS`]) are swept.

use std::fs;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keyferry_common::handshake::stored::MAX_STORED_AGE_SECS;
use keyferry_common::ids::TransferId;
use keyferry_common::io::fs::{Place, write_private};

/// The longest receipt file read back.
const MAX_RECEIPT_FILE: u64 = 16 << 10;

/// A home's signed stored receipts.
#[derive(Debug, Clone)]
pub struct SignedReceipts {
    dir: PathBuf,
}

impl SignedReceipts {
    /// The receipt directory of `home` (made, 0700, if missing).
    pub fn open(home: &Path) -> std::io::Result<Self> {
        let dir = home.join("stored-receipts");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        Ok(Self { dir })
    }

    fn path(&self, tid: &TransferId) -> PathBuf {
        self.dir.join(hex::encode(tid.0))
    }

    /// Keeps `receipt` for `tid`, durably (replacing one kept before).
    pub fn keep(&self, tid: &TransferId, receipt: &[u8]) -> std::io::Result<()> {
        write_private(&self.path(tid), receipt, Place::Replace)
    }

    /// The receipt kept for `tid`, if there is one (an unreadable or
    /// oversized file counts as none).
    pub fn get(&self, tid: &TransferId) -> Option<Vec<u8>> {
        let path = self.path(tid);
        let len = fs::symlink_metadata(&path)
            .ok()
            .filter(|m| m.is_file())?
            .len();
        if len == 0 || len > MAX_RECEIPT_FILE {
            return None;
        }
        fs::read(&path).ok()
    }

    /// Removes receipts (and leftovers of interrupted writes) older than a
    /// stored offer can be; how many went.
    pub fn sweep(&self) -> usize {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return 0;
        };
        let old = Duration::from_secs(MAX_STORED_AGE_SECS);
        let mut removed = 0;
        for entry in entries.flatten() {
            let aged = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > old));
            if aged && fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_receipt_is_read_back_after_a_restart_and_nothing_else_is() {
        let home = std::env::temp_dir().join(format!("kf-signed-{}", std::process::id()));
        let _ = fs::remove_dir_all(&home);
        let tid = TransferId([7; 16]);
        SignedReceipts::open(&home)
            .unwrap()
            .keep(&tid, b"signed")
            .unwrap();
        // A new run of the receiver opens the same home.
        let again = SignedReceipts::open(&home).unwrap();
        assert_eq!(again.get(&tid).as_deref(), Some(&b"signed"[..]));
        assert_eq!(again.get(&TransferId([8; 16])), None);
        fs::write(again.path(&TransferId([9; 16])), vec![0; 20 << 10]).unwrap();
        assert_eq!(again.get(&TransferId([9; 16])), None, "oversized");
        assert_eq!(again.sweep(), 0, "nothing is old yet");
        fs::remove_dir_all(&home).unwrap();
    }
}
