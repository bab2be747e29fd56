//! Transfers for a receiver who is offline (`--store`, PROTOCOL.md §2.8,
//! §3.4), driven as users would: the real binaries on 127.0.0.1, real files.
//! The broker keeps only ciphertext; the receiver gets the file when it
//! connects; the sender's receipts verify; the used prekey is gone, and with
//! it every way to open the stored bytes (shown with the project's own code);
//! a replay, the limits, expiry, withdrawal, a drained prekey supply, a
//! receiver's policy, and a broker restarted during and after an upload.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

mod support;

use std::fs;
use std::io::Read as _;
use std::path::Path;
use std::time::Duration;

use keyferry_agent::home::load_identity;
use keyferry_agent::mailbox::prekeys::Prekeys;
use keyferry_broker::mailbox::{Mailbox, MailboxLimits};
use keyferry_common::handshake::stored::{parse_stored, verify_stored};
use keyferry_common::identity::Identity;
use keyferry_common::name::AgentName;
use keyferry_common::transfer::{Expect, RecvStream};
use keyferry_common::wire::message::{Message, SignedOffer, decode_payload};
use support::stored::{
    MARKER, bytes_under, contains, deposit_prekeys, files_under, marker_file, receipts, store,
    stored_event, wait_until,
};
use support::{Broker, Home, Proc, TempDir, WAIT, hash_file};

fn name(s: &str) -> AgentName {
    AgentName::new(s).unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap().flatten() {
        let (src, dst) = (e.path(), to.join(e.file_name()));
        if src.is_dir() {
            copy_dir(&src, &dst);
        } else {
            fs::copy(&src, &dst).unwrap();
        }
    }
}

/// A thief's try at the stored transfer `id` in the kept copy `kept` of a
/// broker's mailbox: bob's identity key, the stored offer and data, and every
/// prekey bob's home still holds. Returns how many keys were tried; panics
/// if any of them opens the stream's root, or if the prekey it was sealed
/// to, from `control` (a copy of bob's prekeys made before the delivery),
/// does not: the test itself must be able to open what it says stays shut.
fn thief_tries(kept: &Path, bob_home: &Path, control: &Path, alice: &Identity) -> usize {
    let mailbox = Mailbox::open(kept, MailboxLimits::defaults_for(kept)).unwrap();
    let metas = mailbox.waiting_for(&name("bob"), 0);
    let meta = metas
        .first()
        .expect("the kept copy holds the stored transfer");
    let offer = SignedOffer {
        body: meta.offer_body.clone(),
        signature: meta.offer_signature.clone(),
    };
    let mut data = Vec::new();
    mailbox
        .open_data(&meta.id)
        .unwrap()
        .read_to_end(&mut data)
        .unwrap();
    let len = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
    let root = data[4..4 + len].to_vec();
    assert!(matches!(
        decode_payload(&root).unwrap(),
        Message::Root { .. }
    ));
    let bob = load_identity(&bob_home.join("identity.pem")).unwrap();
    let fields = parse_stored(&offer).unwrap();
    let expect = |size| Expect {
        declared: size,
        size_known: true,
        resume: None,
        sender: alice.public().clone(),
        me: name("bob"),
        my_fp: bob.fingerprint(),
        receivers: 1,
        trust_sender_hash: false,
    };
    let at = meta.stored_at;
    let verify = || verify_stored(&offer, alice.public(), &name("bob"), bob.fingerprint(), at);
    // The positive control: with the deleted prekey, the root opens.
    let (bundle, keys) = Prekeys::open(control)
        .unwrap()
        .load(&fields.bundle_id)
        .unwrap()
        .expect("the copy holds the prekey the transfer was sealed to");
    let (terms, pair) = verify().unwrap().open(&bob, &bundle, &keys).unwrap();
    let mut payload = root.clone();
    assert!(
        RecvStream::new(pair, expect(terms.size))
            .open(&mut payload)
            .is_ok()
    );
    let prekeys = Prekeys::open(bob_home).unwrap();
    // The prekey the transfer was sealed to is gone from bob's home.
    assert!(prekeys.load(&fields.bundle_id).unwrap().is_none());
    let mut tried = 0;
    for entry in fs::read_dir(prekeys.dir()).unwrap().flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        assert_eq!(file.len(), 32, "a prekey file's name is its id: {file}");
        let id: [u8; 16] = hex_id(&file);
        let (mut bundle, keys) = prekeys.load(&id).unwrap().unwrap();
        // The thief's best guess: the offer's bundle id with another
        // prekey's halves. The identity key still opens the terms (they are
        // under RSA alone); the stream's keys need the deleted prekey.
        bundle.id = fields.bundle_id;
        let (terms, pair) = verify().unwrap().open(&bob, &bundle, &keys).unwrap();
        let mut payload = root.clone();
        assert!(
            RecvStream::new(pair, expect(terms.size))
                .open(&mut payload)
                .is_err(),
            "prekey {} opened the stored stream",
            hex_name(&id)
        );
        tried += 1;
    }
    tried
}

