//! One transfer's life at the broker: offered (counted against its sender's
//! offer rate and concurrency), answered by the receiver it names, ticketed
//! (PROTOCOL.md §2.5: two one-time tickets for the data connections),
//! relaying (counted as incoming to its receiver, for the list), ended.
//!
//! Plain state, no sockets: answers and tickets travel through channels to the
//! tasks that own the connections (the receiver's ticket through its control
//! connection's own queue), and a redeemed ticket hands over whatever
//! data-connection value `C` the caller uses (the relay's connection in the
//! broker, a number in the tests). Every place taken here is released by a
//! guard's `Drop`, so no path can leak a slot.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use keyferry_common::crypto::random_array;
use keyferry_common::ids::TransferId;
use keyferry_common::name::AgentName;
use keyferry_common::sync::lock;
use keyferry_common::wire::message::{Message, RefuseReason};
use std::sync::Mutex;
use subtle::ConstantTimeEq as _;
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
        receiver: mpsc::Sender<Message>,
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

/// One side's ticket and where its connection goes.
struct Slot<C> {
    ticket: [u8; 32],
    to: Option<oneshot::Sender<C>>,
}

struct Inner<C> {
    pending: HashMap<TransferId, Pending>,
    offers: HashMap<AgentName, VecDeque<Instant>>,
    sending: HashMap<AgentName, usize>,
    tickets: HashMap<TransferId, [Slot<C>; 2]>,
    incoming: HashMap<AgentName, u32>,
}

/// Every transfer the broker knows of, from offer to end.
pub struct Transfers<C> {
    inner: Mutex<Inner<C>>,
}

impl<C> std::fmt::Debug for Transfers<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = lock(&self.inner);
        f.debug_struct("Transfers")
            .field("pending", &i.pending.len())
            .field("ticketed", &i.tickets.len())
            .finish_non_exhaustive()
    }
}

impl<C> Default for Transfers<C> {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                pending: HashMap::new(),
                offers: HashMap::new(),
                sending: HashMap::new(),
                tickets: HashMap::new(),
                incoming: HashMap::new(),
            }),
        }
    }
}

/// One of an agent's concurrent-transfer places, held from its offer to the
/// end of its transfer.
#[derive(Debug)]
pub struct OfferSlot<'a, C> {
    transfers: &'a Transfers<C>,
    name: AgentName,
}

impl<C> Drop for OfferSlot<'_, C> {
    fn drop(&mut self) {
        let mut i = lock(&self.transfers.inner);
        if let Some(n) = i.sending.get_mut(&self.name) {
            *n = n.saturating_sub(1);
            if *n == 0 {
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
pub struct Relaying<'a, C> {
    transfers: &'a Transfers<C>,
    receiver: AgentName,
}

impl<C> Drop for Relaying<'_, C> {
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

/// The broker's side of one transfer's tickets: the tickets to hand out and
/// the two data connections to wait for. Dropping it withdraws both tickets.
pub struct Issued<'a, C> {
    transfers: &'a Transfers<C>,
    tid: TransferId,
    /// The sender's ticket.
    pub sender_ticket: [u8; 32],
    /// The receiver's ticket.
    pub receiver_ticket: [u8; 32],
    sender: oneshot::Receiver<C>,
    receiver: oneshot::Receiver<C>,
}

impl<C> std::fmt::Debug for Issued<'_, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("tid", &self.tid)
            .finish_non_exhaustive()
    }
}

impl<C> Issued<'_, C> {
    /// Both data connections, sender's first; `None` if a ticket was
    /// withdrawn. The caller bounds the wait.
    pub async fn arrivals(&mut self) -> Option<(C, C)> {
        let (s, r) = tokio::join!(&mut self.sender, &mut self.receiver);
        Some((s.ok()?, r.ok()?))
    }
}

impl<C> Drop for Issued<'_, C> {
    fn drop(&mut self) {
        lock(&self.transfers.inner).tickets.remove(&self.tid);
    }
}

impl<C> Transfers<C> {
    /// No transfers yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts an offer by `name` made at `now` against its per-minute and
    /// concurrent-transfer limits; the slot is held until dropped.
    pub fn take_offer_slot(
        &self,
        name: &AgentName,
        per_minute: usize,
        concurrent: usize,
        now: Instant,
    ) -> Result<OfferSlot<'_, C>, OfferLimit> {
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
        let sending = i.sending.entry(name.clone()).or_default();
        if *sending >= concurrent {
            return Err(OfferLimit::Concurrent);
        }
        *sending += 1;
        Ok(OfferSlot {
            transfers: self,
            name: name.clone(),
        })
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

