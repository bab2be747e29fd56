//! What brokers of a cluster say to each other over NATS, in postcard (the
//! encoding of the agent protocol): presence values, routed offers and their
//! answers. Everything end-to-end stays opaque: a routed offer carries the
//! signed offer bytes as the sender sent them, its answer the receiver's
//! accept bytes. Every payload is bounded and parsed as hostile.

use keyferry_common::name::AgentName;
use keyferry_common::wire::message::{ErrorCode, RefuseReason, SignedOffer};
use serde::{Deserialize, Serialize};

/// Largest payload a broker accepts from the cluster.
pub const MAX_PAYLOAD: usize = 64 << 10;

/// A presence entry: which broker holds a receiver, and how busy it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    /// The holding broker's id.
    pub broker: String,
    /// Its advertised address.
    pub address: String,
    /// Transfers being relayed to that receiver (as of the last heartbeat).
    pub incoming: u32,
}

/// An offer for a receiver held by another broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutedOffer {
    /// The receiver's name.
    pub to: AgentName,
    /// The sender, as its broker authenticated it.
    pub from: AgentName,
    /// The sender's registered key (SPKI DER).
    #[serde(with = "serde_bytes")]
    pub spki: Vec<u8>,
    /// The signed offer as the sender sent it.
    pub offer: SignedOffer,
}

/// The receiver's broker's answer to a routed offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RoutedAnswer {
    /// Accepted: the accept bytes for the sender, the sender's one-time
    /// ticket, and where to open its data connection.
    Accepted {
        /// The receiver's accept.
        #[serde(with = "serde_bytes")]
        accept: Vec<u8>,
        /// The sender's ticket.
        ticket: [u8; 32],
        /// The receiver's broker's advertised address.
        address: String,
    },
    /// The receiver refused.
    Refused(RefuseReason),
    /// The offer could not be delivered or answered.
    Failed {
        /// What the sender's broker tells its agent.
        code: ErrorCode,
        /// Why.
        detail: String,
    },
}

/// Encodes a value for the cluster.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // postcard into a Vec fails only when serialisation itself fails, which
    // these plain types cannot.
    postcard::to_stdvec(value).unwrap_or_default()
}

/// Decodes a payload from the cluster, refusing oversized or malformed ones.
pub fn decode<T: for<'de> Deserialize<'de>>(payload: &[u8]) -> Option<T> {
    if payload.len() > MAX_PAYLOAD {
        return None;
    }
    match postcard::take_from_bytes(payload) {
        Ok((value, [])) => Some(value),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_hostile_ones_are_refused() {
        let p = Presence {
            broker: "b1".into(),
            address: "127.0.0.1:7447".into(),
            incoming: 2,
        };
        let bytes = encode(&p);
        assert_eq!(decode::<Presence>(&bytes), Some(p));
        // Truncated, trailing bytes, oversized: refused.
        assert_eq!(decode::<Presence>(&bytes[..bytes.len() - 1]), None);
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode::<Presence>(&longer), None);
        assert_eq!(decode::<Presence>(&vec![0; MAX_PAYLOAD + 1]), None);
        let a = RoutedAnswer::Failed {
            code: ErrorCode::PeerOffline,
            detail: "gone".into(),
        };
        assert_eq!(decode::<RoutedAnswer>(&encode(&a)), Some(a));
        // A name that is not a valid agent name does not decode.
        let bad = RoutedOffer {
            to: AgentName::new("bob").unwrap(),
            from: AgentName::new("alice").unwrap(),
            spki: vec![1],
            offer: SignedOffer {
                body: vec![],
                signature: vec![],
            },
        };
        let mut raw = encode(&bad);
        raw[1] = b'B';
        assert_eq!(decode::<RoutedOffer>(&raw), None);
    }
}
