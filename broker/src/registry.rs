//! Who is who and who is online: name → key bindings in a crash-safe database
//! (redb, in the data dir), the connected receivers, and the transfers waiting
//! for an answer.
//!
//! A name is bound to the first key that registers it and refused to any other
//! key afterwards, across restarts. The broker keeps no other state on disk.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use keyferry_common::ids::TransferId;
use keyferry_common::message::{Message, OnlineAgent, RefuseReason};
use keyferry_common::name::AgentName;
use redb::{Database, ReadableDatabase as _, ReadableTable as _, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use crate::error::BrokerError;
use crate::handler::BrokerConn;

const BINDINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("bindings");

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

/// How a pending transfer ended its handshake.
#[derive(Debug)]
pub enum Outcome {
    /// The receiver refused.
    Refused(RefuseReason),
    /// The receiver accepted on its data connection, which now belongs to the relay.
    Accepted {
        /// The accept bytes for the sender.
        accept: Vec<u8>,
        /// The receiver's data connection.
        data: Box<BrokerConn>,
    },
}

#[derive(Debug)]
struct Receiver {
    conn_id: u64,
    tx: mpsc::Sender<Message>,
    incoming: u32,
}

#[derive(Debug)]
struct Pending {
    sender: AgentName,
    receiver: AgentName,
    reply: oneshot::Sender<Outcome>,
}

#[derive(Debug, Default)]
struct Online {
    receivers: HashMap<AgentName, Receiver>,
    senders: HashMap<AgentName, u32>,
    pending: HashMap<TransferId, Pending>,
    /// When each agent made its recent offers (sliding minute).
    offers: HashMap<AgentName, VecDeque<Instant>>,
    /// Transfers each agent is sending now (offered and not yet ended).
    sending: HashMap<AgentName, usize>,
}

/// Why an agent may not make another offer now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfferLimit {
    /// More offers in the last minute than allowed.
    Rate,
    /// More transfers in progress than allowed.
    Concurrent,
}

/// The registry: persistent bindings and in-memory presence.
#[derive(Debug)]
pub struct Registry {
    db: Database,
    online: Mutex<Online>,
}

fn db_err(path: &Path) -> impl Fn(String) -> BrokerError + '_ {
    move |detail| BrokerError::Database {
        path: path.to_owned(),
        detail,
    }
}

impl Registry {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, BrokerError> {
        let err = db_err(path);
        let db = Database::create(path).map_err(|e| err(e.to_string()))?;
        let tx = db.begin_write().map_err(|e| err(e.to_string()))?;
        tx.open_table(BINDINGS).map_err(|e| err(e.to_string()))?;
        tx.commit().map_err(|e| err(e.to_string()))?;
        Ok(Self {
            db,
            online: Mutex::new(Online::default()),
        })
    }

    fn online(&self) -> std::sync::MutexGuard<'_, Online> {
        self.online.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The key bound to `name`, if any.
    pub fn key_of(&self, name: &AgentName) -> Result<Option<Vec<u8>>, String> {
        let tx = self.db.begin_read().map_err(|e| e.to_string())?;
        let table = tx.open_table(BINDINGS).map_err(|e| e.to_string())?;
        let value = table.get(name.as_str()).map_err(|e| e.to_string())?;
        Ok(value.map(|v| v.value().to_vec()))
    }

    /// Binds `name` to `spki` unless it is bound to another key (durable on return).
    pub fn bind(&self, name: &AgentName, spki: &[u8]) -> Result<Binding, String> {
        let tx = self.db.begin_write().map_err(|e| e.to_string())?;
        let binding = {
            let mut table = tx.open_table(BINDINGS).map_err(|e| e.to_string())?;
            let existing = table
                .get(name.as_str())
                .map_err(|e| e.to_string())?
                .map(|v| v.value().to_vec());
            match existing {
                Some(k) if k == spki => Binding::Known,
                Some(_) => Binding::Taken,
                None => {
                    table
                        .insert(name.as_str(), spki)
                        .map_err(|e| e.to_string())?;
                    Binding::New
                }
            }
        };
        if binding == Binding::New {
            tx.commit().map_err(|e| e.to_string())?;
        } else {
            tx.abort().map_err(|e| e.to_string())?;
        }
        Ok(binding)
    }

    /// Registers the receiver connection of `name`; fails if one is connected.
    pub fn add_receiver(&self, name: &AgentName, conn_id: u64, tx: mpsc::Sender<Message>) -> bool {
        let mut o = self.online();
        if o.receivers.contains_key(name) {
            return false;
        }
        o.receivers.insert(
            name.clone(),
            Receiver {
                conn_id,
                tx,
                incoming: 0,
            },
        );
        true
    }

