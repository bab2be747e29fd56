//! The direct path (PROTOCOL.md §2.7), driven as users drive it: real
//! binaries, real files, a broker that relays only when it must. On one
//! machine (127.0.0.1) the stream goes straight from sender to receiver;
//! `--direct never` and `--direct only` do what they say; a stranger on the
//! receiver's direct port changes nothing; a broker cannot change the
//! addresses an accept names, nor a sender's terms malformed addresses for
//! a simultaneous open. The tests in network namespaces are in
//! `direct_netns.rs` and `direct_nat.rs`.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyferry_common::ids::TransferId;
use keyferry_common::wire::message::{self, Message};

use support::evil::{EvilBroker, Hooks, finish_within};
use support::{Broker, Home, TempDir, WAIT, json, pseudo_random, sha256_hex};

/// Where the accept's direct fields begin: nonce, share, ciphertext,
/// offset, ask (PROTOCOL.md §3.3).
const DIRECT_AT: usize = 32 + 32 + 1088 + 8 + 4;

fn file_of(dir: &TempDir, name: &str, len: usize, seed: u64) -> (std::path::PathBuf, Vec<u8>) {
    let data = pseudo_random(len, seed);
    let path = dir.join(name);
    std::fs::write(&path, &data).unwrap();
    (path, data)
}

/// Whether `dir` is empty within 20 s: an accepted transfer whose sender
/// gave up before the stream leaves nothing once the receiver's wait for
/// its data connection ends.
/// `sent` (with `--json`) went straight to bob's `--once` receiver over
/// `connections` connections, `data` arrived whole at `at`, and the broker
/// relayed none of it.
fn arrived_direct(
    sent: &support::Run,
    connections: u64,
    (data, at): (&[u8], std::path::PathBuf),
    receiver: &mut support::Proc,
    broker: &mut Broker,
) {
    assert_eq!(sent.code, Some(0), "{sent:#?}");
    let report = json(sent);
    assert_eq!(report["via"], "direct", "{report}");
    assert_eq!(report["connections"], connections, "{report}");
    assert_eq!(report["sha256"], sha256_hex(data));
    assert_eq!(receiver.wait(WAIT), Some(0));
    assert_eq!(std::fs::read(at).unwrap(), data);
    assert!(
        !support::relayed(&mut broker.proc),
        "the broker relayed a direct transfer"
    );
}

fn emptied(dir: &std::path::Path) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if support::names_in(dir).is_empty() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn on_one_machine_the_stream_goes_direct_and_the_broker_relays_nothing() {
    let mut broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    let (file, data) = file_of(&src, "d.bin", 5 << 20, 7);
    let mut receiver = bob.receiver(&broker, out.path(), &["--once", "--yes"]);

    let sent = alice.send_file(&broker, "bob", &file, &[]);
    // No round trip to speak of: one connection.
    let landed = (&data[..], out.join("d.bin"));
    arrived_direct(&sent, 1, landed, &mut receiver, &mut broker);
    let line = receiver.stdout.wait_for("received", WAIT);
    assert!(line.contains(", direct) -> "), "{line}");

    // A small file is not worth the dial and the proofs: the relay.
    let out = TempDir::new("out-small");
    let mut receiver = bob.receiver(&broker, out.path(), &["--once", "--yes"]);
    let (small, _) = file_of(&src, "small.bin", 1024, 17);
    let sent = alice.send_file(&broker, "bob", &small, &[]);
    assert_eq!(sent.code, Some(0), "{sent:#?}");
    assert_eq!(json(&sent)["via"], "relay");
    assert_eq!(receiver.wait(WAIT), Some(0));
    assert!(support::relayed(&mut broker.proc));
}

