//! Writing a received file safely: a temporary file created exclusively (mode
//! 0600) in the out dir, fsynced, and only after verification hard-linked under
//! a name that does not exist yet (`name`, `name (1).ext` … `name (99).ext`), then
//! the temporary removed and the directory fsynced. On any failure — or if the
//! receiver is killed — no file appears under the final name; temporaries left
//! by a killed receiver are removed when it next starts.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use keyferry_common::filename;
use keyferry_common::fsutil::sync_parent;
use keyferry_common::ids::TransferId;

const TEMP_PREFIX: &str = ".keyferry-";
const TEMP_SUFFIX: &str = ".part";

/// Flush written data to disk in the background every this many bytes, so the
/// final fsync has little left to do and disk writes overlap the network.
const SYNC_EVERY: u64 = 64 << 20;

/// A file being received.
#[derive(Debug)]
pub struct Incoming {
    dir: PathBuf,
    temp: PathBuf,
    file: Option<File>,
    written: u64,
    /// Wakes the background syncer; dropping it ends the syncer.
    syncer: Option<(std::sync::mpsc::SyncSender<()>, std::thread::JoinHandle<()>)>,
}

fn spawn_syncer(
    file: &File,
) -> Option<(std::sync::mpsc::SyncSender<()>, std::thread::JoinHandle<()>)> {
    let handle = file.try_clone().ok()?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
    let thread = std::thread::Builder::new()
        .name("fdatasync".into())
        .spawn(move || {
            while rx.recv().is_ok() {
                // Errors surface at the final sync_all, which is checked.
                let _ = handle.sync_data();
            }
        })
        .ok()?;
    Some((tx, thread))
}

impl Incoming {
    /// Creates the temporary file for transfer `tid` in `dir`.
    pub fn create(dir: &Path, tid: &TransferId) -> io::Result<Self> {
        let temp = dir.join(format!("{TEMP_PREFIX}{tid}{TEMP_SUFFIX}"));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)?;
        Ok(Self {
            dir: dir.to_owned(),
            temp,
            syncer: spawn_syncer(&file),
            file: Some(file),
            written: 0,
        })
    }

    /// Appends verified plaintext (whole chunks: no buffering needed).
    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        let f = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("file already finished"))?;
        f.write_all(data)?;
        let before = self.written;
        self.written += data.len() as u64;
        if before / SYNC_EVERY != self.written / SYNC_EVERY
            && let Some((wake, _)) = &self.syncer
        {
            // If the syncer is still busy, the next multiple will wake it.
            let _ = wake.try_send(());
        }
        Ok(())
    }

    /// Flushes and fsyncs, then links the file under the first free name of
    /// `name` (already checked by [`filename::check`]). Returns the final path.
    pub fn finish(mut self, name: &str) -> io::Result<PathBuf> {
        let file = self
            .file
            .take()
            .ok_or_else(|| io::Error::other("file already finished"))?;
        if let Some((wake, thread)) = self.syncer.take() {
            drop(wake);
            let _ = thread.join();
        }
        file.sync_all()?;
        drop(file);
        for candidate in filename::candidates(name) {
            let target = self.dir.join(&candidate);
            match fs::hard_link(&self.temp, &target) {
                Ok(()) => {
                    fs::remove_file(&self.temp)?;
                    sync_parent(&target)?;
                    return Ok(target);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{name} and {name} (1) … (99) all exist in {}",
                self.dir.display()
            ),
        ))
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        // Finished or not, the temporary name must not outlive the transfer.
        let _ = fs::remove_file(&self.temp);
    }
}

/// Removes temporaries a killed receiver left in `dir`; returns how many.
pub fn clean_stale(dir: &Path) -> io::Result<usize> {
    let mut removed = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with(TEMP_PREFIX)
            && name.ends_with(TEMP_SUFFIX)
            && entry.file_type()?.is_file()
        {
            fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("keyferry-output-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn never_replaces_an_existing_file_and_leaves_no_temporary() {
        let d = dir("collide");
        fs::write(d.join("a.txt"), b"old").unwrap();
        let mut inc = Incoming::create(&d, &TransferId([1; 16])).unwrap();
        inc.write(b"new").unwrap();
        let path = inc.finish("a.txt").unwrap();
        assert_eq!(path, d.join("a (1).txt"));
        assert_eq!(fs::read(d.join("a.txt")).unwrap(), b"old");
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(fs::read_dir(&d).unwrap().count(), 2);
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn an_abandoned_transfer_leaves_nothing_and_stale_temporaries_are_cleaned() {
        let d = dir("abandon");
        let mut inc = Incoming::create(&d, &TransferId([2; 16])).unwrap();
        inc.write(b"partial").unwrap();
        drop(inc);
        assert_eq!(fs::read_dir(&d).unwrap().count(), 0);
        fs::write(d.join(".keyferry-0011.part"), b"left by a killed receiver").unwrap();
        fs::write(d.join("keep.part"), b"not ours").unwrap();
        assert_eq!(clean_stale(&d).unwrap(), 1);
        assert_eq!(fs::read_dir(&d).unwrap().count(), 1);
        fs::remove_dir_all(d).unwrap();
    }
}
