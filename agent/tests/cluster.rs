//! Brokers that act as one on NATS (`broker --cluster`), driven with the
//! real binaries, a real `nats-server -js` on a free loopback port, and real
//! files: across brokers, racing for names, NATS restarted, a broker killed.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::nats::{Nats, list_brokers};
use support::scrape::{get, metrics_addr, parse, value};
use support::{Broker, Home, Run, TempDir, WAIT, hash_file, pseudo_random};

/// A receiver named `home.name` at `broker`, writing into `out`.
fn receive(home: &Home, broker: &Broker, out: &TempDir) -> support::Proc {
    home.receiver(broker, out.path(), &[])
}

fn send_message(from: &Home, broker: &Broker, to: &str, text: &str) -> Run {
    from.run(broker, &["--role", "sender", "--to", to, "--message", text])
}

/// Waits until `broker` logged its second connection to NATS (the first
/// was at start).
fn reconnected(broker: &mut Broker) {
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    let count = |b: &mut Broker| {
        b.proc.stderr.drain();
        let seen = &b.proc.stderr.seen;
        seen.iter()
            .filter(|l| l.contains("cluster connection (re)established"))
            .count()
    };
    while count(broker) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the broker did not reconnect to NATS"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `--list` on `broker` shows `name` as a receiver.
fn listed_as_receiver(asker: &Home, broker: &Broker, name: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    loop {
        let list = asker.run(broker, &["--list", "--json"]);
        let listed = list.stdout.lines().any(|l| {
            l.contains(&format!("\"name\":\"{name}\"")) && l.contains("\"receiver\":true")
        });
        if listed {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} never listed: {list:#?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Bytes a broker received from senders, and relayed along `path`.
fn bytes(at: &str, path: &str) -> (f64, f64) {
    let now = parse(&get(at, "/metrics").1);
    (
        value(&now, "keyferry_broker_received_bytes_total", &[]),
        value(
            &now,
            "keyferry_broker_relayed_bytes_total",
            &[("path", path)],
        ),
    )
}

#[test]
fn one_upload_reaches_receivers_on_two_other_brokers_and_leaves_the_sender_once() {
    // bob on broker two; carol and erin on broker three; the sender on one.
    let Some(nats) = Nats::start() else { return };
    let [mut one, mut two, mut three] = ["one", "two", "three"].map(|id| {
        let args = [
            "--cluster",
            &nats.url(),
            "--broker-id",
            id,
            "--metrics",
            "127.0.0.1:0",
        ];
        Broker::start_with(TempDir::new("cluster-feed"), &args)
    });
    let at = [&mut one, &mut two, &mut three].map(metrics_addr);
    let (alice, bob, carol) = (
        Home::new("alice", "alice"),
        Home::new("bob", "bob"),
        Home::new("carol", "carol"),
    );
    let erin = Home::new("erin", "mallory");
    let (to_bob, to_carol) = (TempDir::new("feed-bob"), TempDir::new("feed-carol"));
    let to_erin = TempDir::new("feed-erin");
    let _rx = (
        receive(&bob, &two, &to_bob),
        receive(&carol, &three, &to_carol),
        receive(&erin, &three, &to_erin),
    );
    let src = TempDir::new("feed-src");
    let file = src.join("big.bin");
    let size = 24 << 20;
    std::fs::write(&file, pseudo_random(size, 29)).unwrap();
    let path = file.to_str().unwrap();
    let args = [
        "--role", "sender", "--to", "bob", "--to", "carol", "--to", "erin", "--file", path,
    ];
    let sent = alice.run(&one, &args);
    assert_eq!(sent.code, Some(0), "{sent:#?}");
    assert_eq!(hash_file(&to_bob.join("big.bin")), hash_file(&file));
    assert_eq!(hash_file(&to_carol.join("big.bin")), hash_file(&file));
    assert_eq!(hash_file(&to_erin.join("big.bin")), hash_file(&file));
    one.proc.stderr.wait_for("transfer finished", WAIT);
    // Broker one took the sender's one copy and fed one to each other
    // broker; broker two relayed its copy to bob, broker three copied its
    // own to carol and erin.
    let stream = size as f64;
    let within = |x: f64, copies: f64| (copies * stream..copies * stream * 1.05).contains(&x);
    let (received, fed) = bytes(&at[0], "fanout");
    assert!(
        within(received, 1.0),
        "broker one received {received} of {stream}"
    );
    assert!(within(fed, 2.0), "broker one fed {fed}");
    let (received, relayed) = bytes(&at[1], "routed");
    assert!(
        within(received, 1.0) && within(relayed, 1.0),
        "two: {received} {relayed}"
    );
    let (received, copied) = bytes(&at[2], "fanout");
    assert!(
        within(received, 1.0) && within(copied, 2.0),
        "three: {received} {copied}"
    );

    // With a receiver on the sender's broker too: its copy is one of the
    // upload's, beside the feed to broker two.
    let dave = Home::new("dave", "dave");
    let to_dave = TempDir::new("feed-dave");
    let _dave = receive(&dave, &one, &to_dave);
    let args = [
        "--role", "sender", "--to", "dave", "--to", "bob", "--file", path,
    ];
    let sent = alice.run(&one, &args);
    assert_eq!(sent.code, Some(0), "{sent:#?}");
    assert_eq!(hash_file(&to_dave.join("big.bin")), hash_file(&file));
    assert_eq!(hash_file(&to_bob.join("big (1).bin")), hash_file(&file));
    let (received, fed) = bytes(&at[0], "fanout");
    assert!(
        within(received, 2.0),
        "broker one received {received} in two uploads"
    );
    assert!(within(fed, 4.0), "broker one fed {fed} in two uploads");
}

#[test]
fn a_receiver_on_one_broker_gets_a_file_from_a_sender_on_another() {
    let Some(nats) = Nats::start() else { return };
    let (mut b1, b2) = (
        Broker::in_cluster(&nats, "one"),
        Broker::in_cluster(&nats, "two"),
    );
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let out = TempDir::new("cluster-out");
    let _rx = receive(&bob, &b1, &out);

    // The list on broker 2 shows the receiver on broker 1.
    let list = alice.run(&b2, &["--list", "--json"]);
    assert_eq!(list.code, Some(0), "{list:#?}");
    let bob_line = list
        .stdout
        .lines()
        .find(|l| l.contains("\"bob\""))
        .unwrap_or_else(|| panic!("bob is not listed on broker 2: {list:#?}"));
    assert!(bob_line.contains("\"receiver\":true"), "{bob_line}");

    // 64 MiB from a sender on broker 2; the data goes to broker 1 directly,
    // over three connections.
    let src = TempDir::new("cluster-src");
    let file = src.join("big.bin");
    std::fs::write(&file, pseudo_random(64 << 20, 15)).unwrap();
    let flags = ["--direct", "never", "--streams", "3"];
    let sent = alice.send_file(&b2, "bob", &file, &flags);
    assert_eq!(sent.code, Some(0), "{sent:#?}");
    let report = support::json(&sent);
    assert_eq!(
        (&report["via"], &report["connections"]),
        (&serde_json::json!("relay"), &serde_json::json!(3)),
        "{report}"
    );
    assert_eq!(hash_file(&out.join("big.bin")), hash_file(&file));
    b1.proc
        .stderr
        .wait_for("transfer offered through the cluster", WAIT);
    b1.proc.stderr.wait_for("transfer finished", WAIT);

    // One receiver per name in the whole cluster.
    let twin = bob.start(
        &b2,
        &[
            "--role",
            "receiver",
            "--out-dir",
            out.path().to_str().unwrap(),
        ],
    );
    let twin = Run::finish(twin);
    assert_eq!(twin.code, Some(10), "{twin:#?}");
    assert!(
        twin.stderr
            .contains("already connected to broker one of this cluster"),
        "{twin:#?}"
    );

    // Operators publish the brokers' fingerprints from the cluster itself.
    let brokers = list_brokers(&nats);
    for b in [&b1, &b2] {
        assert!(
            brokers.contains(&format!("{} {}", b.addr, b.fingerprint)),
            "{brokers}"
        );
    }
}

#[test]
fn two_agents_racing_for_one_name_through_two_brokers_one_wins() {
    let Some(nats) = Nats::start() else { return };
    let (b1, b2) = (
        Broker::in_cluster(&nats, "one"),
        Broker::in_cluster(&nats, "two"),
    );
    for round in 0..5 {
        let name = format!("race{round}");
        let (a, m) = (Home::new(&name, "alice"), Home::new(&name, "mallory"));
        // Both at once, each through its own broker.
        let pa = a.start(&b1, &["--list"]);
        let pm = m.start(&b2, &["--list"]);
        let (ra, rm) = (Run::finish(pa), Run::finish(pm));
        let mut codes = [ra.code, rm.code];
        codes.sort();
        assert_eq!(codes, [Some(0), Some(10)], "{ra:#?} {rm:#?}");
        let (winner, loser) = if ra.code == Some(0) {
            (&a, &m)
        } else {
            (&m, &a)
        };
        // The binding holds on both brokers, for the winner's key only.
        for b in [&b1, &b2] {
            assert_eq!(winner.run(b, &["--list"]).code, Some(0));
            let refused = loser.run(b, &["--list"]);
            assert_eq!(refused.code, Some(10), "{refused:#?}");
            assert!(
                refused.stderr.contains("registered to another key"),
                "{refused:#?}"
            );
        }
    }
}

#[test]
fn brokers_recover_when_nats_restarts_and_no_binding_is_lost() {
    let Some(nats) = Nats::start() else { return };
    let (mut b1, mut b2) = (
        Broker::in_cluster(&nats, "one"),
        Broker::in_cluster(&nats, "two"),
    );
    let (alice, bob, mallory) = (
        Home::new("alice", "alice"),
        Home::new("bob", "bob"),
        Home::new("bob", "mallory"),
    );
    let out = TempDir::new("cluster-out");
    let mut rx = receive(&bob, &b1, &out);
    assert_eq!(send_message(&alice, &b1, "bob", "before").code, Some(0));
    // alice is known to broker 2 too (it keeps the bindings it saw).
    assert_eq!(alice.run(&b2, &["--list"]).code, Some(0));

    // NATS goes away: agents this broker knows still exchange files through it.
    let (mut proc, port, store) = (nats.proc, nats.port, nats.store);
    proc.kill();
    let during = send_message(&alice, &b1, "bob", "while NATS is down");
    assert_eq!(during.code, Some(0), "{during:#?}");
    rx.stdout.wait_for("while NATS is down", WAIT);
    // Across brokers it cannot work; the sender hears that the cluster is the
    // reason, not that bob is unknown or offline.
    // (Exit 5, as for a peer that is away: a sender retrying goes on.)
    let across = send_message(&alice, &b2, "bob", "across while NATS is down");
    assert_eq!(across.code, Some(5), "{across:#?}");
    assert!(
        across.stderr.contains(
            "the broker cannot look up bob now: this broker cannot reach its cluster to find bob"
        ),
        "{across:#?}"
    );
    for wrong in ["unknown peer", "is offline"] {
        assert!(!across.stderr.contains(wrong), "{across:#?}");
    }
    // A new name cannot be registered meanwhile, and says why.
    let carol = Home::new("carol", "carol");
    let refused = carol.run(&b2, &["--list"]);
    assert_ne!(refused.code, Some(0));
    assert!(
        refused.stderr.contains("cannot reach its cluster"),
        "{refused:#?}"
    );

    // NATS back on its port and store: the brokers reconnect by themselves.
    let nats = Nats::restart_parts(proc, port, store);
    for b in [&mut b1, &mut b2] {
        reconnected(b);
    }
    // bob's presence is there again (refreshed by broker 1's heartbeat, or
    // still unexpired) before the offer across brokers is made.
    listed_as_receiver(&alice, &b2, "bob");
    let after = send_message(&alice, &b2, "bob", "across after the restart");
    assert_eq!(after.code, Some(0), "{after:#?}");
    rx.stdout.wait_for("across after the restart", WAIT);
    // The binding survived: another key still cannot take the name.
    let stolen = mallory.run(&b2, &["--list"]);
    assert_eq!(stolen.code, Some(10), "{stolen:#?}");
    drop(nats);
}

#[test]
fn when_a_broker_is_killed_the_others_go_on_and_its_receiver_can_move() {
    let Some(nats) = Nats::start() else { return };
    let (mut b1, b2) = (
        Broker::in_cluster(&nats, "one"),
        Broker::in_cluster(&nats, "two"),
    );
    let (alice, bob, carol) = (
        Home::new("alice", "alice"),
        Home::new("bob", "bob"),
        Home::new("carol", "carol"),
    );
    let (out_b, out_c) = (TempDir::new("cluster-bob"), TempDir::new("cluster-carol"));
    let mut bob_rx = receive(&bob, &b1, &out_b);
    let mut carol_rx = receive(&carol, &b2, &out_c);
    assert_eq!(
        send_message(&alice, &b2, "bob", "to bob on one").code,
        Some(0)
    );

    b1.proc.kill();
    bob_rx.kill();
    // Broker 2's agents still exchange files.
    let local = send_message(&alice, &b2, "carol", "still here");
    assert_eq!(local.code, Some(0), "{local:#?}");
    carol_rx.stdout.wait_for("still here", WAIT);
    // bob's broker is gone: a clear error, not a hang.
    let gone = alice.run(
        &b2,
        &[
            "--role",
            "sender",
            "--to",
            "bob",
            "--message",
            "x",
            "--retry-for",
            "0",
        ],
    );
    assert_eq!(gone.code, Some(5), "{gone:#?}");
    assert!(
        gone.stderr
            .contains("broker one of this cluster, which does not answer"),
        "{gone:#?}"
    );
    // bob reconnects to broker 2 and is reachable again at once.
    let mut moved = receive(&bob, &b2, &out_b);
    let again = send_message(&alice, &b2, "bob", "bob moved");
    assert_eq!(again.code, Some(0), "{again:#?}");
    moved.stdout.wait_for("bob moved", WAIT);
}

#[test]
fn a_frozen_broker_loses_its_receiver_to_the_one_it_moved_to_and_lets_go() {
    let Some(nats) = Nats::start() else { return };
    let (mut b1, mut b2) = (
        Broker::in_cluster(&nats, "one"),
        Broker::in_cluster(&nats, "two"),
    );
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let (old_out, new_out) = (TempDir::new("cluster-old"), TempDir::new("cluster-new"));
    let mut old = receive(&bob, &b1, &old_out);

    // Broker 1 freezes: it cannot answer whether it still holds bob, so
    // bob, reconnecting to broker 2, takes the name over (by revision).
    b1.proc.signal(rustix::process::Signal::STOP);
    let mut moved = receive(&bob, &b2, &new_out);
    let sent = send_message(&alice, &b2, "bob", "to the new bob");
    assert_eq!(sent.code, Some(0), "{sent:#?}");
    moved.stdout.wait_for("to the new bob", WAIT);

    // Thawed, broker 1's next refresh fails on the revision: it finds bob
    // on broker 2 and cuts its stale connection, which is told why.
    b1.proc.signal(rustix::process::Signal::CONT);
    b1.proc.stderr.wait_for(
        "receiver's name taken over in the cluster",
        Duration::from_secs(30),
    );
    old.stderr.wait_for("now connected to broker two", WAIT);
    // bob stays reachable where it moved.
    let again = send_message(&alice, &b1, "bob", "still the new bob");
    assert_eq!(again.code, Some(0), "{again:#?}");
    moved.stdout.wait_for("still the new bob", WAIT);
    b2.proc
        .stderr
        .wait_for("transfer offered through the cluster", WAIT);
}

#[test]
fn a_brokers_allowlist_holds_for_offers_routed_to_its_receivers() {
    let Some(nats) = Nats::start() else { return };
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let fp = |h: &Home| {
        keyferry_agent::home::load_identity(&h.dir.join("identity.pem"))
            .unwrap()
            .fingerprint()
    };
    let lists = TempDir::new("cluster-allow");
    let (only_bob, both) = (lists.join("one"), lists.join("two"));
    std::fs::write(&only_bob, format!("bob {}\n", fp(&bob))).unwrap();
    std::fs::write(&both, format!("alice {}\nbob {}\n", fp(&alice), fp(&bob))).unwrap();
    let start = |id: &str, list: &std::path::Path| {
        let url = nats.url();
        let args = [
            "--cluster",
            &url,
            "--broker-id",
            id,
            "--allow-file",
            list.to_str().unwrap(),
        ];
        Broker::start_with(TempDir::new("cluster-broker"), &args)
    };
    let b1 = start("one", &only_bob);
    let mut b2 = start("two", &both);
    b2.proc
        .stderr
        .wait_for("another broker of the cluster has another allowlist", WAIT);
    let out = TempDir::new("cluster-out");
    let _rx = receive(&bob, &b1, &out);

    // alice may use broker 2, but broker 1, which holds bob, does not admit her.
    let refused = send_message(&alice, &b2, "bob", "not allowed there");
    assert_eq!(refused.code, Some(10), "{refused:#?}");
    assert!(
        refused
            .stderr
            .contains("alice is not on the allowlist of broker one"),
        "{refused:#?}"
    );
    let mut b1 = b1;
    b1.proc.stderr.wait_for(
        "routed offer from an agent not on this broker's allowlist",
        WAIT,
    );

    // A broker that admits anyone cannot join brokers with allowlists: it
    // could bind any name for all of them.
    let url = nats.url();
    let open = support::Proc::spawn({
        let mut cmd = std::process::Command::new(support::broker_bin());
        cmd.args([
            "--listen",
            "127.0.0.1:0",
            "--cluster",
            &url,
            "--broker-id",
            "three",
        ])
        .arg("--data-dir")
        .arg(lists.join("open-broker"));
        cmd
    });
    let open = Run::finish(open);
    assert_eq!(open.code, Some(1), "{open:#?}");
    assert!(
        open.stderr
            .contains("an open broker beside one with an allowlist"),
        "{open:#?}"
    );
}

#[test]
fn a_receiver_lost_behind_a_shared_feed_leaves_the_others_on_it_their_transfer() {
    use std::io::Write as _;
    // bob on broker two; carol and erin on broker three share one feed.
    let Some(nats) = Nats::start() else { return };
    let [one, two, three] = ["one", "two", "three"].map(|id| {
        let args = ["--cluster", &nats.url(), "--broker-id", id];
        Broker::start_with(TempDir::new("cluster-lost"), &args)
    });
    let alice = Home::new("alice", "alice");
    let homes = [("bob", "bob"), ("carol", "carol"), ("erin", "mallory")]
        .map(|(name, key)| (Home::new(name, key), TempDir::new(name)));
    let mut rx: Vec<_> = homes
        .iter()
        .zip([&two, &three, &three])
        .map(|((home, out), broker)| receive(home, broker, out))
        .collect();
    let (sender, mut input) = alice.pipe_sender(
        &one,
        "bob",
        "live.bin",
        &[
            "--to",
            "carol",
            "--to",
            "erin",
            "--retry-for",
            "0",
            "--json",
        ],
    );
    let data = pseudo_random(8 << 20, 33);
    input.write_all(&data[..4 << 20]).unwrap();
    let erin_pid = rx[2].child.id();
    support::wait_for_data(erin_pid, homes[2].1.path(), 1 << 20);
    rx[2].kill();
    input.write_all(&data[4 << 20..]).unwrap();
    drop(input);
    let sent = Run::finish(sender);
    // erin's transfer failed; bob's and carol's did not, carol's although
    // her feed also carried erin's.
    assert_eq!(sent.code, Some(11), "{sent:#?}");
    for name in ["bob", "carol"] {
        assert!(
            sent.stdout
                .lines()
                .any(|l| l.contains(&format!("\"{name}\""))),
            "{name} not confirmed: {sent:#?}"
        );
    }
    for (home, out) in &homes[..2] {
        let got = std::fs::read(out.join("live.bin")).unwrap();
        assert!(got == data, "{} got {} bytes", home.name, got.len());
    }
}
