//! Tests of storing: uploads, their commit, what survives a restart or a
//! crash, and the limits. Shared helpers for [`super::tests_delivery`].

use std::io::Read as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use keyferry_common::ids::TransferId;
use keyferry_common::name::AgentName;

use super::*;

pub(super) const NOW: u64 = 1_000_000;
const MIB: u64 = 1 << 20;

/// A directory under the system's temp dir, removed on drop.
pub(super) struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("keyferry-mailbox-{}-{n}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(super) fn name(s: &str) -> AgentName {
    AgentName::new(s).unwrap()
}

pub(super) fn limits() -> MailboxLimits {
    MailboxLimits {
        total: 100 * MIB,
        per_receiver: 50 * MIB,
        per_sender: 50 * MIB,
        max_age: Duration::from_secs(100),
        per_receiver_count: 10,
        fetches_per_minute: 3,
    }
}

pub(super) fn meta(id: u8, from: &str, to: &str, size: u64) -> StoredMeta {
    StoredMeta {
        id: TransferId([id; 16]),
        from: name(from),
        to: name(to),
        sender_spki: vec![1; 300],
        offer_body: vec![2; 500],
        offer_signature: vec![3; 256],
        size,
        stored_at: 0,
        expires: 0,
        last_resort: id.is_multiple_of(2),
        order: 0,
    }
}

pub(super) fn open(dir: &Path, limits: MailboxLimits) -> Arc<Mailbox> {
    Arc::new(Mailbox::open(dir, limits).unwrap())
}

/// Stores `bytes` as transfer `id` from alice to bob at [`NOW`].
pub(super) fn store(mb: &Arc<Mailbox>, id: u8, bytes: &[u8]) -> StoredMeta {
    let mut up = mb.reserve(meta(id, "alice", "bob", 100), NOW).unwrap();
    up.write(bytes).unwrap();
    up.commit().unwrap()
}

pub(super) fn read(mb: &Mailbox, id: &TransferId) -> Vec<u8> {
    let mut bytes = Vec::new();
    mb.open_data(id).unwrap().read_to_end(&mut bytes).unwrap();
    bytes
}

pub(super) fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn a_committed_transfer_survives_a_restart_and_is_offered() {
    let tmp = TempDir::new("commit");
    let dir = tmp.0.join("a/b");
    let mb = open(&dir, limits());
    let mut up = mb.reserve(meta(1, "alice", "bob", 100), NOW).unwrap();
    up.write(b"hello ").unwrap();
    up.write(b"world").unwrap();
    assert!(
        mb.waiting_for(&name("bob"), NOW).is_empty(),
        "not before commit"
    );
    let stored = up.commit().unwrap();
    assert_eq!((stored.stored_at, stored.expires), (NOW, NOW + 100));
    assert_eq!(mb.waiting_for(&name("bob"), NOW), vec![stored.clone()]);
    assert!(mb.waiting_for(&name("alice"), NOW).is_empty());
    drop(mb);

    let mb = open(&dir, limits());
    assert_eq!(mb.waiting_for(&name("bob"), NOW), vec![stored.clone()]);
    assert_eq!(mb.data_len(&stored.id).unwrap(), 11);
    assert_eq!(read(&mb, &stored.id), b"hello world");
    let usage = mb.usage();
    assert_eq!((usage.bytes, usage.transfers, usage.uploads), (11, 1, 0));
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("objects")), 0o700);
    let data = dir
        .join("objects")
        .join(format!("{}.data", hex::encode(stored.id.0)));
    assert_eq!(mode(&data), 0o600);
}

