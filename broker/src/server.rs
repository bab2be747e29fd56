//! The accept loop and the broker's life: a place under the connection limits
//! for every connection before anything is read, one task per connection, and
//! a graceful shutdown (as mini-redis does it): on the signal the broker stops
//! accepting and control sessions end; running transfers go on for the grace
//! period, then are cut; the server returns once the last connection task
//! ended, which it knows when the last clone of its completion channel drops.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use keyferry_common::identity::Fingerprint;
use keyferry_common::io::connection::ConnError;
use keyferry_common::io::task::AbortOnDrop;
use keyferry_common::io::tls;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::cert::BrokerCert;
use crate::cluster::{Cluster, Member};
use crate::config::{AccessPolicy, Limits};
use crate::conns::NoPlace;
use crate::error::{BrokerError, SessionError};
use crate::mailbox::shared::SharedMailbox;
use crate::mailbox::{Mailbox, MailboxLimits, Storage};
use crate::member;
use crate::metrics::{Limit, http};
use crate::registry::Registry;
use crate::session;
use crate::shutdown::{Alive, Phase};
use crate::state::State;

/// How long cut transfers and closing sessions get to finish once cut.
const CUT_WAIT: Duration = Duration::from_secs(10);

/// A broker ready to serve: certificate and registry loaded.
#[derive(Debug)]
pub struct Broker {
    state: Arc<State>,
    phase: watch::Sender<Phase>,
    subjects: Option<member::Subjects>,
    /// Where `/metrics` and `/healthz` are served, if asked.
    metrics: Option<TcpListener>,
    /// The mailbox's limits (a cluster's mailbox takes them too).
    store_limits: MailboxLimits,
    /// Where a cluster's mailbox stages uploads.
    store_staging: PathBuf,
    /// News of transfers stored through any broker of the cluster.
    stored_news: Option<async_nats::Subscriber>,
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
        let (phase, phase_rx) = watch::channel(Phase::Serving);
        // Transfers kept for offline receivers; a mailbox that cannot be
        // opened costs only that (a line in the log), not the broker.
        let store_dir = data_dir.join("mailbox");
        let store_limits = limits.store.apply(MailboxLimits::defaults_for(&store_dir));
        let mailbox = match Mailbox::open(&store_dir, store_limits.clone()) {
            Ok(m) => Some(Storage::Disk(Arc::new(m))),
            Err(e) => {
                warn!(error = %e, "no mailbox: transfers for offline receivers are refused");
                None
            }
        };
        let mut state = State::new(
            registry,
            cert.fingerprint,
            limits,
            policy,
            TlsAcceptor::from(Arc::new(config)),
            phase_rx,
        );
        state.mailbox = mailbox;
        Ok(Self {
            state: Arc::new(state),
            phase,
            subjects: None,
            metrics: None,
            store_limits,
            store_staging: data_dir.join("mailbox-staging"),
            stored_news: None,
        })
    }

    /// Joins the cluster `member` describes (`--cluster`): names, presence
    /// and offers for receivers elsewhere go through it from now on.
    pub async fn join_cluster(&mut self, member: Member) -> Result<(), BrokerError> {
        let cluster = Cluster::join(member, self.state.metrics.kv_seconds()).await?;
        // Names this broker bound while it stood alone join the cluster's.
        match crate::cluster::names::upload(&cluster, &self.state.registry).await {
            Ok((0, 0)) => {}
            Ok((created, overruled)) => {
                info!(
                    created,
                    overruled, "this broker's earlier bindings brought into the cluster"
                )
            }
            Err(e) => {
                return Err(BrokerError::Cluster(
                    crate::cluster::ClusterError::Unreachable(e),
                ));
            }
        }
        self.subjects = Some(cluster.subscribe().await?);
        // Stored transfers live in the cluster, where every broker finds them.
        let shared = SharedMailbox::open(
            cluster.client().clone(),
            &cluster.jetstream(),
            (cluster.member().id.clone(), self.store_staging.clone()),
            self.store_limits.clone(),
        )
        .await;
        let shared = match shared {
            Ok(m) => match m.stored_news().await {
                Ok(news) => Ok((m, news)),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        let state = Arc::get_mut(&mut self.state)
            .ok_or_else(|| BrokerError::Cert("the broker is already serving".into()))?;
        if let Some(Storage::Disk(local)) = &state.mailbox
            && local.usage().transfers > 0
        {
            warn!(
                transfers = local.usage().transfers,
                "transfers stored while this broker stood alone stay on its disk, undelivered, until it stands alone again"
            );
        }
        state.mailbox = match shared {
            Ok((m, news)) => {
                self.stored_news = Some(news);
                Some(Storage::Shared(Arc::new(m)))
            }
            Err(e) => {
                warn!(error = %e, "no mailbox: transfers for offline receivers are refused");
                None
            }
        };
        state.cluster = Some(Arc::new(cluster));
        Ok(())
    }

    /// Serves `/metrics` and `/healthz` on `listener` while the broker runs
    /// (`--metrics`); with `agent_labels`, offers are also counted by sender
    /// name (`--metrics-agent-labels`).
    pub fn serve_metrics(
        &mut self,
        listener: TcpListener,
        agent_labels: bool,
    ) -> Result<(), BrokerError> {
        let state = Arc::get_mut(&mut self.state)
            .ok_or_else(|| BrokerError::Cert("the broker is already serving".into()))?;
        if agent_labels {
            state.metrics.with_agent_labels();
        }
        self.metrics = Some(listener);
        Ok(())
    }

    /// The fingerprint agents pin.
    pub fn fingerprint(&self) -> Fingerprint {
        self.state.fingerprint
    }

    /// Serves `listener` until `shutdown` completes, then shuts down
    /// gracefully (see the module docs) and returns when every connection
    /// task ended.
    pub async fn run(mut self, listener: TcpListener, shutdown: impl Future) {
        let (alive, mut all_ended) = mpsc::channel::<()>(1);
        tokio::pin!(shutdown);
        if let (Some(cluster), Some(subjects)) = (self.state.cluster.clone(), self.subjects.take())
        {
            let (state, alive) = (Arc::clone(&self.state), Alive(alive.clone()));
            tokio::spawn(member::run(state, cluster, subjects, alive));
        }
        let metrics = self
            .metrics
            .take()
            .map(|l| AbortOnDrop(tokio::spawn(http::serve(l, Arc::clone(&self.state)))));
        let sweeper = self
            .state
            .mailbox
            .clone()
            .map(|m| AbortOnDrop(tokio::spawn(sweep(m))));
        let news = self
            .stored_news
            .take()
            .map(|n| AbortOnDrop(tokio::spawn(wake_couriers(Arc::clone(&self.state), n))));
        loop {
            let accepted = tokio::select! {
                _ = &mut shutdown => break,
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let guard = match self.state.conns.admit_new(peer.ip()) {
                Ok(g) => g,
                Err(NoPlace::Total) => {
                    self.state.metrics.refused_by(Limit::Connections);
                    warn!(%peer, "connection refused: connection limit reached");
                    continue;
                }
                Err(NoPlace::PerIp) => {
                    self.state.metrics.refused_by(Limit::ConnectionsPerIp);
                    warn!(%peer, limit = self.state.limits.max_connections_per_ip, "connection refused: per-address limit reached");
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            // The kernel notices a peer gone silent, also mid-transfer.
            let _ = keyferry_common::io::tcp::keep_alive(&tcp);
            let (state, alive) = (Arc::clone(&self.state), Alive(alive.clone()));
            tokio::spawn(async move {
                let _alive = alive;
                match session::handle(state, tcp, guard).await {
                    Ok(()) => {}
                    Err(SessionError::Conn(ConnError::Io(e))) => {
                        debug!(%peer, error = %e, "connection ended")
                    }
                    Err(e @ SessionError::Tls(_)) => info!(%peer, error = %e, "connection cut off"),
                    Err(e) => warn!(%peer, error = %e, "connection cut off"),
                }
            });
        }
        drop(listener);
        let grace = self.state.limits.shutdown_grace;
        info!(
            relaying = self.state.transfers.relaying_total(),
            grace_seconds = grace.as_secs(),
            "shutting down: no longer accepting; running transfers may finish"
        );
        self.phase.send_replace(Phase::Draining);
        drop(alive);
        if tokio::time::timeout(grace, all_ended.recv()).await.is_err() {
            let cut = self.state.transfers.relaying_total();
            warn!(
                cut,
                "grace period over: cutting the transfers still running"
            );
            self.phase.send_replace(Phase::Cut);
            let _ = tokio::time::timeout(CUT_WAIT, all_ended.recv()).await;
        }
        drop(metrics);
        drop((sweeper, news));
        info!("shut down");
    }
}

/// Wakes the courier of each receiver connected here that a broker of the
/// cluster says it stored a transfer for.
async fn wake_couriers(state: Arc<State>, mut news: async_nats::Subscriber) {
    use futures_util::StreamExt as _;
    while let Some(m) = news.next().await {
        let name = std::str::from_utf8(&m.payload)
            .ok()
            .and_then(|s| keyferry_common::name::AgentName::new(s).ok());
        if let Some(name) = name {
            state.couriers.kick(&name);
        }
    }
}

/// Deletes stored transfers past their age, every second on a standalone
/// broker (whose mailbox keeps its index in memory: a sweep with nothing due
/// costs a lock and a scan), every few seconds in a cluster.
async fn sweep(mailbox: Storage) {
    let mut every = tokio::time::interval(mailbox.sweep_every());
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        match mailbox.expire(now).await {
            Ok(gone) => {
                for meta in gone {
                    info!(transfer = %meta.id, from = %meta.from, to = %meta.to, "stored transfer expired undelivered: deleted");
                }
            }
            Err(e) => warn!(error = %e, "mailbox: expiry postponed"),
        }
    }
}
