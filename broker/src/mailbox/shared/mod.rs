//! The mailbox of a cluster (`broker --cluster`), kept in NATS JetStream so
//! that a transfer stored through one broker is delivered by whichever broker
//! its receiver connects to, also after the first one died (PROTOCOL.md
//! §2.6). It keeps the standalone [`super::Mailbox`]'s rules — limits checked
//! before a byte moves, nothing partial ever offered, an end recorded before
//! the data goes — and its record formats ([`super::format`]); only where the
//! records live differs:
//!
//! ```text
//! object store keyferry-stored     <hex id>: the sealed frames as uploaded
//! key-value    keyferry-mailbox    w.<hex to>.<hex id>    a waiting transfer's metadata
//!                                  e.<hex from>.<hex id>  an ended transfer's record
//!                                  d.<hex id>             "being delivered by broker B"
//!                                  p.<hex to>             a receiver's prekey bundles
//! ```
//!
//! A transfer's `w.` key is written (`create`) only once its object is whole:
//! that is the commit point, and an object without it is never offered (the
//! object store's maximum age removes what a crash left). An end `create`s its
//! `e.` key first — the one atomic step that decides which broker ends it —
//! then removes the `w.` key and the object. Prekeys change by
//! revision-checked updates, so a one-time bundle goes to one sender however
//! many brokers fetch at once.
//!
//! Every call is bounded ([`crate::cluster::OP_TIMEOUT`] per operation);
//! a cluster that does not answer is a [`MailboxError::Shared`], never a
//! hang. The NATS client is a handle on its connection task: no socket is
//! held here.

mod delivery;
mod marker;
mod prekeys;
mod upload;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, ReplayPolicy, push};
use async_nats::jetstream::kv;
use async_nats::jetstream::object_store::{self, ObjectStore};
use async_nats::jetstream::{self, stream::StorageType};
use bytes::Bytes;
use futures_util::StreamExt as _;
use keyferry_common::ids::TransferId;
use keyferry_common::name::AgentName;

use super::Reserved;
use super::error::MailboxError;
use super::limits::MailboxLimits;
use super::prekeys::FetchRate;
use crate::cluster::bounded;

pub use delivery::SharedDelivery;
pub use upload::SharedUpload;

/// The key-value bucket of metadata, receipts, markers and prekeys.
pub const MAILBOX_BUCKET: &str = "keyferry-mailbox";
/// The object store of stored transfers' data.
pub const OBJECTS_BUCKET: &str = "keyferry-stored";
/// Its stream.
const OBJECTS_STREAM: &str = "OBJ_keyferry-stored";
/// Where a broker says it stored a transfer (payload: the receiver's name),
/// so that the broker holding that receiver offers it at once.
pub const STORED_SUBJECT: &str = "keyferry.mailbox.stored";
/// How long a scan of the bucket may take.
const SCAN_TIMEOUT: Duration = Duration::from_secs(5);
/// Tries of a revision-checked change before it counts as contended.
const TRIES: usize = 16;

/// One entry read by [`SharedMailbox::scan`].
#[derive(Debug)]
struct Scanned {
    /// The key, without the bucket's prefix.
    key: String,
    value: Bytes,
}

/// What this broker alone keeps.
#[derive(Debug, Default)]
struct Local {
    /// Uploads in progress through this broker, counted against the limits.
    reserved: HashMap<TransferId, Reserved>,
    fetches: FetchRate,
    last_order: u64,
}

/// The cluster's mailbox. Share it as an `Arc<SharedMailbox>`.
pub struct SharedMailbox {
    client: async_nats::Client,
    kv: kv::Store,
    objects: ObjectStore,
    limits: MailboxLimits,
    /// This broker's id, written in the delivery markers it holds.
    broker: String,
    /// Where uploads wait until they are whole.
    staging: PathBuf,
    local: Mutex<Local>,
}

impl std::fmt::Debug for SharedMailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedMailbox")
            .field("broker", &self.broker)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

fn shared(what: &str, e: impl std::fmt::Display) -> MailboxError {
    MailboxError::Shared(format!("{what}: {e}"))
}

