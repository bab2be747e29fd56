//! The tickets of accepted transfers (PROTOCOL.md §2.5): two per transfer,
//! one for the sender's data connection and one for the receiver's, each good
//! for one connection and withdrawn when the transfer's wait for them ends.
//!
//! A sender that sends one stream to several receivers at once redeems the
//! sender tickets of all of them on one data connection (its upload). That
//! connection goes to the first of those transfers, with a channel on which
//! the others hand over their receivers' connections ([`Arrival::Upload`]);
//! each of the others is told where to hand its receiver's connection
//! ([`Arrival::Joined`]).
//!
//! Either side of a transfer with one receiver may spread its data connection
//! over several (its lanes): the first presents the side's ticket with their
//! number ([`Tickets::redeem_lanes`]), the others the same ticket with their
//! place ([`Tickets::redeem_lane`]), in any order; those that come before the
//! first are held, at most one per place and side.
//!
//! Plain state, no sockets: a redeemed ticket hands over whatever
//! data-connection value `C` the caller uses (the relay's connection in the
//! broker, a number in the tests). Tickets are compared in constant time.

use std::collections::HashMap;
use std::sync::Mutex;

use keyferry_common::crypto::random_array;
use keyferry_common::handshake::direct::MAX_LANES;
use keyferry_common::ids::{StreamId, TransferId};
use keyferry_common::name::AgentName;
use keyferry_common::sync::lock;
use subtle::ConstantTimeEq as _;
use tokio::sync::{mpsc, oneshot};

/// Most receivers one upload may have.
pub const MAX_FANOUT: usize = 16;

/// A receiver's data connection handed to the relay of its stream, and
/// what tells its transfer's task that the relay ended.
#[derive(Debug)]
pub struct Joiner<C> {
    /// The receiver's transfer; several for a feed to another broker that
    /// carries one copy to its receivers of the upload.
    pub tids: Vec<TransferId>,
    /// Whether it is a feed to another broker.
    pub feed: bool,
    /// Its data connection.
    pub conn: C,
    /// Dropped (or sent) when the relay ends.
    pub done: oneshot::Sender<()>,
}

/// What a transfer's sender side gets when its sender ticket is redeemed.
#[derive(Debug)]
pub enum Arrival<C> {
    /// The upload connection. `others` are the other transfers of the
    /// stream it was redeemed for (none for one receiver); their receivers'
    /// connections arrive on `joiners`.
    Upload {
        /// The sender's data connection.
        conn: C,
        /// The other transfers of the upload.
        others: Vec<TransferId>,
        /// Where their receivers' connections arrive.
        joiners: mpsc::Receiver<Joiner<C>>,
    },
    /// The stream is uploaded on another transfer's connection: this
    /// transfer's receiver connection goes to `hub`.
    Joined {
        /// The relay's channel for receivers' connections.
        hub: mpsc::Sender<Joiner<C>>,
    },
}

struct Slot<T> {
    ticket: [u8; 32],
    to: Option<oneshot::Sender<T>>,
}

struct Entry<C> {
    sender: Slot<Arrival<C>>,
    receiver: Slot<C>,
    stream: StreamId,
    from: AgentName,
    /// The further connections of each side (by [`Side`]).
    lanes: [Lanes<C>; 2],
}

/// A side of a transfer's data connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Sender = 0,
    Receiver = 1,
}

impl<C> Entry<C> {
    /// Whose ticket `ticket` is (compared in constant time with both).
    fn side_of(&self, ticket: &[u8; 32]) -> Option<Side> {
        let (s, r) = (
            matches(&self.sender.ticket, ticket),
            matches(&self.receiver.ticket, ticket),
        );
        match (s, r) {
            (true, _) => Some(Side::Sender),
            (_, true) => Some(Side::Receiver),
            _ => None,
        }
    }
}

/// The first of several connections, by side: where it goes.
enum First<C> {
    Sender(oneshot::Sender<Arrival<C>>),
    Receiver(oneshot::Sender<C>),
}

/// A first of several connections, taken.
#[derive(Debug)]
pub enum LanesRedeemed<C> {
    /// The sender's: to complete with [`Tickets::redeem_upload`].
    Sender(Reserved<C>, Further<C>),
    /// The receiver's: its connections go here, once all are there.
    Receiver(oneshot::Sender<C>, Further<C>),
}

