//! The blocking half of a transfer's stream: every frame through the
//! stream's one door ([`RecvStream::open`]), in order; the manifest checked
//! and its tree prepared (fresh, or cut back to the verified prefix of an
//! earlier attempt) before any chunk is stored; the chunks written into the
//! tree ([`super::tree`]) or, for a message, kept in memory; a journal
//! checkpoint every 64 MiB ([`super::checkpoint`]); and once the trailer
//! verified, the tree placed. A transfer that fails keeps its verified
//! prefix journalled for the next attempt, or leaves nothing if it had none.

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use keyferry_common::handshake::Kind;
use keyferry_common::manifest::{EntryKind, Manifest};
use keyferry_common::transfer::{Opened, RecvStream, TrailerVerified};
use keyferry_common::wire::message::AbortReason;

use super::Failure;
use super::chatsink::ChatIn;
use super::checkpoint::{self, Checkpoints};
use super::filename::{self, TopLevel};
use super::job::{
    Job, Pipe, Received, Stopped, Want, damaged, policy, storage, storage_stdout, verification,
};
use super::journal::{Journal, MAX_MARKS};
use super::prefix::PrefixCheck;
use super::report::{Placed, What};
use super::resume::Place;
use super::tree::{PlaceError, TreeWriter};

/// Where chunks go.
enum Sink {
    /// Before the manifest.
    Waiting(Option<Place>),
    /// A message, in memory.
    Text(Vec<u8>),
    /// A chat: each chunk one record, shown as it comes.
    Chat(ChatIn),
    /// One file, written to standard output as it verifies.
    Stdout { name: String },
    /// Files, in their tree.
    Tree {
        tree: TreeWriter,
        checkpoints: Checkpoints,
        journal: Journal,
        tops: Vec<TopLevel>,
        files: usize,
        /// Whether the tree is one file (and no directory).
        single_file: bool,
        /// Bytes written into the tree (counted from the data's start).
        written: u64,
        next_checkpoint: u64,
        /// The manifest, whose modes and times are applied at the end
        /// (none with `--no-preserve`).
        keep: Option<Manifest>,
        /// The kept prefix's check, running while the rest arrives.
        check: Option<PrefixCheck>,
    },
}

/// Checks a manifest against the terms; returns its top-level items.
fn check_manifest(job: &Want, m: &Manifest) -> Result<Vec<TopLevel>, Failure> {
    let tops = filename::check_manifest(m).map_err(|e| policy(format!("the manifest has {e}")))?;
    if m.entries.is_empty() {
        return Err(policy("the manifest lists nothing".into()));
    }
    let total = m.total_size().unwrap_or(u64::MAX);
    if job.size_known != m.size_known() || (job.size_known && total != job.declared) {
        return Err(policy(format!(
            "the manifest lists {total} bytes, the offer {}",
            job.declared
        )));
    }
    Ok(tops)
}

impl Sink {
    /// The manifest arrived: prepares where the chunks go.
    fn manifest(
        &mut self,
        job: &Want,
        stream: &RecvStream,
        from: u64,
        body: &[u8],
    ) -> Result<(), Failure> {
        let Sink::Waiting(place) = self else {
            return Err(policy("a second manifest".into()));
        };
        let m = Manifest::decode(body).map_err(|e| policy(e.to_string()))?;
        let tops = if job.kind != Kind::Files {
            if !m.entries.is_empty() {
                return Err(policy("a message or chat with a manifest of files".into()));
            }
            Vec::new()
        } else {
            check_manifest(job, &m)?
        };
        // A resume the user was not asked about carries the manifest the
        // user took, whatever offset the sender resumes from.
        if job.took.is_some_and(|h| h != stream.manifest_hash()) {
            return Err(policy(
                "a resumed transfer that is not the one this receiver's user took".into(),
            ));
        }
        // What was checked is put to the user; nothing is written before a yes.
        if let Some(consent) = &job.consent {
            consent.ask(job.kind, job.declared, &m, &tops)?;
        }
        match (job.kind, &job.chat) {
            (Kind::Message, _) => {
                *self = Sink::Text(Vec::new());
                return Ok(());
            }
            (Kind::Chat, Some((link, from, key))) => {
                let (link, from, key) = (link.clone(), from.clone(), key.clone());
                *self = Sink::Chat(ChatIn::start(from, key, stream.stream_id(), link));
                return Ok(());
            }
            (Kind::Chat, None) => return Err(policy("a chat, but this is no chat".into())),
            (Kind::Files, _) => {}
        }
        if job.stdout {
            return match (&m.entries[..], &tops[..]) {
                ([e], [top]) if e.kind != EntryKind::Dir => {
                    *self = Sink::Stdout {
                        name: top.name.clone(),
                    };
                    Ok(())
                }
                _ => Err(policy(
                    "--stdout takes one file, and this is a directory or several items".into(),
                )),
            };
        }
        let place = place
            .take()
            .ok_or_else(|| policy("files where none were offered".into()))?;
        let mut journal = place.journal;
        // A prefix the sender does not resume from is not checked (its
        // tree is about to be emptied).
        let check = place.check.filter(|_| from > 0);
        let tree = if from == 0 {
            journal.manifest_hash = stream.manifest_hash();
            journal.verified = 0;
            journal.state = None;
            journal.marks.clear();
            let tree = TreeWriter::fresh(place.staging, &m).map_err(storage)?;
            tree.staging().write_manifest(body).map_err(storage)?;
            tree.staging()
                .write_journal(&journal, &job.key)
                .map_err(storage)?;
            tree
        } else {
            TreeWriter::resume(place.staging, &m, from).map_err(storage)?
        };
        let checkpoints = Checkpoints::start(Arc::clone(tree.staging()), Arc::clone(&job.key));
        let files = m
            .entries
            .iter()
            .filter(|e| e.kind != EntryKind::Dir)
            .count();
        let single_file = m.entries.len() == 1 && files == 1;
        *self = Sink::Tree {
            tree,
            checkpoints,
            journal,
            tops,
            files,
            single_file,
            written: from,
            next_checkpoint: from + checkpoint::EVERY,
            keep: job.preserve.then_some(m),
            check,
        };
        Ok(())
    }