    /// Removes the receiver connection `conn_id` of `name`, and refuses the
    /// transfers still waiting for its answer.
    pub fn remove_receiver(&self, name: &AgentName, conn_id: u64) {
        let mut o = self.online();
        if o.receivers.get(name).is_some_and(|r| r.conn_id == conn_id) {
            o.receivers.remove(name);
            // Dropping their reply channels tells the waiting senders it left.
            o.pending.retain(|_, p| &p.receiver != name);
        }
    }

    /// Counts a sender connection of `name` in or out.
    pub fn sender_connected(&self, name: &AgentName, connected: bool) {
        let mut o = self.online();
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
        self.online().receivers.contains_key(name)
    }

    /// Records an offer from `sender` to `receiver` and hands it to the receiver's
    /// connection. Returns the channel the outcome will arrive on, or `None` if
    /// the receiver is not connected or cannot take more.
    pub fn offer(
        &self,
        transfer_id: TransferId,
        sender: &AgentName,
        receiver: &AgentName,
        msg: Message,
    ) -> Option<oneshot::Receiver<Outcome>> {
        let mut o = self.online();
        if o.pending.contains_key(&transfer_id) {
            return None;
        }
        let r = o.receivers.get(receiver)?;
        r.tx.try_send(msg).ok()?;
        let (reply, rx) = oneshot::channel();
        o.pending.insert(
            transfer_id,
            Pending {
                sender: sender.clone(),
                receiver: receiver.clone(),
                reply,
            },
        );
        Some(rx)
    }

    /// Counts an offer by `name` against its per-minute and concurrent-transfer
    /// limits; on success the caller must call [`Self::offer_ended`] later.
    pub fn take_offer_slot(
        &self,
        name: &AgentName,
        per_minute: usize,
        concurrent: usize,
    ) -> Result<(), OfferLimit> {
        let now = Instant::now();
        let mut o = self.online();
        let window = o.offers.entry(name.clone()).or_default();
        while window
            .front()
            .is_some_and(|&t| now.duration_since(t) >= Duration::from_secs(60))
        {
            window.pop_front();
        }
        if window.len() >= per_minute {
            return Err(OfferLimit::Rate);
        }
        window.push_back(now);
        let sending = o.sending.entry(name.clone()).or_default();
        if *sending >= concurrent {
            return Err(OfferLimit::Concurrent);
        }
        *sending += 1;
        Ok(())
    }

    /// An offer taken with [`Self::take_offer_slot`] ended (refused, failed or finished).
    pub fn offer_ended(&self, name: &AgentName) {
        let mut o = self.online();
        if let Some(n) = o.sending.get_mut(name) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                o.sending.remove(name);
            }
        }
        if o.offers.get(name).is_some_and(VecDeque::is_empty) {
            o.offers.remove(name);
        }
    }

    /// Forgets a pending transfer (the sender gave up waiting).
    pub fn cancel(&self, transfer_id: &TransferId) {
        self.online().pending.remove(transfer_id);
    }

    /// Delivers the receiver's answer, if `receiver` is the one the offer named.
    pub fn answer(
        &self,
        transfer_id: &TransferId,
        receiver: &AgentName,
        outcome: Outcome,
    ) -> Result<AgentName, Outcome> {
        let mut o = self.online();
        match o.pending.get(transfer_id) {
            Some(p) if &p.receiver == receiver => {}
            _ => return Err(outcome),
        }
        let p = o.pending.remove(transfer_id).expect("checked just above");
        if matches!(outcome, Outcome::Accepted { .. })
            && let Some(r) = o.receivers.get_mut(receiver)
        {
            r.incoming += 1;
        }
        let sender = p.sender.clone();
        p.reply.send(outcome)?;
        Ok(sender)
    }

    /// A relayed transfer to `receiver` ended.
    pub fn transfer_ended(&self, receiver: &AgentName) {
        if let Some(r) = self.online().receivers.get_mut(receiver) {
            r.incoming = r.incoming.saturating_sub(1);
        }
    }

    /// Everyone online, sorted by name.
    pub fn list(&self) -> Vec<OnlineAgent> {
        let o = self.online();
        let mut names: Vec<&AgentName> = o.receivers.keys().chain(o.senders.keys()).collect();
        names.sort();
        names.dedup();
        names
            .into_iter()
            .map(|n| OnlineAgent {
                name: n.clone(),
                receiving: o.receivers.contains_key(n),
                incoming: o.receivers.get(n).map_or(0, |r| r.incoming),
                senders: o.senders.get(n).copied().unwrap_or(0),
            })
            .collect()
    }
}
