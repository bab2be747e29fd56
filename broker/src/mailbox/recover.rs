//! Loading the mailbox at open: what survived is indexed, what a crash left
//! half done is removed.
//!
//! The rules, per transfer id:
//!
//! * `.part` and `.tmp-*` files are removed: nothing was committed.
//! * A receipt record means the transfer ended; if its data or metadata are
//!   still there, the removal that followed the receipt is finished.
//! * Data and metadata both present, the metadata well formed, of that id,
//!   and its length that of the data file: the transfer is waiting.
//! * Anything else (one of the two alone, a corrupt or oversized record, a
//!   length that disagrees) is removed, with a warning if it was corrupt.
//!
//! Removal failures are logged and left for the next open: a file that is
//! not indexed is never offered.

use std::collections::{HashMap, HashSet};
use std::fs;

use keyferry_common::ids::TransferId;

use super::disk::{self, Layout, TMP_PREFIX};
use super::error::MailboxError;
use super::format::{Ended, MAX_RECORD, MetaFile};
use super::{Stored, StoredMeta};

type Loaded = (HashMap<TransferId, Stored>, HashMap<TransferId, Ended>);

/// Indexes `layout`'s waiting transfers and receipt records.
pub(super) fn load(layout: &Layout) -> Result<Loaded, MailboxError> {
    let ended = load_receipts(layout)?;
    let mut metas = HashSet::new();
    let mut datas = HashSet::new();
    for name in disk::list(&layout.objects)? {
        let path = layout.objects.join(&name);
        let parsed = name
            .split_once('.')
            .and_then(|(id, ext)| Some((disk::parse_id(id)?, ext)));
        match parsed {
            _ if name.starts_with(TMP_PREFIX) => disk::remove_or_warn(&path),
            Some((_, "part")) => disk::remove_or_warn(&path),
            Some((id, "meta")) => {
                metas.insert(id);
            }
            Some((id, "data")) => {
                datas.insert(id);
            }
            _ => {
                tracing::warn!(path = %path.display(), "mailbox: a file not of ours is left alone")
            }
        }
    }
    let mut stored = HashMap::new();
    for id in metas.union(&datas) {
        let whole = metas.contains(id) && datas.contains(id);
        let loaded = if ended.contains_key(id) || !whole {
            None
        } else {
            load_object(layout, id)
        };
        match loaded {
            Some((meta, len)) => {
                stored.insert(
                    *id,
                    Stored {
                        meta,
                        len,
                        delivery: None,
                    },
                );
            }
            None => {
                // The data file first: it is what makes an object whole.
                disk::remove_or_warn(&layout.data(id));
                disk::remove_or_warn(&layout.meta(id));
            }
        }
    }
    Ok((stored, ended))
}

/// The metadata of a whole object, if it is well formed and agrees with
/// its data file.
fn load_object(layout: &Layout, id: &TransferId) -> Option<(StoredMeta, u64)> {
    let path = layout.meta(id);
    let loaded = match disk::read_bounded(&path, MAX_RECORD) {
        Ok(Some(bytes)) => MetaFile::decode(&bytes, id),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(error = %e, "mailbox: stored transfer dropped");
            return None;
        }
    };
    let data_len = fs::metadata(layout.data(id)).map(|m| m.len()).ok();
    match loaded {
        Some((meta, len)) if data_len == Some(len) => Some((meta, len)),
        _ => {
            tracing::warn!(transfer = %id, "mailbox: corrupt stored transfer dropped");
            None
        }
    }
}

fn load_receipts(layout: &Layout) -> Result<HashMap<TransferId, Ended>, MailboxError> {
    let mut ended = HashMap::new();
    for name in disk::list(&layout.receipts)? {
        let path = layout.receipts.join(&name);
        if name.starts_with(TMP_PREFIX) {
            disk::remove_or_warn(&path);
            continue;
        }
        let Some(id) = disk::parse_id(&name) else {
            tracing::warn!(path = %path.display(), "mailbox: a file not of ours is left alone");
            continue;
        };
        let record = match disk::read_bounded(&path, MAX_RECORD) {
            Ok(bytes) => bytes.and_then(|b| Ended::decode(&b, &id)),
            Err(e) => {
                tracing::warn!(error = %e, "mailbox: receipt record unreadable");
                None
            }
        };
        match record {
            Some(record) => {
                ended.insert(id, record);
            }
            None => {
                tracing::warn!(transfer = %id, "mailbox: corrupt receipt record dropped");
                disk::remove_or_warn(&path);
            }
        }
    }
    Ok(ended)
}
