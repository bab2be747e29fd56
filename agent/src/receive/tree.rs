//! Building a manifest's tree in a staging directory (PROTOCOL.md §7.2):
//! every directory and file made up front, mode 0700 and 0600, then the one
//! chunk stream cut into the files at the boundaries the manifest gives. A
//! resumed attempt first checks that the tree holds the verified prefix (and
//! hashes it, read back, for the sender to check) and cuts off anything past
//! it; nothing beyond the journal's count is trusted.
//!
//! Once the trailer verified, [`TreeWriter::place`] moves each top-level
//! item into the out dir under its own name (or the first free `name (n)`),
//! never over anything: `renameat2(RENAME_NOREPLACE)` from the private
//! directory's descriptor to the out dir's, and the placed name checked to be
//! the very inode that was built. If one item cannot be placed, those already
//! placed are moved back: nothing appears under a final name unless all do.

use std::fs::File;
use std::io::{self, Seek as _, SeekFrom, Write as _};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use keyferry_common::manifest::{EntryKind, Manifest};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags};
use rustix::io::Errno;
use sha2::Sha256;

use super::filename::{self, TopLevel};
use super::keep;
use super::outdir::inode;
use super::prefix::read_prefix;
use super::staging::Staging;

/// One file's place in the data.
#[derive(Debug, Clone)]
struct Span {
    path: String,
    start: u64,
    /// `u64::MAX` for a stream of unknown size.
    size: u64,
}

fn spans(m: &Manifest) -> Vec<Span> {
    let mut start = 0u64;
    let mut out = Vec::new();
    for e in &m.entries {
        let size = match e.kind {
            EntryKind::Dir => continue,
            EntryKind::File { size } => size,
            EntryKind::Stream => u64::MAX,
        };
        out.push(Span {
            path: e.path.join("/"),
            start,
            size,
        });
        start = start.saturating_add(size);
    }
    out
}

fn open_file(tree: &Staging, path: &str, flags: OFlags) -> io::Result<File> {
    let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(tree.tree(), path, flags, Mode::from_raw_mode(0o600))?;
    Ok(File::from(fd))
}

/// Writes the data of one manifest into its staging tree.
#[derive(Debug)]
pub struct TreeWriter {
    staging: Arc<Staging>,
    spans: Vec<Span>,
    /// The span being written.
    next: usize,
    /// Its file, once opened.
    open: Option<File>,
    /// Absolute offset of the next byte.
    pos: u64,
    /// Spans written since their data was last handed over to be synced.
    touched: Vec<bool>,
    /// Spans written at all by this writer (synced again before placing).
    written: Vec<bool>,
}

/// Whether a manifest is one file and nothing else: then the tree is synced
/// file by file, never with `syncfs` (which would also wait for every other
/// program's dirty data on that file system).
fn one_file(m: &Manifest) -> bool {
    matches!(&m.entries[..], [e] if e.kind != EntryKind::Dir)
}

impl TreeWriter {
    /// Starts from nothing: empties the tree, makes every directory and file
    /// of `m` (empty), and syncs: a single file and its directories by
    /// `fsync`, a tree of many entries by `syncfs`.
    pub fn fresh(mut staging: Staging, m: &Manifest) -> io::Result<Self> {
        staging.reset_tree()?;
        let mut made = None;
        for e in &m.entries {
            let path = e.path.join("/");
            match e.kind {
                EntryKind::Dir => {
                    rustix::fs::mkdirat(staging.tree(), path.as_str(), Mode::from_raw_mode(0o700))?
                }
                EntryKind::File { .. } | EntryKind::Stream => {
                    made = Some(open_file(
                        &staging,
                        &path,
                        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
                    )?);
                }
            }
        }
        match made {
            Some(f) if one_file(m) => {
                f.sync_all()?;
                staging.sync_dirs()?;
            }
            _ => staging.sync()?,
        }
        let spans = spans(m);
        Ok(Self {
            touched: vec![false; spans.len()],
            written: vec![false; spans.len()],
            staging: Arc::new(staging),
            spans,
            next: 0,
            open: None,
            pos: 0,
        })
    }

