//! The keyferry broker: authenticates agents and relays their traffic without
//! being able to read it.
//!
//! `main.rs` parses arguments and calls [`Broker::open`] then [`Broker::run`];
//! tests do the same with a listener bound to `127.0.0.1:0`.

#![forbid(unsafe_code)]

pub mod cert;
pub mod config;
pub mod data;
pub mod error;
pub mod handler;
pub mod registry;
pub mod relay;
pub mod server;

pub use config::{AccessPolicy, Limits};
pub use error::BrokerError;
pub use server::Broker;

/// The address the broker listens on, and agents connect to, by default.
pub const DEFAULT_ADDR: &str = "127.0.0.1:7447";
