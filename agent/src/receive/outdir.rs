//! The receiver's out dir (PROTOCOL.md §7.1), opened once and used only by
//! descriptor: the private staging directory each transfer is received into
//! ([`Staging`]), and the clean-up at start-up.
//!
//! A transfer's staging directory is `.keyferry-<origin>.d`, where `origin`
//! is the transfer's origin (PROTOCOL.md §6.4): the next attempt finds
//! it by that name. It is created mode 0700, opened without following a
//! link, and must belong to this user with no access for others, so nobody
//! else can swap anything inside it; and it is held under an exclusive
//! `flock` while a receiver works in it. At start-up, staging directories
//! that no live receiver holds are removed unless their journal is valid
//! and not expired (those are kept to be resumed), and the `.part`
//! temporaries of version 1 receivers are removed the same way.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use keyferry_common::crypto::keys::MacKey;
use keyferry_common::ids::StreamId;
use rustix::fs::{AtFlags, FileType, FlockOperation, Mode, OFlags, Stat};
use rustix::io::Errno;

use super::staging::Staging;

const PREFIX: &str = ".keyferry-";
const STAGING_SUFFIX: &str = ".d";
const V1_SUFFIX: &str = ".part";

/// Which file a name or descriptor refers to.
pub fn inode(st: &Stat) -> (u64, u64) {
    (st.st_dev, st.st_ino)
}

/// Opens directory `name` in `dir` without following a link, and checks
/// that it is ours and closed to others.
pub fn open_private_dir(dir: BorrowedFd<'_>, name: &str) -> io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(dir, name, flags, Mode::empty())?;
    let st = rustix::fs::fstat(&fd)?;
    if st.st_uid != rustix::process::geteuid().as_raw() || st.st_mode & 0o077 != 0 {
        return Err(io::Error::other(format!(
            "{name} belongs to someone else or is open to other users; it was left alone"
        )));
    }
    Ok(fd)
}

/// Removes `name` in `dir` and everything below it, never following a link.
pub fn remove_all_at(dir: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return Ok(rustix::fs::unlinkat(dir, name, AtFlags::empty())?);
    }
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let sub = rustix::fs::openat(dir, name, flags, Mode::empty())?;
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(&sub)? {
        let entry = entry?;
        let n = entry.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(entry.file_name().to_owned());
        }
    }
    for n in names {
        match n.to_str() {
            Ok(s) => remove_all_at(sub.as_fd(), s)?,
            // Not a name we ever make; removed all the same.
            Err(_) => rustix::fs::unlinkat(&sub, n.as_c_str(), AtFlags::empty())?,
        }
    }
    Ok(rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)?)
}

/// What the start-up clean-up did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Cleaned {
    /// Temporaries removed (no valid journal, or a version 1 `.part`).
    pub removed: usize,
    /// Staging directories kept to be resumed.
    pub kept: usize,
}

/// The receiver's out dir, opened once.
#[derive(Debug)]
pub struct OutDir {
    fd: OwnedFd,
    path: PathBuf,
}

