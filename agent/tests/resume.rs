//! Resuming an interrupted transfer, driven as a user would: the real
//! `broker` and `agent` binaries on 127.0.0.1, a sender left to retry on its
//! own (the default `--retry-for`), and the receiver or the broker killed
//! part-way and started again. The transfer completes from the receiver's
//! journalled prefix and the file arrives byte for byte; a journal or a
//! source that changed while the transfer was interrupted is never resumed
//! into: the transfer starts again from byte 0 or fails clearly, and no file
//! that mixes two versions ever appears.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

mod support;

use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::{
    Broker, Home, Proc, Run, TempDir, WAIT, finals, hash_file, json, pseudo_random, wait_for_data,
};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// The receiver journals what verified every 64 MiB.
const CHECKPOINT: u64 = 64 * MIB;
/// How long a sender that retries may take in all.
const SEND_LIMIT: Duration = Duration::from_secs(240);

/// Writes `len` pseudo-random bytes to `path`, 64 MiB at a time; returns
/// their SHA-256 (hex).
fn write_random(path: &Path, len: u64, seed: u64) -> String {
    use sha2::Digest as _;
    let mut f = std::fs::File::create(path).unwrap();
    let mut h = sha2::Sha256::new();
    let (mut left, mut i) = (len, 0);
    while left > 0 {
        let n = left.min(64 * MIB);
        let block = pseudo_random(n as usize, seed.wrapping_mul(1000).wrapping_add(i));
        h.update(&block);
        f.write_all(&block).unwrap();
        left -= n;
        i += 1;
    }
    f.sync_all().unwrap();
    hex::encode(h.finalize())
}

/// The one staging directory in `out`, if there is one.
fn staging(out: &Path) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with(".keyferry-") && n.ends_with(".d")
        })
        .collect();
    assert!(dirs.len() <= 1, "{dirs:?}");
    dirs.pop()
}

/// The inode of the staging directory's journal, if there is one.
fn journal_inode(out: &Path) -> Option<u64> {
    let j = staging(out)?.join("journal");
    std::fs::metadata(j).ok().map(|m| m.ino())
}

