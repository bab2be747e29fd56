//! The real `agent` binaries against a broker that misbehaves on purpose
//! (`support::evil`): it flips bits, reorders, replays, drops, cuts, splices,
//! forges and substitutes keys. For every attack the receiver must refuse with
//! a clear error, leave no file under the final name and no temporary file,
//! and the sender must not report success — except where the table says
//! otherwise (a tampered receipt reaches a receiver that did its job; a
//! first-contact key substitution is the documented limit of trust on first use).
//!
//! One table-driven test runs the cases on a few threads (each case has its own
//! broker, homes and processes) and prints one row per case.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

mod support;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use keyferry_agent::trust::pins::PinStore;
use keyferry_common::crypto::random_array;
use keyferry_common::handshake::{self, DEFAULT_TIME_WINDOW_SECS};
use keyferry_common::identity::{Fingerprint, Identity};
use keyferry_common::name::AgentName;
use keyferry_common::wire::message::{Message, RefuseReason};

use support::evil::{Action, EvilBroker, Hooks, finish_within, flip, is_last_chunk, readdress};
use support::{Home, Proc, Run, TempDir, WAIT, pseudo_random};

/// Longest wait for an agent that should exit on its own.
const EXIT_WAIT: Duration = Duration::from_secs(45);
/// Cases run at once (each runs two agents and one broker).
const WORKERS: usize = 3;
/// Default file size: 8 chunks.
const SIZE: usize = 8 * keyferry_common::wire::record::DEFAULT_CHUNK;

// ---------------------------------------------------------------------------
// Fixtures.

fn identity(key: &str) -> Identity {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../common/tests/fixtures/{key}.pem"));
    let pem = std::fs::read_to_string(path).unwrap();
    Identity::from_pkcs8_pem(&pem).unwrap().unwrap()
}

fn spki(key: &str) -> Vec<u8> {
    identity(key).public().spki_der().to_vec()
}

