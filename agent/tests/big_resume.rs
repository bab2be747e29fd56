//! Resuming a large transfer without reading its prefix first, driven as a
//! user would (the real binaries on 127.0.0.1, real files): a 6 GiB file
//! cut past 4 GiB — once by killing the receiver and starting it again,
//! once by killing the sender and running the same command again — goes on
//! from the receiver's last checkpoint and arrives identical. (How long the
//! restart takes is measured by `scripts/bench-resume.sh`, not here.)

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

mod support;

use std::fs::File;
use std::path::Path;
use std::time::Duration;

use support::{Broker, Home, Run, TempDir, WAIT, hash_file, json, wait_for_data};

const GIB: u64 = 1 << 30;
/// The source: 6 GiB (sparse on this side: its content is zeros, the
/// stream is sealed all the same, and the receiver writes every byte).
const SIZE: u64 = 6 * GIB;
/// Where the transfer is cut: past 4 GiB, with room for checkpoints.
const CUT: u64 = 4 * GIB + 512 * (1 << 20);
/// The least a resume may go on from: the receiver holds at least [`CUT`]
/// bytes when the cut comes, and checkpoints every 64 MiB
/// (`receive::checkpoint::EVERY`); its last checkpoint is at most one
/// interval behind what it wrote, and one more may be in flight to the disk.
const LAST_CHECKPOINT: u64 = CUT - 2 * (64 << 20);

/// The disk must hold the received file and a margin.
fn room(dir: &Path) -> bool {
    let s = rustix::fs::statvfs(dir).unwrap();
    let ok = s.f_bavail * s.f_frsize > SIZE + 3 * GIB;
    if !ok {
        eprintln!("skipped: the disk has not {SIZE} bytes and 3 GiB to spare");
    }
    ok
}

struct Cut {
    broker: Broker,
    alice: Home,
    bob: Home,
    _src: TempDir,
    out: TempDir,
    file: std::path::PathBuf,
    sha: (u64, String),
}

fn setup() -> Option<Cut> {
    let out = TempDir::new("out");
    if !room(out.path()) {
        return None;
    }
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    support::known_for_two_days(&alice, &bob);
    let src = TempDir::new("src");
    let file = src.join("disk.img");
    File::create(&file).unwrap().set_len(SIZE).unwrap();
    let sha = hash_file(&file);
    Some(Cut {
        broker,
        alice,
        bob,
        _src: src,
        out,
        file,
        sha,
    })
}

fn send_args(file: &Path) -> Vec<String> {
    ["--role", "sender", "--to", "bob", "--json", "--file"]
        .iter()
        .map(|s| (*s).to_owned())
        .chain([file.to_str().unwrap().to_owned()])
        .collect()
}

#[test]
fn a_6_gib_file_cut_past_4_gib_by_the_receiver_goes_on_from_its_checkpoint() {
    let Some(t) = setup() else { return };
    let args = send_args(&t.file);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut receiver = t.bob.receiver(&t.broker, t.out.path(), &["--yes"]);
    let sender = t.alice.start(&t.broker, &args);
    wait_for_data(receiver.child.id(), t.out.path(), CUT);
    receiver.signal(rustix::process::Signal::KILL);
    let _ = receiver.wait(WAIT);
    let mut again = t.bob.receiver(&t.broker, t.out.path(), &["--yes"]);
    let sent = Run::finish_within(sender, Duration::from_secs(600));
    assert_eq!(sent.code, Some(0), "{sent:#?}");
    let report = json(&sent);
    let from = report["resumed_from"].as_u64().unwrap();
    assert!(from >= LAST_CHECKPOINT, "resumed from {from}: {report}");
    again.stdout.wait_for("resumed at byte", WAIT);
    assert_eq!(hash_file(&t.out.join("disk.img")), t.sha);
}

#[test]
fn a_6_gib_file_cut_past_4_gib_by_the_sender_goes_on_when_run_again() {
    let Some(t) = setup() else { return };
    let args = send_args(&t.file);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let receiver = t.bob.receiver(&t.broker, t.out.path(), &["--yes"]);
    let first = t.alice.start(&t.broker, &args);
    wait_for_data(receiver.child.id(), t.out.path(), CUT);
    first.signal(rustix::process::Signal::KILL);
    let sent = Run::finish_within(t.alice.start(&t.broker, &args), Duration::from_secs(600));
    assert_eq!(sent.code, Some(0), "{sent:#?}");
    let from = json(&sent)["resumed_from"].as_u64().unwrap();
    assert!(from >= LAST_CHECKPOINT, "resumed from {from}");
    assert_eq!(hash_file(&t.out.join("disk.img")), t.sha);
}
