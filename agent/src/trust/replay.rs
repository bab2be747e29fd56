//! Refusing replayed offers: every transfer id seen inside the time window,
//! kept on disk so that a restarted receiver still knows them.
//!
//! An offer outside the window is refused as stale by
//! [`keyferry_common::handshake::verify_offer`], so remembering ids for the
//! window is enough. The memory is bounded: when full of live entries it
//! refuses new offers rather than forget one (fail closed).
//!
//! On disk (`seen_offers` in the agent's home, mode 0600) the ids are a log
//! of 24-byte records, `transfer_id[16] ‖ u64 LE forget_after`, appended and
//! synced before the offer is answered; a receiver that cannot record an id
//! refuses the offer. Every check re-reads the log (under an `flock` on
//! `seen_offers.lock`, so receivers sharing a home see each other's ids),
//! drops expired records, and rewrites it compacted once it holds more than
//! twice as many records as live ones (plus 1024), or when it is damaged: a
//! torn last record (a crash mid-append) or a record that claims to outlive
//! the window. A log over [`MAX_LOG`] bytes, or one another receiver keeps
//! locked for [`LOCK_WAIT`], refuses the offer (fail closed).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;

use keyferry_common::ids::TransferId;
use keyferry_common::io::fs::{Place, write_private};
use rustix::fs::FlockOperation;
use thiserror::Error;