fn fp(key: &str) -> Fingerprint {
    identity(key).fingerprint()
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Replaces the fixtures' fingerprints by `<name's key>` so rows stay readable.
fn readable(text: &str) -> String {
    let mut t = text.to_owned();
    for key in ["alice", "bob", "mallory"] {
        t = t.replace(&fp(key).to_string(), &format!("<{key}'s key>"));
    }
    t
}

/// Counts how often a hook actually tampered, so no case passes vacuously.
#[derive(Clone, Default)]
struct Hits(Arc<AtomicUsize>);

impl Hits {
    fn hit(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    fn count(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

// ---------------------------------------------------------------------------
// A world: one evil broker, alice (sender) and bob (receiver), fresh homes.

struct World {
    broker: EvilBroker,
    alice: Home,
    bob: Home,
    src: TempDir,
    out: TempDir,
}

impl World {
    fn new(hooks: Hooks) -> Self {
        Self {
            broker: EvilBroker::start(hooks),
            alice: Home::new("alice", "alice"),
            bob: Home::new("bob", "bob"),
            src: TempDir::new("evil-src"),
            out: TempDir::new("evil-out"),
        }
    }

    fn file(&self, name: &str, size: usize, seed: u64) -> PathBuf {
        let path = self.src.join(name);
        std::fs::write(&path, pseudo_random(size, seed)).unwrap();
        path
    }

    fn bob_once(&self, out: &Path) -> Proc {
        self.broker.receiver(&self.bob, out, &["--once"])
    }

    /// One honest transfer through the (so far honest) broker, into its own
    /// out dir: both sides pin each other.
    fn honest_transfer(&self) {
        let out = TempDir::new("evil-honest");
        let receiver = self.bob_once(out.path());
        let file = self.file("hello.txt", 1000, 99);
        let s = finish_within(
            self.broker.sender(&self.alice, "bob", &file, &[]),
            EXIT_WAIT,
        );
        let r = finish_within(receiver, EXIT_WAIT);
        assert_eq!(s.code, Some(0), "honest transfer, sender: {s:#?}");
        assert_eq!(r.code, Some(0), "honest transfer, receiver: {r:#?}");
    }

    /// bob receives once into `self.out` while alice sends `name`.
    fn attack(&self, name: &str, size: usize, sender_args: &[&str]) -> (Run, Run) {
        let file = self.file(name, size, size as u64 ^ 0x5eed);
        let receiver = self.bob_once(self.out.path());
        let s = finish_within(
            self.broker.sender(&self.alice, "bob", &file, sender_args),
            EXIT_WAIT,
        );
        let r = finish_within(receiver, EXIT_WAIT);
        (r, s)
    }
}

// ---------------------------------------------------------------------------
// Observations and the checks every case shares.

struct Row {
    case: String,
    receiver: String,
    sender: String,
    /// "yes"/"no", with a note where the plain answer would mislead.
    final_present: String,
    temp_removed: bool,
}

fn yes(b: bool) -> String {
    if b { "yes" } else { "no" }.to_owned()
}

fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".keyferry-"))
        .collect()
}

fn visible_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    v.sort();
    v
}

/// What the receiver said about the transfer (its one failure or refusal line).
fn receiver_why(run: &Run) -> String {
    for line in run.stderr.lines() {
        if line.starts_with("transfer ")
            && let Some(i) = line.find(" failed: ")
        {
            let why = &line[i + " failed: ".len()..];
            return why.trim_end_matches("; nothing was placed").to_owned();
        }
        if line.starts_with("refused transfer ")
            && let Some(i) = line.find(": ")
        {
            return format!("refused: {}", &line[i + 2..]);
        }
    }
    if let Some(line) = run.stdout.lines().find(|l| l.starts_with("received ")) {
        return line.split(" (").next().unwrap_or(line).to_owned() + " (verified)";
    }
    agent_why(run)
}

/// The agent's final error line.
fn agent_why(run: &Run) -> String {
    run.stderr
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("agent: "))
        .unwrap_or("(nothing printed)")
        .to_owned()
}

fn describe(run: &Run, why: &str) -> String {
    let why = readable(why);
    match run.code {
        Some(c) => format!("exit {c}: {why}"),
        None => format!("killed by the test: {why}"),
    }
}

/// What a sender may legitimately end with: (exit code, text in its error).
type Says<'a> = &'a [(i32, &'a str)];

/// The standard assertions: the receiver refused (non-zero, saying `says`),
/// no file `name` and no temporary in `out`, the sender failed with one of the
/// `sender` (code, text) pairs.
fn refused(
    case: &str,
    r: &Run,
    receiver_says: &str,
    s: &Run,
    sender: Says<'_>,
    out: &Path,
    name: &str,
) -> Row {
    let ctx = || format!("case {case}\nreceiver: {r:#?}\nsender: {s:#?}");
    assert!(matches!(r.code, Some(c) if c != 0), "{}", ctx());
    assert!(r.stderr.contains(receiver_says), "{}", ctx());
    assert!(!out.join(name).exists(), "{}", ctx());
    // Only a cut stream leaves its verified prefix (hidden) for a resume;
    // whatever did not verify leaves nothing.
    assert!(
        temp_files(out).is_empty() || receiver_says == TRUNCATED,
        "{}",
        ctx()
    );
    assert!(
        visible_files(out).is_empty(),
        "nothing at all under any name: {}",
        ctx()
    );
    assert!(matches!(s.code, Some(c) if c != 0), "{}", ctx());
    assert!(
        sender
            .iter()
            .any(|(code, says)| s.code == Some(*code) && s.stderr.contains(says)),
        "{}",
        ctx()
    );
    assert!(!s.stdout.contains("receipt verified"), "{}", ctx());
    let sender_did = describe(s, &agent_why(s));
    Row {
        case: case.to_owned(),
        receiver: describe(r, &receiver_why(r)),
        sender: sender_did,
        final_present: yes(out.join(name).exists()),
        temp_removed: temp_files(out).is_empty(),
    }
}

/// The common shape: one transfer through a broker with `hooks`, which must be
/// refused by the receiver and not reported as a success by the sender.
fn stream_attack(
    case: &str,
    hooks: Hooks,
    hits: &Hits,
    size: usize,
    sender_args: &[&str],
    receiver_says: &str,
    sender: Says<'_>,
) -> Row {
    let w = World::new(hooks);
    let (r, s) = w.attack("data.bin", size, sender_args);
    assert!(hits.count() > 0, "case {case}: the broker never tampered");
    refused(
        case,
        &r,
        receiver_says,
        &s,
        sender,
        w.out.path(),
        "data.bin",
    )
}

const AUTH: &str = "authentication failed: the data was altered";
/// The receiver's `Abort` reached the sender.
const SENDER_ABORTED: Says<'static> = &[(9, "the receiver refused the data (it did not verify)")];
/// The receiver refused the offer. Exit 5 ("offline") is the product's race:
/// a `--once` receiver may exit before its `Refuse` leaves (see the report).
const SENDER_REFUSED: Says<'static> = &[(8, "bob refused the transfer: the offer did not verify")];
const TRUNCATED: &str = "the stream ended before the transfer was complete";

/// A forward hook that applies `f` to the chunk with index `at` and passes
/// everything else.
fn on_chunk(
    hits: &Hits,
    at: usize,
    mut f: impl FnMut(Message) -> Vec<Action> + Send + 'static,
) -> Hooks {
    let hits = hits.clone();
    Hooks::pass_through().forward(move |flow, m| match m {
        Message::Chunk { .. } if flow.chunks_seen == at => {
            hits.hit();
            f(m)
        }
        m => vec![Action::Pass(m)],
    })
}

// ---------------------------------------------------------------------------
// The cases.

fn case_1_chunk_bit() -> Vec<Row> {
    let hits = Hits::default();
    let hooks = on_chunk(&hits, 2, |m| vec![Action::Pass(flip(m, 100))]);
    let row = stream_attack(
        "1 flip a bit in a chunk (chunk #2, ciphertext)",
        hooks,
        &hits,
        SIZE,
        &[],
        AUTH,
        SENDER_ABORTED,
    );
    let hits = Hits::default();
    // byte 12 is the `last` flag: claim the stream ends after chunk #1.
    let hooks = on_chunk(&hits, 1, |m| vec![Action::Pass(flip(m, 12))]);
    let row_b = stream_attack(
        "1b set the `last` flag on a middle chunk (#1)",
        hooks,
        &hits,
        SIZE,
        &[],
        AUTH,
        SENDER_ABORTED,
    );
    vec![row, row_b]
}

fn case_2_key_update_bit() -> Vec<Row> {
    let hits = Hits::default();
    let h = hits.clone();
    let hooks = Hooks::pass_through().forward(move |flow, m| match m {
        Message::KeyUpdate { .. } if flow.key_updates_seen == 0 => {
            h.hit();
            // Byte 40 lies in the sealed fresh key material.
            vec![Action::Pass(flip(m, 40))]
        }
        m => vec![Action::Pass(m)],
    });
    vec![stream_attack(
        "2 flip a bit in a key update (first one; --rekey-interval 1ms, 4 MiB)",
        hooks,
        &hits,
        4 << 20,
        &["--rekey-interval", "1ms"],
        AUTH,
        SENDER_ABORTED,
    )]
}

fn offer_attack(case: &str, f: fn(&mut Vec<u8>, &mut Vec<u8>)) -> Row {
    offer_attack_says(case, "from alice: verification failed", f)
}

/// [`offer_attack`], the receiver saying `says`.
fn offer_attack_says(case: &str, says: &str, f: fn(&mut Vec<u8>, &mut Vec<u8>)) -> Row {
    let hits = Hits::default();
    let h = hits.clone();
    let hooks = Hooks::pass_through().offered(move |m| match m {
        Message::Offered {
            from,
            spki,
            mut offer,
        } => {
            h.hit();
            f(&mut offer.body, &mut offer.signature);
            Message::Offered { from, spki, offer }
        }
        m => m,
    });
    stream_attack(case, hooks, &hits, SIZE, &[], says, SENDER_REFUSED)
}

fn case_3_offer_bits() -> Vec<Row> {
    vec![
        offer_attack(
            "3a flip a bit in the offer body (sealed terms)",
            |body, _| {
                let at = body.len() - 40;
                body[at] ^= 1;
            },
        ),
        offer_attack("3b flip a bit in the offer signature", |_, sig| sig[7] ^= 1),
    ]
}

fn case_4_trailer_bit() -> Vec<Row> {
    let hits = Hits::default();
    let h = hits.clone();
    let hooks = Hooks::pass_through().forward(move |_, m| match m {
        Message::Trailer { .. } => {
            h.hit();
            vec![Action::Pass(flip(m, 20))]
        }
        m => vec![Action::Pass(m)],
    });
    vec![stream_attack(
        "4 flip a bit in the trailer",
        hooks,
        &hits,
        SIZE,
        &[],
        AUTH,
        SENDER_ABORTED,
    )]
}

fn case_5_receipt_bit() -> Vec<Row> {
    let hits = Hits::default();
    let h = hits.clone();
    let hooks = Hooks::pass_through().back(move |_, m| match m {
        Message::Receipt { .. } => {
            h.hit();
            vec![Action::Pass(flip(m, 0))]
        }
        m => vec![Action::Pass(m)],
    });
    let w = World::new(hooks);
    let (r, s) = w.attack("data.bin", SIZE, &[]);
    let ctx = format!("receiver: {r:#?}\nsender: {s:#?}");
    assert!(hits.count() > 0, "{ctx}");
    // The receiver did its job: the data verified, the file is in place.
    assert_eq!(r.code, Some(0), "{ctx}");
    assert_eq!(
        std::fs::read(w.out.join("data.bin")).unwrap(),
        pseudo_random(SIZE, SIZE as u64 ^ 0x5eed),
        "{ctx}"
    );
    assert!(temp_files(w.out.path()).is_empty(), "{ctx}");
    // The sender must not believe a receipt that does not verify.
    assert_eq!(s.code, Some(9), "{ctx}");
    assert!(
        s.stderr
            .contains("the receipt does not confirm the length and SHA-256 we sent"),
        "{ctx}"
    );
    assert!(!s.stdout.contains("receipt verified"), "{ctx}");
    vec![Row {
        case: "5 flip a bit in the receipt (receiver did its job: exit 0 and file expected)".into(),
        receiver: describe(&r, &receiver_why(&r)),
        sender: describe(&s, &agent_why(&s)),
        final_present: yes(w.out.join("data.bin").exists()),
        temp_removed: temp_files(w.out.path()).is_empty(),
    }]
}

fn case_6_reorder() -> Vec<Row> {
    let hits = Hits::default();
    let h = hits.clone();
    let mut held = None;
    let hooks = Hooks::pass_through().forward(move |flow, m| match m {
        Message::Chunk { .. } if flow.chunks_seen == 1 => {
            h.hit();
            held = Some(m);
            vec![]
        }
        Message::Chunk { .. } if flow.chunks_seen == 2 => {
            let mut out = vec![Action::Pass(m)];
            out.extend(held.take().map(Action::Pass));
            out
        }
        m => vec![Action::Pass(m)],
    });
    vec![stream_attack(
        "6 reorder two chunks (#2 before #1)",
        hooks,
        &hits,
        SIZE,
        &[],
        "record out of sequence: expected #1, got #2",
        SENDER_ABORTED,
    )]
}

fn case_7_replay_chunk() -> Vec<Row> {
    let hits = Hits::default();
    let h = hits.clone();
    let mut first = None;
    let hooks = Hooks::pass_through().forward(move |flow, m| match m {
        Message::Chunk { .. } if flow.chunks_seen == 0 => {
            first = Some(m.clone());
            vec![Action::Pass(m)]
        }
        Message::Chunk { .. } if flow.chunks_seen == 1 => {
            h.hit();
            // Chunk #1, then chunk #0 again.
            let mut out = vec![Action::Pass(m)];
            out.extend(first.take().map(Action::Pass));
            out
        }
        m => vec![Action::Pass(m)],
    });
    vec![stream_attack(
        "7 replay an earlier chunk (#0 again after #1)",
        hooks,
        &hits,
        SIZE,
        &[],
        "record out of sequence: expected #2, got #0",
        SENDER_ABORTED,
    )]
}

fn case_8_drop_chunk() -> Vec<Row> {
    let hits = Hits::default();
    let hooks = on_chunk(&hits, 1, |_| vec![]);
    vec![stream_attack(
        "8 drop a chunk (#1)",
        hooks,
        &hits,
        SIZE,
        &[],
        "record out of sequence: expected #1, got #2",
        SENDER_ABORTED,
    )]
}

fn case_9_cut() -> Vec<Row> {
    let hits = Hits::default();
    let h = hits.clone();
    let hooks = Hooks::pass_through().forward(move |_, m| {
        if is_last_chunk(&m) {
            h.hit();
            vec![Action::Close]
        } else {
            vec![Action::Pass(m)]
        }
    });
    vec![stream_attack(
        "9 cut the stream before the last chunk (close both connections)",
        hooks,
        &hits,
        SIZE,
        &[],
        TRUNCATED,
        &[(3, "before the receiver's receipt"), (3, "connection lost")],
    )]
}

fn case_10_splice() -> Vec<Row> {
    let w = World::new(Hooks::pass_through());
    // Transfer A, relayed honestly and recorded.
    let out_a = TempDir::new("evil-out-a");
    let receiver = w.bob_once(out_a.path());
    let file = w.file("first.bin", SIZE, 10);
    let s = finish_within(w.broker.sender(&w.alice, "bob", &file, &[]), EXIT_WAIT);
    let r = finish_within(receiver, EXIT_WAIT);
    assert_eq!((s.code, r.code), (Some(0), Some(0)), "{s:#?}\n{r:#?}");
    let chunks = w.broker.records()[0].chunks();
    assert_eq!(
        chunks.len(),
        SIZE / keyferry_common::wire::record::DEFAULT_CHUNK
    );
    // Transfer B: its chunk #1 is replaced by A's chunk #1 (same epoch and
    // sequence number, so only the keys and the transfer id tell them apart).
    let hits = Hits::default();
    let h = hits.clone();
    let foreign = chunks[1].clone();
    w.broker
        .set_hooks(Hooks::pass_through().forward(move |flow, m| match m {
            Message::Chunk { .. } if flow.chunks_seen == 1 => {
                h.hit();
                vec![Action::Pass(readdress(foreign.clone(), flow.tid, flow.sid))]
            }
            m => vec![Action::Pass(m)],
        }));
    let (r, s) = w.attack("second.bin", SIZE, &[]);
    assert!(hits.count() > 0);
    vec![refused(
        "10 splice in chunk #1 of an earlier transfer",
        &r,
        AUTH,
        &s,
        SENDER_ABORTED,
        w.out.path(),
        "second.bin",
    )]
}

fn case_11_replay_offer() -> Vec<Row> {
    let w = World::new(Hooks::pass_through());
    // A completed transfer to a long-running receiver, recorded.
    let mut bob = w.broker.receiver(&w.bob, w.out.path(), &[]);
    let file = w.file("report.bin", 1 << 20, 11);
    let s = finish_within(w.broker.sender(&w.alice, "bob", &file, &[]), EXIT_WAIT);
    assert_eq!(s.code, Some(0), "{s:#?}");
    bob.stdout.wait_for("received report.bin", WAIT);
    let original = w.broker.records()[0].clone();
    assert!(original.accepted);
    assert!(matches!(original.back[..], [Message::Receipt { .. }]));
    let mut rows = Vec::new();

    // a) The same receiver process: its replay guard remembers the id.
    let tid = w
        .broker
        .inject("bob", original.offered.clone(), original.forward.clone())
        .unwrap();
    assert_eq!(tid, original.tid);
    bob.stderr
        .wait_for("replayed offer", Duration::from_secs(20));
    assert!(w.broker.wait_until(Duration::from_secs(10), |recs| {
        recs.last().unwrap().refused == Some(RefuseReason::VerificationFailed)
    }));
    assert!(!w.broker.records().last().unwrap().accepted);
    // Only the original file: no second copy under "report (1).bin".
    assert_eq!(visible_files(w.out.path()), ["report.bin"]);
    assert!(temp_files(w.out.path()).is_empty());
    let r = finish_within(bob, Duration::ZERO);
    rows.push(Row {
        case: "11a replay a completed transfer's Offered (+ stream) to the same receiver".into(),
        receiver: format!(
            "{} (not --once: it received the original and kept serving; stopped by the test)",
            receiver_why(&r)
        ),
        sender: "none (the original sender exited 0 earlier; the replay needs no sender)".into(),
        final_present: format!(
            "{} (no second copy; only the original report.bin)",
            yes(visible_files(w.out.path()).len() > 1)
        ),
        temp_removed: temp_files(w.out.path()).is_empty(),
    });

    // b, c) A restarted receiver (same home): the ids it saw are kept on
    // disk, so the replay is refused before any RSA work, as in (a).
    // d, e) A receiver whose record of seen ids was deleted has forgotten
    // the id and accepts the offer, but its fresh nonce makes keys the old
    // stream was not sealed under.
    for (tag, stream, forgot, says, what) in [
        ("11b", Vec::new(), false, "replayed offer", "Offered alone"),
        (
            "11c",
            original.forward.clone(),
            false,
            "replayed offer",
            "Offered + recorded stream",
        ),
        ("11d", Vec::new(), true, TRUNCATED, "Offered alone"),
        (
            "11e",
            original.forward.clone(),
            true,
            AUTH,
            "Offered + recorded stream",
        ),
    ] {
        if forgot {
            std::fs::remove_file(w.bob.dir.join("seen_offers")).unwrap();
        }
        let out = TempDir::new("evil-out-replay");
        let bob = w.bob_once(out.path());
        w.broker
            .inject("bob", original.offered.clone(), stream)
            .unwrap();
        let r = finish_within(bob, EXIT_WAIT);
        let ctx = format!("{tag}: {r:#?}");
        assert!(r.stderr.contains(says), "{ctx}");
        let rec = w.broker.records().last().unwrap().clone();
        if forgot {
            assert!(matches!(r.code, Some(c) if c != 0), "{ctx}");
            assert!(
                rec.accepted,
                "the forgetful receiver accepts the offer: {ctx}"
            );
        } else {
            assert_eq!(r.code, Some(8), "{ctx}");
            assert!(!rec.accepted, "{ctx}");
            assert_eq!(rec.refused, Some(RefuseReason::VerificationFailed), "{ctx}");
        }
        assert!(visible_files(out.path()).is_empty(), "{ctx}");
        assert!(temp_files(out.path()).is_empty(), "{ctx}");
        let (whom, why) = if forgot {
            (
                "a receiver whose seen_offers was deleted",
                "offer accepted: the id is forgotten; the stream cannot verify",
            )
        } else {
            (
                "a restarted receiver",
                "the seen id survived the restart: refused before RSA work",
            )
        };
        rows.push(Row {
            case: format!("{tag} replay the {what} to {whom}"),
            receiver: format!("{} ({why})", describe(&r, &receiver_why(&r))),
            sender: "none (the replay needs no sender)".into(),
            final_present: yes(out.join("report.bin").exists()),
            temp_removed: temp_files(out.path()).is_empty(),
        });
    }
    // f) The same id with a broken signature, to a restarted receiver that
    // holds the id (11e recorded it again): refused as a replay, so the
    // look-up came before the signature check (and any RSA work).
    let Message::Offered {
        from,
        spki,
        mut offer,
    } = original.offered.clone()
    else {
        panic!("not an Offered")
    };
    offer.signature[10] ^= 1;
    let out = TempDir::new("evil-out-replay");
    let bob = w.bob_once(out.path());
    w.broker
        .inject("bob", Message::Offered { from, spki, offer }, Vec::new())
        .unwrap();
    let r = finish_within(bob, EXIT_WAIT);
    assert_eq!(r.code, Some(8), "{r:#?}");
    assert!(r.stderr.contains("replayed offer"), "{r:#?}");
    assert!(!r.stderr.contains("signature"), "{r:#?}");
    rows.push(Row {
        case: "11f replay the Offered with a broken signature to a restarted receiver".into(),
        receiver: format!(
            "{} (refused by the seen id before the signature was checked)",
            describe(&r, &receiver_why(&r))
        ),
        sender: "none (the replay needs no sender)".into(),
        final_present: yes(out.join("report.bin").exists()),
        temp_removed: temp_files(out.path()).is_empty(),
    });
    rows
}

fn case_12_peer_key() -> Vec<Row> {
    let mut rows = Vec::new();
    let mallory = spki("mallory");

    // a) alice already pinned bob's real key (one honest transfer first).
    let w = World::new(Hooks::pass_through());
    w.honest_transfer();
    let pins = PinStore::new(w.alice.dir.join("known_peers"));
    assert_eq!(pins.get("bob").unwrap().unwrap().fingerprint, fp("bob"));
    let hits = Hits::default();
    let (h, key) = (hits.clone(), mallory.clone());
    w.broker
        .set_hooks(Hooks::pass_through().peer_key(move |name, real| {
            if name == "bob" {
                h.hit();
                key.clone()
            } else {
                real
            }
        }));
    let bob = w.bob_once(w.out.path());
    let file = w.file("data.bin", SIZE, 12);
    let s = finish_within(w.broker.sender(&w.alice, "bob", &file, &[]), EXIT_WAIT);
    // Give a (wrongly) sent offer time to reach the receiver before looking.
    std::thread::sleep(Duration::from_millis(300));
    let r = finish_within(bob, Duration::ZERO);
    let ctx = format!("receiver: {r:#?}\nsender: {s:#?}");
    assert!(hits.count() > 0, "{ctx}");
    assert_eq!(s.code, Some(6), "{ctx}");
    assert!(s.stderr.contains("KEY MISMATCH for bob"), "{ctx}");
    assert!(
        s.stderr.contains(&fp("bob").to_string()) && s.stderr.contains(&fp("mallory").to_string()),
        "{ctx}"
    );
    // Nothing was sent: the broker saw no offer after the honest one.
    assert_eq!(w.broker.records().len(), 1, "{ctx}");
    assert!(!r.stderr.contains("transfer"), "{ctx}");
    assert_eq!(pins.get("bob").unwrap().unwrap().fingerprint, fp("bob"));
    assert!(visible_files(w.out.path()).is_empty());
    rows.push(Row {
        case: "12a PeerKey says mallory's key for bob; alice had pinned bob".into(),
        receiver: "nothing arrived (no offer was made); stopped by the test".into(),
        sender: format!("{} — no offer sent", describe(&s, &agent_why(&s))),
        final_present: yes(w.out.join("data.bin").exists()),
        temp_removed: temp_files(w.out.path()).is_empty(),
    });

    // b) First contact: the known limit of trust on first use.
    let hits = Hits::default();
    let (h, key) = (hits.clone(), mallory.clone());
    let w = World::new(Hooks::pass_through().peer_key(move |name, real| {
        if name == "bob" {
            h.hit();
            key.clone()
        } else {
            real
        }
    }));
    let (r, s) = w.attack("data.bin", SIZE, &[]);
    assert!(hits.count() > 0);
    let mut row = refused(
        "12b same on FIRST contact (known TOFU limit)",
        &r,
        &format!(
            "refused transfer {} from alice: the offer is addressed to bob with key {}, not to this agent",
            w.broker.records()[0].tid,
            fp("mallory")
        ),
        &s,
        SENDER_REFUSED,
        w.out.path(),
        "data.bin",
    );
    // alice printed and pinned mallory's key as bob's...
    assert!(
        s.stderr
            .contains(&format!("NEW KEY for bob {}", fp("mallory"))),
        "{s:#?}"
    );
    let pinned = PinStore::new(w.alice.dir.join("known_peers"))
        .get("bob")
        .unwrap()
        .unwrap();
    assert_eq!(pinned.fingerprint, fp("mallory"));
    // ...and a broker holding mallory's key can open the offer (the size),
    // though not bob's copy of anything: bob could not decrypt, so no data flowed.
    let Message::Offered { offer, .. } = &w.broker.records()[0].offered else {
        unreachable!()
    };
    let opened = handshake::verify_offer(
        offer,
        identity("alice").public(),
        &AgentName::new("bob").unwrap(),
        fp("mallory"),
        now_unix(),
        DEFAULT_TIME_WINDOW_SECS,
    )
    .unwrap()
    .open(&identity("mallory"))
    .unwrap();
    assert_eq!(opened.terms().size, SIZE as u64);
    row.sender = format!(
        "{} — but alice has now PINNED mallory's key for bob, and the broker, holding \
         mallory's key, opened the offer (read its size, {SIZE} bytes; names travel only \
         under the stream keys, which it could have had by accepting in bob's place)",
        row.sender
    );
    rows.push(row);
    rows
}

fn case_13_sender_key() -> Vec<Row> {
    let mut rows = Vec::new();
    for pinned in [true, false] {
        let hits = Hits::default();
        let h = hits.clone();
        let mallory = spki("mallory");
        let w = World::new(Hooks::pass_through().offered(move |m| match m {
            Message::Offered { from, offer, .. } => {
                h.hit();
                Message::Offered {
                    from,
                    spki: mallory.clone(),
                    offer,
                }
            }
            m => m,
        }));
        if pinned {
            // bob knows alice's real key (written as a pin file, 2 days old).
            PinStore::new(w.bob.dir.join("known_peers"))
                .check_or_pin("alice", fp("alice"), now_unix() - 2 * 86400)
                .unwrap();
        }
        let (r, s) = w.attack("data.bin", SIZE, &[]);
        assert!(hits.count() > 0);
        let bob_pin = PinStore::new(w.bob.dir.join("known_peers"))
            .get("alice")
            .unwrap();
        let row = if pinned {
            assert_eq!(bob_pin.map(|p| p.fingerprint), Some(fp("alice")));
            // A refused offer is exit 8 for a --once receiver, as the README says.
            assert_eq!(r.code, Some(8), "{r:#?}");
            refused(
                "13a Offered carries mallory's key as alice's; bob had pinned alice",
                &r,
                &format!(
                    "KEY MISMATCH for alice: pinned {}, but it now presents {}",
                    fp("alice"),
                    fp("mallory")
                ),
                &s,
                &[(
                    8,
                    "bob refused the transfer: your key does not match the one it pinned for you",
                )],
                w.out.path(),
                "data.bin",
            )
        } else {
            // First contact: the offer, signed by alice, names alice's
            // fingerprint, so bob refuses the broker's key before pinning it.
            assert_eq!(
                bob_pin, None,
                "a key the offer contradicts must not be pinned"
            );
            refused(
                "13b same, bob had no pin for alice (first contact)",
                &r,
                "but the signed offer names",
                &s,
                SENDER_REFUSED,
                w.out.path(),
                "data.bin",
            )
        };
        rows.push(row);
    }
    rows
}

/// A well-formed sealed record (IV, 48 bytes of ciphertext, tag) of random
/// bytes: what a broker without the keys can forge at best.
fn forged_record() -> Vec<u8> {
    let mut r = random_array::<16>().to_vec();
    r.extend_from_slice(&48u32.to_be_bytes());
    r.extend_from_slice(&random_array::<48>());
    r.extend_from_slice(&random_array::<32>());
    r
}

fn case_14_forgeries() -> Vec<Row> {
    let mut rows = Vec::new();

    // a) The broker swallows the stream and tells the sender it arrived.
    let hits = Hits::default();
    let h = hits.clone();
    let hooks = Hooks::pass_through().forward(move |flow, m| match m {
        Message::Trailer { .. } => {
            h.hit();
            vec![
                Action::Reply(Message::Receipt {
                    transfer_id: flow.tid,
                    tag: random_array(),
                }),
                Action::Close,
            ]
        }
        _ => vec![],
    });
    rows.push(stream_attack(
        "14a forged Receipt (random tag) to the sender; nothing relayed",
        hooks,
        &hits,
        SIZE,
        &[],
        TRUNCATED,
        &[(
            9,
            "the receipt does not confirm the length and SHA-256 we sent",
        )],
    ));

    // b) The real trailer replaced by a forged one.
    let hits = Hits::default();
    let h = hits.clone();
    let hooks = Hooks::pass_through().forward(move |flow, m| match m {
        Message::Trailer { .. } => {
            h.hit();
            vec![Action::Pass(Message::Trailer {
                stream_id: flow.sid,
                record: forged_record(),
            })]
        }
        m => vec![Action::Pass(m)],
    });
    rows.push(stream_attack(
        "14b forged Trailer (random) in place of the real one",
        hooks,
        &hits,
        SIZE,
        &[],
        AUTH,
        SENDER_ABORTED,
    ));

    // c) "It is finished": a forged trailer right after the accept, no data.
    let hits = Hits::default();
    let h = hits.clone();
    let hooks = Hooks::pass_through().forward(move |flow, m| match m {
        Message::Chunk { .. } if flow.chunks_seen == 0 => {
            h.hit();
            vec![Action::Pass(Message::Trailer {
                stream_id: flow.sid,
                record: forged_record(),
            })]
        }
        _ => vec![],
    });
    rows.push(stream_attack(
        "14c forged Trailer right after the accept, no chunks relayed",
        hooks,
        &hits,
        SIZE,
        &[],
        "trailer before the last chunk",
        SENDER_ABORTED,
    ));
    rows
}

/// Where the ML-KEM encapsulation key lies in an offer from alice to bob.
const EK_AT: std::ops::Range<usize> = {
    let start = 2 + 16 + 16 + (4 + 5) + 32 + (4 + 3) + 32 + 8 + 32 + 32;
    start..start + 1184
};

fn case_15_mlkem() -> Vec<Row> {
    vec![
        offer_attack(
            "15a swap the ML-KEM-768 key in the offer for the broker's own",
            |body, _| {
                let ek = keyferry_common::crypto::kem::KemKeyPair::generate();
                body[EK_AT].copy_from_slice(ek.encapsulation_key());
            },
        ),
        offer_attack_says(
            "15b strip the ML-KEM-768 key from the offer",
            "unreadable offer: malformed offer",
            |body, _| {
                body.drain(EK_AT);
            },
        ),
    ]
}

/// The receiver's accept changed on its way to the sender: the sender
/// refuses it and sends nothing of the stream, only the `Abort` that tells
/// the receiver waiting on the relay at once.
fn accept_attack(case: &str, f: impl FnMut(Vec<u8>) -> Vec<u8> + Send + 'static) -> Row {
    let hits = Hits::default();
    let h = hits.clone();
    let mut f = f;
    let hooks = Hooks::pass_through().accept(move |a| {
        h.hit();
        f(a)
    });
    stream_attack(
        case,
        hooks,
        &hits,
        SIZE,
        &[],
        "the sender refused this receiver's accept",
        &[(9, "the receiver's accept did not verify")],
    )
}

/// Where the fields of an accept lie (PROTOCOL.md §3.3).
const CT_AT: std::ops::Range<usize> = 64..64 + 1088;
const OFFSET_AT: usize = 64 + 1088;

fn case_16_accept() -> Vec<Row> {
    // A completed transfer's accept, recorded for the replay (16d).
    let recorded: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
    let r = Arc::clone(&recorded);
    let w = World::new(Hooks::pass_through().accept(move |a| {
        *r.lock().unwrap() = Some(a.clone());
        a
    }));
    let (r, s) = w.attack("first.bin", 1000, &[]);
    assert_eq!((r.code, s.code), (Some(0), Some(0)), "{r:#?}\n{s:#?}");
    let old = recorded.lock().unwrap().clone().unwrap();
    vec![
        accept_attack(
            "16a change the resume offset in the accept (claim 1 MiB held)",
            |mut a| {
                a[OFFSET_AT + 5] ^= 0x10;
                a
            },
        ),
        accept_attack(
            "16b flip a bit in the accept's ML-KEM ciphertext",
            |mut a| {
                a[CT_AT.start + 500] ^= 1;
                a
            },
        ),
        accept_attack(
            "16c strip the ML-KEM ciphertext from the accept",
            |mut a| {
                a.drain(CT_AT);
                a
            },
        ),
        accept_attack("16d replay an accept of an earlier transfer", move |_| {
            old.clone()
        }),
    ]
}

/// A forward hook that applies `f` to the first message `pick` selects and
/// passes everything else.
fn on_first(hits: &Hits, pick: fn(&Message) -> bool, f: fn(Message) -> Vec<Action>) -> Hooks {
    let h = hits.clone();
    Hooks::pass_through().forward(move |_, m| {
        if pick(&m) && h.count() == 0 {
            h.hit();
            f(m)
        } else {
            vec![Action::Pass(m)]
        }
    })
}

fn is_root(m: &Message) -> bool {
    matches!(m, Message::Root { .. })
}

fn is_manifest(m: &Message) -> bool {
    matches!(m, Message::Manifest { .. })
}

/// The head of the stream (the root sealed for bob, then the manifest)
/// altered, reordered or dropped.
fn case_17_head() -> Vec<Row> {
    let attack = |case: &str, says: &str, hits: &Hits, hooks: Hooks| {
        stream_attack(case, hooks, hits, SIZE, &[], says, SENDER_ABORTED)
    };
    let mut rows = Vec::new();
    let hits = Hits::default();
    let hooks = on_first(&hits, is_root, |m| vec![Action::Pass(flip(m, 30))]);
    rows.push(attack(
        "17a flip a bit in the root sealed for bob",
        AUTH,
        &hits,
        hooks,
    ));
    let hits = Hits::default();
    let hooks = on_first(&hits, is_manifest, |m| vec![Action::Pass(flip(m, 30))]);
    rows.push(attack("17b flip a bit in the manifest", AUTH, &hits, hooks));
    let hits = Hits::default();
    let hooks = on_first(&hits, is_manifest, |_| vec![]);
    rows.push(attack(
        "17d drop the manifest",
        "chunk before the stream's root and manifest",
        &hits,
        hooks,
    ));
    // The manifest before the root: the root is held back and sent after.
    let hits = Hits::default();
    let (h, held) = (hits.clone(), Arc::new(Mutex::new(None)));
    let hooks = Hooks::pass_through().forward(move |_, m| match m {
        Message::Root { .. } => {
            *held.lock().unwrap() = Some(m);
            vec![]
        }
        Message::Manifest { .. } => {
            h.hit();
            let root = held.lock().unwrap().take();
            [Some(m), root]
                .into_iter()
                .flatten()
                .map(Action::Pass)
                .collect()
        }
        m => vec![Action::Pass(m)],
    });
    rows.push(attack(
        "17c the manifest before the root",
        "manifest before the stream's root and manifest",
        &hits,
        hooks,
    ));
    rows
}

// ---------------------------------------------------------------------------
// The runner.

type Case = fn() -> Vec<Row>;
/// A case's label, its rows (or why it failed), and how long it took.
type Outcome = (&'static str, Result<Vec<Row>, String>, Duration);

const CASES: &[(&str, Case)] = &[
    // The slow, many-process cases first so the pool ends evenly.
    ("11", case_11_replay_offer),
    ("12", case_12_peer_key),
    ("10", case_10_splice),
    ("13", case_13_sender_key),
    ("14", case_14_forgeries),
    ("15", case_15_mlkem),
    ("16", case_16_accept),
    ("17", case_17_head),
    ("1", case_1_chunk_bit),
    ("3", case_3_offer_bits),
    ("2", case_2_key_update_bit),
    ("4", case_4_trailer_bit),
    ("5", case_5_receipt_bit),
    ("6", case_6_reorder),
    ("7", case_7_replay_chunk),
    ("8", case_8_drop_chunk),
    ("9", case_9_cut),
];

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "panic".into())
}

fn case_order(label: &str) -> (u32, String) {
    let digits: String = label.chars().take_while(char::is_ascii_digit).collect();
    (digits.parse().unwrap_or(0), label.to_owned())
}

#[test]
fn a_malicious_broker_is_caught_at_every_step() {
    let start = Instant::now();
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Outcome>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..WORKERS {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(label, case)) = CASES.get(i) else {
                        break;
                    };
                    let t = Instant::now();
                    let outcome = catch_unwind(AssertUnwindSafe(case)).map_err(panic_text);
                    results.lock().unwrap().push((label, outcome, t.elapsed()));
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap();
    results.sort_by_key(|(label, ..)| case_order(label));

    println!();
    println!(
        "| case | what the receiver did | what the sender did | final file present? | temp removed? |"
    );
    println!("|---|---|---|---|---|");
    let mut failures = Vec::new();
    for (label, outcome, took) in &results {
        match outcome {
            Ok(rows) => {
                for r in rows {
                    println!(
                        "| {} | {} | {} | {} | {} |",
                        r.case,
                        r.receiver.replace('|', "\\|"),
                        r.sender.replace('|', "\\|"),
                        r.final_present,
                        yes(r.temp_removed)
                    );
                }
            }
            Err(why) => {
                println!("| {label} | **FAILED** | | | |");
                failures.push(format!("case {label} ({took:.1?}): {why}"));
            }
        }
    }
    println!();
    for (label, _, took) in &results {
        println!("case {label}: {took:.1?}");
    }
    println!("malicious-broker suite: {:.1?}", start.elapsed());
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
