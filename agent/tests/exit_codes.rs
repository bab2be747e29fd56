//! One pinned error line for every documented exit code that needs a broker
//! (the others are trycmd snapshots in `tests/cmd/`): real `broker` and
//! `agent` processes, and for exit 9 a broker that flips a bit in the
//! receipt. `[..]` in a pattern stands for any text within the line.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

mod support;

use std::time::Duration;

use keyferry_common::wire::message::Message;
use support::evil::{Action, EvilBroker, Hooks, finish_within, flip};
use support::{Broker, Home, Run, TempDir, WAIT};

/// Whether `line` matches `pattern`, where `[..]` stands for any text.
fn matches(pattern: &str, line: &str) -> bool {
    let parts: Vec<&str> = pattern.split("[..]").collect();
    if parts.len() == 1 {
        return line == pattern;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !line.starts_with(first) || !line.ends_with(last) || line.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &line[first.len()..line.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    true
}

/// Asserts the run exited with `code` and printed a line matching `pattern`
/// (the last line of stderr for an error, any stdout line for success).
fn pinned(run: &Run, code: i32, pattern: &str) {
    assert_eq!(run.code, Some(code), "{run:#?}");
    let line = if code == 0 {
        run.stdout.lines().find(|l| matches(pattern, l))
    } else {
        run.stderr.lines().last().filter(|l| matches(pattern, l))
    };
    assert!(line.is_some(), "no line matching {pattern:?} in {run:#?}");
}

#[test]
fn every_documented_exit_code_has_its_line() {
    let broker = Broker::start();
    let (alice, bob, carol) = (
        Home::new("alice", "alice"),
        Home::new("bob", "bob"),
        Home::new("carol", "carol"),
    );
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    std::fs::write(src.join("ten.txt"), b"ten bytes!").unwrap();
    let ten = src.join("ten.txt");
    let ten = ten.to_str().unwrap();
    let _carol_rx = carol.receiver(&broker, out.path(), &[]);

    // 0: verified success.
    let mut bob_rx = bob.receiver(&broker, out.path(), &["--max-size", "5"]);
    pinned(
        &alice.run(
            &broker,
            &["--role", "sender", "--to", "bob", "--message", "hi"],
        ),
        0,
        "sent message to bob (2 bytes in [..] s, 1 session keys, sha256 [..]) — receipt verified",
    );
    // 8: refused by the receiver (ten bytes are over its --max-size of 5).
    pinned(
        &alice.run(&broker, &["--role", "sender", "--to", "bob", "--file", ten]),
        8,
        "agent: bob refused the transfer: too large: it takes at most 5 B (5 bytes) now (its \
         --max-size, or its free disk space less the 1 GiB it keeps), and this is 10 B (10 bytes)",
    );
    bob_rx.stderr.wait_for("refused transfer", WAIT);
    // 5: unknown peer.
    pinned(
        &alice.run(
            &broker,
            &["--role", "sender", "--to", "nobody", "--file", ten],
        ),
        5,
        "agent: unknown peer nobody: no agent of that name has registered with this broker \
         (check the name; `agent --list` shows who is online)",
    );
    // 6: peer key mismatch (alice requires carol's key for bob).
    let carol_fp = keyferry_agent::home::load_identity(&carol.dir.join("identity.pem"))
        .unwrap()
        .fingerprint()
        .to_string();
    pinned(
        &alice.run(
            &broker,
            &[
                "--role",
                "sender",
                "--to",
                "bob",
                "--file",
                ten,
                "--peer-fingerprint",
                &carol_fp,
            ],
        ),
        6,
        "agent: KEY MISMATCH for bob: pinned SHA256:[..], but it now presents SHA256:[..]. \
         This may be an attack. If the key really changed, verify the new fingerprint out of \
         band and remove the line for bob from [..]known_peers",
    );
    // 4: broker key mismatch.
    pinned(
        &alice.run(
            &broker,
            &[
                "--broker-fingerprint",
                "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                "--list",
            ],
        ),
        4,
        "agent: BROKER KEY MISMATCH for 127.0.0.1:[..]: expected \
         SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA, but the broker presents SHA256:[..]. \
         This may be an attack. If the broker really changed its key, verify the new \
         fingerprint and remove the line for 127.0.0.1:[..] from [..]known_brokers, or pass \
         --broker-fingerprint",
    );
    // 10: the name belongs to another key.
    pinned(
        &Home::new("alice", "mallory").run(&broker, &["--list"]),
        10,
        "agent: the broker refused this agent: the name alice is registered to another key; \
         choose another name with --name",
    );
    // 1: other errors, here a key file others can read.
    let careless = Home::new("dave", "dave");
    use std::os::unix::fs::PermissionsExt as _;
    let key = careless.dir.join("identity.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    pinned(
        &careless.run(&broker, &["--list"]),
        1,
        "agent: key file [..]identity.pem is accessible by other users (mode 644); refusing \
         to use it. Run `chmod 600 [..]identity.pem` if the key is still secret, or move it \
         away to create a new one",
    );
    // 130: interrupted (Ctrl-C).
    let mut waiting = Home::new("erin", "carol").receiver(&broker, out.path(), &[]);
    waiting.signal(rustix::process::Signal::INT);
    assert_eq!(waiting.wait(WAIT), Some(130));
    waiting.stderr.wait_for("agent: interrupted", WAIT);
}

/// 9: verification failed — here a broker flips a bit in the receipt.
#[test]
fn exit_9_when_the_receipt_does_not_verify() {
    let broker = EvilBroker::start(Hooks::pass_through().back(|_, m| match m {
        Message::Receipt { .. } => vec![Action::Pass(flip(m, 3))],
        m => vec![Action::Pass(m)],
    }));
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    std::fs::write(src.join("a.txt"), b"abc").unwrap();
    let _rx = broker.receiver(&bob, out.path(), &[]);
    let run = finish_within(
        broker.sender(&alice, "bob", &src.join("a.txt"), &[]),
        Duration::from_secs(45),
    );
    pinned(
        &run,
        9,
        "agent: verification failed: the receipt does not confirm the length and SHA-256 we sent",
    );
}

#[test]
fn the_matcher_means_what_it_says() {
    assert!(matches("a [..] c", "a b c"));
    assert!(matches("a [..] c", "a  c"));
    assert!(!matches("a [..] c", "a b d"));
    assert!(!matches("exact", "exact but longer"));
    assert!(matches("exact", "exact"));
    assert!(matches("[..]x[..]y", "1x2y"));
    assert!(!matches("[..]x[..]y", "1y2x"));
}
