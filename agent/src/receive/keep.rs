//! The sender's permission bits and modification times, applied to a tree
//! that verified (PROTOCOL.md §7.2): by descriptor, never following a link;
//! a mode masked by this process's umask and never more than `0o777` (no
//! set-uid, set-gid or sticky bit, nor owner or group); a time only within
//! years 1 to 9999. Everything inside the tree before it is placed, deepest
//! first, so that a directory's own mode and time come after its contents;
//! a top-level directory's own mode and time once it is placed (moving a
//! directory needs its write permission, and may touch its time). What was
//! not applied as sent is said in one line each, never a failure.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use keyferry_common::manifest::{EntryKind, Manifest, Meta};
use keyferry_common::text::escape;
use rustix::fs::{Mode, OFlags, Timespec, Timestamps};

use super::outdir::inode;

/// This process's umask, read from `/proc/self/status` (setting it to read
/// it would race with other threads); `0o022` if it cannot be read.
pub fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

/// What applying did not do as the sender asked.
pub type Notes = Vec<String>;

/// Applies each entry's mode and time inside `tree`, deepest first, except
/// the top-level directories' own (see [`placed`]).
pub fn inside(tree: BorrowedFd<'_>, m: &Manifest, umask: u32) -> std::io::Result<Notes> {
    let mut notes = Notes::new();
    for e in m.entries.iter().rev() {
        let Some(meta) = e.meta else { continue };
        let dir = e.kind == EntryKind::Dir;
        if dir && e.path.len() == 1 {
            continue;
        }
        let path = e.path.join("/");
        let fd = open(tree, &path, dir)?;
        apply(fd.as_fd(), &meta, umask, &path, &mut notes)?;
    }
    Ok(notes)
}

/// Applies a top-level directory's own mode and time once it is placed as
/// `at` in `out` — if `at` is still the very directory that was built.
pub fn placed(
    out: BorrowedFd<'_>,
    at: &str,
    built: (u64, u64),
    meta: &Meta,
    umask: u32,
    notes: &mut Notes,
) -> std::io::Result<()> {
    let fd = open(out, at, true)?;
    if inode(&rustix::fs::fstat(&fd)?) != built {
        return Ok(());
    }
    apply(fd.as_fd(), meta, umask, at, notes)
}

/// Gives every entry inside `tree` back the modes it was built with (0700,
/// 0600), parents first, so that a tree that could not be placed can be
/// removed whatever modes were applied. `tree` is inside the private
/// staging directory, where nobody else can swap an entry for a link.
pub fn loosen(tree: BorrowedFd<'_>, m: &Manifest) {
    for e in &m.entries {
        let mode = if e.kind == EntryKind::Dir {
            0o700
        } else {
            0o600
        };
        let _ = rustix::fs::chmodat(
            tree,
            e.path.join("/").as_str(),
            Mode::from_raw_mode(mode),
            rustix::fs::AtFlags::empty(),
        );
    }
}

fn open(dir: BorrowedFd<'_>, path: &str, is_dir: bool) -> std::io::Result<OwnedFd> {
    let mut flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
    if is_dir {
        flags |= OFlags::DIRECTORY;
    }
    Ok(rustix::fs::openat(dir, path, flags, Mode::empty())?)
}

fn apply(
    fd: BorrowedFd<'_>,
    meta: &Meta,
    umask: u32,
    path: &str,
    notes: &mut Notes,
) -> std::io::Result<()> {
    let asked = u32::from(meta.mode);
    if asked & !0o777 != 0 {
        notes.push(format!(
            "{}: mode {asked:o} asked; only the permission bits are applied (no set-uid, \
             set-gid or sticky bit)",
            escape(path)
        ));
    }
    let mode = asked & 0o777 & !umask;
    if let Err(e) = rustix::fs::fchmod(fd, Mode::from_raw_mode(mode)) {
        notes.push(format!(
            "{}: mode {mode:o} could not be applied ({e})",
            escape(path)
        ));
    }
    match meta.time() {
        Some((s, ns)) => {
            let times = Timestamps {
                last_access: Timespec {
                    tv_sec: 0,
                    tv_nsec: rustix::fs::UTIME_OMIT,
                },
                last_modification: Timespec {
                    tv_sec: s,
                    tv_nsec: i64::from(ns),
                },
            };
            if let Err(e) = rustix::fs::futimens(fd, &times) {
                notes.push(format!(
                    "{}: its modification time ({s} s) could not be applied ({e})",
                    escape(path)
                ));
            }
        }
        None => notes.push(format!(
            "{}: modification time {} s {} ns is out of range; not applied",
            escape(path),
            meta.mtime_s,
            meta.mtime_ns
        )),
    }
    Ok(())
}
