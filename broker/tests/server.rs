//! `Broker::run` itself, in-process on 127.0.0.1:0 (as mini-redis'
//! `tests/server.rs`): serving, and the graceful shutdown — on the signal it
//! stops accepting and ends control sessions, lets a running transfer finish
//! within the grace period, cuts what is still running after it, and returns
//! once the last connection task ended.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

mod support;

use std::time::Duration;

use keyferry_broker::{AccessPolicy, Limits};
use keyferry_common::handshake::{Kind, OfferParams, Terms, make_offer};
use keyferry_common::identity::PublicKey;
use keyferry_common::io::connection::Connection;
use keyferry_common::name::AgentName;
use keyferry_common::wire::message::{Message, Role};
use support::{Agent, TempDir, TestBroker, WAIT, normal_transfer, pseudo_random};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_transfers_and_lists_who_is_online() {
    let broker = TestBroker::start().await;
    let carol = Agent::new(&broker, "carol", "carol");
    let out = TempDir::new("out");
    let _receiver = carol.receiver(&broker, out.path(), false).await;
    let alice = Agent::new(&broker, "alice", "alice");
    let online = alice.list().await.unwrap();
    let carol_entry = online.iter().find(|a| a.name.as_str() == "carol").unwrap();
    assert!(carol_entry.receiving);
    normal_transfer(&broker, 11).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_control_sessions_but_lets_a_running_transfer_finish() {
    let broker = TestBroker::start().await;
    let (alice, bob) = (
        Agent::new(&broker, "alice", "alice"),
        Agent::new(&broker, "bob", "bob"),
    );
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    let data = pseudo_random(192 << 20, 12);
    std::fs::write(src.join("big.bin"), &data).unwrap();
    let receiver = bob.receiver(&broker, out.path(), false).await;
    let idle_sender = alice.connect(Role::Sender).await;
    let sending = tokio::spawn(async move {
        let sent = alice.send_file("bob", &src.join("big.bin")).await;
        (sent, src)
    });
    broker.logs.wait_for("transfer started", WAIT).await;
    let logs = broker.logs.clone();
    let stopped = tokio::spawn(broker.stop(WAIT));
    // The transfer completes; the control connections do not outlive the signal.
    let (sent, _src) = sending.await.unwrap();
    assert!(sent.is_ok(), "{sent:?}");
    assert_eq!(std::fs::read(out.join("big.bin")).unwrap(), data);
    let took = stopped.await.unwrap();
    assert!(
        took < Duration::from_secs(30),
        "run returned after {took:?}"
    );
    // The receiver's control connection ended; the receiver itself waits
    // to reconnect (the broker may come back), so it is still running.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !receiver.is_finished(),
        "the receiver keeps trying to reconnect"
    );
    receiver.abort();
    let mut idle = idle_sender;
    assert!(matches!(
        idle.reader.read_timeout(WAIT).await,
        Ok(None) | Err(_)
    ));
    logs.wait_for("shutting down", WAIT).await;
    logs.wait_for("shut down", WAIT).await;
    assert!(!logs.text().contains("cutting"), "{}", logs.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_grace_period_a_running_transfer_is_cut() {
    let limits = Limits {
        shutdown_grace: Duration::from_secs(1),
        ..Limits::default()
    };
    let broker = TestBroker::start_with(limits, AccessPolicy::Open).await;
    let (alice, bob) = (
        Agent::new(&broker, "alice", "alice"),
        Agent::new(&broker, "bob", "bob"),
    );
    let out = TempDir::new("out");
    let receiver = bob.receiver(&broker, out.path(), true).await;
    // A sender that redeems its ticket and then sends nothing: the relay runs
    // (idle for up to 120 s) until the shutdown cuts it.
    let mut conn = alice.connect(Role::Sender).await;
    conn.writer
        .write(&Message::Lookup {
            name: AgentName::new("bob").unwrap(),
        })
        .await
        .unwrap();
    let Some(Message::PeerKey { spki, .. }) = conn.reader.read_timeout(WAIT).await.unwrap() else {
        panic!("no key for bob")
    };
    let (_, offer) = make_offer(OfferParams {
        identity: &alice.ctx.identity,
        sender: alice.ctx.name.clone(),
        receiver: AgentName::new("bob").unwrap(),
        receiver_key: &PublicKey::from_spki_der(&spki).unwrap(),
        stream_id: keyferry_common::ids::StreamId::random(),
        terms: Terms {
            kind: Kind::Files,
            size: 1000,
            size_known: true,
            resumes: None,
            receivers: 1,
            punch: Vec::new(),
        },
        now_unix: keyferry_agent::home::now_unix(),
    })
    .unwrap();
    conn.writer
        .write(&Message::Offer {
            to: AgentName::new("bob").unwrap(),
            offer,
        })
        .await
        .unwrap();
    let Some(Message::Accept { transfer_id, .. }) = conn.reader.read_timeout(WAIT).await.unwrap()
    else {
        panic!("not accepted")
    };
    let Some(Message::Ticket { ticket, .. }) = conn.reader.read_timeout(WAIT).await.unwrap() else {
        panic!("no ticket")
    };
    let tcp = tokio::net::TcpStream::connect(&broker.addr).await.unwrap();
    let mut data = Connection::new(tcp);
    data.writer
        .write(&Message::Redeem {
            transfer_id,
            ticket,
        })
        .await
        .unwrap();
    broker.logs.wait_for("transfer started", WAIT).await;
    let logs = broker.logs.clone();
    let took = broker.stop(WAIT).await;
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(15),
        "run returned after {took:?}"
    );
    logs.wait_for("grace period over", WAIT).await;
    assert!(logs.text().contains("cut=1"), "{}", logs.text());
    logs.wait_for("cut by the broker's shutdown", WAIT).await;
    // The receiver gets the broker's Abort (or the end of its connection)
    // and keeps nothing.
    assert!(
        tokio::time::timeout(WAIT, receiver)
            .await
            .unwrap()
            .unwrap()
            .is_err()
    );
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
}
