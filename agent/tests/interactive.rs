//! What a person does at a terminal, driven through a pseudo-terminal with
//! the real binaries on 127.0.0.1: picking a receiver with the arrow keys,
//! cancelling with Esc, and answering the receiver's question before a
//! transfer (yes, no, nothing). And the policies for receivers nobody
//! watches: `--accept-from NAME` and `--accept-from known`.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

mod support;

use std::path::Path;
use std::time::Duration;

use support::pty::{Pty, keys};
use support::{Broker, Home, Run, TempDir, WAIT, finals, names_in, pseudo_random};

/// The agent for `home` on a terminal, with `args`.
fn on_terminal(home: &Home, broker: &Broker, args: &[&str]) -> Pty {
    let mut cmd = home.command(broker);
    cmd.args(args);
    Pty::spawn(cmd)
}

/// Whether `home` has pinned a key for `name`.
fn pinned(home: &Home, name: &str) -> bool {
    keyferry_agent::trust::pins::PinStore::new(home.dir.join("known_peers"))
        .get(name)
        .unwrap()
        .is_some()
}

/// Nothing in `out` at all, not even a hidden staging directory.
fn empty(out: &Path) -> bool {
    names_in(out).is_empty()
}

/// A broker with bob and carol receiving (taking anything), and alice.
struct Three {
    broker: Broker,
    alice: Home,
    src: TempDir,
    bob_out: TempDir,
    carol_out: TempDir,
    _receivers: Vec<support::Proc>,
    _homes: Vec<Home>,
}

impl Three {
    fn start() -> Self {
        let broker = Broker::start();
        let (bob, carol) = (Home::new("bob", "bob"), Home::new("carol", "carol"));
        let (bob_out, carol_out) = (TempDir::new("bo"), TempDir::new("co"));
        let receivers = vec![
            bob.receiver(&broker, bob_out.path(), &["--yes"]),
            carol.receiver(&broker, carol_out.path(), &["--yes"]),
        ];
        Self {
            broker,
            alice: Home::new("alice", "alice"),
            src: TempDir::new("src"),
            bob_out,
            carol_out,
            _receivers: receivers,
            _homes: vec![bob, carol],
        }
    }

    /// Alice's sender of `file`, on a terminal, without `--to`.
    fn picking(&self, file: &Path) -> Pty {
        on_terminal(
            &self.alice,
            &self.broker,
            &["--role", "sender", "--file", file.to_str().unwrap()],
        )
    }
}

#[test]
fn a_sender_picks_a_receiver_with_the_arrow_keys_and_it_gets_the_file() {
    let t = Three::start();
    let file = t.src.join("notes.txt");
    std::fs::write(&file, b"for carol").unwrap();
    let mut alice = t.picking(&file);
    let screen = alice.wait_for("Send to whom?", WAIT);
    assert!(screen.contains("> [ ] bob"), "{screen}");
    assert!(screen.contains("  [ ] carol"), "{screen}");
    assert!(screen.contains("first contact"), "{screen}");
    alice.send(keys::DOWN);
    let screen = alice.wait_for("> [ ] carol", WAIT);
    if std::env::var_os("KEYFERRY_SHOW_SCREENS").is_some() {
        eprintln!("{screen}");
    }
    alice.send(keys::ENTER);
    assert_eq!(alice.wait(WAIT), Some(0), "{}", alice.transcript());
    assert_eq!(
        std::fs::read(t.carol_out.join("notes.txt")).unwrap(),
        b"for carol"
    );
    assert!(finals(t.bob_out.path()).is_empty());
    assert!(alice.transcript().contains("sending to carol"));
}

