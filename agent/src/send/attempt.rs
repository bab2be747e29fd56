//! One attempt at a transfer: connect, look up the peer and check its pin,
//! offer (saying which earlier transfer this one continues, if any), check
//! the accept, decide where the data starts (the receiver's claimed prefix
//! is checked against our own bytes; any mismatch starts from byte 0), stream
//! ([`super::pipeline`]), and check the receipt. Every attempt is a new
//! transfer: new transfer and stream ids, new master key, new ephemeral
//! shares, a new stream root.

use std::sync::Arc;
use std::time::Instant;

use keyferry_common::handshake::{Kind, OfferParams, Terms, make_offer};
use keyferry_common::ids::{StreamId, TransferId};
use keyferry_common::io::connection::ConnError;
use keyferry_common::transfer::{RekeyPolicy, SendStream, StreamStart};
use keyferry_common::wire::message::{AbortReason, ErrorCode, Message, Role};
use keyferry_common::wire::record::manifest_hash;
use sha2::Digest as _;

use super::source::{Reader, Source};
use super::{ANSWER_TIMEOUT, RECEIPT_TIMEOUT, SendOptions, peer_key, pipeline};
use crate::client::{Ctx, await_ticket, broker_error, conn_error, connect, open_data};
use crate::error::AgentError;
use crate::home::now_unix;
use crate::progress::Progress;

/// A verified attempt.
#[derive(Debug)]
pub struct Done {
    /// Its transfer id.
    pub transfer_id: TransferId,
    /// SHA-256 of the whole data, confirmed by the receipt.
    pub sha256: [u8; 32],
    /// Session keys the stream used.
    pub session_keys: u64,
    /// Bytes the receiver already held verified.
    pub resumed_from: u64,
    /// Seconds from the accept to the verified receipt.
    pub seconds: f64,
}

/// A failed attempt, and whether the receiver had accepted it (only then is
/// there something to resume).
#[derive(Debug)]
pub struct Failed {
    /// Why.
    pub error: AgentError,
    /// Whether the receiver accepted.
    pub accepted: bool,
}

fn before(error: AgentError) -> Failed {
    Failed {
        error,
        accepted: false,
    }
}

fn after(error: AgentError) -> Failed {
    Failed {
        error,
        accepted: true,
    }
}

