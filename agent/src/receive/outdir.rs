//! The receiver's out dir (PROTOCOL.md §7.1), opened once and used only by
//! descriptor: the private staging directory each transfer is received into
//! ([`Staging`]), and the clean-up at start-up.
//!
//! A transfer's staging directory is `.keyferry-<id>.d`, where `id` binds
//! the transfer's origin (PROTOCOL.md §6.4) to its sender's key
//! ([`StagingId`]): the next attempt of that sender finds it by that name,
//! and no other sender can name it. It is created mode 0700, opened without
//! following a link, and must belong to this user with no access for
//! others, so nobody else can swap anything inside it; and it is held under
//! an exclusive `flock` while a receiver works in it. What holds its name
//! instead is dealt with by [`super::claim`]: removed if it is ours or no
//! directory at all, left alone (the transfer then goes to
//! `.keyferry-<id>-<stream id>.d`) if another user owns it. At start-up,
//! staging directories that no live receiver holds are removed unless their
//! journal is valid and not expired (those are kept to be resumed), and the
//! `.part` temporaries of version 1 receivers are removed the same way.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use keyferry_common::crypto::keys::MacKey;
use keyferry_common::identity::Fingerprint;
use keyferry_common::ids::StreamId;
use rustix::fs::{AtFlags, FileType, FlockOperation, Mode, OFlags, Stat};
use rustix::io::Errno;
use sha2::{Digest as _, Sha256};

use super::claim::{Claim, LOCK_WAIT, claim};
use super::staging::Staging;

const PREFIX: &str = ".keyferry-";
const STAGING_SUFFIX: &str = ".d";
const V1_SUFFIX: &str = ".part";

/// What names a transfer's staging directory: the first 16 bytes of
/// `H("keyferry staging" ‖ origin ‖ sender_fp)`, so that one sender's
/// attempts find it and no other sender can use or remove it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StagingId(pub [u8; 16]);

impl StagingId {
    /// The staging id of a transfer of `origin` from the key `sender_fp`.
    pub fn of(origin: &StreamId, sender_fp: &Fingerprint) -> Self {
        let mut h = Sha256::new();
        h.update(b"keyferry staging");
        h.update(origin.0);
        h.update(sender_fp.0);
        let digest: [u8; 32] = h.finalize().into();
        let mut id = [0; 16];
        id.copy_from_slice(&digest[..16]);
        Self(id)
    }
}

impl std::fmt::Display for StagingId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

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
    empty_dir(sub.as_fd())?;
    Ok(rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)?)
}

