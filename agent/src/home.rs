//! The agent's home directory: identity key and pin files.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use keyferry_common::identity::{DEFAULT_KEY_BITS, Identity};
use keyferry_common::pins::PinStore;

use crate::error::AgentError;

/// Paths inside a home directory.
#[derive(Debug, Clone)]
pub struct Home {
    dir: PathBuf,
}

impl Home {
    /// `dir`, created with mode 0700 if missing. An existing one must belong
    /// to this user and must not be writable by others: whoever can write in
    /// it can replace the pin files or the identity.
    pub fn open(dir: PathBuf) -> Result<Self, AgentError> {
        use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| {
                AgentError::Other(format!(
                    "cannot create home directory {}: {e}",
                    dir.display()
                ))
            })?;
        let meta = std::fs::metadata(&dir).map_err(|e| {
            AgentError::Other(format!("cannot use home directory {}: {e}", dir.display()))
        })?;
        if meta.uid() != rustix::process::geteuid().as_raw() {
            return Err(AgentError::Other(format!(
                "home directory {} belongs to another user; use a directory of your own (--home)",
                dir.display()
            )));
        }
        if meta.mode() & 0o022 != 0 {
            return Err(AgentError::Other(format!(
                "home directory {} is writable by other users (mode {:03o}), who could replace \
                 its keys and pins; run `chmod 700 {}`",
                dir.display(),
                meta.mode() & 0o777,
                dir.display()
            )));
        }
        Ok(Self { dir })
    }

    /// The default home: `$XDG_CONFIG_HOME/keyferry` or `~/.config/keyferry`.
    pub fn default_dir() -> Option<PathBuf> {
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
        Some(base.join("keyferry"))
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Loads the identity, creating it on first run (printing its fingerprint).
    pub fn identity(&self) -> Result<Identity, AgentError> {
        let path = self.dir.join("identity.pem");
        let (id, created) = Identity::load_or_create(&path, DEFAULT_KEY_BITS)
            .map_err(|e| AgentError::Other(e.to_string()))?;
        if created {
            eprintln!(
                "created identity {} with fingerprint {}",
                path.display(),
                id.fingerprint()
            );
        }
        Ok(id)
    }

    /// Pins of broker certificates.
    pub fn known_brokers(&self) -> PinStore {
        PinStore::new(self.dir.join("known_brokers"))
    }

    /// Pins of peer keys.
    pub fn known_peers(&self) -> PinStore {
        PinStore::new(self.dir.join("known_peers"))
    }
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
