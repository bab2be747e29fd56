//! The receiver's hidden staging directories against a local user and
//! against another sender, driven as a user would (the real binaries on
//! 127.0.0.1): a kept prefix whose directory was swapped for a link or
//! opened to others is removed and the transfer starts again from byte 0
//! instead of being refused for good; a tree that verified but has no free
//! name leaves nothing behind and says why; and one sender can neither use
//! nor delete another sender's resumable prefix.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

mod support;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keyferry_agent::send::source::{Source, Walk};
use keyferry_common::ids::StreamId;
use keyferry_common::name::AgentName;
use keyferry_common::wire::message::Message;
use support::hand::{self, HandSender};
use support::{Broker, Home, Proc, TempDir, WAIT, finals, hash_file, json, pseudo_random};

const MIB: usize = 1 << 20;

/// The staging directories in `out`.
fn stagings(out: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with(".keyferry-") && n.ends_with(".d")
        })
        .collect();
    v.sort();
    v
}

/// Sends `file` from alice to bob and kills the sender (SIGKILL) once the
/// receiver holds a few MiB; returns once the receiver has given the
/// attempt up and kept its prefix: the one staging directory, with its
/// journal.
fn cut(alice: &Home, broker: &Broker, receiver: &mut Proc, out: &Path, file: &Path) -> PathBuf {
    let mut sender = alice.start(
        broker,
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
    support::wait_for_data(receiver.child.id(), out, 4 << 20);
    sender.kill();
    // The receiver reports the failure once it journalled what verified.
    let before = receiver.stderr.drain().len();
    let deadline = std::time::Instant::now() + WAIT;
    while !receiver.stderr.drain()[before..]
        .iter()
        .any(|l| l.contains("nothing was placed"))
    {
        assert!(std::time::Instant::now() < deadline, "no failure reported");
        std::thread::sleep(Duration::from_millis(20));
    }
    let dirs = stagings(out);
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    assert!(dirs[0].join("journal").is_file());
    dirs[0].clone()
}

/// Sends `file` again (a new run of the same command) and checks that it
/// arrived whole under `placed`, starting from byte 0.
fn send_again(alice: &Home, broker: &Broker, file: &Path, out: &Path, placed: &str) {
    let sent = alice.send_file(broker, "bob", file, &["--retry-for", "0"]);
    assert_eq!(sent.code, Some(0), "{sent:#?}");
    let report = json(&sent);
    assert_eq!(report["resumed_from"], 0, "{report}");
    assert_eq!(hash_file(&out.join(placed)), hash_file(file));
}

#[test]
fn a_kept_prefix_swapped_for_a_link_or_opened_to_others_is_dropped_and_the_retry_starts_from_0() {
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    support::known_for_two_days(&alice, &bob);
    let (src, out, elsewhere) = (
        TempDir::new("src"),
        TempDir::new("out"),
        TempDir::new("else"),
    );
    let file = src.join("big.bin");
    std::fs::write(&file, pseudo_random(256 * MIB, 25)).unwrap();
    let mut receiver = bob.receiver(&broker, out.path(), &[]);

    // A symbolic link to another directory in the kept directory's place.
    let kept = cut(&alice, &broker, &mut receiver, out.path(), &file);
    let moved = elsewhere.join("moved");
    std::fs::rename(&kept, &moved).unwrap();
    std::os::unix::fs::symlink(&moved, &kept).unwrap();
    send_again(&alice, &broker, &file, out.path(), "big.bin");
    // The link went, what it pointed to was not touched, and nothing is left.
    assert!(moved.join("journal").is_file(), "the link was followed");
    assert!(std::fs::symlink_metadata(&kept).is_err());
    assert!(
        stagings(out.path()).is_empty(),
        "{:?}",
        stagings(out.path())
    );

    // The kept directory opened to others (mode 0755).
    let kept = cut(&alice, &broker, &mut receiver, out.path(), &file);
    std::fs::set_permissions(&kept, std::fs::Permissions::from_mode(0o755)).unwrap();
    send_again(&alice, &broker, &file, out.path(), "big (1).bin");
    assert!(
        stagings(out.path()).is_empty(),
        "{:?}",
        stagings(out.path())
    );
    assert_eq!(finals(out.path()), ["big (1).bin", "big.bin"]);
}

#[test]
fn a_tree_with_no_free_name_leaves_nothing_behind_and_says_why() {
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    std::fs::write(out.join("b.bin"), b"old").unwrap();
    for n in 1..=99 {
        std::fs::write(out.join(&format!("b ({n}).bin")), b"old").unwrap();
    }
    let before = support::names_in(out.path());
    let (a, b) = (src.join("a.bin"), src.join("b.bin"));
    std::fs::write(&a, pseudo_random(3 * MIB, 1)).unwrap();
    std::fs::write(&b, pseudo_random(MIB, 2)).unwrap();
    let mut receiver = bob.receiver(&broker, out.path(), &["--once"]);
    let sent = alice.run(
        &broker,
        &[
            "--role",
            "sender",
            "--to",
            "bob",
            "--file",
            a.to_str().unwrap(),
            "--file",
            b.to_str().unwrap(),
        ],
    );
    assert_eq!(sent.code, Some(8), "{sent:#?}");
    assert!(sent.stderr.contains("no free name"), "{}", sent.stderr);
    assert!(!sent.stderr.contains("disk full"), "{}", sent.stderr);
    // For the receiver it is a storage failure, not a refusal.
    assert_eq!(receiver.wait(WAIT), Some(1));
    let said = receiver.stderr.drain().join("\n");
    assert!(
        said.contains("b.bin and b.bin (1)") || said.contains("all exist"),
        "{said}"
    );
    // Not a.bin, and no hidden copy of anything.
    assert_eq!(support::names_in(out.path()), before);
}

#[test]
fn one_sender_can_neither_use_nor_delete_anothers_kept_prefix() {
    let broker = Broker::start();
    let (alice, bob, mallory) = (
        Home::new("alice", "alice"),
        Home::new("bob", "bob"),
        Home::new("mallory", "mallory"),
    );
    support::known_for_two_days(&alice, &bob);
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    let file = src.join("big.bin");
    std::fs::write(&file, pseudo_random(256 * MIB, 26)).unwrap();
    let mut receiver = bob.receiver(&broker, out.path(), &[]);
    let kept = cut(&alice, &broker, &mut receiver, out.path(), &file);

    // Mallory offers the same size, saying she continues alice's transfer
    // (its origin, as alice's agent computes it).
    let source = Source::files(std::slice::from_ref(&file), &Walk::default()).unwrap();
    let origin = source
        .origin(
            &AgentName::new("alice").unwrap(),
            &AgentName::new("bob").unwrap(),
        )
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut m = HandSender::connect(&broker.addr, &mallory, "bob").await;
        let terms = keyferry_common::handshake::Terms {
            resumes: Some(origin),
            ..hand::files(source.total)
        };
        let (pending, answer) = m.offer(terms, StreamId::random()).await;
        let Message::Accept { accept, .. } = answer else {
            panic!("not accepted: {answer:?}")
        };
        // Accepted as a transfer of her own, from byte 0: nothing of alice's.
        let accepted = pending.handle_accept(&accept).unwrap();
        assert_eq!(accepted.resume_offset, 0);
    });
    drop(rt);
    // Alice's kept prefix is still there, and her next run resumes from it.
    assert!(kept.join("journal").is_file(), "mallory's offer removed it");
    let sent = alice.send_file(&broker, "bob", &file, &["--retry-for", "0"]);
    assert_eq!(sent.code, Some(0), "{sent:#?}");
    let report = json(&sent);
    assert!(report["resumed_from"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(hash_file(&out.join("big.bin")), hash_file(&file));
}
