//! Journal checkpoints in the background (PROTOCOL.md §7.3): every
//! [`EVERY`] bytes of verified data, the opening thread hands a snapshot of
//! the journal to this thread, with the files written since the last
//! snapshot it took; the thread syncs those files' data (`fdatasync`, not
//! the whole file system: another program's dirty data is not ours to wait
//! for) and only then writes the journal. The snapshot was taken after its
//! bytes were written, and every file written since the previous accepted
//! snapshot is in it, so once they are synced the journal never counts more
//! than the disk holds. A snapshot that arrives while the previous one is
//! still being written is refused, and its files stay with the writer for the
//! next one.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::thread::JoinHandle;

use keyferry_common::crypto::keys::MacKey;

use super::journal::Journal;
use super::staging::Staging;

/// Verified bytes between two checkpoints.
pub const EVERY: u64 = 64 << 20;

/// The checkpoint thread of one transfer.
#[derive(Debug)]
pub struct Checkpoints {
    staging: Arc<Staging>,
    key: Arc<MacKey>,
    tx: Option<SyncSender<(Journal, Vec<String>)>>,
    thread: Option<JoinHandle<()>>,
    /// Set when a checkpoint could not sync its files: the data may not be
    /// on disk, whatever a later sync says, so the transfer must fail.
    failed: Arc<AtomicBool>,
}

fn checkpoint(
    staging: &Staging,
    key: &MacKey,
    j: &Journal,
    files: &[String],
) -> std::io::Result<()> {
    for path in files {
        staging.sync_file(path)?;
    }
    staging.write_journal(j, key)
}

impl Checkpoints {
    /// Starts the thread for the transfer in `staging`.
    pub fn start(staging: Arc<Staging>, key: Arc<MacKey>) -> Self {
        let (tx, rx) = sync_channel::<(Journal, Vec<String>)>(1);
        let (s, k) = (Arc::clone(&staging), Arc::clone(&key));
        let failed = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&failed);
        let thread = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || {
                while let Ok((j, files)) = rx.recv() {
                    // A failed checkpoint leaves the previous journal, which
                    // is still true; `finish` reports it.
                    if checkpoint(&s, &k, &j, &files).is_err() {
                        flag.store(true, Ordering::Relaxed);
                    }
                }
            })
            .ok();
        Self {
            staging,
            key,
            tx: thread.is_some().then_some(tx),
            thread,
            failed,
        }
    }

    /// Offers a snapshot and the files written since the last one taken;
    /// whether it was taken (not if the thread is still busy).
    pub fn offer(&self, j: Journal, files: Vec<String>) -> bool {
        match &self.tx {
            Some(tx) => tx.try_send((j, files)).is_ok(),
            None => false,
        }
    }

    /// Stops the thread (after the checkpoints it was handed), then writes
    /// `last` if given, in this thread, after syncing its files. An error if
    /// any checkpoint could not sync its files.
    pub fn finish(mut self, last: Option<(&Journal, Vec<String>)>) -> std::io::Result<()> {
        self.stop();
        if self.failed.load(Ordering::Relaxed) {
            return Err(std::io::Error::other(
                "received data could not be synced to disk",
            ));
        }
        match last {
            Some((j, files)) => checkpoint(&self.staging, &self.key, j, &files),
            None => Ok(()),
        }
    }

    fn stop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Checkpoints {
    fn drop(&mut self) {
        self.stop();
    }
}
