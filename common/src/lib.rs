//! keyferry's shared core: everything the broker and the agents must agree on.
//!
//! Layers, bottom up, as the imports really are — nothing lower imports
//! anything higher:
//!
//! 1. Leaves: [`encode`] (hand-built encodings of everything signed or MACed),
//!    [`ids`], [`name`], [`text`] (escaping peer text), [`units`], [`sync`].
//! 2. [`crypto`]: AES-256-CBC, HMAC-SHA256, HKDF, RSA-OAEP/PSS, X25519, behind
//!    typed, zeroizing keys and one opaque authentication error.
//! 3. [`identity`]: RSA identities, public keys, fingerprints, the key policy.
//! 4. [`schedule`]: every HKDF call of a transfer, and the session-key ratchet.
//! 5. [`wire`]: what travels, as bytes — record layouts, the frame codec, the
//!    messages, the chunk fast path.
//! 6. [`handshake`] (offer and accept), [`auth`] (what an agent signs for the
//!    broker), [`transfer`] (the sender's and receiver's stream state
//!    machines): sans-IO, frames in, frames out.
//! 7. [`io`] (default-on feature `io`): frames over tokio streams, TLS
//!    configurations and the pinning verifier, durable file writes. Without the
//!    feature the crate builds with neither tokio nor rustls.
//!
//! Guards that only the receiving agent needs (pins, RSA budgets, the replay
//! guard, file names from the wire) live in the agent, not here.
//!
//! `docs/PROTOCOL.md` in the repository is the specification this crate implements.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod auth;
pub mod chat;
pub mod crypto;
pub mod encode;
pub mod handshake;
pub mod hashstate;
pub mod identity;
pub mod ids;
#[cfg(feature = "io")]
pub mod io;
pub mod manifest;
pub mod name;
pub mod schedule;
pub mod sync;
pub mod text;
pub mod transfer;
pub mod units;
pub mod wire;

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 9;

/// The one line an agent and a broker of different protocol versions show:
/// both versions, and which side to upgrade.
pub fn version_mismatch(agent: u16, broker: u16) -> String {
    let upgrade = if agent < broker { "agent" } else { "broker" };
    format!(
        "this agent speaks keyferry protocol version {agent} and the broker version {broker}: \
         upgrade the {upgrade}"
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_version_mismatch_names_both_versions_and_the_side_to_upgrade() {
        assert_eq!(
            super::version_mismatch(1, 2),
            "this agent speaks keyferry protocol version 1 and the broker version 2: upgrade the agent"
        );
        assert!(super::version_mismatch(3, 2).ends_with("upgrade the broker"));
    }
}
