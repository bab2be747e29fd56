//! What a receiver's accept says about a direct connection (PROTOCOL.md §2.7):
//! whether it takes one, whether it also takes the relay, and the addresses
//! where it listens; and the proofs the two agents exchange on such a
//! connection, under the pair's direct key, so that it is known to belong to
//! this transfer and this pair before a record crosses it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::crypto::AuthError;
use crate::crypto::keys::MacKey;
use crate::crypto::mac;
use crate::encode::{DecodeError, Decoder, Encoder};
use crate::ids::TransferId;

/// Most candidate addresses one accept carries.
pub const MAX_CANDIDATES: usize = 8;
/// Most addresses a sender names for a simultaneous open (its terms'
/// `punch`): one per address family.
pub const MAX_PUNCH: usize = 2;

/// Proof labels, one per side.
mod label {
    /// The sender's first frame on a direct connection.
    pub const SENDER: &str = "keyferry/v5 direct-sender";
    /// The receiver's answer.
    pub const RECEIVER: &str = "keyferry/v5 direct-receiver";
    /// The sender's proof on the first of several connections (version 8).
    pub const LANES: &str = "keyferry/v8 direct-lanes";
    /// The sender's proof on each further connection (version 8).
    pub const LANE: &str = "keyferry/v8 direct-lane";
}

/// Most connections one stream is spread over (PROTOCOL.md §2.7).
pub const MAX_LANES: u8 = 8;

/// Which paths a receiver takes for the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectMode {
    /// The relay only: no address announced (`--direct never`).
    Never = 0,
    /// A direct connection if one works, else the relay.
    Auto = 1,
    /// A direct connection only (`--direct only`).
    Only = 2,
}

/// The accept's direct fields: the receiver's mode, where it listens, and
/// where it connects out from for a simultaneous open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectTerms {
    /// Which paths the receiver takes.
    pub mode: DirectMode,
    /// Where it listens, best first (none with [`DirectMode::Never`]).
    pub candidates: Vec<SocketAddr>,
    /// Where it connects out from to the sender's `punch` addresses (its
    /// outside address and a port of its own): dialled only from the
    /// sender's own `punch` port, again and again for a while (PROTOCOL.md
    /// §2.7). None with [`DirectMode::Never`].
    pub punch: Vec<SocketAddr>,
}

/// The family byte of a simultaneous-open address: the family's (4 or 6)
/// with this bit set.
const PUNCH_BIT: u8 = 0x80;

impl DirectTerms {
    /// The relay only, no address.
    pub fn never() -> Self {
        Self {
            mode: DirectMode::Never,
            candidates: Vec::new(),
            punch: Vec::new(),
        }
    }

    /// `u8 mode ‖ u8 n ‖ n × (u8 family ‖ address ‖ u16 port)`: the
    /// listening addresses (family 4 or 6), then the simultaneous-open ones
    /// (family 0x84 or 0x86). At most [`MAX_CANDIDATES`] in all are written
    /// (the simultaneous-open ones first kept); none for
    /// [`DirectMode::Never`].
    pub(super) fn to_bytes(&self) -> Vec<u8> {
        let (listen, punch): (&[SocketAddr], &[SocketAddr]) = match self.mode {
            DirectMode::Never => (&[], &[]),
            _ => {
                let punch = &self.punch[..self.punch.len().min(MAX_CANDIDATES)];
                let room = MAX_CANDIDATES - punch.len();
                (&self.candidates[..self.candidates.len().min(room)], punch)
            }
        };
        let mut out = vec![self.mode as u8];
        out.push(u8::try_from(listen.len() + punch.len()).unwrap_or(0));
        for (addrs, bit) in [(listen, 0), (punch, PUNCH_BIT)] {
            for a in addrs {
                put_addr(&mut out, a, bit);
            }
        }
        out
    }

