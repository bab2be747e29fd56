//! What an agent signs to prove its identity to the broker (PROTOCOL.md §2.4).
//!
//! The signature binds the TLS session (an exporter value, with the broker's
//! nonce as exporter context), the nonce itself, the agent's name, the
//! connection's role, the agent's key fingerprint and the broker's certificate
//! fingerprint. It cannot be replayed on another connection, to another broker,
//! for another name or role.

use crate::encode::Encoder;
use crate::identity::Fingerprint;
use crate::name::AgentName;
use crate::wire::message::Role;

/// Signature context of broker authentication.
pub const CONTEXT: &str = "keyferry/v1 broker-auth";
/// TLS exporter label (RFC 8446 §7.5); the broker's nonce is the exporter context.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-keyferry/v1 broker-auth";
/// Length of the exported keying material.
pub const EXPORTER_LEN: usize = 32;

/// The message an agent signs under [`CONTEXT`].
pub fn message(
    exporter: &[u8; EXPORTER_LEN],
    nonce: &[u8; 32],
    name: &AgentName,
    role: Role,
    agent_fp: &Fingerprint,
    broker_fp: &Fingerprint,
) -> Vec<u8> {
    Encoder::default()
        .fixed(exporter)
        .fixed(nonce)
        .bytes(name.as_str().as_bytes())
        .u8(role.code())
        .fixed(agent_fp.as_bytes())
        .fixed(broker_fp.as_bytes())
        .finish()
}
