//! The manifest (PROTOCOL.md §5.2): what a stream carries — files and
//! directories as relative paths of components, in the order their bytes
//! follow each other in the one chunk stream. Not an archive: nothing in it
//! is an instruction to the receiver but names, kinds and sizes.
//!
//! [`Manifest::decode`] checks the structure a receiver relies on before it
//! creates anything: bounds on entries, depth and component length, no empty
//! or dot components and no separators inside one, no duplicate path, every
//! entry's parent a directory listed before it, no entry below a file. Whether
//! a component is an acceptable file name on this machine is the receiver's
//! own check (its file-name rules) on top.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::wire::record::MAX_MANIFEST;

/// Most entries in one manifest.
pub const MAX_ENTRIES: usize = 10_000;
/// Deepest path (components).
pub const MAX_DEPTH: usize = 32;
/// Longest component, in bytes.
pub const MAX_COMPONENT: usize = 255;

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A directory (possibly empty).
    Dir,
    /// A regular file of exactly this many bytes.
    File {
        /// Its size.
        size: u64,
    },
    /// A file whose size was not known when the stream began (standard
    /// input): the data until the last chunk. Only ever the one entry.
    Stream,
}

/// How the sender keeps a file or directory: its permission bits and its
/// modification time (PROTOCOL.md §5.2). The receiver applies them, within
/// its own rules, unless its user said not to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Permission bits (`0o777` at most is applied, masked by the
    /// receiver's umask).
    pub mode: u16,
    /// Modification time, whole seconds since the Unix epoch (negative
    /// before it).
    pub mtime_s: i64,
    /// Its sub-second part, in nanoseconds (0 to 999 999 999).
    pub mtime_ns: u32,
}

impl Meta {
    /// The earliest and latest modification times a receiver applies
    /// (years 1 and 9999): anything else is not applied.
    pub const TIMES: std::ops::RangeInclusive<i64> = -62_135_596_800..=253_402_300_799;

    /// The modification time, if it is one a receiver applies.
    pub fn time(&self) -> Option<(i64, u32)> {
        (Self::TIMES.contains(&self.mtime_s) && self.mtime_ns < 1_000_000_000)
            .then_some((self.mtime_s, self.mtime_ns))
    }
}

/// One file or directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The path below the out dir, one component each (the first is the
    /// top-level item the receiver places under its own name).
    pub path: Vec<String>,
    /// What it is.
    pub kind: EntryKind,
    /// Its permission bits and modification time (none for a `Stream`).
    pub meta: Option<Meta>,
}

/// The entries of a stream, in stream order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The entries (a text message has none).
    pub entries: Vec<Entry>,
}

