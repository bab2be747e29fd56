//! What every connection of the broker shares: the registry, the transfers
//! and their tickets,
//! the connection places, the limits and policy, the TLS acceptor, and the
//! shutdown signal, and in cluster mode the membership ([`Cluster`]). State
//! only — it holds no socket; the tasks that own the connections are reached
//! through channels, the cluster through the NATS client's handle.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use keyferry_common::identity::Fingerprint;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::cluster::Cluster;
use crate::config::{AccessPolicy, Limits};
use crate::conns::Conns;
use crate::handoff::Handoffs;
use crate::mailbox::Storage;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::relay::DataConn;
use crate::routes::Routes;
use crate::shutdown::{Phase, Shutdown};
use crate::tickets::Tickets;
use crate::transfers::Transfers;

/// State shared by every connection.
pub struct State {
    /// Bindings and presence.
    pub registry: Registry,
    /// Every transfer from offer to end.
    pub transfers: Transfers,
    /// The tickets of transfers waiting for their data connections.
    pub tickets: Tickets<DataConn>,
    /// Connection places per address.
    pub conns: Arc<Conns>,
    /// The broker's certificate fingerprint (part of what agents sign).
    pub fingerprint: Fingerprint,
    /// Limits.
    pub limits: Limits,
    /// Who may authenticate.
    pub policy: AccessPolicy,
    /// TLS acceptor.
    pub acceptor: TlsAcceptor,
    /// The cluster this broker is a member of (`--cluster`), if any.
    pub cluster: Option<Arc<Cluster>>,
    /// What the sessions count, for `--metrics`.
    pub metrics: Metrics,
    /// Routed transfers' sender tickets handed to senders here.
    pub routes: Routes,
    /// Transfers stored for receivers that are offline (`None`: this broker
    /// keeps none, e.g. its data dir cannot hold them).
    pub mailbox: Option<Storage>,
    /// Tickets of data connections that end here (stored uploads, deliveries).
    pub handoffs: Handoffs,
    /// Wakes a receiver's delivery of stored transfers when one arrives.
    pub couriers: Couriers,
    /// Ids of receiver connections.
    next_receiver_id: AtomicU64,
    /// The current phase (the server holds the sending end).
    phase: watch::Receiver<Phase>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("fingerprint", &self.fingerprint)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl State {
    /// Assembles the state; `phase` follows the server's shutdown.
    pub fn new(
        registry: Registry,
        fingerprint: Fingerprint,
        limits: Limits,
        policy: AccessPolicy,
        acceptor: TlsAcceptor,
        phase: watch::Receiver<Phase>,
    ) -> Self {
        let conns = Conns::new(
            limits.max_connections,
            limits.max_connections_per_ip,
            limits.max_unauthenticated_per_ip,
        );
        Self {
            registry,
            transfers: Transfers::new(),
            tickets: Tickets::new(),
            conns,
            fingerprint,
            limits,
            policy,
            acceptor,
            cluster: None,
            metrics: Metrics::default(),
            routes: Routes::default(),
            mailbox: None,
            handoffs: Handoffs::default(),
            couriers: Couriers::default(),
            next_receiver_id: AtomicU64::new(0),
            phase,
        }
    }

    /// A fresh id for a receiver connection.
    pub fn receiver_id(&self) -> u64 {
        self.next_receiver_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether the broker still accepts connections (not shutting down).
    pub fn serving(&self) -> bool {
        *self.phase.borrow() == Phase::Serving
    }

    /// A handle on the shutdown signal, for one task.
    pub fn shutdown(&self) -> Shutdown {
        Shutdown::new(self.phase.clone())
    }
}

/// One wake-up per receiver name whose delivery task is running: a stored
/// transfer committed for it meanwhile is delivered without waiting for its
/// next connection.
#[derive(Debug, Default)]
pub struct Couriers {
    waiting: std::sync::Mutex<
        std::collections::HashMap<keyferry_common::name::AgentName, Arc<tokio::sync::Notify>>,
    >,
}

impl Couriers {
    /// A fresh wake-up for `name`'s delivery task (a newer session's
    /// replaces an older one's).
    pub fn of(&self, name: &keyferry_common::name::AgentName) -> Arc<tokio::sync::Notify> {
        let fresh = Arc::new(tokio::sync::Notify::new());
        keyferry_common::sync::lock(&self.waiting).insert(name.clone(), Arc::clone(&fresh));
        fresh
    }

    /// Wakes `name`'s delivery task, if one runs.
    pub fn kick(&self, name: &keyferry_common::name::AgentName) {
        if let Some(n) = keyferry_common::sync::lock(&self.waiting).get(name) {
            n.notify_one();
        }
    }

    /// Forgets `name`'s wake-up `mine` (its receiver went offline), unless
    /// a newer session of that receiver holds another by now.
    pub fn forget(&self, name: &keyferry_common::name::AgentName, mine: &Arc<tokio::sync::Notify>) {
        let mut waiting = keyferry_common::sync::lock(&self.waiting);
        if waiting.get(name).is_some_and(|n| Arc::ptr_eq(n, mine)) {
            waiting.remove(name);
        }
    }
}
