//! The mailbox's file formats: postcard encodings of versioned records, and
//! their decoding with every check a hostile file must pass.
//!
//! A file that fails a check is corrupt: the caller drops its entry with a
//! warning. Nothing here panics or allocates more than the file's bounded
//! length.

use keyferry_common::ids::TransferId;
use keyferry_common::name::AgentName;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_bytes::ByteBuf;

use super::error::{MailboxError, Refusal};
use super::limits::max_upload;
use super::types::{Outcome, Prekey, ReceiptRecord, State, StoredMeta};

/// The version every record starts with.
const VERSION: u8 = 1;

/// Longest metadata or receipt file.
pub(super) const MAX_RECORD: usize = 64 << 10;
/// Longest receipt a receiver's answer may carry.
pub(super) const MAX_RECEIPT: usize = 16 << 10;
/// Longest prekey bundle.
pub const MAX_BUNDLE: usize = 4096;
/// Most one-time bundles held per receiver.
pub const MAX_ONE_TIME: usize = 100;
/// Longest prekey file: the most bundles plus their framing.
pub(super) const MAX_PREKEY_FILE: usize = 512 << 10;

/// A stored transfer's metadata, as in `<hex id>.meta`.
#[derive(Serialize, Deserialize)]
pub(super) struct MetaFile {
    v: u8,
    id: TransferId,
    from: AgentName,
    to: AgentName,
    #[serde(with = "serde_bytes")]
    sender_spki: Vec<u8>,
    #[serde(with = "serde_bytes")]
    offer_body: Vec<u8>,
    #[serde(with = "serde_bytes")]
    offer_signature: Vec<u8>,
    size: u64,
    stored_at: u64,
    expires: u64,
    last_resort: bool,
    /// The order it is delivered in ([`StoredMeta::order`]).
    order: u64,
    /// Bytes in the data file.
    len: u64,
}

/// How a transfer ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum End {
    /// Delivered, with the receiver's receipt.
    Delivered(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Refused, with the receiver's receipt.
    Refused(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Deleted unread.
    Expired,
    /// Withdrawn by its sender.
    Withdrawn,
}

/// A transfer that ended, as in `receipts/<hex id>`.
#[derive(Serialize, Deserialize)]
struct ReceiptFile {
    v: u8,
    id: TransferId,
    from: AgentName,
    to: AgentName,
    size: u64,
    stored_at: u64,
    end: End,
    at: u64,
}

/// A receiver's prekeys, as in `prekeys/<receiver>`.
#[derive(Serialize, Deserialize)]
struct PrekeyFile {
    v: u8,
    one_time: Vec<ByteBuf>,
    last_resort: Option<ByteBuf>,
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Encoding plain structs into a Vec cannot fail.
    postcard::to_stdvec(value).unwrap_or_default()
}

/// Decodes all of `bytes` (trailing bytes are corruption too).
fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    match postcard::take_from_bytes(bytes) {
        Ok((value, [])) => Some(value),
        _ => None,
    }
}

impl MetaFile {
    pub fn encode(meta: &StoredMeta, len: u64) -> Vec<u8> {
        encode(&Self {
            v: VERSION,
            id: meta.id,
            from: meta.from.clone(),
            to: meta.to.clone(),
            sender_spki: meta.sender_spki.clone(),
            offer_body: meta.offer_body.clone(),
            offer_signature: meta.offer_signature.clone(),
            size: meta.size,
            stored_at: meta.stored_at,
            expires: meta.expires,
            last_resort: meta.last_resort,
            order: meta.order,
            len,
        })
    }

