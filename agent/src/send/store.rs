//! `--store`: a transfer left at the broker for a receiver who is offline
//! (PROTOCOL.md §2.8, §3.4). One of the receiver's prekey bundles, checked
//! against its pinned key, stands in for its accept; the stream is sealed
//! exactly as for a live transfer and uploaded to the broker, which keeps it
//! until the receiver connects. The broker's `Stored` ends it: nothing is
//! delivered yet (exit 12), and the sender records what it sent, so that
//! `agent --receipts` can check the receiver's signed receipt later.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keyferry_common::handshake::Terms;
use keyferry_common::handshake::prekey::{BundleKind, verify_bundle};
use keyferry_common::handshake::stored::{StoredParams, make_stored_offer};
use keyferry_common::ids::StreamId;
use keyferry_common::io::connection::ConnError;
use keyferry_common::name::AgentName;
use keyferry_common::transfer::{RekeyPolicy, SendStream, StreamStart};
use keyferry_common::wire::message::{ErrorCode, Message, Role};
use serde::Serialize;

use super::reader::Reader;
use super::source::Source;
use super::{RECEIPT_TIMEOUT, SendOptions, pin_peer, pipeline};
use crate::client::{Ctx, await_ticket, broker_error, conn_error, connect_then, open_data};
use crate::error::AgentError;
use crate::home::now_unix;
use crate::mailbox::outbox::{Outbox, Sent};
use crate::output::notice;
use crate::progress::Progress;

/// A transfer the broker stored, as `--json` prints it (`"event":"stored"`).
#[derive(Debug, Clone, Serialize)]
pub struct StoredReport {
    /// Transfer id (hex): what `--receipts` and `--withdraw` name.
    pub transfer_id: String,
    /// The receiver.
    pub peer: String,
    /// The (first) top-level item's name (empty for a message).
    pub file: String,
    /// Files sent.
    pub files: usize,
    /// Bytes of plaintext.
    pub bytes: u64,
    /// SHA-256 of the plaintext (hex).
    pub sha256: String,
    /// When the broker deletes it undelivered (Unix seconds).
    pub expires: u64,
    /// Sealed to the receiver's last-resort prekey (weaker forward secrecy).
    pub last_resort: bool,
}

/// The most bytes an upload of `total` plaintext bytes and a manifest of
/// `manifest` bytes sends as frames (what `Store.size` announces): the data,
/// the manifest, and room for every record's header and tag.
pub fn upload_bound(total: u64, manifest: usize) -> u64 {
    total
        .saturating_add(manifest as u64)
        .saturating_add(64 << 10)
}

