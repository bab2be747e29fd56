//! A transfer's journal (PROTOCOL.md §7.3): what a receiver holds verified of
//! an interrupted transfer, so that the next attempt resumes from there.
//!
//! It names the transfer's origin (PROTOCOL.md §6.4), the sender and its
//! key, the manifest's hash, the total size, and how many bytes of the data
//! verified and were synced to disk (the prefix's hash is taken from the
//! disk when the transfer resumes). It is MACed under a key that lives in
//! the receiver's home, not in the out dir: whoever can write the out dir
//! but not the home cannot make a journal that is believed. It is written to
//! a temporary name, synced and renamed over the old one, so it is always
//! whole; and only after the data it counts was synced, so it never counts
//! bytes the disk lacks.

use std::time::Duration;

use keyferry_common::crypto::keys::MacKey;
use keyferry_common::crypto::mac;
use keyferry_common::encode::{Decoder, Encoder};
use keyferry_common::identity::Fingerprint;
use keyferry_common::ids::StreamId;
use keyferry_common::name::{AgentName, MAX_NAME_LEN};

/// The journal's format number.
const FORMAT: u16 = 3;
/// The format before it, still read: no hash state, no marks.
const FORMAT_PLAIN: u16 = 2;
/// The format before it, still read: it ends in a SHA-256 state, skipped.
const FORMAT_WITH_STATE: u16 = 1;
/// The MAC's context label.
const LABEL: &str = "keyferry/v2 journal";
/// How long a journal may be resumed from.
pub const MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// A SHA-256 state is never longer than this.
const MAX_STATE: usize = keyferry_common::hashstate::MAX_STATE;
/// Most marks a journal holds (one per 64 MiB checkpoint: 1.5 TiB of data).
pub const MAX_MARKS: usize = 25_000;

/// One transfer's resumable state.
#[derive(Debug, Clone)]
pub struct Journal {
    /// The transfer's origin (PROTOCOL.md §6.4).
    pub origin: StreamId,
    /// Who sends it.
    pub sender: AgentName,
    /// The sender's key.
    pub sender_fp: Fingerprint,
    /// Hash of the manifest (PROTOCOL.md §5.2).
    pub manifest_hash: [u8; 32],
    /// The data's total size.
    pub total: u64,
    /// Bytes of the data verified and synced.
    pub verified: u64,
    /// When the transfer first began, Unix seconds.
    pub created: u64,
    /// The SHA-256 state of the data's first `verified` bytes, for the
    /// stream's hash to run on from without reading them back (none from a
    /// receiver that takes the sender's hash, or from an older journal).
    pub state: Option<Vec<u8>>,
    /// At each checkpoint: an offset and the SHA-256 of the data up to it,
    /// against which the prefix on disk is checked while the rest arrives.
    pub marks: Vec<(u64, [u8; 32])>,
}

/// Why a journal is not believed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JournalError {
    /// Not a journal of this format, or its MAC fails.
    #[error("the journal is damaged or was not written by this receiver")]
    Invalid,
    /// Older than [`MAX_AGE`].
    #[error("the journal is older than 7 days")]
    Expired,
}

impl Journal {
    fn fields(&self) -> Vec<u8> {
        Encoder::default()
            .u16(FORMAT)
            .fixed(&self.origin.0)
            .bytes(self.sender.as_str().as_bytes())
            .fixed(&self.sender_fp.0)
            .fixed(&self.manifest_hash)
            .u64(self.total)
            .u64(self.verified)
            .u64(self.created)
            .bytes(self.state.as_deref().unwrap_or_default())
            .u32(u32::try_from(self.marks.len()).unwrap_or(u32::MAX))
            .fixed(&self.marks_bytes())
            .finish()
    }

    fn marks_bytes(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        for (at, digest) in &self.marks {
            e.u64(*at).fixed(digest);
        }
        e.finish()
    }

    /// The journal's bytes, MACed under `key`.
    pub fn encode(&self, key: &MacKey) -> Vec<u8> {
        let mut out = self.fields();
        let tag = mac::tag(key, &[&Encoder::new(LABEL).finish(), &out]);
        out.extend_from_slice(&tag);
        out
    }