    /// Continues at `offset`: the tree must hold every byte before it (see
    /// [`Self::holds`]); the file that holds `offset` is cut there, and every
    /// later file emptied.
    pub fn resume(staging: Staging, m: &Manifest, offset: u64) -> io::Result<Self> {
        Self::holds(&staging, m, offset)?;
        let spans = spans(m);
        let mut next = spans.len();
        for (i, s) in spans.iter().enumerate() {
            let keep = offset.saturating_sub(s.start).min(s.size);
            if offset < s.start.saturating_add(s.size) || s.size == u64::MAX {
                let f = open_file(&staging, &s.path, OFlags::WRONLY)?;
                f.set_len(keep)?;
                if one_file(m) {
                    f.sync_data()?;
                }
                next = next.min(i);
            }
        }
        if !one_file(m) {
            staging.sync()?;
        }
        Ok(Self {
            touched: vec![false; spans.len()],
            written: vec![false; spans.len()],
            staging: Arc::new(staging),
            spans,
            next,
            open: None,
            pos: offset,
        })
    }

    /// Whether the tree in `staging` holds the first `offset` bytes of `m`'s
    /// data: every directory there, every file before `offset` whole, and the
    /// file at `offset` at least that long. An error says what is missing.
    pub fn holds(staging: &Staging, m: &Manifest, offset: u64) -> io::Result<()> {
        let missing = |what: &str| io::Error::other(format!("the received tree lacks {what}"));
        for e in &m.entries {
            let path = e.path.join("/");
            let st = rustix::fs::statat(staging.tree(), path.as_str(), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|_| missing("an entry"))?;
            let kind = FileType::from_raw_mode(st.st_mode);
            let want = match e.kind {
                EntryKind::Dir => FileType::Directory,
                _ => FileType::RegularFile,
            };
            if kind != want {
                return Err(missing("an entry of the right kind"));
            }
        }
        for s in spans(m) {
            if s.start >= offset {
                break;
            }
            let need = (offset - s.start).min(s.size);
            let st =
                rustix::fs::statat(staging.tree(), s.path.as_str(), AtFlags::SYMLINK_NOFOLLOW)?;
            if u64::try_from(st.st_size).unwrap_or(0) < need {
                return Err(missing("bytes its journal counts"));
            }
        }
        Ok(())
    }

    /// The SHA-256 state after the first `offset` bytes of `m`'s data as the
    /// tree in `staging` holds them now, read back from the files (after
    /// [`Self::holds`]): what a resumed transfer's accept proves to the
    /// sender and the receiver's hash runs on from (PROTOCOL.md §7.4), so a
    /// prefix damaged on disk since it verified is caught before anything is
    /// added to it. Fails (`TimedOut`) if it is not done by `deadline`.
    pub fn prefix_hash(
        staging: &Staging,
        m: &Manifest,
        offset: u64,
        deadline: Instant,
    ) -> io::Result<Sha256> {
        let late = || Instant::now() > deadline;
        read_prefix(staging.tree(), m, offset, &[], &late).map_err(|e| {
            if e.kind() == io::ErrorKind::Interrupted {
                io::Error::new(io::ErrorKind::TimedOut, "reading it back takes too long")
            } else {
                e
            }
        })
    }

    /// The staging directory (shared with the checkpoint thread).
    pub fn staging(&self) -> &Arc<Staging> {
        &self.staging
    }

    /// The staging directory back, once nothing else holds it.
    pub fn into_staging(self) -> Option<Staging> {
        Arc::try_unwrap(self.staging).ok()
    }

