//! The broker's side of stored transfers (PROTOCOL.md §2.8), spoken to raw:
//! a `Store` must name its connection's agent and key and the receiver's
//! registered key, and an upload whose frames are out of place, of another
//! transfer or stream, aborted, or longer than announced is voided — nothing
//! of it is ever stored or offered.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keyferry_common::handshake::prekey::{BundleKind, make_bundle, verify_bundle};
use keyferry_common::handshake::stored::{StoredParams, make_stored_offer};
use keyferry_common::handshake::{Kind, SignedOffer, Terms};
use keyferry_common::identity::PublicKey;
use keyferry_common::ids::{StreamId, TransferId};
use keyferry_common::io::connection::Connection;
use keyferry_common::name::AgentName;
use keyferry_common::wire::message::{AbortReason, ErrorCode, Message, Role};
use support::{Agent, TestBroker, expect_error};

const WAIT: Duration = Duration::from_secs(30);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn name(s: &str) -> AgentName {
    AgentName::new(s).unwrap()
}

/// Bob deposits `n` one-time bundles and goes offline.
async fn bob_leaves_prekeys(broker: &TestBroker, bob: &Agent, n: usize) {
    let mut rx = bob.connect(Role::Receiver).await;
    let bundles = (0..n)
        .map(|_| {
            let (signed, _, _) = make_bundle(
                &bob.ctx.identity,
                &name("bob"),
                BundleKind::OneTime,
                now(),
                7 * 86400,
            );
            serde_bytes::ByteBuf::from(signed)
        })
        .collect();
    rx.writer
        .write(&Message::Prekeys {
            bundles,
            last_resort: Vec::new(),
        })
        .await
        .unwrap();
    let count = rx.reader.read_timeout(WAIT).await.unwrap();
    assert!(
        matches!(count, Some(Message::PrekeyCount { one_time, .. }) if one_time as usize == n),
        "{count:?}"
    );
    drop(rx);
    broker
        .logs
        .wait_for("receiver offline agent=bob", WAIT)
        .await;
}

/// Asks on `conn` to store `offer` (1000 bytes announced) for `to`.
async fn ask_to_store(conn: &mut keyferry_agent::client::AgentConn, to: &str, offer: SignedOffer) {
    let store = Message::Store {
        to: name(to),
        offer,
        size: 1000,
    };
    conn.writer.write(&store).await.unwrap();
}

/// Alice's stored offer to bob, against a bundle fetched on `conn`.
async fn sealed(
    alice: &Agent,
    conn: &mut keyferry_agent::client::AgentConn,
) -> (SignedOffer, TransferId, StreamId) {
    conn.writer
        .write(&Message::FetchPrekey { name: name("bob") })
        .await
        .unwrap();
    let Some(Message::Prekey { spki, bundle, .. }) = conn.reader.read_timeout(WAIT).await.unwrap()
    else {
        panic!("no prekey")
    };
    let key = PublicKey::from_spki_der(&spki).unwrap();
    let bundle = verify_bundle(&bundle, &key, &name("bob"), now()).unwrap();
    let stream_id = StreamId::random();
    let (offer, pair) = make_stored_offer(StoredParams {
        identity: &alice.ctx.identity,
        sender: name("alice"),
        receiver_key: &key,
        bundle: &bundle,
        stream_id,
        terms: Terms {
            kind: Kind::Files,
            size: 100,
            size_known: true,
            resumes: None,
            receivers: 1,
            punch: Vec::new(),
        },
        now_unix: now(),
    })
    .unwrap();
    (offer, pair.transfer_id, stream_id)
}

