//! A data connection opened before its ticket (PROTOCOL.md §2.5): the TCP
//! handshake with the broker runs while the offer or the accept travels, so
//! the stream starts one round trip to the broker sooner once the tickets
//! come (the broker relays once both sides are there: both open early).
//! Unused after [`KEEP`] it is closed (the broker waits at most 10 s for a
//! connection's first frame); a side that finds it gone, or goes elsewhere,
//! connects anew. A sender's opens its further lanes too, as soon as the
//! first connected ([`crate::relay_lanes`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::relay_lanes::{Lanes, Opened, connect};
use keyferry_common::io::task::AbortOnDrop;
use keyferry_common::sync::lock;

/// How long an opened connection waits for its upload.
const KEEP: Duration = Duration::from_secs(8);

/// The connection being opened, or open and waiting.
#[derive(Debug)]
pub struct Early {
    slot: Arc<Mutex<Option<Opened>>>,
    _task: AbortOnDrop,
}

impl Early {
    /// Starts connecting to `broker` (`HOST:PORT`), with as many
    /// connections as `lanes` asks for.
    pub fn open(broker: String, lanes: Lanes) -> Self {
        let slot: Arc<Mutex<Option<Opened>>> = Arc::default();
        let held = Arc::clone(&slot);
        let task = tokio::spawn(async move {
            // Counted from the start: the broker's wait for a first frame
            // runs from the first connection's accept.
            let began = tokio::time::Instant::now();
            let Ok(opened) = connect(&broker, lanes).await else {
                return;
            };
            *lock(&held) = Some(opened);
            tokio::time::sleep_until(began + KEEP).await;
            // Closed if nobody took it.
            drop(lock(&held).take());
        });
        Self {
            slot,
            _task: AbortOnDrop(task),
        }
    }

    /// The open connection, if it is there (and then only once).
    pub fn take(&self) -> Option<Opened> {
        lock(&self.slot).take()
    }
}
