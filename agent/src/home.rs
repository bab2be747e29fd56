//! The agent's home directory: the identity's key file, the pin files, and
//! the receiver's journal key.
//!
//! The home must belong to the user and must not be writable by others. The
//! identity is a PKCS#8 PEM file, created with mode 0600 (written to a
//! temporary file and hard-linked into place, so it never replaces a file),
//! opened once without following a symbolic link, and refused unless it is a
//! regular file of this user that group and others cannot access (PROTOCOL.md
//! §1.1).

use crate::output::notice;
use std::fs;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use keyferry_common::crypto::keys::MacKey;
use keyferry_common::crypto::random_array;
use keyferry_common::identity::{DEFAULT_KEY_BITS, Identity, KeyError};
use keyferry_common::io::fs::{Place, write_private};
use thiserror::Error;

use crate::trust::pins::PinStore;

/// Errors with the identity's key file.
#[derive(Debug, Error)]
pub enum KeyFileError {
    /// The key file could not be read.
    #[error("cannot read key file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The key file could not be written.
    #[error("cannot write key file {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The key file's name is a symbolic link (or not a regular file).
    #[error(
        "key file {path} is a symbolic link or not a regular file; refusing to use it. \
         Put the key itself there (mode 0600)"
    )]
    NotAFile {
        /// The file.
        path: PathBuf,
    },
    /// The key file belongs to another user.
    #[error("key file {path} belongs to another user; refusing to use it")]
    Owner {
        /// The file.
        path: PathBuf,
    },
    /// Group or others may read the private key file.
    #[error(
        "key file {path} is accessible by other users (mode {mode:03o}); refusing to use it. \
         Run `chmod 600 {path}` if the key is still secret, or move it away to create a new one"
    )]
    Insecure {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file is not a PKCS#8 PEM RSA private key.
    #[error(
        "key file {path} is not a PKCS#8 PEM RSA private key; move it away to create a new one"
    )]
    Parse {
        /// The file.
        path: PathBuf,
    },
    /// The journal key file is not 32 bytes.
    #[error(
        "key file {path} is not a journal key (32 bytes); move it away to create a new one          (interrupted transfers then start again from byte 0)"
    )]
    NotAJournalKey {
        /// The file.
        path: PathBuf,
    },
    /// The key is outside the policy, or cannot be made or encoded.
    #[error("key file {path}: {source}")]
    Key {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: KeyError,
    },
}

/// The home directory cannot be used.
#[derive(Debug, Error)]
pub enum HomeError {
    /// It cannot be created or examined.
    #[error("cannot use home directory {dir}: {source}")]
    Io {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// It belongs to another user.
    #[error("home directory {dir} belongs to another user; use a directory of your own (--home)")]
    Owner {
        /// The directory.
        dir: PathBuf,
    },
    /// Others may write in it.
    #[error(
        "home directory {dir} is writable by other users (mode {mode:03o}), who could replace \
         its keys and pins; run `chmod 700 {dir}`"
    )]
    Writable {
        /// The directory.
        dir: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

/// Loads the key file at `path`, refusing one that others may read.
///
/// The file is opened once, without following a symbolic link, and its type,
/// owner and mode are checked on the open descriptor, which is then read: no
/// name is looked up twice, so nothing can be swapped in between.
pub fn load_identity(path: &Path) -> Result<Identity, KeyFileError> {
    let bytes = read_private(path, 64 << 10)?;
    let pem = std::str::from_utf8(&bytes).map_err(|_| KeyFileError::Parse {
        path: path.to_owned(),
    })?;
    match Identity::from_pkcs8_pem(pem) {
        Some(Ok(id)) => Ok(id),
        Some(Err(source)) => Err(KeyFileError::Key {
            path: path.to_owned(),
            source,
        }),
        None => Err(KeyFileError::Parse {
            path: path.to_owned(),
        }),
    }
}

/// Reads a private file of at most `max` bytes: opened once without
/// following a link, and refused unless the descriptor is a regular file of
/// this user that group and others cannot access.
pub(crate) fn read_private(
    path: &Path,
    max: usize,
) -> Result<zeroize::Zeroizing<Vec<u8>>, KeyFileError> {
    use rustix::fs::{FileType, Mode, OFlags};
    use std::io::Read as _;
    let read_err = |source| KeyFileError::Read {
        path: path.to_owned(),
        source,
    };
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let fd = match rustix::fs::open(path, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::LOOP) => {
            return Err(KeyFileError::NotAFile {
                path: path.to_owned(),
            });
        }
        Err(e) => return Err(read_err(e.into())),
    };
    let st = rustix::fs::fstat(&fd).map_err(|e| read_err(e.into()))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(KeyFileError::NotAFile {
            path: path.to_owned(),
        });
    }
    if st.st_uid != rustix::process::geteuid().as_raw() {
        return Err(KeyFileError::Owner {
            path: path.to_owned(),
        });
    }
    let mode = st.st_mode & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Insecure {
            path: path.to_owned(),
            mode,
        });
    }
    // Sized up front, so no copy of the key is left behind by a regrowth.
    let size = usize::try_from(st.st_size).unwrap_or(0).min(max);
    let mut out = zeroize::Zeroizing::new(Vec::with_capacity(size + 1));
    fs::File::from(fd)
        .take(max as u64)
        .read_to_end(&mut out)
        .map_err(read_err)?;
    Ok(out)
}

