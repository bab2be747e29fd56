//! The broker's metrics (`broker --metrics ADDR`): what the sessions count as
//! they go (offers by outcome, refusals, handshake failures, bytes relayed,
//! transfers' ends and speeds, cluster operations), and what a scrape reads
//! off the state at that moment (connections by state, receivers online,
//! transfers running, the cluster's connection, the process's memory,
//! descriptors and CPU). Served as Prometheus text by [`http`].
//!
//! No label carries a key, a file name, an address or a transfer id: every
//! label value is one of a few fixed words, except agent names, and those
//! only when the operator asks (`--metrics-agent-labels`). State only: it
//! holds no socket.

pub mod http;
mod labels;
mod process;

pub use labels::{End, Handshake, Limit, Offer, Path};
use labels::{HANDSHAKES, LIMITS, OUTCOMES, REASONS, refusal};

use std::time::Duration;

use keyferry_common::name::AgentName;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// Most agent names with series of their own (`--metrics-agent-labels`).
pub const MOST_NAMES: usize = 1000;
/// The label of the names beyond [`MOST_NAMES`] (not a valid agent name).
const OTHER_NAMES: &str = "(others)";

/// Labels that are fixed words.
type Words = Vec<(&'static str, &'static str)>;
/// An agent's name as a label (`--metrics-agent-labels` only).
type Named = Vec<(&'static str, String)>;

/// The counters a relay moves as bytes pass: what came from the sender, and
/// what went to receivers (each copy, in an upload to several).
#[derive(Debug, Clone)]
pub struct Meters {
    /// Bytes read from the sender's data connection.
    pub received: Counter,
    /// Bytes written to receivers (or to the brokers feeding them).
    pub relayed: Counter,
}

/// What a scrape reads off the broker's state at that moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reading {
    /// Connections open, and how many of them are not yet authenticated.
    pub connections: (usize, usize),
    /// Sender connections, receiver connections, distinct names.
    pub online: (usize, usize, usize),
    /// Transfers running to receivers here.
    pub running: u32,
    /// Whether the cluster's NATS connection is up.
    pub cluster_connected: bool,
}

/// Every metric of the broker, registered once.
pub struct Metrics {
    registry: Registry,
    agent_labels: bool,
    connections: Family<Words, Gauge>,
    agents_online: Gauge,
    receivers_online: Gauge,
    transfers_running: Gauge,
    offers: Family<Words, Counter>,
    refusals: Family<Words, Counter>,
    agent_offers: Family<Named, Counter>,
    /// The names with series of their own (at most [`MOST_NAMES`]).
    named: std::sync::Mutex<std::collections::HashSet<AgentName>>,
    transfers: Family<Words, Counter>,
    relayed: Family<Words, Counter>,
    received: Counter,
    throughput: Histogram,
    handshake_failures: Family<Words, Counter>,
    limits: Family<Words, Counter>,
    cluster_connected: Gauge,
    cluster_brokers: Gauge,
    kv_seconds: Histogram,
    process: process::Process,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("agent_labels", &self.agent_labels)
            .finish_non_exhaustive()
    }
}

impl Metrics {
    /// Registers every metric; agent names become labels only with
    /// `agent_labels`.
    pub fn new(agent_labels: bool) -> Self {
        let mut metrics = Self::without_names();
        if agent_labels {
            metrics.with_agent_labels();
        }
        metrics
    }

    /// Counts offers by sender name too, from now on
    /// (`--metrics-agent-labels`).
    pub fn with_agent_labels(&mut self) {
        if !self.agent_labels {
            self.agent_labels = true;
            self.registry
                .sub_registry_with_prefix("keyferry_broker")
                .register(
                    "agent_offers",
                    "Offers by sender name and outcome (--metrics-agent-labels)",
                    self.agent_offers.clone(),
                );
        }
    }

