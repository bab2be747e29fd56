//! Concurrent transfers per sender across the cluster (`keyferry-sending`):
//! every broker keeps one key per stream it holds an offer slot for —
//! `<hex name>.<broker id>.<hex stream id>` — written when the slot is
//! taken, deleted when the last slot of that stream is let go, rewritten by
//! every heartbeat, and expiring with the bucket's max age, so a broker that
//! died takes its counts with it within a minute. The sender's broker counts
//! a name's keys before it lets a new stream start (PROTOCOL.md §2.6).
//!
//! Two offers of new streams by one name at the same moment through two
//! brokers may both see room: the limit can be passed by one stream per
//! broker for an instant, never more.

use async_nats::jetstream::consumer::{DeliverPolicy, ReplayPolicy, push};
use futures_util::StreamExt as _;
use keyferry_common::ids::StreamId;
use keyferry_common::name::AgentName;

use super::names::key;
use super::{Cluster, ClusterError, OP_TIMEOUT};

/// Most streams counted (far above any sane limit; bounds the memory).
const MOST: usize = 4096;

impl Cluster {
    /// The key of `name`'s stream `sid` held by this broker.
    fn sending_key(&self, name: &AgentName, sid: StreamId) -> String {
        format!("{}.{}.{sid}", key(name), self.member.id)
    }

    /// How many streams `name` has in flight through the brokers of the
    /// cluster, other than `sid` (a stream is counted once, however many
    /// brokers hold it: a routed transfer is held by both).
    pub async fn streams_sending(
        &self,
        name: &AgentName,
        sid: StreamId,
    ) -> Result<usize, ClusterError> {
        let prefix = format!("{}{}.", self.sending.prefix, key(name));
        let this = sid.to_string();
        let config = push::OrderedConfig {
            deliver_subject: self.client.new_inbox(),
            filter_subject: format!("{prefix}>"),
            deliver_policy: DeliverPolicy::LastPerSubject,
            replay_policy: ReplayPolicy::Instant,
            ..Default::default()
        };
        let consumer = self
            .op(
                "counting a sender's streams",
                self.sending.stream.create_consumer(config),
            )
            .await?;
        if consumer.cached_info().num_pending == 0 {
            return Ok(0);
        }
        let mut messages = self
            .op("counting a sender's streams", consumer.messages())
            .await?;
        let mut streams = std::collections::HashSet::new();
        let read = async {
            while let Some(Ok(m)) = messages.next().await {
                let pending = m.info().map(|i| i.pending).unwrap_or(0);
                // A deleted key leaves an empty marker.
                let stream = m.subject.as_str().rsplit('.').next().unwrap_or_default();
                if !m.payload.is_empty() && stream != this && streams.len() < MOST {
                    streams.insert(stream.to_owned());
                }
                if pending == 0 {
                    break;
                }
            }
        };
        tokio::time::timeout(OP_TIMEOUT, read).await.map_err(|_| {
            ClusterError::Unreachable("counting a sender's streams: timed out".into())
        })?;
        Ok(streams.len())
    }

    /// Writes (or refreshes) the key of `name`'s stream `sid` on this broker.
    pub async fn sending_put(&self, name: &AgentName, sid: StreamId) -> Result<(), ClusterError> {
        let k = self.sending_key(name, sid);
        self.op("counting a stream", self.sending.put(k, "1".into()))
            .await
            .map(|_| ())
    }

    /// Deletes the key of `name`'s stream `sid` on this broker.
    pub async fn sending_delete(&self, name: &AgentName, sid: StreamId) {
        let k = self.sending_key(name, sid);
        let _ = self.op("ending a stream", self.sending.delete(k)).await;
    }
}