#[test]
fn an_upload_dropped_without_commit_leaves_nothing_and_frees_its_bytes() {
    let tmp = TempDir::new("drop");
    let mb = open(
        &tmp.0,
        MailboxLimits {
            per_receiver: max_upload(100),
            ..limits()
        },
    );
    let mut up = mb.reserve(meta(1, "alice", "bob", 100), NOW).unwrap();
    up.write(b"partial").unwrap();
    assert_eq!(mb.usage().bytes, max_upload(100));
    assert!(matches!(
        mb.reserve(meta(2, "carol", "bob", 100), NOW),
        Err(Refusal::ReceiverBytes { .. })
    ));
    drop(up);
    assert!(files(&tmp.0.join("objects")).is_empty());
    assert_eq!(mb.usage(), Usage::default());
    mb.reserve(meta(2, "carol", "bob", 100), NOW).unwrap();
    // The dropped id may be used again: nothing of it remains.
    drop(mb.reserve(meta(1, "alice", "bob", 1), NOW).unwrap());
}

#[test]
fn whatever_a_crash_left_half_done_is_removed_at_open() {
    let tmp = TempDir::new("crash");
    let objects = tmp.0.join("objects");
    let mb = open(&tmp.0, limits());
    let kept = store(&mb, 1, b"kept");
    let hex = |id: u8| hex::encode([id; 16]);
    // Crashed before the commit point: the metadata is there, the data is
    // still `.part`.
    store(&mb, 2, b"not committed");
    std::fs::rename(
        objects.join(format!("{}.data", hex(2))),
        objects.join(format!("{}.part", hex(2))),
    )
    .unwrap();
    // An upload in progress, and a replacement half written.
    let up = mb.reserve(meta(3, "alice", "bob", 100), NOW).unwrap();
    std::mem::forget(up);
    std::fs::write(objects.join(format!(".tmp-{}.meta", hex(4))), b"x").unwrap();
    // Data without metadata, and a data file longer than its metadata says.
    std::fs::write(objects.join(format!("{}.data", hex(5))), b"orphan").unwrap();
    store(&mb, 6, b"six");
    let six = objects.join(format!("{}.data", hex(6)));
    std::fs::write(&six, b"sixx").unwrap();
    // Corrupt metadata.
    store(&mb, 7, b"seven");
    std::fs::write(objects.join(format!("{}.meta", hex(7))), b"\x01garbage").unwrap();
    // A file not of ours is left alone.
    std::fs::write(objects.join("README"), b"operator's").unwrap();
    drop(mb);

    let mb = open(&tmp.0, limits());
    assert_eq!(mb.waiting_for(&name("bob"), NOW), vec![kept.clone()]);
    let kept_files = [
        format!("{}.data", hex(1)),
        format!("{}.meta", hex(1)),
        "README".into(),
    ];
    let mut expected = kept_files.to_vec();
    expected.sort();
    assert_eq!(files(&objects), expected);
    assert_eq!(mb.usage().bytes, 4);
    // The ids left over are free again.
    mb.reserve(meta(3, "alice", "bob", 1), NOW).unwrap();
}

#[test]
fn an_end_interrupted_after_its_receipt_is_finished_at_open() {
    let tmp = TempDir::new("endcrash");
    let objects = tmp.0.join("objects");
    let mb = open(&tmp.0, limits());
    let stored = store(&mb, 1, b"data");
    let saved = tmp.0.join("saved");
    std::fs::create_dir(&saved).unwrap();
    for f in files(&objects) {
        std::fs::copy(objects.join(&f), saved.join(&f)).unwrap();
    }
    let delivering = mb.begin_delivery(&stored.id).unwrap();
    delivering
        .finish(Outcome::Delivered { receipt: vec![9] }, NOW + 5)
        .unwrap();
    // As if the removal after the receipt had not reached the disk.
    for f in files(&saved) {
        std::fs::copy(saved.join(&f), objects.join(&f)).unwrap();
    }
    drop(mb);
    let mb = open(&tmp.0, limits());
    assert!(mb.waiting_for(&name("bob"), NOW).is_empty());
    assert!(files(&objects).is_empty());
    let state = &mb.receipts(&name("alice"), NOW + 5)[0].state;
    assert_eq!(
        *state,
        State::Delivered {
            receipt: vec![9],
            at: NOW + 5
        }
    );
}

