//! The broker as a service, through the real binaries on 127.0.0.1: a
//! frozen receiver (SIGSTOP) is dropped by the keepalive and leaves the list,
//! and the sender offering to it hears why; a receiver notices a frozen
//! broker and comes back when it thaws; SIGTERM lets a running transfer
//! finish, and after `--shutdown-grace` cuts what still runs and says how
//! many.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

mod support;

use std::io::Write as _;
use std::process::ChildStdin;
use std::time::{Duration, Instant};

use rustix::process::Signal;
use support::{Broker, Home, Proc, Run, TempDir, WAIT, pseudo_random, wait_for_data};

/// Whether `--list` at `broker` shows `name` as a receiver.
fn listed(home: &Home, broker: &Broker, name: &str) -> bool {
    let run = home.run(broker, &["--list", "--json"]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    run.stdout.lines().any(|l| {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        v["name"] == name && v["receiver"] == true
    })
}

/// Waits until `cond` holds, polling, for at most `limit`; returns how long.
fn until(limit: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "not within {limit:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
    start.elapsed()
}

#[test]
fn a_frozen_receiver_is_dropped_and_its_sender_hears_why() {
    let broker = Broker::start_with(TempDir::new("broker"), &["--keepalive", "1s"]);
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    let mut rx = bob.receiver(&broker, out.path(), &[]);
    assert!(listed(&alice, &broker, "bob"));
    rx.signal(Signal::STOP);
    // An offer to the frozen receiver ends in a clear error, not a hang.
    let file = src.join("f.bin");
    std::fs::write(&file, b"data").unwrap();
    let started = Instant::now();
    let s = alice.send_file(&broker, "bob", &file, &["--retry-for", "0"]);
    assert!(started.elapsed() < Duration::from_secs(20), "{s:#?}");
    assert_eq!(s.code, Some(5), "{s:#?}");
    assert!(
        s.stderr.contains("peer bob did not take the offer"),
        "{s:#?}"
    );
    until(Duration::from_secs(10), || !listed(&alice, &broker, "bob"));
    // Thawed, it finds its connection gone and comes back.
    rx.signal(Signal::CONT);
    rx.stderr.wait_for("reconnected to the broker", WAIT);
    assert!(listed(&alice, &broker, "bob"));
}

#[test]
fn with_the_default_keepalive_a_frozen_receiver_is_gone_within_90_s() {
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let out = TempDir::new("out");
    let rx = bob.receiver(&broker, out.path(), &[]);
    rx.signal(Signal::STOP);
    // Dropped at the first ping after two silent intervals of 20 s: within
    // 60 s (and the 90 s), not before 40 s of silence, less the
    // time since the receiver was last heard.
    let took = until(Duration::from_secs(62), || !listed(&alice, &broker, "bob"));
    assert!(took >= Duration::from_secs(19), "dropped after {took:?}");
    rx.signal(Signal::CONT);
}

#[test]
fn a_receiver_notices_a_frozen_broker_and_comes_back_when_it_thaws() {
    let broker = Broker::start();
    let bob = Home::new("bob", "bob");
    let out = TempDir::new("out");
    let mut rx = bob.receiver(&broker, out.path(), &["--keepalive", "1s"]);
    broker.proc.signal(Signal::STOP);
    let lost = rx
        .stderr
        .wait_for("lost the broker", Duration::from_secs(15));
    assert!(lost.contains("keepalive"), "{lost}");
    broker.proc.signal(Signal::CONT);
    rx.stderr.wait_for("reconnected to the broker", WAIT);
    assert!(listed(&bob, &broker, "bob"));
}

/// A transfer in flight: alice sends a pipe the test writes (`input`; what
/// was written so far is `data`), `rx` receives it with `--once`.
struct InFlight {
    sender: Proc,
    input: ChildStdin,
    rx: Proc,
    data: Vec<u8>,
    _homes: (Home, Home),
}

/// Starts a transfer to `out` through the broker's relay (these tests are
/// about the broker) and returns once data arrived.
fn transfer_in_flight(broker: &Broker, out: &TempDir) -> InFlight {
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let rx = bob.receiver(broker, out.path(), &["--once"]);
    let (sender, mut input) = alice.pipe_sender(
        broker,
        "bob",
        "live.bin",
        &[
            "--retry-for",
            "0",
            "--max-size",
            "64MiB",
            "--direct",
            "never",
        ],
    );
    let data = pseudo_random(3 << 20, 9);
    input.write_all(&data).unwrap();
    wait_for_data(rx.child.id(), out.path(), 1 << 20);
    InFlight {
        sender,
        input,
        rx,
        data,
        _homes: (alice, bob),
    }
}

#[test]
fn on_sigterm_the_broker_lets_a_running_transfer_finish() {
    let mut broker = Broker::start();
    let out = TempDir::new("out");
    let InFlight {
        sender,
        mut input,
        rx,
        mut data,
        _homes,
    } = transfer_in_flight(&broker, &out);
    broker.proc.signal(Signal::TERM);
    broker.proc.stderr.wait_for("shutting down", WAIT);
    // No new connections meanwhile: a list fails to reach it.
    let lister = Home::new("carol", "carol");
    let refused = lister.run(&broker, &["--list"]);
    assert_eq!(refused.code, Some(3), "{refused:#?}");
    let rest = pseudo_random(2 << 20, 10);
    input.write_all(&rest).unwrap();
    drop(input);
    data.extend_from_slice(&rest);
    let (s, r) = (Run::finish(sender), Run::finish(rx));
    assert_eq!((s.code, r.code), (Some(0), Some(0)), "{s:#?}\n{r:#?}");
    assert_eq!(std::fs::read(out.join("live.bin")).unwrap(), data);
    assert_eq!(broker.proc.wait(WAIT), Some(0));
}

#[test]
fn after_the_grace_period_the_broker_cuts_and_says_how_many() {
    let mut broker = Broker::start_with(TempDir::new("broker"), &["--shutdown-grace", "1s"]);
    let out = TempDir::new("out");
    let InFlight {
        sender,
        input,
        rx,
        _homes,
        ..
    } = transfer_in_flight(&broker, &out);
    let start = Instant::now();
    broker.proc.signal(Signal::TERM);
    let cut = broker.proc.stderr.wait_for("grace period over", WAIT);
    assert!(cut.contains("cut=1"), "{cut}");
    assert_eq!(broker.proc.wait(WAIT), Some(0));
    assert!(start.elapsed() < Duration::from_secs(15));
    drop(input);
    let (s, r) = (Run::finish(sender), Run::finish(rx));
    assert_ne!(s.code, Some(0), "{s:#?}");
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert!(!out.join("live.bin").exists());
}

#[test]
fn a_receiver_that_stops_reading_mid_transfer_is_cut_after_the_idle_limit() {
    let mut broker = Broker::start_with(TempDir::new("broker"), &["--idle-timeout", "2s"]);
    let out = TempDir::new("out");
    let InFlight {
        sender,
        mut input,
        rx,
        _homes,
        ..
    } = transfer_in_flight(&broker, &out);
    rx.signal(Signal::STOP);
    // Keep the sender writing: the broker's writes to the frozen receiver
    // fill its socket, and the relay waits for it to take more.
    let writer = std::thread::spawn(move || {
        for i in 0..64 {
            if input.write_all(&pseudo_random(1 << 20, 100 + i)).is_err() {
                break;
            }
        }
    });
    let cut = broker.proc.stderr.wait_for("transfer failed", WAIT);
    assert!(cut.contains("stopped reading"), "{cut}");
    let s = Run::finish(sender);
    assert_ne!(s.code, Some(0), "{s:#?}");
    rx.signal(Signal::CONT);
    let r = Run::finish(rx);
    assert_eq!(r.code, Some(1), "{r:#?}");
    writer.join().unwrap();
    assert!(!out.join("live.bin").exists());
}
