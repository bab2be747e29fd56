//! Membership of a cluster of brokers on NATS (`broker --cluster nats://…`):
//! the connection, the five JetStream key-value buckets, and this broker's
//! id and advertised address.
//!
//! * `keyferry-names` ([`names`]): name → key bindings, first `create` wins;
//!   the cluster's one authority on names.
//! * `keyferry-presence` ([`presence`]): name → the broker holding that
//!   receiver, refreshed by heartbeat, expiring after [`PRESENCE_TTL`].
//! * `keyferry-brokers`: broker id → its advertised address and certificate
//!   fingerprint, for operators to publish ([`Cluster::brokers`]).
//! * `keyferry-rates` ([`rates`]): offers and prekey fetches per sender name
//!   and minute, so the offer and fetch rates hold across the cluster.
//! * `keyferry-sending` ([`sending`]): each sender's streams in flight, by
//!   broker, so the concurrency limit holds across the cluster.
//!
//! Offers for a receiver on another broker go by request/reply to that
//! broker's subject ([`wire`]); data never goes through NATS. The client is a
//! handle on async-nats' connection task, which reconnects by itself; every
//! call here is bounded by [`OP_TIMEOUT`], so a lost cluster is an error, not
//! a hang. No socket is held here.

pub mod names;
pub mod presence;
pub mod rates;
pub mod sending;
pub mod wire;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use keyferry_common::identity::Fingerprint;
use keyferry_common::name::AgentName;
use prometheus_client::metrics::histogram::Histogram;
use tracing::{info, warn};

use self::wire::BrokerLine;

/// How long one call to the cluster may take before it counts as failed.
pub const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a broker refreshes the presence of its receivers.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// How long a presence entry lives without a refresh.
pub const PRESENCE_TTL: Duration = Duration::from_secs(30);
/// A broker whose entry was written this recently counts as running.
const LIVE: Duration = Duration::from_secs(60);

const NAMES: &str = "keyferry-names";
const PRESENCE: &str = "keyferry-presence";
const BROKERS: &str = "keyferry-brokers";
const RATES: &str = "keyferry-rates";
/// How long an offer count is kept: the minute it counts, and the next, in
/// which it still weighs.
const RATES_TTL: Duration = Duration::from_secs(180);
const SENDING: &str = "keyferry-sending";
/// How long a stream's key lives without a heartbeat's refresh.
const SENDING_TTL: Duration = Duration::from_secs(60);
const ID_FILE: &str = "broker-id";
const MAX_ID_LEN: usize = 64;

/// Why the broker cannot join, or use, its cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The cluster cannot be reached, or did not answer in time.
    #[error("the cluster is unreachable: {0}")]
    Unreachable(String),
    /// A configuration error (bad id, bad URL, bucket mismatch).
    #[error("{0}")]
    Config(String),
    /// A presence entry kept changing while this broker tried to write it.
    #[error("{0}")]
    Contended(String),
}

/// Who this broker is in the cluster.
#[derive(Debug, Clone)]
pub struct Member {
    /// `nats://HOST:PORT` (credentials in the URL are passed to NATS).
    pub url: String,
    /// This broker's id: letters, digits, `-` and `_`, at most 64.
    pub id: String,
    /// Where agents (and other brokers' senders) reach this broker.
    pub advertise: String,
    /// This broker's certificate fingerprint.
    pub fingerprint: Fingerprint,
    /// Its access policy's digest ([`crate::config::AccessPolicy::digest`]).
    pub policy: String,
}

/// Checks a broker id: it is a NATS subject token and a KV key.
pub fn check_id(id: &str) -> Result<(), ClusterError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ClusterError::Config(format!(
            "broker id {:?} must be 1 to {MAX_ID_LEN} letters, digits, '-' or '_'",
            keyferry_common::text::escape(id)
        )))
    }
}

/// The broker id stored in `data_dir`, created (random) on first use.
pub fn stored_id(data_dir: &Path) -> Result<String, std::io::Error> {
    use keyferry_common::io::fs::{Place, write_private};
    let path = data_dir.join(ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            let id = s.trim().to_owned();
            check_id(&id).map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?;
            Ok(id)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = hex::encode(keyferry_common::crypto::random_array::<8>());
            write_private(&path, format!("{id}\n").as_bytes(), Place::New)?;
            Ok(id)
        }
        Err(e) => Err(e),
    }
}