impl OutDir {
    /// Opens `path`, which must be a directory. One that does not exist is
    /// created (mode 0700) if its parent does; otherwise the error says which
    /// `mkdir` to run. Returns whether it was created.
    pub fn open_or_create(path: &Path) -> io::Result<(Arc<Self>, bool)> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let not_dir = |e| match e {
            Errno::NOTDIR => io::Error::other("not a directory"),
            e => e.into(),
        };
        let (fd, created) = match rustix::fs::open(path, flags, Mode::empty()) {
            Ok(fd) => (fd, false),
            Err(Errno::NOENT) => {
                match rustix::fs::mkdir(path, Mode::RWXU) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(Errno::NOENT) => {
                        return Err(io::Error::other(format!(
                            "it does not exist, nor does its parent; create it with: mkdir -p {}",
                            shell_quoted(path)
                        )));
                    }
                    Err(e) => return Err(e.into()),
                }
                // Opened without following a link: what was just made, or
                // a directory someone else put there meanwhile.
                let fd = rustix::fs::open(path, flags | OFlags::NOFOLLOW, Mode::empty())
                    .map_err(not_dir)?;
                (fd, true)
            }
            Err(e) => return Err(not_dir(e)),
        };
        Ok((
            Arc::new(Self {
                fd,
                path: path.to_owned(),
            }),
            created,
        ))
    }

    /// The directory's descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
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

    /// The staging directory's name for a transfer of origin `origin`.
    pub fn staging_name(origin: &StreamId) -> String {
        format!("{PREFIX}{origin}{STAGING_SUFFIX}")
    }

    /// A new, empty staging directory for `origin`, locked. One that is
    /// already there and that no live receiver holds is removed first.
    pub fn fresh(self: &Arc<Self>, origin: &StreamId) -> io::Result<Staging> {
        let name = Self::staging_name(origin);
        match self.existing(origin) {
            Ok(Some(old)) => old.remove()?,
            Ok(None) => {}
            Err(e) => return Err(e),
        }
        rustix::fs::mkdirat(&self.fd, name.as_str(), Mode::from_raw_mode(0o700))?;
        let dir = open_private_dir(self.fd(), &name)?;
        Staging::create(Arc::clone(self), name, dir)
    }

    /// The staging directory of `origin` if there is one, locked; an error
    /// if another live receiver holds it.
    pub fn existing(self: &Arc<Self>, origin: &StreamId) -> io::Result<Option<Staging>> {
        let name = Self::staging_name(origin);
        let dir = match open_private_dir(self.fd(), &name) {
            Ok(dir) => dir,
            Err(e) if e.raw_os_error() == Some(Errno::NOENT.raw_os_error()) => return Ok(None),
            Err(e) => return Err(e),
        };
        if rustix::fs::flock(&dir, FlockOperation::NonBlockingLockExclusive).is_err() {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "another receiver is working on this transfer",
            ));
        }
        Staging::open(Arc::clone(self), name, dir).map(Some)
    }

    /// Removes what killed receivers left behind, keeping staging
    /// directories whose journal (checked with `key`) is valid at `now`.
    /// Anything a live receiver holds is left alone.
    pub fn clean_stale(self: &Arc<Self>, key: &MacKey, now: u64) -> io::Result<Cleaned> {
        let mut done = Cleaned::default();
        let mut names = Vec::new();
        for entry in rustix::fs::Dir::read_from(&self.fd)? {
            let entry = entry?;
            if let Ok(name) = entry.file_name().to_str()
                && name.starts_with(PREFIX)
            {
                names.push(name.to_owned());
            }
        }
        for name in names {
            if name.ends_with(V1_SUFFIX) {
                done.removed += usize::from(self.remove_unlocked_file(&name));
            } else if name.ends_with(STAGING_SUFFIX) {
                let Ok(dir) = open_private_dir(self.fd(), &name) else {
                    continue;
                };
                if rustix::fs::flock(&dir, FlockOperation::NonBlockingLockExclusive).is_err() {
                    continue; // a live receiver holds it
                }
                let staging = Staging::open(Arc::clone(self), name, dir)?;
                if staging.read_journal(key, now).is_ok() {
                    done.kept += 1;
                } else {
                    staging.remove()?;
                    done.removed += 1;
                }
            }
        }
        Ok(done)
    }

    /// Removes a regular file no live process holds locked; whether it did.
    fn remove_unlocked_file(&self, name: &str) -> bool {
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let Ok(fd) = rustix::fs::openat(&self.fd, name, flags, Mode::empty()) else {
            return false;
        };
        let Ok(st) = rustix::fs::fstat(&fd) else {
            return false;
        };
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile
            || rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive).is_err()
        {
            return false;
        }
        // Removed only if the name still is that file.
        rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW)
            .is_ok_and(|now| inode(&now) == inode(&st))
            && rustix::fs::unlinkat(&self.fd, name, AtFlags::empty()).is_ok()
    }
}

