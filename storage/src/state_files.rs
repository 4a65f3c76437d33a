//! Whole-document states kept as plain files beside sled, one folder of them for snapshots and one
//! for versions: `snapshots/<id>.ydoc` holds exactly the Yjs v1 update the document was compacted
//! into (a version's file, the state it recorded), so any Yjs tool reads it.
//!
//! Why not in sled: sled keeps every page it wrote in its own cache, so a 112 MB snapshot stayed
//! resident (as 28,000 chunks) long after its document unloaded; capping sled's cache did not give
//! it back. A file written with `write` and read back once costs the kernel's page cache, which
//! the kernel reclaims, not the process's memory.
//!
//! A file never changes once written: each state gets a fresh id from sled's id generator
//! (unique across crashes), is made durable (file and directory entry) before any metadata
//! names it, and the one it replaces is removed only after the new metadata is durable. A crash
//! between those steps leaves a file nobody names, which [`StateFiles::sweep`] removes at open.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use crate::StoreError;

const SUFFIX: &str = ".ydoc";

pub(crate) struct StateFiles {
    dir: PathBuf,
}

fn io_error(what: String) -> impl FnOnce(io::Error) -> StoreError {
    move |source| StoreError::Io { what, source }
}

/// Makes the directory's entries (a file created or removed in it) durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(format!("sync the folder {}", dir.display())))
}

impl StateFiles {
    pub(crate) fn open(dir: &Path) -> Result<Self, StoreError> {
        if !dir.is_dir() {
            fs::create_dir_all(dir).map_err(io_error(format!("create {}", dir.display())))?;
            if let Some(parent) = dir.parent() {
                sync_dir(parent)?;
            }
        }
        Ok(StateFiles {
            dir: dir.to_owned(),
        })
    }

    pub(crate) fn path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:016x}{SUFFIX}"))
    }

    /// Writes `bytes` under `id` and makes it durable, directory entry included.
    pub(crate) fn write(&self, id: u64, bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.path(id);
        let what = || format!("write {}", path.display());
        // Ids are never handed out twice, so a file already here is a stray; it is replaced.
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io_error(what()))?;
        file.write_all(bytes).map_err(io_error(what()))?;
        file.sync_all().map_err(io_error(what()))?;
        sync_dir(&self.dir)
    }

    /// The file's bytes; `Ok(None)` if there is no such file.
    pub(crate) fn read(&self, id: u64, expected_len: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.path(id);
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error(format!("open {}", path.display()))(e)),
        };
        // Sized by the metadata, not the file: a damaged file's length is not trusted with an
        // allocation, and a longer one is read only one byte past the expected end.
        let mut bytes = Vec::with_capacity(expected_len as usize);
        Read::by_ref(&mut file)
            .take(expected_len.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(io_error(format!("read {}", path.display())))?;
        Ok(Some(bytes))
    }

    /// The file's length, `None` if it is missing: a check that costs a `stat`, not a read.
    pub(crate) fn len(&self, id: u64) -> Option<u64> {
        fs::metadata(self.path(id)).ok().map(|m| m.len())
    }

    /// Removes a file nobody names any more. A failure leaves a stray file, removed by the next
    /// [`StateFiles::sweep`], so it is logged rather than returned.
    pub(crate) fn remove(&self, id: u64) {
        let path = self.path(id);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(file = %path.display(), error = %e, "cannot remove a state file nothing names")
            }
        }
    }

    /// Bytes the files occupy.
    pub(crate) fn size(&self) -> Result<u64, StoreError> {
        let mut total = 0;
        for entry in self.entries()? {
            total += entry.1.metadata().map_or(0, |m| m.len());
        }
        Ok(total)
    }

    /// Removes every file whose id is not in `keep`: those a crash left between writing a
    /// state and recording it, or between recording its successor and removing it.
    pub(crate) fn sweep(&self, keep: &HashSet<u64>) -> Result<(), StoreError> {
        let mut removed = 0;
        for (id, entry) in self.entries()? {
            // A file not named like ours is somebody else's: left alone.
            if id.is_none_or(|id| keep.contains(&id)) {
                continue;
            }
            let path = entry.path();
            fs::remove_file(&path).map_err(io_error(format!("remove {}", path.display())))?;
            removed += 1;
        }
        if removed > 0 {
            sync_dir(&self.dir)?;
            info!(folder = %self.dir.display(), files = removed, "removed state files nothing names");
        }
        Ok(())
    }

    /// Every file in the folder with the id its name carries (`None` for a name not like ours).
    fn entries(&self) -> Result<Vec<(Option<u64>, fs::DirEntry)>, StoreError> {
        let what = || format!("list {}", self.dir.display());
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_error(what()))? {
            let entry = entry.map_err(io_error(what()))?;
            let name = entry.file_name();
            let id = name
                .to_str()
                .and_then(|n| n.strip_suffix(SUFFIX))
                .filter(|hex| hex.len() == 16)
                .and_then(|hex| u64::from_str_radix(hex, 16).ok());
            out.push((id, entry));
        }
        Ok(out)
    }
}
