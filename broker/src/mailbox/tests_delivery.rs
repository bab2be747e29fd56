//! Tests of what follows storing: prekeys, deliveries and their receipts,
//! withdrawals, expiry.

use std::time::{Duration, Instant};

use keyferry_common::ids::TransferId;

use super::tests::{NOW, TempDir, files, limits, meta, name, open, read, store};
use super::*;

fn one_time(n: u8) -> Vec<u8> {
    vec![n; 100]
}

#[test]
fn a_one_time_prekey_is_handed_out_once_then_the_last_resort_again_and_again() {
    let tmp = TempDir::new("prekeys");
    let mb = open(
        &tmp.0,
        MailboxLimits {
            fetches_per_minute: 100,
            ..limits()
        },
    );
    let (alice, bob) = (name("alice"), name("bob"));
    let t = Instant::now();
    assert_eq!(mb.take_prekey(&alice, &bob, t).unwrap(), None);
    assert_eq!(mb.last_resort(&bob), None);
    assert_eq!(
        mb.put_prekeys(&bob, vec![one_time(1), one_time(2)], Some(vec![9; 50]))
            .unwrap(),
        2
    );
    assert_eq!(mb.put_prekeys(&bob, vec![one_time(3)], None).unwrap(), 3);
    for n in 1..=3 {
        let p = mb.take_prekey(&alice, &bob, t).unwrap().unwrap();
        assert_eq!(
            p,
            Prekey {
                bundle: one_time(n),
                last_resort: false
            }
        );
        assert_eq!(mb.prekey_count(&bob), u32::from(3 - n));
    }
    assert_eq!(mb.last_resort(&bob), Some(vec![9; 50]));
    for _ in 0..3 {
        let p = mb.take_prekey(&alice, &bob, t).unwrap().unwrap();
        assert_eq!(
            p,
            Prekey {
                bundle: vec![9; 50],
                last_resort: true
            }
        );
    }
    // Past 100 held, the rest are dropped; bundles are 1 to 4096 bytes.
    assert_eq!(
        mb.put_prekeys(&bob, vec![one_time(4); 150], None).unwrap(),
        100
    );
    for bad in [vec![], vec![0; MAX_BUNDLE + 1]] {
        let e = mb
            .put_prekeys(&bob, vec![one_time(5), bad], None)
            .unwrap_err();
        assert!(matches!(e, MailboxError::Bundle { .. }), "{e}");
    }
    assert_eq!(mb.prekey_count(&bob), 100);
}

#[test]
fn prekey_fetches_are_limited_per_sender_per_minute() {
    let tmp = TempDir::new("rate");
    let mb = open(&tmp.0, limits()); // 3 a minute
    let (alice, bob, carol) = (name("alice"), name("bob"), name("carol"));
    mb.put_prekeys(&bob, vec![], Some(vec![9])).unwrap();
    let t0 = Instant::now();
    for s in 0..3 {
        mb.take_prekey(&alice, &bob, t0 + Duration::from_secs(s))
            .unwrap();
    }
    let e = mb
        .take_prekey(&alice, &bob, t0 + Duration::from_millis(30_500))
        .unwrap_err();
    assert!(
        matches!(
            e,
            TakeError::Limited(Limited {
                retry_after_secs: 30
            })
        ),
        "{e}"
    );
    assert!(
        mb.take_prekey(&carol, &bob, t0).unwrap().is_some(),
        "per sender"
    );
    // The oldest fetch leaves the window 60 s after it was made.
    mb.take_prekey(&alice, &bob, t0 + Duration::from_secs(60))
        .unwrap();
    assert!(
        mb.take_prekey(&alice, &bob, t0 + Duration::from_secs(60))
            .is_err()
    );
}

#[test]
fn prekeys_survive_a_restart_and_a_handed_out_one_stays_gone() {
    let tmp = TempDir::new("prekeys-reopen");
    let (alice, bob) = (name("alice"), name("bob"));
    let t = Instant::now();
    let mb = open(&tmp.0, limits());
    mb.put_prekeys(&bob, vec![one_time(1), one_time(2)], Some(vec![9]))
        .unwrap();
    assert_eq!(
        mb.take_prekey(&alice, &bob, t).unwrap().unwrap().bundle,
        one_time(1)
    );
    drop(mb);
    let mb = open(&tmp.0, limits());
    assert_eq!(mb.prekey_count(&bob), 1);
    assert_eq!(
        mb.take_prekey(&alice, &bob, t).unwrap().unwrap().bundle,
        one_time(2)
    );
    drop(mb);
    let mb = open(&tmp.0, limits());
    let p = mb.take_prekey(&name("carol"), &bob, t).unwrap().unwrap();
    assert!(p.last_resort);
    mb.forget_prekeys(&bob).unwrap();
    assert_eq!(mb.take_prekey(&name("carol"), &bob, t).unwrap(), None);
    drop(mb);
    let mb = open(&tmp.0, limits());
    assert_eq!(mb.take_prekey(&name("dave"), &bob, t).unwrap(), None);
    assert!(files(&tmp.0.join("prekeys")).is_empty());
}

