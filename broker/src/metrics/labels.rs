//! The words the metrics' labels may take: each event the broker counts,
//! as an enum, and the fixed label value it becomes. Nothing here is ever a
//! name, an address, a key or an id.

use keyferry_common::wire::message::RefuseReason;

/// How an offer made through this broker ended (counted where its sender is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// The receiver accepted.
    Accepted,
    /// The receiver refused, for this reason.
    Refused(RefuseReason),
    /// The receiver did not answer in time.
    TimedOut,
    /// The receiver was not connected (or could not take offers).
    Offline,
    /// The receiver left before it answered.
    ReceiverLeft,
    /// The broker's offer rate or concurrency limit refused it.
    RateLimited,
    /// Another broker of the cluster could not deliver it.
    Failed,
}

impl Offer {
    pub(super) fn outcome(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Refused(_) => "refused",
            Self::TimedOut => "timed_out",
            Self::Offline => "offline",
            Self::ReceiverLeft => "receiver_left",
            Self::RateLimited => "rate_limited",
            Self::Failed => "failed",
        }
    }
}

pub(super) const OUTCOMES: [&str; 7] = [
    "accepted",
    "refused",
    "timed_out",
    "offline",
    "receiver_left",
    "rate_limited",
    "failed",
];
pub(super) const REASONS: [&str; 8] = [
    "too_large",
    "busy",
    "key_mismatch",
    "verification_failed",
    "policy",
    "try_later",
    "not_listed",
    "not_known",
];
pub(super) const HANDSHAKES: [&str; 10] = [
    "tls",
    "timeout",
    "version",
    "protocol",
    "signature",
    "policy",
    "name_taken",
    "registry",
    "evicted",
    "ticket",
];
pub(super) const LIMITS: [&str; 4] = [
    "connections",
    "connections_per_ip",
    "offers_per_minute",
    "transfers_per_agent",
];

/// The receiver's reason, as a label value.
pub(super) fn refusal(reason: RefuseReason) -> &'static str {
    match reason {
        RefuseReason::TooLarge { .. } => "too_large",
        RefuseReason::Busy => "busy",
        RefuseReason::KeyMismatch => "key_mismatch",
        RefuseReason::VerificationFailed => "verification_failed",
        RefuseReason::Policy => "policy",
        RefuseReason::TryLater { .. } => "try_later",
        RefuseReason::NotListed => "not_listed",
        RefuseReason::NotKnown => "not_known",
    }
}

/// Why a connection never authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    /// TLS failed.
    Tls,
    /// The handshake took longer than `--handshake-timeout`.
    Timeout,
    /// Another protocol version.
    Version,
    /// Not the messages the handshake expects.
    Protocol,
    /// The key could not be read, or the signature did not verify.
    Signature,
    /// The access policy does not admit this name and key.
    Policy,
    /// The name belongs to another key.
    NameTaken,
    /// The name binding could not be checked (database or cluster).
    Registry,
    /// A newer connection from the same address took its place.
    Evicted,
    /// A data connection's ticket was unknown, used or expired.
    Ticket,
}

impl Handshake {
    pub(super) fn label(self) -> &'static str {
        match self {
            Self::Tls => "tls",
            Self::Timeout => "timeout",
            Self::Version => "version",
            Self::Protocol => "protocol",
            Self::Signature => "signature",
            Self::Policy => "policy",
            Self::NameTaken => "name_taken",
            Self::Registry => "registry",
            Self::Evicted => "evicted",
            Self::Ticket => "ticket",
        }
    }
}

/// A limit that refused something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `--max-connections`.
    Connections,
    /// `--max-connections-per-ip`.
    ConnectionsPerIp,
    /// `--offers-per-minute`.
    OffersPerMinute,
    /// `--max-transfers-per-agent`.
    TransfersPerAgent,
}

impl Limit {
    pub(super) fn label(self) -> &'static str {
        match self {
            Self::Connections => "connections",
            Self::ConnectionsPerIp => "connections_per_ip",
            Self::OffersPerMinute => "offers_per_minute",
            Self::TransfersPerAgent => "transfers_per_agent",
        }
    }
}

/// Which way a relay's bytes went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Sender and receiver both on this broker.
    Local,
    /// The offer came through the cluster from a sender on another broker.
    Routed,
    /// Copies of one upload to several receivers (each copy counts).
    Fanout,
    /// Stored transfers: uploads into the mailbox (received), deliveries
    /// out of it (relayed).
    Stored,
}

impl Path {
    pub(super) fn label(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Routed => "routed",
            Self::Fanout => "fanout",
            Self::Stored => "stored",
        }
    }
}

/// How a transfer's relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The trailer went forward and the receipt back.
    Finished,
    /// The relay broke off.
    Failed,
    /// The data connections never both came: the agents went direct, or one
    /// of them left.
    NotRelayed,
}

impl End {
    pub(super) fn label(self) -> &'static str {
        match self {
            Self::Finished => "finished",
            Self::Failed => "failed",
            Self::NotRelayed => "not_relayed",
        }
    }
}