#[test]
fn a_stream_spread_over_four_connections_arrives_whole_under_rotating_keys() {
    let mut broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    let (file, data) = file_of(&src, "wide.bin", 48 << 20, 11);
    let mut receiver = bob.receiver(&broker, out.path(), &["--once", "--yes"]);
    let extra = ["--streams", "4", "--rekey-interval", "20ms"];
    let sent = alice.send_file(&broker, "bob", &file, &extra);
    let landed = (&data[..], out.join("wide.bin"));
    arrived_direct(&sent, 4, landed, &mut receiver, &mut broker);
    let keys = json(&sent)["session_keys"].as_u64().unwrap();
    assert!(keys > 1, "{sent:#?}");

    // The line a person reads says so too.
    let out = TempDir::new("out-line");
    let mut receiver = bob.receiver(&broker, out.path(), &["--once", "--yes"]);
    let file_arg = file.to_str().unwrap();
    let args = [
        "--role",
        "sender",
        "--to",
        "bob",
        "--file",
        file_arg,
        "--streams",
        "3",
    ];
    let sent = alice.run(&broker, &args);
    assert_eq!(sent.code, Some(0), "{sent:#?}");
    assert!(
        sent.stdout
            .contains("direct over 3 connections) — receipt verified"),
        "{sent:#?}"
    );
    assert_eq!(receiver.wait(WAIT), Some(0));
    assert_eq!(std::fs::read(out.join("wide.bin")).unwrap(), data);
}

#[test]
fn direct_transfers_in_a_row_do_not_fill_the_brokers_limits() {
    // The broker counts a transfer until its wait for the data connections
    // ends; a direct one ends it at once (the receiver drops its relay
    // connection), so more than its 4 at once from one sender go through.
    let mut broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    let _receiver = bob.receiver(&broker, out.path(), &["--yes"]);
    for i in 0..6 {
        let (file, _) = file_of(&src, &format!("{i}.bin"), 4 << 20, i);
        let sent = alice.send_file(&broker, "bob", &file, &["--retry-for", "0"]);
        assert_eq!(sent.code, Some(0), "transfer {i}: {sent:#?}");
        assert_eq!(json(&sent)["via"], "direct");
    }
    let ended = broker
        .proc
        .stderr
        .wait_for("before the sender's came", WAIT);
    assert!(
        ended.contains("receiver closed its data connection"),
        "{ended}"
    );
    assert_eq!(support::names_in(out.path()).len(), 6);
}

#[test]
fn direct_never_on_either_side_takes_the_relay() {
    let mut broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let src = TempDir::new("src");
    let (file, data) = file_of(&src, "r.bin", 5 << 20, 8);
    for (receiver_flags, sender_flags) in [
        (&["--direct", "never"][..], &[][..]),
        (&[][..], &["--direct", "never"][..]),
    ] {
        let out = TempDir::new("out");
        let mut args = vec!["--once", "--yes"];
        args.extend_from_slice(receiver_flags);
        let mut receiver = bob.receiver(&broker, out.path(), &args);
        let sent = alice.send_file(&broker, "bob", &file, sender_flags);
        assert_eq!(sent.code, Some(0), "{sent:#?}");
        assert_eq!(json(&sent)["via"], "relay");
        assert_eq!(receiver.wait(WAIT), Some(0));
        assert_eq!(std::fs::read(out.join("r.bin")).unwrap(), data);
        assert!(
            support::relayed(&mut broker.proc),
            "{receiver_flags:?} {sender_flags:?}"
        );
    }
}

