//! The mailbox of a cluster (`broker --cluster`, PROTOCOL.md §2.6, §2.8),
//! driven as users would: the real binaries on 127.0.0.1, a real
//! `nats-server -js` on a free port, real files. A transfer stored through
//! one broker is delivered by another, also after the first died; NATS keeps
//! only ciphertext; an upload cut half way (by its sender, or by its broker's
//! death) never reaches NATS and is never offered; a
//! limit counts what every broker stored.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

mod support;

use std::time::Duration;

use support::nats::Nats;
use support::stored::{
    MARKER, bytes_under, contains, deposit_prekeys, marker_file, receipts, store, stored_event,
    wait_until,
};
use support::{Broker, Home, Proc, TempDir, WAIT, hash_file};

/// A broker of the cluster at `nats`, with `extra` options.
fn member(nats: &Nats, id: &str, extra: &[&str]) -> Broker {
    let url = nats.url();
    let mut args = vec!["--cluster", &url, "--broker-id", id];
    args.extend_from_slice(extra);
    Broker::start_with(TempDir::new("mailbox-cluster"), &args)
}

/// Lines `rx` (a `--json` receiver) printed for `for_`.
fn printed_for(rx: &mut Proc, for_: Duration) -> Vec<String> {
    std::thread::sleep(for_);
    rx.stdout.drain().to_vec()
}

#[test]
fn a_transfer_stored_through_one_broker_is_delivered_by_another_after_the_first_died() {
    let Some(nats) = Nats::start() else { return };
    let (mut one, mut two) = (member(&nats, "one", &[]), member(&nats, "two", &[]));
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    // bob leaves his prekeys through broker one, and goes offline.
    deposit_prekeys(&mut one, &bob, out.path());

    // alice stores 48 MiB of a marker string through broker two.
    let file = src.join("big.iso");
    marker_file(&file, 48);
    let sent = hash_file(&file);
    let run = store(&alice, &two, "bob", &["--file", file.to_str().unwrap()]);
    let event = stored_event(&run);
    assert_eq!(event["sha256"], sent.1);
    assert_eq!(event["last_resort"], false);
    // The cluster holds the sealed stream; no broker and not NATS can read it.
    assert!(bytes_under(nats.store.path()) > 48 << 20);
    assert!(
        !contains(nats.store.path(), &MARKER[..24]),
        "plaintext in NATS"
    );
    assert!(
        !contains(two.data.path(), &MARKER[..24]),
        "plaintext at a broker"
    );
    let list = receipts(&alice, &one);
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["state"], "waiting", "{list:?}");

    // The broker it was stored through dies; bob comes back to the other.
    two.proc.kill();
    let mut rx = bob.receiver(&one, out.path(), &["--json"]);
    let line = rx.stdout.wait_for("\"event\":\"received\"", WAIT);
    let got: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(got["stored"], true, "{line}");
    assert_eq!(got["transfer_id"], event["transfer_id"]);
    assert_eq!(hash_file(&out.join("big.iso")), sent);
    one.proc.stderr.wait_for("stored transfer ended", WAIT);
    let list = receipts(&alice, &one);
    assert_eq!(list[0]["state"], "delivered", "{list:?}");
    assert_eq!(list[0]["verified"], true, "{list:?}");
    assert_eq!(list[0]["sha256"], sent.1);
    // Delivered once: a second connection of bob's is offered nothing.
    rx.kill();
    one.proc.stderr.wait_for("receiver offline", WAIT);
    let mut rx = bob.receiver(&one, out.path(), &["--json"]);
    let later = printed_for(&mut rx, Duration::from_secs(5));
    assert!(
        !later.iter().any(|l| l.contains("\"event\":\"received\"")),
        "{later:?}"
    );
    assert_eq!(support::names_in(out.path()), vec!["big.iso".to_owned()]);
}

