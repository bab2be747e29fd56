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
mod upload;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{DeliverPolicy, ReplayPolicy, push};
use async_nats::jetstream::kv::{self, CreateErrorKind, UpdateErrorKind};
use async_nats::jetstream::object_store::{self, ObjectStore};
use async_nats::jetstream::{self, stream::StorageType};
use bytes::Bytes;
use futures_util::StreamExt as _;
use keyferry_common::ids::TransferId;
use keyferry_common::name::AgentName;
use keyferry_common::sync::lock;

use super::Reserved;
use super::error::{MailboxError, TakeError};
use super::format::Bundles;
use super::limits::MailboxLimits;
use super::prekeys::FetchRate;
use super::types::Prekey;
use crate::cluster::bounded;

pub use delivery::SharedDelivery;
pub use upload::SharedUpload;

/// The key-value bucket of metadata, receipts, markers and prekeys.
pub const MAILBOX_BUCKET: &str = "keyferry-mailbox";
/// The object store of stored transfers' data.
pub const OBJECTS_BUCKET: &str = "keyferry-stored";
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
    pub async fn open(
        client: async_nats::Client,
        js: &jetstream::Context,
        broker: String,
        limits: MailboxLimits,
    ) -> Result<Self, MailboxError> {
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
        Ok(Self {
            client,
            kv,
            objects,
            limits,
            broker,
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
        let read = async {
            while let Some(Ok(m)) = messages.next().await {
                let Ok(info) = m.info() else { break };
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
                    break;
                }
            }
        };
        tokio::time::timeout(SCAN_TIMEOUT, read)
            .await
            .map_err(|_| MailboxError::Shared("listing the mailbox: timed out".into()))?;
        Ok(out)
    }

    /// The live entry of `key`, if there is one.
    async fn entry(&self, key: &str) -> Result<Option<kv::Entry>, MailboxError> {
        let entry = op("reading the mailbox", self.kv.entry(key)).await?;
        Ok(entry.filter(|e| e.operation == kv::Operation::Put && !e.value.is_empty()))
    }

    /// Writes `value` under `key` unless it exists: `false` if it did.
    async fn create(&self, key: &str, value: Vec<u8>) -> Result<bool, MailboxError> {
        match bounded("writing the mailbox", self.kv.create(key, value.into())).await {
            Ok(_) => Ok(true),
            Err(e) => {
                // `bounded` flattened the kind: ask again what is there.
                if self.entry(key).await?.is_some() {
                    Ok(false)
                } else {
                    Err(MailboxError::Shared(e.to_string()))
                }
            }
        }
    }

    /// Removes `key` and its history (no delete marker is kept).
    async fn purge(&self, key: &str) -> Result<(), MailboxError> {
        op("removing from the mailbox", self.kv.purge(key)).await
    }

    /// Applies `change` to `receiver`'s bundles as the cluster holds them,
    /// written back only if it changed them and only over the revision it
    /// read (read again on a lost race). Returns `change`'s result and the
    /// bundles now held.
    async fn change_prekeys<T>(
        &self,
        receiver: &AgentName,
        change: impl Fn(&mut Bundles) -> Result<T, MailboxError>,
    ) -> Result<(T, Bundles), MailboxError> {
        let key = format!("p.{}", hex_name(receiver));
        for _ in 0..TRIES {
            let entry = op("reading prekeys", self.kv.entry(key.as_str())).await?;
            let live = entry
                .as_ref()
                .filter(|e| e.operation == kv::Operation::Put && !e.value.is_empty());
            let held = match live {
                Some(e) => Bundles::decode(&e.value).unwrap_or_else(|| {
                    tracing::warn!(agent = %receiver, "mailbox: corrupt prekeys in the cluster dropped");
                    Bundles::default()
                }),
                None => Bundles::default(),
            };
            let mut next = held.clone();
            let out = change(&mut next)?;
            if next == held {
                return Ok((out, next));
            }
            let value = Bytes::from(next.encode());
            let written = match &entry {
                Some(e) => match self.kv.update(key.as_str(), value, e.revision).await {
                    Ok(_) => Ok(()),
                    Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => continue,
                    Err(e) => Err(shared("writing prekeys", e)),
                },
                None => match self.kv.create(key.as_str(), value).await {
                    Ok(_) => Ok(()),
                    Err(e) if e.kind() == CreateErrorKind::AlreadyExists => continue,
                    Err(e) => Err(shared("writing prekeys", e)),
                },
            };
            return written.map(|()| (out, next));
        }
        Err(MailboxError::Shared(format!(
            "{receiver}'s prekeys kept changing under this broker"
        )))
    }

    /// Adds `receiver`'s bundles, as [`super::Mailbox::put_prekeys`].
    pub async fn put_prekeys(
        &self,
        receiver: &AgentName,
        one_time: Vec<Vec<u8>>,
        last_resort: Option<Vec<u8>>,
    ) -> Result<u32, MailboxError> {
        let (_, held) = self
            .change_prekeys(receiver, |b| b.add(one_time.clone(), last_resort.clone()))
            .await?;
        Ok(count_u32(held.one_time.len()))
    }

    /// `receiver`'s bundles as held now (none if the cluster cannot say).
    async fn bundles(&self, receiver: &AgentName) -> Bundles {
        let key = format!("p.{}", hex_name(receiver));
        match self.entry(&key).await {
            Ok(Some(e)) => Bundles::decode(&e.value).unwrap_or_default(),
            Ok(None) => Bundles::default(),
            Err(e) => {
                tracing::warn!(agent = %receiver, error = %e, "mailbox: prekeys unreadable");
                Bundles::default()
            }
        }
    }

    /// One-time bundles held for `receiver`.
    pub async fn prekey_count(&self, receiver: &AgentName) -> u32 {
        count_u32(self.bundles(receiver).await.one_time.len())
    }

    /// `receiver`'s last-resort bundle, if it deposited one.
    pub async fn last_resort(&self, receiver: &AgentName) -> Option<Vec<u8>> {
        self.bundles(receiver).await.last_resort
    }

    /// A bundle of `receiver`'s for `sender`, as
    /// [`super::Mailbox::take_prekey`]; the fetch rate is counted by this
    /// broker (a sender fetching through several brokers gets each one's).
    pub async fn take_prekey(
        &self,
        sender: &AgentName,
        receiver: &AgentName,
        now: Instant,
    ) -> Result<Option<Prekey>, TakeError> {
        let per_minute = self.limits.fetches_per_minute;
        lock(&self.local).fetches.charge(sender, now, per_minute)?;
        let (taken, _) = self
            .change_prekeys(receiver, |b| Ok(b.take()))
            .await
            .map_err(TakeError::Storage)?;
        Ok(taken)
    }

    /// Keeps those of `receiver`'s one-time bundles for which `keep` holds.
    pub async fn retain_prekeys(
        &self,
        receiver: &AgentName,
        keep: impl Fn(&[u8]) -> bool,
    ) -> Result<u32, MailboxError> {
        let (_, held) = self
            .change_prekeys(receiver, |b| {
                b.one_time.retain(|x| keep(x));
                Ok(())
            })
            .await?;
        Ok(count_u32(held.one_time.len()))
    }
}

fn count_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
