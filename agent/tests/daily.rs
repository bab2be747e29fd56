//! The agent as a daily tool, driven through the real binaries on 127.0.0.1:
//! "receiving as" only once the broker took the name, the environment
//! variables, `--list` as columns and JSON, an out dir created private (or
//! the `mkdir` to run), `--quiet`, completions and man pages, the progress
//! bars under a pseudo-terminal (and not without one), and the receiver's
//! `--json` events.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

mod support;

use std::os::unix::fs::PermissionsExt as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{
    Broker, Home, Proc, Run, TempDir, WAIT, agent_bin, broker_bin, pseudo_random, wait_for_data,
};

/// The JSON objects among `out`'s lines (every line must be one).
fn json_lines(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect()
}

#[test]
fn a_second_receiver_of_a_name_is_refused_and_never_says_receiving() {
    let broker = Broker::start();
    let bob = Home::new("bob", "bob");
    let (out1, out2) = (TempDir::new("out"), TempDir::new("out"));
    let _first = bob.receiver(&broker, out1.path(), &[]);
    let mut cmd = bob.command(&broker);
    cmd.args(["--role", "receiver", "--out-dir"])
        .arg(out2.path());
    let second = Run::finish(Proc::spawn(cmd));
    assert_eq!(second.code, Some(10), "{second:#?}");
    assert!(
        second.stderr.contains("already connected to this broker"),
        "{second:#?}"
    );
    assert!(!second.stdout.contains("receiving as"), "{second:#?}");
}

#[test]
fn the_environment_stands_in_for_broker_name_and_fingerprint() {
    let broker = Broker::start();
    let other = Broker::start();
    let bob = Home::new("bob", "bob");
    let out = TempDir::new("out");
    let env_cmd = |fp: &str| {
        let mut cmd = Command::new(agent_bin());
        cmd.env("KEYFERRY_BROKER", &broker.addr)
            .env("KEYFERRY_NAME", "bob")
            .env("KEYFERRY_HOME", bob.dir.path())
            .env("KEYFERRY_BROKER_FINGERPRINT", fp);
        cmd
    };
    let mut cmd = env_cmd(&broker.fingerprint);
    cmd.args(["--role", "receiver", "--out-dir"])
        .arg(out.path());
    let mut rx = Proc::spawn(cmd);
    rx.stdout.wait_for("receiving as bob", WAIT);
    let mut list = env_cmd(&broker.fingerprint);
    list.args(["--list", "--json"]);
    let listed = Run::finish(Proc::spawn(list));
    assert_eq!(listed.code, Some(0), "{listed:#?}");
    assert!(
        json_lines(&listed.stdout)
            .iter()
            .any(|a| a["name"] == "bob" && a["receiver"] == true),
        "{listed:#?}"
    );
    // Another broker's fingerprint in the environment: refused, exit 4.
    let mut wrong = env_cmd(&other.fingerprint);
    wrong.arg("--list");
    let refused = Run::finish(Proc::spawn(wrong));
    assert_eq!(refused.code, Some(4), "{refused:#?}");
    // The command line wins over the environment.
    let mut wins = env_cmd(&other.fingerprint);
    wins.args(["--list", "--broker-fingerprint", &broker.fingerprint]);
    assert_eq!(Run::finish(Proc::spawn(wins)).code, Some(0));
}

#[test]
fn list_lines_up_its_columns_and_speaks_json() {
    let broker = Broker::start();
    let long = "a-receiver-with-a-long-name";
    let (bob, carol) = (Home::new("bob", "bob"), Home::new(long, "carol"));
    let (o1, o2) = (TempDir::new("out"), TempDir::new("out"));
    let _b = bob.receiver(&broker, o1.path(), &[]);
    let _c = carol.receiver(&broker, o2.path(), &[]);
    let text = bob.run(&broker, &["--list"]);
    assert_eq!(text.code, Some(0), "{text:#?}");
    let lines: Vec<&str> = text.stdout.lines().collect();
    assert!(lines[0].starts_with("name "), "{text:#?}");
    // Every column starts where its header does.
    let starts = |l: &str| {
        let mut at = Vec::new();
        let b = l.as_bytes();
        for i in 0..b.len() {
            if b[i] != b' ' && (i == 0 || (i >= 2 && b[i - 1] == b' ' && b[i - 2] == b' ')) {
                at.push(i);
            }
        }
        at
    };
    let header = starts(lines[0]);
    assert_eq!(header.len(), 4, "{text:#?}");
    for l in &lines[1..] {
        assert_eq!(starts(l), header, "misaligned: {text:#?}");
    }
    assert!(lines.iter().any(|l| l.starts_with(long)), "{text:#?}");
    let json = bob.run(&broker, &["--list", "--json"]);
    let agents = json_lines(&json.stdout);
    for name in ["bob", long] {
        let a = agents.iter().find(|a| a["name"] == name).unwrap();
        assert_eq!(
            (&a["receiver"], &a["state"]),
            (&true.into(), &"free".into())
        );
    }
}

