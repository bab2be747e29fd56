//! The broker's errors: why it cannot start ([`BrokerError`]), and why one
//! connection ended early ([`SessionError`], logged, never fatal).

use std::path::PathBuf;

use keyferry_common::io::connection::ConnError;
use thiserror::Error;

use crate::registry::RegistryError;

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
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The cluster cannot be joined.
    #[error("cluster: {0}")]
    Cluster(#[from] crate::cluster::ClusterError),
    /// TLS configuration failed.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// Why a connection ended early.
#[derive(Debug, Error)]
pub enum SessionError {
    /// TLS failed or timed out.
    #[error("TLS handshake: {0}")]
    Tls(String),
    /// The connection failed.
    #[error(transparent)]
    Conn(#[from] ConnError),
    /// We refused the peer (it was told why, where it could be).
    #[error("refused: {0}")]
    Refused(String),
}
