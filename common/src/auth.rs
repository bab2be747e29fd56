//! What an agent signs to prove its identity to the broker (PROTOCOL.md §2.4).
//!
//! The signature binds the TLS session (an exporter value: TLS 1.3 derives it
//! from the whole handshake, both sides' randoms and the key exchange, so no
//! two connections share it), the agent's name, the connection's role, the
//! agent's key fingerprint and the broker's certificate fingerprint. It
//! cannot be replayed on another connection, to another broker, for another
//! name or role. Since version 6 the agent sends it in its first flight,
//! without waiting for a nonce from the broker: the exporter is that fresh
//! already.

use crate::encode::Encoder;
use crate::identity::Fingerprint;
use crate::name::AgentName;
use crate::wire::message::Role;

/// Signature context of broker authentication.
pub const CONTEXT: &str = "keyferry/v6 broker-auth";
/// TLS exporter label (RFC 8446 §7.5), used with an empty context.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-keyferry/v6 broker-auth";
/// Length of the exported keying material.
pub const EXPORTER_LEN: usize = 32;

/// The message an agent signs under [`CONTEXT`].
pub fn message(
    exporter: &[u8; EXPORTER_LEN],
    name: &AgentName,
    role: Role,
    agent_fp: &Fingerprint,
    broker_fp: &Fingerprint,
) -> Vec<u8> {
    Encoder::default()
        .fixed(exporter)
        .bytes(name.as_str().as_bytes())
        .u8(role.code())
        .fixed(agent_fp.as_bytes())
        .fixed(broker_fp.as_bytes())
        .finish()
}
