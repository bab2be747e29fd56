//! Pipes, through the real binaries on 127.0.0.1: `--file - --name-as NAME`
//! sends standard input (its size bounded by the sender's `--max-size`, which
//! the offer declares), and a `--once --stdout` receiver writes the verified
//! stream to its standard output. Empty input, input of exactly the bound,
//! input over the bound (exit 7, nothing placed), and a directory offered to
//! a `--stdout` receiver (refused, nothing written).

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

mod support;

use std::path::Path;
use std::process::Stdio;

use support::{Broker, Home, Proc, Run, TempDir, WAIT, finals, pseudo_random, sha256_hex};

struct World {
    broker: Broker,
    alice: Home,
    bob: Home,
    dir: TempDir,
}

impl World {
    fn new() -> Self {
        let w = Self {
            broker: Broker::start(),
            alice: Home::new("alice", "alice"),
            bob: Home::new("bob", "bob"),
            dir: TempDir::new("pipes"),
        };
        support::known_for_two_days(&w.alice, &w.bob);
        w
    }

    /// alice sends `data` as standard input under `name`, with `extra`.
    fn send_stdin(&self, data: &[u8], name: &str, extra: &[&str]) -> Run {
        let input = self.dir.join("input");
        std::fs::write(&input, data).unwrap();
        let mut cmd = self.alice.command(&self.broker);
        cmd.args(["--role", "sender", "--to", "bob", "--json"])
            .args(["--file", "-", "--name-as", name])
            .args(extra);
        let stdin = Stdio::from(std::fs::File::open(&input).unwrap());
        Run::finish(Proc::spawn_io(cmd, stdin, None))
    }

    /// A `--once --stdout` receiver whose standard output goes to `to`.
    fn stdout_receiver(&self, to: &Path, extra: &[&str]) -> Proc {
        let mut cmd = self.bob.command(&self.broker);
        cmd.args(["--role", "receiver", "--once", "--stdout"])
            .args(extra);
        let file = Stdio::from(std::fs::File::create(to).unwrap());
        let mut p = Proc::spawn_io(cmd, Stdio::null(), Some(file));
        p.stderr.wait_for("receiving as bob", WAIT);
        p
    }
}

#[test]
fn standard_input_arrives_as_a_file_under_its_given_name() {
    let w = World::new();
    let out = TempDir::new("out");
    let mut rx = w.bob.receiver(&w.broker, out.path(), &[]);
    let data = pseudo_random(3 << 20 | 12_345, 1);
    let s = w.send_stdin(&data, "from-a-pipe.bin", &[]);
    assert_eq!(s.code, Some(0), "{s:#?}");
    let sent = support::json(&s);
    assert_eq!(sent["bytes"], data.len());
    assert_eq!(sent["sha256"], sha256_hex(&data));
    rx.stdout.wait_for("received from-a-pipe.bin", WAIT);
    assert_eq!(std::fs::read(out.join("from-a-pipe.bin")).unwrap(), data);

    // Empty input is an empty file.
    let s = w.send_stdin(&[], "empty", &[]);
    assert_eq!(s.code, Some(0), "{s:#?}");
    rx.stdout.wait_for("received empty", WAIT);
    assert_eq!(std::fs::read(out.join("empty")).unwrap(), b"");
}

#[test]
fn the_senders_max_size_bounds_standard_input() {
    let w = World::new();
    let out = TempDir::new("out");
    let mut rx = w.bob.receiver(&w.broker, out.path(), &[]);
    // Exactly the bound: sent.
    let exact = pseudo_random(1 << 20, 2);
    let s = w.send_stdin(&exact, "exact.bin", &["--max-size", "1MiB"]);
    assert_eq!(s.code, Some(0), "{s:#?}");
    rx.stdout.wait_for("received exact.bin", WAIT);
    assert_eq!(std::fs::read(out.join("exact.bin")).unwrap(), exact);
    // One byte more: the sender stops (exit 7) and nothing is placed.
    let over = pseudo_random((1 << 20) + 1, 3);
    let s = w.send_stdin(&over, "over.bin", &["--max-size", "1MiB"]);
    assert_eq!(s.code, Some(7), "{s:#?}");
    assert!(s.stderr.contains("--max-size"), "{s:#?}");
    rx.stderr.wait_for("failed", WAIT);
    assert_eq!(finals(out.path()), ["exact.bin"]);
    // A bound the receiver's own --max-size does not allow: refused.
    drop(rx);
    let out2 = TempDir::new("out2");
    let rx = w
        .bob
        .receiver(&w.broker, out2.path(), &["--once", "--max-size", "1MiB"]);
    let s = w.send_stdin(b"small", "small.txt", &["--max-size", "2MiB"]);
    assert_eq!(s.code, Some(8), "{s:#?}");
    assert_eq!(Run::finish(rx).code, Some(8));
    assert!(finals(out2.path()).is_empty());
}

