//! Membership of a cluster of brokers on NATS (`broker --cluster nats://…`):
//! the connection, the three JetStream key-value buckets, and this broker's
//! id and advertised address.
//!
//! * `keyferry-names` ([`names`]): name → key bindings, first `create` wins;
//!   the cluster's one authority on names.
//! * `keyferry-presence` ([`presence`]): name → the broker holding that
//!   receiver, refreshed by heartbeat, expiring after [`PRESENCE_TTL`].
//! * `keyferry-brokers`: broker id → its advertised address and certificate
//!   fingerprint, for operators to publish ([`Cluster::brokers`]).
//!
//! Offers for a receiver on another broker go by request/reply to that
//! broker's subject ([`wire`]); data never goes through NATS. The client is a
//! handle on async-nats' connection task, which reconnects by itself; every
//! call here is bounded by [`OP_TIMEOUT`], so a lost cluster is an error, not
//! a hang. No socket is held here.

pub mod names;
pub mod presence;
pub mod wire;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use keyferry_common::identity::Fingerprint;
use keyferry_common::name::AgentName;
use tracing::{info, warn};

/// How long one call to the cluster may take before it counts as failed.
pub const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a broker refreshes the presence of its receivers.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// How long a presence entry lives without a refresh.
pub const PRESENCE_TTL: Duration = Duration::from_secs(30);

const NAMES: &str = "keyferry-names";
const PRESENCE: &str = "keyferry-presence";
const BROKERS: &str = "keyferry-brokers";
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
    let client = tokio::time::timeout(Duration::from_secs(10), options.connect(url))
        .await
        .map_err(|_| ClusterError::Unreachable(format!("{url}: no answer within 10 s")))?
        .map_err(|e| ClusterError::Unreachable(format!("{url}: {e}")))?;
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

/// Every broker that announced itself in the cluster at `url`, as
/// `(id, "ADDRESS SHA256:… policy=…")`, sorted by id.
pub async fn list_brokers(url: &str) -> Result<Vec<(String, String)>, ClusterError> {
    let (_client, js) = connect(url, "list").await?;
    read_brokers(&brokers_bucket(&js).await?).await
}

async fn read_brokers(brokers: &kv::Store) -> Result<Vec<(String, String)>, ClusterError> {
    use futures_util::StreamExt as _;
    let keys = bounded("listing brokers", brokers.keys()).await?;
    let ids: Vec<String> = tokio::time::timeout(
        Duration::from_secs(5),
        keys.filter_map(|k| async { k.ok() }).collect(),
    )
    .await
    .map_err(|_| ClusterError::Unreachable("listing brokers: timed out".into()))?;
    let mut out = Vec::new();
    for id in ids {
        if let Some(v) = bounded("reading a broker", brokers.get(&id)).await? {
            let line = String::from_utf8_lossy(&v);
            out.push((id, keyferry_common::text::escape(&line)));
        }
    }
    out.sort();
    Ok(out)
}

/// This broker's membership: the NATS client, the buckets, and the
/// presence entries it holds (name → revision).
#[derive(Debug)]
pub struct Cluster {
    client: async_nats::Client,
    names: kv::Store,
    presence: kv::Store,
    brokers: kv::Store,
    member: Member,
    held: Mutex<HashMap<AgentName, u64>>,
}

/// Runs `fut` for at most [`OP_TIMEOUT`], naming `what` in the error.
async fn bounded<T, E: std::fmt::Display>(
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

async fn bucket(js: &jetstream::Context, config: kv::Config) -> Result<kv::Store, ClusterError> {
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
    pub async fn join(member: Member) -> Result<Self, ClusterError> {
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
        let presence = bucket(
            &js,
            kv::Config {
                bucket: PRESENCE.into(),
                description: "keyferry: receiver name -> the broker holding it".into(),
                history: 1,
                max_age: PRESENCE_TTL,
                // On disk, so that a restarted NATS server still has the
                // bucket (its entries expire by themselves).
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            },
        )
        .await?;
        let brokers = brokers_bucket(&js).await?;
        let cluster = Self {
            client,
            names,
            presence,
            brokers,
            member,
            held: Mutex::new(HashMap::new()),
        };
        cluster.announce().await?;
        cluster.compare_policies().await;
        Ok(cluster)
    }

    /// Who this broker is.
    pub fn member(&self) -> &Member {
        &self.member
    }

    /// The NATS client (for the subscriptions of [`crate::member`]).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// Whether the connection to NATS is up right now.
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Writes this broker's advertised address and fingerprint to the
    /// brokers bucket (at start and with every heartbeat).
    pub async fn announce(&self) -> Result<(), ClusterError> {
        let m = &self.member;
        let line = format!("{} {} policy={}", m.advertise, m.fingerprint, m.policy);
        bounded(
            "announcing this broker",
            self.brokers.put(&self.member.id, line.into_bytes().into()),
        )
        .await
        .map(|_| ())
    }

    /// Warns about every other broker whose access policy differs from
    /// this one's: an allowlist should be the same everywhere.
    async fn compare_policies(&self) {
        let mine = format!("policy={}", self.member.policy);
        match read_brokers(&self.brokers).await {
            Ok(all) => {
                for (id, line) in all {
                    if id != self.member.id && !line.ends_with(&mine) {
                        warn!(broker = %id, theirs = %line, ours = %mine, "another broker of the cluster has another access policy: give every broker the same --allow-file");
                    }
                }
            }
            Err(e) => warn!(error = %e, "the other brokers' access policies could not be compared"),
        }
    }

    /// The subject on which broker `id` takes routed requests.
    pub fn subject(id: &str, what: &str) -> String {
        format!("keyferry.broker.{id}.{what}")
    }
}
