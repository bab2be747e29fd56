//! The sender role: walk what is sent into a manifest ([`source`]), make
//! attempts ([`attempt`]: offer, stream through [`pipeline`], receipt) until
//! one is confirmed by the receiver's receipt, and, when a transfer breaks
//! after the receiver accepted it, try again (waiting for the receiver to
//! come back, up to `--retry-for`), resuming from what the receiver holds
//! verified.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

pub(crate) mod attempt;
mod marks;
mod offer;
mod path;
mod pipeline;
pub mod reader;
mod resume;
pub mod source;
pub mod store;

use keyferry_common::identity::{Fingerprint, PublicKey};
use keyferry_common::name::AgentName;
use keyferry_common::text::escape;
use keyferry_common::wire::message::{AbortReason, ErrorCode, Message, RefuseReason};
use serde::Serialize;

use crate::client::{AgentConn, Ctx, broker_error, conn_error};
use crate::error::AgentError;
use crate::home::now_unix;
use crate::progress::Progress;
use crate::trust::pins::{PinCheck, PinError};
use source::{Source, Walk};

/// Longest text message.
pub use keyferry_common::handshake::MAX_MESSAGE_LEN as MAX_MESSAGE;
/// How long to wait for the receiver to accept or refuse.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(75);
/// How long to wait for the receipt after the trailer (the receiver fsyncs).
pub const RECEIPT_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(15);
/// Longest wait a receiver's "try later" can ask for (the budgets it
/// guards count over 60 s).
const MAX_ASKED_WAIT: Duration = Duration::from_secs(65);

/// What to send.
#[derive(Debug, Clone)]
pub enum Payload {
    /// Files and directories.
    Files(Vec<PathBuf>),
    /// A short text.
    Message(String),
    /// Standard input, arriving as one file `name` of at most `bound`
    /// bytes (its size is not known up front).
    Stdin {
        /// The name it arrives under.
        name: String,
        /// The most it may carry; the offer declares it as the bound.
        bound: u64,
    },
}

/// The sender's options.
#[derive(Debug, Clone)]
pub struct SendOptions {
    /// The receivers' names (one upload to all of them).
    pub to: Vec<AgentName>,
    /// What to send.
    pub payload: Payload,
    /// How directories are walked.
    pub walk: Walk,
    /// Session key lifetime.
    pub rekey_interval: Duration,
    /// A key the receiver must have (`--peer-fingerprint`; one receiver only).
    pub peer_fingerprint: Option<Fingerprint>,
    /// How long to keep retrying a transfer that broke after it was accepted.
    pub retry_for: Duration,
    /// Draw a progress bar.
    pub progress: bool,
    /// Which paths the stream may take.
    pub direct: crate::direct::DirectOpt,
    /// How many connections a stream to one receiver takes, directly or to
    /// the relay (`--streams`); `None`: chosen from the round trip.
    pub streams: Option<u8>,
    /// Set once a direct path broke: the retries take the relay.
    pub direct_failed: Arc<AtomicBool>,
    /// Set once a stream over several connections to the relay broke: the
    /// retries take one.
    pub lanes_failed: Arc<AtomicBool>,
    /// A receiver that is offline gets the transfer stored at the broker
    /// (one receiver only).
    pub store: bool,
}

impl SendOptions {
    /// An upload of `payload` to `to` with what a caller other than the
    /// command line wants by default: keys rotated every 5 s, no pinned
    /// fingerprint, no retries, no progress bar, either path
    /// (`--direct auto`), connections chosen from the round trip, nothing
    /// stored for an offline receiver. Change a field with struct update
    /// syntax (`SendOptions { store: true, ..SendOptions::new(to, payload) }`).
    pub fn new(to: Vec<AgentName>, payload: Payload) -> Self {
        Self {
            to,
            payload,
            walk: Walk::default(),
            rekey_interval: Duration::from_secs(5),
            peer_fingerprint: None,
            retry_for: Duration::ZERO,
            progress: false,
            direct: crate::direct::DirectOpt::Auto,
            streams: None,
            direct_failed: Arc::default(),
            lanes_failed: Arc::default(),
            store: false,
        }
    }

    fn is_message(&self) -> bool {
        matches!(self.payload, Payload::Message(_))
    }

    /// What the terms say is sent: a message or files.
    fn kind(&self) -> keyferry_common::handshake::Kind {
        use keyferry_common::handshake::Kind;
        if self.is_message() {
            Kind::Message
        } else {
            Kind::Files
        }
    }
}

/// One finished transfer, as `--json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Transfer id of the attempt that completed (hex).
    pub transfer_id: String,
    /// Receiver's name.
    pub peer: String,
    /// The name the first item sent arrives under (empty for a message).
    pub file: String,
    /// How many files (not directories) were sent.
    pub files: usize,
    /// Bytes of plaintext.
    pub bytes: u64,
    /// SHA-256 of the plaintext (hex), confirmed by the receipt.
    pub sha256: String,
    /// Seconds from the last attempt's accept to its verified receipt.
    pub seconds: f64,
    /// Session keys the last attempt used (1 + key updates).
    pub session_keys: u64,
    /// Plaintext bytes the receiver already held verified when the last
    /// attempt began (0 if nothing was resumed).
    pub resumed_from: u64,
    /// Attempts made (1 if nothing had to be retried).
    pub attempts: u32,
    /// Which path carried the last attempt's stream: `direct` (between the
    /// agents) or `relay` (through the broker).
    pub via: crate::direct::Path,
    /// How many TCP connections carried it from the sender (more than one
    /// only over a long round trip, or with `--streams`).
    pub connections: u8,
}

