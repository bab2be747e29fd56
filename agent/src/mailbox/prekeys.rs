//! A receiver's prekeys: one file per bundle in `<home>/prekeys/` (mode 0600,
//! in a 0700 directory), holding the signed bundle and its private halves.
//! A one-time prekey's file is deleted once the stored transfer that used it
//! was placed or refused; every file is deleted once no stored transfer can
//! still name it (its expiry plus the longest a stored offer stays valid).
//! Deleting the file is what makes a stored transfer forward secret.

use std::fs;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};

use keyferry_common::crypto::ecdh::PrekeySecret;
use keyferry_common::encode::{Decoder, Encoder};
use keyferry_common::handshake::prekey::{
    Bundle, BundleKind, MAX_BUNDLE_LEN, PrekeyKeys, make_bundle, own_bundle,
};
use keyferry_common::handshake::stored::MAX_STORED_AGE_SECS;
use keyferry_common::identity::Identity;
use keyferry_common::io::fs::{Place, sync_parent, write_private};
use keyferry_common::name::AgentName;

/// How long a one-time bundle may be handed out: 30 days.
pub const ONE_TIME_VALIDITY: u64 = 30 * 24 * 3600;
/// How long a last-resort bundle may be handed out: 14 days (rotated when
/// less than [`ROTATE_BEFORE`] is left).
pub const LAST_RESORT_VALIDITY: u64 = 14 * 24 * 3600;
/// A last-resort bundle with less than this left is replaced.
pub const ROTATE_BEFORE: u64 = 7 * 24 * 3600;
/// Fewer one-time bundles than this at the broker and the receiver tops up...
pub const LOW_WATER: u32 = 8;
/// ... to this many.
pub const TARGET: u32 = 16;

/// The prekey directory of one home.
#[derive(Debug, Clone)]
pub struct Prekeys {
    dir: PathBuf,
}

fn file_name(id: &[u8; 16]) -> String {
    hex::encode(id)
}

impl Prekeys {
    /// The prekey directory of `home` (made, 0700, if missing).
    pub fn open(home: &Path) -> std::io::Result<Self> {
        let dir = home.join("prekeys");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        Ok(Self { dir })
    }

    /// Makes a bundle, keeps its private halves (durably, before the bundle
    /// can leave this machine) and returns the signed bundle to deposit.
    pub fn make(
        &self,
        identity: &Identity,
        me: &AgentName,
        kind: BundleKind,
        now: u64,
    ) -> std::io::Result<(Vec<u8>, Bundle)> {
        let validity = match kind {
            BundleKind::OneTime => ONE_TIME_VALIDITY,
            BundleKind::LastResort => LAST_RESORT_VALIDITY,
        };
        let (signed, bundle, keys) = make_bundle(identity, me, kind, now, validity);
        let contents = zeroize::Zeroizing::new(
            Encoder::default()
                .bytes(&signed)
                .fixed(&*keys.x25519.to_bytes())
                .fixed(&*keys.kem_seed)
                .finish(),
        );
        write_private(&self.dir.join(file_name(&bundle.id)), &contents, Place::New)?;
        Ok((signed, bundle))
    }

    /// The bundle `id` and its private halves, if this home still holds them.
    pub fn load(&self, id: &[u8; 16]) -> Result<Option<(Bundle, PrekeyKeys)>, LoadError> {
        let path = self.dir.join(file_name(id));
        if fs::symlink_metadata(&path).is_err() {
            return Ok(None);
        }
        let bytes = crate::home::read_private(&path, MAX_BUNDLE_LEN + 256)
            .map_err(|e| LoadError::Unreadable(e.to_string()))?;
        let corrupt = || LoadError::Corrupt(format!("{} is not a prekey file", path.display()));
        let mut d = Decoder::new(&bytes);
        let signed = d.bytes(MAX_BUNDLE_LEN).map_err(|_| corrupt())?;
        let x: [u8; 32] = d.array().map_err(|_| corrupt())?;
        let seed: [u8; 64] = d.array().map_err(|_| corrupt())?;
        d.finish().map_err(|_| corrupt())?;
        let bundle = own_bundle(signed).map_err(|_| corrupt())?;
        if &bundle.id != id {
            return Err(corrupt());
        }
        let keys = PrekeyKeys {
            x25519: PrekeySecret::from_bytes(x),
            kem_seed: zeroize::Zeroizing::new(seed),
        };
        Ok(Some((bundle, keys)))
    }

    /// Deletes bundle `id`'s private halves, durably.
    pub fn remove(&self, id: &[u8; 16]) -> std::io::Result<()> {
        let path = self.dir.join(file_name(id));
        match fs::remove_file(&path) {
            Ok(()) => sync_parent(&path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Deletes every prekey no stored transfer can name any more (expired
    /// longer ago than a stored offer stays valid); how many went.
    pub fn sweep(&self, now: u64) -> usize {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return 0;
        };
        let mut removed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name();
            // What a crash mid-write left (`.<id>.tmp-…`): gone after an hour.
            if name
                .to_str()
                .is_some_and(|n| n.starts_with('.') && n.contains(".tmp-"))
                && entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().is_ok_and(|age| age.as_secs() > 3600))
                && fs::remove_file(entry.path()).is_ok()
            {
                removed += 1;
                continue;
            }
            let Some(id) = name
                .to_str()
                .and_then(|n| hex::decode(n).ok())
                .and_then(|v| <[u8; 16]>::try_from(v).ok())
            else {
                continue;
            };
            // A file that cannot be read now (its mode, the disk) is left
            // alone; one that was read and is no prekey goes.
            let dead = match self.load(&id) {
                Ok(Some((b, _))) => b.expires.saturating_add(MAX_STORED_AGE_SECS) < now,
                Ok(None) | Err(LoadError::Unreadable(_)) => false,
                Err(LoadError::Corrupt(_)) => true,
            };
            if dead && self.remove(&id).is_ok() {
                removed += 1;
            }
        }
        removed
    }

    /// How many prekey files this home holds.
    pub fn count(&self) -> usize {
        fs::read_dir(&self.dir).map_or(0, |e| e.flatten().count())
    }

    /// The directory (for tests and messages).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Why a prekey file was not loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadError {
    /// It cannot be read now (its mode, its owner, the disk).
    Unreadable(String),
    /// It was read, and is not a prekey file of this home.
    Corrupt(String),
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unreadable(why) | Self::Corrupt(why) => f.write_str(why),
        }
    }
}

/// Most prekey files a home holds; past it no new one is made (a broker
/// that keeps asking for more gets no more).
pub const MOST_FILES: usize = 256;

/// The bundles to deposit when the broker holds `one_time` one-time bundles
/// and a last-resort one valid until `last_resort_expires` (0: none).
pub fn top_up(
    prekeys: &Prekeys,
    identity: &Identity,
    me: &AgentName,
    (one_time, last_resort_expires): (u32, u64),
    now: u64,
) -> std::io::Result<(Vec<Vec<u8>>, Vec<u8>)> {
    let mut fresh = Vec::new();
    if prekeys.count() >= MOST_FILES {
        return Ok((fresh, Vec::new()));
    }
    if one_time < LOW_WATER {
        for _ in one_time..TARGET {
            fresh.push(prekeys.make(identity, me, BundleKind::OneTime, now)?.0);
        }
    }
    let last = if last_resort_expires < now.saturating_add(ROTATE_BEFORE) {
        prekeys.make(identity, me, BundleKind::LastResort, now)?.0
    } else {
        Vec::new()
    };
    Ok((fresh, last))
}