/// Runs one attempt. `origin` names the transfer this attempt may continue
/// (PROTOCOL.md §6.4; none for a message).
pub async fn run(
    ctx: &Ctx,
    opts: &SendOptions,
    source: &Arc<Source>,
    origin: Option<StreamId>,
    progress: &Progress,
) -> Result<Done, Failed> {
    let mut conn = connect(ctx, Role::Sender).await.map_err(before)?;
    let receiver_key = peer_key(ctx, &mut conn, opts).await.map_err(before)?;
    let receiver_fp = receiver_key.fingerprint();
    // Random for every attempt: the broker sees stream ids, and must not be
    // able to link two attempts (or two runs) of one transfer.
    let stream_id = StreamId::random();
    let terms = Terms {
        kind: if opts.is_message() {
            Kind::Message
        } else {
            Kind::Files
        },
        size: source.total,
        size_known: true,
        resumes: origin,
        receivers: 1,
    };
    let identity = Arc::clone(&ctx.identity);
    let (sender, receiver) = (ctx.name.clone(), opts.to.clone());
    let (pending, offer) = tokio::task::spawn_blocking(move || {
        make_offer(OfferParams {
            identity: &identity,
            sender,
            receiver,
            receiver_key: &receiver_key,
            stream_id,
            terms,
            now_unix: now_unix(),
        })
    })
    .await
    .map_err(|e| before(e.into()))?
    .map_err(|e| before(AgentError::Offer(e)))?;
    let tid = pending.transfer_id();
    conn.writer
        .write(&Message::Offer {
            to: opts.to.clone(),
            offer,
        })
        .await
        .map_err(|e| before(conn_error(ctx, e)))?;

    let answer = conn.reader.read_timeout(ANSWER_TIMEOUT).await;
    let accept = match answer {
        Ok(Some(Message::Accept {
            transfer_id,
            accept,
        })) if transfer_id == tid => accept,
        Ok(Some(Message::Refuse {
            transfer_id,
            reason,
        })) if transfer_id == tid => {
            return Err(before(AgentError::Refused {
                peer: opts.to.to_string(),
                reason,
            }));
        }
        Ok(Some(Message::Error {
            code: ErrorCode::PeerOffline,
            ..
        })) => return Err(before(AgentError::PeerOffline(opts.to.to_string()))),
        Ok(Some(Message::Error { code, detail })) => {
            return Err(before(broker_error(code, detail)));
        }
        Ok(Some(_)) => {
            return Err(before(AgentError::Protocol(
                "unexpected answer to the offer",
            )));
        }
        Ok(None) => return Err(before(conn_error(ctx, ConnError::Truncated))),
        Err(e) => return Err(before(conn_error(ctx, e))),
    };
    let accepted = pending.handle_accept(&accept).map_err(|e| {
        before(AgentError::Verification(format!(
            "the receiver's accept did not verify ({e})"
        )))
    })?;
    // The stream goes over a plain connection: it is sealed end to end.
    let ticket = await_ticket(ctx, &mut conn, tid).await.map_err(after)?;
    drop(conn);
    let mut data = open_data(ctx, tid, ticket).await.map_err(after)?;

    // Where the data starts: the receiver's prefix, if it is ours.
    let body = source.manifest.encode();
    let mut start = StreamStart::fresh();
    let offset = accepted.resume_offset;
    if offset > 0 && offset <= source.total {
        let s = Arc::clone(source);
        let prefix = tokio::task::spawn_blocking(move || Reader::prefix_hash(s, offset))
            .await
            .map_err(|e| after(e.into()))?
            .map_err(after)?;
        let hash: [u8; 32] = prefix.clone().finalize().into();
        if accepted.resume_matches(&hash, &manifest_hash(&body)) {
            start = StreamStart {
                offset,
                hasher: prefix,
            };
        } else {
            eprintln!(
                "the receiver holds {offset} bytes that are not these; starting again from byte 0"
            );
        }
    } else if offset > 0 {
        eprintln!("the receiver claims more than there is; starting again from byte 0");
    }
    let resumed_from = start.offset;

    let began = Instant::now();
    let policy = RekeyPolicy::with_interval(opts.rekey_interval);
    let mut stream = SendStream::new(stream_id, source.total, true, start, policy, began);
    let head = [
        stream.root_for(&accepted.pair),
        stream.manifest(&body).map_err(|e| after(e.into()))?,
    ];
    progress.start_at(resumed_from);
    let receivers = vec![(opts.to.clone(), receiver_fp)];
    let reader = Reader::at(Arc::clone(source), resumed_from);
    let result =
        pipeline::stream_out(ctx, &mut data, reader, stream, &head, receivers, progress).await;
    let (stream, sha256) = match result {
        Ok(done) => done,
        Err(e) => {
            let reason = match &e {
                AgentError::FileUnreadable { .. } => AbortReason::Source,
                AgentError::Interrupted => AbortReason::Interrupted,
                _ => AbortReason::VerificationFailed,
            };
            let _ = data
                .writer
                .write(&Message::Abort {
                    transfer_id: tid,
                    reason,
                })
                .await;
            return Err(after(e));
        }
    };

    let receipt = data.reader.read_timeout(RECEIPT_TIMEOUT).await;
    match receipt {
        Ok(Some(Message::Receipt { transfer_id, tag })) if transfer_id == tid => {
            stream.check_receipt(&accepted.pair, &tag).map_err(|_| {
                after(AgentError::Verification(
                    "the receipt does not confirm the length and SHA-256 we sent".into(),
                ))
            })?;
        }
        Ok(Some(Message::Abort { reason, .. })) => {
            return Err(after(AgentError::ReceiverAborted(reason)));
        }
        Ok(_) => {
            return Err(after(AgentError::Verification(
                "the receiver sent no receipt".into(),
            )));
        }
        Err(e) => return Err(after(conn_error(ctx, e))),
    }
    Ok(Done {
        transfer_id: tid,
        sha256,
        session_keys: stream.session_keys(),
        resumed_from,
        seconds: began.elapsed().as_secs_f64(),
    })
}
