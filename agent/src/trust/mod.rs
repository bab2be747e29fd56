//! What an agent trusts, and how much: pinned keys of brokers and peers
//! ([`pins`], trust on first use), how many RSA decryptions each sender may
//! drive ([`budget`]), and which transfer ids were already seen ([`replay`]).
//!
//! Plain state, no sockets: the receive and send paths consult these guards
//! in the order PROTOCOL.md §3.3 gives.

pub mod budget;
pub mod pins;
pub mod replay;