    /// Draws the two tickets of transfer `tid`; `None` if it already has some.
    pub fn issue(&self, tid: TransferId) -> Option<Issued<'_, C>> {
        let (sender_ticket, receiver_ticket) = (random_array(), random_array());
        let (s_tx, s_rx) = oneshot::channel();
        let (r_tx, r_rx) = oneshot::channel();
        let mut i = lock(&self.inner);
        if i.tickets.contains_key(&tid) {
            return None;
        }
        i.tickets.insert(
            tid,
            [
                Slot {
                    ticket: sender_ticket,
                    to: Some(s_tx),
                },
                Slot {
                    ticket: receiver_ticket,
                    to: Some(r_tx),
                },
            ],
        );
        Some(Issued {
            transfers: self,
            tid,
            sender_ticket,
            receiver_ticket,
            sender: s_rx,
            receiver: r_rx,
        })
    }

    /// Takes the place of `ticket` for `tid`, once: where its data connection
    /// goes. Both of the transfer's tickets are compared in constant time.
    pub fn redeem(&self, tid: &TransferId, ticket: &[u8; 32]) -> Option<oneshot::Sender<C>> {
        let mut i = lock(&self.inner);
        let slots = i.tickets.get_mut(tid)?;
        let matches = slots.each_ref().map(|s| bool::from(s.ticket.ct_eq(ticket)));
        let slot = matches.iter().position(|m| *m)?;
        slots[slot].to.take()
    }

    /// Counts a relayed transfer as incoming to `receiver` until dropped.
    pub fn relaying(&self, receiver: &AgentName) -> Relaying<'_, C> {
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

    /// Transfers waiting for their data connections.
    pub fn ticketed(&self) -> usize {
        lock(&self.inner).tickets.len()
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
        let t: Transfers<u32> = Transfers::new();
        let alice = name("alice");
        let t0 = Instant::now();
        let a = t.take_offer_slot(&alice, 3, 2, t0).unwrap();
        let b = t.take_offer_slot(&alice, 3, 2, t0).unwrap();
        assert_eq!(
            t.take_offer_slot(&alice, 3, 2, t0).unwrap_err(),
            OfferLimit::Concurrent
        );
        drop(a);
        // The refused one still counted against the rate: 3 in this minute.
        assert_eq!(
            t.take_offer_slot(&alice, 3, 2, t0).unwrap_err(),
            OfferLimit::Rate
        );
        // A minute later the window has room again.
        let c = t.take_offer_slot(&alice, 3, 2, t0 + RATE_WINDOW).unwrap();
        drop((b, c));
        assert!(lock(&t.inner).sending.is_empty());
        // Another agent is independent.
        t.take_offer_slot(&name("bob"), 3, 2, t0).unwrap();
    }

    #[tokio::test]
    async fn only_the_named_receiver_answers_and_only_once() {
        let t: Transfers<u32> = Transfers::new();
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

    #[tokio::test]
    async fn tickets_admit_one_connection_each_and_are_withdrawn_with_the_wait() {
        let t: Transfers<u32> = Transfers::new();
        let tid = TransferId([4; 16]);
        let mut issued = t.issue(tid).unwrap();
        assert!(t.issue(tid).is_none(), "tickets are drawn once");
        let (s, r) = (issued.sender_ticket, issued.receiver_ticket);
        assert_ne!(s, r);
        assert!(t.redeem(&tid, &[0; 32]).is_none());
        assert!(t.redeem(&TransferId([5; 16]), &s).is_none());
        t.redeem(&tid, &s).unwrap().send(1).unwrap();
        assert!(
            t.redeem(&tid, &s).is_none(),
            "a ticket admits one connection"
        );
        t.redeem(&tid, &r).unwrap().send(2).unwrap();
        assert_eq!(issued.arrivals().await, Some((1, 2)));
        drop(issued);
        assert_eq!(t.ticketed(), 0);
        assert!(t.redeem(&tid, &r).is_none());
    }

    #[test]
    fn relayed_transfers_count_as_incoming_until_they_end() {
        let t: Transfers<u32> = Transfers::new();
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
