//! Name bindings in the cluster (`keyferry-names`): the first `create` of a
//! name's key wins, in the one place every broker asks, so a name bound
//! through one broker cannot be claimed with another key through any other.
//!
//! The broker's own redb registry becomes a cache of bindings the cluster
//! confirmed: asked only when the cluster cannot be reached, so that agents
//! this broker already knows keep authenticating and exchanging files
//! through it. A name the cache does not know cannot be registered while the
//! cluster is away. A binding is never decided by the cache.

use async_nats::jetstream::kv::{CreateErrorKind, Operation};
use keyferry_common::name::AgentName;
use tracing::warn;

use super::{Cluster, ClusterError};
use crate::registry::{Binding, Registry};

/// Largest key a binding may hold (an RSA-4096 SubjectPublicKeyInfo is 550
/// bytes): anything longer in the bucket is refused as malformed.
const MAX_SPKI: usize = 4096;

/// The bucket key of a name: hex, since names may hold characters (`.` at
/// the end, `..`) that keys may not.
pub fn key(name: &AgentName) -> String {
    hex::encode(name.as_str())
}

impl Cluster {
    /// The key bound to `name` in the cluster (`Ok(None)`: unbound).
    pub async fn key_of(&self, name: &AgentName) -> Result<Option<Vec<u8>>, ClusterError> {
        let entry = self
            .op("reading a name", self.names.entry(key(name)))
            .await?;
        match entry.filter(|e| e.operation == Operation::Put) {
            Some(e) if e.value.len() > MAX_SPKI => Err(ClusterError::Config(format!(
                "the cluster's binding of {name} is malformed ({} bytes)",
                e.value.len()
            ))),
            Some(e) => Ok(Some(e.value.to_vec())),
            None => Ok(None),
        }
    }

    /// Binds `name` to `spki` in the cluster unless it is bound to another
    /// key; with the key the name is bound to.
    pub async fn bind(
        &self,
        name: &AgentName,
        spki: &[u8],
    ) -> Result<(Binding, Vec<u8>), ClusterError> {
        // Create first: the bucket's atomic create alone decides a race.
        let created = self
            .op("registering a name", async {
                match self.names.create(key(name), spki.to_vec().into()).await {
                    Ok(_) => Ok(true),
                    Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Ok(false),
                    Err(e) => Err(e),
                }
            })
            .await?;
        if created {
            return Ok((Binding::New, spki.to_vec()));
        }
        // Bound already (by this key or another): its key decides.
        match self.key_of(name).await? {
            Some(bound) if bound == spki => Ok((Binding::Known, bound)),
            Some(bound) => Ok((Binding::Taken, bound)),
            None => Err(ClusterError::Contended(format!(
                "the binding of {name} was removed while it was read; try again"
            ))),
        }
    }
}

/// Binds through the cluster, falling back to the cache for names it
/// confirmed before. Returns the binding and, when the cache must learn
/// it, the key the cluster has for the name (the caller writes it, off the
/// reactor: [`Registry::remember`] is a durable write).
pub async fn bind(
    cluster: &Cluster,
    cache: &Registry,
    name: &AgentName,
    spki: &[u8],
) -> Result<(Binding, Option<Vec<u8>>), String> {
    match cluster.bind(name, spki).await {
        Ok((binding, bound)) => {
            let stale = cache
                .key_of(name)
                .map_or(true, |k| k.as_deref() != Some(&bound[..]));
            Ok((binding, stale.then_some(bound)))
        }
        Err(e) => match cache.key_of(name) {
            Ok(Some(k)) if k == spki => {
                warn!(agent = %name, error = %e, "cluster unreachable: name admitted from this broker's cache of confirmed bindings");
                Ok((Binding::Known, None))
            }
            Ok(Some(_)) => Ok((Binding::Taken, None)),
            Ok(None) => Err(format!(
                "this broker cannot reach its cluster to register the new name {name} ({e}); \
                 try again shortly"
            )),
            Err(db) => Err(format!("{e}; and the cache: {db}")),
        },
    }
}

/// Brings the bindings of this broker's registry into the cluster when it
/// joins (it may have stood alone before): each is created there unless the
/// name is bound already; where the cluster has another key, the cluster
/// wins and the registry learns it. Returns how many were created and how
/// many the cluster overruled.
pub async fn upload(cluster: &Cluster, cache: &Registry) -> Result<(usize, usize), String> {
    let (mut created, mut overruled) = (0, 0);
    for (name, spki) in cache.bindings().map_err(|e| e.to_string())? {
        match cluster
            .bind(&name, &spki)
            .await
            .map_err(|e| e.to_string())?
        {
            (Binding::New, _) => created += 1,
            (Binding::Known, _) => {}
            (Binding::Taken, bound) => {
                warn!(agent = %name, "this broker's binding is overruled by the cluster's (another key registered the name first)");
                cache.remember(&name, &bound).map_err(|e| e.to_string())?;
                overruled += 1;
            }
        }
    }
    Ok((created, overruled))
}

/// A name's key as a lookup found it.
#[derive(Debug)]
pub struct Found {
    /// The key (`None`: not bound), or a database error.
    pub key: Result<Option<Vec<u8>>, String>,
    /// Why the cluster could not be asked, when `key` came from the cache: a
    /// name the cache does not hold may then be bound all the same.
    pub unreached: Option<String>,
}

/// The key of `name`, from the cluster or, when it is away, the cache.
pub async fn key_of(cluster: &Cluster, cache: &Registry, name: &AgentName) -> Found {
    match cluster.key_of(name).await {
        Ok(k) => Found {
            key: Ok(k),
            unreached: None,
        },
        Err(e) => {
            warn!(error = %e, "cluster unreachable: key looked up in this broker's cache");
            Found {
                key: cache.key_of(name).map_err(|db| db.to_string()),
                unreached: Some(e.to_string()),
            }
        }
    }
}
