//! What a staging directory's name in the out dir holds (PROTOCOL.md §7.4):
//! nothing, a directory of ours that can be trusted (taken, locked), or
//! something that cannot be trusted. What is provably ours (our user's
//! directory, however its mode was changed) or provably nothing of ours (a
//! symbolic link, a file, a device in our place) is removed — by descriptor,
//! never following a link, a link removed as the link; what belongs to
//! another user is left alone, and the transfer goes elsewhere.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use rustix::fs::{AtFlags, FileType, FlockOperation, Mode, OFlags};
use rustix::io::Errno;

use super::outdir::{empty_dir, inode};

/// What the name holds.
#[derive(Debug)]
pub enum Claim {
    /// Nothing (any more: something untrusted there was removed).
    Absent,
    /// Our private directory, locked by us.
    Ours(OwnedFd),
    /// Something another user owns, which we may not touch.
    Foreign,
}

/// How long to wait for a staging directory another transfer of this
/// receiver (or another receiver) holds: a transfer that was cut winds down
/// (it journals and syncs what verified) before the next attempt may go on.
pub const LOCK_WAIT: Duration = Duration::from_secs(10);

/// Claims `name` in `dir` (see the module docs). A directory of ours that
/// stays locked for `wait` is `WouldBlock`.
pub fn claim(dir: BorrowedFd<'_>, name: &str, wait: Duration) -> io::Result<Claim> {
    // A name that changes under us while we look is looked at again; one
    // that keeps changing is someone else's game, and left alone.
    for _ in 0..3 {
        let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => return Ok(Claim::Absent),
            Err(e) => return Err(e.into()),
        };
        let me = rustix::process::geteuid().as_raw();
        if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
            // A link, a file or a device where our directory should be: not
            // ours to trust. Removed as itself (a link is never followed);
            // one we may not remove (another user's, in a sticky out dir)
            // is left alone.
            return match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => Ok(Claim::Absent),
                Err(Errno::PERM | Errno::ACCESS | Errno::ISDIR) => Ok(Claim::Foreign),
                Err(e) => Err(e.into()),
            };
        }
        if st.st_uid != me {
            return Ok(Claim::Foreign);
        }
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = match rustix::fs::openat(dir, name, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT | Errno::LOOP | Errno::NOTDIR) => continue,
            Err(e) => return Err(e.into()),
        };
        let now = rustix::fs::fstat(&fd)?;
        if inode(&now) != inode(&st) || now.st_uid != me {
            continue;
        }
        lock(&fd, wait)?;
        // Whoever held it may have removed it meanwhile (a transfer that
        // gave up its prefix): then the name is looked at again.
        let named = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW);
        if !named.is_ok_and(|st| inode(&st) == inode(&now)) {
            continue;
        }
        if now.st_mode & 0o077 == 0 {
            return Ok(Claim::Ours(fd));
        }
        // Ours, but others could reach into it: nothing in it is believed.
        // Emptied through its own descriptor, then its name removed if it
        // still is this directory.
        if empty_dir(fd.as_fd()).is_err() {
            return Ok(Claim::Foreign);
        }
        let named = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW);
        if named.is_ok_and(|st| inode(&st) == inode(&now)) {
            match rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(_) => return Ok(Claim::Foreign),
            }
        }
    }
    Ok(Claim::Foreign)
}

/// Takes the exclusive `flock` on `fd`, waiting at most `wait` for whoever
/// holds it; `WouldBlock` if they still do.
fn lock(fd: &OwnedFd, wait: Duration) -> io::Result<()> {
    let deadline = Instant::now() + wait;
    loop {
        match rustix::fs::flock(fd, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(()),
            Err(Errno::WOULDBLOCK) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(Errno::WOULDBLOCK) => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "another receiver is working on this transfer",
                ));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt as _;
    use std::path::PathBuf;

    use super::*;

    fn temp(tag: &str) -> (PathBuf, OwnedFd) {
        let d = std::env::temp_dir().join(format!("keyferry-claim-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        let fd = rustix::fs::open(&d, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
        (d, fd)
    }

    #[test]
    fn a_link_in_our_place_is_removed_as_a_link_and_its_target_left_alone() {
        let (d, fd) = temp("link");
        let target = d.join("elsewhere");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("keep"), b"theirs").unwrap();
        std::os::unix::fs::symlink(&target, d.join(".keyferry-x.d")).unwrap();
        assert!(matches!(
            claim(fd.as_fd(), ".keyferry-x.d", Duration::ZERO).unwrap(),
            Claim::Absent
        ));
        assert!(!d.join(".keyferry-x.d").exists());
        assert_eq!(fs::read(target.join("keep")).unwrap(), b"theirs");
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_file_in_our_place_is_removed() {
        let (d, fd) = temp("file");
        fs::write(d.join(".keyferry-x.d"), b"x").unwrap();
        assert!(matches!(
            claim(fd.as_fd(), ".keyferry-x.d", Duration::ZERO).unwrap(),
            Claim::Absent
        ));
        assert!(!d.join(".keyferry-x.d").exists());
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn our_directory_opened_to_others_is_emptied_and_removed_without_following_links() {
        let (d, fd) = temp("open");
        let outside = d.join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("keep"), b"x").unwrap();
        let ours = d.join(".keyferry-x.d");
        fs::create_dir_all(ours.join("t/sub")).unwrap();
        fs::write(ours.join("t/sub/f"), b"data").unwrap();
        std::os::unix::fs::symlink(&outside, ours.join("t/link")).unwrap();
        fs::set_permissions(&ours, fs::Permissions::from_mode(0o755)).unwrap();
        assert!(matches!(
            claim(fd.as_fd(), ".keyferry-x.d", Duration::ZERO).unwrap(),
            Claim::Absent
        ));
        assert!(!ours.exists());
        assert!(outside.join("keep").exists());
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn our_private_directory_is_ours_and_locked() {
        let (d, fd) = temp("ours");
        fs::create_dir(d.join(".keyferry-x.d")).unwrap();
        fs::set_permissions(d.join(".keyferry-x.d"), fs::Permissions::from_mode(0o700)).unwrap();
        let Claim::Ours(held) = claim(fd.as_fd(), ".keyferry-x.d", Duration::ZERO).unwrap() else {
            panic!("not ours")
        };
        let again = claim(fd.as_fd(), ".keyferry-x.d", Duration::from_millis(200)).unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::WouldBlock);
        drop(held);
        assert!(matches!(
            claim(fd.as_fd(), ".keyferry-x.d", Duration::ZERO).unwrap(),
            Claim::Ours(_)
        ));
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn another_users_directory_is_left_alone() {
        // Only root can give a directory away.
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: giving a directory to another user needs root");
            return;
        }
        let (d, fd) = temp("foreign");
        let theirs = d.join(".keyferry-x.d");
        fs::create_dir(&theirs).unwrap();
        fs::write(theirs.join("f"), b"theirs").unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        assert!(matches!(
            claim(fd.as_fd(), ".keyferry-x.d", Duration::ZERO).unwrap(),
            Claim::Foreign
        ));
        assert_eq!(fs::read(theirs.join("f")).unwrap(), b"theirs");
        fs::remove_dir_all(d).unwrap();
    }
}
