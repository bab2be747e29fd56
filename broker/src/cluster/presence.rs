//! Presence in the cluster (`keyferry-presence`): which broker holds which
//! receiver, and how busy it is. Each entry is refreshed by its broker's
//! heartbeat and expires [`PRESENCE_TTL`] after the last one, so a killed
//! broker's receivers vanish by themselves.
//!
//! Every write is fenced by revision: a broker updates an entry only at the
//! revision it last wrote. A receiver that moves to another broker is taken
//! over by a revision-checked update, after its old broker said it no longer
//! holds it (or did not answer at all); the old broker's next refresh then
//! fails on the revision, it claims the entry again, and if the new broker
//! says it holds the receiver, it drops its own stale connection.
//!
//! A broker's writes are serialised (claim, release and a whole heartbeat
//! pass), so a receiver that leaves during a heartbeat is released after it,
//! at the revision the heartbeat wrote: no entry outlives its receiver.

use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, ReplayPolicy, push};
use async_nats::jetstream::kv::{CreateErrorKind, Operation, UpdateErrorKind};
use futures_util::StreamExt as _;
use keyferry_common::name::AgentName;
use keyferry_common::sync::lock;

use super::names::key;
use super::wire::{Presence, decode, encode};
use super::{Cluster, ClusterError, PRESENCE_TTL, check_id};

/// How long a broker waits for another to say whether it holds a receiver.
const HOLDS_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a read of every receiver serves the lists that follow.
const LIST_CACHE: Duration = Duration::from_secs(1);

/// The answer of a broker asked whether it holds a receiver.
pub const HOLDS_YES: &[u8] = b"yes";

/// The outcome of claiming a receiver's presence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This broker holds it now.
    Claimed,
    /// Another broker, which says so, holds a receiver of that name.
    HeldBy(String),
}

impl Cluster {
    fn presence_value(&self, incoming: u32) -> bytes::Bytes {
        encode(&Presence {
            broker: self.member.id.clone(),
            address: self.member.advertise.clone(),
            incoming,
        })
        .into()
    }

    /// Writes `value` under `k` only if the entry is as this broker last saw
    /// it: absent (`expect` none: a create) or at revision `expect` (an
    /// update). `None` when another write came first; an error when the
    /// cluster did not answer.
    async fn write_if(
        &self,
        what: &str,
        k: &str,
        value: bytes::Bytes,
        expect: Option<u64>,
    ) -> Result<Option<u64>, ClusterError> {
        match expect {
            None => {
                self.op(what, async {
                    match self.presence.create(k, value).await {
                        Ok(rev) => Ok(Some(rev)),
                        Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Ok(None),
                        Err(e) => Err(e),
                    }
                })
                .await
            }
            Some(rev) => {
                self.op(what, async {
                    match self.presence.update(k, value, rev).await {
                        Ok(rev) => Ok(Some(rev)),
                        Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => Ok(None),
                        Err(e) => Err(e),
                    }
                })
                .await
            }
        }
    }

    /// The live presence entry of `name`, with its revision.
    async fn presence_entry(
        &self,
        name: &AgentName,
    ) -> Result<Option<(Presence, u64)>, ClusterError> {
        let entry = self
            .op("reading presence", self.presence.entry(key(name)))
            .await?;
        Ok(entry
            .filter(|e| e.operation == Operation::Put)
            .and_then(|e| decode::<Presence>(&e.value).map(|p| (p, e.revision))))
    }

    /// Where the receiver `name` is connected, if anywhere in the cluster.
    pub async fn locate(&self, name: &AgentName) -> Result<Option<Presence>, ClusterError> {
        Ok(self.presence_entry(name).await?.map(|(p, _)| p))
    }

    /// Asks broker `id` whether it still holds a receiver of `name`; a
    /// broker that does not answer holds nothing.
    async fn holds(&self, id: &str, name: &AgentName) -> bool {
        let request = async_nats::Request::new()
            .payload(name.as_str().to_owned().into_bytes().into())
            .timeout(Some(HOLDS_TIMEOUT));
        match self
            .client
            .send_request(Self::subject(id, "holds"), request)
            .await
        {
            Ok(reply) => reply.payload.as_ref() == HOLDS_YES,
            Err(_) => false,
        }
    }

    /// Claims the presence of the receiver `name` for this broker, unless a
    /// live broker holds one of that name.
    pub async fn claim(&self, name: &AgentName, incoming: u32) -> Result<Claim, ClusterError> {
        let _writing = self.writes.lock().await;
        self.claim_locked(name, incoming).await
    }

