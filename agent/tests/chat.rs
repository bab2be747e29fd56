//! Two people chatting, each on a terminal (a pseudo-terminal, keys typed
//! and the screen read back), with the real binaries on 127.0.0.1; and two
//! scripts chatting through stdin and stdout.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

mod support;

use std::io::Write as _;
use std::process::Stdio;
use std::time::Duration;

use support::pty::Pty;
use support::{Broker, Home, Proc, WAIT};

/// `home`'s chat with `peer` on a terminal of 500 rows (the whole talk stays
/// on the screen).
fn chatting(home: &Home, broker: &Broker, peer: &str, extra: &[&str]) -> Pty {
    let mut cmd = home.command(broker);
    cmd.args(["--chat", peer]).args(extra);
    Pty::spawn_sized(cmd, 500, 120)
}

/// The chat lines on a screen, in order: `(author, text)` from every
/// `HH:MM:SS name: text` line.
fn talk(screen: &str) -> Vec<(String, String)> {
    screen
        .lines()
        .filter_map(|l| {
            let (time, rest) = l.split_once(' ')?;
            let ok = time.len() == 8 && time.as_bytes()[2] == b':' && time.as_bytes()[5] == b':';
            let (who, text) = rest.split_once(": ")?;
            ok.then(|| (who.to_owned(), text.to_owned()))
        })
        .collect()
}

