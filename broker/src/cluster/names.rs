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

use super::{Cluster, ClusterError, bounded};
use crate::registry::{Binding, Registry};

/// The bucket key of a name: hex, since names may hold characters (`.` at
/// the end, `..`) that keys may not.
pub fn key(name: &AgentName) -> String {
    hex::encode(name.as_str())
}

impl Cluster {
    /// The key bound to `name` in the cluster (`Ok(None)`: unbound).
    pub async fn key_of(&self, name: &AgentName) -> Result<Option<Vec<u8>>, ClusterError> {
        let entry = bounded("reading a name", self.names.entry(key(name))).await?;
        Ok(entry
            .filter(|e| e.operation == Operation::Put)
            .map(|e| e.value.to_vec()))
    }

    /// Binds `name` to `spki` in the cluster unless it is bound to another
    /// key.
    pub async fn bind(&self, name: &AgentName, spki: &[u8]) -> Result<Binding, ClusterError> {
        let compare = |bound: &[u8]| {
            if bound == spki {
                Binding::Known
            } else {
                Binding::Taken
            }
        };
        if let Some(bound) = self.key_of(name).await? {
            return Ok(compare(&bound));
        }
        let created = bounded("registering a name", async {
            match self.names.create(key(name), spki.to_vec().into()).await {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(e),
            }
        })
        .await?;
        if created {
            return Ok(Binding::New);
        }
        // Another broker created it a moment ago: its key decides.
        match self.key_of(name).await? {
            Some(bound) => Ok(compare(&bound)),
            None => Err(ClusterError::Unreachable(
                "a name was created and removed at once; try again".into(),
            )),
        }
    }
}

/// Binds through the cluster, falling back to the cache for names it
/// confirmed before; the cache follows what the cluster says.
pub async fn bind(
    cluster: &Cluster,
    cache: &Registry,
    name: &AgentName,
    spki: &[u8],
) -> Result<Binding, String> {
    match cluster.bind(name, spki).await {
        Ok(binding) => {
            if binding != Binding::Taken
                && let Err(e) = cache.remember(name, spki)
            {
                warn!(error = %e, "registry cache could not be written");
            }
            Ok(binding)
        }
        Err(e) => match cache.key_of(name) {
            Ok(Some(k)) if k == spki => {
                warn!(agent = %name, error = %e, "cluster unreachable: name admitted from this broker's cache of confirmed bindings");
                Ok(Binding::Known)
            }
            Ok(Some(_)) => Ok(Binding::Taken),
            Ok(None) => Err(format!(
                "this broker cannot reach its cluster to register the new name {name} ({e}); \
                 try again shortly"
            )),
            Err(db) => Err(format!("{e}; and the cache: {db}")),
        },
    }
}

/// The key of `name`, from the cluster or, when it is away, the cache.
pub async fn key_of(
    cluster: &Cluster,
    cache: &Registry,
    name: &AgentName,
) -> Result<Option<Vec<u8>>, String> {
    match cluster.key_of(name).await {
        Ok(k) => Ok(k),
        Err(e) => {
            warn!(error = %e, "cluster unreachable: key looked up in this broker's cache");
            cache.key_of(name).map_err(|db| db.to_string())
        }
    }
}
