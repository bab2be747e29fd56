//! Where an accepted transfer of files goes (PROTOCOL.md §7.4): a fresh
//! staging directory, or, for an offer that says it continues an earlier
//! transfer, the staging directory that transfer left, if it can be trusted:
//! its journal verifies under this receiver's key and is not expired, names
//! the same origin, sender, sender key and total size, the manifest kept
//! beside it hashes to the journal's, and the tree holds every byte the
//! journal counts. Anything less, and the transfer starts again from byte 0
//! (the old directory is removed): a prefix is never trusted on less. The
//! prefix is then hashed as the disk holds it, for the sender to check
//! against its own data (PROTOCOL.md §6.4).

use crate::output::notice;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyferry_common::crypto::keys::MacKey;
use keyferry_common::handshake::ResumePoint;
use keyferry_common::hashstate;
use keyferry_common::identity::Fingerprint;
use keyferry_common::ids::StreamId;
use keyferry_common::manifest::Manifest;
use keyferry_common::name::AgentName;
use keyferry_common::transfer::Resume;
use keyferry_common::wire::message::RefuseReason;
use keyferry_common::wire::record::manifest_hash;
use sha2::{Digest as _, Sha256};

use super::Failure;
use super::journal::Journal;
use super::outdir::{OutDir, StagingId};
use super::prefix::PrefixCheck;
use super::staging::Staging;
use super::tree::TreeWriter;

/// How long reading a kept prefix back may take: the accept must reach the
/// sender within the broker's answer window (60 s). A prefix that takes
/// longer is not resumed (the transfer starts again from byte 0) rather than
/// missing that window on every attempt.
const READ_BACK_LIMIT: Duration = Duration::from_secs(30);

/// A transfer's staging directory, and what it holds.
#[derive(Debug)]
pub struct Place {
    /// The staging directory, locked.
    pub staging: Staging,
    /// The journal to continue.
    pub journal: Journal,
    /// What the stream must resume from, if anything.
    pub resume: Option<Resume>,
    /// What the accept says this receiver holds.
    pub point: ResumePoint,
    /// The kept prefix being checked against its journal meanwhile.
    pub check: Option<PrefixCheck>,
}

impl Place {
    /// Removes the staging directory if it holds nothing verified (a
    /// transfer that ends before its first byte leaves nothing behind).
    pub fn discard_if_empty(self) {
        if self.journal.verified == 0 {
            self.discard();
        }
    }

    /// Removes the staging directory, whatever it holds.
    pub fn discard(self) {
        let _ = self.staging.remove();
    }
}

/// Who sends what, as the verified offer says.
#[derive(Debug, Clone)]
pub struct Origin {
    /// The transfer's origin (PROTOCOL.md §6.4).
    pub origin: StreamId,
    /// Whether the offer says it continues that transfer.
    pub resumes: bool,
    /// The sender.
    pub sender: AgentName,
    /// The sender's key.
    pub sender_fp: Fingerprint,
    /// The data's total size.
    pub total: u64,
    /// This attempt's stream id (names its staging directory when another
    /// user's entry holds the usual name).
    pub attempt: StreamId,
}