#[test]
fn limits_refuse_with_the_numbers() {
    let tmp = TempDir::new("limits");
    let per = max_upload(2 * MIB); // 2 MiB + 96 KiB
    let l = MailboxLimits {
        total: 5 * MIB,
        per_receiver: 3 * MIB,
        per_sender: 4 * MIB,
        per_receiver_count: 2,
        ..limits()
    };
    let mb = open(&tmp.0, l);
    let first = mb.reserve(meta(1, "alice", "bob", 2 * MIB), NOW).unwrap();
    let e = mb
        .reserve(meta(2, "carol", "bob", 2 * MIB), NOW)
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "the broker keeps at most {} bytes for bob and {per} bytes are waiting already; this transfer needs {per} bytes",
            3 * MIB
        )
    );
    let e = mb.reserve(meta(1, "carol", "dave", 1), NOW).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("transfer {} is already in the mailbox", TransferId([1; 16]))
    );
    // Committed, a transfer counts what it wrote, not what it might have.
    let mut first = first;
    first.write(b"small").unwrap();
    first.commit().unwrap();
    let second = mb.reserve(meta(2, "carol", "bob", 2 * MIB), NOW).unwrap();
    let e = mb.reserve(meta(3, "erin", "bob", 1), NOW).unwrap_err();
    assert_eq!(
        e.to_string(),
        "the broker keeps at most 2 transfers for bob and 2 are waiting already"
    );
    assert!(matches!(
        e,
        Refusal::ReceiverCount {
            limit: 2,
            waiting: 2,
            ..
        }
    ));
    let e = mb.reserve(meta(1, "alice", "zed", 1), NOW).unwrap_err();
    assert!(matches!(e, Refusal::Duplicate { .. }), "committed ids too");
    // Alice: 5 bytes stored, plus one upload of `per` in progress.
    let _third = mb.reserve(meta(4, "alice", "carol", 2 * MIB), NOW).unwrap();
    let e = mb
        .reserve(meta(5, "alice", "dave", 2 * MIB), NOW)
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "the broker keeps at most {} bytes from alice and {} bytes of theirs are waiting already; this transfer needs {per} bytes",
            4 * MIB,
            per + 5
        )
    );
    // In all: 5 + 2 × per taken.
    let e = mb.reserve(meta(6, "frank", "gina", MIB), NOW).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "the broker keeps at most {} bytes for offline receivers and {} bytes are taken already; this transfer needs {} bytes",
            5 * MIB,
            2 * per + 5,
            max_upload(MIB)
        )
    );
    drop(second);
    mb.reserve(meta(6, "frank", "gina", MIB), NOW).unwrap();
}

#[test]
fn an_offer_too_long_to_store_is_refused() {
    let tmp = TempDir::new("offer");
    let mb = open(&tmp.0, limits());
    let mut m = meta(1, "alice", "bob", 1);
    m.offer_body = vec![0; 64 << 10];
    assert!(matches!(
        mb.reserve(m, NOW),
        Err(Refusal::OfferTooLong { .. })
    ));
    assert_eq!(mb.usage(), Usage::default());
}

#[test]
fn writing_past_the_size_and_its_overhead_fails() {
    let tmp = TempDir::new("long");
    let mb = open(&tmp.0, limits());
    let mut up = mb.reserve(meta(1, "alice", "bob", 6400), NOW).unwrap();
    let limit = 6400 + 100 + (64 << 10);
    let chunk = vec![7; 4096];
    while up.written() + 4096 <= limit {
        up.write(&chunk).unwrap();
    }
    let room = usize::try_from(limit - up.written()).unwrap();
    let e = up.write(&vec![7; room + 1]).unwrap_err();
    assert!(
        matches!(e, UploadError::TooLong { limit: l, .. } if l == limit),
        "{e}"
    );
    up.write(&vec![7; room]).unwrap();
    assert!(up.write(b"x").is_err());
    assert_eq!(up.written(), limit);
    let stored = up.commit().unwrap();
    assert_eq!(mb.data_len(&stored.id).unwrap(), limit);
}
