//! Files arrive as their owners keep them, driven as a user would (the real
//! binaries on 127.0.0.1, real files): permission bits (under the
//! receiver's umask) and modification times, also past 2038; none of it with
//! `--no-preserve`; hostile modes and times handled as PROTOCOL.md §7.2
//! says; and no size ceiling but the free space.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

mod support;

use std::fs::{self, File, FileTimes};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keyferry_common::identity::Identity;
use keyferry_common::manifest::{Entry, EntryKind, Manifest, Meta};
use keyferry_common::name::AgentName;
use keyferry_common::wire::message::Message;
use support::hand::{self, HandSender};
use support::{Broker, Home, TempDir, WAIT, json};

/// The umask the receiver inherits from this test.
fn umask() -> u32 {
    fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .map(|v| u32::from_str_radix(v.trim(), 8).unwrap())
        .unwrap()
}

fn set(path: &Path, mode: u32, secs: i64, nanos: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    let t = if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nanos)
    } else {
        UNIX_EPOCH - Duration::new((-secs) as u64, 0)
    };
    let f = File::open(path).unwrap();
    f.set_times(FileTimes::new().set_modified(t)).unwrap();
}

/// Mode bits and modification time (seconds, nanoseconds) of `path`.
fn kept(path: &Path) -> (u32, i64, i64) {
    let m = fs::symlink_metadata(path).unwrap();
    (m.mode() & 0o7777, m.mtime(), m.mtime_nsec())
}

const Y2001: i64 = 978_307_200;
const Y2020: i64 = 1_590_969_600;
/// 2040-01-01: past the 32-bit end of time.
const Y2040: i64 = 2_208_988_800;

#[test]
fn a_tree_arrives_with_its_modes_and_times_and_without_them_on_request() {
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let (src, out, plain) = (
        TempDir::new("src"),
        TempDir::new("out"),
        TempDir::new("plain"),
    );
    let proj = src.join("proj");
    fs::create_dir_all(proj.join("empty")).unwrap();
    for (name, body) in [
        ("run.sh", "#!/bin/sh\n"),
        ("notes.txt", "n"),
        ("secret", "s"),
    ] {
        fs::write(proj.join(name), body).unwrap();
    }
    let want = [
        ("proj/run.sh", 0o755, Y2001, 0),
        ("proj/notes.txt", 0o644, Y2020, 123_456_789),
        ("proj/secret", 0o600, Y2040, 5),
        ("proj/empty", 0o755, Y2020, 0),
        ("proj", 0o750, Y2001, 42),
    ];
    for (p, mode, s, ns) in want {
        set(&src.join(p), mode, s, ns);
    }
    let mask = umask();
    for (dir, extra) in [(&out, &[][..]), (&plain, &["--no-preserve"][..])] {
        let mut args = vec!["--yes", "--once"];
        args.extend_from_slice(extra);
        let mut r = bob.receiver(&broker, dir.path(), &args);
        let sent = alice.send_file(&broker, "bob", &proj, &[]);
        assert_eq!(sent.code, Some(0), "{sent:#?}");
        assert_eq!(r.wait(WAIT), Some(0));
    }
    for (p, mode, s, ns) in want {
        assert_eq!(
            kept(&out.join(p)),
            (mode & !mask, s, i64::from(ns)),
            "{p} (umask {mask:o})"
        );
    }
    // --no-preserve: today's private modes, stamped with the arrival.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    for (p, ..) in want {
        let (mode, s, _) = kept(&plain.join(p));
        let is_dir = fs::metadata(plain.join(p)).unwrap().is_dir();
        assert_eq!(mode, if is_dir { 0o700 } else { 0o600 }, "{p}");
        assert!((now - s).abs() < 120, "{p}: mtime {s}, now {now}");
    }
}

fn fixture(key: &str) -> Identity {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../common/tests/fixtures/{key}.pem"));
    Identity::from_pkcs8_pem(&fs::read_to_string(path).unwrap())
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_mode_is_clamped_and_an_absurd_time_not_applied() {
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let out = TempDir::new("out");
    let mut receiver = bob.receiver(&broker, out.path(), &["--yes"]);
    let data = b"#!/bin/sh\nid\n";
    let manifest = Manifest {
        entries: vec![Entry {
            path: vec!["suid.sh".into()],
            kind: EntryKind::File {
                size: data.len() as u64,
            },
            meta: Some(Meta {
                mode: 0o4755,
                mtime_s: i64::MAX,
                mtime_ns: 0,
            }),
        }],
    };
    let mut hs = HandSender::connect(&broker.addr, &alice, "bob")
        .await
        .accepted(hand::files(data.len() as u64))
        .await;
    hs.head(&manifest.encode()).await;
    let chunk = hs
        .stream
        .push(&data[..], true, std::time::Instant::now())
        .unwrap();
    hs.data
        .writer
        .write_frame(chunk.chunk.seal().frame())
        .await
        .unwrap();
    let bob_id = fixture("bob");
    let receivers = [(AgentName::new("bob").unwrap(), bob_id.fingerprint())];
    let (trailer, _) = hs.stream.trailer(&fixture("alice"), &receivers).unwrap();
    hs.data.writer.write_frame(trailer.frame()).await.unwrap();
    assert!(matches!(hs.answer().await, Some(Message::Receipt { .. })));
    let (mode, secs, _) = kept(&out.join("suid.sh"));
    assert_eq!(mode, 0o755 & !umask(), "the set-uid bit was applied");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((now - secs).abs() < 120, "mtime {secs}");
    receiver
        .stderr
        .wait_for("only the permission bits are applied", WAIT);
    receiver
        .stderr
        .wait_for("is out of range; not applied", WAIT);
}

#[test]
fn a_file_over_4_gib_is_taken_by_a_receiver_with_no_options() {
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    let size: u64 = (4 << 30) + (1 << 20);
    let free = rustix::fs::statvfs(out.path()).unwrap();
    if free.f_bavail * free.f_frsize < size + (2 << 30) {
        eprintln!("skipped: the disk has not {size} bytes and 2 GiB to spare");
        return;
    }
    // Sparse: no disk on this side.
    let file = src.join("disk.img");
    File::create(&file).unwrap().set_len(size).unwrap();
    let _r = bob.receiver(&broker, out.path(), &["--yes"]);
    let sent = alice.send_file(&broker, "bob", &file, &[]);
    assert_eq!(sent.code, Some(0), "{sent:#?}");
    assert_eq!(json(&sent)["bytes"], size);
    assert_eq!(fs::metadata(out.join("disk.img")).unwrap().len(), size);
}