    /// The metadata and data length of transfer `id`, if `bytes` is a
    /// well-formed record of it.
    pub fn decode(bytes: &[u8], id: &TransferId) -> Option<(StoredMeta, u64)> {
        let m: Self = decode(bytes)?;
        let ok = m.v == VERSION
            && m.id == *id
            && m.expires >= m.stored_at
            && m.len <= max_upload(m.size);
        ok.then(|| {
            let meta = StoredMeta {
                id: m.id,
                from: m.from,
                to: m.to,
                sender_spki: m.sender_spki,
                offer_body: m.offer_body,
                offer_signature: m.offer_signature,
                size: m.size,
                stored_at: m.stored_at,
                expires: m.expires,
                last_resort: m.last_resort,
                order: m.order,
            };
            (meta, m.len)
        })
    }
}

/// A transfer that ended, as the index keeps it (and its receipt file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Ended {
    pub from: AgentName,
    pub to: AgentName,
    pub size: u64,
    pub stored_at: u64,
    pub end: End,
    /// When it ended (unix seconds).
    pub at: u64,
}

impl End {
    /// The end a receiver's answer makes, if its receipt can be kept.
    pub fn of(id: &TransferId, outcome: Outcome) -> Result<Self, MailboxError> {
        let (Outcome::Delivered { receipt } | Outcome::Refused { receipt }) = &outcome;
        if receipt.len() > MAX_RECEIPT {
            return Err(MailboxError::ReceiptTooLong {
                id: *id,
                len: receipt.len(),
                max: MAX_RECEIPT,
            });
        }
        Ok(match outcome {
            Outcome::Delivered { receipt } => Self::Delivered(receipt),
            Outcome::Refused { receipt } => Self::Refused(receipt),
        })
    }
}

/// Sets `meta`'s `stored_at` (`now_unix`) and `expires` (after `max_age`
/// seconds), and refuses one whose record would be too long to keep.
pub(super) fn stamp(meta: &mut StoredMeta, now_unix: u64, max_age: u64) -> Result<(), Refusal> {
    meta.stored_at = now_unix;
    meta.expires = now_unix.saturating_add(max_age);
    let len = MetaFile::encode(meta, u64::MAX).len();
    if len > MAX_RECORD {
        return Err(Refusal::OfferTooLong {
            id: meta.id,
            len,
            max: MAX_RECORD,
        });
    }
    Ok(())
}

/// A waiting transfer as its sender is shown it at `now_unix`: expired once
/// past its expiry, even before a sweep removed it.
pub(super) fn waiting_record(m: &StoredMeta, now_unix: u64) -> ReceiptRecord {
    let state = if now_unix < m.expires {
        State::Waiting { expires: m.expires }
    } else {
        State::Expired { at: m.expires }
    };
    ReceiptRecord {
        id: m.id,
        to: m.to.clone(),
        size: m.size,
        stored_at: m.stored_at,
        state,
    }
}

impl Ended {
    /// Transfer `id`'s record, as its sender is shown it.
    pub fn record(&self, id: TransferId) -> ReceiptRecord {
        ReceiptRecord {
            id,
            to: self.to.clone(),
            size: self.size,
            stored_at: self.stored_at,
            state: self.state(),
        }
    }

    /// The state a sender is shown.
    pub fn state(&self) -> State {
        let at = self.at;
        match &self.end {
            End::Delivered(receipt) => State::Delivered {
                receipt: receipt.clone(),
                at,
            },
            End::Refused(receipt) => State::Refused {
                receipt: receipt.clone(),
                at,
            },
            End::Expired => State::Expired { at },
            End::Withdrawn => State::Withdrawn { at },
        }
    }

    pub fn encode(&self, id: &TransferId) -> Vec<u8> {
        encode(&ReceiptFile {
            v: VERSION,
            id: *id,
            from: self.from.clone(),
            to: self.to.clone(),
            size: self.size,
            stored_at: self.stored_at,
            end: self.end.clone(),
            at: self.at,
        })
    }

    /// The record of transfer `id`, if `bytes` is a well-formed one of it.
    pub fn decode(bytes: &[u8], id: &TransferId) -> Option<Self> {
        let r: ReceiptFile = decode(bytes)?;
        (r.v == VERSION && r.id == *id).then_some(Self {
            from: r.from,
            to: r.to,
            size: r.size,
            stored_at: r.stored_at,
            end: r.end,
            at: r.at,
        })
    }
}

