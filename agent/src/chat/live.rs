//! One chat stream going out (PROTOCOL.md §6.6): offered to every peer at
//! once, its data connection to the broker (one upload, copied to each peer
//! that accepted), its sealing state, and its end (an empty last chunk, the
//! trailer, the receipts). What comes back on the data connection (a peer's
//! abort, the receipts) is read by a task of its own into a channel.

use std::time::{Duration, Instant};

use keyferry_common::chat::{CHAT_BOUND, Record};
use keyferry_common::handshake::{Kind, Terms};
use keyferry_common::identity::{Fingerprint, Identity};
use keyferry_common::ids::{StreamId, TransferId};
use keyferry_common::io::connection::{Connection, FrameWriter};
use keyferry_common::io::lanes::Pipe;
use keyferry_common::manifest::Manifest;
use keyferry_common::name::AgentName;
use keyferry_common::schedule::PairKeys;
use keyferry_common::transfer::{RekeyPolicy, SendStream, StreamStart};
use keyferry_common::wire::message::Message;
use tokio::io::WriteHalf;
use tokio::sync::mpsc;

use crate::client::{Ctx, open_upload};
use crate::error::AgentError;
use crate::send::attempt::{Failed, Handshake, offer_to};

/// One receiver of the stream.
struct Peer {
    name: AgentName,
    fp: Fingerprint,
    tid: TransferId,
    pair: PairKeys,
}

/// The stream going out now.
pub(super) struct Live {
    writer: FrameWriter<WriteHalf<Pipe>>,
    stream: SendStream,
    peers: Vec<Peer>,
    back: mpsc::Receiver<Message>,
    /// When the last record went out (a keepalive is due an interval later).
    pub last_record: Instant,
}

/// Offers a new stream to each of `peers`; returns the stream to those who
/// accepted (none if nobody did) and why each other one did not.
pub(super) async fn offer(
    ctx: &Ctx,
    peers: &[AgentName],
    rekey: Duration,
) -> (Result<Option<Live>, String>, Vec<(AgentName, AgentError)>) {
    let stream_id = StreamId::random();
    let count = u32::try_from(peers.len()).unwrap_or(u32::MAX);
    let mut shakes = tokio::task::JoinSet::new();
    for peer in peers {
        let terms = Terms {
            kind: Kind::Chat,
            size: CHAT_BOUND,
            size_known: false,
            resumes: None,
            receivers: count,
            punch: Vec::new(),
        };
        let (ctx, peer) = (ctx.clone(), peer.clone());
        shakes.spawn(async move {
            let shake: Result<Handshake, Failed> =
                offer_to(ctx, peer.clone(), stream_id, terms, None, false).await;
            (peer, shake)
        });
    }
    let (mut ready, mut away) = (Vec::new(), Vec::new());
    while let Some(Ok((peer, shake))) = shakes.join_next().await {
        match shake {
            Ok(h) => ready.push(h),
            Err(f) => away.push((peer, f.error)),
        }
    }
    if ready.is_empty() {
        return (Ok(None), away);
    }
    (
        Live::open(ctx, stream_id, ready, rekey).await.map(Some),
        away,
    )
}

impl Live {
    /// Opens the data connection of stream `stream_id` to `ready` and sends
    /// its head (a root for each, the empty manifest).
    async fn open(
        ctx: &Ctx,
        stream_id: StreamId,
        ready: Vec<Handshake>,
        rekey: Duration,
    ) -> Result<Self, String> {
        let tickets: Vec<_> = ready
            .iter()
            .map(|h| (h.accepted.pair.transfer_id, h.ticket.clone()))
            .collect();
        let data = open_upload(ctx, &tickets)
            .await
            .map_err(|e| e.to_string())?;
        let mut stream = SendStream::new(
            stream_id,
            CHAT_BOUND,
            false,
            StreamStart::fresh(),
            RekeyPolicy::with_interval(rekey),
            Instant::now(),
        );
        let mut head: Vec<_> = ready
            .iter()
            .map(|h| stream.root_for(&h.accepted.pair))
            .collect();
        let manifest = Manifest::default().encode();
        head.push(stream.manifest(&manifest).map_err(|e| e.to_string())?);
        let Connection {
            mut reader,
            mut writer,
        } = data;
        for f in &head {
            writer
                .write_frame(f.frame())
                .await
                .map_err(|e| e.to_string())?;
        }
        let (tx, back) = mpsc::channel(64);
        tokio::spawn(async move {
            while let Ok(Some(m)) = reader.read().await {
                if tx.send(m).await.is_err() {
                    break;
                }
            }
        });
        let peers = ready
            .into_iter()
            .map(|h| Peer {
                name: h.to,
                fp: h.fp,
                tid: h.accepted.pair.transfer_id,
                pair: h.accepted.pair,
            })
            .collect();
        Ok(Self {
            writer,
            stream,
            peers,
            back,
            last_record: Instant::now(),
        })
    }