#[test]
fn waiting_transfers_come_oldest_first() {
    let tmp = TempDir::new("order");
    let mb = open(&tmp.0, limits());
    for (id, at) in [(3, NOW + 1), (2, NOW), (1, NOW + 1)] {
        mb.reserve(meta(id, "alice", "bob", 1), at)
            .unwrap()
            .commit()
            .unwrap();
    }
    let ids: Vec<u8> = mb
        .waiting_for(&name("bob"), NOW + 1)
        .iter()
        .map(|m| m.id.0[0])
        .collect();
    // In the order they were committed, whatever their ids or times.
    assert_eq!(ids, [3, 2, 1]);
    let again = open(&tmp.0, limits());
    let ids: Vec<u8> = again
        .waiting_for(&name("bob"), NOW + 1)
        .iter()
        .map(|m| m.id.0[0])
        .collect();
    assert_eq!(ids, [3, 2, 1], "and so after a restart");
}

#[test]
fn finishing_a_delivery_removes_the_data_and_keeps_the_receipt() {
    let tmp = TempDir::new("finish");
    let mb = open(&tmp.0, limits());
    let stored = store(&mb, 1, b"sealed");
    let id = stored.id;
    let delivering = mb.begin_delivery(&id).unwrap();
    assert!(mb.begin_delivery(&id).is_none(), "one delivery at a time");
    assert_eq!(delivering.meta(), &stored);
    drop(delivering);
    let delivering = mb
        .begin_delivery(&id)
        .expect("a dropped delivery leaves it waiting");
    assert_eq!(read(&mb, &id), b"sealed");
    let too_long = Outcome::Delivered {
        receipt: vec![0; 17 << 10],
    };
    let e = delivering.finish(too_long, NOW).unwrap_err();
    assert!(matches!(e, MailboxError::ReceiptTooLong { .. }), "{e}");
    assert_eq!(
        mb.waiting_for(&name("bob"), NOW).len(),
        1,
        "nothing changed"
    );

    let delivering = mb.begin_delivery(&id).unwrap();
    delivering
        .finish(
            Outcome::Delivered {
                receipt: vec![7; 64],
            },
            NOW + 10,
        )
        .unwrap();
    assert!(mb.waiting_for(&name("bob"), NOW + 10).is_empty());
    assert!(files(&tmp.0.join("objects")).is_empty());
    assert!(mb.open_data(&id).is_err());
    assert!(mb.begin_delivery(&id).is_none());
    let delivered = ReceiptRecord {
        id,
        to: name("bob"),
        size: 100,
        stored_at: NOW,
        state: State::Delivered {
            receipt: vec![7; 64],
            at: NOW + 10,
        },
    };
    assert_eq!(
        mb.receipts(&name("alice"), NOW + 10),
        vec![delivered.clone()]
    );
    assert!(mb.receipts(&name("bob"), NOW + 10).is_empty());
    drop(mb);
    let mb = open(&tmp.0, limits());
    assert_eq!(mb.receipts(&name("alice"), NOW + 10), vec![delivered]);
    assert!(matches!(
        mb.reserve(meta(1, "alice", "bob", 1), NOW + 11),
        Err(Refusal::Duplicate { .. })
    ));
    // A refusal is recorded as such.
    let other = store(&mb, 2, b"other");
    let delivering = mb.begin_delivery(&other.id).unwrap();
    delivering
        .finish(Outcome::Refused { receipt: vec![8] }, NOW + 12)
        .unwrap();
    let state = &mb.receipts(&name("alice"), NOW + 12)[1].state;
    assert_eq!(
        *state,
        State::Refused {
            receipt: vec![8],
            at: NOW + 12
        }
    );
}

