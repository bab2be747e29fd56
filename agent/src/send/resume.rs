//! Where one receiver's data starts (PROTOCOL.md §6.4): from byte 0, or
//! from the prefix its accept claims, once the claim is checked against our
//! own bytes. With the marks this sender left while it read the data
//! before ([`super::marks`]), only the bytes from the last mark at or below
//! the offset are read first; the rest of the prefix is checked against the
//! marks on a thread of its own while new data goes out ([`SourceCheck`]),
//! and the trailer waits for it: a source changed in its prefix since it was
//! marked fails the transfer (nothing mixed is ever placed). Without marks,
//! the whole prefix is read first, as before.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use keyferry_common::handshake::Accepted;
use keyferry_common::transfer::StreamStart;
use keyferry_common::wire::record::manifest_hash;
use sha2::{Digest as _, Sha256};

use super::attempt::{Failed, after};
use super::marks::MarkLog;
use super::reader::Reader;
use super::source::Source;
use crate::error::AgentError;
use crate::output::notice;

/// The check of the source's prefix against its marks, on a thread of its
/// own while new data goes out.
#[derive(Debug)]
pub struct SourceCheck {
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), AgentError>>>,
    /// The marks it checks against (dropped if the source changed).
    log: Option<Arc<MarkLog>>,
}

impl SourceCheck {
    /// Reads the first `upto` bytes of `source`, checking each mark.
    fn start(
        source: Arc<Source>,
        upto: u64,
        marks: Vec<(u64, [u8; 32])>,
        log: Option<Arc<MarkLog>>,
    ) -> Self {
        let (stop, failed) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let (s, f) = (Arc::clone(&stop), Arc::clone(&failed));
        let thread = std::thread::Builder::new()
            .name("source-check".into())
            .spawn(move || {
                let stopped = || s.load(Ordering::Relaxed);
                let r = Reader::hash_range(source, 0, upto, Sha256::new(), &marks, &stopped);
                if r.is_err() {
                    f.store(true, Ordering::Relaxed);
                }
                r.map(|_| ())
            })
            .ok();
        Self {
            stop,
            failed,
            thread,
            log,
        }
    }

    /// Whether it has already found something wrong (without waiting).
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// Waits for the whole prefix to be checked. A prefix that changed
    /// since it was marked is [`AgentError::PrefixChanged`]: the marks are
    /// dropped, and the next attempt reads the prefix whole.
    pub fn wait(mut self) -> Result<(), AgentError> {
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(Err(e @ AgentError::PrefixChanged(_)))) => {
                if let Some(log) = &self.log {
                    log.remove();
                }
                Err(e)
            }
            Some(Ok(r)) => r,
            _ => Err(AgentError::Internal("the prefix check stopped".into())),
        }
    }
}

impl Drop for SourceCheck {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Where the one receiver's data starts, and the check that must pass
/// before the trailer (see the module docs).
pub async fn start_for(
    source: &Arc<Source>,
    accepted: &Accepted,
    marks: Option<&Arc<MarkLog>>,
) -> Result<(StreamStart, Option<SourceCheck>), Failed> {
    let offset = accepted.resume_offset;
    if offset == 0 {
        return Ok((StreamStart::fresh(), None));
    }
    // A pipe is never resumed (it cannot be read twice), and no prefix can
    // be more than there is.
    if !source.size_known || offset > source.total {
        notice!("the receiver claims more than there is; starting again from byte 0");
        return Ok((StreamStart::fresh(), None));
    }
    let (s, log) = (Arc::clone(source), marks.cloned());
    let started = tokio::task::spawn_blocking(move || from_marks(&s, offset, log))
        .await
        .map_err(|e| after(e.into()))?
        .map_err(after)?;
    let manifest = manifest_hash(&source.manifest.encode());
    let hash: [u8; 32] = started.0.clone().finalize().into();
    if accepted.resume_matches(&hash, &manifest) {
        Ok((
            StreamStart {
                offset,
                hasher: started.0,
            },
            started.1,
        ))
    } else {
        notice!("the receiver holds {offset} bytes that are not these; starting again from byte 0");
        Ok((StreamStart::fresh(), None))
    }
}

/// The SHA-256 state after the first `offset` bytes: from the last mark at
/// or below it, with the check of what lies before that mark started; or,
/// without a usable mark, from the whole prefix read now.
fn from_marks(
    source: &Arc<Source>,
    offset: u64,
    log: Option<Arc<MarkLog>>,
) -> Result<(Sha256, Option<SourceCheck>), AgentError> {
    let marks = log.as_deref().map(MarkLog::read).unwrap_or_default();
    let best = marks
        .iter()
        .rev()
        .filter(|m| m.offset <= offset)
        .find_map(|m| m.hasher().map(|h| (m.offset, h)));
    let Some((at, hasher)) = best else {
        return Ok((Reader::prefix_hash(Arc::clone(source), offset)?, None));
    };
    let state = Reader::hash_range(Arc::clone(source), at, offset, hasher, &[], &|| false)?;
    let check = (at > 0).then(|| {
        let upto: Vec<(u64, [u8; 32])> = marks
            .iter()
            .filter(|m| m.offset <= at)
            .map(|m| (m.offset, m.digest))
            .collect();
        SourceCheck::start(Arc::clone(source), at, upto, log.clone())
    });
    Ok((state, check))
}
