//! One upload, many receivers, with the real `broker` and `agent` binaries on
//! 127.0.0.1: the sender names several `--to`, writes its sealed stream once,
//! and the broker copies it to each receiver. Every receiver gets identical
//! bytes; the sender writes about one copy; a receiver that dies or freezes
//! costs the others at most a moment, and is completed afterwards by resume
//! (or, with `--retry-for 0`, reported, exit code 11).

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

mod support;

use std::time::{Duration, Instant};

use support::{Broker, Home, Proc, Run, TempDir, WAIT, hash_file, pseudo_random, wait_for_data};

const MIB: usize = 1 << 20;

/// A broker, alice, and receivers with their out dirs.
struct World {
    broker: Broker,
    alice: Home,
    src: TempDir,
    receivers: Vec<(Home, TempDir)>,
}

impl World {
    fn new(names: &[(&str, &str)]) -> Self {
        let broker = Broker::start();
        let alice = Home::new("alice", "alice");
        let receivers = names
            .iter()
            .map(|(name, key)| {
                let home = Home::new(name, key);
                support::known_for_two_days(&alice, &home);
                (home, TempDir::new("out"))
            })
            .collect();
        Self {
            broker,
            alice,
            src: TempDir::new("src"),
            receivers,
        }
    }

    fn start(&self, i: usize, extra: &[&str]) -> Proc {
        let (home, out) = &self.receivers[i];
        home.receiver(&self.broker, out.path(), extra)
    }

    /// Starts alice's sender of `file` to every receiver, with `extra`.
    fn send(&self, file: &std::path::Path, extra: &[&str]) -> Proc {
        let mut args = vec![
            "--role",
            "sender",
            "--json",
            "--file",
            file.to_str().unwrap(),
        ];
        for (home, _) in &self.receivers {
            args.extend(["--to", home.name.as_str()]);
        }
        args.extend_from_slice(extra);
        self.alice.start(&self.broker, &args)
    }
}