fn collect(opts: &SendOptions) -> Result<Source, AgentError> {
    match &opts.payload {
        Payload::Message(text) => {
            if text.len() > MAX_MESSAGE {
                return Err(AgentError::MessageTooLong {
                    len: text.len(),
                    max: MAX_MESSAGE,
                });
            }
            Ok(Source::text(text.clone()))
        }
        Payload::Files(paths) => Source::files(paths, &opts.walk),
        Payload::Stdin { name, bound } => Source::stdin(name, *bound),
    }
}

/// Whether a transfer that failed this way after it was accepted may be
/// tried again: the broker, the receiver or a connection went away, or the
/// receiver is busy. Nothing that did not verify is ever retried.
fn transient(e: &AgentError) -> bool {
    temporary_refusal(e).is_some()
        || matches!(
            e,
            AgentError::BrokerUnreachable { .. }
                | AgentError::PeerOffline(_)
                | AgentError::PeerUnavailable { .. }
                | AgentError::LookupFailed { .. }
                | AgentError::SessionEnded(_)
                | AgentError::PrefixChanged(_)
                | AgentError::DirectLost(_)
                | AgentError::ReceiverAborted(
                    AbortReason::PeerGone
                        | AbortReason::Timeout
                        | AbortReason::Interrupted
                        | AbortReason::PrefixDamaged
                )
        )
}

/// If the receiver refused only for now (it is busy, or its RSA budget for
/// us is spent), how long it asked us to wait (zero: as long as we like).
/// Such a refusal is waited out within `--retry-for` even before anything
/// was accepted: the offer is simply made again.
fn temporary_refusal(e: &AgentError) -> Option<Duration> {
    match e {
        AgentError::Refused {
            reason: RefuseReason::Busy,
            ..
        } => Some(Duration::ZERO),
        AgentError::Refused {
            reason: RefuseReason::TryLater { seconds },
            ..
        } => Some(Duration::from_secs(u64::from(*seconds))),
        _ => None,
    }
}

/// How a send ended: a verified report per receiver that confirmed, and
/// why each other receiver did not.
#[derive(Debug)]
pub struct Sent {
    /// One per receiver whose receipt verified, in the order they were named.
    pub reports: Vec<Report>,
    /// The receivers that did not confirm, and why.
    pub failed: Vec<(AgentName, AgentError)>,
    /// With `--store`: the transfer stored at the broker for a receiver
    /// that was offline.
    pub stored: Option<store::StoredReport>,
}

/// Most receivers of one upload.
pub const MAX_RECEIVERS: usize = 16;

/// Sends the files or message to every receiver in `opts.to` (one upload),
/// then completes the receivers that dropped out by resumed one-to-one
/// transfers, within `--retry-for`.
pub async fn send(ctx: &Ctx, opts: SendOptions) -> Result<Sent, AgentError> {
    let source = Arc::new(collect(&opts)?);
    let total = source.size_known.then_some(source.total);
    let progress = Progress::new(total, opts.progress);
    let first = attempt::run(ctx, &opts, &source, &opts.to, &progress).await;
    let mut sent = Sent {
        reports: Vec::new(),
        failed: Vec::new(),
        stored: None,
    };
    let mut deadline = None;
    for (name, result) in first {
        let done = match result {
            Ok(done) => Ok((done, 1)),
            // Offline, and --store: the broker keeps it for the receiver.
            Err(failed) if opts.store && matches!(failed.error, AgentError::PeerOffline(_)) => {
                match store::store(ctx, &opts, &source, &name, &progress).await {
                    Ok(stored) => {
                        sent.stored = Some(stored);
                        continue;
                    }
                    Err(e) => Err(e),
                }
            }
            Err(failed) => {
                retry(ctx, &opts, &source, &name, failed, &progress, &mut deadline).await
            }
        };
        match done {
            Ok((done, attempts)) => sent.reports.push(report(&source, &name, &done, attempts)),
            Err(e) => sent.failed.push((name, e)),
        }
    }
    progress.finish();
    // Every receiver has it: the marks for a resume are of no more use.
    if sent.failed.is_empty()
        && let Some(marks) = attempt::marks_for(ctx, &source)
    {
        marks.remove();
    }
    Ok(sent)
}

