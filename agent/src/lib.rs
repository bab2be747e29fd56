//! The keyferry agent: the sender and receiver roles over a keyferry broker.
//!
//! `main.rs` parses the command line ([`cli`]) and calls [`run`]; everything a
//! user can do goes through the same code the integration tests drive.
//!
//! Layers, bottom up, as the imports really are:
//!
//! * [`error`] (every way a run can end, with its exit code), [`progress`]
//!   (the only module that knows indicatif), [`logline`] (stderr lines as
//!   text or JSON);
//! * [`trust`] (pins, RSA budgets, replayed ids) and [`home`] (the home
//!   directory, the key file, the pin files);
//! * [`mailbox`]: the receiver's prekeys and the sender's record of what it
//!   stored for a receiver who was offline (files only);
//! * [`client`]: connecting to the broker, pinning it, authenticating, data
//!   connections;
//! * the roles: [`send`] (look up, pin, offer, the sealing pipeline) and
//!   [`receive`] (the offer gate, the stream, files placed by descriptor);
//! * [`cli`]: the command line and what each invocation does.

#![forbid(unsafe_code)]

pub mod chat;
pub mod cli;
pub mod client;
pub mod direct;
pub mod early;
pub mod error;
pub mod home;
pub mod logline;
pub mod mailbox;
pub mod output;
pub mod progress;
pub mod prompt;
pub mod receive;
pub mod relay_lanes;
pub mod send;
pub mod streams;
pub mod trust;

pub use cli::{Args, run};
pub use error::AgentError;