#[test]
fn typing_filters_the_picker_and_space_picks_several() {
    let t = Three::start();
    let file = t.src.join("both.bin");
    std::fs::write(&file, pseudo_random(100_000, 3)).unwrap();
    let mut alice = t.picking(&file);
    alice.wait_for("Send to whom?", WAIT);
    alice.send(keys::SPACE);
    alice.wait_for("> [x] bob", WAIT);
    alice.send(b"car");
    let screen = alice.wait_for("filter: car", WAIT);
    assert!(!screen.contains("bob  "), "bob is filtered out: {screen}");
    alice.send(keys::SPACE);
    alice.wait_for("> [x] carol", WAIT);
    alice.send(keys::ENTER);
    assert_eq!(alice.wait(WAIT), Some(0), "{}", alice.transcript());
    for out in [&t.bob_out, &t.carol_out] {
        assert_eq!(
            std::fs::read(out.join("both.bin")).unwrap(),
            std::fs::read(&file).unwrap()
        );
    }
}

#[test]
fn esc_or_ctrl_c_cancels_the_picker_with_130_and_nothing_is_sent() {
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    let mut receiver = bob.receiver(&broker, out.path(), &["--yes", "--json"]);
    let file = src.join("never.txt");
    std::fs::write(&file, b"x").unwrap();
    for key in [keys::ESC, keys::CTRL_C] {
        let mut sender = on_terminal(
            &alice,
            &broker,
            &["--role", "sender", "--file", file.to_str().unwrap()],
        );
        sender.wait_for("> [ ] bob", WAIT);
        sender.send(key);
        assert_eq!(sender.wait(WAIT), Some(130), "{}", sender.transcript());
        assert!(sender.transcript().contains("cancelled; nothing was sent"));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(receiver.stdout.drain().is_empty(), "an offer reached bob");
    assert!(empty(out.path()));
}

#[test]
fn with_nobody_receiving_the_picker_says_so_and_exits_5() {
    let broker = Broker::start();
    let alice = Home::new("alice", "alice");
    let mut alice = on_terminal(&alice, &broker, &["--role", "sender", "--message", "hi"]);
    assert_eq!(alice.wait(WAIT), Some(5), "{}", alice.transcript());
    assert!(
        alice.transcript().contains("nobody is receiving"),
        "{}",
        alice.transcript()
    );
}

#[test]
fn off_a_terminal_a_sender_still_needs_to() {
    let broker = Broker::start();
    let alice = Home::new("alice", "alice");
    let run = alice.run(&broker, &["--role", "sender", "--message", "hi"]);
    assert_eq!(run.code, Some(2), "{run:#?}");
    assert!(run.stderr.contains("needs --to PEER"), "{}", run.stderr);
}

/// A receiver on a terminal (asking, by default) and alice sending it
/// `size` bytes from another process; returns both.
fn asked(
    broker: &Broker,
    bob: &Home,
    out: &Path,
    extra: &[&str],
    file: &Path,
) -> (Pty, support::Proc) {
    let mut args = vec!["--role", "receiver", "--out-dir", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    let bob = on_terminal(bob, broker, &args);
    bob.wait_for("receiving as bob", WAIT);
    let alice = Home::new("alice", "alice");
    let sender = alice.start(
        broker,
        &[
            "--role",
            "sender",
            "--to",
            "bob",
            "--file",
            file.to_str().unwrap(),
        ],
    );
    // The home stays with the sender's process (its TempDir would go).
    std::mem::forget(alice);
    (bob, sender)
}

#[test]
fn a_receiver_on_a_terminal_asks_and_yes_places_the_file_and_pins() {
    let broker = Broker::start();
    let bob = Home::new("bob", "bob");
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    std::fs::create_dir(src.join("photos")).unwrap();
    for (i, n) in ["a.jpg", "b.jpg", "c.jpg"].iter().enumerate() {
        std::fs::write(src.join("photos").join(n), pseudo_random(1 << 20, i as u64)).unwrap();
    }
    let (mut receiver, sender) = asked(&broker, &bob, out.path(), &[], &src.join("photos"));
    let screen = receiver.wait_for("Accept? [y/N]", WAIT);
    assert!(
        screen.contains("alice (SHA256:")
            && screen.contains("first contact) offers photos/ (3 files, 3.00 MiB). Accept? [y/N]"),
        "{screen}"
    );
    // Nothing written, nothing pinned while the question stands.
    assert!(finals(out.path()).is_empty());
    assert!(!pinned(&bob, "alice"));
    receiver.line("y");
    let sent = Run::finish(sender);
    assert_eq!(sent.code, Some(0), "{sent:#?}");
    receiver.wait_for("received 1 item(s), 3 file(s)", WAIT);
    assert_eq!(finals(out.path()), ["photos"]);
    assert!(pinned(&bob, "alice"));
    assert!(receiver.transcript().contains("NEW KEY for alice"));
    if std::env::var_os("KEYFERRY_SHOW_SCREENS").is_some() {
        eprintln!("{}", receiver.transcript());
    }
}

#[test]
fn no_declines_with_exit_8_leaving_nothing_and_pinning_nothing() {
    let broker = Broker::start();
    let bob = Home::new("bob", "bob");
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    let file = src.join("offer.bin");
    std::fs::write(&file, pseudo_random(3 << 20, 5)).unwrap();
    let (mut receiver, sender) = asked(&broker, &bob, out.path(), &[], &file);
    receiver.wait_for("offers offer.bin (1 file, 3.00 MiB). Accept? [y/N]", WAIT);
    receiver.line("n");
    let sent = Run::finish(sender);
    assert_eq!(sent.code, Some(8), "{sent:#?}");
    assert!(sent.stderr.contains("declined"), "{}", sent.stderr);
    receiver.wait_for("(declined)", WAIT);
    std::thread::sleep(Duration::from_millis(300));
    assert!(empty(out.path()), "{:?}", names_in(out.path()));
    assert!(!pinned(&bob, "alice"));
}

#[test]
fn no_answer_refuses_after_the_timeout() {
    let broker = Broker::start();
    let bob = Home::new("bob", "bob");
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    let file = src.join("late.bin");
    std::fs::write(&file, b"nobody looks").unwrap();
    let (mut receiver, sender) = asked(&broker, &bob, out.path(), &["--ask-timeout", "2s"], &file);
    receiver.wait_for("Accept? [y/N]", WAIT);
    let sent = Run::finish(sender);
    assert_eq!(sent.code, Some(8), "{sent:#?}");
    assert!(
        sent.stderr.contains("did not answer in time"),
        "{}",
        sent.stderr
    );
    receiver.wait_for("no answer: refused", WAIT);
    assert!(empty(out.path()), "{:?}", names_in(out.path()));
    assert!(!pinned(&bob, "alice"));
    // The receiver goes on: the next offer is asked about too.
    assert!(receiver.child.try_wait().unwrap().is_none());
}

#[test]
fn accept_from_names_refuses_others_without_a_trace_and_takes_the_named() {
    let broker = Broker::start();
    let (alice, bob, carol) = (
        Home::new("alice", "alice"),
        Home::new("bob", "bob"),
        Home::new("carol", "carol"),
    );
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    let file = src.join("f.txt");
    std::fs::write(&file, b"hello").unwrap();
    let _bob = bob.receiver(&broker, out.path(), &["--accept-from", "alice"]);
    let refused = carol.send_file(&broker, "bob", &file, &[]);
    assert_eq!(refused.code, Some(8), "{refused:#?}");
    assert!(
        refused.stderr.contains("only from the senders it names"),
        "{}",
        refused.stderr
    );
    assert!(empty(out.path()));
    assert!(!pinned(&bob, "carol"));
    let taken = alice.send_file(&broker, "bob", &file, &[]);
    assert_eq!(taken.code, Some(0), "{taken:#?}");
    assert_eq!(std::fs::read(out.join("f.txt")).unwrap(), b"hello");
    assert!(pinned(&bob, "alice"));
}

#[test]
fn a_policy_holds_for_messages_and_pipes_and_a_json_receiver_says_whom_it_refused() {
    let broker = Broker::start();
    let (alice, bob, carol) = (
        Home::new("alice", "alice"),
        Home::new("bob", "bob"),
        Home::new("carol", "carol"),
    );
    let out = TempDir::new("out");
    let mut rx = bob.receiver(&broker, out.path(), &["--accept-from", "alice", "--json"]);
    let refused_event = |rx: &mut support::Proc| -> serde_json::Value {
        let line = rx.stdout.wait_for("\"refused\"", WAIT);
        serde_json::from_str(&line).unwrap()
    };

    // A message from a sender the policy does not name.
    let msg = carol.run(
        &broker,
        &["--role", "sender", "--to", "bob", "--message", "let me in"],
    );
    assert_eq!(msg.code, Some(8), "{msg:#?}");
    assert!(
        msg.stderr.contains("only from the senders it names"),
        "{}",
        msg.stderr
    );
    let ev = refused_event(&mut rx);
    assert_eq!(
        (&ev["from"], &ev["exit_code"]),
        (&"carol".into(), &8.into())
    );
    assert!(ev["reason"].as_str().is_some_and(|r| !r.is_empty()), "{ev}");

    // A pipe from the same sender: refused before a byte of it is taken.
    let (sender, mut input) = carol.pipe_sender(&broker, "bob", "p.bin", &["--retry-for", "0"]);
    // It may be refused (and gone) before all of it is written.
    let _ = std::io::Write::write_all(&mut input, &pseudo_random(64 << 10, 3));
    drop(input);
    let piped = Run::finish(sender);
    assert_eq!(piped.code, Some(8), "{piped:#?}");
    // The receiver's second `refused` event, this one for the pipe.
    let deadline = std::time::Instant::now() + WAIT;
    let refusals = |rx: &mut support::Proc| {
        let lines = rx.stdout.drain();
        lines.iter().filter(|l| l.contains("\"refused\"")).count()
    };
    while refusals(&mut rx) < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(refusals(&mut rx), 2, "{:#?}", rx.stdout.drain());
    assert!(empty(out.path()), "{:?}", names_in(out.path()));
    assert!(!pinned(&bob, "carol"));

    // The named sender's message goes through.
    let ok = alice.run(
        &broker,
        &["--role", "sender", "--to", "bob", "--message", "hello bob"],
    );
    assert_eq!(ok.code, Some(0), "{ok:#?}");
    let line = rx.stdout.wait_for("hello bob", WAIT);
    let ev: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        (&ev["event"], &ev["from"]),
        (&"message".into(), &"alice".into())
    );
}

#[test]
fn accept_from_known_refuses_a_first_contact_and_takes_a_pinned_sender() {
    let broker = Broker::start();
    let (alice, bob, carol) = (
        Home::new("alice", "alice"),
        Home::new("bob", "bob"),
        Home::new("carol", "carol"),
    );
    support::known_for_two_days(&alice, &bob);
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    let file = src.join("f.txt");
    std::fs::write(&file, b"hello").unwrap();
    let _bob = bob.receiver(&broker, out.path(), &["--accept-from", "known"]);
    let refused = carol.send_file(&broker, "bob", &file, &[]);
    assert_eq!(refused.code, Some(8), "{refused:#?}");
    assert!(
        refused.stderr.contains("first contact"),
        "{}",
        refused.stderr
    );
    assert!(!pinned(&bob, "carol"));
    assert!(empty(out.path()));
    let taken = alice.send_file(&broker, "bob", &file, &[]);
    assert_eq!(taken.code, Some(0), "{taken:#?}");
}

#[test]
fn off_a_terminal_without_a_policy_the_receiver_says_who_can_write() {
    let broker = Broker::start();
    let bob = Home::new("bob", "bob");
    let out = TempDir::new("out");
    let mut receiver = bob.receiver(&broker, out.path(), &[]);
    receiver.stderr.wait_for(
        "any agent the broker admits can send to this receiver",
        WAIT,
    );
    let quiet = Home::new("carol", "carol");
    let mut r2 = quiet.receiver(&broker, TempDir::new("o2").path(), &["--yes"]);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !r2.stderr.drain().iter().any(|l| l.contains("any agent")),
        "--yes says it is meant"
    );
}

