//! Bad input to the broker: garbage instead of TLS, handshakes that never end,
//! oversized and malformed frames, messages out of order, floods of offers,
//! thousands of idle connections. Each attacker is cut off with a log line,
//! and a normal transfer through the same broker still works.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

mod support;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyferry_agent::client::{AgentConn, Ctx, connect};
use keyferry_agent::home::Home as AgentHome;
use keyferry_common::handshake::{Kind, Metadata, OfferParams, make_offer};
use keyferry_common::identity::PublicKey;
use keyferry_common::name::AgentName;
use keyferry_common::wire::message::{ErrorCode, Message, Role};
use support::{Broker, Home, TempDir, WAIT, pseudo_random};

/// A normal transfer from alice to bob through `broker`, checked byte for byte.
fn normal_transfer(broker: &Broker, tag: u64) {
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    let mut receiver = bob.receiver(broker, out.path(), &["--once"]);
    let data = pseudo_random(1 << 20, tag);
    std::fs::write(src.join("ok.bin"), &data).unwrap();
    let sent = alice.send_file(broker, "bob", &src.join("ok.bin"), &[]);
    assert_eq!(sent.code, Some(0), "normal transfer failed: {sent:#?}");
    assert_eq!(receiver.wait(WAIT), Some(0));
    assert_eq!(std::fs::read(out.join("ok.bin")).unwrap(), data);
}

fn tcp(broker: &Broker) -> TcpStream {
    let s = TcpStream::connect(&broker.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

/// Reads until the broker closes the connection; returns how long that took.
fn wait_closed(mut s: TcpStream) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return start.elapsed(),
            Ok(_) => {}
        }
    }
}

/// An authenticated connection as `name` with fixture key `key`, made by the
/// agent's own client code.
async fn authenticated(broker: &Broker, home: &Home, role: Role) -> (Ctx, AgentConn) {
    let h = AgentHome::open(home.dir.path().to_owned()).unwrap();
    let ctx = Ctx {
        broker: broker.addr.clone(),
        broker_fingerprint: None,
        identity: Arc::new(h.identity().unwrap()),
        home: h,
        name: AgentName::new(&home.name).unwrap(),
    };
    let conn = connect(&ctx, role).await.unwrap();
    (ctx, conn)
}

async fn expect_error(conn: &mut AgentConn, code: ErrorCode) -> String {
    match conn.reader.read_timeout(WAIT).await {
        Ok(Some(Message::Error { code: c, detail })) if c == code => detail,
        other => panic!("expected Error {code:?}, got {other:?}"),
    }
}

#[test]
fn garbage_instead_of_tls_is_cut_off() {
    let broker = Broker::start();
    let mut s = tcp(&broker);
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    s.write_all(&pseudo_random(4096, 3)).unwrap();
    let took = wait_closed(s);
    assert!(
        took < Duration::from_secs(5),
        "garbage connection stayed open {took:?}"
    );
    let mut broker = broker;
    broker.proc.stderr.wait_for("connection cut off", WAIT);
    normal_transfer(&broker, 1);
}

