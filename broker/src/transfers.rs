//! One transfer's life at the broker: offered (counted against its sender's
//! offer rate and concurrency), answered by the receiver it names, ticketed
//! ([`crate::tickets`]), relaying (counted as incoming to its receiver, for
//! the list), ended.
//!
//! Plain state, no sockets: answers travel through channels to the tasks that
//! own the connections (the receiver's ticket through its control
//! connection's own queue). Every place taken here is released by a guard's
//! `Drop`, so no path can leak a slot.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use keyferry_common::ids::{StreamId, TransferId};
use keyferry_common::name::AgentName;
use keyferry_common::sync::lock;
use keyferry_common::wire::message::{Message, RefuseReason};
use std::sync::Mutex;
use tokio::sync::{mpsc, oneshot};

/// The window of the offer rate.
const RATE_WINDOW: Duration = Duration::from_secs(60);

/// How a receiver answered an offer.
#[derive(Debug)]
pub enum Answer {
    /// It refused.
    Refused(RefuseReason),
    /// It accepted: the accept bytes for the sender, and the receiver's own
    /// push queue, where its `Ticket` (or an `Abort` if the transfer cannot
    /// start) goes on its control connection.
    Accepted {
        /// The accept bytes.
        accept: Vec<u8>,
        /// The receiver's control connection's queue.
        receiver: mpsc::Sender<Box<Message>>,
    },
}

/// Why an agent may not make another offer now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfferLimit {
    /// More offers in the last minute than allowed.
    Rate,
    /// More transfers in progress than allowed.
    Concurrent,
}

#[derive(Debug)]
struct Pending {
    receiver: AgentName,
    reply: oneshot::Sender<Answer>,
}

struct Inner {
    pending: HashMap<TransferId, Pending>,
    offers: HashMap<AgentName, VecDeque<Instant>>,
    /// Per sender, the streams it is sending (a stream offered to several
    /// receivers counts once), with how many offers hold each.
    sending: HashMap<AgentName, HashMap<StreamId, usize>>,
    incoming: HashMap<AgentName, u32>,
}

/// Every transfer the broker knows of, from offer to end.
pub struct Transfers {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Transfers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = lock(&self.inner);
        f.debug_struct("Transfers")
            .field("pending", &i.pending.len())
            .finish_non_exhaustive()
    }
}

impl Default for Transfers {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                pending: HashMap::new(),
                offers: HashMap::new(),
                sending: HashMap::new(),
                incoming: HashMap::new(),
            }),
        }
    }
}

/// One of an agent's concurrent-transfer places, held from its offer to the
/// end of its transfer (shared by the offers of one stream).
#[derive(Debug)]
pub struct OfferSlot<'a> {
    transfers: &'a Transfers,
    name: AgentName,
    stream: StreamId,
}

impl Drop for OfferSlot<'_> {
    fn drop(&mut self) {
        let mut i = lock(&self.transfers.inner);
        if let Some(streams) = i.sending.get_mut(&self.name) {
            if let Some(n) = streams.get_mut(&self.stream) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    streams.remove(&self.stream);
                }
            }
            if streams.is_empty() {
                i.sending.remove(&self.name);
            }
        }
        if i.offers.get(&self.name).is_some_and(VecDeque::is_empty) {
            i.offers.remove(&self.name);
        }
    }
}

/// A transfer being relayed, counted as incoming to its receiver until dropped.
#[derive(Debug)]
pub struct Relaying<'a> {
    transfers: &'a Transfers,
    receiver: AgentName,
}

impl Drop for Relaying<'_> {
    fn drop(&mut self) {
        let mut i = lock(&self.transfers.inner);
        if let Some(n) = i.incoming.get_mut(&self.receiver) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                i.incoming.remove(&self.receiver);
            }
        }
    }
}