#[test]
fn a_missing_out_dir_is_created_private_and_a_missing_parent_names_the_mkdir() {
    let broker = Broker::start();
    let bob = Home::new("bob", "bob");
    let base = TempDir::new("base");
    let fresh = base.join("inbox");
    let _rx = bob.receiver(&broker, &fresh, &[]);
    let mode = std::fs::metadata(&fresh).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);

    let deep = base.join("no such/inbox");
    let mut cmd = Home::new("carol", "carol").command(&broker);
    cmd.args(["--role", "receiver", "--out-dir"]).arg(&deep);
    let run = Run::finish(Proc::spawn(cmd));
    assert_ne!(run.code, Some(0), "{run:#?}");
    let expected = format!("mkdir -p '{}'", deep.display());
    assert!(run.stderr.contains(&expected), "{run:#?}");
    assert!(!deep.exists());
}

#[test]
fn quiet_silences_notices_but_not_a_new_key() {
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let base = TempDir::new("base");
    let out = base.join("inbox");
    let mut rx = bob.receiver(&broker, &out, &["--quiet", "--once"]);
    let file = base.join("note.txt");
    std::fs::write(&file, b"hello").unwrap();
    let s = alice.send_file(&broker, "bob", &file, &["--quiet"]);
    assert_eq!(s.code, Some(0), "{s:#?}");
    assert!(s.stderr.contains("NEW KEY for bob"), "{s:#?}");
    let r = Run::finish_within(
        {
            rx.stdout.wait_for("received note.txt", WAIT);
            rx
        },
        WAIT,
    );
    assert_eq!(r.code, Some(0), "{r:#?}");
    assert!(r.stderr.contains("NEW KEY for alice"), "{r:#?}");
    // Without --quiet the receiver says it created the out dir.
    assert!(!r.stderr.contains("created"), "{r:#?}");
    let mut cmd = Home::new("carol", "carol").command(&broker);
    cmd.args(["--role", "receiver", "--out-dir"])
        .arg(base.join("other"));
    let mut loud = Proc::spawn(cmd);
    loud.stderr.wait_for("(mode 0700)", WAIT);
}

#[test]
fn completions_and_man_pages_for_both_binaries() {
    for (bin, name) in [(agent_bin(), "agent"), (broker_bin(), "broker")] {
        let run = |args: &[&str]| {
            let out = Command::new(&bin).args(args).output().unwrap();
            assert!(out.status.success(), "{name} {args:?}: {out:?}");
            String::from_utf8(out.stdout).unwrap()
        };
        let bash = run(&["--completions", "bash"]);
        let status = Command::new("bash")
            .args(["-n", "-c", &bash])
            .status()
            .unwrap();
        assert!(status.success(), "{name}: bash rejects its completions");
        assert!(bash.contains("--completions"), "{name}");
        assert!(run(&["--completions", "zsh"]).starts_with(&format!("#compdef {name}")));
        assert!(run(&["--completions", "fish"]).contains(&format!("complete -c {name}")));
        let man = run(&["--man"]);
        assert!(man.contains(&format!(".TH {name} 1")), "{name}: {man}");
        assert!(man.contains("KEYFERRY_") || name == "broker", "{name}");
    }
}

/// Runs `cmd` under a pseudo-terminal (script(1)); what the terminal showed
/// goes to the file `screen`.
fn on_a_terminal(cmd: &Command, screen: &std::path::Path, env: &[(&str, &str)]) -> Proc {
    let line: Vec<String> = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| format!("'{}'", a.to_str().unwrap()))
        .collect();
    let mut script = Command::new("script");
    script
        .args(["-qefc", &line.join(" "), "/dev/null"])
        .env("TERM", "xterm-256color")
        .env_remove("NO_COLOR");
    for (k, v) in env {
        script.env(k, v);
    }
    let file = std::fs::File::create(screen).unwrap();
    Proc::spawn_io(script, Stdio::null(), Some(Stdio::from(file)))
}