/// Writes `identity` to a new key file at `path` (mode 0600); never replaces a
/// file. The PEM goes to a temporary file first and is hard-linked into place,
/// so a crash never leaves a half-written key under the real name.
pub fn save_identity(identity: &Identity, path: &Path) -> Result<(), KeyFileError> {
    let pem = identity
        .to_pkcs8_pem()
        .map_err(|source| KeyFileError::Key {
            path: path.to_owned(),
            source,
        })?;
    write_private(path, pem.as_bytes(), Place::New).map_err(|source| KeyFileError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Loads the key at `path`, or creates and saves a new one of `bits` if there
/// is none. Returns whether it was created.
pub fn load_or_create_identity(path: &Path, bits: usize) -> Result<(Identity, bool), KeyFileError> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok((load_identity(path)?, false)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = Identity::generate(bits).map_err(|source| KeyFileError::Key {
                path: path.to_owned(),
                source,
            })?;
            save_identity(&id, path)?;
            Ok((id, true))
        }
        Err(source) => Err(KeyFileError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Paths inside a home directory.
#[derive(Debug, Clone)]
pub struct Home {
    dir: PathBuf,
}

impl Home {
    /// `dir`, created with mode 0700 if missing. An existing one must belong
    /// to this user and must not be writable by others: whoever can write in
    /// it can replace the pin files or the identity.
    pub fn open(dir: PathBuf) -> Result<Self, HomeError> {
        let io = |source| HomeError::Io {
            dir: dir.clone(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io)?;
        let meta = fs::metadata(&dir).map_err(io)?;
        if meta.uid() != rustix::process::geteuid().as_raw() {
            return Err(HomeError::Owner { dir });
        }
        if meta.mode() & 0o022 != 0 {
            let mode = meta.mode() & 0o777;
            return Err(HomeError::Writable { dir, mode });
        }
        Ok(Self { dir })
    }

    /// The default home: `$XDG_CONFIG_HOME/keyferry` or `~/.config/keyferry`.
    pub fn default_dir() -> Option<PathBuf> {
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
        Some(base.join("keyferry"))
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Loads the identity, creating it on first run (printing its fingerprint).
    pub fn identity(&self) -> Result<Identity, KeyFileError> {
        let path = self.dir.join("identity.pem");
        let (id, created) = load_or_create_identity(&path, DEFAULT_KEY_BITS)?;
        if created {
            notice!(
                "created identity {} with fingerprint {}",
                path.display(),
                id.fingerprint()
            );
        }
        Ok(id)
    }

    /// The key a receiver's journals are MACed under (`journal.key`: 32
    /// random bytes, mode 0600), made on first use. It never leaves the
    /// home, so a journal in an out dir others can write is not believed
    /// unless this receiver wrote it.
    pub fn journal_key(&self) -> Result<MacKey, KeyFileError> {
        let path = self.dir.join("journal.key");
        for _ in 0..2 {
            match read_private(&path, 64) {
                Ok(bytes) => {
                    let key: [u8; 32] = bytes[..]
                        .try_into()
                        .map_err(|_| KeyFileError::NotAJournalKey { path: path.clone() })?;
                    return Ok(MacKey::from_bytes(key));
                }
                Err(KeyFileError::Read { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    let key = zeroize::Zeroizing::new(random_array::<32>());
                    match write_private(&path, &key[..], Place::New) {
                        Ok(()) => return Ok(MacKey::from_bytes(*key)),
                        // Another receiver made it first: read that one.
                        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                        Err(source) => return Err(KeyFileError::Write { path, source }),
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(KeyFileError::NotAJournalKey { path })
    }

    /// Pins of broker certificates.
    pub fn known_brokers(&self) -> PinStore {
        PinStore::new(self.dir.join("known_brokers"))
    }

    /// Pins of peer keys.
    pub fn known_peers(&self) -> PinStore {
        PinStore::new(self.dir.join("known_peers"))
    }
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn fixture(name: &str) -> Identity {
        let path = format!(
            "{}/../common/tests/fixtures/{name}.pem",
            env!("CARGO_MANIFEST_DIR")
        );
        let pem = fs::read_to_string(path).expect("fixture exists");
        Identity::from_pkcs8_pem(&pem)
            .expect("fixture is PKCS#8")
            .expect("fixture fits the key policy")
    }

    #[test]
    fn key_files_are_private_and_parse_errors_are_clear() {
        let dir = std::env::temp_dir().join(format!("keyferry-keys-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("identity.pem");
        let alice = fixture("alice");
        save_identity(&alice, &path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            load_identity(&path).unwrap().fingerprint(),
            alice.fingerprint()
        );
        // Never replaces an existing key file.
        assert!(save_identity(&alice, &path).is_err());
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);

        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let err = load_identity(&path).unwrap_err();
        assert!(
            matches!(err, KeyFileError::Insecure { mode: 0o640, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"));

        let corrupt = dir.join("corrupt.pem");
        fs::write(&corrupt, "-----BEGIN PRIVATE KEY-----\nnot base64\n").unwrap();
        fs::set_permissions(&corrupt, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            load_identity(&corrupt),
            Err(KeyFileError::Parse { .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