/// Runs a cluster call for at most the operation timeout.
async fn op<T, E: std::fmt::Display>(
    what: &str,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, MailboxError> {
    bounded(what, fut)
        .await
        .map_err(|e| MailboxError::Shared(e.to_string()))
}

fn hex_name(name: &AgentName) -> String {
    hex::encode(name.as_str())
}

fn hex_id(id: &TransferId) -> String {
    hex::encode(id.0)
}

/// The transfer id that ends `key` (`….<hex id>`), if it is one.
fn id_in(key: &str) -> Option<TransferId> {
    let last = key.rsplit('.').next()?;
    let mut id = [0; 16];
    hex::decode_to_slice(last, &mut id).ok()?;
    (hex::encode(id) == last).then_some(TransferId(id))
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl SharedMailbox {
    /// Opens the cluster's mailbox buckets on `client`, creating them if
    /// missing (file storage, one replica; an operator may create them
    /// beforehand with more). The object store's maximum age is the
    /// mailbox's plus a day, so that what a crash left half written goes too.
    ///
    /// Uploads are staged in `staging` (made 0700; whatever an earlier run
    /// left there is removed) and reach the cluster only once whole.
    pub async fn open(
        client: async_nats::Client,
        js: &jetstream::Context,
        (broker, staging): (String, PathBuf),
        limits: MailboxLimits,
    ) -> Result<Self, MailboxError> {
        upload::clear_staging(&staging)?;
        let kv = crate::cluster::bucket(
            js,
            kv::Config {
                bucket: MAILBOX_BUCKET.into(),
                description: "keyferry: stored transfers' metadata, receipts and prekeys".into(),
                history: 1,
                storage: StorageType::File,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| MailboxError::Shared(e.to_string()))?;
        let objects = match js.get_object_store(OBJECTS_BUCKET).await {
            Ok(store) => store,
            Err(_) => {
                let config = object_store::Config {
                    bucket: OBJECTS_BUCKET.into(),
                    description: Some("keyferry: stored transfers' sealed data".into()),
                    max_age: limits.max_age + Duration::from_secs(24 * 3600),
                    storage: StorageType::File,
                    num_replicas: 1,
                    ..Default::default()
                };
                op("creating the object store", js.create_object_store(config)).await?
            }
        };
        // One made by someone else must keep objects as long as their records.
        let stream = op("reading the object store", js.get_stream(OBJECTS_STREAM)).await?;
        let max_age = stream.cached_info().config.max_age;
        if !max_age.is_zero() && max_age < limits.max_age {
            tracing::warn!(
                max_age_secs = max_age.as_secs(),
                mailbox_max_age_secs = limits.max_age.as_secs(),
                "the object store keeps objects for less time than the mailbox keeps transfers: \
                 some would vanish before they expire"
            );
        }
        Ok(Self {
            client,
            kv,
            objects,
            limits,
            broker,
            staging,
            local: Mutex::new(Local::default()),
        })
    }

    /// Its limits.
    pub fn limits(&self) -> &MailboxLimits {
        &self.limits
    }

    /// The names of receivers something was just stored for, through any
    /// broker of the cluster (see [`STORED_SUBJECT`]).
    pub async fn stored_news(&self) -> Result<async_nats::Subscriber, MailboxError> {
        op("subscribing", self.client.subscribe(STORED_SUBJECT)).await
    }

    /// The last entry of every key matching `filter` (a subject pattern
    /// below the bucket, e.g. `w.>`), deleted ones left out.
    async fn scan(&self, filter: &str) -> Result<Vec<Scanned>, MailboxError> {
        let prefix = self.kv.prefix.as_str();
        let config = push::OrderedConfig {
            deliver_subject: self.client.new_inbox(),
            filter_subject: format!("{prefix}{filter}"),
            deliver_policy: DeliverPolicy::LastPerSubject,
            replay_policy: ReplayPolicy::Instant,
            ..Default::default()
        };
        let consumer = op(
            "listing the mailbox",
            self.kv.stream.create_consumer(config),
        )
        .await?;
        let mut out = Vec::new();
        if consumer.cached_info().num_pending == 0 {
            return Ok(out);
        }
        let mut messages = op("listing the mailbox", consumer.messages()).await?;
        // Whole or an error: a partial list would skip limits and duplicates.
        let read = async {
            while let Some(Ok(m)) = messages.next().await {
                let Ok(info) = m.info() else { return false };
                let pending = info.pending;
                // A deleted or purged key leaves an empty marker; no record
                // of ours is empty.
                if let Some(key) = m.subject.strip_prefix(prefix)
                    && !m.payload.is_empty()
                {
                    out.push(Scanned {
                        key: key.to_owned(),
                        value: m.payload.clone(),
                    });
                }
                if pending == 0 {
                    return true;
                }
            }
            false
        };
        match tokio::time::timeout(SCAN_TIMEOUT, read).await {
            Ok(true) => Ok(out),
            Ok(false) => Err(MailboxError::Shared(
                "listing the mailbox: the listing broke off".into(),
            )),
            Err(_) => Err(MailboxError::Shared(
                "listing the mailbox: timed out".into(),
            )),
        }
    }

    /// The live entry of `key`, if there is one.
    async fn entry(&self, key: &str) -> Result<Option<kv::Entry>, MailboxError> {
        let entry = op("reading the mailbox", self.kv.entry(key)).await?;
        Ok(entry.filter(|e| e.operation == kv::Operation::Put && !e.value.is_empty()))
    }

    /// Writes `value` under `key` unless it exists: `false` if another
    /// value was there. A write whose answer was lost but which landed is
    /// recognised by its value (every record written this way is unique:
    /// it names its transfer, and its time).
    async fn create(&self, key: &str, value: Vec<u8>) -> Result<bool, MailboxError> {
        let written = bounded(
            "writing the mailbox",
            self.kv.create(key, value.clone().into()),
        );
        match written.await {
            Ok(_) => Ok(true),
            Err(e) => match self.entry(key).await? {
                Some(there) => Ok(there.value == value),
                None => Err(MailboxError::Shared(e.to_string())),
            },
        }
    }

    /// Removes `key` and its history from the bucket's stream, leaving no
    /// marker (a KV purge would leave one per key, for ever, in every scan).
    async fn purge(&self, key: &str) -> Result<(), MailboxError> {
        let subject = format!("{}{key}", self.kv.prefix);
        let purge = async { self.kv.stream.purge().filter(subject).await };
        op("removing from the mailbox", purge).await.map(drop)
    }
}

fn count_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
