//! The sending half of a chat (PROTOCOL.md §6.6): one stream of kind `Chat`
//! from this agent to every peer that is online (one upload, the broker
//! copies it), each line a signed record in a chunk of its own, and a
//! keepalive whenever a rekey interval passes without one, so the session
//! key rotates on a transfer's schedule while nobody types. When a peer
//! comes (or comes back), the stream is finished (trailer, receipts) and a
//! new one starts to everyone online; when a peer leaves, the lines it had
//! not acknowledged are reported as not delivered to it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use keyferry_common::chat::{LINE_SIGNATURE, Record, line_signed};
use keyferry_common::name::AgentName;
use keyferry_common::wire::message::{Message, Role};
use tokio::sync::mpsc;

use super::live::{self, Live};
use crate::cli::list::online;
use crate::client::{Ctx, connect};
use crate::error::AgentError;

/// The longest a chat stream goes without a record.
const KEEPALIVE: Duration = Duration::from_secs(20);

/// What the chat asks of its sending half.
#[derive(Debug)]
pub enum Cmd {
    /// Send a line (its number is the next one).
    Say(String),
    /// Acknowledge `seq` of `author`: shown here.
    Ack(AgentName, u32),
    /// `peer` acknowledged our line `seq`.
    Acked(AgentName, u32),
    /// `peer` is online (its stream to us began).
    Here(AgentName),
    /// `peer`'s stream to us ended.
    Gone(AgentName),
    /// Finish the stream and stop.
    Quit,
}

/// What the sending half tells the chat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// Our line, as sent (for the screen).
    Sent {
        /// Its number.
        seq: u32,
        /// When, ms since the epoch.
        time_ms: u64,
        /// The text.
        text: String,
    },
    /// Line `seq` did not reach `peer`.
    Undelivered {
        /// Who did not get it.
        peer: AgentName,
        /// Its number.
        seq: u32,
        /// The text.
        text: String,
        /// Why.
        why: String,
    },
    /// Anything else worth a line.
    Info(String),
}

/// A line not yet acknowledged by everyone it went to.
struct Pending {
    text: String,
    waiting: BTreeSet<AgentName>,
}

