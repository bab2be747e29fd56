//! What can go wrong in the mailbox, one type per call family, each variant
//! carrying what a caller needs to tell a user what to do (which transfer,
//! which limit, how many bytes).
//!
//! Numbers are printed in plain bytes so that nothing is rounded away; a
//! caller that wants `2.0 GiB` formats the fields itself.

use std::io;
use std::path::PathBuf;

use keyferry_common::ids::TransferId;
use keyferry_common::name::AgentName;
use thiserror::Error;

/// The mailbox's storage failed, or an id or argument was not acceptable.
#[derive(Debug, Error)]
pub enum MailboxError {
    /// A file or directory of the mailbox could not be read or written.
    #[error("mailbox storage {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the system reported.
        source: io::Error,
    },
    /// No committed transfer of that id is waiting.
    #[error("transfer {id} is not waiting in the mailbox")]
    NotWaiting {
        /// The transfer.
        id: TransferId,
    },
    /// A prekey bundle is empty or too long.
    #[error("a prekey bundle must be 1 to {max} bytes; this one is {len}")]
    Bundle {
        /// Its length.
        len: usize,
        /// The longest accepted.
        max: usize,
    },
    /// The cluster's mailbox (NATS JetStream) failed or did not answer in
    /// time; nothing is assumed done.
    #[error("the cluster's mailbox: {0}")]
    Shared(String),
    /// A receipt is too long to be kept.
    #[error("the receipt of transfer {id} is {len} bytes; the mailbox keeps at most {max}")]
    ReceiptTooLong {
        /// The transfer.
        id: TransferId,
        /// Its length.
        len: usize,
        /// The longest accepted.
        max: usize,
    },
}

impl MailboxError {
    /// An I/O error on `path`.
    pub(super) fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// Why a transfer may not be stored. Checked before any byte is written, in
/// this order; byte counts include uploads in progress, each counted at the
/// most it may write ([`super::max_upload`]).
#[derive(Debug, Error)]
pub enum Refusal {
    /// A transfer of that id is stored, being uploaded, or has a receipt.
    #[error("transfer {id} is already in the mailbox")]
    Duplicate {
        /// The transfer.
        id: TransferId,
    },
    /// The receiver has as many transfers waiting as allowed.
    #[error(
        "the broker keeps at most {limit} transfers for {receiver} and {waiting} are waiting already"
    )]
    ReceiverCount {
        /// The receiver.
        receiver: AgentName,
        /// The limit.
        limit: usize,
        /// Transfers waiting for it, or being uploaded to it.
        waiting: usize,
    },
    /// The receiver's share would be exceeded.
    #[error(
        "the broker keeps at most {limit} bytes for {receiver} and {waiting} bytes are waiting already; this transfer needs {needed} bytes"
    )]
    ReceiverBytes {
        /// The receiver.
        receiver: AgentName,
        /// The limit.
        limit: u64,
        /// Bytes waiting for it, or reserved.
        waiting: u64,
        /// Bytes this transfer needs.
        needed: u64,
    },
    /// The sender's share would be exceeded.
    #[error(
        "the broker keeps at most {limit} bytes from {sender} and {waiting} bytes of theirs are waiting already; this transfer needs {needed} bytes"
    )]
    SenderBytes {
        /// The sender.
        sender: AgentName,
        /// The limit.
        limit: u64,
        /// Bytes from it waiting, or reserved.
        waiting: u64,
        /// Bytes this transfer needs.
        needed: u64,
    },
    /// The mailbox as a whole would be over its total.
    #[error(
        "the broker keeps at most {limit} bytes for offline receivers and {used} bytes are taken already; this transfer needs {needed} bytes"
    )]
    Total {
        /// The limit.
        limit: u64,
        /// Bytes stored or reserved.
        used: u64,
        /// Bytes this transfer needs.
        needed: u64,
    },
    /// The transfer's offer and key are too long to be stored.
    #[error("the offer of transfer {id} takes {len} bytes; the mailbox keeps at most {max}")]
    OfferTooLong {
        /// The transfer.
        id: TransferId,
        /// Its stored length.
        len: usize,
        /// The longest accepted.
        max: usize,
    },
    /// The upload's file could not be created.
    #[error(transparent)]
    Storage(#[from] MailboxError),
}

/// Why an upload failed; the upload is void (drop it).
#[derive(Debug, Error)]
pub enum UploadError {
    /// The sender sent more than its announced size allows.
    #[error("transfer {id}: the upload exceeds the {limit} bytes its announced size allows")]
    TooLong {
        /// The transfer.
        id: TransferId,
        /// The most it may write.
        limit: u64,
    },
    /// Writing or committing failed.
    #[error(transparent)]
    Storage(#[from] MailboxError),
}

/// Why a sender could not withdraw a transfer.
#[derive(Debug, Error)]
pub enum WithdrawError {
    /// No transfer of that id from this sender is waiting. A transfer of
    /// someone else's gets the same answer, so ids cannot be probed.
    #[error("no transfer {id} of yours is waiting in the mailbox")]
    NotWaiting {
        /// The transfer.
        id: TransferId,
    },
    /// Its receiver is being sent it right now.
    #[error("transfer {id} is being delivered right now")]
    Delivering {
        /// The transfer.
        id: TransferId,
    },
    /// The receipt could not be written; nothing changed.
    #[error(transparent)]
    Storage(#[from] MailboxError),
}

/// A sender fetched prekeys too often.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("too many prekey fetches; retry in {retry_after_secs} s")]
pub struct Limited {
    /// Seconds until a fetch is allowed again (at least 1).
    pub retry_after_secs: u64,
}

/// Why no prekey was handed out.
#[derive(Debug, Error)]
pub enum TakeError {
    /// The sender is over its fetch rate.
    #[error(transparent)]
    Limited(#[from] Limited),
    /// The bundle's removal could not be made durable; it was not handed out.
    #[error(transparent)]
    Storage(#[from] MailboxError),
}
