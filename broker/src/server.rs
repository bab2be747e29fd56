//! The accept loop: a permit per connection caps their number, one task per
//! connection, and a shutdown signal that stops accepting (as mini-redis does).
//! A permit travels with its connection, also into a transfer's relay.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use keyferry_common::connection::ConnError;

use keyferry_common::identity::Fingerprint;
use keyferry_common::tls;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::cert::BrokerCert;
use crate::config::{AccessPolicy, Limits};
use crate::data::Tickets;
use crate::error::BrokerError;
use crate::handler::{HandlerError, handle};
use crate::registry::Registry;

/// State shared by every connection.
pub struct Shared {
    /// Bindings and presence.
    pub registry: Arc<Registry>,
    /// The broker's certificate fingerprint (part of what agents sign).
    pub fingerprint: Fingerprint,
    /// Limits.
    pub limits: Limits,
    /// TLS acceptor.
    pub acceptor: TlsAcceptor,
    /// Connection ids for the receiver table.
    pub next_conn_id: AtomicU64,
    /// Who may authenticate.
    pub policy: AccessPolicy,
    /// Tickets of accepted transfers whose data connections are awaited.
    pub tickets: Tickets,
    /// Open connections per IP address.
    per_ip: Mutex<HashMap<IpAddr, PerIp>>,
}

/// One address's connections: how many there are in all, and which of them
/// have not authenticated yet (oldest first, each with the means to cut it).
#[derive(Debug, Default)]
pub(crate) struct PerIp {
    total: usize,
    pending: VecDeque<(u64, oneshot::Sender<()>)>,
}

/// A connection's place under the connection limits, released when dropped.
///
/// Until [`ConnGuard::admit`] (after authentication, or a valid ticket) the
/// connection also holds one of its address's few unauthenticated places;
/// when those are full, a new connection from that address cuts the oldest
/// one still in its handshake ([`ConnGuard::evicted`]), so idle handshakes
/// can never lock out the agents behind an address. A data connection hands
/// its guard on to the relay that uses the connection.
#[derive(Debug)]
pub struct ConnGuard {
    _permit: OwnedSemaphorePermit,
    shared: Arc<Shared>,
    ip: IpAddr,
    id: u64,
    /// Fires when a newer connection from the same address took our
    /// unauthenticated place; `None` once admitted.
    eviction: Option<oneshot::Receiver<()>>,
}

impl ConnGuard {
    fn take(shared: &Arc<Shared>, permit: OwnedSemaphorePermit, ip: IpAddr) -> Option<Self> {
        let limits = &shared.limits;
        let mut map = lock(&shared.per_ip);
        let entry = map.entry(ip).or_default();
        if entry.total >= limits.max_connections_per_ip {
            return None;
        }
        if entry.pending.len() >= limits.max_unauthenticated_per_ip.max(1)
            && let Some((_, cut)) = entry.pending.pop_front()
        {
            let _ = cut.send(());
        }
        let id = shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
        let (cut, eviction) = oneshot::channel();
        entry.total += 1;
        entry.pending.push_back((id, cut));
        Some(Self {
            _permit: permit,
            shared: Arc::clone(shared),
            ip,
            id,
            eviction: Some(eviction),
        })
    }

    /// Resolves when this connection, still unauthenticated, was cut to make
    /// room for a newer one from its address; never once admitted.
    pub async fn evicted(&mut self) {
        match &mut self.eviction {
            Some(rx) => {
                if rx.await.is_err() {
                    // The table let go of us without a cut: keep waiting.
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    }

    /// The connection authenticated (or redeemed a ticket): it leaves the
    /// unauthenticated places and can no longer be evicted.
    pub fn admit(&mut self) {
        if self.eviction.take().is_some() {
            let mut map = lock(&self.shared.per_ip);
            if let Some(entry) = map.get_mut(&self.ip) {
                entry.pending.retain(|(id, _)| *id != self.id);
            }
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut map = lock(&self.shared.per_ip);
        if let Some(entry) = map.get_mut(&self.ip) {
            entry.total -= 1;
            entry.pending.retain(|(id, _)| *id != self.id);
            if entry.total == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Locks a mutex whose holder may have panicked: the data stays usable.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("fingerprint", &self.fingerprint)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// A broker ready to serve: certificate and registry loaded.
#[derive(Debug)]
pub struct Broker {
    shared: Arc<Shared>,
}

impl Broker {
    /// Opens the data dir (creating it, the certificate and the database on first start).
    pub fn open(
        data_dir: PathBuf,
        limits: Limits,
        policy: AccessPolicy,
    ) -> Result<Self, BrokerError> {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&data_dir)
            .map_err(|source| BrokerError::DataDir {
                path: data_dir.clone(),
                source,
            })?;
        let cert = BrokerCert::load_or_create(&data_dir)?;
        let registry = Registry::open(&data_dir.join("registry.redb"))?;
        let config = tls::server_config(cert.cert, cert.key)?;
        Ok(Self {
            shared: Arc::new(Shared {
                registry: Arc::new(registry),
                fingerprint: cert.fingerprint,
                limits,
                acceptor: TlsAcceptor::from(Arc::new(config)),
                next_conn_id: AtomicU64::new(0),
                policy,
                tickets: Tickets::default(),
                per_ip: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The fingerprint agents pin.
    pub fn fingerprint(&self) -> Fingerprint {
        self.shared.fingerprint
    }

    /// Serves `listener` until `shutdown` completes.
    pub async fn run(self, listener: TcpListener, shutdown: impl Future) {
        let permits = Arc::new(Semaphore::new(self.shared.limits.max_connections));
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                _ = &mut shutdown => break,
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                warn!(%peer, "connection refused: connection limit reached");
                continue;
            };
            let Some(guard) = ConnGuard::take(&self.shared, permit, peer.ip()) else {
                warn!(%peer, limit = self.shared.limits.max_connections_per_ip, "connection refused: per-address limit reached");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let shared = Arc::clone(&self.shared);
            tokio::spawn(async move {
                match handle(shared, tcp, guard).await {
                    Ok(()) => {}
                    Err(HandlerError::Conn(ConnError::Io(e))) => {
                        debug!(%peer, error = %e, "connection ended")
                    }
                    Err(e @ HandlerError::Tls(_)) => info!(%peer, error = %e, "connection cut off"),
                    Err(e) => warn!(%peer, error = %e, "connection cut off"),
                }
            });
        }
        info!("shutting down");
    }
}
