//! Reading a kept prefix back (PROTOCOL.md §7.4): the first bytes of the
//! data, from the tree's files in manifest order, by descriptor, hashed as
//! they are read. At a resume this runs on a thread of its own while the
//! rest of the data arrives ([`PrefixCheck`]), comparing the hash at each
//! of the journal's marks with what it was when those bytes verified; the
//! tree is placed only once it agrees, and a disagreement fails the
//! transfer at once. Nothing waits for it before the accept.

use std::fs::File;
use std::io::{self, Read as _};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use keyferry_common::manifest::{EntryKind, Manifest};
use rustix::fs::{Mode, OFlags};
use sha2::{Digest as _, Sha256};

/// Reads the first `upto` bytes of the data of `m` from `tree` and hashes
/// them; at each `(offset, digest)` of `marks` (ascending, at most `upto`)
/// the hash so far must be `digest`, else `InvalidData`. `stop` is asked
/// before each read: when it says so, the read ends with `Interrupted`.
pub fn read_prefix(
    tree: BorrowedFd<'_>,
    m: &Manifest,
    upto: u64,
    marks: &[(u64, [u8; 32])],
    stop: &dyn Fn() -> bool,
) -> io::Result<Sha256> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut marks = marks.iter().peekable();
    let mut at = 0u64;
    check(&hasher, 0, &mut marks)?;
    let mut start = 0u64;
    for e in &m.entries {
        let size = match e.kind {
            EntryKind::File { size } => size,
            EntryKind::Dir | EntryKind::Stream => continue,
        };
        if start >= upto {
            break;
        }
        let mut left = (upto - start).min(size);
        start = start.saturating_add(size);
        if left == 0 {
            continue;
        }
        // Non-blocking, and a regular file only: nothing put in its
        // place (a FIFO, say) can hold the receiver here.
        let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(tree, e.path.join("/").as_str(), flags, Mode::empty())?;
        let mut f = File::from(fd);
        if !f.metadata()?.is_file() {
            return Err(io::Error::other("the received tree holds a non-file"));
        }
        while left > 0 {
            if stop() {
                return Err(io::Error::new(io::ErrorKind::Interrupted, "stopped"));
            }
            // Never past the next mark, so that each is checked exactly.
            let to_mark = marks.peek().map_or(u64::MAX, |m| m.0 - at);
            let n = usize::try_from(left.min(to_mark))
                .unwrap_or(usize::MAX)
                .min(buf.len());
            f.read_exact(&mut buf[..n]).map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => {
                    io::Error::other("the received tree lacks bytes its journal counts")
                }
                _ => e,
            })?;
            hasher.update(&buf[..n]);
            left -= n as u64;
            at += n as u64;
            check(&hasher, at, &mut marks)?;
        }
    }
    Ok(hasher)
}

/// Checks the marks at `at` against the hash so far.
fn check(
    hasher: &Sha256,
    at: u64,
    marks: &mut std::iter::Peekable<std::slice::Iter<'_, (u64, [u8; 32])>>,
) -> io::Result<()> {
    while let Some(&&(offset, digest)) = marks.peek() {
        if offset != at {
            break;
        }
        marks.next();
        let now: [u8; 32] = hasher.clone().finalize().into();
        if now != digest {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the bytes before offset {offset} changed on disk since they verified"),
            ));
        }
    }
    Ok(())
}

/// The check of a kept prefix against its journal's marks, on a thread of
/// its own while the rest of the data arrives.
#[derive(Debug)]
pub struct PrefixCheck {
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl PrefixCheck {
    /// Starts reading the first `marks.last()` bytes of `m` from `tree`
    /// (a descriptor of its own), checking every mark.
    pub fn start(tree: OwnedFd, m: Manifest, marks: Vec<(u64, [u8; 32])>) -> Self {
        let (stop, failed) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let (s, f) = (Arc::clone(&stop), Arc::clone(&failed));
        let upto = marks.last().map_or(0, |m| m.0);
        let thread = std::thread::Builder::new()
            .name("prefix-check".into())
            .spawn(move || {
                let stopped = || s.load(Ordering::Relaxed);
                let r = read_prefix(tree.as_fd(), &m, upto, &marks, &stopped)
                    .map(|_| ())
                    .map_err(|e| e.to_string());
                if r.is_err() {
                    f.store(true, Ordering::Relaxed);
                }
                r
            })
            .ok();
        Self {
            stop,
            failed,
            thread,
        }
    }

    /// Whether it has already found the prefix wrong (without waiting).
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// Waits for the whole prefix to be checked.
    pub fn wait(mut self) -> Result<(), String> {
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err("the prefix check stopped".into()),
            None => Err("the prefix check could not start".into()),
        }
    }
}

impl Drop for PrefixCheck {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