    fn write(&mut self, stream: &RecvStream, plaintext: &[u8]) -> Result<(), Failure> {
        match self {
            Sink::Waiting(_) => Err(policy("data before the manifest".into())),
            Sink::Text(t) => {
                t.extend_from_slice(plaintext);
                Ok(())
            }
            Sink::Chat(chat) => chat.take(plaintext),
            Sink::Stdout { .. } => std::io::stdout()
                .lock()
                .write_all(plaintext)
                .map_err(|e| storage_stdout(&e)),
            Sink::Tree {
                tree,
                checkpoints,
                journal,
                written,
                next_checkpoint,
                check,
                ..
            } => {
                // A prefix found damaged fails the transfer at once.
                if check.as_ref().is_some_and(PrefixCheck::failed)
                    && let Some(c) = check.take()
                {
                    return Err(damaged(c.wait()));
                }
                tree.write(plaintext).map_err(storage)?;
                *written = stream.total();
                if *written >= *next_checkpoint {
                    *next_checkpoint = *written + checkpoint::EVERY;
                    // A mark to check the prefix against at a later resume.
                    if let Some((_, digest)) = stream.hash_mark()
                        && journal.marks.len() < MAX_MARKS
                    {
                        journal.marks.push((*written, digest));
                    }
                    let files = tree.touched_files();
                    if checkpoints.offer(snapshot(journal, stream), files) {
                        tree.handed_over();
                    }
                }
                Ok(())
            }
        }
    }

    /// The trailer verified: places what was received.
    fn finish(self, v: &TrailerVerified, stream: &RecvStream) -> Result<Placed, Failure> {
        let what = match self {
            Sink::Waiting(_) => return Err(policy("a stream without a manifest".into())),
            Sink::Text(t) => What::Message(String::from_utf8_lossy(&t).into_owned()),
            Sink::Chat(_) => What::Chat,
            Sink::Stdout { name } => {
                std::io::stdout()
                    .lock()
                    .flush()
                    .map_err(|e| storage_stdout(&e))?;
                What::Stdout { name }
            }
            Sink::Tree {
                tree,
                checkpoints,
                tops,
                files,
                single_file,
                keep,
                check,
                ..
            } => {
                // Nothing is placed before the kept prefix proved good.
                if let Some(c) = check
                    && let Err(e) = c.wait()
                {
                    let _ = checkpoints.finish(None);
                    if let Some(s) = tree.into_staging() {
                        let _ = s.remove();
                    }
                    return Err(damaged(Err(e)));
                }
                if let Err(e) = checkpoints.finish(None) {
                    // A storage failure leaves nothing behind.
                    if let Some(s) = tree.into_staging() {
                        let _ = s.remove();
                    }
                    return Err(storage(e));
                }
                let (paths, notes) = tree.place(&tops, keep.as_ref()).map_err(|e| match e {
                    PlaceError::NoFreeName(why) => Failure::Failed(
                        AbortReason::NoFreeName,
                        format!("nothing was placed: {why}"),
                    ),
                    PlaceError::Io(e) => storage(e),
                })?;
                for n in notes {
                    crate::output::err_line(&format!("note: {n}"));
                }
                What::Items {
                    items: tops.into_iter().map(|t| t.name).zip(paths).collect(),
                    files,
                    single_file,
                }
            }
        };
        Ok(Placed {
            what,
            bytes: v.total,
            sha256: v.sha256,
            own_hash: v.own_hash,
            resumed_from: stream.resumed_from(),
            session_keys: u64::from(stream.epoch()) + 1,
        })
    }