/// Connects to NATS, failing if it does not answer within a few seconds (a
/// wrong URL should be seen at start); later losses of the connection are
/// repaired by the client, which reconnects for ever, and logged.
async fn connect(
    url: &str,
    id: &str,
) -> Result<(async_nats::Client, jetstream::Context), ClusterError> {
    let options = async_nats::ConnectOptions::new()
        .name(format!("keyferry-broker {id}"))
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(OP_TIMEOUT))
        .max_reconnects(None)
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => info!("cluster connection (re)established"),
                async_nats::Event::Disconnected => {
                    warn!("cluster connection lost: reconnecting; agents of this broker keep working locally")
                }
                other => info!(event = %other, "cluster event"),
            }
        });
    let shown = redact(url);
    let client = tokio::time::timeout(Duration::from_secs(10), options.connect(url))
        .await
        .map_err(|_| ClusterError::Unreachable(format!("{shown}: no answer within 10 s")))?
        .map_err(|e| ClusterError::Unreachable(format!("{shown}: {e}")))?;
    let mut js = jetstream::new(client.clone());
    js.set_timeout(OP_TIMEOUT);
    Ok((client, js))
}

async fn brokers_bucket(js: &jetstream::Context) -> Result<kv::Store, ClusterError> {
    bucket(
        js,
        kv::Config {
            bucket: BROKERS.into(),
            description: "keyferry: broker id -> advertised address and fingerprint".into(),
            history: 1,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        },
    )
    .await
}

/// Every broker that announced itself in the cluster at `url` with a valid
/// entry, sorted by id.
pub async fn list_brokers(url: &str) -> Result<Vec<(String, BrokerLine)>, ClusterError> {
    let (_client, js) = connect(url, "list").await?;
    let all = read_brokers(&brokers_bucket(&js).await?).await?;
    Ok(all.into_iter().map(|(id, line, _)| (id, line)).collect())
}