    /// Appends verified plaintext at the current offset, across as many
    /// files as it spans.
    pub fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let Some(span) = self.spans.get(self.next) else {
                return Err(io::Error::other("more data than the manifest lists"));
            };
            let room = span.size - (self.pos - span.start);
            if room == 0 {
                self.open = None;
                self.next += 1;
                continue;
            }
            let file = match &mut self.open {
                Some(f) => f,
                None => {
                    let mut f = open_file(&self.staging, &span.path, OFlags::WRONLY)?;
                    f.seek(SeekFrom::Start(self.pos - span.start))?;
                    self.open.insert(f)
                }
            };
            let n = usize::try_from(room).unwrap_or(usize::MAX).min(data.len());
            file.write_all(&data[..n])?;
            for flags in [&mut self.touched, &mut self.written] {
                if let Some(f) = flags.get_mut(self.next) {
                    *f = true;
                }
            }
            self.pos += n as u64;
            data = &data[n..];
        }
        Ok(())
    }

    /// The paths (in the tree) of the files written since the last call
    /// whose files were [`Self::handed_over`]: what a checkpoint must sync.
    pub fn touched_files(&self) -> Vec<String> {
        self.paths_of(&self.touched)
    }

    fn paths_of(&self, flags: &[bool]) -> Vec<String> {
        self.spans
            .iter()
            .zip(flags)
            .filter(|(_, f)| **f)
            .map(|(s, _)| s.path.clone())
            .collect()
    }

    /// The files of [`Self::touched_files`] were handed over to be synced.
    pub fn handed_over(&mut self) {
        self.touched.fill(false);
    }

    /// Syncs every file this writer wrote (those a checkpoint synced
    /// already cost little), then moves each top-level item into the out dir
    /// (see the module docs) and removes the staging directory. Returns the
    /// paths the items were placed at. The checkpoint thread must be
    /// finished. Directories and empty files were synced when they were made.
    /// If anything fails, nothing is placed and the staging directory is
    /// removed all the same: what verified cannot be resumed into a place
    /// (the next attempt would meet the same wall), and is not kept hidden.
    ///
    /// With `keep`, each entry's mode and time as the sender keeps them are
    /// applied first ([`keep`]), a top-level directory's own once placed;
    /// what was not applied as sent comes back as notes.
    pub fn place(
        self,
        tops: &[TopLevel],
        keep: Option<&Manifest>,
    ) -> Result<(Vec<PathBuf>, keep::Notes), PlaceError> {
        let synced = self
            .paths_of(&self.written)
            .iter()
            .try_for_each(|path| self.staging.sync_file(path));
        let Self { staging, open, .. } = self;
        drop(open);
        let staging = Arc::try_unwrap(staging).map_err(|_| {
            PlaceError::Io(io::Error::other("the staging directory is still in use"))
        })?;
        let umask = keep::umask();
        let mut notes = keep::Notes::new();
        let moved = synced
            .and_then(|()| match keep {
                Some(m) => keep::inside(staging.tree(), m, umask).map(|n| notes = n),
                None => Ok(()),
            })
            .map_err(PlaceError::Io)
            .and_then(|()| move_items(&staging, tops));
        match moved {
            Ok(placed) => {
                // A top-level directory's own mode and time, now it is placed.
                for (i, (at, built)) in placed.iter().enumerate() {
                    let meta = keep.and_then(|m| {
                        m.entries
                            .iter()
                            .find(|e| e.kind == EntryKind::Dir && e.path == [tops[i].name.as_str()])
                            .and_then(|e| e.meta)
                    });
                    if let Some(meta) = meta {
                        let out = staging.out();
                        if let Err(e) = keep::placed(out.fd(), at, *built, &meta, umask, &mut notes)
                        {
                            notes.push(format!("{at}: its mode and time were not applied ({e})"));
                        }
                    }
                }
                // Placed: what is left to tidy cannot undo that.
                let out = staging_out_path(&staging);
                if let Err(e) = staging.remove() {
                    notes.push(format!("the staging directory could not be removed ({e})"));
                }
                Ok((
                    placed.into_iter().map(|(at, _)| out.join(at)).collect(),
                    notes,
                ))
            }
            Err(e) => {
                if let Some(m) = keep {
                    keep::loosen(staging.tree(), m);
                }
                let _ = staging.remove();
                Err(e)
            }
        }
    }
}

/// Why a verified tree was not placed.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    /// A top-level item's name and all its numbered variants exist.
    #[error("no free name is left for {0}")]
    NoFreeName(String),
    /// Storage failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl From<Errno> for PlaceError {
    fn from(e: Errno) -> Self {
        Self::Io(e.into())
    }
}

/// Where a top-level item went, and which inode it is.
type PlacedItem = (String, (u64, u64));

/// The out dir's path, for the paths placed items are reported at.
fn staging_out_path(staging: &Staging) -> PathBuf {
    staging.out().path().to_owned()
}