/// Stores the upload of `source` for `to` at the broker.
pub async fn store(
    ctx: &Ctx,
    opts: &SendOptions,
    source: &Arc<Source>,
    to: &AgentName,
    progress: &Progress,
) -> Result<StoredReport, AgentError> {
    let fetch = Message::FetchPrekey { name: to.clone() };
    let mut conn = connect_then(ctx, Role::Sender, Some(&fetch)).await?;
    let reply = conn
        .reader
        .read_timeout(Duration::from_secs(30))
        .await
        .map_err(|e| conn_error(ctx, e))?;
    let (spki, bundle) = match reply {
        Some(Message::Prekey { name, spki, bundle }) if &name == to => (spki, bundle),
        Some(Message::Error {
            code: ErrorCode::UnknownPeer,
            ..
        }) => return Err(AgentError::UnknownPeer(to.to_string())),
        Some(Message::Error { code, detail }) => return Err(broker_error(code, detail)),
        _ => {
            return Err(AgentError::Protocol(
                "the broker did not answer the prekey fetch",
            ));
        }
    };
    let key = pin_peer(ctx, to, &spki, opts.peer_fingerprint)?;
    let bundle = verify_bundle(&bundle, &key, to, now_unix()).map_err(|e| {
        AgentError::Verification(format!(
            "the prekey the broker gave for {to} does not verify ({e}); nothing was sent"
        ))
    })?;
    let last_resort = bundle.kind == BundleKind::LastResort;
    if last_resort {
        notice!(
            "{to} has no one-time prekey left at the broker: this transfer is sealed to its \
             last-resort prekey, whose forward secrecy is weaker until {to} rotates it"
        );
    }
    let terms = Terms {
        kind: opts.kind(),
        size: source.total,
        size_known: source.size_known,
        resumes: None,
        receivers: 1,
        punch: Vec::new(),
    };
    let stream_id = StreamId::random();
    let (identity, sender, fp) = (
        Arc::clone(&ctx.identity),
        ctx.name.clone(),
        key.fingerprint(),
    );
    let (offer, pair) = tokio::task::spawn_blocking(move || {
        make_stored_offer(StoredParams {
            identity: &identity,
            sender,
            receiver_key: &key,
            bundle: &bundle,
            stream_id,
            terms,
            now_unix: now_unix(),
        })
    })
    .await?
    .map_err(AgentError::Offer)?;
    let tid = pair.transfer_id;
    let manifest = source.manifest.encode();
    let size = upload_bound(source.total, manifest.len());
    let store = Message::Store {
        to: to.clone(),
        offer,
        size,
    };
    conn.writer
        .write(&store)
        .await
        .map_err(|e| conn_error(ctx, e))?;
    let ticket = await_ticket(ctx, &mut conn, tid).await?;
    let mut data = open_data(ctx, tid, ticket).await?;
    let began = Instant::now();
    let policy = RekeyPolicy::with_interval(opts.rekey_interval);
    let mut stream = SendStream::new(
        stream_id,
        source.total,
        source.size_known,
        StreamStart::fresh(),
        policy,
        began,
    );
    let root = stream.root_for(&pair);
    let manifest = stream
        .manifest(&manifest)
        .map_err(|e| AgentError::Internal(e.to_string()))?;
    progress.start_at(0);
    let upload = pipeline::Upload {
        head: &[root, manifest],
        receivers: vec![(to.clone(), fp)],
        tids: &[tid],
        asks: vec![0],
        marks: None,
        check: None,
    };
    let reader = Reader::at(Arc::clone(source), 0);
    let (stream, sha256, _) =
        pipeline::stream_out(ctx, &mut data, reader, stream, upload, progress).await?;
    // Recorded before the broker's word, which may be lost on the way:
    // whatever it says later can then be checked.
    let mut record = Sent {
        id: tid.to_string(),
        to: to.to_string(),
        fingerprint: fp.to_string(),
        sha256: hex::encode(sha256),
        bytes: stream.total(),
        stored: now_unix(),
        expires: 0,
        last_resort,
    };
    let outbox = Outbox::open(ctx.home.dir());
    let recorded = match &outbox {
        Ok(o) => o.record(&record).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = recorded {
        notice!(
            "cannot record the stored transfer in the home ({e}): --receipts cannot check its receipt's SHA-256"
        );
    }
    // The broker says so once all of it is on its disk.
    let expires = match data.reader.read_timeout(RECEIPT_TIMEOUT).await {
        Ok(Some(Message::Stored {
            transfer_id,
            expires,
        })) if transfer_id == tid => expires,
        Ok(Some(Message::Error { code, detail })) => return Err(broker_error(code, detail)),
        Ok(Some(_)) => return Err(AgentError::Protocol("unexpected answer to a stored upload")),
        Ok(None) => return Err(conn_error(ctx, ConnError::Truncated)),
        Err(e) => return Err(conn_error(ctx, e)),
    };
    progress.done(1, 1);
    let report = StoredReport {
        transfer_id: tid.to_string(),
        peer: to.to_string(),
        file: source
            .manifest
            .top_level()
            .first()
            .map(|n| (*n).to_owned())
            .unwrap_or_default(),
        files: source.file_count(),
        bytes: stream.total(),
        sha256: hex::encode(sha256),
        expires,
        last_resort,
    };
    record.expires = expires;
    if let Ok(o) = &outbox {
        let _ = o.record(&record);
    }
    Ok(report)
}
