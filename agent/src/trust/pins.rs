//! Trust on first use: the known-peers and known-brokers files (PROTOCOL.md §1.4).
//!
//! A pin file maps a key (an agent name, or a broker address) to the fingerprint
//! first seen for it and when. It is parsed whole into a model and rewritten whole
//! (temporary file, fsync, rename, directory fsync) under an exclusive lock, so
//! concurrent agents never lose each other's pins. A file that does not parse is a
//! hard error: silently re-pinning would undo the protection the file exists for.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use thiserror::Error;

use keyferry_common::identity::Fingerprint;
use keyferry_common::io::fs::{Place, write_private};

/// Errors from a pin file.
#[derive(Debug, Error)]
pub enum PinError {
    /// The presented key differs from the pinned one.
    #[error(
        "KEY MISMATCH for {key}: pinned {pinned}, but it now presents {presented}. \
         This may be an attack. If the key really changed, verify the new fingerprint \
         out of band and remove the line for {key} from {file}"
    )]
    Mismatch {
        /// What was looked up (agent name or broker address).
        key: String,
        /// The fingerprint in the pin file.
        pinned: Fingerprint,
        /// The fingerprint presented now.
        presented: Fingerprint,
        /// The pin file.
        file: PathBuf,
    },
    /// The pin file does not parse.
    #[error("pin file {file} is corrupt at line {line}; fix or remove that line")]
    Corrupt {
        /// The pin file.
        file: PathBuf,
        /// 1-based line number.
        line: usize,
    },
    /// The key is not something that may be pinned (whitespace, controls, too long).
    #[error("cannot pin an empty key or one with spaces or control characters")]
    BadKey,
    /// Reading, locking or writing the file failed.
    #[error("pin file {file}: {source}")]
    Io {
        /// The pin file.
        file: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// One pinned key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pin {
    /// The pinned fingerprint.
    pub fingerprint: Fingerprint,
    /// When it was first pinned, in Unix seconds.
    pub pinned_at: u64,
}

/// The outcome of [`PinStore::check_or_pin`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinCheck {
    /// The key matched an existing pin.
    Known(Pin),
    /// There was no pin: this key is now pinned (first contact).
    NewlyPinned(Pin),
}

impl PinCheck {
    /// The pin now in force.
    pub fn pin(&self) -> Pin {
        match *self {
            Self::Known(p) | Self::NewlyPinned(p) => p,
        }
    }
}

/// A pin file on disk.
#[derive(Debug, Clone)]
pub struct PinStore {
    path: PathBuf,
}

const HEADER: &str =
    "# keyferry pins: <name or address> <SHA256:fingerprint> <first pinned, unix seconds>\n";

fn valid_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= 255 && key.bytes().all(|b| b.is_ascii_graphic())
}

