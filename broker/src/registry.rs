//! Names, keys and who is online: name → key bindings in a crash-safe database
//! (redb, in the data dir), and the agents connected right now (each receiver
//! with the channel to its control connection's task, and how many sender
//! connections each name has).
//!
//! A name is bound to the first key that registers it and refused to any other
//! key afterwards, across restarts. Presence lives in memory only. Nothing here
//! holds a socket: a receiver is reached through a bounded channel to the task
//! that owns its connection.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use keyferry_common::name::AgentName;
use keyferry_common::sync::lock;
use keyferry_common::wire::message::Message;
use redb::{Database, ReadableDatabase as _, ReadableTable as _, TableDefinition};
use thiserror::Error;
use tokio::sync::mpsc;

const BINDINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("bindings");

/// The registry database failed.
#[derive(Debug, Error)]
#[error("registry database {path}: {source}")]
pub struct RegistryError {
    /// The database file.
    pub path: PathBuf,
    /// What redb reported.
    pub source: redb::Error,
}

/// The result of binding a name to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    /// The name was free and is now bound to this key.
    New,
    /// The name was already bound to this key.
    Known,
    /// The name is bound to another key.
    Taken,
}

/// Why a receiver cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreachable {
    /// No receiver of that name is connected.
    Offline,
    /// Its queue of pushed messages is full.
    Full,
}

#[derive(Debug)]
struct Receiver {
    conn_id: u64,
    tx: mpsc::Sender<Box<Message>>,
}

#[derive(Debug, Default)]
struct Online {
    receivers: HashMap<AgentName, Receiver>,
    senders: HashMap<AgentName, u32>,
}

/// Who is connected, for the list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Present {
    /// The agent's name.
    pub name: AgentName,
    /// Whether a receiver of that name is connected.
    pub receiving: bool,
    /// Sender connections of that name.
    pub senders: u32,
}

/// The registry: persistent bindings and in-memory presence.
#[derive(Debug)]
pub struct Registry {
    db: Database,
    path: PathBuf,
    online: Mutex<Online>,
}

impl Registry {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, RegistryError> {
        let err = |e: redb::Error| RegistryError {
            path: path.to_owned(),
            source: e,
        };
        let db = Database::create(path).map_err(|e| err(e.into()))?;
        let tx = db.begin_write().map_err(|e| err(e.into()))?;
        tx.open_table(BINDINGS).map_err(|e| err(e.into()))?;
        tx.commit().map_err(|e| err(e.into()))?;
        Ok(Self {
            db,
            path: path.to_owned(),
            online: Mutex::new(Online::default()),
        })
    }

    fn err(&self, e: impl Into<redb::Error>) -> RegistryError {
        RegistryError {
            path: self.path.clone(),
            source: e.into(),
        }
    }