    /// Reads what [`Self::to_bytes`] wrote, refusing an unknown mode or
    /// family, more than [`MAX_CANDIDATES`], a port 0, or an address with
    /// the mode `Never`.
    pub(super) fn decode(d: &mut Decoder<'_>) -> Result<Self, DecodeError> {
        let mode = match d.u8()? {
            0 => DirectMode::Never,
            1 => DirectMode::Auto,
            2 => DirectMode::Only,
            _ => return Err(DecodeError::Unexpected),
        };
        let n = usize::from(d.u8()?);
        if n > MAX_CANDIDATES || (mode == DirectMode::Never && n > 0) {
            return Err(DecodeError::TooLong);
        }
        let (mut candidates, mut punch) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let (addr, punched) = take_addr(d, true)?;
            if punched {
                punch.push(addr);
            } else {
                candidates.push(addr);
            }
        }
        Ok(Self {
            mode,
            candidates,
            punch,
        })
    }

    /// The listening addresses worth dialling: no unspecified, multicast or
    /// broadcast address (a hostile accept's are simply skipped), each in
    /// its canonical form (an IPv4-mapped IPv6 address as IPv4).
    pub fn dialable(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.candidates.iter().filter_map(dialable)
    }

    /// The simultaneous-open addresses worth dialling, likewise.
    pub fn punch_dialable(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.punch.iter().filter_map(dialable)
    }
}

/// `c` in its canonical form (an IPv4-mapped IPv6 address as IPv4), if it
/// is worth a connection attempt: not an unspecified, multicast or
/// broadcast address.
pub fn dialable(c: &SocketAddr) -> Option<SocketAddr> {
    let ip = c.ip().to_canonical();
    let worth = match ip {
        IpAddr::V4(a) => !(a.is_unspecified() || a.is_multicast() || a.is_broadcast()),
        IpAddr::V6(a) => !(a.is_unspecified() || a.is_multicast()),
    };
    worth.then(|| SocketAddr::new(ip, c.port()))
}

/// `u8 family ‖ address ‖ u16 port`, family 4 (4 bytes) or 6 (16 bytes),
/// with `bit` or'ed into the family byte.
fn put_addr(out: &mut Vec<u8>, c: &SocketAddr, bit: u8) {
    match c.ip() {
        IpAddr::V4(a) => {
            out.push(4 | bit);
            out.extend_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            out.push(6 | bit);
            out.extend_from_slice(&a.octets());
        }
    }
    out.extend_from_slice(&c.port().to_be_bytes());
}

/// Reads what [`put_addr`] wrote: a known family (with [`PUNCH_BIT`] only if
/// `punch_bit` allows it; the result says whether it was set) and a port
/// other than 0.
fn take_addr(d: &mut Decoder<'_>, punch_bit: bool) -> Result<(SocketAddr, bool), DecodeError> {
    let family = d.u8()?;
    let punched = punch_bit && family & PUNCH_BIT != 0;
    let ip = match family & !(if punched { PUNCH_BIT } else { 0 }) {
        4 => IpAddr::V4(Ipv4Addr::from(d.array::<4>()?)),
        6 => IpAddr::V6(Ipv6Addr::from(d.array::<16>()?)),
        _ => return Err(DecodeError::Unexpected),
    };
    let port = d.u16()?;
    if port == 0 {
        return Err(DecodeError::Unexpected);
    }
    Ok((SocketAddr::new(ip, port), punched))
}

/// The sender's addresses for a simultaneous open (the terms' `punch`
/// field, PROTOCOL.md §2.7), encoded: `u8 n ‖ n × (u8 family ‖ address ‖
/// u16 port)`, at most [`MAX_PUNCH`] written; empty for none.
pub fn punch_to_bytes(addrs: &[SocketAddr]) -> Vec<u8> {
    let addrs = &addrs[..addrs.len().min(MAX_PUNCH)];
    if addrs.is_empty() {
        return Vec::new();
    }
    let mut out = vec![u8::try_from(addrs.len()).unwrap_or(0)];
    for a in addrs {
        put_addr(&mut out, a, 0);
    }
    out
}

