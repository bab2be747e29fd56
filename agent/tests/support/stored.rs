//! Helpers for the tests of stored transfers (`--store`): prekeys left at
//! a broker, a store run and its event, receipts, and looking for plaintext
//! in what a broker or NATS keeps.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::{Broker, Home, Run, WAIT, json};

/// What the marker file repeats: none of it may appear at the broker.
pub const MARKER: &[u8] = b"KEYFERRY-PLAINTEXT-MARKER-0123456789/";

/// Starts `who`'s receiver until the broker holds its prekeys, then stops it.
pub fn deposit_prekeys(broker: &mut Broker, who: &Home, out: &Path) {
    let mut rx = who.receiver(broker, out, &[]);
    broker.proc.stderr.wait_for("one_time=16", WAIT);
    rx.kill();
    broker.proc.stderr.wait_for("receiver offline", WAIT);
}

/// `alice --role sender --to to --store --json` with `extra`.
pub fn store(alice: &Home, broker: &Broker, to: &str, extra: &[&str]) -> Run {
    let mut args = vec!["--role", "sender", "--to", to, "--store", "--json"];
    args.extend_from_slice(extra);
    alice.run(broker, &args)
}

/// The stored event a `--store --json` run printed.
pub fn stored_event(run: &Run) -> serde_json::Value {
    assert_eq!(run.code, Some(12), "{run:?}");
    let v = json(run);
    assert_eq!(v["event"], "stored", "{run:?}");
    v
}

/// Files under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Whether any file under `dir` contains `needle`.
pub fn contains(dir: &Path, needle: &[u8]) -> bool {
    let status = Command::new("grep")
        .args(["-r", "-q", "-F", "-a"])
        .arg(std::str::from_utf8(needle).unwrap())
        .arg(dir)
        .status()
        .unwrap();
    match status.code() {
        Some(0) => true,
        Some(1) => false,
        other => panic!("grep failed: {other:?}"),
    }
}

/// The receipts `alice --receipts --json` lists.
pub fn receipts(alice: &Home, broker: &Broker) -> Vec<serde_json::Value> {
    let run = alice.run(broker, &["--receipts", "--json"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    run.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

pub fn wait_until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes `mib` MiB of [`MARKER`] repeated to `path`.
pub fn marker_file(path: &Path, mib: usize) {
    let block: Vec<u8> = MARKER.iter().copied().cycle().take(1 << 20).collect();
    let mut f = fs::File::create(path).unwrap();
    for _ in 0..mib {
        std::io::Write::write_all(&mut f, &block).unwrap();
    }
}

/// Bytes of every file under `dir`.
pub fn bytes_under(dir: &Path) -> u64 {
    files_under(dir)
        .iter()
        .map(|p| fs::metadata(p).map_or(0, |m| m.len()))
        .sum()
}