/// A manifest that cannot be accepted.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ManifestError {
    /// Not a well-formed manifest encoding.
    #[error("the manifest is malformed")]
    Malformed,
    /// More entries, a deeper path or a longer component than allowed.
    #[error("the manifest exceeds a limit: {0}")]
    TooBig(&'static str),
    /// A path that is empty, or has an empty, `.`, `..` or separated component.
    #[error("the manifest has an invalid path: {0}")]
    BadPath(&'static str),
    /// The same path twice.
    #[error("the manifest lists a path twice")]
    Duplicate,
    /// An entry whose parent is not a directory listed before it (or is a file).
    #[error("the manifest has an entry below a file, or before its directory")]
    Orphan,
    /// A `Stream` entry that is not the only entry.
    #[error("a stream of unknown size must be the manifest's only entry")]
    MisplacedStream,
    /// The sizes overflow.
    #[error("the manifest's sizes do not add up")]
    Overflow,
}

impl Manifest {
    /// One top-level file.
    pub fn single_file(name: &str, size: u64) -> Self {
        Self {
            entries: vec![Entry {
                path: vec![name.to_owned()],
                kind: EntryKind::File { size },
                meta: None,
            }],
        }
    }

    /// The encoded body (postcard).
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("a manifest always encodes")
    }

    /// Decodes and checks a body (see the module docs).
    pub fn decode(body: &[u8]) -> Result<Self, ManifestError> {
        if body.len() > MAX_MANIFEST {
            return Err(ManifestError::TooBig("size"));
        }
        let m: Manifest = match postcard::take_from_bytes(body) {
            Ok((m, [])) => m,
            _ => return Err(ManifestError::Malformed),
        };
        m.check()?;
        Ok(m)
    }

    /// Checks the structure (what [`Self::decode`] checks after decoding).
    pub fn check(&self) -> Result<(), ManifestError> {
        if self.entries.len() > MAX_ENTRIES {
            return Err(ManifestError::TooBig("entries"));
        }
        let streams = self
            .entries
            .iter()
            .filter(|e| e.kind == EntryKind::Stream)
            .count();
        if streams > 0 && (streams != 1 || self.entries.len() != 1) {
            return Err(ManifestError::MisplacedStream);
        }
        let mut dirs: HashSet<&[String]> = HashSet::new();
        let mut seen: HashSet<&[String]> = HashSet::new();
        for e in &self.entries {
            if e.path.is_empty() {
                return Err(ManifestError::BadPath("empty"));
            }
            if e.path.len() > MAX_DEPTH {
                return Err(ManifestError::TooBig("depth"));
            }
            for c in &e.path {
                if c.len() > MAX_COMPONENT {
                    return Err(ManifestError::TooBig("component length"));
                }
                if c.is_empty() || c == "." || c == ".." {
                    return Err(ManifestError::BadPath("empty or dot component"));
                }
                if c.contains(['/', '\\', '\0']) {
                    return Err(ManifestError::BadPath("separator in a component"));
                }
            }
            let parent = &e.path[..e.path.len() - 1];
            if !parent.is_empty() && !dirs.contains(parent) {
                return Err(ManifestError::Orphan);
            }
            if !seen.insert(&e.path) {
                return Err(ManifestError::Duplicate);
            }
            if e.kind == EntryKind::Dir {
                dirs.insert(&e.path);
            }
        }
        self.total_size().map(|_| ()).ok_or(ManifestError::Overflow)
    }

    /// The sum of the file sizes, `None` if it overflows; a `Stream` entry
    /// counts as 0 (its size is only known at the end).
    pub fn total_size(&self) -> Option<u64> {
        self.entries.iter().try_fold(0u64, |sum, e| match e.kind {
            EntryKind::File { size } => sum.checked_add(size),
            EntryKind::Dir | EntryKind::Stream => Some(sum),
        })
    }

    /// Whether the data's size is known (no `Stream` entry).
    pub fn size_known(&self) -> bool {
        self.entries.iter().all(|e| e.kind != EntryKind::Stream)
    }

    /// The distinct top-level names, in order.
    pub fn top_level(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for e in &self.entries {
            if let Some(first) = e.path.first()
                && !out.contains(&first.as_str())
            {
                out.push(first);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_examples_of_protocol_md_are_these_bytes() {
        let plain = Manifest::single_file("a", 5);
        assert_eq!(plain.encode(), [1, 1, 1, b'a', 1, 5, 0]);
        let kept = Manifest {
            entries: vec![Entry {
                path: vec!["a".into()],
                kind: EntryKind::File { size: 5 },
                meta: Some(Meta {
                    mode: 0o644,
                    mtime_s: 1,
                    mtime_ns: 500_000_000,
                }),
            }],
        };
        assert_eq!(
            kept.encode(),
            [
                1, 1, 1, b'a', 1, 5, 1, 0xa4, 0x03, 0x02, 0x80, 0xca, 0xb5, 0xee, 0x01
            ]
        );
        assert_eq!(Manifest::decode(&kept.encode()).unwrap(), kept);
        // Times a receiver applies, and not.
        let at = |s, ns| {
            Meta {
                mode: 0,
                mtime_s: s,
                mtime_ns: ns,
            }
            .time()
        };
        assert_eq!(at(-1, 0), Some((-1, 0)));
        assert_eq!(at(1, 1_000_000_000), None);
        assert_eq!(at(i64::MAX, 0), None);
        assert_eq!(
            at(253_402_300_799, 999_999_999),
            Some((253_402_300_799, 999_999_999))
        );
    }

    fn entry(path: &[&str], kind: EntryKind) -> Entry {
        Entry {
            path: path.iter().map(|s| (*s).to_owned()).collect(),
            kind,
            meta: None,
        }
    }

    fn file(path: &[&str], size: u64) -> Entry {
        entry(path, EntryKind::File { size })
    }

    fn dir(path: &[&str]) -> Entry {
        entry(path, EntryKind::Dir)
    }

    #[test]
    fn a_tree_round_trips_and_sums_its_files() {
        let m = Manifest {
            entries: vec![
                dir(&["photos"]),
                dir(&["photos", "2026"]),
                file(&["photos", "2026", "a.jpg"], 10),
                dir(&["photos", "empty"]),
                file(&["notes.txt"], 5),
            ],
        };
        let back = Manifest::decode(&m.encode()).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.total_size(), Some(15));
        assert_eq!(back.top_level(), ["photos", "notes.txt"]);
        assert!(back.size_known());
        assert_eq!(Manifest::single_file("x", 3).total_size(), Some(3));
    }

    #[test]
    fn the_encoding_is_the_one_protocol_md_gives() {
        assert_eq!(
            Manifest::single_file("a", 5).encode(),
            [1, 1, 1, b'a', 1, 5, 0]
        );
        assert_eq!(Manifest::default().encode(), [0]);
        let dir = Manifest {
            entries: vec![dir(&["d"]), entry(&["d", "s"], EntryKind::Stream)],
        };
        assert_eq!(
            dir.encode(),
            [2, 1, 1, b'd', 0, 0, 2, 1, b'd', 1, b's', 2, 0]
        );
    }

    #[test]
    fn hostile_manifests_are_refused() {
        let bad: Vec<(Vec<Entry>, ManifestError)> = vec![
            (
                vec![file(&[".."], 1)],
                ManifestError::BadPath("empty or dot component"),
            ),
            (
                vec![file(&["a", ".."], 1)],
                ManifestError::BadPath("empty or dot component"),
            ),
            (
                vec![dir(&["a"]), file(&["a", ".."], 1)],
                ManifestError::BadPath("empty or dot component"),
            ),
            (
                vec![file(&["/etc/passwd"], 1)],
                ManifestError::BadPath("separator in a component"),
            ),
            (
                vec![file(&["a/b"], 1)],
                ManifestError::BadPath("separator in a component"),
            ),
            (
                vec![file(&["a\\b"], 1)],
                ManifestError::BadPath("separator in a component"),
            ),
            (
                vec![file(&[""], 1)],
                ManifestError::BadPath("empty or dot component"),
            ),
            (
                vec![entry(&[], EntryKind::Dir)],
                ManifestError::BadPath("empty"),
            ),
            (
                vec![file(&["x"], 1), file(&["x"], 2)],
                ManifestError::Duplicate,
            ),
            (vec![dir(&["x"]), dir(&["x"])], ManifestError::Duplicate),
            (
                vec![file(&["f"], 1), file(&["f", "g"], 1)],
                ManifestError::Orphan,
            ),
            (
                vec![file(&["d", "g"], 1), dir(&["d"])],
                ManifestError::Orphan,
            ),
            (
                vec![file(&["a"], u64::MAX), file(&["b"], 1)],
                ManifestError::Overflow,
            ),
            (
                vec![entry(&["s"], EntryKind::Stream), file(&["b"], 1)],
                ManifestError::MisplacedStream,
            ),
            (
                vec![file(&[&"x".repeat(256)], 1)],
                ManifestError::TooBig("component length"),
            ),
        ];
        for (entries, want) in bad {
            let m = Manifest { entries };
            assert_eq!(Manifest::decode(&m.encode()), Err(want), "{m:?}");
        }
        let deep: Vec<String> = (0..=MAX_DEPTH).map(|i| format!("d{i}")).collect();
        let mut entries: Vec<Entry> = (1..=MAX_DEPTH)
            .map(|n| Entry {
                path: deep[..n].to_vec(),
                kind: EntryKind::Dir,
                meta: None,
            })
            .collect();
        entries.push(Entry {
            path: deep.clone(),
            kind: EntryKind::File { size: 1 },
            meta: None,
        });
        assert_eq!(
            Manifest { entries }.check(),
            Err(ManifestError::TooBig("depth"))
        );
        let many = Manifest {
            entries: (0..=MAX_ENTRIES)
                .map(|i| file(&[&i.to_string()], 0))
                .collect(),
        };
        assert_eq!(many.check(), Err(ManifestError::TooBig("entries")));
        assert_eq!(Manifest::decode(&[0xff]), Err(ManifestError::Malformed));
        assert_eq!(
            Manifest::decode(&[Manifest::default().encode(), vec![0]].concat()),
            Err(ManifestError::Malformed)
        );
    }
}