#[test]
fn a_stdout_receiver_writes_the_verified_stream_and_nothing_else() {
    let w = World::new();
    let got = w.dir.join("got");
    let rx = w.stdout_receiver(&got, &[]);
    let data = pseudo_random(5 << 20, 4);
    let s = w.send_stdin(&data, "stream.bin", &["--rekey-interval", "100ms"]);
    assert_eq!(s.code, Some(0), "{s:#?}");
    let r = Run::finish(rx);
    assert_eq!(r.code, Some(0), "{r:#?}");
    assert!(r.stderr.contains("stream.bin"), "{r:#?}");
    assert_eq!(std::fs::read(&got).unwrap(), data);

    // A regular file works as well.
    let file = w.dir.join("plain.txt");
    std::fs::write(&file, b"plain bytes\n").unwrap();
    let rx = w.stdout_receiver(&got, &[]);
    assert_eq!(
        w.alice.send_file(&w.broker, "bob", &file, &[]).code,
        Some(0)
    );
    assert_eq!(Run::finish(rx).code, Some(0));
    assert_eq!(std::fs::read(&got).unwrap(), b"plain bytes\n");
}

#[test]
fn a_stdout_receiver_refuses_a_directory_and_writes_nothing() {
    let w = World::new();
    let tree = w.dir.join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("a.txt"), b"a").unwrap();
    std::fs::write(tree.join("sub/b.txt"), b"b").unwrap();
    let got = w.dir.join("got");
    let rx = w.stdout_receiver(&got, &[]);
    let s = w
        .alice
        .send_file(&w.broker, "bob", &tree, &["--retry-for", "0"]);
    let r = Run::finish(rx);
    assert_ne!(s.code, Some(0), "{s:#?}");
    assert_eq!(r.code, Some(9), "{r:#?}");
    assert!(r.stderr.contains("--stdout takes one file"), "{r:#?}");
    assert_eq!(std::fs::read(&got).unwrap(), b"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_unknown_size_that_claims_to_resume_is_refused() {
    use keyferry_common::ids::StreamId;
    use keyferry_common::wire::message::{Message, RefuseReason};
    use support::hand::{self, HandSender};

    let w = World::new();
    let out = TempDir::new("out");
    let _rx = w.bob.receiver(&w.broker, out.path(), &[]);
    let mut terms = hand::files(1 << 20);
    terms.size_known = false;
    terms.resumes = Some(StreamId::random());
    let mut hs = HandSender::connect(&w.broker.addr, &w.alice, "bob").await;
    let (_, answer) = hs.offer(terms, StreamId::random()).await;
    assert!(
        matches!(
            answer,
            Message::Refuse {
                reason: RefuseReason::Policy,
                ..
            }
        ),
        "{answer:?}"
    );
    assert!(finals(out.path()).is_empty());
}

