//! The backup format, written by `collab backup` and `POST /api/backup`, read by
//! `collab restore`: a folder with one file per document, holding the document's whole state as
//! one Yjs v1 update (any Yjs tool can read it: `Y.applyUpdate(doc, bytes)`), and
//! `manifest.json`:
//!
//! ```json
//! { "format": "collab-backup", "version": 1, "created": "2026-11-23T06:40:00.000Z",
//!   "documents": [ { "name": "notes/today", "file": "<sha256 of the name, hex>.yjs",
//!                    "size": 1234, "sha256": "<sha256 of the file, hex>" } ] }
//! ```
//!
//! File names are derived from a hash of the document name, so no name can reach outside the
//! folder or collide with another on a case-insensitive file system. The manifest is written
//! last (through a temporary file and a rename), so a folder with a manifest is a whole backup.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use collab_storage::{Store, StoreError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use yrs::updates::decoder::Decode;

pub const MANIFEST: &str = "manifest.json";
pub const FORMAT: &str = "collab-backup";
pub const VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{} is not empty: a backup goes into an empty or new folder", .0.display())]
    TargetNotEmpty(PathBuf),
    #[error("the backup path must be absolute, got {}", .0.display())]
    Relative(PathBuf),
    #[error("the data folder {} is not empty: restore only into an empty (or new) data folder", .0.display())]
    DataNotEmpty(PathBuf),
    #[error("{}: not a collab backup manifest: {why}", path.display())]
    Manifest { path: PathBuf, why: String },
    #[error("backup of document {doc:?} is damaged: {file} does not match the manifest's {what}; nothing was restored")]
    Checksum {
        doc: String,
        file: String,
        what: &'static str,
    },
    #[error(
        "backup of document {doc:?} ({file}) is not a Yjs v1 update: {why}; nothing was restored"
    )]
    NotAnUpdate {
        doc: String,
        file: String,
        why: String,
    },
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("storage failed: {0}")]
    Store(#[from] StoreError),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BackupError {
    let path = path.to_path_buf();
    move |source| BackupError::Io { what, path, source }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub name: String,
    pub file: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub created: String,
    pub documents: Vec<Entry>,
}

impl Manifest {
    pub fn total_bytes(&self) -> u64 {
        self.documents.iter().map(|e| e.size).sum()
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The file holding document `name` in a backup.
pub fn file_name(name: &str) -> String {
    format!("{}.yjs", hex(&Sha256::digest(name.as_bytes())))
}

/// Makes `dir` ready for a backup: created if missing, refused if it holds anything.
pub fn prepare_target(dir: &Path) -> Result<(), BackupError> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(BackupError::TargetNotEmpty(dir.to_path_buf()));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(io("create", dir))
        }
        Err(e) => Err(io("read", dir)(e)),
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), BackupError> {
    let mut f = std::fs::File::create(path).map_err(io("create", path))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io("write", path))
}

/// Writes one document's state into the backup folder; returns its manifest entry.
pub fn write_entry(dir: &Path, name: &str, state: &[u8]) -> Result<Entry, BackupError> {
    let file = file_name(name);
    write_synced(&dir.join(&file), state)?;
    Ok(Entry {
        name: name.to_owned(),
        file,
        size: state.len() as u64,
        sha256: hex(&Sha256::digest(state)),
    })
}

/// Writes the manifest, last: a backup folder with a manifest is complete.
pub fn finish(dir: &Path, mut documents: Vec<Entry>) -> Result<Manifest, BackupError> {
    documents.sort_by(|a, b| a.name.cmp(&b.name));
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        created: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        documents,
    };
    let text = serde_json::to_vec_pretty(&manifest).expect("a manifest serializes");
    let tmp = dir.join("manifest.json.partial");
    write_synced(&tmp, &text)?;
    let path = dir.join(MANIFEST);
    std::fs::rename(&tmp, &path).map_err(io("write", &path))?;
    // The renames and new files are durable once the folder itself is.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(manifest)
}

/// A document left out of a backup because it does not load.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub name: String,
    pub why: String,
}