/// What the broker's mailbox holds on disk (objects: in progress or stored).
fn objects(broker: &TestBroker) -> Vec<String> {
    std::fs::read_dir(broker.data.join("mailbox/objects"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[tokio::test]
async fn an_upload_out_of_place_or_too_long_is_voided_and_leaves_nothing() {
    let broker = TestBroker::start().await;
    let (alice, bob) = (
        Agent::new(&broker, "alice", "alice"),
        Agent::new(&broker, "bob", "bob"),
    );
    bob_leaves_prekeys(&broker, &bob, 6).await;
    // Each upload: what its sender sends after its Redeem.
    type Frames = fn(TransferId, StreamId) -> Vec<Message>;
    let cases: [(&str, Frames); 5] = [
        ("manifest before the root", |_, sid| {
            vec![Message::Manifest {
                stream_id: sid,
                record: vec![0; 64],
            }]
        }),
        ("the root of another transfer", |_, _| {
            vec![Message::Root {
                transfer_id: TransferId([7; 16]),
                record: vec![0; 96],
            }]
        }),
        ("a chunk of another stream", |tid, sid| {
            vec![
                Message::Root {
                    transfer_id: tid,
                    record: vec![0; 96],
                },
                Message::Manifest {
                    stream_id: sid,
                    record: vec![0; 64],
                },
                Message::Chunk {
                    stream_id: StreamId([9; 16]),
                    record: vec![0; 64],
                },
            ]
        }),
        ("an abort", |tid, _| {
            vec![Message::Abort {
                transfer_id: tid,
                reason: AbortReason::Interrupted,
            }]
        }),
        ("more than announced", |tid, sid| {
            let mut frames = vec![
                Message::Root {
                    transfer_id: tid,
                    record: vec![0; 96],
                },
                Message::Manifest {
                    stream_id: sid,
                    record: vec![0; 64],
                },
            ];
            // Announced 1,000 bytes: the broker allows 64 KiB more.
            for _ in 0..4 {
                frames.push(Message::Chunk {
                    stream_id: sid,
                    record: vec![0; 32 << 10],
                });
            }
            frames
        }),
    ];
    for (what, frames) in cases {
        let mut conn = alice.connect(Role::Sender).await;
        let (offer, tid, sid) = sealed(&alice, &mut conn).await;
        ask_to_store(&mut conn, "bob", offer).await;
        let Some(Message::Ticket { ticket, .. }) = conn.reader.read_timeout(WAIT).await.unwrap()
        else {
            panic!("{what}: no ticket")
        };
        let tcp = tokio::net::TcpStream::connect(&broker.addr).await.unwrap();
        let mut data = Connection::new(tcp);
        let redeem = Message::Redeem {
            transfer_id: tid,
            ticket,
        };
        data.writer.write(&redeem).await.unwrap();
        for f in frames(tid, sid) {
            // The broker may close before the last frame: that is its answer.
            if data.writer.write(&f).await.is_err() {
                break;
            }
        }
        // No `Stored`: the connection ends without a message.
        let answer = tokio::time::timeout(WAIT, data.reader.read())
            .await
            .unwrap();
        assert!(
            !matches!(answer, Ok(Some(Message::Stored { .. }))),
            "{what}: {answer:?}"
        );
        broker
            .logs
            .wait_for(&format!("stored upload of {tid} failed"), WAIT)
            .await;
        assert!(
            objects(&broker).is_empty(),
            "{what}: {:?}",
            objects(&broker)
        );
    }
}

#[tokio::test]
async fn a_store_must_name_its_own_sender_and_the_receivers_registered_key() {
    let broker = TestBroker::start().await;
    let (alice, bob, carol) = (
        Agent::new(&broker, "alice", "alice"),
        Agent::new(&broker, "bob", "bob"),
        Agent::new(&broker, "carol", "carol"),
    );
    bob_leaves_prekeys(&broker, &bob, 2).await;
    // Alice's offer, presented by carol: refused before anything is stored.
    let mut conn = alice.connect(Role::Sender).await;
    let (offer, _, _) = sealed(&alice, &mut conn).await;
    drop(conn);
    let mut conn = carol.connect(Role::Sender).await;
    ask_to_store(&mut conn, "bob", offer.clone()).await;
    let detail = expect_error(&mut conn, ErrorCode::Protocol).await;
    assert!(
        detail.contains("must name this connection's agent"),
        "{detail}"
    );
    // Alice's own, but said to be for carol.
    let mut conn = alice.connect(Role::Sender).await;
    ask_to_store(&mut conn, "carol", offer).await;
    expect_error(&mut conn, ErrorCode::Protocol).await;
    assert!(objects(&broker).is_empty());
}