fn hex_id(s: &str) -> [u8; 16] {
    let bytes: Vec<u8> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect();
    bytes.try_into().unwrap()
}

fn hex_name(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

fn fixture(name: &str) -> Identity {
    let path = format!(
        "{}/../common/tests/fixtures/{name}.pem",
        env!("CARGO_MANIFEST_DIR")
    );
    Identity::from_pkcs8_pem(&fs::read_to_string(path).unwrap())
        .unwrap()
        .unwrap()
}

#[test]
fn a_transfer_stored_for_an_offline_receiver_arrives_and_only_then_and_never_twice() {
    let mut broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let (src, out, kept) = (
        TempDir::new("src"),
        TempDir::new("out"),
        TempDir::new("kept"),
    );
    deposit_prekeys(&mut broker, &bob, out.path());

    // 256 MiB of a marker string, which must never appear at the broker.
    let file = src.join("big.iso");
    marker_file(&file, 256);
    let sent = hash_file(&file);
    let run = store(&alice, &broker, "bob", &["--file", file.to_str().unwrap()]);
    let event = stored_event(&run);
    assert!(
        run.stderr
            .contains("bob is offline: stored for delivery (id "),
        "{run:?}"
    );
    let id = event["transfer_id"].as_str().unwrap().to_owned();
    assert_eq!(event["sha256"], sent.1);
    assert_eq!(event["last_resort"], false);
    let mailbox = broker.data.join("mailbox");
    assert!(
        !contains(broker.data.path(), &MARKER[..24]),
        "plaintext at the broker"
    );
    assert!(
        bytes_under(&mailbox) > 256 << 20,
        "the broker holds the sealed stream"
    );
    // A thief keeps the broker's bytes for later; the test keeps bob's
    // prekeys as they are now, for its positive control.
    copy_dir(&mailbox, kept.path());
    let control = TempDir::new("control");
    copy_dir(&bob.dir.join("prekeys"), &control.join("prekeys"));
    // Before bob comes back, the receipt says it waits.
    let list = receipts(&alice, &broker);
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["state"], "waiting");

    // A stored delivery comes over one connection, whatever --streams says.
    let mut rx = bob.receiver(&broker, out.path(), &["--json", "--streams", "3"]);
    let line = rx.stdout.wait_for("\"event\":\"received\"", WAIT);
    let got: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(got["stored"], true);
    assert_eq!(got["transfer_id"], id.as_str());
    assert_eq!(hash_file(&out.join("big.iso")), sent);
    broker.proc.stderr.wait_for("stored transfer ended", WAIT);
    rx.kill();
    // Delivered, and nothing of it left at the broker.
    assert!(files_under(&mailbox.join("objects")).is_empty());
    let list = receipts(&alice, &broker);
    assert_eq!(list[0]["state"], "delivered", "{list:?}");
    assert_eq!(list[0]["verified"], true, "{list:?}");
    assert_eq!(list[0]["sha256"], sent.1);
    assert_eq!(list[0]["bytes"], 256 << 20);

    // Forward secrecy: bob's identity key and the kept bytes open nothing.
    let tried = thief_tries(
        kept.path(),
        bob.dir.path(),
        control.path(),
        &fixture("alice"),
    );
    assert!(tried >= 15, "the other prekeys were tried too ({tried})");

    // The broker offers it again, as if bob's receipt had been lost on the
    // way (its mailbox as it was before the delivery), to a new run of bob's
    // receiver — one that had stopped before it deleted the used prekey (put
    // back here): bob sends the receipt he kept in his home, deletes that
    // prekey now, and places nothing twice; alice reads "delivered",
    // verified.
    let held = |dir: &Path| support::names_in(&dir.join("prekeys"));
    let used: Vec<String> = held(control.path())
        .into_iter()
        .filter(|n| !held(bob.dir.path()).contains(n))
        .collect();
    assert_eq!(used.len(), 1, "{used:?}");
    let used = format!("prekeys/{}", used[0]);
    fs::copy(control.join(&used), bob.dir.join(&used)).unwrap();
    let replay = |broker: Broker| {
        let (data, addr) = (broker.data, broker.addr.clone());
        let mut old = broker.proc;
        old.kill();
        fs::remove_dir_all(data.join("mailbox")).unwrap();
        copy_dir(kept.path(), &data.join("mailbox"));
        Broker::start_at(data, &addr)
    };
    let mut broker = replay(broker);
    let mut rx = bob.receiver(&broker, out.path(), &["--json"]);
    broker.proc.stderr.wait_for("stored transfer ended", WAIT);
    rx.kill();
    assert_eq!(support::names_in(out.path()), vec!["big.iso".to_owned()]);
    assert!(
        !bob.dir.join(&used).exists(),
        "the used prekey is deleted now"
    );
    let list = receipts(&alice, &broker);
    assert_eq!(list[0]["state"], "delivered", "{list:?}");
    assert_eq!(list[0]["verified"], true, "{list:?}");

    // Replayed again to a bob whose home lost that receipt: he refuses it
    // (the one-time prekey it was sealed to is gone), and nothing is placed
    // twice.
    fs::remove_dir_all(bob.dir.join("stored-receipts")).unwrap();
    let mut broker = replay(broker);
    let mut rx = bob.receiver(&broker, out.path(), &["--json"]);
    let line = rx.stdout.wait_for("\"event\":\"refused\"", WAIT);
    assert!(line.contains("no longer holds"), "{line}");
    broker.proc.stderr.wait_for("stored transfer ended", WAIT);
    rx.kill();
    assert_eq!(support::names_in(out.path()), vec!["big.iso".to_owned()]);
    // Bob signed nothing about the replay: the broker's "refused" is its
    // own word, and alice is told so.
    let list = receipts(&alice, &broker);
    assert_eq!(list[0]["state"], "refused", "{list:?}");
    assert_eq!(list[0]["verified"], false, "{list:?}");
}

