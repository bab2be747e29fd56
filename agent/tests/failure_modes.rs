//! Failures: a side killed mid-transfer, a full disk, hostile file names from a
//! sender, unusable key and pin files. In each case the other sides report it
//! and exit non-zero in bounded time (the sender with `--retry-for 0`: here it
//! must not wait to resume), and nothing appears under a final name; what
//! verified before a side went away is kept hidden for a resume.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use keyferry_common::manifest::Manifest;
use keyferry_common::wire::message::{AbortReason, Message};
use support::hand::{self, HandSender};
use support::{Broker, Home, Run, TempDir, WAIT, finals, pseudo_random, wait_for_data};

fn temporaries(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            let n = e.as_ref().unwrap().file_name();
            let n = n.to_string_lossy();
            n.starts_with(".keyferry-")
        })
        .count()
}

const BIG: usize = 512 << 20;

fn big_file(src: &TempDir) -> std::path::PathBuf {
    let path = src.join("big.bin");
    std::fs::write(&path, pseudo_random(BIG, 11)).unwrap();
    path
}

#[test]
fn the_receiver_killed_mid_transfer() {
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    let file = big_file(&src);
    let mut receiver = bob.receiver(&broker, out.path(), &[]);
    let sender = alice.start(
        &broker,
        &[
            "--role",
            "sender",
            "--to",
            "bob",
            "--retry-for",
            "0",
            "--file",
            file.to_str().unwrap(),
        ],
    );
    wait_for_data(receiver.child.id(), out.path(), 4 << 20);
    receiver.kill();
    let start = Instant::now();
    let sent = Run::finish(sender);
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "the sender took {:?}",
        start.elapsed()
    );
    assert!(matches!(sent.code, Some(c) if c != 0), "{sent:#?}");
    assert!(sent.stderr.contains("disconnected"), "{}", sent.stderr);
    assert!(finals(out.path()).is_empty(), "{:?}", finals(out.path()));
    // Only the hidden staging directory is left, to be resumed (or removed
    // at the next start if its journal is no good).
    assert_eq!(temporaries(out.path()), 1);
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 1);
}

#[test]
fn the_sender_killed_mid_transfer() {
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let src = TempDir::new("src");
    let file = big_file(&src);
    // Direct (the default on one machine), then through the relay, where
    // the broker tells the receiver that the sender went away.
    for direct in ["auto", "never"] {
        let out = TempDir::new("out");
        let mut receiver = bob.receiver(&broker, out.path(), &["--once"]);
        let mut sender = alice.start(
            &broker,
            &[
                "--role",
                "sender",
                "--to",
                "bob",
                "--direct",
                direct,
                "--file",
                file.to_str().unwrap(),
            ],
        );
        wait_for_data(receiver.child.id(), out.path(), 4 << 20);
        sender.kill();
        let start = Instant::now();
        let code = receiver.wait(Duration::from_secs(90));
        assert!(
            start.elapsed() < Duration::from_secs(70),
            "{:?}",
            start.elapsed()
        );
        assert!(matches!(code, Some(c) if c != 0), "{code:?}");
        let line = receiver.stderr.wait_for("nothing was placed", WAIT);
        if direct == "never" {
            assert!(line.contains("the sender's connection was lost"), "{line}");
        }
        assert!(finals(out.path()).is_empty());
        assert_eq!(
            temporaries(out.path()),
            1,
            "the receiver keeps what verified for the sender's retry"
        );
    }
}

#[test]
fn the_broker_killed_mid_transfer_then_restarted() {
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    let file = big_file(&src);
    let mut receiver = bob.receiver(&broker, out.path(), &["--once"]);
    let sender = alice.start(
        &broker,
        &[
            "--role",
            "sender",
            "--to",
            "bob",
            "--retry-for",
            "0",
            "--direct",
            "never",
            "--file",
            file.to_str().unwrap(),
        ],
    );
    wait_for_data(receiver.child.id(), out.path(), 4 << 20);
    let mut proc = broker.proc;
    proc.kill();
    let start = Instant::now();
    let sent = Run::finish(sender);
    let code = receiver.wait(Duration::from_secs(90));
    assert!(
        start.elapsed() < Duration::from_secs(70),
        "{:?}",
        start.elapsed()
    );
    assert!(matches!(sent.code, Some(c) if c != 0), "{sent:#?}");
    assert!(sent.stderr.contains("broker"), "{}", sent.stderr);
    assert!(matches!(code, Some(c) if c != 0), "{code:?}");
    assert!(finals(out.path()).is_empty(), "{:?}", finals(out.path()));

    // Same data dir: same certificate, same name bindings.
    let broker = Broker::start_in(broker.data);
    let impostor = Home::new("alice", "mallory");
    assert_eq!(impostor.run(&broker, &["--list"]).code, Some(10));
    let out2 = TempDir::new("out");
    let mut receiver = bob.receiver(&broker, out2.path(), &["--once"]);
    std::fs::write(src.join("small.txt"), b"after the restart").unwrap();
    let sent = alice.send_file(&broker, "bob", &src.join("small.txt"), &[]);
    assert_eq!(sent.code, Some(0), "{sent:#?}");
    assert_eq!(receiver.wait(WAIT), Some(0));
    assert_eq!(
        std::fs::read(out2.join("small.txt")).unwrap(),
        b"after the restart"
    );
}