    /// The stream stopped: the journal the tree would be left with, which
    /// must name what `stream` verified. A tree that holds less than that
    /// (a write failed) cannot be journalled, and is left with nothing.
    fn stopped(&mut self, stream: &RecvStream) {
        if let Sink::Tree {
            journal, written, ..
        } = self
        {
            if *written == stream.total() {
                *journal = snapshot(journal, stream);
            } else {
                *written = 0;
            }
        }
    }

    /// The transfer failed: journal what verified if `keep`, else (or if
    /// nothing verified) leave nothing.
    fn abandon(self, keep: bool) {
        match self {
            Sink::Waiting(place) => {
                if let Some(p) = place {
                    if keep {
                        p.discard_if_empty();
                    } else {
                        p.discard();
                    }
                }
            }
            Sink::Text(_) | Sink::Chat(_) | Sink::Stdout { .. } => {}
            Sink::Tree {
                tree,
                checkpoints,
                journal,
                written,
                ..
            } => {
                let keep = keep && written > 0 && journal.verified == written;
                let last = keep.then(|| (&journal, tree.touched_files()));
                let _ = checkpoints.finish(last);
                if !keep {
                    drop(tree.into_staging().map(|s| s.remove()));
                }
            }
        }
    }
}

/// The journal after what `stream` verified so far.
fn snapshot(journal: &Journal, stream: &RecvStream) -> Journal {
    Journal {
        verified: stream.total(),
        manifest_hash: stream.manifest_hash(),
        state: stream.hash_mark().map(|(state, _)| state),
        ..journal.clone()
    }
}

/// What a failed transfer leaves: kept for a resume (unless it was a
/// stream of unknown size, which no sender can send again), or removed.
pub(super) struct Leftover(Box<Sink>, bool);

impl Leftover {
    /// Keeps the verified prefix journalled if the transfer is `resumable`
    /// (a live one), the failure was `reason` and a retry is to be expected
    /// (the sender, the broker or a connection went away, or nothing came
    /// for too long); removes it otherwise (what did not verify, or broke a
    /// rule, is not worth resuming, and a stored transfer comes again whole).
    pub(super) fn settle(self, reason: AbortReason, resumable: bool) {
        let keep = self.1
            && resumable
            && matches!(
                reason,
                AbortReason::PeerGone | AbortReason::Timeout | AbortReason::Interrupted
            );
        self.0.abandon(keep);
    }
}

/// Runs the opening thread (see the module docs).
pub(super) fn open_and_store(job: Job, mut pipe: Pipe) -> Result<Received, (Stopped, Leftover)> {
    let Job {
        mut stream,
        want,
        place,
    } = job;
    let mut sink = Sink::Waiting(place);
    let result = (|| {
        loop {
            let Some(mut payload) = pipe.payloads.blocking_recv() else {
                return Err(Stopped::InputEnded);
            };
            match stream.open(&mut payload) {
                Ok(Opened::Root) => {}
                Ok(Opened::KeyUpdate(epoch)) => pipe.epoch.store(epoch, Ordering::Relaxed),
                Ok(Opened::Manifest { resume_from, body }) => sink
                    .manifest(&want, &stream, resume_from, &body)
                    .map_err(Stopped::Failed)?,
                Ok(Opened::Chunk { plaintext, .. }) => {
                    sink.write(&stream, plaintext).map_err(Stopped::Failed)?;
                    pipe.progress.store(stream.total(), Ordering::Relaxed);
                }
                Ok(Opened::Trailer(v)) => return Ok(v),
                Err(e) => return Err(Stopped::Failed(verification(e))),
            }
            // The reader may have stopped; then the buffer is freed.
            let _ = pipe.free.send(payload);
        }
    })();
    match result {
        Ok(v) => {
            // A failed placement removes what it built.
            let placed = sink.finish(&v, &stream).map_err(|e| {
                (
                    Stopped::Failed(e),
                    Leftover(Box::new(Sink::Text(Vec::new())), false),
                )
            })?;
            Ok(Received {
                placed,
                receipt: v.receipt,
            })
        }
        Err(e) => {
            sink.stopped(&stream);
            Err((e, Leftover(Box::new(sink), want.size_known)))
        }
    }
}