    async fn claim_locked(&self, name: &AgentName, incoming: u32) -> Result<Claim, ClusterError> {
        let k = key(name);
        for _ in 0..3 {
            let value = self.presence_value(incoming);
            let written = match self.presence_entry(name).await? {
                None => self.write_if("claiming presence", &k, value, None).await?,
                Some((p, rev)) => {
                    // An entry naming no valid broker is taken over like a stale one.
                    let other = p.broker != self.member.id && check_id(&p.broker).is_ok();
                    if other && self.holds(&p.broker, name).await {
                        return Ok(Claim::HeldBy(p.broker));
                    }
                    self.write_if("taking over presence", &k, value, Some(rev))
                        .await?
                }
            };
            let Some(written) = written else {
                continue;
            };
            lock(&self.held).insert(name.clone(), written);
            return Ok(Claim::Claimed);
        }
        Err(ClusterError::Contended(format!(
            "the presence of {name} keeps changing under this broker"
        )))
    }

    /// Gives up the presence of `name` (its receiver left this broker), if
    /// this broker still holds it.
    pub async fn release(&self, name: &AgentName) {
        let _writing = self.writes.lock().await;
        let Some(rev) = lock(&self.held).remove(name) else {
            return;
        };
        let _ = self
            .op(
                "releasing presence",
                self.presence.delete_expect_revision(key(name), Some(rev)),
            )
            .await;
    }

    /// One heartbeat pass over the receivers connected here (`local`, read
    /// once the pass may write): refreshes the entries this broker holds and
    /// claims the others (receivers that came while the cluster was away, or
    /// whose entry expired or was taken over). A receiver that left is not
    /// in `local`; its [`Self::release`] waits for the pass and deletes the
    /// entry at the revision the pass wrote. Returns the names another live
    /// broker holds, with its id: this broker must let them go. Stops at the
    /// first failure to reach the cluster (the next heartbeat tries again).
    pub async fn refresh(
        &self,
        local: impl FnOnce() -> Vec<AgentName>,
        incoming: impl Fn(&AgentName) -> u32,
    ) -> Result<Vec<(AgentName, String)>, ClusterError> {
        let _writing = self.writes.lock().await;
        let local = local();
        let mut lost = Vec::new();
        for name in local {
            let held = lock(&self.held).get(&name).copied();
            if let Some(rev) = held {
                let value = self.presence_value(incoming(&name));
                let updated = self
                    .write_if("refreshing presence", &key(&name), value, Some(rev))
                    .await?;
                if let Some(rev) = updated {
                    lock(&self.held).insert(name, rev);
                    continue;
                }
                // Expired while the cluster was away, or taken over.
                lock(&self.held).remove(&name);
            }
            match self.claim_locked(&name, incoming(&name)).await {
                Ok(Claim::Claimed) => {}
                Ok(Claim::HeldBy(holder)) => lost.push((name, holder)),
                Err(ClusterError::Contended(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(lost)
    }

    /// Every receiver connected anywhere in the cluster, by name; read at
    /// most once a second (each read is a JetStream consumer), else the
    /// last read.
    pub async fn receivers(&self) -> Result<Vec<(AgentName, Presence)>, ClusterError> {
        if let Some((at, list)) = &*lock(&self.listed)
            && at.elapsed() < LIST_CACHE
        {
            return Ok(list.clone());
        }
        let list = self.read_receivers().await?;
        *lock(&self.listed) = Some((std::time::Instant::now(), list.clone()));
        Ok(list)
    }

    async fn read_receivers(&self) -> Result<Vec<(AgentName, Presence)>, ClusterError> {
        let config = push::OrderedConfig {
            deliver_subject: self.client.new_inbox(),
            filter_subject: format!("{}>", self.presence.prefix),
            deliver_policy: DeliverPolicy::LastPerSubject,
            replay_policy: ReplayPolicy::Instant,
            ..Default::default()
        };
        let consumer = self
            .op(
                "listing presence",
                self.presence.stream.create_consumer(config),
            )
            .await?;
        let mut out = Vec::new();
        if consumer.cached_info().num_pending == 0 {
            return Ok(out);
        }
        let mut messages = self.op("listing presence", consumer.messages()).await?;
        let read = async {
            while let Some(Ok(m)) = messages.next().await {
                let pending = m.info().map(|i| i.pending).unwrap_or(0);
                let name = m
                    .subject
                    .strip_prefix(self.presence.prefix.as_str())
                    .and_then(|k| hex::decode(k).ok())
                    .and_then(|b| String::from_utf8(b).ok())
                    .and_then(|s| AgentName::new(&s).ok());
                if let (Some(name), Some(p)) = (name, decode::<Presence>(&m.payload)) {
                    out.push((name, p));
                }
                if pending == 0 {
                    break;
                }
            }
        };
        tokio::time::timeout(PRESENCE_TTL.min(Duration::from_secs(5)), read)
            .await
            .map_err(|_| ClusterError::Unreachable("listing presence: timed out".into()))?;
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}