/// Removes everything inside the directory `dir`, never following a link.
pub fn empty_dir(dir: BorrowedFd<'_>) -> io::Result<()> {
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(dir)? {
        let entry = entry?;
        let n = entry.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(entry.file_name().to_owned());
        }
    }
    for n in names {
        match n.to_str() {
            Ok(s) => remove_all_at(dir, s)?,
            // Not a name we ever make; removed all the same.
            Err(_) => rustix::fs::unlinkat(dir, n.as_c_str(), AtFlags::empty())?,
        }
    }
    Ok(())
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

    /// The staging directory's name for the transfer `id`.
    pub fn staging_name(id: &StagingId) -> String {
        format!("{PREFIX}{id}{STAGING_SUFFIX}")
    }

    /// The name a transfer `id` uses for its attempt `attempt` when another
    /// user's entry holds [`Self::staging_name`].
    fn alternate_name(id: &StagingId, attempt: &StreamId) -> String {
        format!("{PREFIX}{id}-{attempt}{STAGING_SUFFIX}")
    }

    /// A new, empty staging directory for attempt `attempt` of transfer
    /// `id`, locked. Whatever of ours held its name is removed first (the
    /// caller decided not to resume it); if another user's entry holds the
    /// name, the directory is made under the attempt's own name beside it.
    pub fn fresh(self: &Arc<Self>, id: &StagingId, attempt: &StreamId) -> io::Result<Staging> {
        let name = Self::staging_name(id);
        for _ in 0..3 {
            match claim(self.fd(), &name, LOCK_WAIT)? {
                Claim::Ours(dir) => Staging::open(Arc::clone(self), name.clone(), dir)?.remove()?,
                Claim::Absent => {}
                Claim::Foreign => break,
            }
            match self.make(&name) {
                Err(e) if e.raw_os_error() == Some(Errno::EXIST.raw_os_error()) => continue,
                made => return made,
            }
        }
        self.make(&Self::alternate_name(id, attempt))
    }

    /// Makes the staging directory `name`, private, and locks it.
    fn make(self: &Arc<Self>, name: &str) -> io::Result<Staging> {
        rustix::fs::mkdirat(&self.fd, name, Mode::from_raw_mode(0o700))?;
        let dir = open_private_dir(self.fd(), name)?;
        Staging::create(Arc::clone(self), name.to_owned(), dir)
    }

    /// The staging directory an earlier attempt of transfer `id` left, if
    /// there is one we can trust, locked (see [`super::claim`]: what cannot
    /// be trusted is removed, or left alone if it is another user's); an
    /// error of kind `WouldBlock` if another live transfer still holds it
    /// after [`LOCK_WAIT`].
    pub fn existing(self: &Arc<Self>, id: &StagingId) -> io::Result<Option<Staging>> {
        let name = Self::staging_name(id);
        match claim(self.fd(), &name, LOCK_WAIT)? {
            Claim::Ours(dir) => return Staging::open(Arc::clone(self), name, dir).map(Some),
            Claim::Absent => return Ok(None),
            Claim::Foreign => {}
        }
        // Its name is taken by another user: an earlier attempt went beside it.
        let beside = format!("{PREFIX}{id}-");
        for other in self.names(|n| n.starts_with(&beside) && n.ends_with(STAGING_SUFFIX))? {
            if let Claim::Ours(dir) = claim(self.fd(), &other, LOCK_WAIT)? {
                return Staging::open(Arc::clone(self), other, dir).map(Some);
            }
        }
        Ok(None)
    }

    /// The names in the out dir that pass `keep`.
    fn names(&self, keep: impl Fn(&str) -> bool) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in rustix::fs::Dir::read_from(&self.fd)? {
            let entry = entry?;
            if let Ok(name) = entry.file_name().to_str()
                && keep(name)
            {
                names.push(name.to_owned());
            }
        }
        Ok(names)
    }

    /// Removes what killed receivers left behind, keeping staging
    /// directories whose journal (checked with `key`) is valid at `now`.
    /// Anything a live receiver holds is left alone.
    pub fn clean_stale(self: &Arc<Self>, key: &MacKey, now: u64) -> io::Result<Cleaned> {
        let mut done = Cleaned::default();
        for name in self.names(|n| n.starts_with(PREFIX))? {
            if name.ends_with(V1_SUFFIX) {
                done.removed += usize::from(self.remove_unlocked_file(&name));
            } else if name.ends_with(STAGING_SUFFIX) {
                match claim(self.fd(), &name, std::time::Duration::ZERO) {
                    Ok(Claim::Ours(dir)) => {
                        let staging = Staging::open(Arc::clone(self), name, dir)?;
                        if staging.read_journal(key, now).is_ok() {
                            done.kept += 1;
                        } else {
                            staging.remove()?;
                            done.removed += 1;
                        }
                    }
                    // Untrusted, and removed.
                    Ok(Claim::Absent) => done.removed += 1,
                    // Another user's, or a live receiver's: left alone.
                    Ok(Claim::Foreign) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
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

    fn id(origin: StreamId) -> StagingId {
        StagingId::of(&origin, &Fingerprint([1; 32]))
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
            state: None,
            marks: Vec::new(),
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
        out.fresh(&id(kept), &kept)
            .unwrap()
            .write_journal(&journal(kept, now), &key)
            .unwrap();
        let held = out.fresh(&id(live), &live).unwrap();
        drop(out.fresh(&id(empty), &empty).unwrap());
        out.fresh(&id(old), &old)
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
            OutDir::staging_name(&id(kept)),
            OutDir::staging_name(&id(live)),
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
        let staging = out.fresh(&id(origin), &origin).unwrap();
        let name = OutDir::staging_name(&id(origin));
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
        let held = out.fresh(&id(origin), &origin).unwrap();
        let asked = std::time::Instant::now();
        let err = out.existing(&id(origin)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        // It waited for the other transfer to wind down first.
        assert!(asked.elapsed() >= LOCK_WAIT, "{:?}", asked.elapsed());
        drop(held);
        assert!(out.existing(&id(origin)).unwrap().is_some());
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_name_another_user_holds_sends_the_transfer_beside_it_and_a_retry_finds_it_there() {
        // Only root can give a directory away.
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: giving a directory to another user needs root");
            return;
        }
        let d = temp("foreign");
        let out = OutDir::open_or_create(&d).unwrap().0;
        let (origin, attempt) = (StreamId([7; 16]), StreamId([8; 16]));
        let name = OutDir::staging_name(&id(origin));
        fs::create_dir(d.join(&name)).unwrap();
        std::os::unix::fs::chown(d.join(&name), Some(65534), Some(65534)).unwrap();
        let key = MacKey::from_bytes([7; 32]);
        let now = 1_800_000_000;
        let staging = out.fresh(&id(origin), &attempt).unwrap();
        staging.write_journal(&journal(origin, now), &key).unwrap();
        drop(staging);
        let beside = OutDir::alternate_name(&id(origin), &attempt);
        assert!(d.join(&beside).is_dir());
        let found = out.existing(&id(origin)).unwrap().unwrap();
        assert!(found.read_journal(&key, now).is_ok());
        drop(found);
        // The other user's directory was never touched.
        assert!(d.join(&name).is_dir());
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
