//! A SHA-256 state kept between two attempts of a transfer (PROTOCOL.md
//! §6.4, §7.3): serialized as sha2 lays it out (104 bytes: the eight state
//! words, the block count, the buffered bytes and their count), so that a
//! resume continues the hash of the whole data without reading the prefix
//! again. Whoever keeps one must keep it where nobody else can change it
//! (both journals are MACed under a key in the agent's home).

use sha2::Sha256;
use sha2::digest::common::hazmat::SerializableState;

/// The largest serialized state read back.
pub const MAX_STATE: usize = 256;

/// `h`'s state as bytes.
pub fn serialize(h: &Sha256) -> Vec<u8> {
    h.serialize().to_vec()
}

/// A state from [`serialize`]'s bytes; `None` if they are not one.
pub fn deserialize(bytes: &[u8]) -> Option<Sha256> {
    Sha256::deserialize(bytes.try_into().ok()?).ok()
}

#[cfg(test)]
mod tests {
    use sha2::Digest as _;

    use super::*;

    #[test]
    fn a_state_continues_where_it_stood() {
        let mut h = Sha256::new();
        h.update(b"the first part, not a whole block");
        let bytes = serialize(&h);
        assert!(bytes.len() <= MAX_STATE);
        let mut again = deserialize(&bytes).unwrap();
        h.update(b" and the rest");
        again.update(b" and the rest");
        assert_eq!(h.finalize(), again.finalize());
        assert!(deserialize(&bytes[1..]).is_none());
    }
}
