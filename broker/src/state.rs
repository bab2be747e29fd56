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