/// What a `--once` receiver showed on a terminal while 24 MiB arrived,
/// with `extra` options and environment.
fn receiver_screen(extra: &[&str], env: &[(&str, &str)]) -> String {
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    let file = src.join("big.bin");
    std::fs::write(&file, pseudo_random(24 << 20, 5)).unwrap();
    let mut cmd = bob.command(&broker);
    cmd.args(["--role", "receiver", "--once", "--yes", "--out-dir"])
        .arg(out.path())
        .args(extra);
    let screen = src.join("screen");
    let mut rx = on_a_terminal(&cmd, &screen, env);
    // Ready once the broker lists bob.
    let deadline = std::time::Instant::now() + WAIT;
    while !bob.run(&broker, &["--list"]).stdout.contains("bob  ") {
        assert!(
            std::time::Instant::now() < deadline,
            "bob never came online"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = alice.send_file(&broker, "bob", &file, &["--rekey-interval", "200ms"]);
    assert_eq!(s.code, Some(0), "{s:#?}");
    assert_eq!(rx.wait(WAIT), Some(0));
    std::fs::read_to_string(&screen).unwrap()
}

#[test]
fn the_receiver_draws_a_bar_on_a_terminal_in_colour_unless_no_color() {
    let screen = receiver_screen(&[], &[]);
    assert!(screen.contains("received big.bin"), "{screen:?}");
    assert!(screen.contains("key #"), "no bar: {screen:?}");
    assert!(screen.contains("\u{1b}[36m"), "no colour: {screen:?}");

    let plain = receiver_screen(&[], &[("NO_COLOR", "1")]);
    assert!(plain.contains("key #"), "no bar: {plain:?}");
    assert!(
        !plain.contains("\u{1b}[36m"),
        "colour under NO_COLOR: {plain:?}"
    );

    let quiet = receiver_screen(&["--quiet"], &[]);
    assert!(quiet.contains("received big.bin"), "{quiet:?}");
    assert!(!quiet.contains("key #"), "a bar under --quiet: {quiet:?}");
}

#[test]
fn no_bar_when_stderr_is_not_a_terminal() {
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    let file = src.join("big.bin");
    std::fs::write(&file, pseudo_random(8 << 20, 6)).unwrap();
    let rx = bob.receiver(&broker, out.path(), &["--once"]);
    let s = alice.send_file(&broker, "bob", &file, &[]);
    let r = Run::finish(rx);
    assert_eq!((s.code, r.code), (Some(0), Some(0)), "{s:#?}\n{r:#?}");
    for text in [&s.stderr, &r.stderr, &r.stdout] {
        assert!(
            !text.contains("key #") && !text.contains('\u{1b}'),
            "{text:?}"
        );
    }
}

#[test]
fn the_receiver_reports_each_event_as_a_json_line() {
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    support::known_for_two_days(&alice, &bob);
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    let mut cmd = bob.command(&broker);
    cmd.args([
        "--role",
        "receiver",
        "--json",
        "--max-size",
        "128MiB",
        "--out-dir",
    ])
    .arg(out.path());
    let mut rx = Proc::spawn(cmd);
    rx.stderr.wait_for("receiving as bob", WAIT);

    let file = src.join("a.bin");
    std::fs::write(&file, pseudo_random(100_000, 7)).unwrap();
    let (_, sha) = support::hash_file(&file);
    assert_eq!(alice.send_file(&broker, "bob", &file, &[]).code, Some(0));
    let line = rx.stdout.wait_for("\"received\"", WAIT);
    let ev: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(ev["from"], "alice");
    assert_eq!(ev["file"], "a.bin");
    assert_eq!(ev["bytes"], 100_000);
    assert_eq!(ev["sha256"], sha);
    assert_eq!(ev["sha256_by"], "receiver");
    assert_eq!(ev["path"], out.join("a.bin").to_str().unwrap());
    assert!(ev["transfer_id"].is_string() && ev["seconds"].is_number());
    assert!(ev["session_keys"].as_u64().unwrap() >= 1);

    let m = alice.run(
        &broker,
        &[
            "--role",
            "sender",
            "--to",
            "bob",
            "--message",
            "hi \"there\"",
        ],
    );
    assert_eq!(m.code, Some(0), "{m:#?}");
    let ev: serde_json::Value =
        serde_json::from_str(&rx.stdout.wait_for("\"message\"", WAIT)).unwrap();
    assert_eq!(
        (&ev["text"], &ev["from"]),
        (&"hi \"there\"".into(), &"alice".into())
    );

    // Larger than --max-size: refused before anything is accepted.
    let big = src.join("big.bin");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(200 << 20)
        .unwrap();
    let s = alice.send_file(&broker, "bob", &big, &[]);
    assert_eq!(s.code, Some(8), "{s:#?}");
    let ev: serde_json::Value =
        serde_json::from_str(&rx.stdout.wait_for("\"refused\"", WAIT)).unwrap();
    assert_eq!(
        (&ev["from"], &ev["exit_code"]),
        (&"alice".into(), &8.into())
    );
    assert!(ev["reason"].as_str().unwrap().contains("size"), "{ev}");

    // A sender killed mid-stream (it sends a pipe we keep open): the
    // transfer fails (exit code 1 for a --once receiver).
    let (mut sender, mut input) = alice.pipe_sender(
        &broker,
        "bob",
        "slow.bin",
        &["--retry-for", "0", "--max-size", "64MiB"],
    );
    std::io::Write::write_all(&mut input, &pseudo_random(3 << 20, 8)).unwrap();
    wait_for_data(rx.child.id(), out.path(), 1 << 20);
    sender.kill();
    drop(input);
    let ev: serde_json::Value =
        serde_json::from_str(&rx.stdout.wait_for("\"failed\"", WAIT)).unwrap();
    assert_eq!(
        (&ev["from"], &ev["exit_code"]),
        (&"alice".into(), &1.into())
    );
    assert!(ev["reason"].as_str().is_some_and(|r| !r.is_empty()), "{ev}");
    assert!(ev["transfer_id"].is_string(), "{ev}");
    // Nothing but JSON on stdout.
    json_lines(&rx.stdout.drain().join("\n"));
}

#[test]
fn trust_sender_hash_reports_the_signed_hash_as_the_senders_and_only_for_a_sole_receiver() {
    let broker = Broker::start();
    let (alice, bob, carol, dave) = (
        Home::new("alice", "alice"),
        Home::new("bob", "bob"),
        Home::new("carol", "carol"),
        Home::new("dave", "dave"),
    );
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    let (out_c, out_d) = (TempDir::new("outc"), TempDir::new("outd"));
    let file = src.join("a.bin");
    std::fs::write(&file, pseudo_random(3 << 20, 11)).unwrap();
    let (_, sha) = support::hash_file(&file);

    // Text mode: the line says whose hash it is.
    let mut rd = dave.receiver(&broker, out_d.path(), &["--trust-sender-hash"]);
    assert_eq!(alice.send_file(&broker, "dave", &file, &[]).code, Some(0));
    let line = rd.stdout.wait_for("received a.bin", WAIT);
    assert!(
        line.contains(&format!("sha256 {sha} (the sender's)")),
        "{line}"
    );
    assert_eq!(
        std::fs::read(out_d.join("a.bin")).unwrap(),
        std::fs::read(&file).unwrap()
    );

    // JSON: "sender" for a stream to bob alone; to bob and carol at once,
    // bob hashes all the same.
    let mut rx = bob.receiver(&broker, out.path(), &["--json", "--trust-sender-hash"]);
    let mut rc = carol.receiver(&broker, out_c.path(), &["--json"]);
    // Each transfer under its own name: the lines seen are searched first.
    let event = |p: &mut Proc, name: &str| -> serde_json::Value {
        let line = p.stdout.wait_for(&format!("\"file\":\"{name}\""), WAIT);
        serde_json::from_str(&line).unwrap()
    };
    assert_eq!(alice.send_file(&broker, "bob", &file, &[]).code, Some(0));
    let ev = event(&mut rx, "a.bin");
    assert_eq!(
        (&ev["sha256"], &ev["sha256_by"]),
        (&sha.clone().into(), &"sender".into())
    );
    let copy = src.join("b.bin");
    std::fs::copy(&file, &copy).unwrap();
    let both = alice.send_file(&broker, "bob", &copy, &["--to", "carol"]);
    assert_eq!(both.code, Some(0), "{both:#?}");
    for (who, p) in [("bob", &mut rx), ("carol", &mut rc)] {
        let ev = event(p, "b.bin");
        assert_eq!(
            (&ev["sha256"], &ev["sha256_by"]),
            (&sha.clone().into(), &"receiver".into()),
            "{who}: {ev}"
        );
    }

    // A receiver's option, refused for a sender.
    let wrong = alice.send_file(&broker, "bob", &file, &["--trust-sender-hash"]);
    assert_eq!(wrong.code, Some(2), "{wrong:#?}");
    assert!(wrong.stderr.contains("--trust-sender-hash"), "{wrong:#?}");
}
