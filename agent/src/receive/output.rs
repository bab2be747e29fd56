//! Writing a received file safely, by descriptor (PROTOCOL.md §6.3).
//!
//! The out dir is opened once; every file is created, checked and placed
//! relative to that descriptor. A file being received has no name at all: it
//! is an `O_TMPFILE` inode in the out dir, written and fsynced through its own
//! descriptor, and only after verification linked under a name that does not
//! exist yet (`name`, `name (1).ext` … `name (99).ext`) with `linkat` through
//! `/proc/self/fd/N`, so what gets a name is exactly the inode whose bytes were
//! verified, whatever anyone does in the out dir meanwhile. The linked name is
//! then checked to be that inode (device and inode number) before the caller
//! may send a receipt, and the directory is fsynced.
//!
//! Where `O_TMPFILE` or `/proc` is not available, the file starts as a
//! temporary `.keyferry-<id>-<random>.part` (created exclusively, mode 0600,
//! never through a symbolic link) held under an exclusive `flock` for its whole
//! life, and is linked by descriptor when `/proc` exists, else by name followed
//! by the same inode check. Only temporaries that are provably ours are ever
//! removed: the same inode, or (at start-up) one no live process holds locked.
//! On any failure, or if the receiver is killed, no file appears under the
//! final name.

use std::fs::File;
use std::io::{self, Write as _};
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::filename;
use keyferry_common::crypto::random_array;
use keyferry_common::ids::TransferId;
use rustix::fs::{AtFlags, FileType, FlockOperation, Mode, OFlags, Stat};
use rustix::io::Errno;

const TEMP_PREFIX: &str = ".keyferry-";
const TEMP_SUFFIX: &str = ".part";
const PROC_FD: &str = "/proc/self/fd";

/// Flush written data to disk in the background every this many bytes, so the
/// final fsync has little left to do and disk writes overlap the network.
const SYNC_EVERY: u64 = 64 << 20;

/// Which file a name or descriptor refers to.
fn inode(st: &Stat) -> (u64, u64) {
    (st.st_dev, st.st_ino)
}

/// The receiver's out dir, opened once.
#[derive(Debug)]
pub struct OutDir {
    fd: OwnedFd,
    path: PathBuf,
    /// Whether `/proc/self/fd` can name our descriptors for `linkat`.
    proc_fd: bool,
}

impl OutDir {
    /// Opens `path`, which must be a directory.
    pub fn open(path: &Path) -> io::Result<Arc<Self>> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let fd = rustix::fs::open(path, flags, Mode::empty()).map_err(|e| match e {
            Errno::NOTDIR => io::Error::other("not a directory"),
            e => e.into(),
        })?;
        Ok(Arc::new(Self {
            fd,
            path: path.to_owned(),
            proc_fd: Path::new(PROC_FD).is_dir(),
        }))
    }

    /// The path it was opened as (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes free for an unprivileged user on its file system.
    pub fn free_space(&self) -> Option<u64> {
        let s = rustix::fs::fstatvfs(&self.fd).ok()?;
        Some(s.f_bavail.saturating_mul(s.f_frsize))
    }

    /// Removes temporaries a killed receiver left behind; returns how many.
    /// A temporary another live receiver holds (its `flock`) is left alone.
    pub fn clean_stale(&self) -> io::Result<usize> {
        let mut removed = 0;
        for entry in rustix::fs::Dir::read_from(&self.fd)? {
            let entry = entry?;
            let Ok(name) = entry.file_name().to_str() else {
                continue;
            };
            if !(name.starts_with(TEMP_PREFIX) && name.ends_with(TEMP_SUFFIX)) {
                continue;
            }
            let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
            let Ok(fd) = rustix::fs::openat(&self.fd, name, flags, Mode::empty()) else {
                continue;
            };
            let st = rustix::fs::fstat(&fd)?;
            if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
                continue;
            }
            if rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive).is_err() {
                continue; // a live receiver holds it
            }
            if self.remove_if(name, inode(&st)) {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Removes `name` if it still is the file `ours`; whether it did.
    fn remove_if(&self, name: &str, ours: (u64, u64)) -> bool {
        let same = rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW)
            .is_ok_and(|st| inode(&st) == ours);
        same && rustix::fs::unlinkat(&self.fd, name, AtFlags::empty()).is_ok()
    }

    /// Starts the file of transfer `tid`.
    pub fn create(self: &Arc<Self>, tid: &TransferId) -> io::Result<Incoming> {
        let (file, temp) = match self.create_unnamed() {
            Ok(file) => (file, None),
            Err(e) if unsupported(&e) => {
                let (file, name) = self.create_named(tid)?;
                (file, Some(name))
            }
            Err(e) => return Err(e),
        };
        let ours = inode(&rustix::fs::fstat(&file)?);
        Ok(Incoming {
            dir: Arc::clone(self),
            syncer: spawn_syncer(&file),
            file: Some(file),
            ours,
            temp,
            written: 0,
        })
    }

    fn create_unnamed(&self) -> io::Result<File> {
        if !self.proc_fd {
            return Err(Errno::OPNOTSUPP.into());
        }
        let flags = OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&self.fd, ".", flags, Mode::from_raw_mode(0o600))?;
        Ok(File::from(fd))
    }

    /// A named temporary, locked; retried if a cleaner removed it between
    /// its creation and the lock.
    fn create_named(&self, tid: &TransferId) -> io::Result<(File, String)> {
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let mut last = io::Error::other("could not create a temporary file");
        for _ in 0..3 {
            let random: [u8; 8] = random_array();
            let name = format!("{TEMP_PREFIX}{tid}-{}{TEMP_SUFFIX}", hex::encode(random));
            let fd = rustix::fs::openat(&self.fd, &name, flags, Mode::from_raw_mode(0o600))?;
            // A cleaner may take the lock (and the name) between the two calls.
            let locked = rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive).is_ok();
            let ours = inode(&rustix::fs::fstat(&fd)?);
            match rustix::fs::statat(&self.fd, &name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if locked && inode(&st) == ours => return Ok((File::from(fd), name)),
                _ => last = io::Error::other("a temporary file was removed while it was created"),
            }
        }
        Err(last)
    }
}