/// The sending half of a chat.
pub struct Outgoing {
    ctx: Ctx,
    peers: Vec<AgentName>,
    rekey: Duration,
    notes: mpsc::Sender<Note>,
    live: Option<Live>,
    seq: u32,
    pending: BTreeMap<u32, Pending>,
    /// Session keys of the streams that ended.
    keys_used: u64,
    /// Peers already said to be away (said once, until they come).
    away: BTreeSet<AgentName>,
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outgoing")
            .field("peers", &self.peers)
            .field("live", &self.live.is_some())
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Outgoing {
    /// The sending half for a chat with `peers`, rekeying every `rekey`.
    pub fn new(
        ctx: Ctx,
        peers: Vec<AgentName>,
        rekey: Duration,
        notes: mpsc::Sender<Note>,
    ) -> Self {
        Self {
            ctx,
            peers,
            rekey,
            notes,
            live: None,
            seq: 0,
            pending: BTreeMap::new(),
            keys_used: 0,
            away: BTreeSet::new(),
        }
    }

    async fn note(&self, n: Note) {
        let _ = self.notes.send(n).await;
    }

    /// Runs until `Quit` (or the chat goes away).
    pub async fn run(mut self, mut cmds: mpsc::Receiver<Cmd>) {
        self.start().await;
        let mut look = tokio::time::interval(Duration::from_secs(5));
        look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A keepalive at least every 20 s, well inside the peers' progress
        // timeout (60 s), and every rekey interval when that is shorter.
        let every = self.rekey.clamp(Duration::from_millis(100), KEEPALIVE);
        let mut keep = tokio::time::interval(every);
        keep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    Some(Cmd::Say(text)) => self.say(text).await,
                    Some(Cmd::Ack(author, seq)) => self.send(&Record::Ack { author, seq }).await,
                    Some(Cmd::Acked(peer, seq)) => self.acked(&peer, seq),
                    Some(Cmd::Here(peer)) => {
                        if !self.reaches(&peer) {
                            self.restart().await;
                        }
                    }
                    Some(Cmd::Gone(_)) => {}
                    Some(Cmd::Quit) | None => break,
                },
                back = next_back(&mut self.live) => self.back(back).await,
                _ = keep.tick() => {
                    let idle = self.live.as_ref().is_some_and(|l| l.last_record.elapsed() >= every);
                    if idle {
                        self.send(&Record::Keepalive).await;
                    }
                }
                _ = look.tick() => {
                    if self.peers.iter().any(|p| !self.reaches(p)) && self.someone_new().await {
                        self.restart().await;
                    }
                }
            }
        }
        self.finish().await;
        if self.keys_used > 0 {
            let n = Note::Info(format!(
                "your lines went under {} session keys, rotated every {} ms",
                self.keys_used,
                self.rekey.as_millis()
            ));
            self.note(n).await;
        }
    }

    /// Whether the live stream goes to `peer`.
    fn reaches(&self, peer: &AgentName) -> bool {
        self.live.as_ref().is_some_and(|l| l.peers().contains(peer))
    }

    /// Whether a peer the stream does not reach is online now.
    async fn someone_new(&self) -> bool {
        let Ok(mut conn) = connect(&self.ctx, Role::Sender).await else {
            return false;
        };
        let Ok(agents) = online(&self.ctx, &mut conn).await else {
            return false;
        };
        agents
            .iter()
            .any(|a| a.receiving && self.peers.contains(&a.name) && !self.reaches(&a.name))
    }

    /// A new stream to every peer online (after the old one finished).
    async fn restart(&mut self) {
        self.finish().await;
        self.start().await;
    }

    /// Offers a new stream to every peer; those online accept it. A peer
    /// that is away is said so once, until it comes.
    async fn start(&mut self) {
        let (live, away) = live::offer(&self.ctx, &self.peers, self.rekey).await;
        for (peer, error) in away {
            if !self.away.insert(peer.clone()) {
                continue;
            }
            let why = match error {
                AgentError::UnknownPeer(_)
                | AgentError::PeerOffline(_)
                | AgentError::PeerUnavailable { .. } => {
                    format!("{peer} is offline; waiting for them (a line when they come)")
                }
                e => format!("{peer} cannot be reached now ({e}); trying again"),
            };
            self.note(Note::Info(why)).await;
        }
        match live {
            Ok(Some(live)) => {
                for peer in live.peers() {
                    self.away.remove(&peer);
                }
                self.live = Some(live);
            }
            Ok(None) => {}
            Err(why) => {
                self.note(Note::Info(format!("the chat could not start: {why}")))
                    .await;
            }
        }
    }

    /// Sends a line to everyone the stream reaches; says who it cannot reach.
    async fn say(&mut self, text: String) {
        self.seq += 1;
        let (seq, time_ms) = (self.seq, now_ms());
        let reached: Vec<AgentName> = self.live.as_ref().map(Live::peers).unwrap_or_default();
        self.note(Note::Sent {
            seq,
            time_ms,
            text: text.clone(),
        })
        .await;
        for peer in self.peers.iter().filter(|p| !reached.contains(p)) {
            let n = Note::Undelivered {
                peer: peer.clone(),
                seq,
                text: text.clone(),
                why: "not here".into(),
            };
            let _ = self.notes.send(n).await;
        }
        let Some(live) = &self.live else { return };
        let signed = line_signed(&live.stream_id(), seq, time_ms, &text);
        let identity = Arc::clone(&self.ctx.identity);
        let signature = tokio::task::spawn_blocking(move || identity.sign(LINE_SIGNATURE, &signed))
            .await
            .unwrap_or_default();
        self.pending.insert(
            seq,
            Pending {
                text: text.clone(),
                waiting: reached.into_iter().collect(),
            },
        );
        self.send(&Record::Line {
            seq,
            time_ms,
            text,
            signature,
        })
        .await;
    }

    /// Puts one record on the live stream; a stream that fails is dropped
    /// (its peers' unacknowledged lines reported).
    async fn send(&mut self, record: &Record) {
        let Some(live) = &mut self.live else { return };
        if let Err(why) = live.send(record).await {
            self.lost(&format!("the chat stream failed ({why})")).await;
        }
    }

    /// `peer` showed our line `seq` (and so every earlier one).
    fn acked(&mut self, peer: &AgentName, seq: u32) {
        self.pending.retain(|s, p| {
            if *s <= seq {
                p.waiting.remove(peer);
            }
            !p.waiting.is_empty()
        });
    }

    /// What came back on the data connection.
    async fn back(&mut self, msg: Option<Message>) {
        match msg {
            Some(Message::Abort { transfer_id, .. }) => {
                let Some(live) = &mut self.live else { return };
                let Some(peer) = live.remove(transfer_id) else {
                    return;
                };
                if live.peers().is_empty()
                    && let Some(live) = self.live.take()
                {
                    self.keys_used += live.session_keys();
                }
                self.undelivered(&peer, "it left").await;
            }
            Some(_) => {}
            None => self.lost("the connection to the broker was lost").await,
        }
    }

    /// The live stream is gone: every line not yet acknowledged is
    /// reported for each peer that had not acknowledged it.
    async fn lost(&mut self, why: &str) {
        let Some(live) = self.live.take() else { return };
        self.keys_used += live.session_keys();
        for peer in live.peers() {
            self.undelivered(&peer, why).await;
        }
    }

    /// Reports the lines `peer` has not acknowledged, and forgets them for it.
    async fn undelivered(&mut self, peer: &AgentName, why: &str) {
        let mut notes = Vec::new();
        self.pending.retain(|seq, p| {
            if p.waiting.remove(peer) {
                notes.push(Note::Undelivered {
                    peer: peer.clone(),
                    seq: *seq,
                    text: p.text.clone(),
                    why: why.to_owned(),
                });
            }
            !p.waiting.is_empty()
        });
        for n in notes {
            self.note(n).await;
        }
    }

    /// Ends the live stream properly; a peer's receipt confirms every line
    /// of it, and the lines of a peer that sent none are reported.
    async fn finish(&mut self) {
        let Some(live) = self.live.take() else { return };
        self.keys_used += live.session_keys();
        let (confirmed, not) = live.finish(&self.ctx.identity).await;
        for peer in confirmed {
            self.acked(&peer, u32::MAX);
        }
        for peer in not {
            self.undelivered(&peer, "it did not confirm the end of the chat stream")
                .await;
        }
    }
}

/// The next message back on the live stream's data connection; never ready
/// without a live stream.
async fn next_back(live: &mut Option<Live>) -> Option<Message> {
    match live {
        Some(l) => l.back().await,
        None => std::future::pending().await,
    }
}
