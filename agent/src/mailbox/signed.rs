//! The stored receipts a receiver signed, kept in `<home>/stored-receipts/`
//! (one 0600 file per transfer, named by its id in hex, in a 0700
//! directory) so that it can send one again when a broker offers the same
//! transfer again — its receipt lost on the way, this receiver restarted
//! meanwhile. Without it the receiver, which deleted the transfer's one-time
//! prekey, could only refuse the offer unsigned, and the sender would read
//! "refused" for a transfer that was placed. Files only: no socket here.
//!
//! Each file also names the prekey the transfer was sealed to (and the
//! offer's time), so that a receiver that stopped between keeping the
//! receipt and deleting that prekey finishes the deletion when the transfer
//! is offered again — from its own record, never from the offer. A receipt
//! is kept before the prekey goes; files older than a stored offer can live
//! ([`MAX_STORED_AGE_SECS`]) are swept.
//!
//! What a stolen home shows from them: for 35 days, which stored transfers
//! it took from which sender's key, when, and each delivered file's SHA-256
//! (or why it was refused) — what the receipts say, which the broker holds
//! too.

use std::fs;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keyferry_common::encode::{Decoder, Encoder};
use keyferry_common::handshake::stored::MAX_STORED_AGE_SECS;
use keyferry_common::ids::TransferId;
use keyferry_common::io::fs::{Place, write_private};

/// The longest receipt kept (a signed receipt is well under 1 KiB).
const MAX_RECEIPT: usize = 2048;
/// The format byte every file starts with.
const VERSION: u8 = 1;

/// One kept receipt, and what its transfer used up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    /// The signed receipt, as sent.
    pub receipt: Vec<u8>,
    /// The prekey the transfer was sealed to: its id, and whether it was
    /// the last-resort one.
    pub prekey: Option<([u8; 16], bool)>,
    /// The stored offer's time.
    pub offer_time: u64,
}

impl Kept {
    fn encode(&self) -> Vec<u8> {
        let (id, last_resort) = self.prekey.unwrap_or(([0; 16], false));
        Encoder::default()
            .u8(VERSION)
            .u8(u8::from(self.prekey.is_some()))
            .fixed(&id)
            .u8(u8::from(last_resort))
            .u64(self.offer_time)
            .bytes(&self.receipt)
            .finish()
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let mut d = Decoder::new(bytes);
        if d.u8().ok()? != VERSION {
            return None;
        }
        let has_prekey = d.u8().ok()?;
        let id: [u8; 16] = d.array().ok()?;
        let last_resort = d.u8().ok()?;
        let offer_time = d.u64().ok()?;
        let receipt = d.bytes(MAX_RECEIPT).ok()?.to_vec();
        d.finish().ok()?;
        let prekey = match (has_prekey, last_resort) {
            (0, 0) => None,
            (1, l @ (0 | 1)) => Some((id, l == 1)),
            _ => return None,
        };
        Some(Self {
            receipt,
            prekey,
            offer_time,
        })
    }
}

/// What the home holds for a transfer.
#[derive(Debug)]
pub enum Found {
    /// Nothing (or a file that is no kept receipt, removed now).
    Nothing,
    /// A kept receipt.
    Kept(Kept),
    /// A file that cannot be read now (its mode, the disk): not known.
    Unreadable(String),
}

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

    /// Keeps `kept` for `tid`, durably (replacing one kept before).
    pub fn keep(&self, tid: &TransferId, kept: &Kept) -> std::io::Result<()> {
        if kept.receipt.len() > MAX_RECEIPT {
            return Err(std::io::Error::other("a receipt too long to keep"));
        }
        write_private(&self.path(tid), &kept.encode(), Place::Replace)
    }

    /// What is kept for `tid`. Read as a key file is (no link followed,
    /// this user's, not readable by others, bounded).
    pub fn get(&self, tid: &TransferId) -> Found {
        let path = self.path(tid);
        if fs::symlink_metadata(&path).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) {
            return Found::Nothing;
        }
        let bytes = match crate::home::read_private(&path, MAX_RECEIPT + 64) {
            Ok(bytes) => bytes,
            Err(e) => return Found::Unreadable(e.to_string()),
        };
        match Kept::decode(&bytes) {
            Some(kept) => Found::Kept(kept),
            None => {
                self.forget(tid);
                Found::Nothing
            }
        }
    }

    /// Removes what is kept for `tid` (one that turned out not to verify).
    pub fn forget(&self, tid: &TransferId) {
        let _ = fs::remove_file(self.path(tid));
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
    use std::time::SystemTime;

    use super::*;

    fn kept(receipt: &[u8]) -> Kept {
        Kept {
            receipt: receipt.to_vec(),
            prekey: Some(([3; 16], false)),
            offer_time: 1_800_000_000,
        }
    }

    #[test]
    fn a_kept_receipt_is_read_back_after_a_restart_and_old_ones_are_swept() {
        let home = std::env::temp_dir().join(format!("kf-signed-{}", std::process::id()));
        let _ = fs::remove_dir_all(&home);
        let tid = TransferId([7; 16]);
        let first = SignedReceipts::open(&home).unwrap();
        first.keep(&tid, &kept(b"signed")).unwrap();
        // A new run of the receiver opens the same home.
        let again = SignedReceipts::open(&home).unwrap();
        assert!(matches!(again.get(&tid), Found::Kept(k) if k == kept(b"signed")));
        assert!(matches!(again.get(&TransferId([8; 16])), Found::Nothing));
        // Not ours: removed, and nothing.
        let junk = TransferId([9; 16]);
        write_private(&again.path(&junk), b"junk", Place::New).unwrap();
        assert!(matches!(again.get(&junk), Found::Nothing));
        assert!(fs::symlink_metadata(again.path(&junk)).is_err());
        // Readable by others: not trusted, not removed.
        use std::os::unix::fs::PermissionsExt as _;
        let loose = TransferId([10; 16]);
        again.keep(&loose, &kept(b"x")).unwrap();
        fs::set_permissions(again.path(&loose), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(again.get(&loose), Found::Unreadable(_)));
        // Older than a stored offer lives: swept.
        assert_eq!(again.sweep(), 0, "nothing is old yet");
        let old = SystemTime::now() - Duration::from_secs(MAX_STORED_AGE_SECS + 60);
        fs::File::options()
            .write(true)
            .open(again.path(&tid))
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert_eq!(again.sweep(), 1);
        assert!(matches!(again.get(&tid), Found::Nothing));
        fs::remove_dir_all(&home).unwrap();
    }

    #[test]
    fn a_file_of_another_shape_is_no_kept_receipt() {
        let k = kept(b"r");
        assert_eq!(Kept::decode(&k.encode()), Some(k.clone()));
        let mut bytes = k.encode();
        bytes[1] = 2;
        assert_eq!(Kept::decode(&bytes), None);
        let none = Kept { prekey: None, ..k };
        assert_eq!(Kept::decode(&none.encode()), Some(none));
    }
}
