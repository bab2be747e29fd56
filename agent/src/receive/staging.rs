//! One transfer's private staging directory (PROTOCOL.md §7.1), held locked
//! for as long as this value lives: the tree being received (`t/`), the
//! manifest it follows (`manifest`), and the journal that says how much of
//! it verified (`journal`, see [`super::journal`]). Small files here are
//! written whole: to a temporary name, synced, renamed, and the directory
//! synced.

use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use keyferry_common::crypto::keys::MacKey;
use keyferry_common::wire::record::MAX_MANIFEST;
use rustix::fs::{FileType, FlockOperation, Mode, OFlags};

use super::journal::{Journal, JournalError};
use super::outdir::{OutDir, inode, open_private_dir, remove_all_at};

const TREE: &str = "t";
const JOURNAL: &str = "journal";
const MANIFEST: &str = "manifest";
/// Largest journal read back (its marks: one per 64 MiB of data).
const MAX_JOURNAL: usize = 1 << 20;

/// Why a staging directory's journal cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NoJournal {
    /// Missing or unreadable.
    #[error("no readable journal: {0}")]
    Io(#[from] io::Error),
    /// Not believed.
    #[error(transparent)]
    Invalid(#[from] JournalError),
}

/// A transfer's staging directory, locked.
#[derive(Debug)]
pub struct Staging {
    out: Arc<OutDir>,
    name: String,
    /// The directory, under our exclusive `flock`.
    dir: OwnedFd,
    /// Its `t/`, where the manifest's tree is built.
    tree: OwnedFd,
}

impl Staging {
    /// A staging directory this receiver just made: locked, with an empty tree.
    pub(super) fn create(out: Arc<OutDir>, name: String, dir: OwnedFd) -> io::Result<Self> {
        rustix::fs::flock(&dir, FlockOperation::NonBlockingLockExclusive)?;
        rustix::fs::mkdirat(&dir, TREE, Mode::from_raw_mode(0o700))?;
        let tree = open_private_dir(dir.as_fd(), TREE)?;
        rustix::fs::fsync(out.fd())?;
        Ok(Self {
            out,
            name,
            dir,
            tree,
        })
    }

    /// An existing staging directory, which the caller has locked.
    pub(super) fn open(out: Arc<OutDir>, name: String, dir: OwnedFd) -> io::Result<Self> {
        let tree = match open_private_dir(dir.as_fd(), TREE) {
            Ok(t) => t,
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NOENT.raw_os_error()) => {
                rustix::fs::mkdirat(&dir, TREE, Mode::from_raw_mode(0o700))?;
                open_private_dir(dir.as_fd(), TREE)?
            }
            Err(e) => return Err(e),
        };
        Ok(Self {
            out,
            name,
            dir,
            tree,
        })
    }

    /// The out dir it lives in.
    pub fn out(&self) -> &Arc<OutDir> {
        &self.out
    }

    /// The directory the tree is built in.
    pub fn tree(&self) -> BorrowedFd<'_> {
        self.tree.as_fd()
    }

    /// Empties the tree (an attempt that starts again from byte 0).
    pub fn reset_tree(&mut self) -> io::Result<()> {
        remove_all_at(self.dir.as_fd(), TREE)?;
        rustix::fs::mkdirat(&self.dir, TREE, Mode::from_raw_mode(0o700))?;
        self.tree = open_private_dir(self.dir.as_fd(), TREE)?;
        Ok(())
    }

    /// Flushes everything written on the file system of the tree to disk
    /// (`syncfs`: one call for a tree of many entries, but it also waits for
    /// whatever else is dirty on that file system).
    pub fn sync(&self) -> io::Result<()> {
        Ok(rustix::fs::syncfs(&self.tree)?)
    }

    /// Syncs the data of the file at `path` in the tree (opened, synced
    /// and closed: a tree may hold more files than a process may keep open).
    pub fn sync_file(&self, path: &str) -> io::Result<()> {
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&self.tree, path, flags, Mode::empty())?;
        Ok(rustix::fs::fdatasync(&fd)?)
    }

    /// Makes the tree directory's entries, and its own entry in the staging
    /// directory, durable.
    pub fn sync_dirs(&self) -> io::Result<()> {
        rustix::fs::fsync(&self.tree)?;
        Ok(rustix::fs::fsync(&self.dir)?)
    }

    /// The journal, checked with `key` at `now`.
    pub fn read_journal(&self, key: &MacKey, now: u64) -> Result<Journal, NoJournal> {
        let bytes = self.read_small(JOURNAL, MAX_JOURNAL)?;
        Ok(Journal::decode(&bytes, key, now)?)
    }

    /// Replaces the journal, whole.
    pub fn write_journal(&self, journal: &Journal, key: &MacKey) -> io::Result<()> {
        self.write_small(JOURNAL, &journal.encode(key))
    }

    /// The manifest body kept beside the tree.
    pub fn read_manifest(&self) -> io::Result<Vec<u8>> {
        self.read_small(MANIFEST, MAX_MANIFEST)
    }

    /// Keeps the manifest body beside the tree.
    pub fn write_manifest(&self, body: &[u8]) -> io::Result<()> {
        self.write_small(MANIFEST, body)
    }

    /// Removes the directory and all in it: its content through its own
    /// descriptor, then its name, only if the name is still this directory
    /// (someone who moved it away and put another in its place gets neither
    /// touched).
    pub fn remove(self) -> io::Result<()> {
        let Self {
            out,
            name,
            dir,
            tree,
        } = self;
        drop(tree);
        remove_all_at(dir.as_fd(), TREE)?;
        for f in [JOURNAL, MANIFEST, "journal.new", "manifest.new"] {
            match rustix::fs::unlinkat(&dir, f, rustix::fs::AtFlags::empty()) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let ours = inode(&rustix::fs::fstat(&dir)?);
        let named = rustix::fs::statat(
            out.fd(),
            name.as_str(),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        );
        if named.is_ok_and(|st| inode(&st) == ours) {
            rustix::fs::unlinkat(out.fd(), name.as_str(), rustix::fs::AtFlags::REMOVEDIR)?;
        }
        // Still locked until here.
        drop(dir);
        rustix::fs::fsync(out.fd())?;
        Ok(())
    }

    fn read_small(&self, name: &str, max: usize) -> io::Result<Vec<u8>> {
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&self.dir, name, flags, Mode::empty())?;
        let st = rustix::fs::fstat(&fd)?;
        let size = usize::try_from(st.st_size).unwrap_or(usize::MAX);
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile || size > max {
            return Err(io::Error::other(format!(
                "{name} is not what this receiver wrote"
            )));
        }
        let mut out = Vec::with_capacity(size);
        File::from(fd).take(max as u64 + 1).read_to_end(&mut out)?;
        if out.len() > max {
            return Err(io::Error::other(format!("{name} is too large")));
        }
        Ok(out)
    }

    fn write_small(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let temp = format!("{name}.new");
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&self.dir, temp.as_str(), flags, Mode::from_raw_mode(0o600))?;
        let mut f = File::from(fd);
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        rustix::fs::renameat(&self.dir, temp.as_str(), &self.dir, name)?;
        rustix::fs::fsync(&self.dir)?;
        Ok(())
    }

    /// Whether `name` exists in the staging directory itself (for tests).
    #[cfg(test)]
    pub fn has(&self, name: &str) -> bool {
        rustix::fs::statat(&self.dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW).is_ok()
    }
}