/// Why an offer's id is refused.
#[derive(Debug, Error)]
pub enum Replayed {
    /// Seen inside the window (or the memory is full of live ids).
    #[error("replayed offer: this transfer id was already seen")]
    Seen,
    /// The record of seen ids cannot be read or written: refused, since a
    /// replay could not be told from a new offer.
    #[error("cannot keep the record of seen transfer ids ({path}): {source}")]
    Store {
        /// The log.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

/// Most transfer ids remembered at once.
pub const MAX_REMEMBERED: usize = 100_000;

/// One record's size on disk.
const RECORD: usize = 24;

/// The transfer ids seen recently, each with the time after which it may be forgotten.
#[derive(Debug)]
pub struct ReplayGuard {
    window_secs: u64,
    seen: HashMap<TransferId, u64>,
    /// The log, if the ids outlive the process.
    file: Option<PathBuf>,
}

impl ReplayGuard {
    /// A guard, in memory only, for offers whose time must lie within
    /// `window_secs` of now.
    pub fn new(window_secs: u64) -> Self {
        Self {
            window_secs,
            seen: HashMap::new(),
            file: None,
        }
    }

    /// A guard whose ids are kept in the log at `path` (see the module docs).
    pub fn persistent(window_secs: u64, path: PathBuf) -> Self {
        Self {
            file: Some(path),
            ..Self::new(window_secs)
        }
    }

    /// Whether `id` was seen and is still remembered: a cheap look-up for
    /// before the offer's signature is checked.
    pub fn seen(&mut self, id: &TransferId, now_unix: u64) -> Result<bool, Replayed> {
        let _lock = self.load(now_unix)?;
        Ok(self.seen.contains_key(id))
    }

    /// Records `id` (from an offer dated `offer_time`, its signature
    /// verified); refuses it if already seen.
    pub fn check_and_insert(
        &mut self,
        id: TransferId,
        offer_time: u64,
        now_unix: u64,
    ) -> Result<(), Replayed> {
        let lock = self.load(now_unix)?;
        if self.seen.len() >= MAX_REMEMBERED {
            self.seen.retain(|_, &mut until| until >= now_unix);
        }
        if self.seen.contains_key(&id) || self.seen.len() >= MAX_REMEMBERED {
            return Err(Replayed::Seen);
        }
        // Past offer_time + window the offer is stale anyway; keep it until
        // then, measured on the later of both clocks.
        let until = offer_time.max(now_unix).saturating_add(self.window_secs);
        if let (Some(path), Some(_)) = (&self.file, &lock) {
            append(path, &id, until).map_err(|source| Replayed::Store {
                path: path.clone(),
                source,
            })?;
        }
        self.seen.insert(id, until);
        Ok(())
    }

    /// Re-reads the log (if any) into memory, under its lock, which the
    /// caller holds until it is done.
    fn load(&mut self, now_unix: u64) -> Result<Option<File>, Replayed> {
        let Some(path) = &self.file else {
            return Ok(None);
        };
        let store = |source| Replayed::Store {
            path: path.clone(),
            source,
        };
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc_nofollow())
            .open(path.with_extension("lock"))
            .map_err(store)?;
        lock_within(&lock, LOCK_WAIT).map_err(store)?;
        let bytes = match OpenOptions::new()
            .read(true)
            .custom_flags(libc_nofollow())
            .open(path)
        {
            Ok(f) => {
                let mut bytes = Vec::new();
                f.take(MAX_LOG + 1).read_to_end(&mut bytes).map_err(store)?;
                if bytes.len() as u64 > MAX_LOG {
                    // Reading part of it would forget ids: refuse instead.
                    return Err(store(io::Error::other(format!(
                        "larger than {MAX_LOG} bytes; remove it to start afresh"
                    ))));
                }
                bytes
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(store(e)),
        };
        // No offer is remembered past its window: a record that says it
        // is, is not ours (nor is a torn tail); rewriting drops them.
        let latest = now_unix.saturating_add(2 * self.window_secs);
        let mut damaged = bytes.len() % RECORD != 0;
        let records = bytes.len() / RECORD;
        for r in bytes.chunks_exact(RECORD) {
            let (id, until) = r.split_at(16);
            let mut tid = [0u8; 16];
            tid.copy_from_slice(id);
            let mut at = [0u8; 8];
            at.copy_from_slice(until);
            let until = u64::from_le_bytes(at);
            if until > latest {
                damaged = true;
            } else if until >= now_unix {
                let e = self.seen.entry(TransferId(tid)).or_insert(until);
                *e = (*e).max(until);
            }
        }
        self.seen.retain(|_, &mut until| until >= now_unix);
        if damaged || records > 2 * self.seen.len() + 1024 {
            let mut compact = Vec::with_capacity(self.seen.len() * RECORD);
            for (id, until) in &self.seen {
                compact.extend_from_slice(&id.0);
                compact.extend_from_slice(&until.to_le_bytes());
            }
            write_private(path, &compact, Place::Replace).map_err(store)?;
        }
        Ok(Some(lock))
    }
}

/// The log is never read past this (live and dead records, with room for
/// a full memory): 9.6 MB.
const MAX_LOG: u64 = (4 * MAX_REMEMBERED * RECORD) as u64;

/// How long an offer waits for another receiver sharing the home to release
/// the log before it is refused.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Takes the exclusive lock on `lock`, waiting at most `wait`.
fn lock_within(lock: &File, wait: std::time::Duration) -> io::Result<()> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        match rustix::fs::flock(lock, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(()),
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
                if std::time::Instant::now() >= deadline {
                    return Err(io::Error::other(format!(
                        "another receiver sharing this home held it for {} s",
                        wait.as_secs()
                    )));
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// `O_NOFOLLOW`: the lock file is never a link someone planted.
fn libc_nofollow() -> i32 {
    rustix::fs::OFlags::NOFOLLOW.bits() as i32
}

/// Appends one record and syncs it.
fn append(path: &std::path::Path, id: &TransferId, until: u64) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc_nofollow())
        .open(path)?;
    let mut record = [0u8; RECORD];
    record[..16].copy_from_slice(&id.0);
    record[16..].copy_from_slice(&until.to_le_bytes());
    let before = f.metadata()?.len();
    let written = f.write_all(&record).and_then(|()| f.sync_data());
    if written.is_err() {
        // A torn record would shift every later one: take it back (a
        // failure here is caught by the next read's length check).
        let _ = f.set_len(before);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_use_of_an_id_is_refused() {
        let mut g = ReplayGuard::new(300);
        let id = TransferId([1; 16]);
        g.check_and_insert(id, 1000, 1000).unwrap();
        assert!(matches!(
            g.check_and_insert(id, 1000, 1200),
            Err(Replayed::Seen)
        ));
        g.check_and_insert(TransferId([2; 16]), 1000, 1000).unwrap();
    }

    #[test]
    fn a_verified_offer_seen_twice_is_a_replay() {
        use keyferry_common::handshake::{Kind, OfferParams, Terms, make_offer, verify_offer};
        use keyferry_common::identity::Identity;
        use keyferry_common::ids::StreamId;
        use keyferry_common::name::AgentName;
        const NOW: u64 = 1_800_000_000;
        const WINDOW: u64 = 300;
        let fixture = |name: &str| {
            let path = format!(
                "{}/../common/tests/fixtures/{name}.pem",
                env!("CARGO_MANIFEST_DIR")
            );
            Identity::from_pkcs8_pem(&std::fs::read_to_string(path).unwrap())
                .unwrap()
                .unwrap()
        };
        let name = |s: &str| AgentName::new(s).unwrap();
        let (alice, bob) = (fixture("alice"), fixture("bob"));
        let (_, offer) = make_offer(OfferParams {
            identity: &alice,
            sender: name("alice"),
            receiver: name("bob"),
            receiver_key: bob.public(),
            stream_id: StreamId::random(),
            terms: Terms {
                kind: Kind::Files,
                size: 3000,
                size_known: true,
                resumes: None,
                receivers: 1,
                punch: Vec::new(),
            },
            now_unix: NOW,
        })
        .unwrap();
        let mut guard = ReplayGuard::new(WINDOW);
        let v = verify_offer(
            &offer,
            alice.public(),
            &name("bob"),
            bob.fingerprint(),
            NOW,
            WINDOW,
        )
        .unwrap();
        guard
            .check_and_insert(v.fields().transfer_id, v.fields().time, NOW)
            .unwrap();
        assert!(matches!(
            guard.check_and_insert(v.fields().transfer_id, v.fields().time, NOW + 5),
            Err(Replayed::Seen)
        ));
    }

    fn temp_log(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "kf-replay-{tag}-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("seen_offers")
    }

    fn rand_suffix() -> String {
        hex::encode(keyferry_common::crypto::random_array::<6>())
    }

    #[test]
    fn ids_outlive_the_guard_that_saw_them_until_they_expire() {
        let path = temp_log("outlive");
        let id = TransferId([7; 16]);
        ReplayGuard::persistent(300, path.clone())
            .check_and_insert(id, 1000, 1000)
            .unwrap();
        // A restarted receiver: a new guard over the same log.
        let mut again = ReplayGuard::persistent(300, path.clone());
        assert!(again.seen(&id, 1100).unwrap());
        assert!(matches!(
            again.check_and_insert(id, 1000, 1100),
            Err(Replayed::Seen)
        ));
        // Past the window it is forgotten (and stale anyway).
        let mut later = ReplayGuard::persistent(300, path.clone());
        assert!(!later.seen(&id, 1301).unwrap());
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    fn record(id: [u8; 16], until: u64) -> Vec<u8> {
        let mut r = id.to_vec();
        r.extend_from_slice(&until.to_le_bytes());
        r
    }

    #[test]
    fn a_torn_or_hostile_log_is_read_safely_and_compacted() {
        let path = temp_log("torn");
        // 3000 expired records, one live, one that claims to live for ever,
        // and a torn tail.
        let mut bytes = Vec::new();
        for i in 0..3000u32 {
            let mut id = [0u8; 16];
            id[..4].copy_from_slice(&i.to_le_bytes());
            bytes.extend(record(id, 5));
        }
        bytes.extend(record([9; 16], 1200));
        bytes.extend(record([8; 16], u64::MAX));
        bytes.extend_from_slice(&[1, 2, 3]);
        std::fs::write(&path, &bytes).unwrap();
        let mut g = ReplayGuard::persistent(300, path.clone());
        assert!(g.seen(&TransferId([9; 16]), 1000).unwrap());
        assert!(!g.seen(&TransferId([0; 16]), 1000).unwrap());
        assert!(!g.seen(&TransferId([8; 16]), 1000).unwrap());
        // Compacted to the one live record.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), RECORD as u64);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_torn_tail_does_not_shift_the_records_appended_after_it() {
        let path = temp_log("shift");
        let mut bytes = record([1; 16], 1200);
        bytes.extend_from_slice(&[7; 5]);
        std::fs::write(&path, &bytes).unwrap();
        let (a, b) = (TransferId([2; 16]), TransferId([3; 16]));
        let mut g = ReplayGuard::persistent(300, path.clone());
        g.check_and_insert(a, 1000, 1000).unwrap();
        g.check_and_insert(b, 1000, 1000).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 * RECORD as u64);
        // A restarted receiver knows all three.
        let mut again = ReplayGuard::persistent(300, path.clone());
        for id in [TransferId([1; 16]), a, b] {
            assert!(again.seen(&id, 1100).unwrap());
        }
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn receivers_sharing_a_home_see_each_others_ids() {
        let path = temp_log("shared");
        let id = TransferId([4; 16]);
        let mut one = ReplayGuard::persistent(300, path.clone());
        let mut two = ReplayGuard::persistent(300, path.clone());
        assert!(!two.seen(&id, 1000).unwrap());
        one.check_and_insert(id, 1000, 1000).unwrap();
        assert!(two.seen(&id, 1001).unwrap());
        assert!(matches!(
            two.check_and_insert(id, 1000, 1001),
            Err(Replayed::Seen)
        ));
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_log_too_large_to_read_whole_refuses_rather_than_forgets() {
        let path = temp_log("huge");
        File::create(&path)
            .unwrap()
            .set_len(MAX_LOG + RECORD as u64)
            .unwrap();
        let mut g = ReplayGuard::persistent(300, path.clone());
        assert!(matches!(
            g.seen(&TransferId([5; 16]), 1000),
            Err(Replayed::Store { .. })
        ));
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_lock_held_elsewhere_is_waited_for_only_so_long() {
        let path = temp_log("lock");
        let open = || File::create(path.with_extension("lock")).unwrap();
        let held = open();
        rustix::fs::flock(&held, FlockOperation::LockExclusive).unwrap();
        let t = std::time::Instant::now();
        let wait = std::time::Duration::from_millis(200);
        assert!(lock_within(&open(), wait).is_err());
        assert!(t.elapsed() >= wait);
        drop(held);
        lock_within(&open(), wait).unwrap();
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
