//! The broker's start-up errors (per-connection problems are logged, not fatal).

use std::path::PathBuf;

use thiserror::Error;

/// Why the broker cannot start.
#[derive(Debug, Error)]
pub enum BrokerError {
    /// The data dir (or a file in it) cannot be used.
    #[error("data dir {path}: {source}")]
    DataDir {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The certificate cannot be created or loaded.
    #[error("broker certificate: {0}")]
    Cert(String),
    /// The registry database cannot be opened.
    #[error("registry database {path}: {detail}")]
    Database {
        /// The path.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// TLS configuration failed.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}
