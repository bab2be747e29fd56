//! The keyferry broker: authenticates agents and relays their traffic without
//! being able to read it.
//!
//! `main.rs` parses arguments and calls [`Broker::open`] then [`Broker::run`];
//! the tests in `broker/tests/` do the same with a listener bound to
//! `127.0.0.1:0`.
//!
//! Layers, bottom up, as the imports really are:
//!
//! * leaves: [`config`] (limits, access policy), [`cert`] (the TLS identity),
//!   [`conns`] (places under the connection limits), [`registry`] (names,
//!   keys, who is online), [`transfers`] (one transfer's life), [`tickets`]
//!   (the data connections' tickets, and uploads to several receivers),
//!   [`routes`] (routed transfers' sender tickets, for uploads fed to other
//!   brokers), [`metrics`] (what the sessions count and a scrape reads off
//!   the state; its `http` part serves it, `--metrics`), [`mailbox`]
//!   (stored transfers for offline receivers, their receipts, and prekeys:
//!   state only, on disk), [`error`];
//! * [`relay`]: pumping one transfer's bytes between its two data
//!   connections, never opening a record; [`fanout`]: one upload copied to
//!   several receivers, each with a bounded queue;
//! * [`shutdown`]: the phase every task watches; [`splice`]: record bodies
//!   moved socket to socket in the kernel;
//! * [`handoff`] (a leaf): tickets for data connections that end at the
//!   broker itself (a stored transfer's upload, its delivery);
//! * [`stored`]: a stored transfer's bytes moved between a data connection
//!   and the [`mailbox`];
//! * [`state`]: what every connection shares — state only, no sockets;
//! * [`feed`]: an upload fed on to the brokers of receivers elsewhere in
//!   the cluster, one copy each;
//! * [`data`] (admitting a data connection by its ticket) and [`session`]
//!   (authentication, then the sender's or receiver's session);
//! * [`logs`]: the log output, human or JSON, filtered by `RUST_LOG`;
//! * [`cluster`] (a leaf beside the registry): NATS, the names, presence and
//!   brokers buckets, and what brokers say to each other;
//! * [`member`]: this broker's subjects and heartbeat in a cluster;
//! * [`server`]: the accept loop, the caps, the graceful shutdown.

#![forbid(unsafe_code)]

pub mod cert;
pub mod cluster;
pub mod config;
pub mod conns;
pub mod data;
pub mod error;
pub mod fanout;
pub mod feed;
pub mod handoff;
pub mod logs;
pub mod mailbox;
pub mod member;
pub mod metrics;
pub mod quiet;
pub mod registry;
pub mod relay;
pub mod routes;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod splice;
pub mod state;
pub mod stored;
pub mod tickets;
pub mod transfers;

pub use config::{AccessPolicy, Limits};
pub use error::BrokerError;
pub use server::Broker;

/// The address the broker listens on, and agents connect to, by default.
pub const DEFAULT_ADDR: &str = "127.0.0.1:7447";