#[test]
fn a_stdout_receiver_whose_sender_dies_exits_non_zero_after_a_genuine_prefix() {
    let w = World::new();
    let got = w.dir.join("got");
    let rx = w.stdout_receiver(&got, &[]);
    let (mut sender, mut input) = w.alice.pipe_sender(
        &w.broker,
        "bob",
        "cut.bin",
        &["--retry-for", "0", "--max-size", "64MiB"],
    );
    let data = pseudo_random(3 << 20, 5);
    std::io::Write::write_all(&mut input, &data).unwrap();
    // Wait until some of it came out of the receiver, then kill the sender.
    let deadline = std::time::Instant::now() + WAIT;
    while std::fs::metadata(&got).unwrap().len() < 1 << 20 {
        assert!(std::time::Instant::now() < deadline, "nothing came out");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    sender.kill();
    drop(input);
    let r = Run::finish(rx);
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert!(r.stderr.contains("incomplete"), "{r:#?}");
    let out = std::fs::read(&got).unwrap();
    assert!(out.len() >= 1 << 20 && out.len() <= data.len());
    assert_eq!(
        out[..],
        data[..out.len()],
        "what came out is a prefix of what went in"
    );
}

#[test]
fn a_stdout_receiver_refuses_a_text_message() {
    let w = World::new();
    let got = w.dir.join("got");
    let rx = w.stdout_receiver(&got, &[]);
    let s = w.alice.run(
        &w.broker,
        &["--role", "sender", "--to", "bob", "--message", "hi"],
    );
    assert_eq!(s.code, Some(8), "{s:#?}");
    let r = Run::finish(rx);
    assert_eq!(r.code, Some(8), "{r:#?}");
    assert!(r.stderr.contains("--stdout takes one file"), "{r:#?}");
    assert_eq!(std::fs::read(&got).unwrap(), b"");
}

#[test]
fn a_slow_pipe_arrives_as_it_is_written() {
    let w = World::new();
    let out = TempDir::new("out");
    let mut rx = w.bob.receiver(&w.broker, out.path(), &[]);
    let (sender, mut input) = w.alice.pipe_sender(
        &w.broker,
        "bob",
        "slow.txt",
        &["--json", "--max-size", "1MiB"],
    );
    // A few bytes, then a pause: they reach the receiver's disk before
    // anything more is written (no piece waits to be filled).
    std::io::Write::write_all(&mut input, b"first line\n").unwrap();
    support::wait_for_data(rx.child.id(), out.path(), 10);
    std::io::Write::write_all(&mut input, b"second line\n").unwrap();
    drop(input);
    let s = Run::finish(sender);
    assert_eq!(s.code, Some(0), "{s:#?}");
    rx.stdout.wait_for("received slow.txt", WAIT);
    assert_eq!(
        std::fs::read(out.join("slow.txt")).unwrap(),
        b"first line\nsecond line\n"
    );
}

/// A receiver says nothing while a stream comes in (its receipt follows the
/// trailer): a relayed transfer that runs longer than the broker's idle
/// limit, with data moving all along, is not silent and arrives whole, to
/// one receiver and to two.
#[test]
fn a_relayed_stream_longer_than_the_idle_limit_is_not_cut_while_data_moves() {
    let broker = Broker::start_with(TempDir::new("broker"), &["--idle-timeout", "3s"]);
    let alice = Home::new("alice", "alice");
    let (bob, carol) = (Home::new("bob", "bob"), Home::new("carol", "carol"));
    support::known_for_two_days(&alice, &bob);
    support::known_for_two_days(&alice, &carol);
    let (out_b, out_c) = (TempDir::new("out-b"), TempDir::new("out-c"));
    let mut receivers = [
        bob.receiver(&broker, out_b.path(), &["--yes"]),
        carol.receiver(&broker, out_c.path(), &["--yes"]),
    ];
    for (also, name, outs) in [
        (&[][..], "one.bin", vec![&out_b]),
        (&["--to", "carol"][..], "two.bin", vec![&out_b, &out_c]),
    ] {
        let mut flags = vec!["--json", "--direct", "never", "--max-size", "8MiB"];
        flags.extend_from_slice(also);
        let (sender, mut input) = alice.pipe_sender(&broker, "bob", name, &flags);
        // 32 pieces a quarter of a second apart: 8 s of stream, more than
        // twice the broker's idle limit, and never 3 s without a byte.
        let data = pseudo_random(32 << 16, 41);
        for piece in data.chunks(1 << 16) {
            std::io::Write::write_all(&mut input, piece).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
        drop(input);
        let sent = Run::finish(sender);
        assert_eq!(sent.code, Some(0), "{name}: {sent:#?}");
        for out in outs {
            assert_eq!(
                sha256_hex(&std::fs::read(out.join(name)).unwrap()),
                sha256_hex(&data),
                "{name}"
            );
        }
    }
    for r in &mut receivers {
        r.kill();
    }
}