/// A receiver's bundles: one-time ones in the order they are handed out,
/// and the last-resort one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Bundles {
    pub one_time: Vec<Vec<u8>>,
    pub last_resort: Option<Vec<u8>>,
}

impl Bundles {
    pub fn encode(&self) -> Vec<u8> {
        encode(&PrekeyFile {
            v: VERSION,
            one_time: self.one_time.iter().cloned().map(ByteBuf::from).collect(),
            last_resort: self.last_resort.clone().map(ByteBuf::from),
        })
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let f: PrekeyFile = decode(bytes)?;
        let fits = |b: &ByteBuf| (1..=MAX_BUNDLE).contains(&b.len());
        let ok = f.v == VERSION
            && f.one_time.len() <= MAX_ONE_TIME
            && f.one_time.iter().all(fits)
            && f.last_resort.as_ref().is_none_or(fits);
        ok.then(|| Self {
            one_time: f.one_time.into_iter().map(ByteBuf::into_vec).collect(),
            last_resort: f.last_resort.map(ByteBuf::into_vec),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.one_time.is_empty() && self.last_resort.is_none()
    }

    /// Adds `one_time` bundles (past [`MAX_ONE_TIME`] held, the rest are
    /// dropped) and replaces the last-resort one if one is given; refused
    /// (nothing changed) if any bundle is empty or over [`MAX_BUNDLE`].
    pub fn add(
        &mut self,
        one_time: Vec<Vec<u8>>,
        last_resort: Option<Vec<u8>>,
    ) -> Result<(), MailboxError> {
        if let Some(bad) = one_time
            .iter()
            .chain(&last_resort)
            .find(|b| !(1..=MAX_BUNDLE).contains(&b.len()))
        {
            return Err(MailboxError::Bundle {
                len: bad.len(),
                max: MAX_BUNDLE,
            });
        }
        let room = MAX_ONE_TIME.saturating_sub(self.one_time.len());
        self.one_time.extend(one_time.into_iter().take(room));
        if last_resort.is_some() {
            self.last_resort = last_resort;
        }
        Ok(())
    }

    /// The bundle a sender gets: the first one-time one (removed here), else
    /// the last-resort one (kept), else `None`.
    pub fn take(&mut self) -> Option<Prekey> {
        if self.one_time.is_empty() {
            return self.last_resort.clone().map(|bundle| Prekey {
                bundle,
                last_resort: true,
            });
        }
        Some(Prekey {
            bundle: self.one_time.remove(0),
            last_resort: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_prekey_file_fits_its_bound() {
        let full = Bundles {
            one_time: vec![vec![7; MAX_BUNDLE]; MAX_ONE_TIME],
            last_resort: Some(vec![8; MAX_BUNDLE]),
        };
        let bytes = full.encode();
        assert!(bytes.len() <= MAX_PREKEY_FILE, "{}", bytes.len());
        assert_eq!(Bundles::decode(&bytes), Some(full));
    }

    #[test]
    fn corrupt_records_are_refused() {
        let id = TransferId([3; 16]);
        let ended = Ended {
            from: AgentName::new("alice").unwrap(),
            to: AgentName::new("bob").unwrap(),
            size: 5,
            stored_at: 10,
            end: End::Refused(vec![1, 2, 3]),
            at: 20,
        };
        let bytes = ended.encode(&id);
        assert_eq!(Ended::decode(&bytes, &id), Some(ended));
        assert!(Ended::decode(&bytes, &TransferId([4; 16])).is_none());
        assert!(Ended::decode(&bytes[..bytes.len() - 1], &id).is_none());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Ended::decode(&longer, &id).is_none());
        let mut version = bytes;
        version[0] = 2;
        assert!(Ended::decode(&version, &id).is_none());
    }
}