#[test]
fn an_upload_cut_half_way_never_reaches_nats_nor_is_offered_and_limits_count_the_cluster() {
    let Some(nats) = Nats::start() else { return };
    // Each broker takes at most 2 transfers for one receiver, counted
    // across the cluster.
    let limit = ["--store-per-receiver-count", "2"];
    let (mut one, two) = (member(&nats, "one", &limit), member(&nats, "two", &limit));
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let out = TempDir::new("out");
    deposit_prekeys(&mut one, &bob, out.path());

    // Uploads staged at broker two and cut half way: first by their sender,
    // then by the broker's death. Nothing of them reaches NATS.
    let in_nats = bytes_under(nats.store.path());
    let staging = two.data.join("mailbox-staging");
    let block = support::pseudo_random(1 << 20, 5);
    let mut two = two;
    for cut_by_broker in [false, true] {
        let (mut sender, mut input) =
            alice.pipe_sender(&two, "bob", "p.bin", &["--store", "--max-size", "64MiB"]);
        for _ in 0..6 {
            std::io::Write::write_all(&mut input, &block).unwrap();
        }
        wait_until("the upload to be staged", WAIT, || {
            bytes_under(&staging) > 4 << 20
        });
        if cut_by_broker {
            two.proc.kill();
        } else {
            sender.kill();
            wait_until("the staged upload to go", WAIT, || {
                bytes_under(&staging) == 0
            });
        }
        drop(input);
        assert_ne!(sender.wait(WAIT), Some(12));
    }
    assert!(
        bytes_under(nats.store.path()) < in_nats + (1 << 20),
        "an upload cut half way reached NATS"
    );
    let mut rx = bob.receiver(&one, out.path(), &["--json"]);
    let offered = printed_for(&mut rx, Duration::from_secs(5));
    assert!(
        !offered.iter().any(|l| l.contains("\"event\"")),
        "{offered:?}"
    );
    rx.kill();
    one.proc.stderr.wait_for("receiver offline", WAIT);

    // Two stored through broker one fill bob's share of the cluster; a
    // third, through a third broker, is refused before it uploads.
    for text in ["first", "second"] {
        stored_event(&store(&alice, &one, "bob", &["--message", text]));
    }
    let three = member(&nats, "three", &limit);
    let refused = store(&alice, &three, "bob", &["--message", "third"]);
    assert_eq!(refused.code, Some(8), "{refused:?}");
    let said = "keeps at most 2 transfers for bob and 2 are waiting already";
    assert!(refused.stderr.contains(said), "{refused:?}");
    // Both are delivered, in the order they were stored.
    let mut rx = bob.receiver(&three, out.path(), &["--json"]);
    let first = rx.stdout.wait_for("\"event\":\"message\"", WAIT);
    let second = rx.stdout.wait_for("\"event\":\"message\"", WAIT);
    assert!(
        first.contains("first") && second.contains("second"),
        "{first}\n{second}"
    );
}

#[test]
fn prekey_fetches_through_every_broker_in_turn_are_held_to_one_rate() {
    let Some(nats) = Nats::start() else { return };
    let rate = ["--prekey-fetches-per-minute", "4"];
    let mut brokers: Vec<Broker> = ["one", "two", "three"]
        .iter()
        .map(|id| member(&nats, id, &rate))
        .collect();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let out = TempDir::new("out");
    deposit_prekeys(&mut brokers[0], &bob, out.path());
    // All five fetches in one minute of the cluster's count.
    support::early_in_a_minute();
    // Four stored messages, each a fetch, through the brokers in turn: no
    // broker sees more than two, and all four are within the rate.
    for (i, text) in ["m0", "m1", "m2", "m3"].iter().enumerate() {
        stored_event(&store(&alice, &brokers[i % 3], "bob", &["--message", text]));
    }
    // The fifth, through a broker that has seen only one of them: refused,
    // since the cluster has seen four.
    let run = store(&alice, &brokers[1], "bob", &["--message", "m4"]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr
            .contains("too many prekey fetches through the brokers of this cluster"),
        "{run:?}"
    );
    let list = receipts(&alice, &brokers[2]);
    assert_eq!(list.len(), 4, "{list:?}");
}
