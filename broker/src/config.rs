//! The broker's limits, with their defaults.

use std::time::Duration;

/// Limits on what peers may do.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Time for the TLS handshake plus `Hello` and `Auth`.
    pub handshake_timeout: Duration,
    /// Longest silence on a sender connection or in a relay before it is cut.
    pub idle_timeout: Duration,
    /// How long a sender waits for the receiver to accept or refuse.
    pub answer_timeout: Duration,
    /// Most simultaneous connections.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            answer_timeout: Duration::from_secs(60),
            max_connections: 4096,
        }
    }
}