/// The texts of the first `n` stored messages the receiver `rx` reports
/// (`--json`), in the order they came.
fn stored_messages(rx: &mut Proc, n: usize, within: Duration) -> Vec<String> {
    let mut texts = Vec::new();
    wait_until(&format!("{n} messages"), within, || {
        texts = rx
            .stdout
            .drain()
            .iter()
            .filter(|l| l.contains("\"event\":\"message\""))
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .inspect(|v| assert_eq!(v["stored"], true))
            .map(|v| v["text"].as_str().unwrap().to_owned())
            .collect();
        texts.len() >= n
    });
    texts
}

/// Waits `for_` and says whether bob's receiver printed any event meanwhile.
fn quiet_for(rx: &mut Proc, for_: Duration) -> Vec<String> {
    std::thread::sleep(for_);
    rx.stdout
        .drain()
        .iter()
        .filter(|l| l.starts_with('{'))
        .cloned()
        .collect()
}

#[test]
fn a_limit_is_said_before_any_byte_moves_and_without_store_offline_is_exit_5() {
    let mut broker = Broker::start_with(TempDir::new("broker"), &["--store-per-receiver", "1MiB"]);
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    deposit_prekeys(&mut broker, &bob, out.path());
    let file = src.join("two.bin");
    fs::write(&file, support::pseudo_random(2 << 20, 7)).unwrap();
    let f = file.to_str().unwrap();
    // Without --store: offline, with the hint.
    let run = alice.run(&broker, &["--role", "sender", "--to", "bob", "--file", f]);
    assert_eq!(run.code, Some(5), "{run:?}");
    assert!(run.stderr.contains("--store"), "{run:?}");
    // Over the broker's limit for bob: told with both numbers, nothing stored.
    let run = store(&alice, &broker, "bob", &["--file", f]);
    assert_eq!(run.code, Some(8), "{run:?}");
    assert!(
        run.stderr.contains("will not store it")
            && run.stderr.contains("at most 1048576 bytes for bob"),
        "{run:?}"
    );
    assert!(files_under(&broker.data.join("mailbox/objects")).is_empty());
    // What fits is stored.
    let run = store(&alice, &broker, "bob", &["--message", "hello later"]);
    stored_event(&run);
    // With bob online, --store is the live transfer: the mailbox's limit
    // does not apply, nothing more is stored, the receipt comes at once.
    let mut rx = bob.receiver(&broker, out.path(), &[]);
    rx.stdout.wait_for("hello later", WAIT);
    let run = store(&alice, &broker, "bob", &["--file", f]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let report = support::json(&run);
    assert_eq!(
        (&report["peer"], &report["sha256"]),
        (&"bob".into(), &hash_file(&file).1.into()),
        "{run:?}"
    );
    rx.stdout.wait_for("received two.bin", WAIT);
    assert_eq!(
        fs::read(out.join("two.bin")).unwrap(),
        fs::read(&file).unwrap()
    );
    assert!(files_under(&broker.data.join("mailbox/objects")).is_empty());
}

#[test]
fn an_expired_transfer_is_deleted_and_a_withdrawn_one_never_arrives() {
    let mut broker = Broker::start_with(TempDir::new("broker"), &["--store-max-age", "3s"]);
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let out = TempDir::new("out");
    deposit_prekeys(&mut broker, &bob, out.path());
    let expiring = stored_event(&store(&alice, &broker, "bob", &["--message", "soon gone"]));
    let objects = broker.data.join("mailbox/objects");
    broker.proc.stderr.wait_for("expired undelivered", WAIT);
    assert!(files_under(&objects).is_empty());
    // Its record is kept as long again (3 s here): asked at once.
    let list = receipts(&alice, &broker);
    assert_eq!(list[0]["transfer_id"], expiring["transfer_id"], "{list:?}");
    assert_eq!(list[0]["state"], "expired", "{list:?}");
    let withdrawn = stored_event(&store(&alice, &broker, "bob", &["--message", "never mind"]));
    let id = withdrawn["transfer_id"].as_str().unwrap();
    let run = alice.run(&broker, &["--withdraw", id]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains("will not be delivered"), "{run:?}");
    assert!(files_under(&objects).is_empty());
    // Withdrawn once is withdrawn: a second try is refused.
    let again = alice.run(&broker, &["--withdraw", id]);
    assert_ne!(again.code, Some(0), "{again:?}");
    let list = receipts(&alice, &broker);
    let state = |want: &serde_json::Value| {
        list.iter()
            .find(|e| e["transfer_id"] == want["transfer_id"])
            .map(|e| e["state"].clone())
    };
    assert_eq!(state(&withdrawn), Some("withdrawn".into()), "{list:?}");
    // Bob comes back to nothing.
    let mut rx = bob.receiver(&broker, out.path(), &["--json"]);
    assert!(quiet_for(&mut rx, Duration::from_secs(3)).is_empty());
    assert!(support::names_in(out.path()).is_empty());
}

#[test]
fn a_receiver_whose_policy_refuses_the_sender_signs_a_refused_receipt() {
    let mut broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let out = TempDir::new("out");
    deposit_prekeys(&mut broker, &bob, out.path());
    stored_event(&store(&alice, &broker, "bob", &["--message", "let me in"]));
    let mut rx = bob.receiver(&broker, out.path(), &["--json", "--accept-from", "carol"]);
    let line = rx.stdout.wait_for("\"event\":\"refused\"", WAIT);
    assert!(line.contains("alice"), "{line}");
    broker.proc.stderr.wait_for("stored transfer ended", WAIT);
    assert!(support::names_in(out.path()).is_empty());
    let list = receipts(&alice, &broker);
    assert_eq!(list[0]["state"], "refused", "{list:?}");
    assert_eq!(list[0]["verified"], true, "{list:?}");
    assert_eq!(
        list[0]["why"],
        "bob takes transfers only from senders it names"
    );
}

#[test]
fn a_fetch_loop_is_rate_limited_and_the_last_resort_prekey_is_said_on_both_sides() {
    let mut broker = Broker::start_with(
        TempDir::new("broker"),
        &["--prekey-fetches-per-minute", "17"],
    );
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let out = TempDir::new("out");
    deposit_prekeys(&mut broker, &bob, out.path());
    // A key pinned for a day may have bob decrypt 30 offers a minute, a new
    // one 6 (PROTOCOL.md §9): stored or live, the same RSA budget holds.
    support::known_for_two_days(&alice, &bob);
    // Sixteen one-time prekeys, then the last resort (kept for the next).
    for i in 0..16 {
        let e = stored_event(&store(
            &alice,
            &broker,
            "bob",
            &["--message", &format!("m{i}")],
        ));
        assert_eq!(e["last_resort"], false);
    }
    let run = store(&alice, &broker, "bob", &["--message", "m16"]);
    let e = stored_event(&run);
    assert_eq!(e["last_resort"], true);
    assert!(run.stderr.contains("last-resort prekey"), "{run:?}");
    // Kept aside, to be replayed once delivered.
    let kept = TempDir::new("kept");
    copy_dir(&broker.data.join("mailbox"), kept.path());
    // The eighteenth fetch in a minute is refused.
    let run = store(&alice, &broker, "bob", &["--message", "m17"]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("too many prekey fetches"), "{run:?}");
    // Bob gets all seventeen, oldest first, and says which one was weaker.
    let mut rx = bob.receiver(&broker, out.path(), &["--json"]);
    let texts = stored_messages(&mut rx, 17, WAIT);
    let want: Vec<String> = (0..17).map(|i| format!("m{i}")).collect();
    assert_eq!(texts, want);
    rx.stderr.wait_for("last-resort prekey", WAIT);
    // Every one ended at the broker: bob is done with each (its prekey
    // deleted or its id recorded) before its receipt goes.
    wait_until("seventeen ends", WAIT, || {
        let ended = broker.proc.stderr.drain();
        ended
            .iter()
            .filter(|l| l.contains("stored transfer ended"))
            .count()
            >= 17
    });
    rx.kill();
    // A broker that replays them, to a bob whose home lost the receipts he
    // signed (with them he would just send those again): the last-resort
    // prekey is still there, so bob's record of what was sealed to it
    // refuses m16; the others find their one-time prekeys gone. Nothing
    // arrives twice.
    fs::remove_dir_all(bob.dir.join("stored-receipts")).unwrap();
    let (data, addr) = (broker.data, broker.addr.clone());
    let mut old = broker.proc;
    old.kill();
    fs::remove_dir_all(data.join("mailbox")).unwrap();
    copy_dir(kept.path(), &data.join("mailbox"));
    let broker = Broker::start_at(data, &addr);
    let mut rx = bob.receiver(&broker, out.path(), &["--json"]);
    let mut refused = 0;
    wait_until("seventeen refusals", WAIT, || {
        refused = rx
            .stdout
            .drain()
            .iter()
            .filter(|l| l.contains("\"event\":\"refused\""))
            .count();
        refused >= 17
    });
    let line = rx.stdout.wait_for("already seen", WAIT);
    assert!(line.contains("refused"), "{line}");
    assert!(quiet_for(&mut rx, Duration::from_millis(500)).len() == 17);
}

#[test]
fn a_broker_restarted_mid_upload_offers_nothing_and_one_restarted_after_delivers() {
    let mut broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let out = TempDir::new("out");
    deposit_prekeys(&mut broker, &bob, out.path());
    let (mut sender, mut input) =
        alice.pipe_sender(&broker, "bob", "p.bin", &["--store", "--max-size", "64MiB"]);
    let block = support::pseudo_random(1 << 20, 3);
    for _ in 0..4 {
        std::io::Write::write_all(&mut input, &block).unwrap();
    }
    let objects = broker.data.join("mailbox/objects");
    wait_until("the upload to begin", WAIT, || {
        files_under(&objects).iter().any(|p| {
            p.extension().is_some_and(|e| e == "part") && fs::metadata(p).unwrap().len() > 1 << 20
        })
    });
    let (data, addr) = (broker.data, broker.addr.clone());
    let mut old = broker.proc;
    old.kill();
    drop(input);
    assert_ne!(sender.wait(WAIT), Some(12));
    let mut broker = Broker::start_at(data, &addr);
    assert!(files_under(&broker.data.join("mailbox/objects")).is_empty());
    let mut rx = bob.receiver(&broker, out.path(), &["--json"]);
    assert!(quiet_for(&mut rx, Duration::from_secs(2)).is_empty());
    rx.kill();
    broker.proc.stderr.wait_for("receiver offline", WAIT);
    // Stored whole, then a restart: still delivered.
    stored_event(&store(
        &alice,
        &broker,
        "bob",
        &["--message", "after the restart"],
    ));
    let (data, addr) = (broker.data, broker.addr.clone());
    let mut old = broker.proc;
    old.kill();
    let broker = Broker::start_at(data, &addr);
    let mut rx = bob.receiver(&broker, out.path(), &["--json"]);
    let line = rx.stdout.wait_for("\"event\":\"message\"", WAIT);
    assert!(line.contains("after the restart"), "{line}");
}

#[test]
fn a_stored_transfer_refused_for_now_is_offered_again_and_arrives() {
    let mut broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let out = TempDir::new("out");
    deposit_prekeys(&mut broker, &bob, out.path());
    // A key bob has just met may make him decrypt 6 offers a minute: the
    // seventh stored one is "not now" (TryLater), and must not be taken for
    // a replay when the broker offers it again a minute later.
    for i in 0..7 {
        stored_event(&store(
            &alice,
            &broker,
            "bob",
            &["--message", &format!("n{i}")],
        ));
    }
    let mut rx = bob.receiver(&broker, out.path(), &["--json"]);
    rx.stderr.wait_for("the broker keeps it", WAIT);
    // The budget frees a place 60 s after its first decryption.
    let mut texts = stored_messages(&mut rx, 7, WAIT + Duration::from_secs(60));
    texts.sort();
    let want: Vec<String> = (0..7).map(|i| format!("n{i}")).collect();
    assert_eq!(texts, want);
    // The last receipt reaches the broker a moment after the message shows.
    wait_until("seven verified receipts", WAIT, || {
        receipts(&alice, &broker)
            .iter()
            .all(|e| e["state"] == "delivered" && e["verified"] == true)
    });
}

#[test]
fn a_receiver_on_a_terminal_is_asked_about_a_stored_transfer_and_no_leaves_nothing() {
    let mut broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    deposit_prekeys(&mut broker, &bob, out.path());
    let (yes, no) = (src.join("yes.bin"), src.join("no.bin"));
    fs::write(&yes, support::pseudo_random(3 << 20, 1)).unwrap();
    fs::write(&no, support::pseudo_random(3 << 20, 2)).unwrap();
    for f in [&no, &yes] {
        stored_event(&store(
            &alice,
            &broker,
            "bob",
            &["--file", f.to_str().unwrap()],
        ));
    }
    // Bob at a terminal: asked about each, as for a live offer, although
    // the broker sends the data without waiting for his answer.
    let mut cmd = bob.command(&broker);
    cmd.args([
        "--role",
        "receiver",
        "--out-dir",
        out.path().to_str().unwrap(),
    ]);
    let mut rx = support::pty::Pty::spawn(cmd);
    rx.wait_for("offers no.bin (1 file, 3.00 MiB). Accept? [y/N]", WAIT);
    rx.line("n");
    rx.wait_for("offers yes.bin (1 file, 3.00 MiB). Accept? [y/N]", WAIT);
    rx.line("y");
    rx.wait_for("received yes.bin", WAIT);
    assert_eq!(support::finals(out.path()), ["yes.bin"]);
    assert_eq!(hash_file(&out.join("yes.bin")), hash_file(&yes));
    // Both receipts at the broker (the second a moment after it showed).
    let mut list = Vec::new();
    wait_until("both receipts", WAIT, || {
        list = receipts(&alice, &broker);
        list.iter().all(|e| e["state"] != "waiting")
    });
    let by_state = |s: &str| list.iter().filter(|e| e["state"] == s).count();
    assert_eq!(
        (by_state("delivered"), by_state("refused")),
        (1, 1),
        "{list:?}"
    );
    let refused = list.iter().find(|e| e["state"] == "refused").unwrap();
    assert_eq!(refused["verified"], true, "{list:?}");
    assert_eq!(refused["why"], "bob declined");
}

#[test]
fn a_stored_delivery_cut_half_way_keeps_no_prefix_and_comes_again_whole() {
    let mut broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    deposit_prekeys(&mut broker, &bob, out.path());
    let file = src.join("cut.iso");
    marker_file(&file, 128);
    stored_event(&store(
        &alice,
        &broker,
        "bob",
        &["--file", file.to_str().unwrap()],
    ));
    // The broker dies while bob is being sent it.
    let mut rx = bob.receiver(&broker, out.path(), &["--json"]);
    support::wait_for_data(rx.child.id(), out.path(), 8 << 20);
    let (data, addr) = (broker.data, broker.addr.clone());
    let mut old = broker.proc;
    old.kill();
    let line = rx.stdout.wait_for("\"event\":\"failed\"", WAIT);
    assert!(line.contains("cut.iso") || line.contains("alice"), "{line}");
    // A stored transfer comes again whole: nothing of it is kept meanwhile.
    assert!(
        support::names_in(out.path()).is_empty(),
        "{:?}",
        support::names_in(out.path())
    );
    let _broker = Broker::start_at(data, &addr);
    rx.stdout.wait_for("\"event\":\"received\"", WAIT);
    assert_eq!(hash_file(&out.join("cut.iso")), hash_file(&file));
    assert_eq!(support::names_in(out.path()), vec!["cut.iso".to_owned()]);
}