/// The further connections of a sender's stream over several.
struct Lanes<C> {
    /// How many the first said there are; `Some(1)` once the sender ticket
    /// was redeemed by a connection of its own (then none is taken).
    count: Option<u8>,
    /// Those that came before the first, by place.
    held: Vec<(u8, C)>,
    /// Where those that come after the first go.
    to: Option<mpsc::Sender<(u8, C)>>,
    /// The places taken, one bit each.
    taken: u8,
}

impl<C> Default for Lanes<C> {
    fn default() -> Self {
        Self {
            count: None,
            held: Vec::new(),
            to: None,
            taken: 0,
        }
    }
}

/// The further connections of a stream over lanes: those that came before
/// its first, and where the others arrive (each with its place).
#[derive(Debug)]
pub struct Further<C> {
    /// Those already there.
    pub held: Vec<(u8, C)>,
    /// Those still to come.
    pub arriving: mpsc::Receiver<(u8, C)>,
}

/// Every transfer waiting for its data connections.
pub struct Tickets<C> {
    inner: Mutex<HashMap<TransferId, Entry<C>>>,
}

impl<C> std::fmt::Debug for Tickets<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tickets")
            .field("waiting", &lock(&self.inner).len())
            .finish()
    }
}

impl<C> Default for Tickets<C> {
    fn default() -> Self {
        Self {
            inner: Mutex::new(HashMap::new()),
        }
    }
}

/// One transfer's tickets and the connections to wait for. Dropping it
/// withdraws both tickets.
pub struct Issued<'a, C> {
    tickets: &'a Tickets<C>,
    tid: TransferId,
    /// The sender's ticket.
    pub sender_ticket: [u8; 32],
    /// The receiver's ticket.
    pub receiver_ticket: [u8; 32],
    /// The sender side's arrival.
    pub sender: oneshot::Receiver<Arrival<C>>,
    /// The receiver's data connection.
    pub receiver: oneshot::Receiver<C>,
}

impl<C> std::fmt::Debug for Issued<'_, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("tid", &self.tid)
            .finish_non_exhaustive()
    }
}

impl<C> Drop for Issued<'_, C> {
    fn drop(&mut self) {
        // Held connections close after the lock is released.
        let gone = lock(&self.tickets.inner).remove(&self.tid);
        drop(gone);
    }
}

/// A redeemed first ticket.
#[derive(Debug)]
pub enum Redeemed<C> {
    /// A receiver's: its connection goes here.
    Receiver(oneshot::Sender<C>),
    /// A sender's, taken: more sender tickets of the same stream may follow
    /// ([`Tickets::redeem_upload`]).
    Sender(Reserved<C>),
}

/// A sender ticket taken by a data connection that may present more.
#[derive(Debug)]
pub struct Reserved<C> {
    tid: TransferId,
    to: oneshot::Sender<Arrival<C>>,
    stream: StreamId,
    from: AgentName,
}

impl<C> Reserved<C> {
    /// The stream the ticket's transfer belongs to.
    pub fn stream(&self) -> StreamId {
        self.stream
    }

    /// The transfer's sender.
    pub fn from(&self) -> &AgentName {
        &self.from
    }
}

fn matches(slot_ticket: &[u8; 32], ticket: &[u8; 32]) -> bool {
    bool::from(slot_ticket.ct_eq(ticket))
}

/// Whether another waiting transfer has `tid`'s stream and sender.
fn shares<C>(i: &HashMap<TransferId, Entry<C>>, tid: &TransferId) -> bool {
    let Some(e) = i.get(tid) else {
        return false;
    };
    i.iter()
        .any(|(t, o)| t != tid && o.stream == e.stream && o.from == e.from)
}

