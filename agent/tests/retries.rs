//! Waiting instead of failing, driven as a user would (real binaries on
//! 127.0.0.1): a sender the receiver asks to come back later (its RSA
//! budget for a newly met key is spent) waits and succeeds; the same
//! command run again right after a sender was killed mid-transfer resumes
//! instead of being refused as busy; a sender refused as busy (its one slot
//! taken by its own pipe) offers again and gets through once the slot is
//! free; a sender whose broker does not take its further connections to the
//! relay sends again over one; and a receiver whose broker closes
//! every connection right after `Welcome` backs off instead of reconnecting
//! every second for ever.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyferry_common::wire::message::Message;
use support::fake::Fake;
use support::{Broker, Home, TempDir, WAIT, hash_file, json, pseudo_random, wait_for_data};

#[test]
fn a_new_sender_past_its_budget_is_told_when_to_come_back_and_waits() {
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let out = TempDir::new("out");
    // Bob meets alice for the first time: 6 decryptions a minute for her key.
    let mut receiver = bob.receiver(&broker, out.path(), &["--json"]);
    let started = Instant::now();
    let mut waited = Vec::new();
    for i in 0..8 {
        let text = format!("note {i}");
        let run = alice.run(
            &broker,
            &[
                "--role",
                "sender",
                "--to",
                "bob",
                "--message",
                &text,
                "--json",
            ],
        );
        assert_eq!(run.code, Some(0), "send {i}: {run:#?}");
        if run.stderr.contains("offering again in") {
            waited.push(i);
        }
    }
    // The seventh was asked to wait for the window to slide, and did.
    assert!(waited.contains(&6), "waited: {waited:?}");
    assert!(!waited.contains(&0), "waited: {waited:?}");
    assert!(started.elapsed() >= Duration::from_secs(50));
    for i in 0..8 {
        receiver
            .stdout
            .wait_for(&format!("\"text\":\"note {i}\""), WAIT);
    }
    let refused = receiver.stdout.drain().join("\n");
    assert!(refused.contains("\"event\":\"refused\""), "{refused}");
}

#[test]
fn the_same_command_right_after_the_sender_was_killed_resumes() {
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    support::known_for_two_days(&alice, &bob);
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    let file = src.join("big.bin");
    std::fs::write(&file, pseudo_random(384 << 20, 31)).unwrap();
    let receiver = bob.receiver(&broker, out.path(), &[]);
    let args = [
        "--role",
        "sender",
        "--to",
        "bob",
        "--file",
        file.to_str().unwrap(),
        "--json",
    ];
    let first = alice.start(&broker, &args);
    wait_for_data(receiver.child.id(), out.path(), 64 << 20);
    first.signal(rustix::process::Signal::KILL);
    let again = alice.run(&broker, &args);
    assert_eq!(again.code, Some(0), "{again:#?}");
    let report = json(&again);
    assert!(report["resumed_from"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(hash_file(&out.join("big.bin")), hash_file(&file));
}

#[test]
fn a_sender_refused_as_busy_offers_again_and_gets_through_once_the_slot_is_free() {
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    let receiver = bob.receiver(&broker, out.path(), &[]);
    // A pipe from alice holds her one slot at bob's while we keep it open.
    let (mut pipe, mut input) =
        alice.pipe_sender(&broker, "bob", "p.bin", &["--max-size", "64MiB"]);
    let head = pseudo_random(2 << 20, 21);
    std::io::Write::write_all(&mut input, &head).unwrap();
    wait_for_data(receiver.child.id(), out.path(), 1 << 20);
    // A file from alice meanwhile: refused as busy, offered again.
    let file = src.join("f.bin");
    std::fs::write(&file, pseudo_random(64 << 10, 22)).unwrap();
    let mut cmd = alice.command(&broker);
    cmd.args(["--role", "sender", "--to", "bob", "--file"])
        .arg(&file);
    let mut second = support::Proc::spawn(cmd);
    second.stderr.wait_for("busy", WAIT);
    // The pipe ends: its slot is free and the file goes through.
    drop(input);
    assert_eq!(pipe.wait(WAIT), Some(0));
    assert_eq!(second.wait(WAIT), Some(0), "{:#?}", second.stderr.drain());
    assert!(
        second
            .stderr
            .drain()
            .iter()
            .any(|l| l.contains("offering again")),
        "{:#?}",
        second.stderr.drain()
    );
    assert_eq!(hash_file(&out.join("f.bin")), hash_file(&file));
    assert_eq!(std::fs::read(out.join("p.bin")).unwrap(), head);
}

#[test]
fn a_stream_whose_further_connections_the_broker_refuses_is_sent_again_over_one() {
    // Five connections from 127.0.0.1 at most: the two agents' own and
    // three more. Of the eight lanes the sender opens once bob accepted
    // (his --direct never keeps it from dialling him), at least four are
    // closed at once; the broker gives up on their stream 3 s after its
    // first came, and the retry takes one connection (the receiver's and
    // the sender's four then fit).
    let broker = Broker::start_with(TempDir::new("broker"), &["--max-connections-per-ip", "5"]);
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    let file = src.join("f.bin");
    std::fs::write(&file, pseudo_random(6 << 20, 23)).unwrap();
    // Not --once: its first transfer fails.
    let mut receiver = bob.receiver(&broker, out.path(), &["--yes", "--direct", "never"]);
    let flags = ["--streams", "8", "--retry-for", "60s"];
    let sent = alice.send_file(&broker, "bob", &file, &flags);
    assert_eq!(sent.code, Some(0), "{sent:#?}");
    let report = json(&sent);
    assert_eq!(report["via"], "relay", "{report}");
    assert_eq!(report["connections"], 1, "{report}");
    assert!(report["attempts"].as_u64().unwrap() >= 2, "{report}");
    assert!(
        sent.stderr.contains("a lane of the stream"),
        "the first attempt failed for another reason: {sent:#?}"
    );
    assert_eq!(hash_file(&out.join("f.bin")), hash_file(&file));
    receiver.kill();
}

#[test]
fn a_receiver_whose_broker_closes_after_welcome_backs_off() {
    let welcomed: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let seen = Arc::clone(&welcomed);
    let fake = Fake::start(move |mut conn| {
        let seen = Arc::clone(&seen);
        async move {
            let _ = conn.reader.read().await;
            let version = keyferry_common::PROTOCOL_VERSION;
            let _ = conn.writer.write(&Message::Hello { version }).await;
            if let Ok(Some(Message::Auth { .. })) = conn.reader.read().await {
                let _ = conn
                    .writer
                    .write(&Message::Welcome {
                        seen: String::new(),
                    })
                    .await;
                seen.lock().unwrap().push(Instant::now());
            }
            // And gone.
            let _ = conn.writer.shutdown().await;
        }
    });
    let bob = Home::new("bob", "bob");
    let out = TempDir::new("out");
    let receiver = bob.at(
        &fake.addr,
        &[
            "--role",
            "receiver",
            "--out-dir",
            out.path().to_str().unwrap(),
        ],
    );
    std::thread::sleep(Duration::from_secs(12));
    drop(receiver);
    let times = welcomed.lock().unwrap().clone();
    // Connected at about 0, 1, 3, 7 s (then 15): not every second.
    assert!(
        (3..=5).contains(&times.len()),
        "{} connections in 12 s",
        times.len()
    );
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    for pair in gaps.windows(2) {
        assert!(pair[1] >= pair[0] + pair[0] / 2, "gaps {gaps:?}");
    }
}