/// Mounts a tmpfs of `size` on `dir`; `false` if this machine does not allow it.
fn mount_tmpfs(dir: &Path, size: &str) -> bool {
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .status();
    matches!(status, Ok(s) if s.success())
}

/// Fills the file system under `dir` to within 32 MiB. tmpfs undoes a
/// `fallocate` that does not fit whole, so it takes 32 MiB pieces until one
/// does not fit.
fn fill_up(dir: &Path) {
    for i in 0..64 {
        let piece = std::process::Command::new("fallocate")
            .args(["-l", "32M"])
            .arg(dir.join(format!("filler-{i}")))
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        if !piece.success() {
            assert!(i > 0, "fallocate could not take even one 32 MiB piece");
            return;
        }
    }
    panic!("64 pieces of 32 MiB did not fill a 1300 MiB file system");
}

struct Unmount<'a>(&'a Path);

impl Drop for Unmount<'_> {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.0).status();
    }
}

#[test]
fn a_disk_too_small_is_refused_before_any_data_and_a_disk_that_fills_up_fails_cleanly() {
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let (src, mnt) = (TempDir::new("src"), TempDir::new("mnt"));
    let out = mnt.join("out");
    std::fs::create_dir(&out).unwrap();
    if !mount_tmpfs(&out, "1300m") {
        eprintln!("SKIPPED: this machine does not allow mounting a tmpfs (needs root)");
        return;
    }
    let _unmount = Unmount(&out);

    // 1 GiB must stay free beyond the file: 400 MiB does not fit in 1300 MiB.
    std::fs::write(src.join("too-big.bin"), pseudo_random(400 << 20, 1)).unwrap();
    let mut receiver = bob.receiver(&broker, &out, &[]);
    let sent = alice.send_file(&broker, "bob", &src.join("too-big.bin"), &[]);
    assert_eq!(sent.code, Some(8), "{sent:#?}");
    assert!(sent.stderr.contains("free disk space"), "{}", sent.stderr);
    receiver.stderr.wait_for("do not fit", WAIT);
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);

    // 200 MiB fits; then something else fills the disk while it arrives.
    let file = src.join("fits.bin");
    std::fs::write(&file, pseudo_random(200 << 20, 2)).unwrap();
    let sender = alice.start(
        &broker,
        &[
            "--role",
            "sender",
            "--to",
            "bob",
            "--retry-for",
            "0",
            "--file",
            file.to_str().unwrap(),
        ],
    );
    wait_for_data(receiver.child.id(), &out, 4 << 20);
    // The receiver is frozen while the disk fills, so the transfer cannot
    // win the race, then thawed to meet the full disk.
    receiver.signal(rustix::process::Signal::STOP);
    fill_up(&out);
    receiver.signal(rustix::process::Signal::CONT);
    let sent = Run::finish(sender);
    assert!(matches!(sent.code, Some(c) if c != 0), "{sent:#?}");
    assert!(sent.stderr.contains("could not store"), "{}", sent.stderr);
    receiver.stderr.wait_for("cannot store the data", WAIT);
    std::thread::sleep(Duration::from_millis(200));
    assert!(!out.join("fits.bin").exists());
    assert_eq!(temporaries(&out), 0);
}