impl<C> Tickets<C> {
    /// No tickets yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Draws the two tickets of transfer `tid` of stream `stream` from
    /// `from`; `None` if it already has some.
    pub fn issue(
        &self,
        tid: TransferId,
        stream: StreamId,
        from: &AgentName,
    ) -> Option<Issued<'_, C>> {
        let (sender_ticket, receiver_ticket) = (random_array(), random_array());
        let (s_tx, s_rx) = oneshot::channel();
        let (r_tx, r_rx) = oneshot::channel();
        let mut i = lock(&self.inner);
        if i.contains_key(&tid) {
            return None;
        }
        i.insert(
            tid,
            Entry {
                sender: Slot {
                    ticket: sender_ticket,
                    to: Some(s_tx),
                },
                receiver: Slot {
                    ticket: receiver_ticket,
                    to: Some(r_tx),
                },
                stream,
                from: from.clone(),
                lanes: [Lanes::default(), Lanes::default()],
            },
        );
        Some(Issued {
            tickets: self,
            tid,
            sender_ticket,
            receiver_ticket,
            sender: s_rx,
            receiver: r_rx,
        })
    }

    /// Whether another transfer of `tid`'s stream (an upload to several
    /// receivers) is waiting for its data connections too.
    pub fn shares_stream(&self, tid: &TransferId) -> bool {
        shares(&lock(&self.inner), tid)
    }

    /// Takes the first ticket a data connection presents, once: a
    /// receiver's gives the place its connection goes, a sender's a
    /// reservation that [`Self::redeem_upload`] completes. `None`: no such
    /// ticket waits (unknown, used or withdrawn).
    pub fn redeem(&self, tid: &TransferId, ticket: &[u8; 32]) -> Option<Redeemed<C>> {
        // Declared before the lock, so dropped (closed) after it.
        let _gone: Vec<(u8, C)>;
        let mut i = lock(&self.inner);
        let e = i.get_mut(tid)?;
        let (s, r) = (
            matches(&e.sender.ticket, ticket),
            matches(&e.receiver.ticket, ticket),
        );
        if r {
            let to = e.receiver.to.take()?;
            let lanes = &mut e.lanes[Side::Receiver as usize];
            lanes.count = Some(1);
            _gone = std::mem::take(&mut lanes.held);
            return Some(Redeemed::Receiver(to));
        }
        if !s {
            return None;
        }
        let to = e.sender.to.take()?;
        let lanes = &mut e.lanes[Side::Sender as usize];
        lanes.count = Some(1);
        _gone = std::mem::take(&mut lanes.held);
        Some(Redeemed::Sender(Reserved {
            tid: *tid,
            to,
            stream: e.stream,
            from: e.from.clone(),
        }))
    }

    /// Takes a ticket of `tid` for the first of `n` (2 to [`MAX_LANES`])
    /// data connections carrying its side of the stream, once: for the
    /// sender's ticket the reservation to complete with
    /// [`Self::redeem_upload`] (with no other ticket), for the receiver's
    /// where its connection goes; and the further connections. `None` if no
    /// such ticket waits, `n` is out of range, or the transfer is one of an
    /// upload to several receivers (whose connections are one each).
    pub fn redeem_lanes(
        &self,
        tid: &TransferId,
        ticket: &[u8; 32],
        n: u8,
    ) -> Option<LanesRedeemed<C>> {
        let mut gone = Vec::new();
        let mut i = lock(&self.inner);
        if !(2..=MAX_LANES).contains(&n) || shares(&i, tid) {
            return None;
        }
        let e = i.get_mut(tid)?;
        let side = e.side_of(ticket)?;
        let first = match side {
            Side::Sender => First::Sender(e.sender.to.take()?),
            Side::Receiver => First::Receiver(e.receiver.to.take()?),
        };
        let (tx, arriving) = mpsc::channel(usize::from(MAX_LANES));
        let lanes = &mut e.lanes[side as usize];
        lanes.count = Some(n);
        lanes.to = Some(tx);
        let mut held = Vec::new();
        for (k, conn) in std::mem::take(&mut lanes.held) {
            if k < n {
                held.push((k, conn));
            } else {
                gone.push(conn);
            }
        }
        let further = Further { held, arriving };
        Some(match first {
            First::Sender(to) => LanesRedeemed::Sender(
                Reserved {
                    tid: *tid,
                    to,
                    stream: e.stream,
                    from: e.from.clone(),
                },
                further,
            ),
            First::Receiver(to) => LanesRedeemed::Receiver(to, further),
        })
    }

    /// Whether `ticket` is the sender ticket of `tid` (compared in constant
    /// time), so that a lane presenting it may be readied to receive a
    /// stream before it is placed.
    pub fn is_sender_ticket(&self, tid: &TransferId, ticket: &[u8; 32]) -> bool {
        let i = lock(&self.inner);
        i.get(tid)
            .is_some_and(|e| e.side_of(ticket) == Some(Side::Sender))
    }

    /// Takes `conn` as place `lane` of the side of the stream whose ticket
    /// is `ticket`: held until its first comes, or handed to it. Gives the
    /// connection back if no such ticket waits, the place is out of range or
    /// taken, the first took one connection (or fewer places), or the
    /// transfer is one of an upload to several receivers.
    pub fn redeem_lane(
        &self,
        tid: &TransferId,
        ticket: &[u8; 32],
        lane: u8,
        conn: C,
    ) -> Result<(), C> {
        let mut i = lock(&self.inner);
        let several = shares(&i, tid);
        let Some(e) = i.get_mut(tid) else {
            return Err(conn);
        };
        let Some(side) = e.side_of(ticket) else {
            return Err(conn);
        };
        // The ticket still waits, or was taken by a first of lanes.
        let waits = match side {
            Side::Sender => e.sender.to.is_some(),
            Side::Receiver => e.receiver.to.is_some(),
        };
        let lanes = &mut e.lanes[side as usize];
        let bit = 1u8.checked_shl(u32::from(lane)).unwrap_or(0);
        let in_range = lane >= 1 && lane < lanes.count.unwrap_or(MAX_LANES);
        let open = waits || lanes.to.is_some();
        if !in_range || lanes.taken & bit != 0 || !open || several {
            return Err(conn);
        }
        match (&lanes.to, lanes.count) {
            (Some(to), _) => to.try_send((lane, conn)).map_err(|e| match e {
                mpsc::error::TrySendError::Full((_, c))
                | mpsc::error::TrySendError::Closed((_, c)) => c,
            })?,
            (None, None) => lanes.held.push((lane, conn)),
            (None, Some(_)) => return Err(conn),
        }
        lanes.taken |= bit;
        Ok(())
    }

    /// Completes an upload: `first` and the sender tickets in `more`, each
    /// still waiting, all of one stream from one sender, at most
    /// [`MAX_FANOUT`] in all and no transfer twice. The connection goes to
    /// `first`'s transfer, the others are joined to it. Gives the connection
    /// back if any check fails (then `more` is left as it was; `first` is
    /// used up either way).
    ///
    /// `remote` are transfers of the same upload whose receivers are on
    /// other brokers: the relay waits for their feeds too, which the caller
    /// hands to the channel returned (`None` without any).
    #[allow(clippy::type_complexity)]
    pub fn redeem_upload(
        &self,
        first: Reserved<C>,
        more: &[(TransferId, [u8; 32])],
        remote: &[TransferId],
        conn: C,
    ) -> Result<Option<mpsc::Sender<Joiner<C>>>, C> {
        let mut i = lock(&self.inner);
        if more.len() + remote.len() >= MAX_FANOUT {
            return Err(conn);
        }
        let mut seen = vec![first.tid];
        for (tid, ticket) in more {
            let ok = i.get(tid).is_some_and(|e| {
                matches(&e.sender.ticket, ticket)
                    && e.sender.to.is_some()
                    && e.stream == first.stream
                    && e.from == first.from
            });
            if !ok || seen.contains(tid) {
                return Err(conn);
            }
            seen.push(*tid);
        }
        for tid in remote {
            if seen.contains(tid) {
                return Err(conn);
            }
            seen.push(*tid);
        }
        let (hub, joiners) = mpsc::channel(MAX_FANOUT);
        for tid in &seen[1..seen.len() - remote.len()] {
            if let Some(to) = i.get_mut(tid).and_then(|e| e.sender.to.take()) {
                let _ = to.send(Arrival::Joined { hub: hub.clone() });
            }
        }
        let feeds = (!remote.is_empty()).then(|| hub.clone());
        drop(hub);
        let upload = Arrival::Upload {
            conn,
            others: seen[1..].to_vec(),
            joiners,
        };
        // If the wait just ended, the connection is dropped, which is its
        // answer (after the lock is released); and no other broker is fed
        // for it.
        let sent = first.to.send(upload);
        drop(i);
        match sent {
            Ok(()) => Ok(feeds),
            Err(_) => Ok(None),
        }
    }

    /// Transfers waiting for their data connections.
    pub fn waiting(&self) -> usize {
        lock(&self.inner).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> AgentName {
        AgentName::new(s).unwrap()
    }

    #[tokio::test]
    async fn tickets_admit_one_connection_each_and_are_withdrawn_with_the_wait() {
        let t: Tickets<u32> = Tickets::new();
        let (tid, sid, alice) = (TransferId([4; 16]), StreamId([1; 16]), name("alice"));
        let mut issued = t.issue(tid, sid, &alice).unwrap();
        assert!(
            t.issue(tid, sid, &alice).is_none(),
            "tickets are drawn once"
        );
        let (s, r) = (issued.sender_ticket, issued.receiver_ticket);
        assert_ne!(s, r);
        assert!(t.redeem(&tid, &[0; 32]).is_none());
        assert!(t.redeem(&TransferId([5; 16]), &s).is_none());
        let Some(Redeemed::Sender(first)) = t.redeem(&tid, &s) else {
            panic!("the sender's ticket")
        };
        assert!(
            t.redeem(&tid, &s).is_none(),
            "a ticket admits one connection"
        );
        t.redeem_upload(first, &[], &[], 1).unwrap();
        let Some(Redeemed::Receiver(to)) = t.redeem(&tid, &r) else {
            panic!("the receiver's ticket")
        };
        to.send(2).unwrap();
        let Ok(Arrival::Upload { conn, others, .. }) = (&mut issued.sender).await else {
            panic!("the upload")
        };
        assert_eq!((conn, others), (1, vec![]));
        assert_eq!((&mut issued.receiver).await, Ok(2));
        drop(issued);
        assert_eq!(t.waiting(), 0);
        assert!(t.redeem(&tid, &r).is_none());
    }

    #[tokio::test]
    async fn one_upload_serves_the_transfers_of_one_stream_from_one_sender() {
        let t: Tickets<u32> = Tickets::new();
        let (alice, mallory) = (name("alice"), name("mallory"));
        let (sid, other) = (StreamId([1; 16]), StreamId([2; 16]));
        let tids: Vec<TransferId> = (1..=3).map(|i| TransferId([i; 16])).collect();
        let mut issued: Vec<_> = tids
            .iter()
            .map(|tid| t.issue(*tid, sid, &alice).unwrap())
            .collect();
        let foreign = t.issue(TransferId([8; 16]), other, &alice).unwrap();
        let theirs = t.issue(TransferId([9; 16]), sid, &mallory).unwrap();
        let all: Vec<_> = tids
            .iter()
            .zip(&issued)
            .map(|(tid, i)| (*tid, i.sender_ticket))
            .collect();
        // Another stream's ticket, another sender's, a receiver's ticket, the
        // first transfer again: refused whole, the others not taken.
        let spare_tid = TransferId([50; 16]);
        for case in 0..5 {
            let mut spare = t.issue(spare_tid, sid, &alice).unwrap();
            let bad = match case {
                0 => vec![(TransferId([8; 16]), foreign.sender_ticket)],
                1 => vec![(TransferId([9; 16]), theirs.sender_ticket)],
                2 => vec![(tids[1], issued[1].receiver_ticket)],
                3 => vec![all[1], all[1]],
                _ => vec![(spare_tid, spare.sender_ticket)],
            };
            let Some(Redeemed::Sender(first)) = t.redeem(&spare_tid, &spare.sender_ticket) else {
                panic!("a spare upload")
            };
            assert_eq!(
                t.redeem_upload(first, &bad, &[], 7).unwrap_err(),
                7,
                "case {case}"
            );
            assert!((&mut spare.sender).await.is_err(), "the first is used up");
        }
        let Some(Redeemed::Sender(first)) = t.redeem(&tids[0], &all[0].1) else {
            panic!("the first sender ticket")
        };
        t.redeem_upload(first, &all[1..], &[], 7).unwrap();
        let Ok(Arrival::Upload {
            conn,
            others,
            mut joiners,
        }) = (&mut issued[0].sender).await
        else {
            panic!("the upload")
        };
        assert_eq!((conn, others), (7, tids[1..].to_vec()));
        for (k, i) in issued.iter_mut().enumerate().skip(1) {
            let Ok(Arrival::Joined { hub }) = (&mut i.sender).await else {
                panic!("joined")
            };
            let (done, _) = oneshot::channel();
            hub.send(Joiner {
                tids: vec![tids[k]],
                feed: false,
                conn: 10 + k as u32,
                done,
            })
            .await
            .unwrap();
        }
        let (a, b) = (joiners.recv().await.unwrap(), joiners.recv().await.unwrap());
        assert_eq!(
            (a.tids, a.conn, b.tids, b.conn),
            (vec![tids[1]], 11, vec![tids[2]], 12)
        );
        // Too many receivers for one upload.
        let spare = t.issue(TransferId([60; 16]), sid, &alice).unwrap();
        let Some(Redeemed::Sender(first)) = t.redeem(&TransferId([60; 16]), &spare.sender_ticket)
        else {
            panic!("a spare upload")
        };
        let many: Vec<_> = (0..MAX_FANOUT)
            .map(|i| (TransferId([100 + i as u8; 16]), [0; 32]))
            .collect();
        assert_eq!(t.redeem_upload(first, &many, &[], 3).unwrap_err(), 3);
    }

    #[tokio::test]
    async fn a_stream_over_lanes_takes_each_place_once_in_any_order() {
        let t: Tickets<u32> = Tickets::new();
        let (tid, sid, alice) = (TransferId([4; 16]), StreamId([1; 16]), name("alice"));
        let mut issued = t.issue(tid, sid, &alice).unwrap();
        let (s, r) = (issued.sender_ticket, issued.receiver_ticket);
        // Before the first: held, once per place of each side.
        assert_eq!(t.redeem_lane(&tid, &s, 2, 102), Ok(()));
        assert_eq!(t.redeem_lane(&tid, &s, 2, 99), Err(99), "a place taken");
        assert_eq!(
            t.redeem_lane(&tid, &r, 2, 202),
            Ok(()),
            "the receiver's own"
        );
        assert_eq!(t.redeem_lane(&tid, &r, 2, 98), Err(98), "a place taken");
        assert_eq!(t.redeem_lane(&tid, &[0; 32], 1, 97), Err(97));
        assert_eq!(
            t.redeem_lane(&tid, &s, 0, 96),
            Err(96),
            "place 0 is the first's"
        );
        assert_eq!(t.redeem_lane(&tid, &s, MAX_LANES, 95), Err(95));
        assert_eq!(
            t.redeem_lane(&tid, &s, 6, 106),
            Ok(()),
            "held, beyond the count to come"
        );
        for bad in [0, 1, MAX_LANES + 1] {
            assert!(t.redeem_lanes(&tid, &s, bad).is_none(), "{bad} lanes");
        }
        let Some(LanesRedeemed::Sender(first, mut further)) = t.redeem_lanes(&tid, &s, 3) else {
            panic!("the sender's lanes")
        };
        assert!(t.redeem_lanes(&tid, &s, 3).is_none(), "once");
        // The receiver's side on its own: two connections.
        let Some(LanesRedeemed::Receiver(to, theirs)) = t.redeem_lanes(&tid, &r, 2) else {
            panic!("the receiver's lanes")
        };
        assert!(theirs.held.is_empty(), "place 2 is past 2 lanes");
        assert!(t.redeem(&tid, &r).is_none(), "its ticket is taken");
        to.send(200).unwrap();
        assert_eq!((&mut issued.receiver).await, Ok(200));
        assert_eq!(further.held, vec![(2, 102)], "place 6 is past 3 lanes");
        // After the first: handed on; past the count or taken: refused.
        assert_eq!(t.redeem_lane(&tid, &s, 3, 93), Err(93));
        assert_eq!(t.redeem_lane(&tid, &s, 2, 92), Err(92));
        assert_eq!(t.redeem_lane(&tid, &s, 1, 101), Ok(()));
        assert_eq!(further.arriving.recv().await, Some((1, 101)));
        t.redeem_upload(first, &[], &[], 100).unwrap();
        assert!(matches!(
            (&mut issued.sender).await,
            Ok(Arrival::Upload { conn: 100, .. })
        ));
        // A sender ticket redeemed by one connection takes no lanes.
        let tid2 = TransferId([5; 16]);
        let two = t.issue(tid2, sid, &alice).unwrap();
        let Some(Redeemed::Sender(_)) = t.redeem(&tid2, &two.sender_ticket) else {
            panic!("the sender's ticket")
        };
        assert_eq!(t.redeem_lane(&tid2, &two.sender_ticket, 1, 91), Err(91));
        // Nor does an upload to several receivers.
        let tid3 = TransferId([6; 16]);
        let three = t.issue(tid3, sid, &alice).unwrap();
        assert!(t.redeem_lanes(&tid3, &three.sender_ticket, 2).is_none());
        assert_eq!(t.redeem_lane(&tid3, &three.sender_ticket, 1, 89), Err(89));
        drop((issued, two, three));
        assert_eq!(t.redeem_lane(&tid, &s, 1, 90), Err(90), "withdrawn");
        // A sender ticket joined to another's upload takes no lanes, also
        // once that other's wait ended.
        let (ta, tb) = (TransferId([7; 16]), TransferId([8; 16]));
        let a = t.issue(ta, sid, &alice).unwrap();
        let b = t.issue(tb, sid, &alice).unwrap();
        let Some(Redeemed::Sender(first)) = t.redeem(&ta, &a.sender_ticket) else {
            panic!("the upload's first ticket")
        };
        t.redeem_upload(first, &[(tb, b.sender_ticket)], &[], 300)
            .unwrap();
        drop(a);
        assert_eq!(t.redeem_lane(&tb, &b.sender_ticket, 1, 88), Err(88));
    }
}
