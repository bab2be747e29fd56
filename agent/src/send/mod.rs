//! The sender role: look up the peer, check its pin, offer, stream
//! ([`pipeline`]), and report success only after the receiver's receipt
//! verified.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod pipeline;

use keyferry_common::handshake::{Kind, Metadata, OfferParams, make_offer};
use keyferry_common::identity::{Fingerprint, PublicKey};
use keyferry_common::io::connection::ConnError;
use keyferry_common::name::AgentName;
use keyferry_common::transfer::{RekeyPolicy, SendStream};
use keyferry_common::wire::chunk::ChunkFrame;
use keyferry_common::wire::message::{AbortReason, ErrorCode, Message, Role};
use serde::Serialize;

use crate::client::{AgentConn, Ctx, await_ticket, broker_error, conn_error, connect, open_data};
use crate::error::AgentError;
use crate::home::now_unix;
use crate::progress::Progress;
use crate::trust::pins::{PinCheck, PinError};

/// Longest text message.
pub use keyferry_common::handshake::MAX_MESSAGE_LEN as MAX_MESSAGE;
/// How long to wait for the receiver to accept or refuse.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(75);
/// How long to wait for the receipt after the trailer (the receiver fsyncs).
pub const RECEIPT_TIMEOUT: Duration = Duration::from_secs(120);

/// What to send.
#[derive(Debug, Clone)]
pub enum Payload {
    /// A file.
    File(PathBuf),
    /// A short text.
    Message(String),
}

/// The sender's options.
#[derive(Debug, Clone)]
pub struct SendOptions {
    /// Receiver's name.
    pub to: AgentName,
    /// What to send.
    pub payload: Payload,
    /// Session key lifetime.
    pub rekey_interval: Duration,
    /// A key the receiver must have (`--peer-fingerprint`).
    pub peer_fingerprint: Option<Fingerprint>,
    /// Draw a progress bar.
    pub progress: bool,
}

/// One finished transfer, as `--json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Transfer id (hex).
    pub transfer_id: String,
    /// Receiver's name.
    pub peer: String,
    /// File name sent (empty for a message).
    pub file: String,
    /// Bytes of plaintext.
    pub bytes: u64,
    /// SHA-256 of the plaintext (hex), confirmed by the receipt.
    pub sha256: String,
    /// Seconds from the accept to the verified receipt.
    pub seconds: f64,
    /// Session keys used (1 + key updates).
    pub session_keys: u64,
}

/// Where the plaintext comes from.
enum Source {
    File(File, PathBuf),
    Bytes(Vec<u8>, usize),
}

impl Source {
    /// Reads the frame's plaintext; running out early means the file shrank.
    fn fill(&mut self, frame: &mut ChunkFrame) -> std::io::Result<()> {
        match self {
            Self::File(f, _) => frame.fill_from(f),
            Self::Bytes(b, pos) => {
                let out = frame.plaintext_mut();
                let end = *pos + out.len();
                let src = b.get(*pos..end).ok_or(std::io::ErrorKind::UnexpectedEof)?;
                out.copy_from_slice(src);
                *pos = end;
                Ok(())
            }
        }
    }
}

fn open_payload(p: &Payload) -> Result<(Source, Metadata), AgentError> {
    match p {
        Payload::Message(text) => {
            if text.len() > MAX_MESSAGE {
                return Err(AgentError::MessageTooLong {
                    len: text.len(),
                    max: MAX_MESSAGE,
                });
            }
            Ok((
                Source::Bytes(text.as_bytes().to_vec(), 0),
                Metadata {
                    kind: Kind::Message,
                    name: String::new(),
                    size: text.len() as u64,
                },
            ))
        }
        Payload::File(path) => {
            let unreadable = |detail: String| AgentError::FileUnreadable {
                path: path.clone(),
                detail,
            };
            let file = File::open(path).map_err(|e| unreadable(e.to_string()))?;
            let meta = file.metadata().map_err(|e| unreadable(e.to_string()))?;
            if !meta.is_file() {
                return Err(unreadable("not a regular file".into()));
            }
            let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
                unreadable("the file name is not valid UTF-8; rename the file".into())
            })?;
            crate::receive::filename::check(name)
                .map_err(|e| unreadable(format!("{e}; rename the file")))?;
            Ok((
                Source::File(file, path.clone()),
                Metadata {
                    kind: Kind::File,
                    name: name.to_owned(),
                    size: meta.len(),
                },
            ))
        }
    }
}