#[test]
fn a_relayed_stream_spread_over_several_connections_on_either_leg_arrives_whole() {
    let mut broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let src = TempDir::new("src");
    let (file, data) = file_of(&src, "lanes.bin", 24 << 20, 12);
    // The sender's --direct never opens its connections beside the offer;
    // the receiver's makes a sender that would dial open them after the
    // accept.
    // A receiver's --streams is its own leg's: the broker spreads the
    // stream over its connections.
    for (receiver_flags, sender_flags, n, m) in [
        (&[][..], &["--direct", "never", "--streams", "4"][..], 4, 1),
        (&["--direct", "never"][..], &["--streams", "3"][..], 3, 1),
        (&["--direct", "never", "--streams", "3"][..], &[][..], 1, 3),
        (
            &["--streams", "2"][..],
            &["--direct", "never", "--streams", "5"][..],
            5,
            2,
        ),
    ] {
        let out = TempDir::new("out");
        let mut args = vec!["--once", "--yes"];
        args.extend_from_slice(receiver_flags);
        let mut receiver = bob.receiver(&broker, out.path(), &args);
        let mut flags = vec!["--rekey-interval", "20ms"];
        flags.extend_from_slice(sender_flags);
        let sent = alice.send_file(&broker, "bob", &file, &flags);
        assert_eq!(sent.code, Some(0), "{sent:#?}");
        let report = json(&sent);
        assert_eq!(report["via"], "relay", "{report}");
        assert_eq!(report["connections"], n, "{report}");
        assert_eq!(report["sha256"], sha256_hex(&data));
        assert!(report["session_keys"].as_u64().unwrap() > 1, "{report}");
        assert_eq!(receiver.wait(WAIT), Some(0));
        assert_eq!(std::fs::read(out.join("lanes.bin")).unwrap(), data);
        // The broker relayed it, having gathered every connection.
        let both = format!("lanes={n} receiver_lanes={m}");
        let started = broker.proc.stderr.wait_for(&both, WAIT);
        assert!(started.contains("transfer started"), "{started}");
    }
}

#[test]
fn direct_only_without_a_direct_path_fails_clearly_with_exit_13() {
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let src = TempDir::new("src");
    let (file, _) = file_of(&src, "o.bin", 4096, 9);

    // The receiver takes only the relay; the sender only a direct path.
    let out = TempDir::new("out");
    let mut receiver = bob.receiver(&broker, out.path(), &["--yes", "--direct", "never"]);
    let sent = alice.send_file(&broker, "bob", &file, &["--direct", "only"]);
    assert_eq!(sent.code, Some(13), "{sent:#?}");
    assert!(
        sent.stderr.contains("no direct path") && sent.stderr.contains("bob takes only the relay"),
        "{}",
        sent.stderr
    );
    // The receiver hears it over the relay, at once, and keeps nothing.
    receiver.stderr.wait_for(
        "the sender found no path it may take",
        Duration::from_secs(5),
    );
    assert!(emptied(out.path()), "{:?}", support::names_in(out.path()));
    drop(receiver);

    // The other way round.
    let out = TempDir::new("out2");
    let _receiver = bob.receiver(&broker, out.path(), &["--yes", "--direct", "only"]);
    let sent = alice.send_file(&broker, "bob", &file, &["--direct", "never"]);
    assert_eq!(sent.code, Some(13), "{sent:#?}");
    assert!(
        sent.stderr.contains("takes only a direct connection"),
        "{}",
        sent.stderr
    );

    // Both only, on one machine: direct.
    let sent = alice.send_file(&broker, "bob", &file, &["--direct", "only"]);
    assert_eq!(sent.code, Some(0), "{sent:#?}");
    assert_eq!(json(&sent)["via"], "direct");
}

/// A free TCP port on 127.0.0.1 (bound, then released).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Whether the receiver closes `s` within `limit` without a word (EOF or
/// a reset; not a timeout, not data).
fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

/// Writes `msg` as one frame.
fn send_frame(s: &mut TcpStream, msg: &Message) {
    s.write_all(&message::encode(msg, 1 << 10).unwrap())
        .unwrap();
}

/// Reads one frame (`None`: the connection ended or failed).
fn read_frame(s: &mut TcpStream) -> Option<Message> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut payload = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut payload).ok()?;
    message::decode_payload(&payload).ok()
}