/// The JSON objects a sender printed, one per line.
fn objects(run: &Run) -> Vec<serde_json::Value> {
    run.stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The bytes the broker read from the sender's upload connection, from its
/// `transfer finished … bytes=N` line. (`/proc/<pid>/io` cannot tell: its
/// `wchar` counts `write(2)`, and sockets are written with `send(2)`.)
fn uploaded(broker: &mut Broker) -> u64 {
    let line = broker.proc.stderr.wait_for("transfer finished", WAIT);
    line.split("bytes=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn one_upload_reaches_three_receivers_identically_and_is_written_about_once() {
    let w = World::new(&[("bob", "bob"), ("carol", "carol"), ("dave", "dave")]);
    let file = w.src.join("big.bin");
    std::fs::write(&file, pseudo_random(256 * MIB, 41)).unwrap();
    let (_, sha) = hash_file(&file);
    let mut rx: Vec<Proc> = (0..3).map(|i| w.start(i, &["--once"])).collect();
    let sender = w.send(&file, &[]);
    let sent = Run::finish(sender);
    assert_eq!(sent.code, Some(0), "{sent:#?}");
    let reports = objects(&sent);
    let peers: Vec<&str> = reports
        .iter()
        .map(|r| r["peer"].as_str().unwrap())
        .collect();
    assert_eq!(peers, ["bob", "carol", "dave"], "one object per receiver");
    for r in &reports {
        assert_eq!(r["sha256"], sha.as_str(), "{r}");
        assert_eq!(r["bytes"], 256 * MIB as u64);
        assert_eq!(r["attempts"], 1);
    }
    // The transfer ids differ (one handshake each); the stream is one.
    assert_ne!(reports[0]["transfer_id"], reports[1]["transfer_id"]);
    for (i, p) in rx.iter_mut().enumerate() {
        assert_eq!(p.wait(WAIT), Some(0), "receiver {i}");
        let (_, out) = &w.receivers[i];
        assert_eq!(
            hash_file(&out.join("big.bin")),
            (256 * MIB as u64, sha.clone())
        );
    }
    // Upload once: the sender wrote about one copy, not three, and the
    // broker logs one finished transfer for the three.
    let mut w = w;
    let wrote = uploaded(&mut w.broker);
    let ratio = wrote as f64 / (256 * MIB) as f64;
    println!("the sender uploaded {wrote} bytes: {ratio:.3} x the file");
    assert!(ratio < 1.3, "the sender uploaded {ratio:.2} x the file");
    assert!(
        w.broker
            .proc
            .stderr
            .wait_for("receivers=3", WAIT)
            .contains("several receivers"),
        "one upload for three receivers"
    );
}

#[test]
fn a_receiver_killed_mid_stream_does_not_stop_the_others_and_is_reported() {
    let w = World::new(&[("bob", "bob"), ("carol", "carol"), ("dave", "dave")]);
    let file = w.src.join("big.bin");
    std::fs::write(&file, pseudo_random(256 * MIB, 42)).unwrap();
    let (_, sha) = hash_file(&file);
    let mut rx: Vec<Proc> = (0..3).map(|i| w.start(i, &[])).collect();
    let sender = w.send(&file, &["--retry-for", "0"]);
    wait_for_data(rx[1].child.id(), w.receivers[1].1.path(), 8 << 20);
    rx[1].kill();
    let sent = Run::finish(sender);
    assert_eq!(sent.code, Some(11), "{sent:#?}");
    let peers: Vec<String> = objects(&sent)
        .iter()
        .map(|r| r["peer"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(peers, ["bob", "dave"]);
    assert!(sent.stderr.contains("agent: carol: "), "{}", sent.stderr);
    assert!(
        sent.stderr.contains("1 of 3 receivers did not confirm"),
        "{}",
        sent.stderr
    );
    for i in [0, 2] {
        rx[i].stdout.wait_for("received big.bin", WAIT);
        let (_, out) = &w.receivers[i];
        assert_eq!(hash_file(&out.join("big.bin")).1, sha);
    }
}

#[test]
fn a_receiver_that_died_is_completed_by_resume_when_it_comes_back() {
    let w = World::new(&[("bob", "bob"), ("carol", "carol"), ("dave", "dave")]);
    let file = w.src.join("big.bin");
    std::fs::write(&file, pseudo_random(256 * MIB, 43)).unwrap();
    let (_, sha) = hash_file(&file);
    let mut rx: Vec<Proc> = (0..3).map(|i| w.start(i, &[])).collect();
    let sender = w.send(&file, &[]);
    wait_for_data(rx[1].child.id(), w.receivers[1].1.path(), 8 << 20);
    rx[1].kill();
    for i in [0, 2] {
        rx[i].stdout.wait_for("received big.bin", WAIT);
    }
    // carol is back: the sender, still retrying, completes her by resume.
    let mut carol = w.start(1, &[]);
    let sent = Run::finish(sender);
    assert_eq!(sent.code, Some(0), "{sent:#?}");
    let reports = objects(&sent);
    let carol_report = reports.iter().find(|r| r["peer"] == "carol").unwrap();
    assert!(
        carol_report["attempts"].as_u64().unwrap() >= 2,
        "{carol_report}"
    );
    assert_eq!(carol_report["sha256"], sha.as_str());
    carol.stdout.wait_for("received big.bin", WAIT);
    assert_eq!(hash_file(&w.receivers[1].1.join("big.bin")).1, sha);
    assert_eq!(reports.len(), 3);
}

/// Peak resident memory of `pid`, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn a_frozen_receiver_costs_the_others_a_moment_and_the_broker_little_memory() {
    let w = World::new(&[("bob", "bob"), ("carol", "carol")]);
    let file = w.src.join("big.bin");
    std::fs::write(&file, pseudo_random(128 * MIB, 44)).unwrap();
    let (_, sha) = hash_file(&file);
    let mut rx: Vec<Proc> = (0..2).map(|i| w.start(i, &[])).collect();
    // carol freezes (SIGSTOP) once her transfer has begun.
    let sender = w.send(&file, &["--retry-for", "0"]);
    wait_for_data(rx[1].child.id(), w.receivers[1].1.path(), 1 << 20);
    rx[1].signal(rustix::process::Signal::STOP);
    let start = Instant::now();
    rx[0].stdout.wait_for("received big.bin", WAIT);
    let took = start.elapsed();
    let sent = Run::finish(sender);
    rx[1].signal(rustix::process::Signal::CONT);
    assert_eq!(sent.code, Some(11), "{sent:#?}");
    assert!(sent.stderr.contains("agent: carol: "), "{}", sent.stderr);
    assert_eq!(hash_file(&w.receivers[0].1.join("big.bin")).1, sha);
    println!("bob finished {took:?} after carol froze");
    assert!(took < Duration::from_secs(30), "bob took {took:?}");
    let rss = peak_rss_kib(w.broker.proc.child.id());
    println!("broker peak RSS {rss} KiB");
    assert!(rss < 64 << 10, "the broker peaked at {rss} KiB");
}
