//! Relaying one transfer between the sender's connection and the receiver's data
//! connection. The broker never opens a record: it only checks that each frame
//! is a message allowed in that direction for that transfer.
//!
//! Forward (sender → receiver): key updates, chunks, the trailer, an abort.
//! Back (receiver → sender): the receipt, an abort. Anything else, EOF, an error
//! or a silence longer than the idle limit ends that direction and tells the
//! other side `Abort(PeerGone)`, which ends the other direction in turn.
//! Backpressure is end to end: a frame is read from one side only after the
//! previous one was written to the other.

use std::time::{Duration, Instant};

use keyferry_common::connection::{Connection, FrameReader, FrameWriter};
use keyferry_common::frame;
use keyferry_common::ids::TransferId;
use keyferry_common::message::{AbortReason, Message};
use tokio::io::{AsyncRead, AsyncWrite};

/// How a relay ended.
#[derive(Debug)]
pub struct RelayReport {
    /// Payload bytes relayed forward.
    pub bytes: u64,
    /// How long the relay ran.
    pub elapsed: Duration,
    /// `Ok` if the trailer went forward and the receipt went back.
    pub result: Result<(), String>,
}

#[derive(Debug, Clone, Copy)]
enum Dir {
    Forward,
    Back,
}

impl Dir {
    fn source(self) -> &'static str {
        match self {
            Self::Forward => "sender",
            Self::Back => "receiver",
        }
    }

    /// `Some(ends)` if `msg` may travel this way for `tid`; `ends` if it is the
    /// last message of this direction.
    fn allows(self, msg: &Message, tid: &TransferId) -> Option<bool> {
        let (id, ends) = match (self, msg) {
            (Self::Forward, Message::KeyUpdate { transfer_id, .. })
            | (Self::Forward, Message::Chunk { transfer_id, .. }) => (transfer_id, false),
            (Self::Forward, Message::Trailer { transfer_id, .. })
            | (Self::Back, Message::Receipt { transfer_id, .. })
            | (_, Message::Abort { transfer_id, .. }) => (transfer_id, true),
            _ => return None,
        };
        (id == tid).then_some(ends)
    }
}

async fn pump<R, W>(
    dir: Dir,
    tid: TransferId,
    idle: Duration,
    from: &mut FrameReader<R>,
    to: &mut FrameWriter<W>,
) -> (u64, Result<(), String>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut bytes = 0u64;
    let result = loop {
        let payload = match tokio::time::timeout(idle, from.read_payload()).await {
            Ok(Ok(Some(p))) => p,
            Ok(Ok(None)) => break Err(format!("{} disconnected", dir.source())),
            Ok(Err(e)) => break Err(format!("{}: {e}", dir.source())),
            Err(_) => break Err(format!("{} silent for {}s", dir.source(), idle.as_secs())),
        };
        let Some(ends) = frame::decode_payload(&payload)
            .ok()
            .and_then(|m| dir.allows(&m, &tid))
        else {
            break Err(format!("{} sent a message not allowed here", dir.source()));
        };
        match tokio::time::timeout(idle, to.write_payload(&payload)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return (bytes, Err(format!("forwarding from {}: {e}", dir.source()))),
            Err(_) => {
                return (
                    bytes,
                    Err(format!("peer of {} stopped reading", dir.source())),
                );
            }
        }
        bytes += payload.len() as u64;
        if ends {
            return (bytes, Ok(()));
        }
    };
    let gone = Message::Abort {
        transfer_id: tid,
        reason: AbortReason::PeerGone,
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), to.write(&gone)).await;
    let _ = to.shutdown().await;
    (bytes, result)
}

/// Reads and discards what a peer still sends, until it closes or `grace`
/// passes: closing a socket with unread data makes the kernel send a reset,
/// which can destroy the `Abort` just written to that peer before it reads it.
async fn drain<R: AsyncRead + Unpin>(from: &mut FrameReader<R>, grace: Duration) {
    let _ = tokio::time::timeout(grace, async {
        while let Ok(Some(_)) = from.read_payload().await {}
    })
    .await;
}

/// How long a failed relay keeps reading, so its `Abort` reaches both sides.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Relays transfer `tid` until both directions ended.
pub async fn relay<S, D>(
    sender: Connection<S>,
    receiver: Connection<D>,
    tid: TransferId,
    idle: Duration,
) -> RelayReport
where
    S: AsyncRead + AsyncWrite,
    D: AsyncRead + AsyncWrite,
{
    let start = Instant::now();
    let (mut s_read, mut s_write) = (sender.reader, sender.writer);
    let (mut r_read, mut r_write) = (receiver.reader, receiver.writer);
    let (forward, back) = tokio::join!(
        pump(Dir::Forward, tid, idle, &mut s_read, &mut r_write),
        pump(Dir::Back, tid, idle, &mut r_read, &mut s_write),
    );
    if forward.1.is_err() || back.1.is_err() {
        // The failing direction told the other side; let both read that
        // before the sockets close.
        tokio::join!(
            drain(&mut s_read, DRAIN_GRACE),
            drain(&mut r_read, DRAIN_GRACE)
        );
    }
    RelayReport {
        bytes: forward.0,
        elapsed: start.elapsed(),
        result: forward.1.and(back.1),
    }
}
