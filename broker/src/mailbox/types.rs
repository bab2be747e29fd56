//! What callers see of the mailbox: a stored transfer's metadata, how a
//! delivery ended, the receipt records a sender reads, prekeys and usage.
//!
//! Every byte string here is opaque to the broker (keys, signed offers,
//! receipts, bundles): it is kept and handed back, never parsed.

use keyferry_common::ids::TransferId;
use keyferry_common::name::AgentName;

/// What the broker knows of one stored transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMeta {
    /// The transfer.
    pub id: TransferId,
    /// Its sender.
    pub from: AgentName,
    /// Its receiver.
    pub to: AgentName,
    /// The sender's public key (DER), opaque.
    pub sender_spki: Vec<u8>,
    /// The signed offer's body, opaque.
    pub offer_body: Vec<u8>,
    /// The offer's signature, opaque.
    pub offer_signature: Vec<u8>,
    /// Bytes the sender announced; the upload may not exceed
    /// [`super::max_upload`] of it.
    pub size: u64,
    /// When it was reserved (unix seconds); set by [`super::Mailbox::reserve`].
    pub stored_at: u64,
    /// When it expires (unix seconds): `stored_at` plus the maximum age.
    pub expires: u64,
    /// Whether the sender used the receiver's last-resort prekey.
    pub last_resort: bool,
    /// When it was committed, in nanoseconds since the epoch, made strictly
    /// increasing: the order its receiver is offered it in. Set by
    /// [`super::Upload::commit`].
    pub order: u64,
}

/// How a delivery ended, as the receiver said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The receiver took it; its signed receipt, opaque.
    Delivered {
        /// The receipt.
        receipt: Vec<u8>,
    },
    /// The receiver refused it; its signed refusal, opaque.
    Refused {
        /// The receipt.
        receipt: Vec<u8>,
    },
}

/// Where a transfer a sender stored stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Stored, waiting for its receiver.
    Waiting {
        /// When it expires (unix seconds).
        expires: u64,
    },
    /// Delivered at `at`.
    Delivered {
        /// The receiver's receipt.
        receipt: Vec<u8>,
        /// When (unix seconds).
        at: u64,
    },
    /// Refused by the receiver at `at`.
    Refused {
        /// The receiver's receipt.
        receipt: Vec<u8>,
        /// When (unix seconds).
        at: u64,
    },
    /// Deleted unread at `at` (or due since `at`).
    Expired {
        /// When (unix seconds).
        at: u64,
    },
    /// Withdrawn by its sender at `at`.
    Withdrawn {
        /// When (unix seconds).
        at: u64,
    },
}

impl State {
    /// When the transfer ended, if it did.
    pub fn ended_at(&self) -> Option<u64> {
        match self {
            Self::Waiting { .. } => None,
            Self::Delivered { at, .. }
            | Self::Refused { at, .. }
            | Self::Expired { at }
            | Self::Withdrawn { at } => Some(*at),
        }
    }
}

/// One of a sender's stored transfers, waiting or ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptRecord {
    /// The transfer.
    pub id: TransferId,
    /// Its receiver.
    pub to: AgentName,
    /// Its announced size.
    pub size: u64,
    /// When it was stored (unix seconds).
    pub stored_at: u64,
    /// Where it stands.
    pub state: State,
}

/// A prekey bundle handed to a sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prekey {
    /// The receiver's signed bundle, opaque.
    pub bundle: Vec<u8>,
    /// Whether it is the receiver's last-resort bundle (handed out again and
    /// again) rather than a one-time one.
    pub last_resort: bool,
}

/// What the mailbox holds, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Bytes stored, plus those reserved by uploads in progress.
    pub bytes: u64,
    /// Transfers stored (committed, not yet ended).
    pub transfers: usize,
    /// Uploads in progress.
    pub uploads: usize,
}
