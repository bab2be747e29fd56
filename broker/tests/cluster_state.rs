//! The cluster's shared state against a real `nats-server -js` on a free
//! loopback port: two members of one cluster, in this process, racing for
//! a name, fencing a receiver that moved, handing out one-time prekeys and
//! working on stored transfers. (The brokers' whole behaviour
//! in a cluster, with the real binaries, is in `agent/tests/cluster.rs`.)

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use keyferry_broker::cluster::presence::{Claim, HOLDS_YES};
use keyferry_broker::cluster::rates::Counted;
use keyferry_broker::cluster::{Cluster, Member};
use keyferry_broker::mailbox::shared::SharedMailbox;
use keyferry_broker::mailbox::{MailboxLimits, Outcome, State, StoredMeta, WithdrawError};
use keyferry_broker::registry::Binding;
use keyferry_common::identity::Fingerprint;
use keyferry_common::ids::TransferId;
use keyferry_common::name::AgentName;

/// A nats-server with JetStream in a temporary store, killed (by PID) on drop.
struct Nats {
    child: Child,
    store: PathBuf,
    url: String,
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

#[path = "../../agent/tests/support/nats_bin.rs"]
mod nats_bin;

fn nats() -> Option<Nats> {
    let bin = nats_bin::server_bin()?;
    let store = std::env::temp_dir().join(format!(
        "keyferry-cluster-state-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&store);
    let mut child = Command::new(bin)
        .args(["-js", "-a", "127.0.0.1", "-p", "-1", "-sd"])
        .arg(&store)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some((_, addr)) = line.split_once("Listening for client connections on ") {
                let _ = tx.send(addr.trim().to_owned());
            }
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    Some(Nats {
        child,
        store,
        url: format!("nats://{addr}"),
    })
}

/// A histogram for the cluster's key-value timings (the broker's metrics
/// hold it in a running broker).
fn kv_seconds() -> prometheus_client::metrics::histogram::Histogram {
    prometheus_client::metrics::histogram::Histogram::new([0.001, 0.01, 0.1, 1.0])
}

async fn member(nats: &Nats, id: &str) -> Cluster {
    Cluster::join(
        Member {
            url: nats.url.clone(),
            id: id.into(),
            advertise: format!("127.0.0.1:{}", 7000 + id.len()),
            fingerprint: Fingerprint([id.len() as u8; 32]),
            policy: "open".into(),
        },
        kv_seconds(),
    )
    .await
    .unwrap()
}

/// Answers `holds` for `member` as a running broker that holds every
/// receiver asked about.
async fn answer_holds(member: &Cluster) {
    let (_offers, mut holds) = member.subscribe().await.unwrap();
    let client = member.client().clone();
    tokio::spawn(async move {
        let _offers = _offers;
        while let Some(m) = holds.next().await {
            if let Some(reply) = m.reply {
                let _ = client.publish(reply, HOLDS_YES.into()).await;
            }
        }
    });
}

fn name(s: &str) -> AgentName {
    AgentName::new(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_binding_one_name_at_the_same_moment_have_one_winner() {
    let Some(nats) = nats() else { return };
    let members = Arc::new([
        member(&nats, "one").await,
        member(&nats, "two").await,
        member(&nats, "three").await,
    ]);
    for round in 0..20 {
        let n = name(&format!("race{round}"));
        // Eight agents with eight keys, through three brokers, at once.
        let tasks: Vec<_> = (0..8u8)
            .map(|k| {
                let (members, n) = (Arc::clone(&members), n.clone());
                tokio::spawn(async move {
                    let key = vec![k; 8];
                    let (binding, bound) =
                        members[usize::from(k) % 3].bind(&n, &key).await.unwrap();
                    (binding, bound, key)
                })
            })
            .collect();
        let mut outcomes = Vec::new();
        for t in tasks {
            outcomes.push(t.await.unwrap());
        }
        let winners: Vec<_> = outcomes.iter().filter(|o| o.0 == Binding::New).collect();
        assert_eq!(winners.len(), 1, "round {round}: {outcomes:?}");
        let winner = winners[0].2.clone();
        for (binding, bound, key) in &outcomes {
            // Every broker reports the winner's key; every other key is refused.
            assert_eq!(bound, &winner, "round {round}");
            if key != &winner {
                assert_eq!(*binding, Binding::Taken, "round {round}");
            }
        }
        for m in members.iter() {
            assert_eq!(m.bind(&n, &winner).await.unwrap().0, Binding::Known);
            assert_eq!(m.bind(&n, b"someone else").await.unwrap().0, Binding::Taken);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_moved_is_fenced_by_revision() {
    let Some(nats) = nats() else { return };
    let (one, two) = (member(&nats, "one").await, member(&nats, "two").await);
    let bob = name("bob");
    assert_eq!(one.claim(&bob, 0).await.unwrap(), Claim::Claimed);
    assert_eq!(one.locate(&bob).await.unwrap().unwrap().broker, "one");

    // "one" does not answer whether it holds bob (it serves no subjects
    // here, as a frozen or dead broker): "two" takes bob over.
    assert_eq!(two.claim(&bob, 0).await.unwrap(), Claim::Claimed);
    assert_eq!(two.locate(&bob).await.unwrap().unwrap().broker, "two");

    // "two" says it holds bob; "one"'s refresh fails on the revision, and
    // it learns that it must let bob go.
    answer_holds(&two).await;
    let lost = one.refresh(|| vec![bob.clone()], |_| 0).await.unwrap();
    assert_eq!(lost, [(bob.clone(), "two".to_owned())]);
    assert_eq!(two.locate(&bob).await.unwrap().unwrap().broker, "two");
    // A second receiver of bob on "one" is refused while "two" holds it.
    assert_eq!(
        one.claim(&bob, 0).await.unwrap(),
        Claim::HeldBy("two".into())
    );

    // "two"'s receiver leaves: the entry goes, and "one" may claim bob.
    two.release(&bob).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while one.locate(&bob).await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "the released entry stayed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(one.claim(&bob, 0).await.unwrap(), Claim::Claimed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_broker_with_the_same_id_is_refused() {
    let Some(nats) = nats() else { return };
    let one = member(&nats, "one").await;
    answer_holds(&one).await;
    let twin = Cluster::join(
        Member {
            url: nats.url.clone(),
            id: "one".into(),
            advertise: "127.0.0.1:9".into(),
            fingerprint: Fingerprint([9; 32]),
            policy: "open".into(),
        },
        kv_seconds(),
    )
    .await;
    let err = twin.unwrap_err().to_string();
    assert!(err.contains("another broker with the id one"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offers_through_several_members_at_once_count_against_one_rate() {
    let Some(nats) = nats() else { return };
    let members = Arc::new([member(&nats, "one").await, member(&nats, "two").await]);
    // 20 offers by one name at the same moment through two brokers, with a
    // rate of 7 a minute: exactly 7 pass, whichever broker they came through.
    // Second 1 of a minute (1_800_000_000 is a multiple of 60).
    let now = 1_800_000_001;
    assert_eq!(offers_at_once(&members, "alice", 20, 7, now).await, 7);
    // Another name has its own count; the next minute still weighs the last.
    assert!(
        members[0]
            .take(Counted::Offers, &name("bob"), 7, now)
            .await
            .unwrap()
    );
    // A second into the next minute the last one's 7 still weigh 59/60:
    // room for one more (6.9 + 1), not two.
    let alice = name("alice");
    assert!(
        members[1]
            .take(Counted::Offers, &alice, 7, now + 60)
            .await
            .unwrap()
    );
    assert!(
        !members[0]
            .take(Counted::Offers, &alice, 7, now + 60)
            .await
            .unwrap()
    );
    // A minute later still, the first minute has left the window.
    assert!(
        members[1]
            .take(Counted::Offers, &name("alice"), 7, now + 119)
            .await
            .unwrap()
    );

    // Above the retries' base (16): 80 offers at once, rate 40, exactly 40
    // pass and none is waved through for losing too many races.
    assert_eq!(offers_at_once(&members, "carol", 80, 40, now).await, 40);
}

/// Makes `n` offers by `who` at once at Unix time `now`, through the
/// members in turn, at `rate` a minute; how many passed.
async fn offers_at_once(
    members: &Arc<[Cluster; 2]>,
    who: &str,
    n: usize,
    rate: usize,
    now: u64,
) -> usize {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (members, who) = (Arc::clone(members), name(who));
            tokio::spawn(async move { members[i % 2].take(Counted::Offers, &who, rate, now).await })
        })
        .collect();
    let mut passed = 0;
    for t in tasks {
        passed += usize::from(t.await.unwrap().unwrap());
    }
    passed
}

/// A test's staging directories, removed when the test ends.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("keyferry-staging-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The cluster's mailbox of `member`, staging in a fresh directory of `scratch`.
async fn mailbox(scratch: &Scratch, member: &Cluster, limits: MailboxLimits) -> Arc<SharedMailbox> {
    let staging = scratch.0.join(&member.member().id);
    let js = member.jetstream();
    let opened = SharedMailbox::open(
        member.client().clone(),
        &js,
        (member.member().id.clone(), staging),
        limits,
    );
    Arc::new(opened.await.unwrap())
}

fn limits() -> MailboxLimits {
    MailboxLimits {
        total: 1 << 30,
        per_receiver: 1 << 30,
        per_sender: 1 << 30,
        max_age: Duration::from_secs(3600),
        per_receiver_count: 32,
        fetches_per_minute: 10,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_time_prekey_goes_to_one_sender_however_many_members_hand_them_out() {
    let Some(nats) = nats() else { return };
    let (one, two) = (member(&nats, "one").await, member(&nats, "two").await);
    let scratch = Scratch::new();
    let boxes = [
        mailbox(&scratch, &one, limits()).await,
        mailbox(&scratch, &two, limits()).await,
    ];
    let bob = name("bob");
    let bundles: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 100]).collect();
    let held = boxes[0].put_prekeys(&bob, bundles.clone(), Some(vec![0xff; 100]));
    assert_eq!(held.await.unwrap(), 10);
    // 24 senders at once, half through each member.
    let fetches = (0..24).map(|i| {
        let (mailbox, bob) = (Arc::clone(&boxes[i % 2]), bob.clone());
        tokio::spawn(async move {
            let sender = name(&format!("sender{i}"));
            mailbox.take_prekey(&sender, &bob, Instant::now()).await
        })
    });
    let mut one_time = Vec::new();
    let mut last_resort = 0;
    for fetch in futures_util::future::join_all(fetches).await {
        let prekey = fetch.unwrap().unwrap().unwrap();
        if prekey.last_resort {
            assert_eq!(prekey.bundle, vec![0xff; 100]);
            last_resort += 1;
        } else {
            one_time.push(prekey.bundle);
        }
    }
    one_time.sort();
    assert_eq!(one_time, bundles, "each one-time bundle handed out once");
    assert_eq!(last_resort, 14);
    assert_eq!(boxes[1].prekey_count(&bob).await.unwrap(), 0);
}

/// Stores `len` bytes for bob from alice through `mailbox`, as transfer `id`.
async fn store(mailbox: &Arc<SharedMailbox>, id: u8, len: usize) -> StoredMeta {
    let meta = StoredMeta {
        id: TransferId([id; 16]),
        from: name("alice"),
        to: name("bob"),
        sender_spki: vec![1; 32],
        offer_body: vec![2; 64],
        offer_signature: vec![3; 64],
        size: len as u64,
        stored_at: 0,
        expires: 0,
        last_resort: false,
        order: 0,
    };
    let mut upload = mailbox.reserve(meta, unix_now()).await.unwrap();
    upload.write(vec![id; len]).await.unwrap();
    upload.commit().await.unwrap()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Bytes held by the object store's stream.
async fn object_bytes(member: &Cluster) -> u64 {
    let mut stream = member
        .jetstream()
        .get_stream("OBJ_keyferry-stored")
        .await
        .unwrap();
    stream.info().await.unwrap().state.bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_member_at_a_time_works_on_a_stored_transfer_and_an_abandoned_upload_leaves_nothing() {
    let Some(nats) = nats() else { return };
    let (one, two) = (member(&nats, "one").await, member(&nats, "two").await);
    let scratch = Scratch::new();
    let (a, b) = (
        mailbox(&scratch, &one, limits()).await,
        mailbox(&scratch, &two, limits()).await,
    );
    // An upload abandoned half way reaches neither NATS nor the limits.
    let before = object_bytes(&one).await;
    let meta = store(&a, 9, 0).await;
    assert!(b.withdraw(&meta.from, &meta.id, unix_now()).await.is_ok());
    let after_one = object_bytes(&one).await;
    let half = StoredMeta {
        id: TransferId([7; 16]),
        size: 4 << 20,
        ..meta.clone()
    };
    let mut upload = a.reserve(half, unix_now()).await.unwrap();
    upload.write(vec![7; 3 << 20]).await.unwrap();
    drop(upload);
    assert_eq!(object_bytes(&one).await, after_one, "nothing of it in NATS");
    assert!(after_one >= before);

    // Every member hears of what another stored, and for whom.
    let mut news = b.stored_news().await.unwrap();
    let meta = store(&a, 5, 1 << 20).await;
    let heard = tokio::time::timeout(Duration::from_secs(5), news.next()).await;
    assert_eq!(&heard.unwrap().unwrap().payload[..], b"bob");
    let bob = name("bob");
    let waiting = b.waiting_for(&bob, unix_now()).await.unwrap();
    assert_eq!(waiting, vec![meta.clone()]);
    // One delivers; the other can neither deliver nor withdraw meanwhile.
    let delivering = a.begin_delivery(&meta).await.unwrap();
    assert!(b.begin_delivery(&meta).await.is_none());
    let withdrawn = b.withdraw(&meta.from, &meta.id, unix_now()).await;
    assert!(
        matches!(withdrawn, Err(WithdrawError::Delivering { .. })),
        "{withdrawn:?}"
    );
    let mut data = Vec::new();
    let mut object = delivering.open_data().await.unwrap();
    tokio::io::AsyncReadExt::read_to_end(&mut object, &mut data)
        .await
        .unwrap();
    assert_eq!(data, vec![5; 1 << 20]);
    // Delivered: ended once, for every member.
    let outcome = Outcome::Delivered {
        receipt: b"signed".to_vec(),
    };
    delivering.finish(outcome, unix_now()).await.unwrap();
    assert!(b.waiting_for(&bob, unix_now()).await.unwrap().is_empty());
    assert!(b.begin_delivery(&meta).await.is_none());
    let receipts = b.receipts(&meta.from, unix_now()).await.unwrap();
    let mut states: Vec<_> = receipts.iter().map(|r| (r.id, r.state.clone())).collect();
    states.sort_by_key(|(id, _)| *id);
    assert!(
        matches!(
            &states[..],
            [(_, State::Delivered { .. }), (_, State::Withdrawn { .. })]
        ),
        "{states:?}"
    );
    // Its 1 MiB is gone; a deleted object leaves only its small tombstone
    // (until the store's max age).
    let left = object_bytes(&one).await;
    assert!(left < after_one + (16 << 10), "{left} bytes left");
}