async fn peer_key(
    ctx: &Ctx,
    conn: &mut AgentConn,
    opts: &SendOptions,
) -> Result<PublicKey, AgentError> {
    let to = &opts.to;
    conn.writer
        .write(&Message::Lookup { name: to.clone() })
        .await
        .map_err(|e| conn_error(ctx, e))?;
    let reply = conn
        .reader
        .read_timeout(Duration::from_secs(30))
        .await
        .map_err(|e| conn_error(ctx, e))?;
    let spki = match reply {
        Some(Message::PeerKey { name, spki }) if &name == to => spki,
        Some(Message::Error {
            code: ErrorCode::UnknownPeer,
            ..
        }) => return Err(AgentError::UnknownPeer(to.to_string())),
        Some(Message::Error {
            code: ErrorCode::PeerOffline,
            ..
        }) => return Err(AgentError::PeerOffline(to.to_string())),
        Some(Message::Error { code, detail }) => return Err(broker_error(code, detail)),
        _ => return Err(AgentError::Protocol("the broker did not answer the lookup")),
    };
    let key = PublicKey::from_spki_der(&spki).map_err(|e| {
        AgentError::Verification(format!("the key the broker gave for {to} is refused: {e}"))
    })?;
    let pins = ctx.home.known_peers();
    let check = match opts.peer_fingerprint {
        Some(fp) => pins.require(to.as_str(), fp, key.fingerprint(), now_unix()),
        None => pins.check_or_pin(to.as_str(), key.fingerprint(), now_unix()),
    };
    match check {
        Ok(PinCheck::NewlyPinned(_)) if opts.peer_fingerprint.is_none() => {
            eprintln!(
                "NEW KEY for {to} {} — first contact, verify out of band",
                key.fingerprint()
            );
        }
        Ok(_) => {}
        Err(e @ PinError::Mismatch { .. }) => return Err(AgentError::PeerKeyMismatch(e)),
        Err(e) => return Err(AgentError::Pins(e)),
    }
    Ok(key)
}

/// Sends one file or message; returns the verified report.
pub async fn send(ctx: &Ctx, opts: SendOptions) -> Result<Report, AgentError> {
    let (source, metadata) = open_payload(&opts.payload)?;
    let mut conn = connect(ctx, Role::Sender).await?;
    let receiver_key = peer_key(ctx, &mut conn, &opts).await?;

    let identity = Arc::clone(&ctx.identity);
    let (sender, receiver) = (ctx.name.clone(), opts.to.clone());
    let meta = metadata.clone();
    let (pending, offer) = tokio::task::spawn_blocking(move || {
        make_offer(OfferParams {
            identity: &identity,
            sender,
            receiver,
            receiver_key: &receiver_key,
            metadata: meta,
            now_unix: now_unix(),
        })
    })
    .await?
    .map_err(AgentError::Offer)?;
    let tid = pending.transfer_id();
    conn.writer
        .write(&Message::Offer {
            to: opts.to.clone(),
            offer,
        })
        .await
        .map_err(|e| conn_error(ctx, e))?;

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
            return Err(AgentError::Refused {
                peer: opts.to.to_string(),
                reason,
            });
        }
        Ok(Some(Message::Error {
            code: ErrorCode::PeerOffline,
            ..
        })) => return Err(AgentError::PeerOffline(opts.to.to_string())),
        Ok(Some(Message::Error { code, detail })) => return Err(broker_error(code, detail)),
        Ok(Some(_)) => return Err(AgentError::Protocol("unexpected answer to the offer")),
        Ok(None) => return Err(conn_error(ctx, ConnError::Truncated)),
        Err(e) => return Err(conn_error(ctx, e)),
    };
    let keys = pending.handle_accept(&accept).map_err(|e| {
        AgentError::Verification(format!("the receiver's accept did not verify ({e})"))
    })?;
    // The stream goes over a plain connection: it is sealed end to end.
    let ticket = await_ticket(ctx, &mut conn, tid).await?;
    drop(conn);
    let mut conn = open_data(ctx, tid, ticket).await?;

    let start = Instant::now();
    let stream = SendStream::new(
        keys,
        metadata.size,
        RekeyPolicy::with_interval(opts.rekey_interval),
        start,
    );
    let progress = Progress::new(metadata.size, opts.progress);
    let result =
        pipeline::stream_out(ctx, &mut conn, source, stream, metadata.size, &progress).await;
    progress.finish();
    let (stream, digest) = match result {
        Ok(done) => done,
        Err(e) => {
            let reason = match &e {
                AgentError::FileUnreadable { .. } => AbortReason::Source,
                AgentError::Interrupted => AbortReason::Interrupted,
                _ => AbortReason::VerificationFailed,
            };
            let _ = conn
                .writer
                .write(&Message::Abort {
                    transfer_id: tid,
                    reason,
                })
                .await;
            return Err(e);
        }
    };

    let receipt = conn.reader.read_timeout(RECEIPT_TIMEOUT).await;
    match receipt {
        Ok(Some(Message::Receipt { transfer_id, tag })) if transfer_id == tid => {
            stream.check_receipt(&tag).map_err(|_| {
                AgentError::Verification(
                    "the receipt does not confirm the length and SHA-256 we sent".into(),
                )
            })?;
        }
        Ok(Some(Message::Abort { reason, .. })) => {
            return Err(AgentError::ReceiverAborted(reason));
        }
        Ok(_) => {
            return Err(AgentError::Verification(
                "the receiver sent no receipt".into(),
            ));
        }
        Err(e) => return Err(conn_error(ctx, e)),
    }
    Ok(Report {
        transfer_id: tid.to_string(),
        peer: opts.to.to_string(),
        file: metadata.name,
        bytes: metadata.size,
        sha256: hex::encode(digest),
        seconds: start.elapsed().as_secs_f64(),
        session_keys: stream.session_keys(),
    })
}
