//! Journal checkpoints in the background (PROTOCOL.md §7.3): every
//! [`EVERY`] bytes of verified data, the opening thread hands a snapshot of
//! the journal to this thread, which syncs the tree's file system and only
//! then writes the journal. The snapshot was taken after its bytes were
//! written, so once they are synced the journal never counts more than the
//! disk holds. A snapshot that arrives while the previous one is still being
//! written is skipped: the next one covers it.

use std::sync::Arc;
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
    tx: Option<SyncSender<Journal>>,
    thread: Option<JoinHandle<()>>,
}

fn checkpoint(staging: &Staging, key: &MacKey, j: &Journal) -> std::io::Result<()> {
    staging.sync()?;
    staging.write_journal(j, key)
}

impl Checkpoints {
    /// Starts the thread for the transfer in `staging`.
    pub fn start(staging: Arc<Staging>, key: Arc<MacKey>) -> Self {
        let (tx, rx) = sync_channel::<Journal>(1);
        let (s, k) = (Arc::clone(&staging), Arc::clone(&key));
        let thread = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || {
                while let Ok(j) = rx.recv() {
                    // A failed checkpoint leaves the previous journal, which
                    // is still true; the final one reports errors.
                    let _ = checkpoint(&s, &k, &j);
                }
            })
            .ok();
        Self {
            staging,
            key,
            tx: thread.is_some().then_some(tx),
            thread,
        }
    }

    /// Offers a snapshot; skipped if the thread is still busy.
    pub fn offer(&self, j: Journal) {
        if let Some(tx) = &self.tx {
            let _ = tx.try_send(j);
        }
    }

    /// Stops the thread (after the checkpoint it is writing), then writes
    /// `last` if given, in this thread.
    pub fn finish(mut self, last: Option<&Journal>) -> std::io::Result<()> {
        self.stop();
        match last {
            Some(j) => checkpoint(&self.staging, &self.key, j),
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