/// The session keys a chat says its lines went under, at its end.
fn keys_used(screen: &str) -> u64 {
    let line = screen
        .lines()
        .find(|l| l.contains("session keys"))
        .unwrap_or_else(|| panic!("no key count on the screen:\n{screen}"));
    let n = line
        .split("went under ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    n.parse().unwrap()
}

#[test]
fn two_chats_exchange_a_hundred_lines_each_way_in_order_under_rotating_keys() {
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let fast = ["--rekey-interval", "200ms"];
    let mut a = chatting(&alice, &broker, "bob", &fast);
    a.wait_for("bob is offline; waiting for them", WAIT);
    let mut b = chatting(&bob, &broker, "alice", &fast);
    a.wait_for("bob is here", WAIT);
    b.wait_for("alice is here", WAIT);
    // Both streams are up once each side has seen the other's come.
    std::thread::sleep(Duration::from_millis(300));
    let mut want = Vec::new();
    for i in 0..100 {
        let line = format!("line a{i} from alice");
        a.line(&line);
        b.wait_for(&format!("alice: {line}"), WAIT);
        want.push(("alice".to_owned(), line));
        let line = format!("line b{i} from bob");
        b.line(&line);
        a.wait_for(&format!("bob: {line}"), WAIT);
        want.push(("bob".to_owned(), line));
    }
    // Let the keys turn over a few times more while nobody types.
    std::thread::sleep(Duration::from_millis(700));
    a.line("/quit");
    b.wait_for("alice left", WAIT);
    b.line("/quit");
    assert_eq!(a.wait(WAIT), Some(0), "{}", a.screen());
    assert_eq!(b.wait(WAIT), Some(0), "{}", b.screen());
    let (sa, sb) = (a.screen(), b.screen());
    if std::env::var_os("KEYFERRY_SHOW_SCREENS").is_some() {
        eprintln!("{sa}\n----\n{sb}");
    }
    assert_eq!(talk(&sa), want, "alice's screen:\n{sa}");
    assert_eq!(talk(&sb), want, "bob's screen:\n{sb}");
    // Nothing typed was lost, and nothing is marked so.
    assert!(
        !sa.contains("not delivered") && !sb.contains("not delivered"),
        "{sa}\n{sb}"
    );
    assert!(keys_used(&sa) >= 3, "{sa}");
    assert!(keys_used(&sb) >= 3, "{sb}");
}

#[test]
fn a_line_to_someone_offline_is_marked_not_delivered() {
    let broker = Broker::start();
    let alice = Home::new("alice", "alice");
    let mut a = chatting(&alice, &broker, "bob", &[]);
    a.wait_for("bob is offline", WAIT);
    a.line("anyone there?");
    a.wait_for("not delivered to bob (not here): anyone there?", WAIT);
    a.line("/quit");
    assert_eq!(a.wait(WAIT), Some(0));
}

/// A chat off a terminal: lines in on stdin, what arrives on stdout.
fn scripted(home: &Home, broker: &Broker, peer: &str) -> (Proc, std::process::ChildStdin) {
    let mut cmd = home.command(broker);
    cmd.args(["--chat", peer, "--json"]);
    let mut p = Proc::spawn_io(cmd, Stdio::piped(), None);
    let stdin = p.child.stdin.take().unwrap();
    (p, stdin)
}

#[test]
fn two_scripts_converse_through_stdin_and_stdout() {
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let (mut a, mut a_in) = scripted(&alice, &broker, "bob");
    let (mut b, mut b_in) = scripted(&bob, &broker, "alice");
    a.stdout.wait_for(r#""event":"joined","peer":"bob""#, WAIT);
    b.stdout
        .wait_for(r#""event":"joined","peer":"alice""#, WAIT);
    std::thread::sleep(Duration::from_millis(300));
    writeln!(a_in, "ping \u{1b}[2J").unwrap();
    let got = b.stdout.wait_for("ping", WAIT);
    let v: serde_json::Value = serde_json::from_str(&got).unwrap();
    assert_eq!(v["event"], "line");
    assert_eq!(v["from"], "alice");
    // The text as it was sent (JSON escapes it); a terminal shows it escaped.
    assert_eq!(v["text"], "ping \u{1b}[2J");
    writeln!(b_in, "pong").unwrap();
    a.stdout.wait_for(r#""text":"pong""#, WAIT);
    drop(a_in);
    assert_eq!(a.wait(WAIT), Some(0));
    b.stdout.wait_for(r#""event":"left","peer":"alice""#, WAIT);
    drop(b_in);
    assert_eq!(b.wait(WAIT), Some(0));
}

#[test]
fn a_group_of_three_each_line_reaches_everyone_with_its_author_and_a_file_goes_too() {
    let broker = Broker::start();
    let homes = [
        Home::new("alice", "alice"),
        Home::new("bob", "bob"),
        Home::new("carol", "carol"),
    ];
    let outs = [
        support::TempDir::new("ao"),
        support::TempDir::new("bo"),
        support::TempDir::new("co"),
    ];
    let names = ["alice", "bob", "carol"];
    let mut chats: Vec<(Proc, std::process::ChildStdin)> = Vec::new();
    for (i, home) in homes.iter().enumerate() {
        let mut cmd = home.command(&broker);
        for (j, peer) in names.iter().enumerate() {
            if j != i {
                cmd.args(["--chat", peer]);
            }
        }
        cmd.arg("--json").arg("--out-dir").arg(outs[i].path());
        let mut p = Proc::spawn_io(cmd, Stdio::piped(), None);
        let stdin = p.child.stdin.take().unwrap();
        chats.push((p, stdin));
    }
    // Everyone has seen everyone else come.
    for (i, (p, _)) in chats.iter_mut().enumerate() {
        for (j, peer) in names.iter().enumerate() {
            if j != i {
                p.stdout
                    .wait_for(&format!(r#""event":"joined","peer":"{peer}""#), WAIT);
            }
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    writeln!(chats[0].1, "hello from alice").unwrap();
    writeln!(chats[2].1, "and carol").unwrap();
    for (i, (p, _)) in chats.iter_mut().enumerate() {
        if i != 0 {
            let l = p.stdout.wait_for("hello from alice", WAIT);
            assert!(l.contains(r#""from":"alice""#), "{l}");
        }
        if i != 2 {
            let l = p.stdout.wait_for("and carol", WAIT);
            assert!(l.contains(r#""from":"carol""#), "{l}");
        }
    }
    // /file: a normal transfer to every peer.
    let src = support::TempDir::new("src");
    let file = src.join("notes.txt");
    std::fs::write(&file, b"for everyone").unwrap();
    writeln!(chats[1].1, "/file {}", file.display()).unwrap();
    chats[1].0.stderr.wait_for("-- sent", WAIT);
    for i in [0, 2] {
        assert_eq!(
            std::fs::read(outs[i].join("notes.txt")).unwrap(),
            b"for everyone"
        );
    }
    for (mut p, stdin) in chats {
        drop(stdin);
        assert_eq!(p.wait(WAIT), Some(0));
    }
}

#[test]
fn a_chat_beside_a_running_receiver_of_its_name_says_why_and_exits_10() {
    let broker = Broker::start();
    let bob = Home::new("bob", "bob");
    let out = support::TempDir::new("out");
    let _receiver = bob.receiver(&broker, out.path(), &["--yes"]);
    let run = support::Run::finish(bob.start(&broker, &["--chat", "alice", "--json"]));
    assert_eq!(run.code, Some(10), "{run:#?}");
    assert!(
        run.stderr.contains("a chat is its name's receiver"),
        "{}",
        run.stderr
    );
}
