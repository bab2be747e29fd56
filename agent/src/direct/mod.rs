//! The direct path between two agents (PROTOCOL.md §2.7): a receiver listens
//! and names its addresses in its authenticated accept ([`listen`]); the
//! sender dials them and the two prove to each other, under the pair's
//! direct key, that the connection belongs to this transfer ([`dial`]); the
//! stream then crosses it exactly as it would cross the broker's relay, on
//! a long path spread over several connections ([`lanes`]).

pub mod dial;
pub mod lanes;
pub mod listen;
pub mod punch;
pub mod seen;

use std::fmt;
use std::time::Duration;

use keyferry_common::handshake::direct::DirectMode;
use serde::Serialize;

/// How long one side waits for the other's proof on a direct connection.
pub const PROOF_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a sender tries to connect to a receiver's addresses before it
/// takes the relay (a refused or unreachable address fails at once; only a
/// firewall that drops the packets costs the whole time).
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(1);

/// The first address `addr` (`HOST:PORT`, e.g. the broker's) resolves to,
/// within 1 s; `None` if it does not.
pub async fn resolve(addr: &str) -> Option<std::net::SocketAddr> {
    let lookup = tokio::net::lookup_host(addr);
    tokio::time::timeout(Duration::from_secs(1), lookup)
        .await
        .ok()?
        .ok()?
        .next()
}

/// `--direct`: which paths this agent uses for a stream.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DirectOpt {
    /// A direct connection when one works, the broker's relay otherwise.
    #[default]
    Auto,
    /// The relay only; a receiver announces no address.
    Never,
    /// A direct connection only; fail (exit 13) rather than relay.
    Only,
}

impl DirectOpt {
    /// The mode a receiver's accept announces.
    pub fn mode(self) -> DirectMode {
        match self {
            Self::Auto => DirectMode::Auto,
            Self::Never => DirectMode::Never,
            Self::Only => DirectMode::Only,
        }
    }
}

/// Which path carried a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Path {
    /// A connection between the two agents.
    Direct,
    /// The broker's relay.
    Relay,
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Direct => "direct",
            Self::Relay => "relayed",
        })
    }
}
