//! What a sender sends (PROTOCOL.md §5.2): the `--file` paths walked into a
//! manifest of the one stream of bytes it describes (read by
//! [`super::reader`]), with each entry's mode and time.
//!
//! A path given on the command line is taken as the user named it (a link
//! there is followed); below a directory, symbolic links are never followed
//! (skipped with a warning, or refused with `--no-skip-links`), devices,
//! sockets and FIFOs are skipped with a warning, and `--exclude` globs drop
//! entries by name or by path. Every name must be valid UTF-8 and pass the
//! receiver's file-name rules, so that nothing is refused at the far end.
//! Each file is remembered by device, inode, size and modification time:
//! reading it again (a retry) refuses one that changed, so a resumed
//! transfer never mixes two versions of a file.

use std::fs;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use glob::{MatchOptions, Pattern};
use keyferry_common::encode::Encoder;
use keyferry_common::ids::StreamId;
use keyferry_common::manifest::{Entry, EntryKind, MAX_DEPTH, MAX_ENTRIES, Manifest, Meta};
use keyferry_common::name::AgentName;
use keyferry_common::wire::record::{MAX_MANIFEST, manifest_hash};
use sha2::{Digest as _, Sha256};

use crate::error::AgentError;
use crate::receive::filename;

/// Which version of a file was listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Version {
    dev: u64,
    ino: u64,
    pub(super) size: u64,
    mtime: (i64, i64),
}

impl Version {
    pub(super) fn of(m: &fs::Metadata) -> Self {
        Self {
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
        }
    }
}

/// One file of the stream.
#[derive(Debug, Clone)]
pub(super) struct SourceFile {
    pub(super) path: PathBuf,
    pub(super) version: Version,
}

/// How `--file` paths are walked.
#[derive(Debug, Clone, Default)]
pub struct Walk {
    /// `--exclude` patterns.
    pub exclude: Vec<Pattern>,
    /// `--no-skip-links`: a symbolic link below a directory is an error.
    pub refuse_links: bool,
}

/// The data of one upload: its manifest and where its bytes come from.
#[derive(Debug)]
pub struct Source {
    /// The manifest.
    pub manifest: Manifest,
    pub(super) files: Vec<SourceFile>,
    pub(super) text: Option<Vec<u8>>,
    /// The total size (for standard input: the most it may carry).
    pub total: u64,
    /// Whether `total` is exact: false for standard input.
    pub size_known: bool,
}

pub(super) fn unreadable(path: &Path, detail: impl Into<String>) -> AgentError {
    AgentError::FileUnreadable {
        path: path.to_owned(),
        detail: detail.into(),
    }
}

impl Source {
    /// A text message: no manifest entries, the text as the data.
    pub fn text(text: String) -> Self {
        Self {
            manifest: Manifest::default(),
            files: Vec::new(),
            total: text.len() as u64,
            text: Some(text.into_bytes()),
            size_known: true,
        }
    }

    /// Standard input, as one file `name` of at most `bound` bytes: a
    /// `Stream` manifest entry, never resumed.
    pub fn stdin(name: &str, bound: u64) -> Result<Self, AgentError> {
        let stdin = Path::new("-");
        filename::check(name).map_err(|e| unreadable(stdin, format!("--name-as {name}: {e}")))?;
        Ok(Self {
            manifest: Manifest {
                entries: vec![Entry {
                    path: vec![name.to_owned()],
                    kind: EntryKind::Stream,
                    meta: None,
                }],
            },
            files: Vec::new(),
            text: None,
            total: bound,
            size_known: false,
        })
    }