/// `O_TMPFILE` is not supported here (file system, kernel, or no `/proc`).
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error().map(Errno::from_raw_os_error),
        Some(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL | Errno::NOSYS)
    )
}

/// A file being received.
#[derive(Debug)]
pub struct Incoming {
    dir: Arc<OutDir>,
    file: Option<File>,
    /// The inode we write: the only one we ever name or remove.
    ours: (u64, u64),
    /// The temporary's name, where the file has one.
    temp: Option<String>,
    written: u64,
    /// Wakes the background syncer; dropping it ends the syncer.
    syncer: Option<(std::sync::mpsc::SyncSender<()>, std::thread::JoinHandle<()>)>,
}

fn spawn_syncer(
    file: &File,
) -> Option<(std::sync::mpsc::SyncSender<()>, std::thread::JoinHandle<()>)> {
    let handle = file.try_clone().ok()?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
    let thread = std::thread::Builder::new()
        .name("fdatasync".into())
        .spawn(move || {
            while rx.recv().is_ok() {
                // Errors surface at the final sync_all, which is checked.
                let _ = handle.sync_data();
            }
        })
        .ok()?;
    Some((tx, thread))
}

impl Incoming {
    /// Appends verified plaintext (whole chunks: no buffering needed).
    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        let f = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("file already finished"))?;
        f.write_all(data)?;
        let before = self.written;
        self.written += data.len() as u64;
        if before / SYNC_EVERY != self.written / SYNC_EVERY
            && let Some((wake, _)) = &self.syncer
        {
            // If the syncer is still busy, the next multiple will wake it.
            let _ = wake.try_send(());
        }
        Ok(())
    }

    /// Fsyncs, then links the file under the first free name of `name`
    /// (already checked by [`filename::check`]), checks that the name is this
    /// very file, and fsyncs the directory. Returns the final path.
    pub fn finish(mut self, name: &str) -> io::Result<PathBuf> {
        let file = self
            .file
            .take()
            .ok_or_else(|| io::Error::other("file already finished"))?;
        if let Some((wake, thread)) = self.syncer.take() {
            drop(wake);
            let _ = thread.join();
        }
        file.sync_all()?;
        for candidate in filename::candidates(name) {
            match self.link(&file, &candidate) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
            // What now has the name must be exactly what was verified.
            let placed =
                rustix::fs::statat(&self.dir.fd, candidate.as_str(), AtFlags::SYMLINK_NOFOLLOW)?;
            if inode(&placed) != self.ours {
                return Err(io::Error::other(format!(
                    "{} was replaced while it was being placed: it is not the file that was \
                     verified, and was left alone",
                    self.dir.path.join(&candidate).display()
                )));
            }
            if let Some(temp) = self.temp.take() {
                self.dir.remove_if(&temp, self.ours);
            }
            rustix::fs::fsync(&self.dir.fd)?;
            return Ok(self.dir.path.join(candidate));
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{name} and {name} (1) … (99) all exist in {}",
                self.dir.path.display()
            ),
        ))
    }

    /// Gives `file` the name `target` in the out dir, by descriptor where
    /// `/proc` allows it, else (a named temporary only) by the temporary's name.
    fn link(&self, file: &File, target: &str) -> io::Result<()> {
        let result = if self.dir.proc_fd {
            let by_fd = format!("{PROC_FD}/{}", file.as_raw_fd());
            rustix::fs::linkat(
                rustix::fs::CWD,
                by_fd.as_str(),
                &self.dir.fd,
                target,
                AtFlags::SYMLINK_FOLLOW,
            )
        } else {
            let temp = self.temp.as_deref().ok_or(Errno::OPNOTSUPP)?;
            rustix::fs::linkat(&self.dir.fd, temp, &self.dir.fd, target, AtFlags::empty())
        };
        result.map_err(|e| match e {
            // A named temporary that lost its name can no longer be linked
            // (only `O_TMPFILE` inodes can be given a name again).
            Errno::NOENT if self.temp.is_some() => io::Error::other(format!(
                "the temporary file in {} was removed or replaced by someone else; \
                 nothing was placed",
                self.dir.path.display()
            )),
            e => e.into(),
        })
    }

    /// Creates a named temporary even where `O_TMPFILE` works, to test the
    /// fallback; `proc_fd: false` also takes away linking by descriptor.
    #[cfg(test)]
    fn create_named_for_test(dir: &Arc<OutDir>, tid: &TransferId) -> io::Result<Self> {
        let (file, name) = dir.create_named(tid)?;
        let ours = inode(&rustix::fs::fstat(&file)?);
        Ok(Self {
            dir: Arc::clone(dir),
            syncer: None,
            file: Some(file),
            ours,
            temp: Some(name),
            written: 0,
        })
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        // Finished or not, a temporary name must not outlive the transfer;
        // only our own inode is ever removed.
        if let Some(temp) = self.temp.take() {
            self.dir.remove_if(&temp, self.ours);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("keyferry-output-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn names(d: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    fn temps(d: &Path) -> Vec<String> {
        names(d)
            .into_iter()
            .filter(|n| n.starts_with(TEMP_PREFIX))
            .collect()
    }

    #[test]
    fn never_replaces_an_existing_file_and_leaves_no_temporary() {
        let d = dir("collide");
        fs::write(d.join("a.txt"), b"old").unwrap();
        let out = OutDir::open(&d).unwrap();
        let mut inc = out.create(&TransferId([1; 16])).unwrap();
        // O_TMPFILE: nothing has a name while the data arrives.
        assert!(inc.temp.is_none());
        inc.write(b"new").unwrap();
        assert_eq!(names(&d), ["a.txt"]);
        let path = inc.finish("a.txt").unwrap();
        assert_eq!(path, d.join("a (1).txt"));
        assert_eq!(fs::read(d.join("a.txt")).unwrap(), b"old");
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(names(&d), ["a (1).txt", "a.txt"]);
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        fs::remove_dir_all(d).unwrap();
    }

    /// Renames a file of the attacker's over the temporary's name.
    fn swap_in(d: &Path, temp: &str) {
        fs::write(d.join("evil"), b"attacker's bytes").unwrap();
        fs::rename(d.join("evil"), d.join(temp)).unwrap();
    }

    #[test]
    fn a_swapped_temporary_never_gets_the_final_name() {
        let d = dir("swap");
        let out = OutDir::open(&d).unwrap();
        // Linked through /proc/self/fd: the attacker's file is never linked,
        // our unlinked inode cannot be, so the transfer fails with nothing
        // placed, and the attacker's file is not ours to remove.
        let mut inc = Incoming::create_named_for_test(&out, &TransferId([3; 16])).unwrap();
        inc.write(b"verified bytes").unwrap();
        let temp = inc.temp.clone().unwrap();
        swap_in(&d, &temp);
        let err = inc.finish("f.bin").unwrap_err();
        assert!(err.to_string().contains("removed or replaced"), "{err}");
        assert!(!d.join("f.bin").exists());
        assert_eq!(fs::read(d.join(&temp)).unwrap(), b"attacker's bytes");
        fs::remove_file(d.join(&temp)).unwrap();
        // Untouched, the named temporary is linked by descriptor as usual.
        let mut inc = Incoming::create_named_for_test(&out, &TransferId([3; 16])).unwrap();
        inc.write(b"verified bytes").unwrap();
        let path = inc.finish("f.bin").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"verified bytes");
        assert!(temps(&d).is_empty());

        // Without /proc the name is linked, then found not to be our inode:
        // refused, and nothing of the attacker's is removed.
        let blind = Arc::new(OutDir {
            fd: rustix::fs::open(&d, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap(),
            path: d.clone(),
            proc_fd: false,
        });
        let mut inc = Incoming::create_named_for_test(&blind, &TransferId([4; 16])).unwrap();
        inc.write(b"verified bytes").unwrap();
        let temp = inc.temp.clone().unwrap();
        swap_in(&d, &temp);
        let err = inc.finish("g.bin").unwrap_err();
        assert!(err.to_string().contains("replaced"), "{err}");
        assert_eq!(fs::read(d.join("g.bin")).unwrap(), b"attacker's bytes");
        assert_eq!(fs::read(d.join(&temp)).unwrap(), b"attacker's bytes");
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn start_up_clean_up_spares_what_a_live_receiver_holds() {
        let d = dir("clean");
        let out = OutDir::open(&d).unwrap();
        // A live receiver's temporary (locked) and one a killed receiver left.
        let live = Incoming::create_named_for_test(&out, &TransferId([5; 16])).unwrap();
        let live_name = live.temp.clone().unwrap();
        fs::write(
            d.join(".keyferry-0011-00.part"),
            b"left by a killed receiver",
        )
        .unwrap();
        fs::write(d.join("keep.part"), b"not ours").unwrap();
        assert_eq!(out.clean_stale().unwrap(), 1);
        assert_eq!(temps(&d), [live_name]);
        // Abandoned, the live one removes its own temporary.
        drop(live);
        assert!(temps(&d).is_empty());
        assert_eq!(names(&d), ["keep.part"]);
        fs::remove_dir_all(d).unwrap();
    }
}