/// The terms' `punch` field, read back: empty bytes are no address; `n` of
/// 0 or more than [`MAX_PUNCH`], a family other than 4 or 6, a port 0 or
/// trailing bytes are refused.
pub fn punch_from_bytes(bytes: &[u8]) -> Result<Vec<SocketAddr>, DecodeError> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let mut d = Decoder::new(bytes);
    let n = usize::from(d.u8()?);
    if n == 0 || n > MAX_PUNCH {
        return Err(DecodeError::TooLong);
    }
    let mut addrs = Vec::with_capacity(n);
    for _ in 0..n {
        addrs.push(take_addr(&mut d, false)?.0);
    }
    d.finish()?;
    Ok(addrs)
}

/// The challenges of one direct connection: the sender's and the
/// receiver's, 32 fresh random bytes each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Challenges {
    /// The sender's (in `DirectHello`).
    pub sender: [u8; 32],
    /// The receiver's (in `DirectChallenge`).
    pub receiver: [u8; 32],
}

/// What every proof on a direct connection covers: its label, the
/// transfer, both challenges.
fn proof_encoder(label: &str, tid: &TransferId, c: &Challenges) -> Encoder {
    let mut e = Encoder::new(label);
    e.fixed(&tid.0).fixed(&c.sender).fixed(&c.receiver);
    e
}

fn proof_input(label: &str, tid: &TransferId, c: &Challenges) -> Vec<u8> {
    proof_encoder(label, tid, c).finish()
}

/// The sender's proof on a direct connection of transfer `tid` that carries
/// the stream alone (`DirectProof`).
pub fn sender_proof(key: &MacKey, tid: &TransferId, c: &Challenges) -> [u8; 32] {
    LaneProof::First(1).tag(key, tid, c)
}

/// The receiver's proof on a direct connection of transfer `tid`.
pub fn receiver_proof(key: &MacKey, tid: &TransferId, c: &Challenges) -> [u8; 32] {
    mac::tag(key, &[&proof_input(label::RECEIVER, tid, c)])
}

/// What the sender's proof on a direct connection says: the first of `n`
/// connections, or the further one numbered `n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaneProof {
    /// The first connection, of `n` in all: `DirectProof` (version 5's
    /// proof, no count) for 1, `DirectLanes{lanes: n}` for more.
    First(u8),
    /// `DirectLane{lane: n}`: further connection number `n`.
    Further(u8),
}

impl LaneProof {
    fn input(self, tid: &TransferId, c: &Challenges) -> Vec<u8> {
        let (label, n) = match self {
            Self::First(1) => return proof_input(label::SENDER, tid, c),
            Self::First(n) => (label::LANES, n),
            Self::Further(n) => (label::LANE, n),
        };
        proof_encoder(label, tid, c).u8(n).finish()
    }

    /// The sender's proof.
    pub fn tag(self, key: &MacKey, tid: &TransferId, c: &Challenges) -> [u8; 32] {
        mac::tag(key, &[&self.input(tid, c)])
    }

    /// Checks the sender's proof, in constant time.
    pub fn verify(
        self,
        key: &MacKey,
        tid: &TransferId,
        c: &Challenges,
        proof: &[u8; 32],
    ) -> Result<(), AuthError> {
        mac::verify(key, &[&self.input(tid, c)], proof)
    }
}

/// Checks the sender's proof of [`sender_proof`], in constant time.
pub fn verify_sender(
    key: &MacKey,
    tid: &TransferId,
    c: &Challenges,
    proof: &[u8; 32],
) -> Result<(), AuthError> {
    LaneProof::First(1).verify(key, tid, c, proof)
}