    /// Walks `paths` into a manifest (see the module docs).
    pub fn files(paths: &[PathBuf], walk: &Walk) -> Result<Self, AgentError> {
        let mut s = Self {
            manifest: Manifest::default(),
            files: Vec::new(),
            text: None,
            total: 0,
            size_known: true,
        };
        for path in paths {
            s.top(path, walk)?;
        }
        if s.manifest.entries.is_empty() {
            return Err(AgentError::Usage(
                "nothing to send: --exclude leaves out every --file".into(),
            ));
        }
        if s.manifest.entries.len() > MAX_ENTRIES {
            return Err(AgentError::Usage(format!(
                "{} files and directories: one transfer carries at most {MAX_ENTRIES}",
                s.manifest.entries.len()
            )));
        }
        s.manifest
            .check()
            .map_err(|e| AgentError::Usage(e.to_string()))?;
        if s.manifest.encode().len() > MAX_MANIFEST {
            return Err(AgentError::Usage(
                "the list of names is too long for one transfer (512 KiB); send fewer files".into(),
            ));
        }
        Ok(s)
    }

    /// The origin of a transfer of these files from `sender` to `to`
    /// (PROTOCOL.md §6.4): the same for every attempt, also across runs of the
    /// sender, as long as the files are the same versions, so that sending
    /// them again resumes what the receiver kept; `None` for a message, which
    /// is never resumed. It travels only sealed in the terms.
    pub fn origin(&self, sender: &AgentName, to: &AgentName) -> Option<StreamId> {
        if self.text.is_some() || !self.size_known {
            return None;
        }
        let mut e = Encoder::new("keyferry/v2 origin");
        e.bytes(sender.as_str().as_bytes())
            .bytes(to.as_str().as_bytes());
        Some(self.versioned_id(e))
    }

    /// What names the data alone (origin without sender and receiver): the
    /// key of the sender's marks (PROTOCOL.md §6.4), the same for every
    /// receiver of one upload. `None` for what is never resumed.
    pub fn data_id(&self) -> Option<StreamId> {
        if self.text.is_some() || !self.size_known {
            return None;
        }
        Some(self.versioned_id(Encoder::new("keyferry/v4 data")))
    }

