//! The accept loop: a permit per connection caps their number, one task per
//! connection, and a shutdown signal that stops accepting (as mini-redis does).
//! A permit travels with its connection, also into a transfer's relay.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use keyferry_common::connection::ConnError;

use keyferry_common::identity::Fingerprint;
use keyferry_common::tls;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
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
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// Holds one of an address's connection slots until dropped.
#[derive(Debug)]
struct IpSlot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl IpSlot {
    fn take(shared: &Arc<Shared>, ip: IpAddr) -> Option<Self> {
        let mut map = shared.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_default();
        if *n >= shared.limits.max_connections_per_ip {
            return None;
        }
        *n += 1;
        Some(Self {
            shared: Arc::clone(shared),
            ip,
        })
    }
}

/// A connection's place under the connection limits, released when dropped.
/// A data connection hands it on to the relay that uses the connection.
#[derive(Debug)]
pub struct ConnGuard {
    _permit: OwnedSemaphorePermit,
    _ip: IpSlot,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut map = self.shared.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
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
            let Some(ip_slot) = IpSlot::take(&self.shared, peer.ip()) else {
                warn!(%peer, limit = self.shared.limits.max_connections_per_ip, "connection refused: per-address limit reached");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let shared = Arc::clone(&self.shared);
            let guard = ConnGuard {
                _permit: permit,
                _ip: ip_slot,
            };
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
