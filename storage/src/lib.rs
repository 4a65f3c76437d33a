//! Durable storage of collab documents behind the [`Store`] trait; [`SledStore`] is the embedded
//! default.
//!
//! A document is a snapshot (one Yjs v1 update holding the whole document) plus an append-only
//! log of the updates applied after it. Update bytes are stored raw, exactly as Yjs encodes them,
//! so any Yjs tool can read them back; only the metadata record goes through bincode.

mod sled_store;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use sled_store::SledStore;

/// Version of the on-disk layout, recorded in every document's metadata.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("storage backend failed: {0}")]
    Backend(#[from] sled::Error),
    #[error("stored record of document {doc:?} is corrupt: {what}")]
    Corrupt { doc: String, what: String },
    #[error("document {doc:?} uses storage format {found}, this build reads {FORMAT_VERSION}")]
    UnsupportedFormat { doc: String, found: u32 },
    #[error("document name of {0} bytes is too long for the key layout")]
    NameTooLong(usize),
}

/// Per-document bookkeeping, bincode-encoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocMeta {
    pub format_version: u32,
    pub created_at_ms: u64,
    /// Log entries with a sequence number below this are folded into the snapshot.
    pub snapshot_upto: u64,
    pub snapshot_bytes: u64,
    pub snapshot_at_ms: u64,
    pub compactions: u64,
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
    /// Stored bytes: the snapshot plus the log.
    pub size_bytes: u64,
    /// Updates ever appended (the next sequence number).
    pub updates: u64,
    /// The last append or compaction, milliseconds since the epoch.
    pub last_modified_ms: u64,
    pub versions: u64,
}

/// Everything stored for one document, in the order it must be applied.
#[derive(Debug, Default)]
pub struct StoredDoc {
    pub meta: Option<DocMeta>,
    pub snapshot: Option<Vec<u8>>,
    /// `(sequence number, raw update)`, ascending.
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
}

/// Durable document storage. Writes become durable only after [`Store::flush`] returns, so the
/// caller groups appends and flushes once per batch.
///
/// Methods are blocking; async callers run the slow ones (load, compact, flush) on a blocking
/// thread pool.
pub trait Store: Send + Sync + 'static {
    /// Everything stored for `doc`; an unknown document yields an empty [`StoredDoc`].
    fn load(&self, doc: &str) -> Result<StoredDoc, StoreError>;
    /// Appends one update to the document's log under sequence number `seq`.
    fn append(&self, doc: &str, seq: u64, update: &[u8]) -> Result<(), StoreError>;
    /// Atomically replaces the snapshot with `snapshot` and removes the log entries below
    /// `upto`, which the snapshot must cover.
    fn compact(&self, doc: &str, snapshot: &[u8], upto: u64) -> Result<(), StoreError>;
    /// Makes every earlier write durable.
    fn flush(&self) -> Result<(), StoreError>;
    /// Names of all stored documents.
    fn list(&self) -> Result<Vec<String>, StoreError>;
    /// Metadata of one document, if it is stored.
    fn meta(&self, doc: &str) -> Result<Option<DocMeta>, StoreError>;
    /// Removes a document entirely, its versions included; returns whether it existed.
    fn delete(&self, doc: &str) -> Result<bool, StoreError>;
    /// Size and activity of one document, if it is stored.
    fn stats(&self, doc: &str) -> Result<Option<DocStats>, StoreError>;
    /// Stores `state` (a whole-document Yjs v1 update) as a new version of `doc`, with the next
    /// id of that document. Durable after the next [`Store::flush`].
    fn put_version(&self, doc: &str, label: &str, state: &[u8]) -> Result<VersionMeta, StoreError>;
    /// The versions of `doc`, oldest first.
    fn versions(&self, doc: &str) -> Result<Vec<VersionMeta>, StoreError>;
    /// One version with its state.
    fn version(&self, doc: &str, id: u64) -> Result<Option<(VersionMeta, Vec<u8>)>, StoreError>;
}
