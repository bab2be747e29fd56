//! Everything that can end an agent run, each with the exit code it maps to and
//! a message that says what failed and what to do. Every variant keeps the
//! error it came from.

use std::path::PathBuf;

use keyferry_common::handshake::HandshakeError;
use keyferry_common::identity::Fingerprint;
use keyferry_common::transfer::SendError;
use keyferry_common::wire::message::{AbortReason, RefuseReason};
use thiserror::Error;

use crate::home::{HomeError, KeyFileError};
use crate::trust::pins::PinError;

/// Exit codes, as documented in the README.
pub mod exit {
    /// Anything not listed below (bad configuration, key files, protocol errors).
    pub const OTHER: u8 = 1;
    /// Wrong command-line usage: clap's own errors, and ours found after parsing.
    pub const USAGE: u8 = 2;
    /// The broker cannot be reached, or a connection was lost: the
    /// broker's, or the receiver's before it confirmed the transfer.
    pub const BROKER_UNREACHABLE: u8 = 3;
    /// The broker presented another certificate than the pinned one.
    pub const BROKER_MISMATCH: u8 = 4;
    /// The peer is unknown to the broker, or not online.
    pub const PEER_UNAVAILABLE: u8 = 5;
    /// The peer's key differs from the pinned one.
    pub const PEER_KEY_MISMATCH: u8 = 6;
    /// The file to send cannot be read.
    pub const FILE_UNREADABLE: u8 = 7;
    /// The receiver refused the transfer (its limits or rules, or after the
    /// data: no free name for it).
    pub const REFUSED: u8 = 8;
    /// Verification failed: data altered, truncated, or not what was sent.
    pub const VERIFICATION_FAILED: u8 = 9;
    /// The broker refused our name or key.
    pub const NAME_REFUSED: u8 = 10;
    /// A send to several receivers: some of them did not confirm it (the
    /// others did; each failure is on its own line).
    pub const SOME_RECEIVERS_FAILED: u8 = 11;
    /// `--store`: the receiver was offline, and the broker stored the
    /// transfer for it; not delivered yet (`agent --receipts` tells later).
    pub const STORED: u8 = 12;
    /// `--direct only` (ours or the peer's), and no direct connection
    /// between the agents worked.
    pub const NO_DIRECT_PATH: u8 = 13;
    /// Interrupted (Ctrl-C).
    pub const INTERRUPTED: u8 = 130;
}