#[test]
fn an_out_dir_that_is_not_a_directory_is_a_clear_error() {
    let broker = Broker::start();
    let bob = Home::new("bob", "bob");
    let dir = TempDir::new("out");
    let not_dir = dir.join("file");
    std::fs::write(&not_dir, b"x").unwrap();
    // (A directory that does not exist is created: daily.rs.)
    let run = bob.run(
        &broker,
        &["--role", "receiver", "--out-dir", not_dir.to_str().unwrap()],
    );
    assert_eq!(run.code, Some(1), "{run:#?}");
    assert!(run.stderr.contains("out dir"), "{}", run.stderr);
    assert!(run.stderr.contains("not a directory"), "{}", run.stderr);
    assert!(!run.stderr.contains("panicked"));
}

/// A hostile sender's transfer of one 5-byte file called `name` (the agent's
/// sender refuses such names itself, so this one is driven by hand): the
/// receiver's answer to its manifest.
async fn hostile_manifest(broker: &Broker, alice: &Home, name: &str) -> (String, Option<Message>) {
    let mut hs = HandSender::connect(&broker.addr, alice, "bob")
        .await
        .accepted(hand::files(5))
        .await;
    let tid = hs.accepted.pair.transfer_id.to_string();
    hs.head(&Manifest::single_file(name, 5).encode()).await;
    (tid, hs.answer().await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_file_names_are_refused_and_nothing_is_written_outside_the_out_dir() {
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let parent = TempDir::new("parent");
    let out = parent.join("out");
    std::fs::create_dir(&out).unwrap();
    // bob has known alice for two days: the stricter RSA budget for new keys
    // (6 offers a minute) would otherwise refuse the later names first.
    support::known_for_two_days(&alice, &bob);
    let mut receiver = bob.receiver(&broker, &out, &[]);
    for (name, why) in [
        ("../escaped.txt", "separator in a component"),
        ("/etc/passwd", "separator in a component"),
        ("a/b.txt", "separator in a component"),
        ("a\\b.txt", "separator in a component"),
        ("..", "dot component"),
        ("evil\u{1b}[2J.txt", "control"),
        ("x\u{202e}txt.exe", "control"),
        ("CON", "device name"),
        ("lpt1.log", "device name"),
        ("c:boot.ini", "colon"),
        ("trailing.", "ends with a dot"),
        ("", "empty or dot component"),
        // Invisible: TAG characters, a Mongolian vowel separator, line and
        // paragraph separators, deprecated format controls, interlinear
        // annotation, Hangul fillers.
        ("invoice\u{E0069}\u{E0078}.pdf", "invisible"),
        ("a\u{180E}b.txt", "invisible"),
        ("line\u{2028}break.txt", "invisible"),
        ("para\u{2029}.txt", "invisible"),
        ("x\u{206A}y.txt", "invisible"),
        ("x\u{FFF9}y.txt", "invisible"),
        ("\u{3164}.txt", "invisible"),
        ("a\u{115F}b.txt", "invisible"),
    ] {
        let (tid, answer) = hostile_manifest(&broker, &alice, name).await;
        assert!(
            matches!(
                answer,
                Some(Message::Abort {
                    reason: AbortReason::Policy,
                    ..
                })
            ),
            "{name:?}: {answer:?}"
        );
        let line = tokio::task::block_in_place(|| {
            receiver
                .stderr
                .wait_for(&format!("transfer {tid} from alice failed"), WAIT)
        });
        assert!(line.contains(why), "{name:?}: {line}");
    }
    // Nothing anywhere: not in the out dir, not beside it.
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(parent.path()).unwrap().count(), 1);

    // A leading dot is not refused but cannot make a hidden file.
    let src = TempDir::new("src");
    std::fs::write(src.join(".bashrc"), b"alias ls=rm").unwrap();
    let sent =
        tokio::task::block_in_place(|| alice.send_file(&broker, "bob", &src.join(".bashrc"), &[]));
    assert_eq!(sent.code, Some(0), "{sent:#?}");
    receiver.stdout.wait_for("received", WAIT);
    assert_eq!(std::fs::read(out.join("_.bashrc")).unwrap(), b"alias ls=rm");
    assert!(!out.join(".bashrc").exists());
}

/// A manifest that is no tree a receiver may build, from a hostile sender
/// that holds the stream keys: refused before any data, nothing left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_manifests_are_refused_before_any_data() {
    use keyferry_common::manifest::{Entry, EntryKind};
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let out = TempDir::new("out");
    support::known_for_two_days(&alice, &bob);
    let mut receiver = bob.receiver(&broker, out.path(), &[]);
    let e = |path: &[&str], kind| Entry {
        path: path.iter().map(|c| (*c).to_owned()).collect(),
        kind,
        meta: None,
    };
    let file = |path: &[&str], size| e(path, EntryKind::File { size });
    let dir = |path: &[&str]| e(path, EntryKind::Dir);
    let many: Vec<Entry> = (0..=10_000).map(|i| file(&[&format!("f{i}")], 0)).collect();
    let cases: Vec<(&str, u64, Vec<Entry>, &str)> = vec![
        (
            "duplicate path",
            2,
            vec![file(&["a"], 1), file(&["a"], 1)],
            "twice",
        ),
        (
            "a file below a file",
            2,
            vec![file(&["a"], 1), file(&["a", "b"], 1)],
            "below a file",
        ),
        (
            "an entry before its directory",
            1,
            vec![file(&["d", "x"], 1), dir(&["d"])],
            "before its directory",
        ),
        (
            "an absolute path",
            1,
            vec![file(&["/etc/passwd"], 1)],
            "separator",
        ),
        (
            "a dot-dot component",
            1,
            vec![dir(&["d"]), file(&["d", ".."], 1)],
            "dot component",
        ),
        ("more entries than allowed", 0, many, "exceeds a limit"),
        (
            "more bytes than the offer declared",
            5,
            vec![file(&["a"], 6)],
            "the offer 5",
        ),
        (
            "fewer bytes than the offer declared",
            5,
            vec![file(&["a"], 4)],
            "the offer 5",
        ),
        ("an empty tree", 0, vec![], "lists nothing"),
        (
            "a stream beside a file",
            1,
            vec![e(&["s"], EntryKind::Stream), file(&["b"], 1)],
            "only entry",
        ),
    ];
    for (what, size, entries, why) in cases {
        let mut hs = HandSender::connect(&broker.addr, &alice, "bob")
            .await
            .accepted(hand::files(size))
            .await;
        let tid = hs.accepted.pair.transfer_id;
        hs.head(&Manifest { entries }.encode()).await;
        let answer = hs.answer().await;
        assert!(
            matches!(
                answer,
                Some(Message::Abort {
                    reason: AbortReason::Policy,
                    ..
                })
            ),
            "{what}: {answer:?}"
        );
        let line = tokio::task::block_in_place(|| {
            receiver
                .stderr
                .wait_for(&format!("transfer {tid} from alice failed"), WAIT)
        });
        assert!(line.contains(why), "{what}: {line}");
    }
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
}