/// A stranger who knows transfer `tid` (the broker sees it) tries the
/// receiver's direct port, once with each kind of made-up proof (of a first
/// connection, of the first of several, of a further one, and numbers out
/// of range): it is challenged like anyone, and its proof gets the
/// connection closed. Returns whether each was challenged and then closed.
fn stranger_with_the_transfer_id(port: u16, tid: TransferId) -> Vec<(bool, bool)> {
    let proof = [7; 32];
    let forged = [
        Message::DirectProof { proof },
        Message::DirectLanes { lanes: 4, proof },
        Message::DirectLane { lane: 1, proof },
        Message::DirectLanes { lanes: 9, proof },
        Message::DirectLane { lane: 0, proof },
    ];
    let mut outcomes = Vec::new();
    for (i, forged) in forged.iter().enumerate() {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let hello = Message::DirectHello {
            transfer_id: tid,
            nonce: [i as u8; 32],
        };
        send_frame(&mut s, &hello);
        let challenged = matches!(read_frame(&mut s), Some(Message::DirectChallenge { .. }));
        send_frame(&mut s, forged);
        outcomes.push((challenged, closed_within(&mut s, Duration::from_secs(5))));
    }
    outcomes
}

#[test]
fn strangers_on_the_direct_port_are_refused_and_the_transfer_is_unaffected() {
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    let (file, data) = file_of(&src, "s.bin", 5 << 20, 10);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");

    // The broker (which sees the transfer id) lets a stranger try the
    // receiver's port with it just before the accept reaches the sender.
    let tid = Arc::new(Mutex::new(None));
    let (seen, tried) = (Arc::clone(&tid), Arc::new(Mutex::new(None)));
    let outcome = Arc::clone(&tried);
    let hooks = Hooks::pass_through()
        .offered(move |m| {
            if let Message::Offered { offer, .. } = &m {
                let id: [u8; 16] = offer.body[2..18].try_into().unwrap();
                *seen.lock().unwrap() = Some(TransferId(id));
            }
            m
        })
        .accept(move |a| {
            let tid = tid.lock().unwrap().unwrap();
            *outcome.lock().unwrap() = Some(stranger_with_the_transfer_id(port, tid));
            a
        });
    let evil = EvilBroker::start(hooks);
    let port_arg = port.to_string();
    let mut receiver = evil.receiver(
        &bob,
        out.path(),
        &["--once", "--yes", "--direct-port", &port_arg],
    );

    // Strangers without the id: one connects first and says nothing, one
    // names a made-up transfer, one sends garbage.
    let _silent = TcpStream::connect(&addr).unwrap();
    let mut forged = TcpStream::connect(&addr).unwrap();
    let hello = Message::DirectHello {
        transfer_id: TransferId([0xaa; 16]),
        nonce: [0x55; 32],
    };
    send_frame(&mut forged, &hello);
    let mut garbage = TcpStream::connect(&addr).unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();

    let file_arg = file.to_str().unwrap();
    let args = [
        "--role", "sender", "--to", "bob", "--file", file_arg, "--json",
    ];
    let sent = finish_within(evil.agent(&alice, &args), WAIT);
    assert_eq!(sent.code, Some(0), "{sent:#?}");
    assert_eq!(json(&sent)["via"], "direct", "{sent:#?}");
    assert_eq!(receiver.wait(WAIT), Some(0));
    assert_eq!(std::fs::read(out.join("s.bin")).unwrap(), data);
    assert_eq!(
        *tried.lock().unwrap(),
        Some(vec![(true, true); 5]),
        "the stranger with the real id was challenged, then closed, whatever it claimed"
    );
    assert!(
        closed_within(&mut forged, Duration::from_secs(5)),
        "an unknown transfer is closed"
    );
    assert!(
        closed_within(&mut garbage, Duration::from_secs(5)),
        "garbage is closed"
    );
}

