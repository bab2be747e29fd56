//! Reading what a [`Source`] sends, as one stream from any offset, file
//! after file: each file opened without following a link and checked to be
//! the version that was listed (and checked again once read whole); and the
//! hash of a range of it, checked against marks on the way (a resume's proof
//! and its check, PROTOCOL.md §6.4).

use std::fs::{self, File};
use std::io::{self, Read as _, Seek as _, SeekFrom};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::sync::Arc;

use keyferry_common::wire::chunk::ChunkFrame;
use sha2::{Digest as _, Sha256};

use super::source::{Source, SourceFile, Version, changed, unreadable};
use crate::error::AgentError;

/// Reads the stream of a [`Source`] from an offset, file after file.
#[derive(Debug)]
pub struct Reader {
    source: Arc<Source>,
    /// Offset of the next byte.
    pos: u64,
    /// Index of the file holding it, and that file once opened.
    index: usize,
    file: Option<File>,
    /// Where that file starts in the stream.
    start: u64,
}

impl Reader {
    /// A reader positioned at `offset`.
    pub fn at(source: Arc<Source>, offset: u64) -> Self {
        Self {
            source,
            pos: offset,
            index: 0,
            file: None,
            start: 0,
        }
    }

    /// Whether it reads standard input (of unknown size).
    pub fn is_pipe(&self) -> bool {
        !self.source.size_known
    }

    /// Fills `frame`'s plaintext with the next bytes.
    pub fn fill(&mut self, frame: &mut ChunkFrame) -> Result<(), AgentError> {
        self.read(frame.plaintext_mut())
    }

    /// Reads exactly `buf.len()` next bytes.
    pub fn read(&mut self, mut buf: &mut [u8]) -> Result<(), AgentError> {
        if let Some(text) = &self.source.text {
            let at = usize::try_from(self.pos).unwrap_or(usize::MAX);
            let src = text
                .get(at..at + buf.len())
                .ok_or_else(|| AgentError::Internal("read past the message".into()))?;
            buf.copy_from_slice(src);
            self.pos += buf.len() as u64;
            return Ok(());
        }
        while !buf.is_empty() {
            let source = Arc::clone(&self.source);
            let Some(f) = source.files.get(self.index) else {
                return Err(AgentError::Internal("read past the last file".into()));
            };
            let end = self.start + f.version.size;
            if self.pos >= end {
                self.file = None;
                self.start = end;
                self.index += 1;
                continue;
            }
            let file = match &mut self.file {
                Some(file) => file,
                None => self.file.insert(open_version(f, self.pos - self.start)?),
            };
            let n = usize::try_from(end - self.pos)
                .unwrap_or(usize::MAX)
                .min(buf.len());
            let (now, rest) = buf.split_at_mut(n);
            file.read_exact(now).map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => changed(&f.path),
                _ => unreadable(&f.path, e.to_string()),
            })?;
            self.pos += n as u64;
            buf = rest;
            if self.pos == end {
                // Read whole: it must still be the version listed.
                let m = file
                    .metadata()
                    .map_err(|e| unreadable(&f.path, e.to_string()))?;
                if Version::of(&m) != f.version {
                    return Err(changed(&f.path));
                }
            }
        }
        Ok(())
    }

    /// The next piece of standard input: what one read brings, at most
    /// `max` bytes; empty once it ended.
    pub fn stdin_piece(max: usize) -> Result<Vec<u8>, AgentError> {
        let mut piece = vec![0u8; max];
        let n = loop {
            match io::stdin().lock().read(&mut piece) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(unreadable(Path::new("-"), format!("standard input: {e}"))),
            }
        };
        piece.truncate(n);
        Ok(piece)
    }

    /// The SHA-256 state after the first `offset` bytes (to check a
    /// receiver's claim to hold them).
    pub fn prefix_hash(source: Arc<Source>, offset: u64) -> Result<Sha256, AgentError> {
        Self::hash_range(source, 0, offset, Sha256::new(), &[], &|| false)
    }

    /// Hashes the data from `from` to `upto` on from `hasher` (the state
    /// after the first `from` bytes); at each `(offset, digest)` of `marks`
    /// on the way, the hash so far must be `digest`, or the source changed
    /// since it was marked. `stop` ends it early (an error).
    pub fn hash_range(
        source: Arc<Source>,
        from: u64,
        upto: u64,
        mut h: Sha256,
        marks: &[(u64, [u8; 32])],
        stop: &dyn Fn() -> bool,
    ) -> Result<Sha256, AgentError> {
        let mut r = Self::at(source, from);
        let mut buf = vec![0u8; 1 << 20];
        let mut marks = marks.iter().filter(|m| m.0 > from).peekable();
        let mut at = from;
        while at < upto {
            if stop() {
                return Err(AgentError::Internal("stopped".into()));
            }
            let to_mark = marks.peek().map_or(u64::MAX, |m| m.0 - at);
            let n = usize::try_from((upto - at).min(to_mark))
                .unwrap_or(usize::MAX)
                .min(buf.len());
            r.read(&mut buf[..n])?;
            h.update(&buf[..n]);
            at += n as u64;
            if let Some(&&(offset, digest)) = marks.peek()
                && offset == at
            {
                marks.next();
                if <[u8; 32]>::from(h.clone().finalize()) != digest {
                    let near = r.source.files.get(r.index).map(|f| f.path.clone());
                    let near = near.unwrap_or_default().display().to_string();
                    return Err(AgentError::PrefixChanged(format!(
                        "{near} (or a file sent before it)"
                    )));
                }
            }
        }
        Ok(h)
    }
}

/// Opens a listed file without following a link, checks it is the version
/// listed, and seeks to `at`.
fn open_version(f: &SourceFile, at: u64) -> Result<File, AgentError> {
    let mut file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&f.path)
        .map_err(|e| unreadable(&f.path, e.to_string()))?;
    let m = file
        .metadata()
        .map_err(|e| unreadable(&f.path, e.to_string()))?;
    if Version::of(&m) != f.version {
        return Err(changed(&f.path));
    }
    file.seek(SeekFrom::Start(at))
        .map_err(|e| unreadable(&f.path, e.to_string()))?;
    Ok(file)
}