#[test]
fn unusable_key_and_pin_files_are_clear_errors_not_panics() {
    use std::os::unix::fs::PermissionsExt as _;
    let broker = Broker::start();
    let alice = Home::new("alice", "alice");
    let key = alice.dir.join("identity.pem");

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let run = alice.run(&broker, &["--list"]);
    assert_eq!(run.code, Some(1), "{run:#?}");
    assert!(
        run.stderr.contains("chmod 600") && run.stderr.contains("identity.pem"),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("panicked"));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    let good = std::fs::read(&key).unwrap();
    std::fs::write(
        &key,
        b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let run = alice.run(&broker, &["--list"]);
    assert_eq!(run.code, Some(1), "{run:#?}");
    assert!(run.stderr.contains("not a PKCS#8 PEM"), "{}", run.stderr);
    assert!(!run.stderr.contains("panicked"));
    std::fs::write(&key, good).unwrap();

    for pins in ["known_brokers", "known_peers"] {
        let path = alice.dir.join(pins);
        std::fs::write(&path, "bob SHA256:not-a-fingerprint 1\n").unwrap();
        let run = alice.run(
            &broker,
            &["--role", "sender", "--to", "bob", "--message", "hi"],
        );
        if pins == "known_brokers" {
            assert_eq!(run.code, Some(1), "{run:#?}");
            assert!(run.stderr.contains("corrupt at line 1"), "{}", run.stderr);
        }
        assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
        std::fs::remove_file(&path).unwrap();
    }
    // A corrupt known_peers is reached only once the peer is known to the broker.
    let bob = Home::new("bob", "bob");
    let out = TempDir::new("out");
    let _r = bob.receiver(&broker, out.path(), &[]);
    std::fs::write(alice.dir.join("known_peers"), "bob\n").unwrap();
    let run = alice.run(
        &broker,
        &["--role", "sender", "--to", "bob", "--message", "hi"],
    );
    assert_eq!(run.code, Some(1), "{run:#?}");
    assert!(
        run.stderr.contains("known_peers is corrupt at line 1"),
        "{}",
        run.stderr
    );
}
