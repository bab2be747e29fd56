//! Bad input to the broker: garbage instead of TLS, handshakes that never end,
//! oversized and malformed frames, messages out of order, floods of offers,
//! thousands of idle connections, bad tickets. Each attacker is cut off with a
//! log line, and a normal transfer through the same broker still works. The
//! broker runs in-process (`Broker::run` on 127.0.0.1:0).

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

mod support;

use std::io::Write as _;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyferry_broker::{AccessPolicy, Limits};
use keyferry_common::handshake::{Kind, OfferParams, Terms, make_offer};
use keyferry_common::identity::PublicKey;
use keyferry_common::ids::{StreamId, TransferId};
use keyferry_common::io::connection::{ConnError, Connection};
use keyferry_common::name::AgentName;
use keyferry_common::wire::message::{AbortReason, ErrorCode, Message, Role};
use support::{
    Agent, TempDir, TestBroker, WAIT, closed, expect_error, normal_transfer, pseudo_random,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_instead_of_tls_is_cut_off() {
    let broker = TestBroker::start().await;
    let mut s = broker.tcp();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    s.write_all(&pseudo_random(4096, 3)).unwrap();
    let took = closed(s).await;
    assert!(
        took < Duration::from_secs(5),
        "garbage connection stayed open {took:?}"
    );
    broker.logs.wait_for("connection cut off", WAIT).await;
    normal_transfer(&broker, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_handshake_that_never_finishes_times_out_while_others_are_served() {
    let limits = Limits {
        handshake_timeout: Duration::from_secs(2),
        ..Limits::default()
    };
    let broker = TestBroker::start_with(limits, AccessPolicy::Open).await;
    // Half a TLS record header, then silence.
    let mut s = broker.tcp();
    s.write_all(&[0x16, 0x03, 0x01]).unwrap();
    let silent = broker.tcp();
    normal_transfer(&broker, 2).await;
    let (a, b) = (closed(s).await, closed(silent).await);
    assert!(
        a < Duration::from_secs(10) && b < Duration::from_secs(10),
        "{a:?} {b:?}"
    );
    broker.logs.wait_for("timed out", WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_frames_and_messages_out_of_order_get_an_error() {
    let broker = TestBroker::start().await;
    let alice = Agent::new(&broker, "alice", "alice");

    // A frame header announcing 2 GiB: refused before any allocation.
    let mut conn = alice.connect(Role::Sender).await;
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
    let mut conn = alice.connect(Role::Sender).await;
    conn.writer
        .write_frame(&[0, 0, 0, 3, 99, 1, 2])
        .await
        .unwrap();
    let detail = expect_error(&mut conn, ErrorCode::Protocol).await;
    assert!(detail.contains("malformed"), "{detail}");

    // A stream record on a connection that has offered nothing.
    let mut conn = alice.connect(Role::Sender).await;
    conn.writer
        .write(&Message::Chunk {
            stream_id: StreamId([1; 16]),
            record: vec![0; 100],
        })
        .await
        .unwrap();
    let detail = expect_error(&mut conn, ErrorCode::Protocol).await;
    assert!(detail.contains("unexpected Chunk"), "{detail}");

    // A receiver that accepts a transfer nobody offered hears that it is
    // gone, and stays connected (a ping still gets its pong); a stream
    // record on its control connection ends the session.
    let bob = Agent::new(&broker, "bob", "bob");
    let mut conn = bob.connect(Role::Receiver).await;
    conn.writer
        .write(&Message::Accept {
            transfer_id: TransferId([2; 16]),
            accept: vec![0; 96],
        })
        .await
        .unwrap();
    assert_eq!(
        conn.reader.read_timeout(WAIT).await.unwrap(),
        Some(Message::Abort {
            transfer_id: TransferId([2; 16]),
            reason: AbortReason::PeerGone,
        })
    );
    conn.writer
        .write(&Message::Ping { nonce: 7 })
        .await
        .unwrap();
    assert_eq!(
        conn.reader.read_timeout(WAIT).await.unwrap(),
        Some(Message::Pong { nonce: 7 })
    );
    conn.writer
        .write(&Message::Trailer {
            stream_id: StreamId([2; 16]),
            record: vec![0; 100],
        })
        .await
        .unwrap();
    let detail = expect_error(&mut conn, ErrorCode::Protocol).await;
    assert!(detail.contains("unexpected Trailer"), "{detail}");

    broker.logs.wait_for("bad frame", WAIT).await;
    normal_transfer(&broker, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_must_come_first() {
    let broker = TestBroker::start().await;
    // Raw TLS with a pinning verifier that accepts the broker, then a List first.
    let (tls, _) = raw_tls(&broker).await;
    let mut conn = Connection::new(tls);
    conn.writer.write(&Message::List).await.unwrap();
    let detail = expect_error(&mut conn, ErrorCode::Protocol).await;
    assert!(detail.contains("expected Hello"), "{detail}");
}

/// A raw TLS connection to `broker` (pinning nothing), and the broker's
/// certificate fingerprint it saw.
async fn raw_tls(
    broker: &TestBroker,
) -> (
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    keyferry_common::identity::Fingerprint,
) {
    use keyferry_common::io::tls;
    let verifier = tls::PinningVerifier::new(None);
    let config = tls::client_config(Arc::clone(&verifier)).unwrap();
    let tcp = tokio::net::TcpStream::connect(&broker.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(tls::SERVER_NAME).unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let tls::PinOutcome::Seen(fp) = verifier.outcome() else {
        panic!("no certificate seen")
    };
    (tls, fp)
}

/// Alice's `Auth` over `exporter` (as PROTOCOL.md §2.4 builds it).
fn auth_over(
    alice: &Agent,
    exporter: &[u8; 32],
    broker_fp: &keyferry_common::identity::Fingerprint,
) -> Message {
    use keyferry_common::auth;
    let id = &alice.ctx.identity;
    let signed = auth::message(
        exporter,
        &alice.ctx.name,
        Role::Sender,
        &id.fingerprint(),
        broker_fp,
    );
    Message::Auth {
        name: alice.ctx.name.clone(),
        role: Role::Sender,
        spki: id.public().spki_der().to_vec(),
        signature: id.sign(auth::CONTEXT, &signed),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auth_signed_for_another_connection_is_refused() {
    use keyferry_common::auth;
    let broker = TestBroker::start().await;
    let alice = Agent::new(&broker, "alice", "alice");
    let hello = Message::Hello {
        version: keyferry_common::PROTOCOL_VERSION,
    };
    let (first, fp) = raw_tls(&broker).await;
    let (second, _) = raw_tls(&broker).await;
    let exporter = |tls: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>, ctx| {
        let mut e = [0u8; auth::EXPORTER_LEN];
        tls.get_ref()
            .1
            .export_keying_material(&mut e, auth::EXPORTER_LABEL, ctx)
            .unwrap();
        e
    };
    // Signed over the first connection's exporter, presented on the second;
    // then over an exporter with a context (as versions 1 to 5 used a nonce).
    let stolen = auth_over(&alice, &exporter(&first, None), &fp);
    let own = auth_over(&alice, &exporter(&first, None), &fp);
    let (third, _) = raw_tls(&broker).await;
    let with_context = auth_over(&alice, &exporter(&third, Some(&[7u8; 32][..])), &fp);
    for (tls, auth) in [(second, stolen), (third, with_context)] {
        let mut conn = Connection::new(tls);
        conn.writer.write(&hello).await.unwrap();
        conn.writer.write(&auth).await.unwrap();
        assert_eq!(
            conn.reader.read_timeout(WAIT).await.unwrap(),
            Some(hello.clone())
        );
        expect_error(&mut conn, ErrorCode::AuthFailed).await;
    }
    // Over its own connection's exporter, with a request right behind it:
    // welcomed, and the request answered after the Welcome.
    let mut conn = Connection::new(first);
    let mut flight = Vec::new();
    for m in [&hello, &own, &Message::Ping { nonce: 5 }] {
        flight.extend(keyferry_common::wire::message::encode(m, 1 << 20).unwrap());
    }
    conn.writer.write_frame(&flight).await.unwrap();
    assert_eq!(
        conn.reader.read_timeout(WAIT).await.unwrap(),
        Some(hello.clone())
    );
    let welcome = conn.reader.read_timeout(WAIT).await.unwrap();
    assert!(
        matches!(welcome, Some(Message::Welcome { .. })),
        "{welcome:?}"
    );
    assert_eq!(
        conn.reader.read_timeout(WAIT).await.unwrap(),
        Some(Message::Pong { nonce: 5 })
    );
    normal_transfer(&broker, 9).await;
}

fn offer_of_size(alice: &Agent, bob_key: &PublicKey, size: u64) -> Message {
    let (_, offer) = make_offer(OfferParams {
        identity: &alice.ctx.identity,
        sender: alice.ctx.name.clone(),
        receiver: AgentName::new("bob").unwrap(),
        receiver_key: bob_key,
        stream_id: StreamId::random(),
        terms: Terms {
            kind: Kind::Files,
            size,
            size_known: true,
            resumes: None,
            receivers: 1,
            punch: Vec::new(),
        },
        now_unix: keyferry_agent::home::now_unix(),
    })
    .unwrap();
    Message::Offer {
        to: AgentName::new("bob").unwrap(),
        offer,
    }
}

fn offer_to(alice: &Agent, bob_key: &PublicKey) -> Message {
    offer_of_size(alice, bob_key, 1 << 40)
}

/// Looks up bob's key on `conn`.
async fn bob_key(conn: &mut keyferry_agent::client::AgentConn) -> PublicKey {
    conn.writer
        .write(&Message::Lookup {
            name: AgentName::new("bob").unwrap(),
        })
        .await
        .unwrap();
    let Some(Message::PeerKey { spki, .. }) = conn.reader.read_timeout(WAIT).await.unwrap() else {
        panic!("no key for bob")
    };
    PublicKey::from_spki_der(&spki).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_offers_is_rate_limited() {
    let limits = Limits {
        offers_per_minute: 5,
        ..Limits::default()
    };
    let broker = TestBroker::start_with(limits, AccessPolicy::Open).await;
    let (alice, bob) = (
        Agent::new(&broker, "alice", "alice"),
        Agent::new(&broker, "bob", "bob"),
    );
    let out = TempDir::new("out");
    // bob refuses every one of these (1 TiB is over its --max-size).
    let receiver = bob.receiver(&broker, out.path(), false).await;
    let mut conn = alice.connect(Role::Sender).await;
    let key = bob_key(&mut conn).await;
    let mut refused = 0;
    let limited = loop {
        conn.writer.write(&offer_to(&alice, &key)).await.unwrap();
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
    broker.logs.wait_for("rate limit", WAIT).await;
    receiver.abort();
    // alice is limited for a minute; a normal transfer between others still works.
    let (carol, dave) = (
        Agent::new(&broker, "carol", "carol"),
        Agent::new(&broker, "dave", "dave"),
    );
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    let r = dave.receiver(&broker, out.path(), true).await;
    std::fs::write(src.join("x"), b"still serving").unwrap();
    let sent = carol.send_file("dave", &src.join("x")).await;
    assert!(sent.is_ok(), "{sent:?}");
    assert!(r.await.unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_transfers_per_agent_are_limited() {
    let limits = Limits {
        max_transfers_per_agent: 1,
        ..Limits::default()
    };
    let broker = TestBroker::start_with(limits, AccessPolicy::Open).await;
    let (alice, bob) = (
        Agent::new(&broker, "alice", "alice"),
        Agent::new(&broker, "bob", "bob"),
    );
    // A receiver that never answers keeps alice's first offer pending.
    let _silent_receiver = bob.connect(Role::Receiver).await;
    let mut first = alice.connect(Role::Sender).await;
    let key = bob_key(&mut first).await;
    first.writer.write(&offer_to(&alice, &key)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut second = alice.connect(Role::Sender).await;
    second.writer.write(&offer_to(&alice, &key)).await.unwrap();
    let detail = expect_error(&mut second, ErrorCode::RateLimited).await;
    assert!(detail.contains("transfers at once"), "{detail}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_idle_connections_do_not_stop_service_and_are_cut_off() {
    let limits = Limits {
        max_connections_per_ip: 5000,
        handshake_timeout: Duration::from_secs(3),
        ..Limits::default()
    };
    let broker = TestBroker::start_with(limits, AccessPolicy::Open).await;
    let idle: Vec<TcpStream> = (0..2000).map(|_| broker.tcp()).collect();
    let start = Instant::now();
    normal_transfer(&broker, 4).await;
    // Every idle connection is closed by the handshake deadline (or cut to
    // make room for a newer connection from the same address).
    let all = tokio::task::spawn_blocking(move || {
        idle.into_iter()
            .map(support::wait_closed)
            .max()
            .unwrap_or_default()
    })
    .await
    .unwrap();
    assert!(start.elapsed() < Duration::from_secs(40), "{all:?}");
    broker.logs.wait_for("timed out", WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_address_connection_limit_refuses_the_excess() {
    let limits = Limits {
        max_connections_per_ip: 20,
        handshake_timeout: Duration::from_secs(2),
        ..Limits::default()
    };
    let broker = TestBroker::start_with(limits, AccessPolicy::Open).await;
    let held: Vec<TcpStream> = (0..20).map(|_| broker.tcp()).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let excess = broker.tcp();
    let took = closed(excess).await;
    assert!(
        took < Duration::from_secs(1),
        "the 21st connection was held {took:?}"
    );
    broker.logs.wait_for("per-address limit", WAIT).await;
    // Once the idle ones are cut off at the handshake deadline, service resumes.
    for s in held {
        closed(s).await;
    }
    normal_transfer(&broker, 5).await;
}

#[test]
fn a_non_loopback_broker_needs_an_access_policy() {
    let data = TempDir::new("broker");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(["--listen", "0.0.0.0:0", "--data-dir"])
        .arg(data.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("without an access policy") && err.contains("--allow-file"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowlist_admits_only_the_listed_name_and_key() {
    let data = TempDir::new("broker");
    let pem = std::fs::read_to_string(support::fixture_path("alice")).unwrap();
    let fp = keyferry_common::identity::Identity::from_pkcs8_pem(&pem)
        .unwrap()
        .unwrap()
        .fingerprint();
    let allow = data.join("allow");
    std::fs::write(&allow, format!("alice {fp}\n")).unwrap();
    let policy = AccessPolicy::from_file(&allow).unwrap();
    let broker = TestBroker::start_in(data, Limits::default(), policy).await;
    let alice = Agent::new(&broker, "alice", "alice");
    assert!(alice.list().await.is_ok());
    let bob = Agent::new(&broker, "bob", "bob");
    let refused = bob.list().await.unwrap_err();
    assert_eq!(refused.exit_code(), 10, "{refused}");
    assert!(refused.to_string().contains("allowlist"), "{refused}");
    // Alice's name with another key is refused too.
    let impostor = Agent::new(&broker, "alice", "mallory");
    assert_eq!(impostor.list().await.unwrap_err().exit_code(), 10);
}

/// Sends `msg` on a fresh plain connection and returns what the broker answers
/// (`None` if it answers nothing and keeps the connection).
async fn plain(broker: &TestBroker, msg: Option<&Message>, raw: &[u8]) -> Option<Message> {
    let tcp = tokio::net::TcpStream::connect(&broker.addr).await.unwrap();
    let mut conn = Connection::new(tcp);
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

/// Bob's receiver into `out`, and alice's offer of 5 bytes to it accepted:
/// the receiver's task, alice's connection (kept open), the transfer and
/// alice's ticket.
async fn an_accepted_offer(
    broker: &TestBroker,
    out: &TempDir,
) -> (
    tokio::task::JoinHandle<Result<(), keyferry_agent::error::AgentError>>,
    keyferry_agent::client::AgentConn,
    TransferId,
    [u8; 32],
) {
    let (alice, bob) = (
        Agent::new(broker, "alice", "alice"),
        Agent::new(broker, "bob", "bob"),
    );
    let receiver = bob.receiver(broker, out.path(), true).await;
    let mut conn = alice.connect(Role::Sender).await;
    let key = bob_key(&mut conn).await;
    conn.writer
        .write(&offer_of_size(&alice, &key, 5))
        .await
        .unwrap();
    let Some(Message::Accept { transfer_id, .. }) = conn.reader.read_timeout(WAIT).await.unwrap()
    else {
        panic!("bob did not accept")
    };
    let Some(Message::Ticket { ticket, .. }) = conn.reader.read_timeout(WAIT).await.unwrap() else {
        panic!("no ticket")
    };
    (receiver, conn, transfer_id, ticket)
}

/// Asserts that the broker answered `UnknownTransfer`.
fn unknown(m: Option<Message>) {
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_connections_need_a_valid_unused_ticket() {
    let broker = TestBroker::start().await;
    let out = TempDir::new("out");
    let (receiver, _conn, transfer_id, ticket) = an_accepted_offer(&broker, &out).await;
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
    let mut admitted = Connection::new(tcp);
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
        .logs
        .wait_for("no transfer waits for this ticket", WAIT)
        .await;
    broker.logs.wait_for("neither TLS nor", WAIT).await;
    // Ending the stream without a trailer fails bob's transfer; nothing is kept.
    drop(admitted);
    let received = tokio::time::timeout(WAIT, receiver).await.unwrap().unwrap();
    assert!(received.is_err());
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
    normal_transfer(&broker, 6).await;
}

/// Sends `msg` alone on a fresh plain connection and returns what the broker
/// answers (`None` if it answers nothing and keeps the connection).
async fn alone(broker: &TestBroker, msg: &Message) -> Option<Message> {
    let tcp = tokio::net::TcpStream::connect(&broker.addr).await.unwrap();
    let mut conn = Connection::new(tcp);
    conn.writer.write(msg).await.unwrap();
    conn.reader
        .read_timeout(Duration::from_secs(2))
        .await
        .ok()
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_over_several_connections_needs_each_place_once_and_all_of_them() {
    let broker = TestBroker::start().await;
    let out = TempDir::new("out");
    let (receiver, _conn, transfer_id, ticket) = an_accepted_offer(&broker, &out).await;
    let lane = |lane, ticket| Message::RedeemLane {
        transfer_id,
        ticket,
        lane,
    };
    let first = |lanes| Message::RedeemLanes {
        transfer_id,
        ticket,
        lanes,
    };
    let mut wrong = ticket;
    wrong[0] ^= 1;
    // A wrong ticket, places out of range, counts out of range: refused.
    unknown(alone(&broker, &lane(1, wrong)).await);
    for bad in [0, 8, 255] {
        unknown(alone(&broker, &lane(bad, ticket)).await);
    }
    for bad in [0, 1, 9] {
        unknown(alone(&broker, &first(bad)).await);
    }
    // A place is held before the first comes (no answer), and taken once.
    let held = tokio::net::TcpStream::connect(&broker.addr).await.unwrap();
    let mut held = Connection::new(held);
    held.writer.write(&lane(1, ticket)).await.unwrap();
    assert!(
        held.reader
            .read_timeout(Duration::from_millis(300))
            .await
            .is_err(),
        "the broker answered a lane it holds"
    );
    unknown(alone(&broker, &lane(1, ticket)).await);
    // The first says three; place 2 never comes: within 3 s both it and
    // place 1 are closed, and the transfer is not relayed.
    let tcp = tokio::net::TcpStream::connect(&broker.addr).await.unwrap();
    let mut lead = Connection::new(tcp);
    lead.writer.write(&first(3)).await.unwrap();
    let began = Instant::now();
    for c in [&mut lead, &mut held] {
        let end = c.reader.read_timeout(Duration::from_secs(6)).await;
        assert!(matches!(end, Ok(None) | Err(ConnError::Io(_))), "{end:?}");
    }
    let took = began.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(6),
        "{took:?}"
    );
    // The ticket was used by that first: another is refused.
    unknown(alone(&broker, &first(2)).await);
    let received = tokio::time::timeout(WAIT, receiver).await.unwrap().unwrap();
    assert!(received.is_err());
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
    let tid = transfer_id.to_string();
    let logs = broker.logs.text();
    assert!(
        !logs
            .lines()
            .any(|l| l.contains("transfer started") && l.contains(&tid)),
        "{logs}"
    );
    normal_transfer(&broker, 7).await;
}
