//! Durable storage of collab documents behind the [`Store`] trait; [`SledStore`] is the embedded
//! default.
//!
//! A document is a snapshot (one Yjs v1 update holding the whole document) plus an append-only
//! log of the updates applied after it. Update bytes are stored raw, exactly as Yjs encodes them,
//! so any Yjs tool can read them back; only the metadata record goes through bincode.
//!
//! The log lives in its own segment files (`wal/`), each record with a CRC32, made durable by
//! one `fdatasync` per flush; each snapshot is a file of its own (`snapshots/`), named by its
//! metadata in sled, which also keeps the versions. The log also records which snapshot each
//! document must have (its length and CRC32), so damage to either side is found rather than
//! silently turned into a smaller database.

mod record;
mod recovery;
mod segment;
mod sled_store;
mod state_files;
mod wal;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use sled_store::SledStore;

/// Version of the on-disk layout, recorded in every document's metadata. Version 1 kept the log
/// in sled and the snapshot as one value, version 2 the snapshot in sled in chunks; opening such a
/// folder converts it.
pub const FORMAT_VERSION: u32 = 3;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("storage backend failed: {0}")]
    Backend(#[from] sled::Error),
    #[error("cannot {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the write-ahead log is unusable after a failed write ({0}); restart to recover")]
    LogFailed(String),
    #[error("stored record of document {doc:?} is corrupt: {what}")]
    Corrupt { doc: String, what: String },
    #[error("document {doc:?} uses storage format {found}, this build reads {FORMAT_VERSION}")]
    UnsupportedFormat { doc: String, found: u32 },
    #[error("document name of {0} bytes is too long for the key layout")]
    NameTooLong(usize),
}

/// Per-document snapshot bookkeeping, bincode-encoded in sled. Written by the first compaction;
/// a document that was never compacted has none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocMeta {
    pub format_version: u32,
    /// When the first snapshot was written.
    pub created_at_ms: u64,
    /// Log entries with a sequence number below this are folded into the snapshot.
    pub snapshot_upto: u64,
    pub snapshot_bytes: u64,
    pub snapshot_at_ms: u64,
    pub compactions: u64,
    /// CRC32 of the whole snapshot, checked on every load.
    pub snapshot_crc32: u32,
    /// Id of the snapshot's file (`snapshots/<id as 16 hex digits>.ydoc`); a new one per
    /// compaction.
    pub snapshot_file: u64,
}

/// One stored version of a document (bincode-encoded beside its state).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionMeta {
    /// 1, 2, 3... per document; a deleted and recreated document starts again at 1.
    pub id: u64,
    pub label: String,
    pub created_at_ms: u64,
    /// Bytes of the stored state.
    pub size: u64,
}

/// Size and activity of a stored document, for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocStats {
    /// Stored bytes: the snapshot plus the live log.
    pub size_bytes: u64,
    /// Updates ever appended (the next sequence number).
    pub updates: u64,
    /// The last append this process saw, else the last compaction, milliseconds since the epoch.
    pub last_modified_ms: u64,
    pub versions: u64,
}

/// Everything stored for one document, in the order it must be applied.
#[derive(Debug, Default)]
pub struct StoredDoc {
    pub meta: Option<DocMeta>,
    pub snapshot: Option<Vec<u8>>,
    /// `(sequence number, raw update)`, ascending and contiguous from the snapshot's end.
    pub log: Vec<(u64, Vec<u8>)>,
}

impl StoredDoc {
    /// The sequence number the next appended update must use.
    pub fn next_seq(&self) -> u64 {
        let after_log = self.log.last().map_or(0, |(seq, _)| seq + 1);
        let after_snapshot = self.meta.as_ref().map_or(0, |m| m.snapshot_upto);
        after_log.max(after_snapshot)
    }

    pub fn log_bytes(&self) -> u64 {
        self.log.iter().map(|(_, u)| u.len() as u64).sum()
    }

    pub fn snapshot_bytes(&self) -> u64 {
        self.snapshot.as_ref().map_or(0, |s| s.len() as u64)
    }
}

/// Damage found in stored data. `doc` names the document that lost data when the store can tell;
/// `None` is damage it cannot attribute (for instance a damaged commit record, which loses no
/// document data).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Damage {
    pub doc: Option<String>,
    pub what: String,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.doc {
            Some(doc) => write!(f, "document {doc:?}: {}", self.what),
            None => write!(f, "{}", self.what),
        }
    }
}

/// When to fold a document's log into a new snapshot. A snapshot rewrite costs as much as the
/// whole document, so it waits until the log is worth it: at least `1 / LOG_FRACTION` of the
/// snapshot (and `after_updates` entries), or `after_bytes` whatever the snapshot's size. This
/// bounds both the disk the log takes next to the snapshot and the write amplification.
#[derive(Debug, Clone, Copy)]
pub struct CompactionPolicy {
    pub after_updates: u64,
    pub after_bytes: u64,
}

impl CompactionPolicy {
    pub const LOG_FRACTION: u64 = 8;

    pub fn due(&self, snapshot_bytes: u64, log_count: u64, log_bytes: u64) -> bool {
        log_count > 0
            && (log_bytes >= self.after_bytes
                || (log_count >= self.after_updates
                    && log_bytes.saturating_mul(Self::LOG_FRACTION) >= snapshot_bytes))
    }
}

/// Durable document storage. Writes become durable only after [`Store::flush`] returns, so the
/// caller groups appends and flushes once per batch.
///
/// Methods are blocking; async callers run the slow ones (load, compact, flush, check) on a
/// blocking thread pool.
pub trait Store: Send + Sync + 'static {
    /// Everything stored for `doc`; an unknown document yields an empty [`StoredDoc`]. A document
    /// found damaged is an error, never a shorter document.
    fn load(&self, doc: &str) -> Result<StoredDoc, StoreError>;
    /// Appends one update to the document's log under sequence number `seq`.
    fn append(&self, doc: &str, seq: u64, update: &[u8]) -> Result<(), StoreError>;
    /// Durably replaces the snapshot with `snapshot` and drops the log entries below `upto`,
    /// which the snapshot must cover.
    fn compact(&self, doc: &str, snapshot: &[u8], upto: u64) -> Result<(), StoreError>;
    /// Makes every earlier write durable.
    fn flush(&self) -> Result<(), StoreError>;
    /// Names of all stored documents, sorted.
    fn list(&self) -> Result<Vec<String>, StoreError>;
    /// Snapshot metadata of one document, if it has been compacted.
    fn meta(&self, doc: &str) -> Result<Option<DocMeta>, StoreError>;
    /// Removes a document entirely, its versions included; returns whether it existed.
    fn delete(&self, doc: &str) -> Result<bool, StoreError>;
    /// Size and activity of one document, if it is stored.
    fn stats(&self, doc: &str) -> Result<Option<DocStats>, StoreError>;
    /// Stores `state` (a whole-document Yjs v1 update) as a new version of `doc`, with the next
    /// id of that document. Durable when it returns.
    fn put_version(&self, doc: &str, label: &str, state: &[u8]) -> Result<VersionMeta, StoreError>;
    /// The versions of `doc`, oldest first.
    fn versions(&self, doc: &str) -> Result<Vec<VersionMeta>, StoreError>;
    /// One version with its state.
    fn version(&self, doc: &str, id: u64) -> Result<Option<(VersionMeta, Vec<u8>)>, StoreError>;
    /// Reads and verifies everything stored (every log record, every snapshot against its CRC
    /// and against the log's record of it); returns the damage found, sorted, empty if none.
    fn check(&self) -> Result<Vec<Damage>, StoreError>;
}