/// Tries `to` again, one to one, after `failed`, while the failure is one a
/// retry may overcome and `--retry-for` (counted from the first
/// interruption, shared by all receivers) lasts. Returns the verified
/// transfer and how many attempts it took in all.
async fn retry(
    ctx: &Ctx,
    opts: &SendOptions,
    source: &Arc<Source>,
    to: &AgentName,
    mut failed: attempt::Failed,
    progress: &Progress,
    deadline: &mut Option<Instant>,
) -> Result<(attempt::Done, u32), AgentError> {
    let (mut attempts, mut accepted) = (1u32, false);
    let mut wait = Duration::from_secs(1);
    loop {
        // Only a transfer that was accepted is waited for again, or one the
        // receiver asked us to offer again later.
        accepted |= failed.accepted;
        let asked = temporary_refusal(&failed.error);
        let until = *deadline.get_or_insert_with(|| Instant::now() + opts.retry_for);
        // The receiver's own word on when to come back wins over our backoff
        // (bounded: an unauthenticated refusal cannot park us for long).
        let pause = asked.map_or(wait, |w| w.min(MAX_ASKED_WAIT).max(wait));
        // Standard input cannot be read again once the stream began.
        let again = if accepted {
            source.size_known
        } else {
            asked.is_some()
        };
        if !again || !transient(&failed.error) || Instant::now() + pause > until {
            return Err(failed.error);
        }
        let who = if opts.to.len() > 1 {
            format!(" for {to}")
        } else {
            String::new()
        };
        let what = if asked.is_some() {
            format!(
                "{}; offering again in {} s",
                failed.error,
                pause.as_secs_f64().ceil()
            )
        } else {
            format!("interrupted{who} ({}); retrying", failed.error)
        };
        progress.suspend(&what);
        tokio::time::sleep(pause).await;
        wait = (wait * 2).min(MAX_BACKOFF);
        // A file that changed since the first attempt must never be resumed into.
        source.unchanged()?;
        attempts += 1;
        let mut outcome = attempt::run(ctx, opts, source, std::slice::from_ref(to), progress).await;
        match outcome.pop() {
            Some((_, Ok(done))) => return Ok((done, attempts)),
            Some((_, Err(f))) => failed = f,
            None => return Err(AgentError::Internal("an attempt without an outcome".into())),
        }
    }
}

fn report(source: &Source, to: &AgentName, done: &attempt::Done, attempts: u32) -> Report {
    let file = source.manifest.top_level().first().map(|n| (*n).to_owned());
    Report {
        transfer_id: done.transfer_id.to_string(),
        peer: to.to_string(),
        file: file.unwrap_or_default(),
        files: source.file_count(),
        bytes: done.bytes,
        sha256: hex::encode(done.sha256),
        seconds: done.seconds,
        session_keys: done.session_keys,
        resumed_from: done.resumed_from,
        attempts,
        via: done.path,
        connections: done.connections,
    }
}

/// Reads the broker's answer to the `Lookup` of `to` (sent in the
/// connection's first flight) and checks the key against its pin (and
/// against `required` if given).
pub(super) async fn peer_key(
    ctx: &Ctx,
    conn: &mut AgentConn,
    to: &AgentName,
    required: Option<Fingerprint>,
) -> Result<PublicKey, AgentError> {
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
        // The broker's own trouble (its cluster or its database), not the peer's.
        Some(Message::Error {
            code: ErrorCode::Protocol,
            detail,
        }) => {
            return Err(AgentError::LookupFailed {
                peer: to.to_string(),
                why: escape(&detail),
            });
        }
        Some(Message::Error { code, detail }) => return Err(broker_error(code, detail)),
        _ => return Err(AgentError::Protocol("the broker did not answer the lookup")),
    };
    pin_peer(ctx, to, &spki, required)
}

/// Checks the key the broker gave for `to` against its pin (pinning it on
/// first contact, with the NEW KEY line), and against `required` if given.
pub(super) fn pin_peer(
    ctx: &Ctx,
    to: &AgentName,
    spki: &[u8],
    required: Option<Fingerprint>,
) -> Result<PublicKey, AgentError> {
    let key = PublicKey::from_spki_der(spki).map_err(|e| {
        AgentError::Verification(format!("the key the broker gave for {to} is refused: {e}"))
    })?;
    let pins = ctx.home.known_peers();
    let check = match required {
        Some(fp) => pins.require(to.as_str(), fp, key.fingerprint(), now_unix()),
        None => pins.check_or_pin(to.as_str(), key.fingerprint(), now_unix()),
    };
    match check {
        Ok(PinCheck::NewlyPinned(_)) if required.is_none() => {
            crate::output::err_line(&format!(
                "NEW KEY for {to} {} — first contact, verify out of band",
                key.fingerprint()
            ));
        }
        Ok(_) => {}
        Err(e @ PinError::Mismatch { .. }) => return Err(AgentError::PeerKeyMismatch(e)),
        Err(e) => return Err(AgentError::Pins(e)),
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lookup_the_broker_cannot_answer_now_is_tried_again_but_a_refusal_is_not() {
        let away = AgentError::LookupFailed {
            peer: "bob".into(),
            why: "this broker cannot reach its cluster to find bob".into(),
        };
        assert!(transient(&away));
        assert_eq!(away.exit_code(), crate::error::exit::PEER_UNAVAILABLE);
        assert!(!transient(&AgentError::BrokerRefused("no".into())));
        assert!(!transient(&AgentError::UnknownPeer("bob".into())));
    }
}