    /// A journal read back: its MAC checked first, then its fields, then its
    /// age against `now` (Unix seconds).
    pub fn decode(bytes: &[u8], key: &MacKey, now: u64) -> Result<Self, JournalError> {
        fn bad<E>(_: E) -> JournalError {
            JournalError::Invalid
        }
        let split = bytes
            .len()
            .checked_sub(mac::TAG_LEN)
            .ok_or(JournalError::Invalid)?;
        let (fields, tag) = bytes.split_at(split);
        mac::verify(key, &[&Encoder::new(LABEL).finish(), fields], tag).map_err(bad)?;
        let mut d = Decoder::new(fields);
        let format = d.u16().map_err(bad)?;
        if ![FORMAT, FORMAT_PLAIN, FORMAT_WITH_STATE].contains(&format) {
            return Err(JournalError::Invalid);
        }
        let origin = StreamId(d.array().map_err(bad)?);
        let name = std::str::from_utf8(d.bytes(MAX_NAME_LEN).map_err(bad)?).map_err(bad)?;
        let sender = AgentName::new(name).map_err(|_| JournalError::Invalid)?;
        let sender_fp = Fingerprint(d.array().map_err(bad)?);
        let manifest_hash = d.array().map_err(bad)?;
        let total = d.u64().map_err(bad)?;
        let verified = d.u64().map_err(bad)?;
        let created = d.u64().map_err(bad)?;
        let (mut state, mut marks) = (None, Vec::new());
        if format == FORMAT_WITH_STATE {
            d.bytes(MAX_STATE).map_err(bad)?;
        }
        if format == FORMAT {
            let s = d.bytes(MAX_STATE).map_err(bad)?;
            state = (!s.is_empty()).then(|| s.to_vec());
            let n = d.u32().map_err(bad)? as usize;
            if n > MAX_MARKS {
                return Err(JournalError::Invalid);
            }
            for _ in 0..n {
                marks.push((d.u64().map_err(bad)?, d.array().map_err(bad)?));
            }
        }
        d.finish().map_err(bad)?;
        let ordered = marks.windows(2).all(|w| w[0].0 < w[1].0);
        if verified > total || !ordered || marks.last().is_some_and(|m| m.0 > verified) {
            return Err(JournalError::Invalid);
        }
        if now.saturating_sub(created) > MAX_AGE.as_secs() || created > now + 300 {
            return Err(JournalError::Expired);
        }
        Ok(Self {
            origin,
            sender,
            sender_fp,
            manifest_hash,
            total,
            verified,
            created,
            state,
            marks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal() -> Journal {
        Journal {
            origin: StreamId([7; 16]),
            sender: AgentName::new("alice").unwrap(),
            sender_fp: Fingerprint([1; 32]),
            manifest_hash: [2; 32],
            total: 1 << 30,
            verified: 100,
            created: 1_800_000_000,
            state: Some(vec![3; 104]),
            marks: vec![(40, [4; 32]), (100, [5; 32])],
        }
    }

    fn same(a: &Journal, b: &Journal) {
        assert_eq!(
            (a.origin, &a.sender, a.sender_fp),
            (b.origin, &b.sender, b.sender_fp)
        );
        assert_eq!(a.manifest_hash, b.manifest_hash);
        assert_eq!(
            (a.total, a.verified, a.created),
            (b.total, b.verified, b.created)
        );
    }

    fn same_marks(a: &Journal, b: &Journal) {
        same(a, b);
        assert_eq!((&a.state, &a.marks), (&b.state, &b.marks));
    }

    /// A format 2 journal's fields (no state, no marks).
    fn plain_fields(j: &Journal) -> Vec<u8> {
        Encoder::default()
            .u16(FORMAT_PLAIN)
            .fixed(&j.origin.0)
            .bytes(j.sender.as_str().as_bytes())
            .fixed(&j.sender_fp.0)
            .fixed(&j.manifest_hash)
            .u64(j.total)
            .u64(j.verified)
            .u64(j.created)
            .finish()
    }

    #[test]
    fn a_journal_round_trips() {
        let key = MacKey::from_bytes([9; 32]);
        let j = journal();
        let bytes = j.encode(&key);
        assert_eq!(bytes[..2], [0, 3]);
        same_marks(&Journal::decode(&bytes, &key, j.created + 60).unwrap(), &j);
        // Marks out of order, or past what verified, are not believed.
        for marks in [vec![(50, [0; 32]), (40, [0; 32])], vec![(101, [0; 32])]] {
            let bad = Journal { marks, ..journal() };
            assert!(Journal::decode(&bad.encode(&key), &key, j.created + 60).is_err());
        }
    }

    #[test]
    fn a_format_1_journal_is_still_read_and_its_hash_state_skipped() {
        // Format 1 as earlier receivers wrote it: the same fields, then a
        // length-prefixed SHA-256 state (104 bytes), then the MAC.
        let key = MacKey::from_bytes([9; 32]);
        let j = journal();
        let mut fields = plain_fields(&j);
        fields[..2].copy_from_slice(&FORMAT_WITH_STATE.to_be_bytes());
        fields.extend_from_slice(&104u32.to_be_bytes());
        fields.extend_from_slice(&[5; 104]);
        let tag = mac::tag(&key, &[&Encoder::new(LABEL).finish(), &fields]);
        let old = [fields.as_slice(), &tag].concat();
        same(&Journal::decode(&old, &key, j.created + 60).unwrap(), &j);
        // A format 2 journal is read, without state or marks.
        let fields = plain_fields(&j);
        let tag = mac::tag(&key, &[&Encoder::new(LABEL).finish(), &fields]);
        let two = Journal::decode(&[fields.as_slice(), &tag].concat(), &key, j.created + 60);
        let two = two.unwrap();
        assert!(two.state.is_none() && two.marks.is_empty());
        // A format 2 journal with a state behind it is not one.
        let mut fields = plain_fields(&j);
        fields.extend_from_slice(&104u32.to_be_bytes());
        fields.extend_from_slice(&[5; 104]);
        let tag = mac::tag(&key, &[&Encoder::new(LABEL).finish(), &fields]);
        let bad = [fields.as_slice(), &tag].concat();
        assert!(Journal::decode(&bad, &key, j.created + 60).is_err());
    }

    #[test]
    fn a_tampered_foreign_or_old_journal_is_not_believed() {
        let key = MacKey::from_bytes([9; 32]);
        let j = journal();
        let bytes = j.encode(&key);
        let now = j.created + 60;
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert_eq!(
                Journal::decode(&b, &key, now).unwrap_err(),
                JournalError::Invalid,
                "byte {i}"
            );
        }
        let other = MacKey::from_bytes([8; 32]);
        assert!(Journal::decode(&bytes, &other, now).is_err());
        assert!(Journal::decode(&bytes[..10], &key, now).is_err());
        let week = MAX_AGE.as_secs();
        assert!(Journal::decode(&bytes, &key, j.created + week).is_ok());
        assert_eq!(
            Journal::decode(&bytes, &key, j.created + week + 1).unwrap_err(),
            JournalError::Expired
        );
        // More verified than the total: refused even with a valid MAC.
        let over = Journal {
            verified: j.total + 1,
            ..journal()
        };
        assert!(Journal::decode(&over.encode(&key), &key, now).is_err());
    }
}
