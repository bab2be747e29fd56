//! The edges: frames over async streams ([`connection`]), the TLS 1.3
//! configurations and the agents' pinning verifier ([`tls`]), durable
//! private file writes ([`fs`]), keepalive options for TCP ([`tcp`]), one
//! stream over several TCP connections ([`lanes`]), and a task aborted with
//! its handle ([`task`]).
//!
//! Behind the default-on `io` cargo feature: without it the crate is the
//! protocol alone (no tokio, no rustls), which is what the fuzz targets and
//! benchmarks need. Nothing in the protocol core imports this module.

pub mod connection;
pub mod fs;
pub mod lanes;
pub mod task;
pub mod tcp;
pub mod tls;