/// Waits until receiver `pid` is writing into `out` and a journal newer
/// than the one written when the transfer began (a checkpoint, which counts
/// at least 64 MiB verified) has replaced it. The journal is replaced by
/// rename, so a new inode is a new journal.
fn wait_for_checkpoint(pid: u32, out: &Path) {
    wait_for_data(pid, out, MIB);
    let first = journal_inode(out).expect("a journal as soon as data arrives");
    let deadline = Instant::now() + WAIT;
    while journal_inode(out).is_none_or(|now| now == first) {
        assert!(Instant::now() < deadline, "no checkpoint within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Starts a `--json` sender of `file` to bob, retrying as by default.
fn sender(alice: &Home, broker: &Broker, file: &Path, extra: &[&str]) -> Proc {
    let mut args = vec![
        "--role",
        "sender",
        "--to",
        "bob",
        "--file",
        file.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    alice.start(broker, &args)
}

/// The interrupted attempt left a staging directory with a journal.
fn assert_staged(out: &Path) -> PathBuf {
    let dir = staging(out).unwrap_or_else(|| panic!("no staging directory in {}", out.display()));
    assert!(dir.join("journal").is_file(), "{}", dir.display());
    assert!(finals(out).is_empty(), "{:?}", finals(out));
    dir
}

/// A sender that finished after retrying: its report, checked against the
/// file it sent.
fn check_resumed_report(sent: &Run, total: u64, sha: &str) -> serde_json::Value {
    assert_eq!(sent.code, Some(0), "{sent:#?}");
    let report = json(sent);
    assert_eq!(report["bytes"], total, "{report}");
    assert_eq!(report["sha256"], sha, "{report}");
    assert_eq!(report["files"], 1, "{report}");
    assert!(report["attempts"].as_u64().unwrap() >= 2, "{report}");
    assert!(
        sent.stderr.contains("retrying"),
        "the sender says it retries: {}",
        sent.stderr
    );
    report
}

#[test]
fn the_receiver_killed_at_40_percent_and_started_again_resumes_from_its_journal() {
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    let file = src.join("big.bin");
    let sha = write_random(&file, GIB, 1);

    let mut receiver = bob.receiver(&broker, out.path(), &[]);
    let began = Instant::now();
    let s = sender(&alice, &broker, &file, &[]);
    wait_for_data(receiver.child.id(), out.path(), 400 * MIB);
    receiver.kill();
    let killed = began.elapsed();
    assert_staged(out.path());

    // The same home and out dir: the journal is kept, and the sender's
    // next attempt resumes from it.
    let mut again = bob.receiver(&broker, out.path(), &[]);
    let sent = Run::finish_within(s, SEND_LIMIT);
    println!(
        "1 GiB, receiver killed after {killed:?}: done after {:?}",
        began.elapsed()
    );
    let report = check_resumed_report(&sent, GIB, &sha);
    let from = report["resumed_from"].as_u64().unwrap();
    println!("{report}");
    assert!(from > 0 && from < GIB, "{report}");
    assert_eq!(
        from % CHECKPOINT,
        0,
        "a SIGKILLed receiver resumes from a checkpoint: {report}"
    );
    again
        .stderr
        .wait_for("kept 1 interrupted transfer(s)", WAIT);
    again.stderr.wait_for(
        &format!("resuming the transfer from alice at {from} of {GIB} bytes"),
        WAIT,
    );
    let line = again.stdout.wait_for("received big.bin", WAIT);
    assert!(
        line.contains(&format!(
            "({GIB} bytes, sha256 {sha}, resumed at byte {from}, relayed)"
        )),
        "{line}"
    );
    assert_eq!(hash_file(&out.join("big.bin")), (GIB, sha));
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 1);
}

#[test]
fn the_broker_killed_and_restarted_on_its_address_and_the_receiver_reconnects_and_resumes() {
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    let file = src.join("big.bin");
    let sha = write_random(&file, GIB, 2);

    let mut receiver = bob.receiver(&broker, out.path(), &[]);
    let began = Instant::now();
    // Through the broker: it is the broker that goes away.
    let s = sender(&alice, &broker, &file, &["--direct", "never"]);
    wait_for_data(receiver.child.id(), out.path(), 400 * MIB);
    let Broker {
        mut proc,
        addr,
        fingerprint,
        data,
    } = broker;
    proc.kill();
    receiver.stderr.wait_for("lost the broker", WAIT);
    // A real outage, not a blip.
    std::thread::sleep(Duration::from_secs(2));
    let broker = Broker::start_at(data, &addr);
    assert_eq!(broker.addr, addr);
    assert_eq!(broker.fingerprint, fingerprint, "same data dir, same key");
    receiver.stderr.wait_for("reconnected to the broker", WAIT);

    let sent = Run::finish_within(s, SEND_LIMIT);
    println!(
        "1 GiB, broker restarted: done after {:?}; sender stderr:\n{}",
        began.elapsed(),
        sent.stderr
    );
    // The receiver that reconnected by itself received it.
    assert!(
        receiver.child.try_wait().unwrap().is_none(),
        "the receiver is still running"
    );
    let report = check_resumed_report(&sent, GIB, &sha);
    println!("{report}");
    let line = receiver.stdout.wait_for("received big.bin", WAIT);
    assert!(line.contains(&sha), "{line}");
    assert_eq!(hash_file(&out.join("big.bin")), (GIB, sha));
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 1);
    // What verified before the broker went away was not sent again.
    let from = report["resumed_from"].as_u64().unwrap();
    assert!(
        from > 0 && from < GIB,
        "the transfer started again from byte {from} instead of resuming: {report}\n\
         sender: {}\nreceiver: {:#?}",
        sent.stderr,
        receiver.stderr.drain()
    );
    receiver.stderr.wait_for(
        &format!("resuming the transfer from alice at {from} of {GIB} bytes"),
        WAIT,
    );
}

/// 512 MiB: enough to be interrupted after a checkpoint, well before the end.
const HALF: u64 = 512 * MIB;

/// Starts a transfer of a fresh 512 MiB file, kills the receiver once a
/// checkpoint is journalled, and returns everything, the sender still
/// retrying.
struct Interrupted {
    broker: Broker,
    /// The sender's home and the source's directory, kept while it runs.
    _alice: Home,
    bob: Home,
    _src: TempDir,
    out: TempDir,
    file: PathBuf,
    sha: String,
    sender: Proc,
}

fn interrupted(seed: u64) -> Interrupted {
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    let file = src.join("big.bin");
    let sha = write_random(&file, HALF, seed);
    let mut receiver = bob.receiver(&broker, out.path(), &[]);
    let sender = sender(&alice, &broker, &file, &[]);
    wait_for_checkpoint(receiver.child.id(), out.path());
    receiver.kill();
    assert_staged(out.path());
    Interrupted {
        broker,
        _alice: alice,
        bob,
        _src: src,
        out,
        file,
        sha,
        sender,
    }
}

#[test]
fn a_receiver_killed_twice_resumes_twice() {
    let t = interrupted(8);
    // Back, resumes from the first checkpoint, and is killed again after
    // the next one.
    let mut again = t.bob.receiver(&t.broker, t.out.path(), &[]);
    wait_for_checkpoint(again.child.id(), t.out.path());
    let first = again
        .stderr
        .wait_for("resuming the transfer from alice at ", WAIT);
    again.kill();
    assert_staged(t.out.path());
    let mut third = t.bob.receiver(&t.broker, t.out.path(), &[]);
    let sent = Run::finish_within(t.sender, SEND_LIMIT);
    let report = check_resumed_report(&sent, HALF, &t.sha);
    println!("{first}\n{report}");
    let from = report["resumed_from"].as_u64().unwrap();
    assert!(report["attempts"].as_u64().unwrap() >= 3, "{report}");
    let at = |line: &str| -> u64 {
        line.split(" at ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(
        from > at(&first) && from < HALF,
        "the second resume starts after the first: {first}; {report}"
    );
    third.stderr.wait_for(
        &format!("resuming the transfer from alice at {from} of {HALF} bytes"),
        WAIT,
    );
    third.stdout.wait_for("received big.bin", WAIT);
    assert_eq!(hash_file(&t.out.join("big.bin")), (HALF, t.sha.clone()));
    assert_eq!(std::fs::read_dir(t.out.path()).unwrap().count(), 1);
}

/// Flips the lowest bit of the byte at `at` in `path`, in place.
fn flip_bit(path: &Path, at: u64) {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_exact(&mut b).unwrap();
    b[0] ^= 0x01;
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&b).unwrap();
}

/// Whatever is in the out dir under a final name is exactly `sha`.
fn assert_nothing_mixed(out: &Path, sha: &str) {
    for name in finals(out) {
        let (len, got) = hash_file(&out.join(&name));
        assert_eq!(
            got, sha,
            "{name} ({len} bytes) is not the file that was sent"
        );
    }
}

#[test]
fn a_tampered_journal_is_not_believed_and_the_transfer_starts_again_from_byte_0() {
    let t = interrupted(3);
    let journal = assert_staged(t.out.path()).join("journal");
    let len = std::fs::metadata(&journal).unwrap().len();
    flip_bit(&journal, len / 2);

    let mut again = t.bob.receiver(&t.broker, t.out.path(), &[]);
    // The damaged staging directory goes at start-up.
    again
        .stderr
        .wait_for("removed 1 unfinished transfer(s)", WAIT);
    let sent = Run::finish_within(t.sender, SEND_LIMIT);
    match sent.code {
        Some(0) => {
            let report = json(&sent);
            assert_eq!(report["resumed_from"], 0, "{report}");
            assert_eq!(report["sha256"], t.sha.as_str(), "{report}");
            assert!(report["attempts"].as_u64().unwrap() >= 2, "{report}");
            let line = again.stdout.wait_for("received big.bin", WAIT);
            assert!(!line.contains("resumed"), "{line}");
            assert_eq!(hash_file(&t.out.join("big.bin")), (HALF, t.sha.clone()));
        }
        code => {
            // Failing is acceptable if it says why; nothing may be placed.
            assert!(matches!(code, Some(c) if c != 0), "{sent:#?}");
            assert!(!sent.stderr.is_empty(), "{sent:#?}");
            assert!(finals(t.out.path()).is_empty(), "{sent:#?}");
        }
    }
    assert_nothing_mixed(t.out.path(), &t.sha);
}

#[test]
fn a_prefix_damaged_on_disk_is_caught_and_the_transfer_starts_again_from_byte_0() {
    // The journal is intact and counts the prefix, but a byte of the prefix
    // changed on disk while the receiver was down. The receiver answers at
    // once and reads the prefix back while the rest arrives, against the
    // marks its journal kept: the damage is found, the transfer fails
    // (PrefixDamaged) with the prefix dropped, and the sender's retry starts
    // from byte 0: the damage never reaches the placed file.
    let t = interrupted(4);
    let part = assert_staged(t.out.path()).join("t/big.bin");
    let len = std::fs::metadata(&part).unwrap().len();
    assert!(len >= CHECKPOINT, "{len}");
    flip_bit(&part, 1000);

    let mut again = t.bob.receiver(&t.broker, t.out.path(), &[]);
    again
        .stderr
        .wait_for("kept 1 interrupted transfer(s)", WAIT);
    let sent = Run::finish_within(t.sender, SEND_LIMIT);
    assert_eq!(sent.code, Some(0), "{sent:#?}");
    let report = json(&sent);
    assert_eq!(report["resumed_from"], 0, "{report}");
    assert_eq!(report["sha256"], t.sha.as_str(), "{report}");
    assert!(
        sent.stderr.contains("damaged on its disk, and dropped it"),
        "{}",
        sent.stderr
    );
    again
        .stderr
        .wait_for("changed on disk since they verified", WAIT);
    let line = again.stdout.wait_for("received big.bin", WAIT);
    assert!(!line.contains("resumed"), "{line}");
    assert_eq!(hash_file(&t.out.join("big.bin")), (HALF, t.sha.clone()));
    assert_eq!(std::fs::read_dir(t.out.path()).unwrap().count(), 1);
}

/// Interrupts a transfer, changes its source with `change` while the
/// receiver is down, and starts the receiver again: the sender sees the file
/// is not the version it began with and fails with a clear error (exit 7)
/// rather than resume into it; nothing is placed.
fn changed_source_is_refused(seed: u64, change: impl FnOnce(&Path)) {
    let t = interrupted(seed);
    change(&t.file);
    let _again = t.bob.receiver(&t.broker, t.out.path(), &[]);
    let sent = Run::finish_within(t.sender, SEND_LIMIT);
    assert_eq!(sent.code, Some(7), "{sent:#?}");
    assert!(
        sent.stderr.contains("changed while it was being sent"),
        "{}",
        sent.stderr
    );
    assert!(
        finals(t.out.path()).is_empty(),
        "{:?}",
        finals(t.out.path())
    );
    assert_nothing_mixed(t.out.path(), &t.sha);
}

#[test]
fn a_source_rewritten_in_place_while_interrupted_is_never_resumed_into() {
    changed_source_is_refused(5, |file| {
        // Same size, other bytes, inside the prefix the receiver holds.
        let mut f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
        f.write_all(&pseudo_random(4096, 99)).unwrap();
        f.sync_all().unwrap();
    });
}

#[test]
fn a_source_appended_to_while_interrupted_is_never_resumed_into() {
    changed_source_is_refused(6, |file| {
        let mut f = std::fs::OpenOptions::new().append(true).open(file).unwrap();
        f.write_all(b"one more line\n").unwrap();
        f.sync_all().unwrap();
    });
}

#[test]
fn a_source_rewritten_with_its_old_mtime_starts_again_from_byte_0() {
    // The sender cannot tell this change (same inode, size and mtime) by
    // looking: it resumes at once from its marks, and its check of the
    // prefix against them, running beside the upload, finds the change
    // before the trailer; the attempt is abandoned (the receiver drops what
    // it kept) and the next one sends everything, so the new content arrives
    // whole and nothing mixed is ever placed.
    let t = interrupted(7);
    let old = std::fs::metadata(&t.file).unwrap().modified().unwrap();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&t.file)
        .unwrap();
    f.write_all(&pseudo_random(4096, 98)).unwrap();
    f.set_modified(old).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let (len, new_sha) = hash_file(&t.file);
    assert_eq!(len, HALF);
    assert_ne!(new_sha, t.sha);

    let mut again = t.bob.receiver(&t.broker, t.out.path(), &[]);
    let sent = Run::finish_within(t.sender, SEND_LIMIT);
    assert_eq!(sent.code, Some(0), "{sent:#?}");
    let report = json(&sent);
    assert_eq!(report["resumed_from"], 0, "{report}");
    assert_eq!(report["sha256"], new_sha.as_str(), "{report}");
    assert!(
        sent.stderr
            .contains("changed since it was first sent; sending everything again from byte 0"),
        "{}",
        sent.stderr
    );
    again.stdout.wait_for("received big.bin", WAIT);
    assert_eq!(hash_file(&t.out.join("big.bin")), (HALF, new_sha.clone()));
    assert_nothing_mixed(t.out.path(), &new_sha);
}

#[test]
fn a_folder_cut_inside_a_later_file_resumes_there_and_arrives_whole() {
    // The prefix the receiver reads back and hashes spans a whole file, an
    // empty one and part of a third: had it read the tree wrong, the
    // sender's check would fail and the transfer start again from 0.
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    let set = src.join("set");
    std::fs::create_dir_all(set.join("sub")).unwrap();
    let files = [
        ("a.bin", 40 * MIB),
        ("b.empty", 0),
        ("sub/c.bin", 400 * MIB),
    ];
    let shas: Vec<String> = files
        .iter()
        .zip(10..)
        .map(|((name, len), seed)| write_random(&set.join(name), *len, seed))
        .collect();
    let total: u64 = files.iter().map(|(_, len)| len).sum();

    let mut receiver = bob.receiver(&broker, out.path(), &[]);
    let s = sender(&alice, &broker, &set, &[]);
    wait_for_checkpoint(receiver.child.id(), out.path());
    receiver.kill();
    assert_staged(out.path());
    let mut again = bob.receiver(&broker, out.path(), &[]);
    let sent = Run::finish_within(s, SEND_LIMIT);
    assert_eq!(sent.code, Some(0), "{sent:#?}");
    let report = json(&sent);
    println!("{report}");
    assert_eq!(
        (&report["bytes"], &report["files"]),
        (&total.into(), &3.into())
    );
    let from = report["resumed_from"].as_u64().unwrap();
    assert!(from > 40 * MIB && from < total, "{report}");
    assert_eq!(from % CHECKPOINT, 0, "{report}");
    again.stdout.wait_for("received ", WAIT);
    for ((name, len), sha) in files.iter().zip(&shas) {
        assert_eq!(
            hash_file(&out.join("set").join(name)),
            (*len, sha.clone()),
            "{name}"
        );
    }
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 1);
}