#[test]
fn only_the_sender_withdraws_and_only_while_waiting() {
    let tmp = TempDir::new("withdraw");
    let mb = open(&tmp.0, limits());
    let id = store(&mb, 1, b"sealed").id;
    let (alice, bob) = (name("alice"), name("bob"));
    let e = mb.withdraw(&bob, &id, NOW).unwrap_err();
    assert!(matches!(e, WithdrawError::NotWaiting { .. }), "{e}");
    let delivering = mb.begin_delivery(&id).unwrap();
    let e = mb.withdraw(&alice, &id, NOW).unwrap_err();
    assert!(matches!(e, WithdrawError::Delivering { .. }), "{e}");
    drop(delivering);
    assert_eq!(read(&mb, &id), b"sealed");
    mb.withdraw(&alice, &id, NOW + 3).unwrap();
    assert!(mb.waiting_for(&bob, NOW).is_empty());
    assert!(files(&tmp.0.join("objects")).is_empty());
    assert_eq!(
        mb.receipts(&alice, NOW + 3)[0].state,
        State::Withdrawn { at: NOW + 3 }
    );
    assert!(matches!(
        mb.withdraw(&alice, &id, NOW + 4),
        Err(WithdrawError::NotWaiting { .. })
    ));
    let unknown = TransferId([0xee; 16]);
    assert!(matches!(
        mb.withdraw(&alice, &unknown, NOW),
        Err(WithdrawError::NotWaiting { .. })
    ));
}

#[test]
fn expiry_removes_stored_transfers_but_not_one_being_delivered() {
    let tmp = TempDir::new("expire");
    let mb = open(&tmp.0, limits()); // 100 s
    let (alice, bob) = (name("alice"), name("bob"));
    let one = store(&mb, 1, b"one");
    let two = store(&mb, 2, b"two");
    assert!(mb.expire(NOW + 99).is_empty());
    assert_eq!(mb.waiting_for(&bob, NOW + 99).len(), 2);
    assert!(
        mb.waiting_for(&bob, NOW + 100).is_empty(),
        "not offered once due"
    );
    let delivering = mb.begin_delivery(&two.id).unwrap();
    assert_eq!(mb.expire(NOW + 100), vec![one.clone()]);
    assert_eq!(
        files(&tmp.0.join("objects")).len(),
        2,
        "two's files are kept"
    );
    let expired = State::Expired { at: NOW + 100 };
    let states: Vec<State> = mb
        .receipts(&alice, NOW + 100)
        .into_iter()
        .map(|r| r.state)
        .collect();
    assert_eq!(states, [expired.clone(), expired.clone()]);
    drop(delivering);
    assert_eq!(mb.expire(NOW + 150), vec![two]);
    assert!(files(&tmp.0.join("objects")).is_empty());
    assert_eq!(mb.usage(), Usage::default());
    drop(mb);
    let mb = open(&tmp.0, limits());
    assert_eq!(mb.receipts(&alice, NOW + 150)[0].state, expired);
}

#[test]
fn receipt_records_are_dropped_after_the_maximum_age() {
    let tmp = TempDir::new("receipts");
    let mb = open(&tmp.0, limits()); // 100 s
    let alice = name("alice");
    let id = store(&mb, 1, b"one").id;
    mb.withdraw(&alice, &id, NOW + 10).unwrap();
    assert_eq!(mb.receipts(&alice, NOW + 109).len(), 1);
    assert!(mb.receipts(&alice, NOW + 110).is_empty());
    mb.expire(NOW + 109);
    assert_eq!(files(&tmp.0.join("receipts")).len(), 1);
    mb.expire(NOW + 110);
    assert!(files(&tmp.0.join("receipts")).is_empty());
    drop(mb);
    let mb = open(&tmp.0, limits());
    assert!(mb.receipts(&alice, NOW).is_empty());
    // Its id is free again once its record is gone.
    mb.reserve(meta(1, "alice", "bob", 1), NOW + 200).unwrap();
}

#[test]
fn a_sender_keeps_at_most_its_newest_ended_records() {
    let tmp = TempDir::new("capped");
    let mb = open(&tmp.0, limits());
    let n = ending::MAX_ENDED_PER_SENDER + 3;
    for i in 0..n {
        let id = u8::try_from(i % 250).unwrap();
        let mut meta = meta(id, "alice", "bob", 1);
        meta.id = TransferId([
            id,
            u8::try_from(i / 250).unwrap(),
            9,
            9,
            9,
            9,
            9,
            9,
            9,
            9,
            9,
            9,
            9,
            9,
            9,
            9,
        ]);
        let stored = mb.reserve(meta, NOW).unwrap().commit().unwrap();
        mb.withdraw(&name("alice"), &stored.id, NOW + u64::try_from(i).unwrap())
            .unwrap();
    }
    let records = mb.receipts(&name("alice"), NOW + 1);
    assert_eq!(records.len(), ending::MAX_ENDED_PER_SENDER);
    // The oldest went, on disk too.
    let again = open(&tmp.0, limits());
    assert_eq!(
        again.receipts(&name("alice"), NOW + 1).len(),
        ending::MAX_ENDED_PER_SENDER
    );
}