/// Prepares the staging directory for `o` (see the module docs).
pub fn prepare(out: &Arc<OutDir>, key: &MacKey, o: &Origin, now: u64) -> Result<Place, Failure> {
    let storage = |e: io::Error| {
        if e.kind() == io::ErrorKind::WouldBlock {
            return Failure::Refused(
                RefuseReason::Busy,
                "this transfer is already being received".into(),
            );
        }
        Failure::Refused(
            RefuseReason::Policy,
            format!("cannot write in {}: {e}", out.path().display()),
        )
    };
    let id = StagingId::of(&o.origin, &o.sender_fp);
    if o.resumes
        && let Some(staging) = out.existing(&id).map_err(storage)?
    {
        match held(&staging, key, o, now) {
            Ok((journal, m, hasher, check)) => {
                let prefix: [u8; 32] = hasher.clone().finalize().into();
                notice!(
                    "resuming the transfer from {} at {} of {} bytes ({} file(s), verified)",
                    o.sender,
                    journal.verified,
                    journal.total,
                    m.entries.len()
                );
                return Ok(Place {
                    resume: Some(Resume {
                        offset: journal.verified,
                        hasher,
                        manifest_hash: journal.manifest_hash,
                    }),
                    point: ResumePoint {
                        offset: journal.verified,
                        prefix_hash: prefix,
                        manifest_hash: journal.manifest_hash,
                    },
                    staging,
                    journal,
                    check,
                });
            }
            Err(why) => {
                notice!(
                    "cannot resume the transfer from {}: {why}; starting again from byte 0",
                    o.sender
                );
                staging.remove().map_err(storage)?;
            }
        }
    }
    let staging = out.fresh(&id, &o.attempt).map_err(storage)?;
    Ok(Place {
        staging,
        journal: Journal {
            origin: o.origin,
            sender: o.sender.clone(),
            sender_fp: o.sender_fp,
            manifest_hash: [0; 32],
            total: o.total,
            verified: 0,
            created: now,
            state: None,
            marks: Vec::new(),
        },
        resume: None,
        point: ResumePoint::none(),
        check: None,
    })
}

/// The journal and manifest of `staging`, if they can be trusted for `o`,
/// the SHA-256 state after the prefix its tree holds, and the check of that
/// prefix running meanwhile. A journal that keeps the state (format 3) is
/// answered at once: the prefix is read back on a thread of its own,
/// checked against the journal's marks while the rest arrives. An older
/// one (or one of a receiver that keeps no hash) is read back first.
fn held(
    staging: &Staging,
    key: &MacKey,
    o: &Origin,
    now: u64,
) -> Result<(Journal, Manifest, Sha256, Option<PrefixCheck>), String> {
    let j = staging.read_journal(key, now).map_err(|e| e.to_string())?;
    if j.origin != o.origin || j.sender != o.sender || j.sender_fp != o.sender_fp {
        return Err("its journal belongs to another transfer or sender".into());
    }
    if j.total != o.total {
        return Err(format!(
            "the sender now offers {} bytes, not {}",
            o.total, j.total
        ));
    }
    if j.verified == 0 {
        return Err("nothing of it verified yet".into());
    }
    let body = staging
        .read_manifest()
        .map_err(|e| format!("its manifest is unreadable ({e})"))?;
    if manifest_hash(&body) != j.manifest_hash {
        return Err("its manifest does not match its journal".into());
    }
    let m = Manifest::decode(&body).map_err(|e| e.to_string())?;
    TreeWriter::holds(staging, &m, j.verified).map_err(|e| e.to_string())?;
    if let Some(state) = j.state.as_deref().and_then(hashstate::deserialize) {
        let mut marks: Vec<_> = j
            .marks
            .iter()
            .copied()
            .filter(|(at, _)| *at < j.verified)
            .collect();
        marks.push((j.verified, state.clone().finalize().into()));
        let tree = staging
            .tree()
            .try_clone_to_owned()
            .map_err(|e| format!("its tree cannot be read ({e})"))?;
        let check = PrefixCheck::start(tree, m.clone(), marks);
        return Ok((j, m, state, Some(check)));
    }
    let deadline = Instant::now() + READ_BACK_LIMIT;
    let prefix =
        TreeWriter::prefix_hash(staging, &m, j.verified, deadline).map_err(|e| match e.kind() {
            io::ErrorKind::TimedOut => format!(
                "its {} bytes cannot be read back within {} s",
                j.verified,
                READ_BACK_LIMIT.as_secs()
            ),
            _ => format!("its tree cannot be read back ({e})"),
        })?;
    Ok((j, m, prefix, None))
}