#[test]
fn in_an_upload_to_two_one_declines_and_the_other_still_gets_it() {
    let broker = Broker::start();
    let (alice, bob, carol) = (
        Home::new("alice", "alice"),
        Home::new("bob", "bob"),
        Home::new("carol", "carol"),
    );
    let (src, bob_out, carol_out) = (TempDir::new("src"), TempDir::new("bo"), TempDir::new("co"));
    let file = src.join("both.bin");
    std::fs::write(&file, pseudo_random(2 << 20, 9)).unwrap();
    let _bob = bob.receiver(&broker, bob_out.path(), &["--yes"]);
    let carol_args = [
        "--role",
        "receiver",
        "--out-dir",
        carol_out.path().to_str().unwrap(),
    ];
    let mut carol_rx = on_terminal(&carol, &broker, &carol_args);
    carol_rx.wait_for("receiving as carol", WAIT);
    let sender = alice.start(
        &broker,
        &[
            "--role",
            "sender",
            "--to",
            "bob",
            "--to",
            "carol",
            "--retry-for",
            "0",
            "--file",
            file.to_str().unwrap(),
        ],
    );
    carol_rx.wait_for("Accept? [y/N]", WAIT);
    // Nobody got a byte while carol thinks: the upload waits for her.
    assert!(finals(bob_out.path()).is_empty());
    carol_rx.line("n");
    let sent = Run::finish(sender);
    assert_eq!(sent.code, Some(11), "{sent:#?}");
    assert!(
        sent.stderr.contains("carol") && sent.stderr.contains("declined"),
        "{}",
        sent.stderr
    );
    assert_eq!(
        std::fs::read(bob_out.join("both.bin")).unwrap(),
        std::fs::read(&file).unwrap()
    );
    assert!(empty(carol_out.path()));
}