    fn without_names() -> Self {
        let mut root = Registry::default();
        let r = root.sub_registry_with_prefix("keyferry_broker");
        let connections = Family::<Words, Gauge>::default();
        r.register(
            "connections",
            "Open connections by state: handshake (not yet authenticated or redeemed), sender, receiver, data",
            connections.clone(),
        );
        let agents_online = Gauge::default();
        r.register(
            "agents_online",
            "Distinct agent names with an authenticated connection",
            agents_online.clone(),
        );
        let receivers_online = Gauge::default();
        r.register(
            "receivers_online",
            "Receivers connected to this broker",
            receivers_online.clone(),
        );
        let transfers_running = Gauge::default();
        r.register(
            "transfers_running",
            "Transfers accepted and not yet ended, to receivers on this broker",
            transfers_running.clone(),
        );
        let offers = Family::<Words, Counter>::default();
        r.register(
            "offers",
            "Offers by senders on this broker, by outcome",
            offers.clone(),
        );
        let refusals = Family::<Words, Counter>::default();
        r.register(
            "offer_refusals",
            "Offers refused by their receiver, by the receiver's reason",
            refusals.clone(),
        );
        let agent_offers = Family::<Named, Counter>::default();
        let transfers = Family::<Words, Counter>::default();
        r.register(
            "transfers",
            "Transfers whose relay ended here, by outcome (not_relayed: the agents went direct, or one left)",
            transfers.clone(),
        );
        let relayed = Family::<Words, Counter>::default();
        r.register_with_unit(
            "relayed",
            "Bytes relayed from senders to receivers, by path (local, routed through the cluster, fanout copies, stored: delivered from the mailbox)",
            Unit::Bytes,
            relayed.clone(),
        );
        let received = Counter::default();
        r.register_with_unit(
            "received",
            "Bytes received from senders' data connections: one copy of each upload, however many receivers it goes to (stored uploads included)",
            Unit::Bytes,
            received.clone(),
        );
        // 64 KiB/s to 16 GiB/s, ×4 a step.
        let throughput = Histogram::new(exponential_buckets(65_536.0, 4.0, 10));
        r.register(
            "relay_throughput_bytes_per_second",
            "Each relayed transfer's bytes over its duration",
            throughput.clone(),
        );
        let handshake_failures = Family::<Words, Counter>::default();
        r.register(
            "handshake_failures",
            "Connections that never authenticated, by reason",
            handshake_failures.clone(),
        );
        let limits = Family::<Words, Counter>::default();
        r.register(
            "limit_refusals",
            "Connections and offers refused by a limit of this broker, by limit",
            limits.clone(),
        );
        let cluster_connected = Gauge::default();
        r.register(
            "cluster_connected",
            "1 while the connection to the cluster's NATS is up (0 without --cluster)",
            cluster_connected.clone(),
        );
        let cluster_brokers = Gauge::default();
        r.register(
            "cluster_brokers",
            "Brokers of the cluster seen alive at the last heartbeat, this one included",
            cluster_brokers.clone(),
        );
        // 0.5 ms to 8 s, ×2 a step.
        let kv_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 15));
        r.register_with_unit(
            "cluster_kv_operation_duration",
            "Time each operation on the cluster's key-value buckets took",
            Unit::Seconds,
            kv_seconds.clone(),
        );
        let process = process::Process::register(root.sub_registry_with_prefix("process"));
        // Every series that can appear starts at 0, so that a rate over the
        // first increase is right and dashboards see the names at once.
        let zero = |family: &Family<Words, Counter>, key: &'static str, values: &[&'static str]| {
            for v in values {
                let _ = family.get_or_create(&vec![(key, *v)]);
            }
        };
        zero(&offers, "outcome", &OUTCOMES);
        zero(&refusals, "reason", &REASONS);
        zero(
            &transfers,
            "outcome",
            &["finished", "failed", "not_relayed"],
        );
        zero(&relayed, "path", &["local", "routed", "fanout"]);
        zero(&handshake_failures, "reason", &HANDSHAKES);
        zero(&limits, "limit", &LIMITS);
        Self {
            registry: root,
            agent_labels: false,
            connections,
            agents_online,
            receivers_online,
            transfers_running,
            offers,
            refusals,
            agent_offers,
            named: std::sync::Mutex::default(),
            transfers,
            relayed,
            received,
            throughput,
            handshake_failures,
            limits,
            cluster_connected,
            cluster_brokers,
            kv_seconds,
            process,
        }
    }

    /// An offer by `from` ended as `offer`.
    pub fn offer(&self, from: &AgentName, offer: Offer) {
        self.offers
            .get_or_create(&vec![("outcome", offer.outcome())])
            .inc();
        if let Offer::Refused(reason) = offer {
            self.refusals
                .get_or_create(&vec![("reason", refusal(reason))])
                .inc();
        }
        if self.agent_labels {
            // Names are made by whoever registers them: past MOST_NAMES,
            // new ones are counted together, so a scrape stays bounded.
            let agent = {
                let mut named = keyferry_common::sync::lock(&self.named);
                if named.contains(from) || named.len() < MOST_NAMES {
                    named.insert(from.clone());
                    from.to_string()
                } else {
                    OTHER_NAMES.to_owned()
                }
            };
            self.agent_offers
                .get_or_create(&vec![
                    ("agent", agent),
                    ("outcome", offer.outcome().to_owned()),
                ])
                .inc();
        }
    }

    /// A connection failed its handshake.
    pub fn handshake_failed(&self, why: Handshake) {
        self.handshake_failures
            .get_or_create(&vec![("reason", why.label())])
            .inc();
    }

    /// A limit refused a connection or an offer.
    pub fn refused_by(&self, limit: Limit) {
        self.limits
            .get_or_create(&vec![("limit", limit.label())])
            .inc();
    }

    /// The counters a relay along `path` moves as bytes pass.
    pub fn meters(&self, path: Path) -> Meters {
        Meters {
            received: self.received.clone(),
            relayed: self
                .relayed
                .get_or_create(&vec![("path", path.label())])
                .clone(),
        }
    }

    /// A transfer's relay ended: `bytes` moved in `elapsed`.
    pub fn transfer_ended(&self, end: End, bytes: u64, elapsed: Duration) {
        self.transfers
            .get_or_create(&vec![("outcome", end.label())])
            .inc();
        let secs = elapsed.as_secs_f64();
        if bytes > 0 && secs > 0.0 {
            #[allow(clippy::cast_precision_loss)]
            self.throughput.observe(bytes as f64 / secs);
        }
    }

    /// The histogram the cluster's key-value operations go into.
    pub fn kv_seconds(&self) -> Histogram {
        self.kv_seconds.clone()
    }

    /// How many brokers of the cluster the last heartbeat saw alive.
    pub fn cluster_brokers(&self, n: usize) {
        self.cluster_brokers
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The Prometheus text of every metric, with the gauges set from `now`.
    pub fn scrape(&self, now: &Reading) -> String {
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        let (total, pending) = now.connections;
        let (senders, receivers, names) = now.online;
        let data = total.saturating_sub(pending + senders + receivers);
        for (label, n) in [
            ("handshake", pending),
            ("sender", senders),
            ("receiver", receivers),
            ("data", data),
        ] {
            self.connections
                .get_or_create(&vec![("state", label)])
                .set(gauge(n));
        }
        self.agents_online.set(gauge(names));
        self.receivers_online.set(gauge(receivers));
        self.transfers_running.set(i64::from(now.running));
        self.cluster_connected.set(i64::from(now.cluster_connected));
        self.process.refresh();
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyferry_common::wire::message::RefuseReason;

    #[test]
    fn counters_carry_fixed_words_and_agent_names_only_when_asked() {
        let m = Metrics::new(false);
        let alice = AgentName::new("alice").unwrap();
        m.offer(&alice, Offer::Refused(RefuseReason::NotListed));
        m.refused_by(Limit::OffersPerMinute);
        let mut out = String::new();
        prometheus_text::encode(&mut out, &m.registry).unwrap();
        assert!(out.contains("keyferry_broker_offers_total{outcome=\"refused\"} 1"));
        assert!(out.contains("keyferry_broker_offer_refusals_total{reason=\"not_listed\"} 1"));
        assert!(
            out.contains("keyferry_broker_limit_refusals_total{limit=\"offers_per_minute\"} 1")
        );
        assert!(!out.contains("alice"), "{out}");
        let named = Metrics::new(true);
        named.offer(&alice, Offer::Accepted);
        let mut out = String::new();
        prometheus_text::encode(&mut out, &named.registry).unwrap();
        assert!(out.contains("agent=\"alice\""), "{out}");
    }

    #[test]
    fn the_label_lists_name_every_variant() {
        let reasons = [
            RefuseReason::TooLarge { most: 0 },
            RefuseReason::Busy,
            RefuseReason::KeyMismatch,
            RefuseReason::VerificationFailed,
            RefuseReason::Policy,
            RefuseReason::TryLater { seconds: 0 },
            RefuseReason::NotListed,
            RefuseReason::NotKnown,
        ];
        assert_eq!(reasons.map(refusal), REASONS);
        let offers = [
            Offer::Accepted,
            Offer::Refused(RefuseReason::Busy),
            Offer::TimedOut,
            Offer::Offline,
            Offer::ReceiverLeft,
            Offer::RateLimited,
            Offer::Failed,
        ];
        assert_eq!(offers.map(Offer::outcome), OUTCOMES);
        let handshakes = [
            Handshake::Tls,
            Handshake::Timeout,
            Handshake::Version,
            Handshake::Protocol,
            Handshake::Signature,
            Handshake::Policy,
            Handshake::NameTaken,
            Handshake::Registry,
            Handshake::Evicted,
            Handshake::Ticket,
        ];
        assert_eq!(handshakes.map(Handshake::label), HANDSHAKES);
        let limits = [
            Limit::Connections,
            Limit::ConnectionsPerIp,
            Limit::OffersPerMinute,
            Limit::TransfersPerAgent,
        ];
        assert_eq!(limits.map(Limit::label), LIMITS);
    }
}
