//! A direct stream over several connections (PROTOCOL.md §2.7, "Several
//! connections"): on a long path one TCP connection carries at most its send
//! buffer per round trip, so the sender opens more to the address it
//! dialled, each proved like the first, and spreads the stream over them
//! ([`keyferry_common::io::lanes`]) if that address's listener proved itself
//! first. The sender picks how many from the round trip its first connect
//! took (or `--streams`, [`crate::streams`]) and dials them at once, beside the first one's
//! proof; the receiver gathers them before its stream begins.

use std::sync::Arc;
use std::time::Duration;

use keyferry_common::crypto::keys::MacKey;
use keyferry_common::handshake::direct::{Challenges, LaneProof, MAX_LANES};
use keyferry_common::ids::TransferId;
use keyferry_common::io::connection::Connection;
use keyferry_common::io::lanes::Pipe;
use keyferry_common::wire::message::Message;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::{DIAL_TIMEOUT, PROOF_TIMEOUT};
use crate::client::DataConn;

/// A direct connection that proved its listener, not yet the stream's.
pub(super) type Probe = Connection<TcpStream>;

/// Opens `n` more connections to `addr` and has each listener prove itself
/// (as [`super::dial`]'s first); those that do so in time. The receiver
/// gives every connection [`PROOF_TIMEOUT`] from its accept to the sender's
/// proof, and the first connection (whose connect took `rtt`, and which was
/// accepted about when this began) waits for these: so all of it must end
/// within that budget, less that round trip twice over and half a second for
/// the proofs' way.
pub(super) async fn open_more(
    addr: std::net::SocketAddr,
    key: &Arc<MacKey>,
    tid: TransferId,
    (n, rtt): (u8, Duration),
) -> Vec<(Probe, Challenges)> {
    let budget = PROOF_TIMEOUT
        .saturating_sub(rtt.saturating_mul(2))
        .saturating_sub(Duration::from_millis(500));
    let deadline = tokio::time::Instant::now() + budget;
    let mut tries = JoinSet::new();
    for _ in 0..n {
        let key = Arc::clone(key);
        tries.spawn(async move {
            let tcp = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr))
                .await
                .ok()?
                .ok()?;
            super::dial::one(tcp, &key, tid).await.ok()
        });
    }
    let mut proved = Vec::new();
    // Those still trying at the deadline are dropped (aborted) with `tries`.
    while let Ok(Some(joined)) = tokio::time::timeout_at(deadline, tries.join_next()).await {
        if let Ok(Some((conn, c))) = joined {
            proved.push((conn, c));
        }
    }
    proved
}

/// The sender's stream on `first` (whose listener proved itself over `c`)
/// and the further connections in `more`: each further one gets its number
/// and proof, then `first` its proof naming how many there are, and the
/// stream runs over all of them. Returns it and how many carry it.
pub(super) async fn join(
    mut first: Probe,
    c: &Challenges,
    more: Vec<(Probe, Challenges)>,
    key: &MacKey,
    tid: TransferId,
) -> Result<(DataConn, u8), String> {
    let lanes = crate::streams::number(
        more,
        |lane, (mut conn, ck): (Probe, Challenges)| async move {
            let proof = LaneProof::Further(lane).tag(key, &tid, &ck);
            let told = conn
                .writer
                .write(&Message::DirectLane { lane, proof })
                .await;
            // Nothing comes back on it: bytes read ahead there are none.
            told.ok().map(|()| conn.into_inner().0)
        },
    )
    .await;
    let n = u8::try_from(lanes.len() + 1).unwrap_or(MAX_LANES);
    let proof = LaneProof::First(n).tag(key, &tid, c);
    let proof = match n {
        1 => Message::DirectProof { proof },
        lanes => Message::DirectLanes { lanes, proof },
    };
    first
        .writer
        .write(&proof)
        .await
        .map_err(|e| e.to_string())?;
    let (tcp, ahead) = first.into_inner();
    if n == 1 {
        return Ok((Connection::with_buffer(Pipe::Tcp(tcp), ahead), 1));
    }
    for lane in std::iter::once(&tcp).chain(&lanes) {
        let _ = keyferry_common::io::tcp::lane_out(lane);
    }
    let pipe = Pipe::spread((tcp, ahead), lanes);
    Ok((Connection::new(pipe), n))
}

/// A connection that proved itself as the sender's, for a receiver's wait.
#[derive(Debug)]
pub(super) enum Arrival {
    /// The first, saying how many the stream takes.
    First(u8, Probe),
    /// A further one, with its number.
    Further(u8, Probe),
}

/// A receiver's gathering of a stream's connections as they prove
/// themselves: once the first arrived, the rest must within
/// [`PROOF_TIMEOUT`], else the direct path is given up (the sender's stream
/// breaks and it goes on over the relay).
#[derive(Debug)]
pub(super) struct Gathering {
    arrivals: mpsc::UnboundedReceiver<Arrival>,
    first: Option<(u8, Probe)>,
    further: Vec<Option<Probe>>,
    deadline: Option<tokio::time::Instant>,
}

impl Gathering {
    pub(super) fn new(arrivals: mpsc::UnboundedReceiver<Arrival>) -> Self {
        Self {
            arrivals,
            first: None,
            further: (0..MAX_LANES).map(|_| None).collect(),
            deadline: None,
        }
    }

    /// The stream's connection once all of it proved itself; never returns
    /// if it does not. Safe to cancel: what arrived is kept.
    pub(super) async fn connection(&mut self) -> DataConn {
        loop {
            if let Some((n, _)) = &self.first
                && (1..usize::from(*n)).all(|k| self.further.get(k).is_some_and(Option::is_some))
                && let Some(conn) = self.assemble()
            {
                return conn;
            }
            let next = match self.deadline {
                Some(d) => match tokio::time::timeout_at(d, self.arrivals.recv()).await {
                    Ok(a) => a,
                    Err(_) => {
                        // Not all came: none of them carries the stream.
                        self.arrivals.close();
                        self.first = None;
                        self.further.iter_mut().for_each(|f| *f = None);
                        self.deadline = None;
                        continue;
                    }
                },
                None => self.arrivals.recv().await,
            };
            match next {
                Some(Arrival::First(n, conn)) => {
                    self.first = Some((n, conn));
                    self.deadline = Some(tokio::time::Instant::now() + PROOF_TIMEOUT);
                }
                Some(Arrival::Further(lane, conn)) => {
                    if let Some(slot) = self.further.get_mut(usize::from(lane)) {
                        *slot = Some(conn);
                    }
                }
                None => std::future::pending::<()>().await,
            }
        }
    }

    /// The receiver's stream over the first connection and the further ones
    /// it names.
    fn assemble(&mut self) -> Option<DataConn> {
        let (n, first) = self.first.take()?;
        let (tcp, ahead) = first.into_inner();
        if n == 1 {
            return Some(Connection::with_buffer(Pipe::Tcp(tcp), ahead));
        }
        let mut rest = Vec::new();
        for k in 1..usize::from(n) {
            rest.push(self.further.get_mut(k)?.take()?.into_inner());
        }
        self.arrivals.close();
        for lane in std::iter::once(&tcp).chain(rest.iter().map(|(t, _)| t)) {
            let _ = keyferry_common::io::tcp::lane_in(lane);
        }
        Some(Connection::new(Pipe::gather((tcp, ahead), rest)))
    }
}
