//! The keyferry agent: the sender and receiver roles over a keyferry broker.
//!
//! `main.rs` parses the command line ([`cli`]) and calls [`run`]; everything a
//! user can do goes through the same code the integration tests drive.

#![forbid(unsafe_code)]

pub mod cli;
pub mod client;
pub mod error;
pub mod home;
pub mod output;
pub mod progress;
pub mod receive;
pub mod send;

pub use cli::{Args, run};
pub use error::AgentError;