impl PinStore {
    /// The pin file at `path` (created on the first pin).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, source: std::io::Error) -> PinError {
        PinError::Io {
            file: self.path.clone(),
            source,
        }
    }

    fn lock(&self) -> Result<File, PinError> {
        let mut lock_path = self.path.clone().into_os_string();
        lock_path.push(".lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(lock_path)
            .map_err(|e| self.io(e))?;
        f.lock().map_err(|e| self.io(e))?;
        Ok(f)
    }

    fn read(&self) -> Result<BTreeMap<String, Pin>, PinError> {
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(self.io(e)),
        };
        let mut pins = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let corrupt = || PinError::Corrupt {
                file: self.path.clone(),
                line: i + 1,
            };
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split(' ');
            let (Some(key), Some(fp), Some(at), None) =
                (fields.next(), fields.next(), fields.next(), fields.next())
            else {
                return Err(corrupt());
            };
            let fingerprint = fp.parse().map_err(|_| corrupt())?;
            let pinned_at = at.parse().map_err(|_| corrupt())?;
            if !valid_key(key)
                || pins
                    .insert(
                        key.to_owned(),
                        Pin {
                            fingerprint,
                            pinned_at,
                        },
                    )
                    .is_some()
            {
                return Err(corrupt());
            }
        }
        Ok(pins)
    }

    fn write(&self, pins: &BTreeMap<String, Pin>) -> Result<(), PinError> {
        let mut text = String::from(HEADER);
        for (key, pin) in pins {
            text.push_str(&format!("{key} {} {}\n", pin.fingerprint, pin.pinned_at));
        }
        write_private(&self.path, text.as_bytes(), Place::Replace).map_err(|e| self.io(e))
    }

    /// The pin for `key`, if any.
    pub fn get(&self, key: &str) -> Result<Option<Pin>, PinError> {
        let _lock = self.lock()?;
        Ok(self.read()?.get(key).copied())
    }

    /// Checks `presented` against the pin for `key`, pinning it if there is none.
    pub fn check_or_pin(
        &self,
        key: &str,
        presented: Fingerprint,
        now_unix: u64,
    ) -> Result<PinCheck, PinError> {
        if !valid_key(key) {
            return Err(PinError::BadKey);
        }
        let _lock = self.lock()?;
        let mut pins = self.read()?;
        match pins.get(key) {
            Some(pin) if pin.fingerprint == presented => Ok(PinCheck::Known(*pin)),
            Some(pin) => Err(PinError::Mismatch {
                key: key.to_owned(),
                pinned: pin.fingerprint,
                presented,
                file: self.path.clone(),
            }),
            None => {
                let pin = Pin {
                    fingerprint: presented,
                    pinned_at: now_unix,
                };
                pins.insert(key.to_owned(), pin);
                self.write(&pins)?;
                Ok(PinCheck::NewlyPinned(pin))
            }
        }
    }

    /// Requires `key` to be pinned to exactly `expected`, pinning it if it has no
    /// pin yet (`--broker-fingerprint`, `--peer-fingerprint`).
    pub fn require(
        &self,
        key: &str,
        expected: Fingerprint,
        presented: Fingerprint,
        now_unix: u64,
    ) -> Result<PinCheck, PinError> {
        if expected != presented {
            return Err(PinError::Mismatch {
                key: key.to_owned(),
                pinned: expected,
                presented,
                file: self.path.clone(),
            });
        }
        self.check_or_pin(key, presented, now_unix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(b: u8) -> Fingerprint {
        Fingerprint([b; 32])
    }

    fn temp_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "keyferry-pins-{}",
            keyferry_common::io::fs::temp_sibling(Path::new("x")).display()
        ));
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn first_use_pins_then_matches_then_refuses_a_mismatch() {
        let dir = temp_dir();
        let store = PinStore::new(dir.join("known_peers"));
        assert!(matches!(
            store.check_or_pin("bob", fp(1), 10).unwrap(),
            PinCheck::NewlyPinned(_)
        ));
        assert_eq!(
            store.check_or_pin("bob", fp(1), 20).unwrap(),
            PinCheck::Known(Pin {
                fingerprint: fp(1),
                pinned_at: 10
            })
        );
        let err = store.check_or_pin("bob", fp(2), 30).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&fp(1).to_string()) && msg.contains(&fp(2).to_string()),
            "{msg}"
        );
        // Another key is independent, and both survive a rewrite.
        store.check_or_pin("alice", fp(3), 40).unwrap();
        assert_eq!(store.get("bob").unwrap().unwrap().fingerprint, fp(1));
        assert_eq!(store.get("alice").unwrap().unwrap().fingerprint, fp(3));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_corrupt_file_is_a_hard_error() {
        let dir = temp_dir();
        let path = dir.join("known_peers");
        for bad in [
            "bob SHA256:nope 1\n",
            "bob\n",
            &format!("bob {} x\n", fp(1)),
            &format!("bob {} 1 extra\n", fp(1)),
            &format!("bob {0} 1\nbob {0} 2\n", fp(1)),
        ] {
            fs::write(&path, bad).unwrap();
            let store = PinStore::new(&path);
            assert!(
                matches!(
                    store.check_or_pin("bob", fp(1), 1),
                    Err(PinError::Corrupt { .. })
                ),
                "{bad:?}"
            );
        }
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn require_refuses_a_different_key_even_on_first_use() {
        let dir = temp_dir();
        let store = PinStore::new(dir.join("known_brokers"));
        assert!(store.require("127.0.0.1:1", fp(1), fp(2), 1).is_err());
        assert!(store.get("127.0.0.1:1").unwrap().is_none());
        store.require("127.0.0.1:1", fp(1), fp(1), 1).unwrap();
        assert!(store.check_or_pin("bad key", fp(1), 1).is_err());
        fs::remove_dir_all(dir).unwrap();
    }
}
