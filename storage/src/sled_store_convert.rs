//! Opening a folder written by an older build converts it in place, one document per sled batch,
//! so an interrupted conversion simply runs again at the next open.

use serde::{Deserialize, Serialize};
use sled::Batch;
use tracing::info;

use super::{
    bincode_config, corrupt, doc_key, encode_meta, format_of, mark_of, name_of, SledStore, META,
    V1_LOG, V1_SNAPSHOT, V2_CHUNK,
};
use crate::{DocMeta, StoreError};

/// The metadata record of format 1.
#[derive(Deserialize, Serialize)]
pub(super) struct DocMetaV1 {
    pub(super) format_version: u32,
    pub(super) created_at_ms: u64,
    pub(super) snapshot_upto: u64,
    pub(super) snapshot_bytes: u64,
    pub(super) snapshot_at_ms: u64,
    pub(super) compactions: u64,
}

/// The metadata record of format 2, which kept the snapshot in sled in chunks.
#[derive(Deserialize, Serialize)]
pub(super) struct DocMetaV2 {
    pub(super) format_version: u32,
    pub(super) created_at_ms: u64,
    pub(super) snapshot_upto: u64,
    pub(super) snapshot_bytes: u64,
    pub(super) snapshot_at_ms: u64,
    pub(super) compactions: u64,
    pub(super) snapshot_crc32: u32,
    pub(super) snapshot_chunks: u32,
}

impl SledStore {
    /// The documents whose metadata record is of `format`, with that record.
    fn metadata_of_format<T: serde::de::DeserializeOwned>(
        &self,
        format: u32,
    ) -> Result<Vec<(String, T)>, StoreError> {
        let mut old = Vec::new();
        for item in self.db.scan_prefix([META]) {
            let (key, raw) = item?;
            if format_of(&raw) == Some(format) {
                let name = name_of(&key).ok_or_else(|| corrupt("?", "metadata key"))?;
                let (meta, _) = bincode::serde::decode_from_slice(&raw, bincode_config())
                    .map_err(|e| corrupt(&name, format!("format {format} metadata: {e}")))?;
                old.push((name, meta));
            }
        }
        Ok(old)
    }

    /// Moves documents stored by format 1 into this layout: log entries into the write-ahead
    /// log, the snapshot into its file. Safe to repeat if interrupted: a document is converted by
    /// one sled batch, and log entries appended twice are the same entries.
    pub(super) fn convert_format_1(&self) -> Result<(), StoreError> {
        let old: Vec<(String, DocMetaV1)> = self.metadata_of_format(1)?;
        for (doc, v1) in &old {
            let mut batch = Batch::default();
            let prefix = doc_key(V1_LOG, doc)?;
            for item in self.db.scan_prefix(&prefix) {
                let (key, value) = item?;
                let seq = key[prefix.len()..]
                    .try_into()
                    .map(u64::from_be_bytes)
                    .map_err(|_| corrupt(doc, "format 1 log key"))?;
                self.wal.append_update(doc, seq, &value)?;
                batch.remove(key);
            }
            self.wal.flush()?;
            let snapshot_key = doc_key(V1_SNAPSHOT, doc)?;
            let snapshot = self.db.get(&snapshot_key)?;
            batch.remove(snapshot_key);
            batch.remove(doc_key(META, doc)?);
            let meta = match &snapshot {
                Some(s) => {
                    let staged = self.stage_snapshot(&mut batch, doc, s, v1.snapshot_upto, None)?;
                    let meta = DocMeta {
                        created_at_ms: v1.created_at_ms,
                        compactions: v1.compactions,
                        ..staged
                    };
                    batch.insert(doc_key(META, doc)?, encode_meta(&meta));
                    Some(meta)
                }
                None => None,
            };
            self.db.apply_batch(batch)?;
            self.db.flush()?;
            if let Some(meta) = meta {
                self.wal.append_snapshot(doc, mark_of(&meta))?;
            }
        }
        if !old.is_empty() {
            self.wal.flush()?;
            info!(
                documents = old.len(),
                "converted stored documents from format 1"
            );
        }
        Ok(())
    }

    /// Moves the snapshots format 2 kept in sled's chunks into files. The bytes move as they
    /// are and the metadata keeps its length and CRC32, so a snapshot that was damaged in sled
    /// is still reported as damaged when it is read.
    pub(super) fn convert_format_2(&self) -> Result<(), StoreError> {
        let old: Vec<(String, DocMetaV2)> = self.metadata_of_format(2)?;
        for (doc, v2) in &old {
            let mut batch = Batch::default();
            let mut snapshot = Vec::with_capacity(v2.snapshot_bytes as usize);
            for item in self.db.scan_prefix(doc_key(V2_CHUNK, doc)?) {
                let (key, value) = item?;
                snapshot.extend_from_slice(&value);
                batch.remove(key);
            }
            let meta = DocMeta {
                format_version: crate::FORMAT_VERSION,
                created_at_ms: v2.created_at_ms,
                snapshot_upto: v2.snapshot_upto,
                snapshot_bytes: v2.snapshot_bytes,
                snapshot_at_ms: v2.snapshot_at_ms,
                compactions: v2.compactions,
                snapshot_crc32: v2.snapshot_crc32,
                snapshot_file: self.db.generate_id()?,
            };
            self.snapshot_files.write(meta.snapshot_file, &snapshot)?;
            batch.insert(doc_key(META, doc)?, encode_meta(&meta));
            self.db.apply_batch(batch)?;
            self.db.flush()?;
        }
        if !old.is_empty() {
            info!(
                documents = old.len(),
                "moved snapshots out of sled into files (format 2 to 3)"
            );
        }
        Ok(())
    }
}