/// `collab backup DIR` on a stopped server's store: every document, rebuilt from its snapshot
/// and log. Damaged documents are left out and returned.
pub fn backup_store(
    store: &dyn Store,
    dir: &Path,
) -> Result<(Manifest, Vec<Skipped>), super::ToolError> {
    prepare_target(dir)?;
    let mut entries = Vec::new();
    let mut skipped = Vec::new();
    for name in store.list()? {
        match super::load_document(store, &name) {
            Ok(doc) => entries.push(write_entry(dir, &name, &doc.encode_state())?),
            Err(super::ToolError::Damaged { why, .. }) => skipped.push(Skipped { name, why }),
            Err(e) => return Err(e),
        }
    }
    Ok((finish(dir, entries)?, skipped))
}

/// Reads and checks a backup's manifest.
pub fn read_manifest(dir: &Path) -> Result<Manifest, BackupError> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read(&path).map_err(io("read", &path))?;
    let bad = |why: String| BackupError::Manifest {
        path: path.clone(),
        why,
    };
    let manifest: Manifest = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
    if manifest.format != FORMAT || manifest.version != VERSION {
        return Err(bad(format!(
            "format {:?} version {}, this build reads {FORMAT:?} version {VERSION}",
            manifest.format, manifest.version
        )));
    }
    let mut names = std::collections::HashSet::new();
    for e in &manifest.documents {
        // Only the names this format writes: nothing may point outside the folder.
        if e.file != file_name(&e.name) {
            return Err(bad(format!(
                "document {:?} has the file name {:?}, expected {:?}",
                e.name,
                e.file,
                file_name(&e.name)
            )));
        }
        if !names.insert(e.name.as_str()) {
            return Err(bad(format!("document {:?} is listed twice", e.name)));
        }
    }
    Ok(manifest)
}

/// Reads one document's file and checks it against the manifest (size, sha256, and that it
/// is a Yjs v1 update).
pub fn read_verified(dir: &Path, entry: &Entry) -> Result<Vec<u8>, BackupError> {
    let path = dir.join(&entry.file);
    let mut bytes = Vec::with_capacity(entry.size.min(1 << 30) as usize);
    std::fs::File::open(&path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(io("read", &path))?;
    let mismatch = |what| BackupError::Checksum {
        doc: entry.name.clone(),
        file: entry.file.clone(),
        what,
    };
    if bytes.len() as u64 != entry.size {
        return Err(mismatch("size"));
    }
    if hex(&Sha256::digest(&bytes)) != entry.sha256 {
        return Err(mismatch("sha256"));
    }
    yrs::Update::decode_v1(&bytes).map_err(|e| BackupError::NotAnUpdate {
        doc: entry.name.clone(),
        file: entry.file.clone(),
        why: e.to_string(),
    })?;
    Ok(bytes)
}

/// Whether a data folder is empty (or missing), so a restore cannot mix with existing data.
pub fn ensure_empty_data(data_dir: &Path) -> Result<(), BackupError> {
    match std::fs::read_dir(data_dir) {
        Ok(mut entries) => match entries.next() {
            Some(_) => Err(BackupError::DataNotEmpty(data_dir.to_path_buf())),
            None => Ok(()),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("read", data_dir)(e)),
    }
}

/// `collab restore DIR`: every file is verified first; only then is the data folder created
/// and each document stored as one update, flushed at the end.
pub fn restore(data_dir: &Path, backup_dir: &Path) -> Result<Manifest, super::ToolError> {
    ensure_empty_data(data_dir)?;
    let manifest = read_manifest(backup_dir)?;
    for entry in &manifest.documents {
        read_verified(backup_dir, entry)?;
    }
    let store = super::open_store(data_dir)?;
    for entry in &manifest.documents {
        // Read and verified again: the folder may have changed since the first pass.
        let state = read_verified(backup_dir, entry)?;
        store
            .append(&entry.name, 0, &state)
            .map_err(BackupError::from)?;
    }
    store.flush().map_err(BackupError::from)?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_hashes() {
        let f = file_name("../../etc/passwd");
        assert_eq!(f.len(), 64 + 4);
        assert!(f.ends_with(".yjs") && !f.contains('/'));
        assert_ne!(file_name("A"), file_name("a"));
    }
}