#[test]
fn the_accept_names_addresses_only_when_allowed_and_a_broker_cannot_change_them() {
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let src = TempDir::new("src");
    let (file, data) = file_of(&src, "w.bin", 100_000, 11);

    // Seen on the wire at the broker: `--direct never` names no address.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    let evil = EvilBroker::start(Hooks::pass_through().accept(move |a| {
        log.lock().unwrap().push(a.clone());
        a
    }));
    for (flags, mode) in [(&["--direct", "never"][..], 0u8), (&[][..], 1u8)] {
        let out = TempDir::new("out");
        let mut args = vec!["--once", "--yes"];
        args.extend_from_slice(flags);
        let mut receiver = evil.receiver(&bob, out.path(), &args);
        let sent = finish_within(evil.sender(&alice, "bob", &file, &[]), WAIT);
        assert_eq!(sent.code, Some(0), "{sent:#?}");
        assert_eq!(receiver.wait(WAIT), Some(0));
        assert_eq!(std::fs::read(out.join("w.bin")).unwrap(), data);
        let accept = seen.lock().unwrap().pop().unwrap();
        assert_eq!(accept[DIRECT_AT], mode, "{flags:?}");
        let n = usize::from(accept[DIRECT_AT + 1]);
        if mode == 0 {
            assert_eq!(n, 0);
            assert_eq!(accept.len(), DIRECT_AT + 2 + 64, "nothing more on the wire");
        } else {
            // The first is the address this machine reaches the broker from.
            assert!(n >= 1);
            assert_eq!(accept[DIRECT_AT + 2..DIRECT_AT + 7], [4, 127, 0, 0, 1]);
        }
    }

    // A broker that points the sender elsewhere breaks the accept's tag.
    let evil = EvilBroker::start(Hooks::pass_through().accept(|mut a| {
        a[DIRECT_AT + 7] ^= 1; // the first candidate's port
        a
    }));
    let out = TempDir::new("out");
    let mut receiver = evil.receiver(&bob, out.path(), &["--yes"]);
    // A sender that would go direct (not the helper's `--direct never`).
    let file_arg = file.to_str().unwrap();
    let args = [
        "--role",
        "sender",
        "--to",
        "bob",
        "--file",
        file_arg,
        "--retry-for",
        "0",
    ];
    let sent = finish_within(evil.agent(&alice, &args), WAIT);
    assert_eq!(sent.code, Some(9), "{sent:#?}");
    assert!(
        sent.stderr.contains("accept did not verify"),
        "{}",
        sent.stderr
    );
    // The receiver, waiting on the relay, hears it at once and keeps nothing.
    receiver
        .stderr
        .wait_for("refused this receiver's accept", Duration::from_secs(5));
    assert!(emptied(out.path()), "{:?}", support::names_in(out.path()));
}

#[test]
fn terms_that_name_malformed_punch_addresses_are_refused_and_good_ones_accepted() {
    use keyferry_common::handshake::Terms;
    use keyferry_common::ids::StreamId;
    use keyferry_common::wire::message::RefuseReason;
    use support::hand::{self, HandSender};

    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let out = TempDir::new("out");
    let _receiver = bob.receiver(&broker, out.path(), &["--yes"]);
    let one = [4u8, 203, 0, 113, 7, 0x9c, 0x40];
    let bad: [Vec<u8>; 4] = [
        vec![1, 5, 203, 0, 113, 7, 0x9c, 0x40], // unknown family
        vec![1, 4, 203, 0, 113, 7, 0, 0],       // port 0
        [&[3][..], &one, &one, &one].concat(),  // more than two
        [&[1][..], &one, &[0]].concat(),        // trailing bytes
    ];
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        for punch in bad {
            let mut m = HandSender::connect(&broker.addr, &alice, "bob").await;
            let terms = Terms {
                punch: punch.clone(),
                ..hand::files(1000)
            };
            let (_, answer) = m.offer(terms, StreamId::random()).await;
            assert!(
                matches!(
                    answer,
                    Message::Refuse {
                        reason: RefuseReason::VerificationFailed,
                        ..
                    }
                ),
                "{punch:?}: {answer:?}"
            );
        }
        // Well formed (the receiver is not translated: it just accepts).
        let mut m = HandSender::connect(&broker.addr, &alice, "bob").await;
        let terms = Terms {
            punch: [&[1][..], &one].concat(),
            ..hand::files(1000)
        };
        let (_, answer) = m.offer(terms, StreamId::random()).await;
        assert!(matches!(answer, Message::Accept { .. }), "{answer:?}");
    });
}