    /// The first 16 bytes of the SHA-256 of `e` (its label and what the
    /// caller put after it), then the manifest's hash, the number of files
    /// and each file's version (device, inode, size, modification time).
    fn versioned_id(&self, mut e: Encoder) -> StreamId {
        e.fixed(&manifest_hash(&self.manifest.encode()))
            .u32(u32::try_from(self.files.len()).unwrap_or(u32::MAX));
        for f in &self.files {
            let v = &f.version;
            e.u64(v.dev)
                .u64(v.ino)
                .u64(v.size)
                .u64(v.mtime.0 as u64)
                .u64(v.mtime.1 as u64);
        }
        let digest = Sha256::digest(e.finish());
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest[..16]);
        StreamId(id)
    }

    /// How many files (not directories) it carries.
    pub fn file_count(&self) -> usize {
        self.files.len()
    }

    fn top(&mut self, path: &Path, walk: &Walk) -> Result<(), AgentError> {
        let real = fs::canonicalize(path).map_err(|e| unreadable(path, e.to_string()))?;
        // The name the user gave (a link keeps its own name); `.` and the
        // like go by the directory's real name.
        let name = path
            .file_name()
            .filter(|n| *n != "." && *n != "..")
            .or_else(|| real.file_name())
            .and_then(|n| n.to_str())
            .ok_or_else(|| unreadable(path, "its name is not valid UTF-8; rename it"))?
            .to_owned();
        filename::check(&name).map_err(|e| unreadable(path, format!("{e}; rename it")))?;
        if self.manifest.entries.iter().any(|e| e.path[0] == name) {
            return Err(AgentError::Usage(format!(
                "two of the --file paths are named {name}; the receiver places each by its name"
            )));
        }
        if excluded(walk, &name, &name) {
            return Ok(());
        }
        let meta = fs::metadata(&real).map_err(|e| unreadable(path, e.to_string()))?;
        self.add(real, vec![name], &meta, walk)
    }

    fn add(
        &mut self,
        path: PathBuf,
        at: Vec<String>,
        m: &fs::Metadata,
        walk: &Walk,
    ) -> Result<(), AgentError> {
        if at.len() > MAX_DEPTH {
            return Err(unreadable(
                &path,
                format!("deeper than {MAX_DEPTH} directories"),
            ));
        }
        if self.manifest.entries.len() > MAX_ENTRIES {
            return Ok(()); // reported once, by the caller
        }
        let ft = m.file_type();
        if ft.is_file() {
            self.manifest.entries.push(Entry {
                path: at,
                kind: EntryKind::File { size: m.len() },
                meta: Some(meta(m)),
            });
            self.total = self
                .total
                .checked_add(m.len())
                .ok_or_else(|| unreadable(&path, "the sizes add up to more than 2^64 bytes"))?;
            self.files.push(SourceFile {
                path,
                version: Version::of(m),
            });
            return Ok(());
        }
        if !ft.is_dir() {
            return Err(unreadable(&path, "not a regular file or directory"));
        }
        self.manifest.entries.push(Entry {
            path: at.clone(),
            kind: EntryKind::Dir,
            meta: Some(meta(m)),
        });
        let mut children: Vec<fs::DirEntry> = fs::read_dir(&path)
            .map_err(|e| unreadable(&path, e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| unreadable(&path, e.to_string()))?;
        children.sort_by_key(fs::DirEntry::file_name);
        for child in children {
            let p = child.path();
            let Some(name) = child.file_name().to_str().map(str::to_owned) else {
                return Err(unreadable(
                    &p,
                    "its name is not valid UTF-8; rename it or --exclude it",
                ));
            };
            let mut sub = at.clone();
            sub.push(name.clone());
            if excluded(walk, &name, &sub.join("/")) {
                continue;
            }
            filename::check_component(&name)
                .map_err(|e| unreadable(&p, format!("{e}; rename it or --exclude it")))?;
            let meta = fs::symlink_metadata(&p).map_err(|e| unreadable(&p, e.to_string()))?;
            let ft = meta.file_type();
            if ft.is_symlink() {
                if walk.refuse_links {
                    return Err(unreadable(
                        &p,
                        "a symbolic link (links are not followed; without --no-skip-links it is skipped)",
                    ));
                }
                crate::output::err_line(&format!(
                    "skipping {}: a symbolic link (not followed)",
                    p.display()
                ));
            } else if ft.is_file() || ft.is_dir() {
                self.add(p, sub, &meta, walk)?;
            } else {
                crate::output::err_line(&format!(
                    "skipping {}: not a regular file or directory",
                    p.display()
                ));
            }
        }
        Ok(())
    }

    /// Checks that every file is still the version that was listed.
    pub fn unchanged(&self) -> Result<(), AgentError> {
        for f in &self.files {
            let now =
                fs::symlink_metadata(&f.path).map_err(|e| unreadable(&f.path, e.to_string()))?;
            if Version::of(&now) != f.version {
                return Err(changed(&f.path));
            }
        }
        Ok(())
    }
}

/// How the sender keeps `m`: its permission bits (no set-uid, set-gid or
/// sticky bit) and its modification time.
fn meta(m: &fs::Metadata) -> Meta {
    Meta {
        mode: u16::try_from(m.mode() & 0o777).unwrap_or(0o600),
        mtime_s: m.mtime(),
        mtime_ns: u32::try_from(m.mtime_nsec()).unwrap_or(0),
    }
}

pub(super) fn changed(path: &Path) -> AgentError {
    unreadable(
        path,
        "it changed while it was being sent; nothing mixed was delivered, send it again",
    )
}

fn excluded(walk: &Walk, name: &str, path: &str) -> bool {
    let opts = MatchOptions {
        require_literal_separator: true,
        ..MatchOptions::new()
    };
    walk.exclude
        .iter()
        .any(|p| p.matches_with(name, opts) || p.matches_with(path, opts))
}