#[test]
fn a_tls_handshake_that_never_finishes_times_out_while_others_are_served() {
    let mut broker = Broker::start_with(TempDir::new("broker"), &["--handshake-timeout", "2s"]);
    // Half a TLS record header, then silence.
    let mut s = tcp(&broker);
    s.write_all(&[0x16, 0x03, 0x01]).unwrap();
    let silent = tcp(&broker);
    normal_transfer(&broker, 2);
    let (a, b) = (wait_closed(s), wait_closed(silent));
    assert!(
        a < Duration::from_secs(10) && b < Duration::from_secs(10),
        "{a:?} {b:?}"
    );
    broker.proc.stderr.wait_for("timed out", WAIT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_frames_and_messages_out_of_order_get_an_error() {
    let mut broker = Broker::start();
    let alice = Home::new("alice", "alice");

    // A frame header announcing 2 GiB: refused before any allocation.
    let (_, mut conn) = authenticated(&broker, &alice, Role::Sender).await;
    conn.writer
        .write_frame(&[0x7f, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    let detail = expect_error(&mut conn, ErrorCode::Protocol).await;
    assert!(detail.contains("exceeds the limit"), "{detail}");
    assert!(
        conn.reader.read_timeout(WAIT).await.unwrap().is_none(),
        "connection closed after the error"
    );

    // A frame of the right size that is not a message.
    let (_, mut conn) = authenticated(&broker, &alice, Role::Sender).await;
    conn.writer
        .write_frame(&[0, 0, 0, 3, 99, 1, 2])
        .await
        .unwrap();
    let detail = expect_error(&mut conn, ErrorCode::Protocol).await;
    assert!(detail.contains("malformed"), "{detail}");

    // A stream record on a connection that has offered nothing.
    let (_, mut conn) = authenticated(&broker, &alice, Role::Sender).await;
    conn.writer
        .write(&Message::Chunk {
            transfer_id: keyferry_common::ids::TransferId([1; 16]),
            record: vec![0; 100],
        })
        .await
        .unwrap();
    let detail = expect_error(&mut conn, ErrorCode::Protocol).await;
    assert!(detail.contains("unexpected Chunk"), "{detail}");

    // A data connection that does not start with an accept, and one that
    // accepts a transfer nobody offered.
    let bob = Home::new("bob", "bob");
    let (_, mut conn) = authenticated(&broker, &bob, Role::Data).await;
    conn.writer.write(&Message::List).await.unwrap();
    expect_error(&mut conn, ErrorCode::Protocol).await;
    let (_, mut conn) = authenticated(&broker, &bob, Role::Data).await;
    conn.writer
        .write(&Message::Accept {
            transfer_id: keyferry_common::ids::TransferId([2; 16]),
            accept: vec![0; 96],
        })
        .await
        .unwrap();
    expect_error(&mut conn, ErrorCode::UnknownTransfer).await;

    broker.proc.stderr.wait_for("bad frame", WAIT);
    tokio::task::spawn_blocking(move || normal_transfer(&broker, 3))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_must_come_first() {
    let broker = Broker::start();
    // Raw TLS with a pinning verifier that accepts the broker, then Auth first.
    let verifier = keyferry_common::io::tls::PinningVerifier::new(None);
    let config = keyferry_common::io::tls::client_config(verifier).unwrap();
    let tcp = tokio::net::TcpStream::connect(&broker.addr).await.unwrap();
    let name =
        rustls::pki_types::ServerName::try_from(keyferry_common::io::tls::SERVER_NAME).unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let mut conn = keyferry_common::io::connection::Connection::new(tls);
    conn.writer.write(&Message::List).await.unwrap();
    let detail = expect_error(&mut conn, ErrorCode::Protocol).await;
    assert!(detail.contains("expected Hello"), "{detail}");
}

fn offer_to(alice_home: &Home, bob_key: &PublicKey) -> Message {
    offer_of_size(alice_home, bob_key, 1 << 40)
}

fn offer_of_size(alice_home: &Home, bob_key: &PublicKey, size: u64) -> Message {
    let identity =
        keyferry_agent::home::load_identity(&alice_home.dir.join("identity.pem")).unwrap();
    let (_, offer) = make_offer(OfferParams {
        identity: &identity,
        sender: AgentName::new(&alice_home.name).unwrap(),
        receiver: AgentName::new("bob").unwrap(),
        receiver_key: bob_key,
        metadata: Metadata {
            kind: Kind::File,
            name: "flood.bin".into(),
            size,
        },
        now_unix: keyferry_agent::home::now_unix(),
    })
    .unwrap();
    Message::Offer {
        to: AgentName::new("bob").unwrap(),
        offer,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_offers_is_rate_limited() {
    let mut broker = Broker::start_with(TempDir::new("broker"), &["--offers-per-minute", "5"]);
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let out = TempDir::new("out");
    // bob refuses every one of these (1 TiB is over its --max-size).
    let _receiver = bob.receiver(&broker, out.path(), &[]);
    let (_, mut conn) = authenticated(&broker, &alice, Role::Sender).await;
    conn.writer
        .write(&Message::Lookup {
            name: AgentName::new("bob").unwrap(),
        })
        .await
        .unwrap();
    let Some(Message::PeerKey { spki, .. }) = conn.reader.read_timeout(WAIT).await.unwrap() else {
        panic!("no key for bob")
    };
    let bob_key = PublicKey::from_spki_der(&spki).unwrap();
    let mut refused = 0;
    let limited = loop {
        conn.writer
            .write(&offer_to(&alice, &bob_key))
            .await
            .unwrap();
        match conn.reader.read_timeout(WAIT).await.unwrap() {
            Some(Message::Refuse { .. }) => refused += 1,
            Some(Message::Error {
                code: ErrorCode::RateLimited,
                detail,
            }) => break detail,
            other => panic!("unexpected {other:?}"),
        }
        assert!(refused <= 5, "more than 5 offers in a minute went through");
    };
    assert_eq!(refused, 5);
    assert!(limited.contains("offers in a minute"), "{limited}");
    broker.proc.stderr.wait_for("rate limit", WAIT);
    drop(_receiver);
    tokio::task::spawn_blocking(move || {
        // alice is limited for a minute; a normal transfer between others still works.
        let (carol, dave) = (Home::new("carol", "carol"), Home::new("dave", "dave"));
        let (src, out) = (TempDir::new("src"), TempDir::new("out"));
        let mut r = dave.receiver(&broker, out.path(), &["--once"]);
        std::fs::write(src.join("x"), b"still serving").unwrap();
        let sent = carol.send_file(&broker, "dave", &src.join("x"), &[]);
        assert_eq!(sent.code, Some(0), "{sent:#?}");
        assert_eq!(r.wait(WAIT), Some(0));
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_transfers_per_agent_are_limited() {
    let broker = Broker::start_with(TempDir::new("broker"), &["--max-transfers-per-agent", "1"]);
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    // A receiver that never answers keeps alice's first offer pending.
    let (_, _silent_receiver) = authenticated(&broker, &bob, Role::Receiver).await;
    let (_, mut first) = authenticated(&broker, &alice, Role::Sender).await;
    first
        .writer
        .write(&Message::Lookup {
            name: AgentName::new("bob").unwrap(),
        })
        .await
        .unwrap();
    let Some(Message::PeerKey { spki, .. }) = first.reader.read_timeout(WAIT).await.unwrap() else {
        panic!("no key for bob")
    };
    let bob_key = PublicKey::from_spki_der(&spki).unwrap();
    first
        .writer
        .write(&offer_to(&alice, &bob_key))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, mut second) = authenticated(&broker, &alice, Role::Sender).await;
    second
        .writer
        .write(&offer_to(&alice, &bob_key))
        .await
        .unwrap();
    let detail = expect_error(&mut second, ErrorCode::RateLimited).await;
    assert!(detail.contains("transfers at once"), "{detail}");
}

#[test]
fn thousands_of_idle_connections_do_not_stop_service_and_are_cut_off() {
    let mut broker = Broker::start_with(
        TempDir::new("broker"),
        &[
            "--max-connections-per-ip",
            "5000",
            "--handshake-timeout",
            "3s",
        ],
    );
    let idle: Vec<TcpStream> = (0..2000).map(|_| tcp(&broker)).collect();
    let start = Instant::now();
    normal_transfer(&broker, 4);
    // Every idle connection is closed by the handshake deadline.
    for s in idle {
        let left = wait_closed(s);
        assert!(start.elapsed() + left < Duration::from_secs(40));
    }
    broker.proc.stderr.wait_for("timed out", WAIT);
}

#[test]
fn the_per_address_connection_limit_refuses_the_excess() {
    let mut broker = Broker::start_with(
        TempDir::new("broker"),
        &[
            "--max-connections-per-ip",
            "20",
            "--handshake-timeout",
            "2s",
        ],
    );
    let held: Vec<TcpStream> = (0..20).map(|_| tcp(&broker)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let excess = tcp(&broker);
    let took = wait_closed(excess);
    assert!(
        took < Duration::from_secs(1),
        "the 21st connection was held {took:?}"
    );
    broker.proc.stderr.wait_for("per-address limit", WAIT);
    // Once the idle ones are cut off at the handshake deadline, service resumes.
    for s in held {
        wait_closed(s);
    }
    normal_transfer(&broker, 5);
}

#[test]
fn a_non_loopback_broker_needs_an_access_policy() {
    let data = TempDir::new("broker");
    let mut cmd = std::process::Command::new(support::broker_bin());
    cmd.args(["--listen", "0.0.0.0:0", "--data-dir"])
        .arg(data.path());
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("without an access policy") && err.contains("--allow-file"),
        "{err}"
    );
}

#[test]
fn an_allowlist_admits_only_the_listed_name_and_key() {
    let alice = Home::new("alice", "alice");
    let fp = keyferry_agent::home::load_identity(&alice.dir.join("identity.pem"))
        .unwrap()
        .fingerprint();
    let data = TempDir::new("broker");
    let allow = data.join("allow");
    std::fs::write(&allow, format!("alice {fp}\n")).unwrap();
    let allow = allow.to_str().unwrap().to_owned();
    let broker = Broker::start_with(data, &["--allow-file", &allow]);
    assert_eq!(alice.run(&broker, &["--list"]).code, Some(0));
    let bob = Home::new("bob", "bob");
    let run = bob.run(&broker, &["--list"]);
    assert_eq!(run.code, Some(10), "{run:#?}");
    assert!(run.stderr.contains("allowlist"), "{}", run.stderr);
    // Alice's name with another key is refused too.
    let impostor = Home::new("alice", "mallory");
    assert_eq!(impostor.run(&broker, &["--list"]).code, Some(10));
}

/// Sends `msg` on a fresh plain connection and returns what the broker answers
/// (`None` if it answers nothing and keeps the connection).
async fn plain(broker: &Broker, msg: Option<&Message>, raw: &[u8]) -> Option<Message> {
    let tcp = tokio::net::TcpStream::connect(&broker.addr).await.unwrap();
    let mut conn = keyferry_common::io::connection::Connection::new(tcp);
    if let Some(m) = msg {
        conn.writer.write(m).await.unwrap();
    }
    conn.writer.write_frame(raw).await.unwrap();
    conn.reader
        .read_timeout(Duration::from_secs(2))
        .await
        .ok()
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_connections_need_a_valid_unused_ticket() {
    use keyferry_common::ids::TransferId;
    let mut broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let out = TempDir::new("out");
    let mut receiver = bob.receiver(&broker, out.path(), &["--once"]);
    let (_, mut conn) = authenticated(&broker, &alice, Role::Sender).await;
    conn.writer
        .write(&Message::Lookup {
            name: AgentName::new("bob").unwrap(),
        })
        .await
        .unwrap();
    let Some(Message::PeerKey { spki, .. }) = conn.reader.read_timeout(WAIT).await.unwrap() else {
        panic!("no key for bob")
    };
    let offer = offer_of_size(&alice, &PublicKey::from_spki_der(&spki).unwrap(), 5);
    conn.writer.write(&offer).await.unwrap();
    let Some(Message::Accept { transfer_id, .. }) = conn.reader.read_timeout(WAIT).await.unwrap()
    else {
        panic!("bob did not accept")
    };
    let Some(Message::Ticket { ticket, .. }) = conn.reader.read_timeout(WAIT).await.unwrap() else {
        panic!("no ticket")
    };
    let unknown = |m: Option<Message>| {
        assert!(
            matches!(
                m,
                Some(Message::Error {
                    code: ErrorCode::UnknownTransfer,
                    ..
                })
            ),
            "{m:?}"
        )
    };
    let redeem = |transfer_id, ticket| Message::Redeem {
        transfer_id,
        ticket,
    };
    // A wrong ticket for the right transfer; the right ticket for another one.
    let mut wrong = ticket;
    wrong[31] ^= 1;
    unknown(plain(&broker, Some(&redeem(transfer_id, wrong)), &[]).await);
    unknown(plain(&broker, Some(&redeem(TransferId([9; 16]), ticket)), &[]).await);
    // Something else first, and bytes that are neither TLS nor a frame.
    for other in [
        plain(&broker, Some(&Message::List), &[]).await,
        plain(&broker, None, b"SSH-2.0-x\r\n").await,
    ] {
        assert!(
            matches!(
                other,
                Some(Message::Error {
                    code: ErrorCode::Protocol,
                    ..
                })
            ),
            "{other:?}"
        );
    }
    // The right ticket is admitted (no answer: the stream starts) — once.
    let tcp = tokio::net::TcpStream::connect(&broker.addr).await.unwrap();
    let mut admitted = keyferry_common::io::connection::Connection::new(tcp);
    admitted
        .writer
        .write(&redeem(transfer_id, ticket))
        .await
        .unwrap();
    assert!(
        admitted
            .reader
            .read_timeout(Duration::from_millis(500))
            .await
            .is_err(),
        "the broker answered an admitted data connection"
    );
    unknown(plain(&broker, Some(&redeem(transfer_id, ticket)), &[]).await);
    broker
        .proc
        .stderr
        .wait_for("no transfer waits for this ticket", WAIT);
    broker.proc.stderr.wait_for("neither TLS nor", WAIT);
    // Ending the stream without a trailer fails bob's transfer; nothing is kept.
    drop(admitted);
    assert_ne!(receiver.wait(WAIT), Some(0));
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
    tokio::task::spawn_blocking(move || normal_transfer(&broker, 6))
        .await
        .unwrap();
}
