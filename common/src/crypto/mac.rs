//! HMAC-SHA256 tags over several parts, checked in constant time.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::AuthError;
use super::keys::MacKey;

/// Length of a full HMAC-SHA256 tag; truncated tags are never accepted.
pub const TAG_LEN: usize = 32;

fn mac_over(key: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC accepts keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac
}

/// The tag over the concatenation of `parts`.
pub fn tag(key: &MacKey, parts: &[&[u8]]) -> [u8; TAG_LEN] {
    tag_raw(key.expose(), parts)
}

/// [`tag`] for a key given as bytes (the Wycheproof harness uses other key sizes).
pub fn tag_raw(key: &[u8], parts: &[&[u8]]) -> [u8; TAG_LEN] {
    mac_over(key, parts).finalize().into_bytes().into()
}

/// Checks `tag` in constant time; a tag that is not exactly 32 bytes fails.
pub fn verify(key: &MacKey, parts: &[&[u8]], tag: &[u8]) -> Result<(), AuthError> {
    verify_raw(key.expose(), parts, tag)
}

/// [`verify`] for a key given as bytes.
pub fn verify_raw(key: &[u8], parts: &[&[u8]], tag: &[u8]) -> Result<(), AuthError> {
    mac_over(key, parts)
        .verify_slice(tag)
        .map_err(|_| AuthError)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_concatenated_and_short_tags_fail() {
        let key = MacKey::from_bytes([7; 32]);
        let t = tag(&key, &[b"ab", b"c"]);
        assert_eq!(t, tag(&key, &[b"abc"]));
        verify(&key, &[b"abc"], &t).unwrap();
        assert_eq!(verify(&key, &[b"abc"], &t[..16]), Err(AuthError));
        assert_eq!(verify(&key, &[b"abd"], &t), Err(AuthError));
    }
}