impl Transfers {
    /// No transfers yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts an offer of `stream` by `name` made at `now` against its
    /// per-minute and concurrent-transfer limits; the slot is held until
    /// dropped. Every offer counts against the rate; a stream offered to
    /// several receivers counts once against the concurrency.
    pub fn take_offer_slot(
        &self,
        name: &AgentName,
        stream: StreamId,
        per_minute: usize,
        concurrent: usize,
        now: Instant,
    ) -> Result<OfferSlot<'_>, OfferLimit> {
        let mut i = lock(&self.inner);
        let window = i.offers.entry(name.clone()).or_default();
        while window
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) >= RATE_WINDOW)
        {
            window.pop_front();
        }
        if window.len() >= per_minute {
            return Err(OfferLimit::Rate);
        }
        window.push_back(now);
        let streams = i.sending.entry(name.clone()).or_default();
        if !streams.contains_key(&stream) && streams.len() >= concurrent {
            return Err(OfferLimit::Concurrent);
        }
        *streams.entry(stream).or_default() += 1;
        Ok(OfferSlot {
            transfers: self,
            name: name.clone(),
            stream,
        })
    }

    /// Whether `name` still holds a slot for stream `stream`.
    pub fn holds(&self, name: &AgentName, stream: StreamId) -> bool {
        lock(&self.inner)
            .sending
            .get(name)
            .is_some_and(|s| s.contains_key(&stream))
    }

    /// Every sender's streams holding slots here now.
    pub fn streams(&self) -> Vec<(AgentName, StreamId)> {
        let i = lock(&self.inner);
        i.sending
            .iter()
            .flat_map(|(n, s)| s.keys().map(move |sid| (n.clone(), *sid)))
            .collect()
    }

    /// Records an offer of `tid` to `receiver`, waiting for its answer.
    /// `None` if that transfer id is already waiting.
    pub fn offer(
        &self,
        tid: TransferId,
        receiver: &AgentName,
    ) -> Option<oneshot::Receiver<Answer>> {
        let mut i = lock(&self.inner);
        if i.pending.contains_key(&tid) {
            return None;
        }
        let (reply, rx) = oneshot::channel();
        i.pending.insert(
            tid,
            Pending {
                receiver: receiver.clone(),
                reply,
            },
        );
        Some(rx)
    }

    /// Forgets a transfer still waiting for its answer (the sender gave up).
    pub fn cancel(&self, tid: &TransferId) {
        lock(&self.inner).pending.remove(tid);
    }

    /// Delivers `receiver`'s answer to the sender waiting for it, if the offer
    /// named `receiver` and the sender still waits; otherwise hands it back.
    pub fn answer(
        &self,
        tid: &TransferId,
        receiver: &AgentName,
        answer: Answer,
    ) -> Result<(), Answer> {
        let pending = {
            let mut i = lock(&self.inner);
            match i.pending.get(tid) {
                Some(p) if &p.receiver == receiver => i.pending.remove(tid),
                _ => None,
            }
        };
        match pending {
            Some(p) => p.reply.send(answer),
            None => Err(answer),
        }
    }

    /// `receiver`'s connection ended: the offers waiting for its answer fail
    /// (their senders see the answer channel close).
    pub fn receiver_gone(&self, receiver: &AgentName) {
        lock(&self.inner)
            .pending
            .retain(|_, p| &p.receiver != receiver);
    }

    /// Counts a relayed transfer as incoming to `receiver` until dropped.
    pub fn relaying(&self, receiver: &AgentName) -> Relaying<'_> {
        *lock(&self.inner)
            .incoming
            .entry(receiver.clone())
            .or_default() += 1;
        Relaying {
            transfers: self,
            receiver: receiver.clone(),
        }
    }

    /// Transfers being relayed to `receiver` now.
    pub fn incoming(&self, receiver: &AgentName) -> u32 {
        lock(&self.inner)
            .incoming
            .get(receiver)
            .copied()
            .unwrap_or(0)
    }

    /// Transfers being relayed now, to anyone.
    pub fn relaying_total(&self) -> u32 {
        lock(&self.inner).incoming.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> AgentName {
        AgentName::new(s).unwrap()
    }

    #[test]
    fn offers_are_limited_per_minute_and_in_flight() {
        let t = Transfers::new();
        let alice = name("alice");
        let (s1, s2, s3) = (StreamId([1; 16]), StreamId([2; 16]), StreamId([3; 16]));
        let t0 = Instant::now();
        let a = t.take_offer_slot(&alice, s1, 3, 2, t0).unwrap();
        let b = t.take_offer_slot(&alice, s2, 3, 2, t0).unwrap();
        assert_eq!(
            t.take_offer_slot(&alice, s3, 3, 2, t0).unwrap_err(),
            OfferLimit::Concurrent
        );
        drop(a);
        // The refused one still counted against the rate: 3 in this minute.
        assert_eq!(
            t.take_offer_slot(&alice, s3, 3, 2, t0).unwrap_err(),
            OfferLimit::Rate
        );
        // A minute later the window has room again.
        let c = t
            .take_offer_slot(&alice, s3, 3, 2, t0 + RATE_WINDOW)
            .unwrap();
        drop((b, c));
        assert!(lock(&t.inner).sending.is_empty());
        // Another agent is independent.
        t.take_offer_slot(&name("bob"), s1, 3, 2, t0).unwrap();
    }

    #[test]
    fn the_offers_of_one_stream_to_several_receivers_count_as_one_transfer() {
        let t = Transfers::new();
        let alice = name("alice");
        let (one, two) = (StreamId([1; 16]), StreamId([2; 16]));
        let t0 = Instant::now();
        let fanout: Vec<_> = (0..3)
            .map(|_| t.take_offer_slot(&alice, one, 10, 1, t0).unwrap())
            .collect();
        assert_eq!(
            t.take_offer_slot(&alice, two, 10, 1, t0).unwrap_err(),
            OfferLimit::Concurrent
        );
        drop(fanout);
        t.take_offer_slot(&alice, two, 10, 1, t0).unwrap();
    }

    #[tokio::test]
    async fn only_the_named_receiver_answers_and_only_once() {
        let t = Transfers::new();
        let (bob, mallory) = (name("bob"), name("mallory"));
        let tid = TransferId([1; 16]);
        let answer = t.offer(tid, &bob).unwrap();
        assert!(t.offer(tid, &bob).is_none(), "the same id twice");
        let wrong = t.answer(&tid, &mallory, Answer::Refused(RefuseReason::Busy));
        assert!(matches!(wrong, Err(Answer::Refused(RefuseReason::Busy))));
        t.answer(&tid, &bob, Answer::Refused(RefuseReason::Policy))
            .unwrap();
        assert!(matches!(
            answer.await.unwrap(),
            Answer::Refused(RefuseReason::Policy)
        ));
        assert!(
            t.answer(&tid, &bob, Answer::Refused(RefuseReason::Busy))
                .is_err()
        );
        // A receiver that leaves fails the offers waiting for it.
        let tid2 = TransferId([2; 16]);
        let waiting = t.offer(tid2, &bob).unwrap();
        t.receiver_gone(&bob);
        assert!(waiting.await.is_err());
        // A sender that gave up is gone too.
        let tid3 = TransferId([3; 16]);
        drop(t.offer(tid3, &bob).unwrap());
        t.cancel(&tid3);
        assert!(
            t.answer(&tid3, &bob, Answer::Refused(RefuseReason::Busy))
                .is_err()
        );
    }

    #[test]
    fn relayed_transfers_count_as_incoming_until_they_end() {
        let t = Transfers::new();
        let bob = name("bob");
        let a = t.relaying(&bob);
        let b = t.relaying(&bob);
        assert_eq!(t.incoming(&bob), 2);
        drop(a);
        assert_eq!(t.incoming(&bob), 1);
        drop(b);
        assert_eq!(t.incoming(&bob), 0);
        assert!(lock(&t.inner).incoming.is_empty());
    }
}