    /// The stream's id (its lines' signatures name it).
    pub fn stream_id(&self) -> StreamId {
        self.stream.stream_id()
    }

    /// The peers it reaches.
    pub fn peers(&self) -> Vec<AgentName> {
        self.peers.iter().map(|p| p.name.clone()).collect()
    }

    /// Session keys it used so far.
    pub fn session_keys(&self) -> u64 {
        self.stream.session_keys()
    }

    /// Seals one record into a chunk of its own and writes it (and the key
    /// update before it, when the key is due).
    pub async fn send(&mut self, record: &Record) -> Result<(), String> {
        let sent = self
            .stream
            .push(record.encode(), false, Instant::now())
            .map_err(|e| e.to_string())?;
        if let Some(k) = &sent.key_update {
            self.writer
                .write_frame(k.frame())
                .await
                .map_err(|e| e.to_string())?;
        }
        let frame = sent.chunk.seal();
        self.writer
            .write_frame(frame.frame())
            .await
            .map_err(|e| e.to_string())?;
        self.last_record = Instant::now();
        Ok(())
    }

    /// The next message back on the data connection (`None`: it ended).
    pub async fn back(&mut self) -> Option<Message> {
        self.back.recv().await
    }

    /// Takes the peer of transfer `tid` out of the stream (it left).
    pub fn remove(&mut self, tid: TransferId) -> Option<AgentName> {
        let at = self.peers.iter().position(|p| p.tid == tid)?;
        Some(self.peers.remove(at).name)
    }

    /// Ends the stream: an empty last chunk, the trailer, and up to 3 s for
    /// the receipts. Returns the peers whose receipt confirmed it all, and
    /// those that did not.
    pub async fn finish(mut self, identity: &Identity) -> (Vec<AgentName>, Vec<AgentName>) {
        let receivers: Vec<(AgentName, Fingerprint)> =
            self.peers.iter().map(|p| (p.name.clone(), p.fp)).collect();
        let ended = async {
            let last = self
                .stream
                .push([], true, Instant::now())
                .map_err(|e| e.to_string())?;
            if let Some(k) = &last.key_update {
                self.writer
                    .write_frame(k.frame())
                    .await
                    .map_err(|e| e.to_string())?;
            }
            self.writer
                .write_frame(last.chunk.seal().frame())
                .await
                .map_err(|e| e.to_string())?;
            let (trailer, _) = self
                .stream
                .trailer(identity, &receivers)
                .map_err(|e| e.to_string())?;
            self.writer
                .write_frame(trailer.frame())
                .await
                .map_err(|e| e.to_string())?;
            Ok::<(), String>(())
        }
        .await;
        let mut waiting: Vec<Peer> = std::mem::take(&mut self.peers);
        let mut confirmed = Vec::new();
        if ended.is_ok() {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
            while !waiting.is_empty() {
                let Ok(Some(msg)) = tokio::time::timeout_at(deadline, self.back.recv()).await
                else {
                    break;
                };
                if let Message::Receipt { transfer_id, tag } = msg
                    && let Some(at) = waiting.iter().position(|p| p.tid == transfer_id)
                {
                    let peer = waiting.remove(at);
                    // A receipt that verifies confirms every line of the stream.
                    if self.stream.check_receipt(&peer.pair, &tag).is_ok() {
                        confirmed.push(peer.name);
                    } else {
                        waiting.push(peer);
                        break;
                    }
                }
            }
        }
        (confirmed, waiting.into_iter().map(|p| p.name).collect())
    }
}
