//! The sender's marks (PROTOCOL.md §6.4): while it reads what it sends, at
//! about every 64 MiB, the SHA-256 state of the data so far, appended to a
//! log in its home (`sending/<data id>`, 0600), each record of a fixed size
//! (a torn last one is cut off before the next is added) and MACed under
//! the home's journal key. A resume then hashes only from the last mark at
//! or below the receiver's offset, not the whole prefix, and checks the
//! rest of the prefix against the marks on a thread of its own while new
//! data goes out. The log is only a cache: a missing or damaged one (or a
//! record that does not verify) just means reading the prefix first, as
//! before.

use std::fs::{self, OpenOptions};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use keyferry_common::crypto::keys::MacKey;
use keyferry_common::crypto::mac;
use keyferry_common::encode::{Decoder, Encoder};
use keyferry_common::hashstate;
use keyferry_common::ids::StreamId;
use sha2::Sha256;

/// The MAC's context label.
const LABEL: &str = "keyferry/v4 sender-marks";
/// Bytes read between two marks.
pub const EVERY: u64 = 64 << 20;
/// Largest log read back.
const MAX_LOG: u64 = 8 << 20;
/// A serialized SHA-256 state.
const STATE: usize = 104;
/// One record: offset, state, digest, tag.
const RECORD: u64 = (8 + STATE + 32 + 32) as u64;
/// How long a log is kept.
const MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// One mark: the data's first `offset` bytes hash to `digest`, and their
/// SHA-256 state is `state`.
#[derive(Debug, Clone)]
pub struct Mark {
    /// Bytes of the data before it.
    pub offset: u64,
    /// The SHA-256 state after them, serialized.
    pub state: Vec<u8>,
    /// Their SHA-256.
    pub digest: [u8; 32],
}

impl Mark {
    /// The state to hash on from.
    pub fn hasher(&self) -> Option<Sha256> {
        hashstate::deserialize(&self.state)
    }
}

/// The log of marks for one data: what binds it (the data id, the
/// manifest's hash and the total), where it lives, and its key.
#[derive(Debug)]
pub struct MarkLog {
    path: PathBuf,
    key: MacKey,
    binding: Vec<u8>,
}

impl MarkLog {
    /// The log for data `id` (its manifest hashing to `manifest_hash`, of
    /// `total` bytes) in `home`; old logs there are swept.
    pub fn new(
        home: &Path,
        key: MacKey,
        id: &StreamId,
        manifest_hash: &[u8; 32],
        total: u64,
    ) -> Self {
        let dir = home.join("sending");
        let _ = fs::DirBuilder::new().mode(0o700).create(&dir);
        sweep(&dir);
        let binding = Encoder::new(LABEL)
            .fixed(&id.0)
            .fixed(manifest_hash)
            .u64(total)
            .finish();
        Self {
            path: dir.join(id.to_string()),
            key,
            binding,
        }
    }

    /// Appends a mark (a failure only costs a later resume its speed).
    pub fn append(&self, offset: u64, state: &[u8], digest: &[u8; 32]) {
        if state.len() != STATE {
            return;
        }
        let body = Encoder::default()
            .u64(offset)
            .fixed(state)
            .fixed(digest)
            .finish();
        let tag = mac::tag(&self.key, &[&self.binding, &body]);
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&self.path);
        if let Ok(mut f) = file {
            // A record torn by a crash is cut off, so records stay aligned.
            if let Ok(m) = f.metadata()
                && m.len() % RECORD != 0
            {
                let _ = f.set_len(m.len() - m.len() % RECORD);
            }
            let _ = f.write_all(&[body.as_slice(), &tag].concat());
        }
    }

    /// The marks read back, ascending; those that do not verify (another
    /// data's, a torn last write) and everything after them are ignored.
    pub fn read(&self) -> Vec<Mark> {
        let mut bytes = Vec::new();
        let opened = OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&self.path);
        let Ok(f) = opened else { return Vec::new() };
        if f.take(MAX_LOG).read_to_end(&mut bytes).is_err() {
            return Vec::new();
        }
        let mut marks: Vec<Mark> = Vec::new();
        for record in bytes.chunks_exact(RECORD as usize) {
            let Some(mark) = self.parse(record) else {
                continue;
            };
            if marks.last().is_some_and(|m| m.offset >= mark.offset) {
                // A new run of the same data starts the log again.
                marks.retain(|m| m.offset < mark.offset);
            }
            marks.push(mark);
        }
        marks
    }

    fn parse(&self, record: &[u8]) -> Option<Mark> {
        let (body, tag) = record.split_at(record.len() - 32);
        mac::verify(&self.key, &[&self.binding, body], tag).ok()?;
        let mut b = Decoder::new(body);
        let offset = b.u64().ok()?;
        let state = b.array::<STATE>().ok()?.to_vec();
        let digest = b.array().ok()?;
        b.finish().ok()?;
        Some(Mark {
            offset,
            state,
            digest,
        })
    }

    /// Starts the log afresh (a new upload from byte 0).
    pub fn restart(&self) {
        let _ = fs::remove_file(&self.path);
    }

    /// Forgets the marks (the data arrived everywhere).
    pub fn remove(&self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Removes logs older than [`MAX_AGE`].
fn sweep(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let old = e
            .metadata()
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age > MAX_AGE);
        if old {
            let _ = fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use sha2::Digest as _;

    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("keyferry-marks-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn marks_come_back_only_for_their_own_data_and_key() {
        let home = dir("own");
        let key = || MacKey::from_bytes([3; 32]);
        let id = StreamId([1; 16]);
        let log = MarkLog::new(&home, key(), &id, &[2; 32], 100);
        let mut h = Sha256::new();
        h.update(b"abc");
        let state = hashstate::serialize(&h);
        let digest: [u8; 32] = h.clone().finalize().into();
        log.append(3, &state, &digest);
        log.append(7, &state, &digest);
        let marks = log.read();
        assert_eq!(marks.iter().map(|m| m.offset).collect::<Vec<_>>(), [3, 7]);
        assert!(marks[0].hasher().is_some());
        // The same file read as another data's, or under another key: nothing.
        assert!(
            MarkLog::new(&home, key(), &id, &[2; 32], 101)
                .read()
                .is_empty()
        );
        assert!(
            MarkLog::new(&home, MacKey::from_bytes([4; 32]), &id, &[2; 32], 100)
                .read()
                .is_empty()
        );
        // A torn last record is ignored, the others kept, and cut off
        // before the next record goes in.
        let path = home.join("sending").join(id.to_string());
        let mut bytes = fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 5);
        fs::write(&path, bytes).unwrap();
        assert_eq!(log.read().len(), 1);
        log.append(9, &state, &digest);
        assert_eq!(
            log.read().iter().map(|m| m.offset).collect::<Vec<_>>(),
            [3, 9]
        );
        // A new run appends from the start: the old marks past it go.
        log.append(2, &state, &digest);
        assert_eq!(log.read().iter().map(|m| m.offset).collect::<Vec<_>>(), [2]);
        log.remove();
        assert!(log.read().is_empty());
        fs::remove_dir_all(home).unwrap();
    }
}