/// Checks the receiver's proof, in constant time.
pub fn verify_receiver(
    key: &MacKey,
    tid: &TransferId,
    c: &Challenges,
    proof: &[u8; 32],
) -> Result<(), AuthError> {
    mac::verify(key, &[&proof_input(label::RECEIVER, tid, c)], proof)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn round_trip(t: &DirectTerms) -> Result<DirectTerms, DecodeError> {
        let bytes = t.to_bytes();
        let mut d = Decoder::new(&bytes);
        let back = DirectTerms::decode(&mut d)?;
        d.finish()?;
        Ok(back)
    }

    #[test]
    fn candidates_of_both_families_survive_and_never_carries_none() {
        let t = DirectTerms {
            mode: DirectMode::Auto,
            candidates: vec![
                "192.168.1.20:40000".parse().unwrap(),
                "[2001:db8::7]:443".parse().unwrap(),
            ],
            punch: vec!["203.0.113.9:40000".parse().unwrap()],
        };
        assert_eq!(round_trip(&t).unwrap(), t);
        let bytes = t.to_bytes();
        assert_eq!(bytes[..2], [1, 3]);
        assert_eq!(bytes[bytes.len() - 7..], [0x84, 203, 0, 113, 9, 0x9c, 0x40]);
        let hidden = DirectTerms {
            mode: DirectMode::Never,
            candidates: vec!["10.0.0.1:1".parse().unwrap()],
            punch: vec!["10.0.0.1:2".parse().unwrap()],
        };
        assert_eq!(round_trip(&hidden).unwrap(), DirectTerms::never());
    }

    #[test]
    fn hostile_fields_are_refused() {
        let decode = |bytes: &[u8]| DirectTerms::decode(&mut Decoder::new(bytes));
        assert!(decode(&[3, 0]).is_err(), "unknown mode");
        assert!(
            decode(&[0, 1, 4, 1, 2, 3, 4, 0, 80]).is_err(),
            "never with an address"
        );
        assert!(decode(&[1, 9]).is_err(), "too many");
        assert!(
            decode(&[1, 1, 5, 1, 2, 3, 4, 0, 80]).is_err(),
            "unknown family"
        );
        assert!(decode(&[1, 1, 4, 1, 2, 3, 4, 0, 0]).is_err(), "port 0");
        for family in [0x85, 0xc4, 0x04 | 0x40] {
            let bytes = [1, 1, family, 1, 2, 3, 4, 0, 80];
            assert!(decode(&bytes).is_err(), "family {family:#x}");
        }
        assert!(
            decode(&[0, 1, 0x84, 1, 2, 3, 4, 0, 80]).is_err(),
            "never with a simultaneous-open address"
        );
        // Eight listening addresses and one to open from: the latter kept.
        let full = DirectTerms {
            mode: DirectMode::Auto,
            candidates: (1..=8)
                .map(|i| SocketAddr::from(([10, 0, 0, i], 80)))
                .collect(),
            punch: vec!["203.0.113.9:40000".parse().unwrap()],
        };
        let back = decode(&full.to_bytes()).unwrap();
        assert_eq!((back.candidates.len(), back.punch), (7, full.punch));
        assert!(decode(&[1, 1, 4, 1, 2, 3]).is_err(), "truncated");
        assert_eq!(
            decode(&[2, 1, 4, 10, 0, 0, 2, 0x1f, 0x90])
                .unwrap()
                .candidates,
            vec!["10.0.0.2:8080".parse::<SocketAddr>().unwrap()]
        );
    }

    #[test]
    fn punch_addresses_round_trip_and_hostile_ones_are_refused() {
        let two: Vec<SocketAddr> = vec![
            "203.0.113.7:40000".parse().unwrap(),
            "[2001:db8::7]:40001".parse().unwrap(),
        ];
        let bytes = punch_to_bytes(&two);
        assert_eq!(bytes[..8], [2, 4, 203, 0, 113, 7, 0x9c, 0x40]);
        assert_eq!(punch_from_bytes(&bytes).unwrap(), two);
        assert_eq!(punch_from_bytes(&[]).unwrap(), Vec::<SocketAddr>::new());
        // Only two are ever written.
        let three = [two.clone(), vec!["10.0.0.1:1".parse().unwrap()]].concat();
        assert_eq!(punch_from_bytes(&punch_to_bytes(&three)).unwrap(), two);
        let one = [4, 10, 0, 0, 1, 0, 80];
        assert!(
            punch_from_bytes(&[&[3][..], &one, &one, &one].concat()).is_err(),
            "three"
        );
        assert!(
            punch_from_bytes(&[1, 5, 10, 0, 0, 1, 0, 80]).is_err(),
            "family"
        );
        assert!(
            punch_from_bytes(&[1, 4, 10, 0, 0, 1, 0, 0]).is_err(),
            "port 0"
        );
        assert!(
            punch_from_bytes(&[&[1][..], &one, &[0]].concat()).is_err(),
            "trailing"
        );
        assert!(punch_from_bytes(&[1, 4, 10, 0]).is_err(), "truncated");
        assert!(punch_from_bytes(&[0]).is_err(), "n of 0");
        assert!(
            punch_from_bytes(&[1, 0x84, 10, 0, 0, 1, 0, 80]).is_err(),
            "a simultaneous-open family"
        );
    }

    #[test]
    fn multicast_and_unspecified_candidates_are_not_dialled() {
        let t = DirectTerms {
            mode: DirectMode::Auto,
            candidates: [
                "0.0.0.0:5",
                "224.0.0.1:5",
                "[::]:5",
                "[::ffff:255.255.255.255]:5",
                "10.1.2.3:5",
                "[::ffff:10.1.2.4]:5",
            ]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect(),
            punch: vec!["[::ffff:10.1.2.5]:6".parse().unwrap()],
        };
        let dialled: Vec<_> = t.dialable().collect();
        let canonical = ["10.1.2.3:5", "10.1.2.4:5"].map(|a| a.parse().unwrap());
        assert_eq!(dialled, canonical);
        let punched: Vec<_> = t.punch_dialable().collect();
        assert_eq!(punched, vec!["10.1.2.5:6".parse().unwrap()]);
    }

    #[test]
    fn each_side_proves_with_its_own_label_over_both_challenges() {
        let key = MacKey::from_bytes([7; 32]);
        let tid = TransferId([1; 16]);
        let c = Challenges {
            sender: [3; 32],
            receiver: [4; 32],
        };
        let s = sender_proof(&key, &tid, &c);
        assert!(verify_sender(&key, &tid, &c, &s).is_ok());
        assert!(
            verify_receiver(&key, &tid, &c, &s).is_err(),
            "a reflected proof"
        );
        assert!(verify_sender(&key, &TransferId([2; 16]), &c, &s).is_err());
        assert!(verify_sender(&MacKey::from_bytes([8; 32]), &tid, &c, &s).is_err());
        // A proof made over other challenges (another connection) is worthless.
        for other in [
            Challenges {
                sender: [5; 32],
                ..c
            },
            Challenges {
                receiver: [5; 32],
                ..c
            },
        ] {
            assert!(verify_sender(&key, &tid, &other, &s).is_err());
        }
        let r = receiver_proof(&key, &tid, &c);
        assert!(verify_receiver(&key, &tid, &c, &r).is_ok());
    }

    #[test]
    fn a_lane_proof_is_bound_to_its_count_or_number() {
        let key = MacKey::from_bytes([7; 32]);
        let tid = TransferId([1; 16]);
        let c = Challenges {
            sender: [3; 32],
            receiver: [4; 32],
        };
        // One connection: version 5's proof, unchanged.
        let one = proof_input(label::SENDER, &tid, &c);
        assert_eq!(
            LaneProof::First(1).tag(&key, &tid, &c),
            mac::tag(&key, &[&one])
        );
        let said = [
            LaneProof::First(1),
            LaneProof::First(2),
            LaneProof::First(3),
            LaneProof::Further(1),
            LaneProof::Further(2),
        ];
        for a in said {
            let proof = a.tag(&key, &tid, &c);
            for b in said {
                assert_eq!(
                    b.verify(&key, &tid, &c, &proof).is_ok(),
                    a == b,
                    "{a:?} as {b:?}"
                );
            }
        }
    }
}