/// `path` as a shell word: as it is if it holds only safe characters, else
/// in single quotes.
fn shell_quoted(path: &Path) -> String {
    let s = path.to_string_lossy();
    let safe = |c: char| c.is_ascii_alphanumeric() || "/._-+,:@%=".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::PathBuf;

    use keyferry_common::identity::Fingerprint;
    use keyferry_common::name::AgentName;

    use super::super::journal::Journal;
    use super::*;

    fn temp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("keyferry-outdir-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn journal(origin: StreamId, created: u64) -> Journal {
        Journal {
            origin,
            sender: AgentName::new("alice").unwrap(),
            sender_fp: Fingerprint([1; 32]),
            manifest_hash: [2; 32],
            total: 10,
            verified: 5,
            created,
        }
    }

    #[test]
    fn start_up_clean_up_keeps_what_can_resume_and_what_a_live_receiver_holds() {
        let d = temp("clean");
        let out = OutDir::open_or_create(&d).unwrap().0;
        let key = MacKey::from_bytes([7; 32]);
        let now = 1_800_000_000;
        let (kept, live, empty, old) = (
            StreamId([1; 16]),
            StreamId([2; 16]),
            StreamId([3; 16]),
            StreamId([4; 16]),
        );
        out.fresh(&kept)
            .unwrap()
            .write_journal(&journal(kept, now), &key)
            .unwrap();
        let held = out.fresh(&live).unwrap();
        drop(out.fresh(&empty).unwrap());
        out.fresh(&old)
            .unwrap()
            .write_journal(&journal(old, now - 8 * 24 * 3600), &key)
            .unwrap();
        fs::write(d.join(".keyferry-00aa-11.part"), b"a version 1 leftover").unwrap();
        fs::write(d.join("keep.txt"), b"not ours").unwrap();
        let done = out.clean_stale(&key, now).unwrap();
        assert_eq!(
            done,
            Cleaned {
                removed: 3,
                kept: 1
            }
        );
        let mut names: Vec<String> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        let mut want = vec![
            OutDir::staging_name(&kept),
            OutDir::staging_name(&live),
            "keep.txt".to_owned(),
        ];
        want.sort();
        assert_eq!(names, want);
        // A journal under another key is not believed either.
        let other = MacKey::from_bytes([8; 32]);
        assert_eq!(out.clean_stale(&other, now).unwrap().removed, 1);
        drop(held);
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_staging_directory_moved_away_leaves_what_took_its_name_alone() {
        let d = temp("moved");
        let out = OutDir::open_or_create(&d).unwrap().0;
        let origin = StreamId([5; 16]);
        let staging = out.fresh(&origin).unwrap();
        let name = OutDir::staging_name(&origin);
        fs::rename(d.join(&name), d.join("moved")).unwrap();
        fs::create_dir(d.join(&name)).unwrap();
        fs::write(d.join(&name).join("theirs"), b"x").unwrap();
        staging.remove().unwrap();
        assert!(d.join(&name).join("theirs").exists());
        // What it removed is its own content, through its own descriptor.
        assert_eq!(fs::read_dir(d.join("moved")).unwrap().count(), 0);
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_staging_directory_another_receiver_holds_is_not_taken() {
        let d = temp("busy");
        let out = OutDir::open_or_create(&d).unwrap().0;
        let origin = StreamId([6; 16]);
        let held = out.fresh(&origin).unwrap();
        let err = out.existing(&origin).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        drop(held);
        assert!(out.existing(&origin).unwrap().is_some());
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_path_is_quoted_for_the_shell_only_when_it_needs_it() {
        assert_eq!(
            shell_quoted(Path::new("/srv/in-box/a.b")),
            "/srv/in-box/a.b"
        );
        assert_eq!(shell_quoted(Path::new("/srv/my box")), "'/srv/my box'");
        assert_eq!(shell_quoted(Path::new("it's")), r"'it'\''s'");
    }
}