/// Why an agent run failed.
#[derive(Debug, Error)]
pub enum AgentError {
    /// TCP or TLS to the broker failed.
    #[error(
        "cannot reach the broker at {addr}: {detail}. Is `broker` running there? (--broker ADDR)"
    )]
    BrokerUnreachable {
        /// Address tried.
        addr: String,
        /// What failed.
        detail: String,
    },
    /// The broker's certificate differs from the pin.
    #[error(
        "BROKER KEY MISMATCH for {addr}: expected {expected}, but the broker presents {presented}. \
         This may be an attack. If the broker really changed its key, verify the new fingerprint \
         and remove the line for {addr} from {file}, or pass --broker-fingerprint"
    )]
    BrokerMismatch {
        /// Broker address.
        addr: String,
        /// Pinned or required fingerprint.
        expected: Fingerprint,
        /// What it presented.
        presented: Fingerprint,
        /// The pin file.
        file: PathBuf,
    },
    /// No agent of that name has registered.
    #[error(
        "unknown peer {0}: no agent of that name has registered with this broker (check the name; `agent --list` shows who is online)"
    )]
    UnknownPeer(String),
    /// The peer is not connected as a receiver.
    #[error(
        "peer {0} is offline: it must run `agent --role receiver` (`agent --list` shows who is \
         online), or send with --store to leave it at the broker until {0} connects"
    )]
    PeerOffline(String),
    /// `--store` did its job: the receiver was offline, and the broker keeps
    /// the transfer for it.
    #[error("{peer} is offline: stored for delivery (id {id}, expires {expires})")]
    StoredForLater {
        /// The receiver.
        peer: String,
        /// The transfer id.
        id: String,
        /// When the broker deletes it undelivered (UTC).
        expires: String,
    },
    /// The broker does not take a stored transfer: over one of its mailbox
    /// limits, or it keeps no mailbox.
    #[error("the broker will not store it: {0}; nothing was uploaded")]
    StoreRefused(String),
    /// The broker could not get an answer to an offer from the peer: it
    /// went away, froze (dropped by the keepalive) or did not answer.
    #[error("peer {peer} did not take the offer: {why} (`agent --list` shows who is online)")]
    PeerUnavailable {
        /// The peer.
        peer: String,
        /// What the broker said.
        why: String,
    },
    /// Nobody is receiving at the broker (the picker has no one to offer).
    #[error(
        "nobody is receiving at {0} right now (`agent --list` shows who is online; the \
         receiver must run `agent --role receiver`)"
    )]
    NobodyReceiving(String),
    /// The user cancelled a question or the picker.
    #[error("cancelled; nothing was sent")]
    Cancelled,
    /// The broker could not answer a lookup now (its cluster or database is
    /// away): worth trying again.
    #[error("the broker cannot look up {peer} now: {why}")]
    LookupFailed {
        /// The peer.
        peer: String,
        /// What the broker said (escaped).
        why: String,
    },
    /// A pinned peer key changed.
    #[error(transparent)]
    PeerKeyMismatch(PinError),
    /// The file to send cannot be read.
    #[error("cannot read {path}: {detail}")]
    FileUnreadable {
        /// The file.
        path: PathBuf,
        /// What failed.
        detail: String,
    },
    /// A resumed prefix of the source changed since it was first read and
    /// marked (in place, with the same size and time): the receiver drops
    /// what it kept and the next attempt sends everything again.
    #[error("{0} changed since it was first sent; sending everything again from byte 0")]
    PrefixChanged(String),
    /// The receiver refused.
    #[error("{peer} refused the transfer: {}", refuse_text(*.reason, *.size))]
    Refused {
        /// The receiver.
        peer: String,
        /// Its reason.
        reason: RefuseReason,
        /// The size the offer declared.
        size: u64,
    },
    /// Something did not verify.
    #[error("verification failed: {0}")]
    Verification(String),
    /// The receiver gave up on the transfer and said why.
    #[error("{}", abort_text(*.0))]
    ReceiverAborted(AbortReason),
    /// The stream went out whole, but no receipt came back: whether it
    /// arrived is not known.
    #[error(
        "{0}: the transfer is not confirmed — it may or may not have arrived; ask the \
         receiver, or send it again"
    )]
    Unconfirmed(String),
    /// The direct connection to the receiver broke before it confirmed.
    #[error(
        "the direct connection to the receiver was lost before it confirmed the transfer \
         ({0}): the receiver disconnected, or the network between you went away"
    )]
    DirectLost(String),
    /// A direct path was required (`--direct only`, ours or the peer's) and
    /// none worked.
    #[error("no direct path: {0}")]
    NoDirectPath(String),
    /// A `--once` receiver's one transfer did not complete.
    #[error("the transfer did not complete: {why}")]
    TransferFailed {
        /// The exit code it maps to.
        code: u8,
        /// What happened.
        why: String,
    },
    /// The broker refused our name.
    #[error("the broker refused this agent: {0}")]
    NameRefused(String),
    /// The broker refused a request (the detail is the broker's).
    #[error("the broker refused: {0}")]
    BrokerRefused(String),
    /// The broker ended a receiver's session and said why.
    #[error("the broker ended the session: {0}")]
    SessionEnded(String),
    /// The broker or the peer sent something the protocol does not allow here.
    #[error("{0}")]
    Protocol(&'static str),
    /// The broker speaks another protocol version.
    #[error(
        "{}",
        keyferry_common::version_mismatch(keyferry_common::PROTOCOL_VERSION, *.broker)
    )]
    Version {
        /// The broker's version.
        broker: u16,
    },
    /// The broker refused this agent's protocol version (an older broker
    /// says so in its own words).
    #[error(
        "the broker does not speak keyferry protocol version {v}, which this agent speaks \
         ({0}): upgrade the broker, or use an agent of the broker's version",
        v = keyferry_common::PROTOCOL_VERSION
    )]
    VersionRefused(String),
    /// Ctrl-C.
    #[error("interrupted")]
    Interrupted,
    /// A send to several receivers reached only some of them.
    #[error("{failed} of {of} receivers did not confirm the transfer (see above)")]
    SomeReceiversFailed {
        /// How many failed.
        failed: usize,
        /// Of how many.
        of: usize,
    },
    /// A wrong combination of options.
    #[error("{0} (see agent --help)")]
    Usage(String),
    /// The home directory cannot be used.
    #[error(transparent)]
    Home(#[from] HomeError),
    /// The identity's key file.
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    /// A pin file cannot be read or written.
    #[error(transparent)]
    Pins(PinError),
    /// The out dir cannot be used.
    #[error("cannot use out dir {path}: {source}")]
    OutDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The offer could not be built.
    #[error("cannot build the offer: {0}")]
    Offer(#[source] HandshakeError),
    /// The sender's stream refused what it was given.
    #[error(transparent)]
    Stream(#[from] SendError),
    /// A text message was too long to send.
    #[error("message of {len} bytes is longer than the {max}-byte limit; send it as a file")]
    MessageTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A worker task or thread stopped without an answer (a bug, not input).
    #[error("internal error: {0}")]
    Internal(String),
    /// TLS could not be set up.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

impl From<PinError> for AgentError {
    fn from(e: PinError) -> Self {
        match e {
            PinError::Mismatch { .. } => Self::PeerKeyMismatch(e),
            other => Self::Pins(other),
        }
    }
}

impl From<tokio::task::JoinError> for AgentError {
    fn from(e: tokio::task::JoinError) -> Self {
        Self::Internal(e.to_string())
    }
}

fn refuse_text(r: RefuseReason, size: u64) -> String {
    match r {
        RefuseReason::TooLarge { most } => format!(
            "too large: it takes at most {} ({most} bytes) now (its --max-size, or its free disk \
             space less the 1 GiB it keeps), and this is {} ({size} bytes)",
            crate::progress::human_bytes(most),
            crate::progress::human_bytes(size)
        ),
        RefuseReason::Busy => "it is busy with other transfers; try again shortly".into(),
        RefuseReason::KeyMismatch => "your key does not match the one it pinned for you".into(),
        RefuseReason::VerificationFailed => "the offer did not verify".into(),
        RefuseReason::Policy => "refused by its policy (file name, rate limit)".into(),
        RefuseReason::NotListed => {
            "it takes transfers only from the senders it names (--accept-from), and not from you"
                .into()
        }
        RefuseReason::NotKnown => "it takes transfers only from senders whose key it already \
             pinned (--accept-from known), and you are a first contact: send it something \
             while it accepts you, or ask its user to"
            .into(),
        RefuseReason::TryLater { seconds } => format!(
            "its budget of RSA decryptions for your key is spent for now (a key it met \
             recently gets a few offers a minute); offer again in {seconds} s"
        ),
    }
}

fn abort_text(r: AbortReason) -> &'static str {
    match r {
        AbortReason::Storage => {
            "the receiver could not store the file (disk full or out dir not writable)"
        }
        AbortReason::PeerGone => {
            "the receiver's side went away before it confirmed the transfer (the receiver \
             disconnected, or the broker ended the relay)"
        }
        AbortReason::Timeout => "the receiver gave up waiting",
        AbortReason::Interrupted => "the receiver was interrupted",
        AbortReason::VerificationFailed | AbortReason::Source => {
            "verification failed: the receiver refused the data (it did not verify)"
        }
        AbortReason::Policy => {
            "the receiver refused what was sent (a name or size its rules do not allow)"
        }
        AbortReason::Declined => "the receiver's user declined it; nothing was written",
        AbortReason::PrefixDamaged => {
            "the receiver found the part it kept from an earlier attempt damaged on its disk, \
             and dropped it"
        }
        AbortReason::NoAnswer => {
            "the receiver's user did not answer in time, so it was refused; nothing was written"
        }
        AbortReason::NoFreeName => {
            "the receiver has no free name left for it: the name and its numbered variants \
             (1) … (99) all exist in its out dir; nothing was placed"
        }
    }
}

impl AgentError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::BrokerUnreachable { .. }
            | Self::DirectLost(_)
            | Self::Unconfirmed(_)
            | Self::ReceiverAborted(AbortReason::PeerGone) => exit::BROKER_UNREACHABLE,
            Self::BrokerMismatch { .. } => exit::BROKER_MISMATCH,
            Self::UnknownPeer(_)
            | Self::PeerOffline(_)
            | Self::PeerUnavailable { .. }
            | Self::LookupFailed { .. }
            | Self::NobodyReceiving(_) => exit::PEER_UNAVAILABLE,
            Self::PeerKeyMismatch(_) => exit::PEER_KEY_MISMATCH,
            Self::FileUnreadable { .. } | Self::PrefixChanged(_) => exit::FILE_UNREADABLE,
            Self::Refused { .. }
            | Self::ReceiverAborted(
                AbortReason::NoFreeName | AbortReason::Declined | AbortReason::NoAnswer,
            ) => exit::REFUSED,
            Self::Verification(_) => exit::VERIFICATION_FAILED,
            Self::ReceiverAborted(AbortReason::VerificationFailed | AbortReason::Source) => {
                exit::VERIFICATION_FAILED
            }
            Self::NameRefused(_) => exit::NAME_REFUSED,
            Self::Usage(_) => exit::USAGE,
            Self::TransferFailed { code, .. } => *code,
            Self::Interrupted | Self::Cancelled => exit::INTERRUPTED,
            Self::SomeReceiversFailed { .. } => exit::SOME_RECEIVERS_FAILED,
            Self::NoDirectPath(_) => exit::NO_DIRECT_PATH,
            Self::StoredForLater { .. } => exit::STORED,
            Self::StoreRefused(_) => exit::REFUSED,
            Self::ReceiverAborted(_)
            | Self::BrokerRefused(_)
            | Self::SessionEnded(_)
            | Self::Protocol(_)
            | Self::Version { .. }
            | Self::VersionRefused(_)
            | Self::Home(_)
            | Self::KeyFile(_)
            | Self::Pins(_)
            | Self::OutDir { .. }
            | Self::Offer(_)
            | Self::Stream(_)
            | Self::MessageTooLong { .. }
            | Self::Internal(_)
            | Self::Tls(_) => exit::OTHER,
        }
    }
}
