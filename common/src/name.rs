//! Agent names: short tokens, validated on construction (PROTOCOL.md §1.3).
//!
//! A name matches `^[a-z0-9][a-z0-9._-]{0,31}$`. Names are refused before they
//! reach a pin file, a log line or a path, so they never need escaping.

use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;
use thiserror::Error;

/// Longest name accepted.
pub const MAX_NAME_LEN: usize = 32;

/// A name that is not a valid agent name.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error(
    "invalid agent name {shown}: a name is 1 to 32 of a-z 0-9 . _ - and starts with a letter or digit"
)]
pub struct InvalidName {
    /// The refused name, escaped for printing.
    pub shown: String,
}

/// A validated agent name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct AgentName(String);

impl AgentName {
    /// Validates `name`.
    pub fn new(name: &str) -> Result<Self, InvalidName> {
        let bytes = name.as_bytes();
        let ok = !bytes.is_empty()
            && bytes.len() <= MAX_NAME_LEN
            && matches!(bytes[0], b'a'..=b'z' | b'0'..=b'9')
            && bytes
                .iter()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'));
        if ok {
            Ok(Self(name.to_owned()))
        } else {
            Err(InvalidName {
                shown: format!("{:?}", crate::text::escape(&truncate(name))),
            })
        }
    }

    /// The default name for a local user: the user name, lowercased.
    pub fn from_user(user: &str) -> Result<Self, InvalidName> {
        Self::new(&user.to_lowercase())
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

impl fmt::Display for AgentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for AgentName {
    type Err = InvalidName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl<'de> Deserialize<'de> for AgentName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_tokens_and_refuses_everything_else() {
        for ok in ["a", "bob", "0", "alice.b_c-d", &"x".repeat(32)] {
            assert!(AgentName::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            ".a",
            "_a",
            "Bob",
            "a b",
            "a/b",
            "a\0",
            "é",
            "a\n",
            &"x".repeat(33),
        ] {
            assert!(AgentName::new(bad).is_err(), "{bad:?}");
        }
        assert_eq!(AgentName::from_user("Alice").unwrap().as_str(), "alice");
    }

    #[test]
    fn deserializing_validates() {
        let bytes = postcard::to_stdvec("Bad Name").unwrap();
        assert!(postcard::from_bytes::<AgentName>(&bytes).is_err());
        let bytes = postcard::to_stdvec("good").unwrap();
        assert_eq!(
            postcard::from_bytes::<AgentName>(&bytes).unwrap().as_str(),
            "good"
        );
    }
}
