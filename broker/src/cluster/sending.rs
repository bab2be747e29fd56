//! Concurrent transfers per sender across the cluster (`keyferry-sending`):
//! every broker keeps one key per stream it holds an offer slot for —
//! `<hex name>.<broker id>.<hex stream id>` — written when the slot is
//! taken, purged when the last slot of that stream is let go, rewritten by
//! every heartbeat, and expiring with the bucket's max age, so a broker that
//! died takes its counts with it within a minute. The sender's broker counts
//! a name's keys before it lets a new stream start (PROTOCOL.md §2.6).
//!
//! Two offers of new streams by one name at the same moment through two
//! brokers may both see room: the limit can be passed by one stream per
//! broker for an instant, never more.

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
    /// brokers hold it: a routed transfer is held by both). Read from the
    /// bucket's stream as the subjects that hold a message: a key ended by
    /// [`Self::sending_delete`] is purged, leaving none.
    pub async fn streams_sending(
        &self,
        name: &AgentName,
        sid: StreamId,
    ) -> Result<usize, ClusterError> {
        let filter = format!("{}{}.>", self.sending.prefix, key(name));
        let this = sid.to_string();
        let what = "counting a sender's streams";
        let mut subjects = self
            .op(what, self.sending.stream.info_with_subjects(filter))
            .await?;
        let mut streams = std::collections::HashSet::new();
        let read = async {
            while let Some(item) = subjects.next().await {
                let (subject, _) = item.map_err(|e| format!("{what}: {e}"))?;
                let stream = subject.rsplit('.').next().unwrap_or_default();
                if stream != this && streams.len() < MOST {
                    streams.insert(stream.to_owned());
                }
            }
            Ok::<(), String>(())
        };
        tokio::time::timeout(OP_TIMEOUT, read)
            .await
            .map_err(|_| ClusterError::Unreachable(format!("{what}: timed out")))?
            .map_err(ClusterError::Unreachable)?;
        Ok(streams.len())
    }

    /// Writes (or refreshes) the key of `name`'s stream `sid` on this broker.
    pub async fn sending_put(&self, name: &AgentName, sid: StreamId) -> Result<(), ClusterError> {
        let k = self.sending_key(name, sid);
        self.op("counting a stream", self.sending.put(k, "1".into()))
            .await
            .map(|_| ())
    }

    /// Removes the key of `name`'s stream `sid` on this broker: purged from
    /// the bucket's stream, so that no marker is left to count.
    pub async fn sending_delete(&self, name: &AgentName, sid: StreamId) {
        let subject = format!("{}{}", self.sending.prefix, self.sending_key(name, sid));
        let purge = async { self.sending.stream.purge().filter(subject).await };
        let _ = self.op("ending a stream", purge).await;
    }
}
