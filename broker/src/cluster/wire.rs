//! What brokers of a cluster say to each other over NATS, in postcard (the
//! encoding of the agent protocol): presence values, routed offers and their
//! answers; and the one text value, a broker's line in the brokers bucket.
//! Everything end-to-end stays opaque: a routed offer carries the signed
//! offer bytes as the sender sent them, its answer the receiver's accept
//! bytes. Every payload is bounded and parsed as hostile.

use keyferry_common::identity::Fingerprint;
use keyferry_common::name::AgentName;
use keyferry_common::wire::message::{ErrorCode, RefuseReason, SignedOffer, advertised_address_ok};
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

/// A broker's entry in the brokers bucket (PROTOCOL.md §2.6), the text
/// `ADDRESS SHA256:… policy=POLICY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerLine {
    /// Where agents reach it (`--advertise`).
    pub address: String,
    /// Its certificate's fingerprint.
    pub fingerprint: Fingerprint,
    /// Its access policy: `open`, or `sha256:` and 64 hex digits.
    pub policy: String,
}

/// Longest brokers-bucket entry that is believed.
const MAX_BROKER_LINE: usize = 1024;

impl BrokerLine {
    /// The entry's bytes.
    pub fn encode(&self) -> Vec<u8> {
        format!(
            "{} {} policy={}",
            self.address, self.fingerprint, self.policy
        )
        .into_bytes()
    }

    /// Parses an entry written by another broker; `None` for anything that
    /// is not exactly a valid address, fingerprint and policy.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        if bytes.len() > MAX_BROKER_LINE {
            return None;
        }
        let text = std::str::from_utf8(bytes).ok()?;
        let mut words = text.split(' ');
        let (address, fingerprint, policy) = (words.next()?, words.next()?, words.next()?);
        let policy = policy.strip_prefix("policy=")?;
        let policy_ok = policy == "open"
            || policy.strip_prefix("sha256:").is_some_and(|h| {
                h.len() == 64
                    && h.bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            });
        (words.next().is_none() && advertised_address_ok(address) && policy_ok).then_some(())?;
        Some(Self {
            address: address.to_owned(),
            fingerprint: fingerprint.parse().ok()?,
            policy: policy.to_owned(),
        })
    }
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

    #[test]
    fn broker_lines_round_trip_and_anything_else_is_refused() {
        let line = BrokerLine {
            address: "10.0.0.2:7700".into(),
            fingerprint: Fingerprint([7; 32]),
            policy: format!("sha256:{}", "ab".repeat(32)),
        };
        let bytes = line.encode();
        assert_eq!(BrokerLine::parse(&bytes), Some(line.clone()));
        let open = BrokerLine {
            policy: "open".into(),
            ..line.clone()
        };
        assert_eq!(BrokerLine::parse(&open.encode()), Some(open));
        let text = String::from_utf8(bytes).unwrap();
        let (addr, rest) = text.split_once(' ').unwrap();
        let (fp, _) = rest.split_once(' ').unwrap();
        for bad in [
            String::new(),
            format!("{addr} {fp}"),
            format!("{text} extra"),
            format!("{addr}  {fp} policy=open"),
            format!("{addr} {fp} open"),
            format!("{addr} {fp} policy=sha256:ab"),
            format!("{addr} {fp} policy=sha256:{}", "AB".repeat(32)),
            format!("{addr} SHA256:nope policy=open"),
            format!("10.0.0.2 {fp} policy=open"),
            format!("{addr}\n {fp} policy=open"),
            format!("{addr} {fp} policy=open\n# broker evil"),
        ] {
            assert_eq!(BrokerLine::parse(bad.as_bytes()), None, "{bad:?}");
        }
        assert_eq!(BrokerLine::parse(&[0xff, b' ', b'x']), None);
        assert_eq!(BrokerLine::parse(&vec![b'a'; MAX_BROKER_LINE + 1]), None);
    }
}