    /// The key bound to `name`, if any.
    pub fn key_of(&self, name: &AgentName) -> Result<Option<Vec<u8>>, RegistryError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = tx.open_table(BINDINGS).map_err(|e| self.err(e))?;
        let value = table.get(name.as_str()).map_err(|e| self.err(e))?;
        Ok(value.map(|v| v.value().to_vec()))
    }

    /// Binds `name` to `spki` unless it is bound to another key (durable on return).
    pub fn bind(&self, name: &AgentName, spki: &[u8]) -> Result<Binding, RegistryError> {
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        let binding = {
            let mut table = tx.open_table(BINDINGS).map_err(|e| self.err(e))?;
            let existing = table
                .get(name.as_str())
                .map_err(|e| self.err(e))?
                .map(|v| v.value().to_vec());
            match existing {
                Some(k) if k == spki => Binding::Known,
                Some(_) => Binding::Taken,
                None => {
                    table.insert(name.as_str(), spki).map_err(|e| self.err(e))?;
                    Binding::New
                }
            }
        };
        if binding == Binding::New {
            tx.commit().map_err(|e| self.err(e))?;
        } else {
            tx.abort().map_err(|e| self.err(e))?;
        }
        Ok(binding)
    }

    /// Records `name` → `spki` as the cluster confirmed it, replacing what
    /// the cache held (cluster mode: this database is a cache, see
    /// [`crate::cluster::names`]).
    pub fn remember(&self, name: &AgentName, spki: &[u8]) -> Result<(), RegistryError> {
        if self.key_of(name)?.as_deref() == Some(spki) {
            return Ok(());
        }
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut table = tx.open_table(BINDINGS).map_err(|e| self.err(e))?;
            table.insert(name.as_str(), spki).map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// Every binding in the database.
    pub fn bindings(&self) -> Result<Vec<(AgentName, Vec<u8>)>, RegistryError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = tx.open_table(BINDINGS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            // A row that is not a valid name was not written by us: skipped.
            if let Ok(name) = AgentName::new(k.value()) {
                out.push((name, v.value().to_vec()));
            }
        }
        Ok(out)
    }

    /// Names with a receiver connected here.
    pub fn receivers(&self) -> Vec<AgentName> {
        lock(&self.online).receivers.keys().cloned().collect()
    }

    /// Sender connections, receiver connections, and distinct names among
    /// them, now (for the metrics).
    pub fn counts(&self) -> (usize, usize, usize) {
        let o = lock(&self.online);
        let senders = o.senders.values().map(|&n| n as usize).sum();
        let names = o.receivers.len()
            + o.senders
                .keys()
                .filter(|n| !o.receivers.contains_key(*n))
                .count();
        (senders, o.receivers.len(), names)
    }

    /// Registers the receiver connection `conn_id` of `name`, reached through
    /// `tx`; fails if one is connected.
    pub fn add_receiver(
        &self,
        name: &AgentName,
        conn_id: u64,
        tx: mpsc::Sender<Box<Message>>,
    ) -> bool {
        let mut o = lock(&self.online);
        if o.receivers.contains_key(name) {
            return false;
        }
        o.receivers.insert(name.clone(), Receiver { conn_id, tx });
        true
    }

    /// Removes the receiver connection `conn_id` of `name` (not a newer
    /// one); whether it was there.
    pub fn remove_receiver(&self, name: &AgentName, conn_id: u64) -> bool {
        let mut o = lock(&self.online);
        if o.receivers.get(name).is_some_and(|r| r.conn_id == conn_id) {
            o.receivers.remove(name);
            return true;
        }
        false
    }

    /// Counts a sender connection of `name` in or out.
    pub fn sender_connected(&self, name: &AgentName, connected: bool) {
        let mut o = lock(&self.online);
        let n = o.senders.entry(name.clone()).or_default();
        if connected {
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
            if *n == 0 {
                o.senders.remove(name);
            }
        }
    }

    /// Whether a receiver of `name` is connected.
    pub fn is_receiving(&self, name: &AgentName) -> bool {
        lock(&self.online).receivers.contains_key(name)
    }

    /// Pushes `msg` to `name`'s receiver connection, without waiting.
    pub fn push(&self, name: &AgentName, msg: Message) -> Result<(), Unreachable> {
        let o = lock(&self.online);
        let r = o.receivers.get(name).ok_or(Unreachable::Offline)?;
        r.tx.try_send(Box::new(msg)).map_err(|_| Unreachable::Full)
    }

    /// Everyone connected, sorted by name.
    pub fn present(&self) -> Vec<Present> {
        let o = lock(&self.online);
        let mut names: Vec<&AgentName> = o.receivers.keys().chain(o.senders.keys()).collect();
        names.sort();
        names.dedup();
        names
            .into_iter()
            .map(|n| Present {
                name: n.clone(),
                receiving: o.receivers.contains_key(n),
                senders: o.senders.get(n).copied().unwrap_or(0),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> AgentName {
        AgentName::new(s).unwrap()
    }

    fn temp_db(tag: &str) -> (PathBuf, Registry) {
        let dir =
            std::env::temp_dir().join(format!("keyferry-registry-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let reg = Registry::open(&dir.join("registry.redb")).unwrap();
        (dir, reg)
    }

    #[test]
    fn the_first_key_owns_a_name_across_restarts() {
        let (dir, reg) = temp_db("bind");
        let alice = name("alice");
        assert_eq!(reg.bind(&alice, b"key-1").unwrap(), Binding::New);
        assert_eq!(reg.bind(&alice, b"key-1").unwrap(), Binding::Known);
        assert_eq!(reg.bind(&alice, b"key-2").unwrap(), Binding::Taken);
        drop(reg);
        let reg = Registry::open(&dir.join("registry.redb")).unwrap();
        assert_eq!(reg.key_of(&alice).unwrap().as_deref(), Some(&b"key-1"[..]));
        assert_eq!(reg.bind(&alice, b"key-2").unwrap(), Binding::Taken);
        assert_eq!(reg.key_of(&name("bob")).unwrap(), None);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn one_receiver_per_name_and_presence_is_listed() {
        let (dir, reg) = temp_db("presence");
        let (bob, carol) = (name("bob"), name("carol"));
        let (tx, mut rx) = mpsc::channel(1);
        assert!(reg.add_receiver(&bob, 1, tx.clone()));
        assert!(!reg.add_receiver(&bob, 2, tx));
        reg.sender_connected(&carol, true);
        reg.sender_connected(&bob, true);
        assert_eq!(
            reg.present(),
            [
                Present {
                    name: bob.clone(),
                    receiving: true,
                    senders: 1
                },
                Present {
                    name: carol.clone(),
                    receiving: false,
                    senders: 1
                },
            ]
        );
        // Pushes reach the receiver's task; a full queue is refused at once.
        reg.push(&bob, Message::List).unwrap();
        assert_eq!(reg.push(&bob, Message::List), Err(Unreachable::Full));
        assert_eq!(*rx.try_recv().unwrap(), Message::List);
        assert_eq!(reg.push(&carol, Message::List), Err(Unreachable::Offline));
        // Only the connection that registered may remove itself.
        reg.remove_receiver(&bob, 2);
        assert!(reg.is_receiving(&bob));
        reg.remove_receiver(&bob, 1);
        assert!(!reg.is_receiving(&bob));
        reg.sender_connected(&carol, false);
        reg.sender_connected(&bob, false);
        assert!(reg.present().is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