/// The brokers bucket's valid entries: `(id, line, seconds since the broker
/// last wrote it)`. An entry that does not parse is skipped.
async fn read_brokers(brokers: &kv::Store) -> Result<Vec<(String, BrokerLine, i64)>, ClusterError> {
    use futures_util::StreamExt as _;
    let keys = bounded("listing brokers", brokers.keys()).await?;
    let ids: Vec<String> = tokio::time::timeout(
        Duration::from_secs(5),
        keys.filter_map(|k| async { k.ok() }).collect(),
    )
    .await
    .map_err(|_| ClusterError::Unreachable("listing brokers: timed out".into()))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let mut out = Vec::new();
    for id in ids {
        let entry = bounded("reading a broker", brokers.entry(&id)).await?;
        let Some(e) = entry.filter(|e| e.operation == kv::Operation::Put) else {
            continue;
        };
        let line = BrokerLine::parse(&e.value);
        let Some(line) = line.filter(|_| check_id(&id).is_ok()) else {
            warn!(broker = %keyferry_common::text::escape(&id), "a malformed entry in the brokers bucket is ignored");
            continue;
        };
        out.push((id, line, now.saturating_sub(e.created.unix_timestamp())));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// `nats://user:secret@host:port` without what comes before the `@`, for
/// logs and errors.
pub fn redact(url: &str) -> String {
    match (url.split_once("://"), url.rsplit_once('@')) {
        (Some((scheme, _)), Some((_, host))) => format!("{scheme}://…@{host}"),
        _ => url.to_owned(),
    }
}

/// This broker's membership: the NATS client, the buckets, and the
/// presence entries it holds (name → revision).
#[derive(Debug)]
pub struct Cluster {
    client: async_nats::Client,
    names: kv::Store,
    presence: kv::Store,
    brokers: kv::Store,
    rates: kv::Store,
    sending: kv::Store,
    member: Member,
    held: Mutex<HashMap<AgentName, u64>>,
    /// Serialises this broker's presence writes ([`presence`]).
    writes: tokio::sync::Mutex<()>,
    /// The last read of every receiver, and when ([`Cluster::receivers`]).
    listed: Mutex<Option<ListedReceivers>>,
    /// How long each key-value operation took (for the metrics).
    kv_seconds: Histogram,
}

type ListedReceivers = (std::time::Instant, Vec<(AgentName, wire::Presence)>);

/// Runs `fut` for at most [`OP_TIMEOUT`], naming `what` in the error.
pub(crate) async fn bounded<T, E: std::fmt::Display>(
    what: &str,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, ClusterError> {
    match tokio::time::timeout(OP_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(ClusterError::Unreachable(format!("{what}: {e}"))),
        Err(_) => Err(ClusterError::Unreachable(format!(
            "{what}: no answer within {} s",
            OP_TIMEOUT.as_secs()
        ))),
    }
}

/// A bucket whose entries expire `ttl` after their last write (history 1,
/// on disk, so that a restarted NATS server still has it). One made by
/// someone else must let its entries expire too: one without a max age is
/// refused.
async fn expiring(
    js: &jetstream::Context,
    name: &str,
    description: &str,
    ttl: Duration,
) -> Result<kv::Store, ClusterError> {
    let config = kv::Config {
        bucket: name.into(),
        description: description.into(),
        history: 1,
        max_age: ttl,
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    };
    let store = bucket(js, config).await?;
    let status = bounded(&format!("reading the bucket {name}"), store.status()).await?;
    if status.max_age().is_zero() {
        return Err(ClusterError::Config(format!(
            "the bucket {name} has no max age: its entries would never expire; \
             recreate it with a max age of {} s",
            ttl.as_secs()
        )));
    }
    Ok(store)
}

pub(crate) async fn bucket(
    js: &jetstream::Context,
    config: kv::Config,
) -> Result<kv::Store, ClusterError> {
    let name = config.bucket.clone();
    match js.get_key_value(&name).await {
        Ok(store) => Ok(store),
        Err(_) => {
            bounded(
                &format!("creating bucket {name}"),
                js.create_key_value(config),
            )
            .await
        }
    }
}

impl Cluster {
    /// Connects to NATS (failing if it does not answer within a few
    /// seconds: a wrong URL should be seen at start) and opens, or creates,
    /// the buckets. Later losses of the connection are repaired by the
    /// client, which reconnects for ever; they are logged.
    pub async fn join(member: Member, kv_seconds: Histogram) -> Result<Self, ClusterError> {
        check_id(&member.id)?;
        let (client, js) = connect(&member.url, &member.id).await?;
        let names = bucket(
            &js,
            kv::Config {
                bucket: NAMES.into(),
                description: "keyferry: agent name -> key (SPKI DER), first create wins".into(),
                history: 5,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            },
        )
        .await?;
        let presence = expiring(
            &js,
            PRESENCE,
            "keyferry: receiver name -> the broker holding it",
            PRESENCE_TTL,
        )
        .await?;
        let brokers = brokers_bucket(&js).await?;
        let rates = expiring(
            &js,
            RATES,
            "keyferry: offers per sender name and minute",
            RATES_TTL,
        )
        .await?;
        let sending = expiring(
            &js,
            SENDING,
            "keyferry: streams in flight per sender and broker",
            SENDING_TTL,
        )
        .await?;
        // Two live brokers with one id would overwrite each other's presence.
        let probe = async_nats::Request::new()
            .payload(bytes::Bytes::new())
            .timeout(Some(Duration::from_millis(500)));
        if client
            .send_request(Self::subject(&member.id, "holds"), probe)
            .await
            .is_ok()
        {
            return Err(ClusterError::Config(format!(
                "another broker with the id {} is running in this cluster: give each broker its \
                 own --broker-id (or data dir)",
                member.id
            )));
        }
        let cluster = Self {
            client,
            names,
            presence,
            brokers,
            rates,
            sending,
            member,
            held: Mutex::new(HashMap::new()),
            writes: tokio::sync::Mutex::new(()),
            listed: Mutex::new(None),
            kv_seconds,
        };
        cluster.compare_policies().await?;
        cluster.announce().await?;
        Ok(cluster)
    }

    /// Whether the connection to NATS is up now.
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// [`bounded`], with the time it took counted.
    async fn op<T, E: std::fmt::Display>(
        &self,
        what: &str,
        fut: impl Future<Output = Result<T, E>>,
    ) -> Result<T, ClusterError> {
        let start = std::time::Instant::now();
        let result = bounded(what, fut).await;
        self.kv_seconds.observe(start.elapsed().as_secs_f64());
        result
    }

    /// How many brokers wrote their entry in the last [`LIVE`], this one
    /// included.
    pub async fn live_brokers(&self) -> Result<usize, ClusterError> {
        let start = std::time::Instant::now();
        let all = read_brokers(&self.brokers).await;
        self.kv_seconds.observe(start.elapsed().as_secs_f64());
        let live = i64::try_from(LIVE.as_secs()).unwrap_or(i64::MAX);
        Ok(all?.iter().filter(|(_, _, age)| *age <= live).count())
    }

    /// Who this broker is.
    pub fn member(&self) -> &Member {
        &self.member
    }

    /// A JetStream context on this broker's connection, each call bounded by
    /// [`OP_TIMEOUT`].
    pub fn jetstream(&self) -> jetstream::Context {
        let mut js = jetstream::new(self.client.clone());
        js.set_timeout(OP_TIMEOUT);
        js
    }

    /// The NATS client (for the subscriptions of [`crate::member`]).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// Subscribes to this broker's subjects: routed offers, then "do you
    /// hold this receiver?".
    pub async fn subscribe(
        &self,
    ) -> Result<(async_nats::Subscriber, async_nats::Subscriber), ClusterError> {
        let id = &self.member.id;
        let offers = bounded(
            "subscribing",
            self.client.subscribe(Self::subject(id, "offer")),
        )
        .await?;
        let holds = bounded(
            "subscribing",
            self.client.subscribe(Self::subject(id, "holds")),
        )
        .await?;
        Ok((offers, holds))
    }

    /// Writes this broker's advertised address and fingerprint to the
    /// brokers bucket (at start and with every heartbeat).
    pub async fn announce(&self) -> Result<(), ClusterError> {
        let m = &self.member;
        let line = BrokerLine {
            address: m.advertise.clone(),
            fingerprint: m.fingerprint,
            policy: m.policy.clone(),
        };
        self.op(
            "announcing this broker",
            self.brokers.put(&self.member.id, line.encode().into()),
        )
        .await
        .map(|_| ())
    }

    /// Compares this broker's access policy with those of the brokers
    /// that wrote their entry in the last [`LIVE`]: one that admits anyone
    /// beside one with an allowlist is refused (an open broker could bind
    /// any name for the whole cluster); two different allowlists are warned
    /// about (an allowlist should be the same everywhere, but changes reach
    /// brokers one at a time).
    async fn compare_policies(&self) -> Result<(), ClusterError> {
        let mine = &self.member.policy;
        let open = |p: &str| p == "open";
        let all = match read_brokers(&self.brokers).await {
            Ok(all) => all,
            Err(e) => {
                warn!(error = %e, "the other brokers' access policies could not be compared");
                return Ok(());
            }
        };
        for (id, line, age) in all {
            let theirs = line.policy.as_str();
            if id == self.member.id
                || age > LIVE.as_secs().try_into().unwrap_or(i64::MAX)
                || theirs == mine
            {
                continue;
            }
            if open(theirs) != open(mine) {
                return Err(ClusterError::Config(format!(
                    "broker {id} of this cluster has the access policy {theirs} and this one {mine}: \
                     an open broker beside one with an allowlist would let anyone bind names for \
                     the whole cluster; give every broker the same --allow-file (or all \
                     --allow-any-agent)"
                )));
            }
            warn!(broker = %id, theirs = %theirs, ours = %mine, "another broker of the cluster has another allowlist: give every broker the same --allow-file");
        }
        Ok(())
    }

    /// The subject on which broker `id` takes routed requests.
    pub fn subject(id: &str, what: &str) -> String {
        format!("keyferry.broker.{id}.{what}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_subject_tokens_and_urls_lose_their_credentials() {
        check_id("b-1_x").unwrap();
        for bad in ["", "a.b", "a b", "a*", ">", &"x".repeat(65)] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            redact("nats://u:secret@10.0.0.1:4222"),
            "nats://…@10.0.0.1:4222"
        );
        assert_eq!(redact("nats://10.0.0.1:4222"), "nats://10.0.0.1:4222");
    }
}