#[test]
fn a_named_new_sender_is_not_slowed_by_the_new_key_budget() {
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let out = TempDir::new("out");
    let _bob = bob.receiver(&broker, out.path(), &["--accept-from", "alice"]);
    // A first contact, so 6 a minute unless named: eight in a row go at once.
    for i in 0..8 {
        let run = alice.run(
            &broker,
            &[
                "--role",
                "sender",
                "--to",
                "bob",
                "--message",
                &format!("m{i}"),
            ],
        );
        assert_eq!(run.code, Some(0), "{run:#?}");
        assert!(!run.stderr.contains("offering again"), "{}", run.stderr);
    }
}

#[test]
fn two_offers_at_once_are_asked_one_after_the_other_and_a_bar_in_flight_steps_aside() {
    let broker = Broker::start();
    let (bob, carol) = (Home::new("bob", "bob"), Home::new("carol", "carol"));
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    let big = src.join("big.bin");
    std::fs::write(&big, pseudo_random(256 << 20, 12)).unwrap();
    let small = src.join("small.txt");
    std::fs::write(&small, b"from carol").unwrap();
    let (mut receiver, alice) = asked(&broker, &bob, out.path(), &[], &big);
    receiver.wait_for("offers big.bin", WAIT);
    // carol offers too while alice's question stands: hers waits its turn.
    let carol_send = carol.start(
        &broker,
        &[
            "--role",
            "sender",
            "--to",
            "bob",
            "--file",
            small.to_str().unwrap(),
        ],
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !receiver.screen().contains("offers small.txt"),
        "{}",
        receiver.screen()
    );
    receiver.line("y");
    // alice's data flows (a bar) while carol's question is put.
    let screen = receiver.wait_for("offers small.txt", WAIT);
    let question = screen
        .lines()
        .find(|l| l.contains("offers small.txt"))
        .unwrap();
    assert!(
        question.starts_with("carol ("),
        "the bar garbled the question: {question:?}"
    );
    receiver.line("y");
    assert_eq!(Run::finish(carol_send).code, Some(0));
    assert_eq!(Run::finish(alice).code, Some(0));
    assert_eq!(std::fs::read(out.join("small.txt")).unwrap(), b"from carol");
    assert_eq!(
        support::hash_file(&out.join("big.bin")),
        support::hash_file(&big)
    );
}