/// Moves each top-level item from the staging tree into the out dir (all
/// or none), and syncs the out dir; returns the name each went to and its
/// inode.
fn move_items(staging: &Staging, tops: &[TopLevel]) -> Result<Vec<PlacedItem>, PlaceError> {
    let out = Arc::clone(staging.out());
    let mut placed: Vec<(&str, String, (u64, u64))> = Vec::new();
    let undo = |placed: &[(&str, String, (u64, u64))]| {
        for (name, at, _) in placed.iter().rev() {
            let _ = rustix::fs::renameat_with(
                out.fd(),
                at.as_str(),
                staging.tree(),
                *name,
                RenameFlags::NOREPLACE,
            );
        }
    };
    for top in tops {
        let ours = inode(&rustix::fs::statat(
            staging.tree(),
            top.name.as_str(),
            AtFlags::SYMLINK_NOFOLLOW,
        )?);
        let mut at = None;
        for candidate in filename::candidates(&top.stored) {
            match rustix::fs::renameat_with(
                staging.tree(),
                top.name.as_str(),
                out.fd(),
                candidate.as_str(),
                RenameFlags::NOREPLACE,
            ) {
                Ok(()) => {
                    at = Some(candidate);
                    break;
                }
                Err(Errno::EXIST | Errno::NOTEMPTY) => continue,
                Err(e) => {
                    undo(&placed);
                    return Err(PlaceError::Io(match e {
                        Errno::INVAL | Errno::NOSYS => io::Error::other(format!(
                            "the file system of {} cannot rename without replacing \
                             (RENAME_NOREPLACE)",
                            out.path().display()
                        )),
                        e => e.into(),
                    }));
                }
            }
        }
        let Some(at) = at else {
            undo(&placed);
            return Err(PlaceError::NoFreeName(format!(
                "{0}: {0} and {0} (1) … (99) all exist in {1}",
                top.stored,
                out.path().display()
            )));
        };
        // What now has the name must be exactly what was built.
        let now = rustix::fs::statat(out.fd(), at.as_str(), AtFlags::SYMLINK_NOFOLLOW)?;
        if inode(&now) != ours {
            undo(&placed);
            return Err(PlaceError::Io(io::Error::other(format!(
                "{} is not the item that was verified; it was left alone",
                out.path().join(&at).display()
            ))));
        }
        placed.push((&top.name, at, ours));
    }
    rustix::fs::fsync(out.fd())?;
    Ok(placed.into_iter().map(|(_, at, ino)| (at, ino)).collect())
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt as _;
    use std::path::Path;

    use keyferry_common::ids::StreamId;
    use keyferry_common::manifest::{Entry, EntryKind, Manifest};

    use super::super::filename::check_manifest;
    use super::super::outdir::{OutDir, StagingId};
    use super::*;
    use sha2::Digest as _;

    fn id(origin: StreamId) -> StagingId {
        StagingId::of(&origin, &keyferry_common::identity::Fingerprint([1; 32]))
    }

    fn temp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("keyferry-tree-{tag}-{}", std::process::id()));
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

    fn entry(path: &[&str], kind: EntryKind) -> Entry {
        Entry {
            path: path.iter().map(|s| (*s).to_owned()).collect(),
            kind,
            meta: None,
        }
    }

    fn tree() -> Manifest {
        Manifest {
            entries: vec![
                entry(&["a"], EntryKind::Dir),
                entry(&["a", "x"], EntryKind::File { size: 3 }),
                entry(&["a", "empty"], EntryKind::Dir),
                entry(&["b.txt"], EntryKind::File { size: 2 }),
            ],
        }
    }

    #[test]
    fn a_tree_is_placed_beside_what_exists_never_over_it() {
        let d = temp("place");
        fs::create_dir(d.join("a")).unwrap();
        fs::write(d.join("a/mine"), b"keep").unwrap();
        fs::write(d.join("b.txt"), b"old").unwrap();
        let out = OutDir::open_or_create(&d).unwrap().0;
        let m = tree();
        let mut w = TreeWriter::fresh(
            out.fresh(&id(StreamId([1; 16])), &StreamId([1; 16]))
                .unwrap(),
            &m,
        )
        .unwrap();
        // Cut across the file boundary on purpose.
        w.write(b"xy").unwrap();
        w.write(b"zhi").unwrap();
        let (placed, _) = w.place(&check_manifest(&m).unwrap(), None).unwrap();
        assert_eq!(placed, [d.join("a (1)"), d.join("b (1).txt")]);
        assert_eq!(fs::read(d.join("a (1)/x")).unwrap(), b"xyz");
        assert_eq!(fs::read(d.join("b (1).txt")).unwrap(), b"hi");
        assert!(d.join("a (1)/empty").is_dir());
        assert_eq!(fs::read(d.join("a/mine")).unwrap(), b"keep");
        assert_eq!(fs::read(d.join("b.txt")).unwrap(), b"old");
        let mode = |p: &str| fs::metadata(d.join(p)).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode("a (1)"), mode("a (1)/x")), (0o700, 0o600));
        // The staging directory is gone.
        assert_eq!(names(&d), ["a", "a (1)", "b (1).txt", "b.txt"]);
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn if_one_item_cannot_be_placed_none_is() {
        let d = temp("rollback");
        fs::write(d.join("b.txt"), b"old").unwrap();
        for n in 1..=99 {
            fs::write(d.join(format!("b ({n}).txt")), b"old").unwrap();
        }
        let out = OutDir::open_or_create(&d).unwrap().0;
        let m = tree();
        let mut w = TreeWriter::fresh(
            out.fresh(&id(StreamId([2; 16])), &StreamId([2; 16]))
                .unwrap(),
            &m,
        )
        .unwrap();
        w.write(b"xyzhi").unwrap();
        let err = w.place(&check_manifest(&m).unwrap(), None).unwrap_err();
        assert!(matches!(err, PlaceError::NoFreeName(_)), "{err}");
        assert!(err.to_string().contains("all exist"), "{err}");
        // `a` was placed first, and moved back when `b.txt` could not be.
        assert!(!d.join("a").exists());
        // And nothing of it is kept hidden: no staging directory is left.
        let left: Vec<String> = names(&d)
            .into_iter()
            .filter(|n| n.starts_with(".keyferry-"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_resumed_tree_is_cut_back_to_the_verified_prefix() {
        let d = temp("resume");
        let out = OutDir::open_or_create(&d).unwrap().0;
        let m = tree();
        let origin = StreamId([3; 16]);
        let mut w = TreeWriter::fresh(out.fresh(&id(origin), &origin).unwrap(), &m).unwrap();
        w.write(b"xyzh").unwrap();
        drop(w);
        let staging = out.existing(&id(origin)).unwrap().unwrap();
        TreeWriter::holds(&staging, &m, 4).unwrap();
        // More than the tree holds is refused.
        assert!(TreeWriter::holds(&staging, &m, 5).is_err());
        // The prefix read back and hashed, across the file boundary (`x`
        // holds 3 bytes, `b.txt` the fourth) and within a file.
        let later = Instant::now() + std::time::Duration::from_secs(60);
        for (at, bytes) in [(0, &b""[..]), (2, b"xy"), (3, b"xyz"), (4, b"xyzh")] {
            let got = TreeWriter::prefix_hash(&staging, &m, at, later).unwrap();
            assert_eq!(got.finalize(), Sha256::digest(bytes), "at {at}");
        }
        let past = Instant::now() - std::time::Duration::from_secs(1);
        let late = TreeWriter::prefix_hash(&staging, &m, 4, past).unwrap_err();
        assert_eq!(late.kind(), io::ErrorKind::TimedOut);
        // Resuming at 2 cuts `x` to two bytes and empties `b.txt`.
        let mut w = TreeWriter::resume(staging, &m, 2).unwrap();
        w.write(b"Zhi").unwrap();
        w.place(&check_manifest(&m).unwrap(), None).unwrap();
        assert_eq!(fs::read(d.join("a/x")).unwrap(), b"xyZ");
        assert_eq!(fs::read(d.join("b.txt")).unwrap(), b"hi");
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_tree_missing_an_entry_does_not_hold_its_prefix() {
        let d = temp("missing");
        let out = OutDir::open_or_create(&d).unwrap().0;
        let m = tree();
        let origin = StreamId([4; 16]);
        let mut w = TreeWriter::fresh(out.fresh(&id(origin), &origin).unwrap(), &m).unwrap();
        w.write(b"xyz").unwrap();
        drop(w);
        let name = OutDir::staging_name(&id(origin));
        fs::remove_dir(d.join(&name).join("t/a/empty")).unwrap();
        let staging = out.existing(&id(origin)).unwrap().unwrap();
        assert!(TreeWriter::holds(&staging, &m, 3).is_err());
        fs::remove_dir_all(d).unwrap();
    }
}
