//! Versions: whole document states kept as files in `versions/` (as snapshots are, and for the
//! same reason: sled would keep each one it wrote resident), described in sled beside the
//! document: `n` the per-document counter, `V` one record per version naming its file.

use serde::{Deserialize, Serialize};
use sled::Batch;
use tracing::info;

use super::{bincode_config, corrupt, doc_key, now_ms, SledStore, VERSION_COUNTER, VERSION_META};
use crate::{Damage, StoreError, VersionMeta};

/// Format 2 kept version states in sled in chunks (key: name, u64 BE id, u32 BE chunk); read
/// only to convert.
pub(super) const V2_VERSION_CHUNK: u8 = b'v';

/// What sled holds per version: its description, the file with its state, and that state's
/// CRC32. A format 2 record is a bare [`VersionMeta`], two fields shorter.
#[derive(Serialize, Deserialize)]
struct VersionRecord {
    meta: VersionMeta,
    file: u64,
    crc32: u32,
}

/// Decodes `raw` as a `T` that takes up all of it, so that the two record layouts are never
/// mistaken for each other.
fn decode_whole<T: serde::de::DeserializeOwned>(raw: &[u8]) -> Option<T> {
    match bincode::serde::decode_from_slice(raw, bincode_config()) {
        Ok((value, used)) if used == raw.len() => Some(value),
        _ => None,
    }
}

fn decode_record(doc: &str, raw: &[u8]) -> Result<VersionRecord, StoreError> {
    decode_whole(raw).ok_or_else(|| corrupt(doc, "version record does not decode"))
}

fn record_key(doc: &str, id: u64) -> Result<Vec<u8>, StoreError> {
    let mut key = doc_key(VERSION_META, doc)?;
    key.extend_from_slice(&id.to_be_bytes());
    Ok(key)
}

/// The document name and version id of a `V` key.
fn split_record_key(key: &[u8]) -> Option<(String, u64)> {
    let len = u16::from_be_bytes(key.get(1..3)?.try_into().ok()?) as usize;
    let name = std::str::from_utf8(key.get(3..3 + len)?).ok()?.to_owned();
    let id = u64::from_be_bytes(key.get(3 + len..)?.try_into().ok()?);
    Some((name, id))
}

impl SledStore {
    pub(super) fn write_version(
        &self,
        doc: &str,
        label: &str,
        state: &[u8],
    ) -> Result<VersionMeta, StoreError> {
        // An atomic increment, so concurrent requests for one document never share an id.
        let counter = self
            .db
            .update_and_fetch(doc_key(VERSION_COUNTER, doc)?, |old| {
                let n = old
                    .and_then(|v| <[u8; 8]>::try_from(v).ok())
                    .map_or(0, u64::from_be_bytes);
                Some((n + 1).to_be_bytes().to_vec())
            })?;
        let id = counter
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_be_bytes)
            .ok_or_else(|| corrupt(doc, "version counter of the wrong size"))?;
        let record = VersionRecord {
            meta: VersionMeta {
                id,
                label: label.to_owned(),
                created_at_ms: now_ms(),
                size: state.len() as u64,
            },
            file: self.db.generate_id()?,
            crc32: crc32fast::hash(state),
        };
        let raw = bincode::serde::encode_to_vec(&record, bincode_config())
            .map_err(|e| corrupt(doc, format!("version record: {e}")))?;
        self.version_files.write(record.file, state)?;
        self.db.insert(record_key(doc, id)?, raw)?;
        self.db.flush()?;
        Ok(record.meta)
    }

    pub(super) fn list_versions(&self, doc: &str) -> Result<Vec<VersionMeta>, StoreError> {
        self.db
            .scan_prefix(doc_key(VERSION_META, doc)?)
            .map(|item| Ok(decode_record(doc, &item?.1)?.meta))
            .collect()
    }

    pub(super) fn read_version(
        &self,
        doc: &str,
        id: u64,
    ) -> Result<Option<(VersionMeta, Vec<u8>)>, StoreError> {
        let Some(raw) = self.db.get(record_key(doc, id)?)? else {
            return Ok(None);
        };
        let record = decode_record(doc, &raw)?;
        let path = self.version_files.path(record.file);
        let state = self
            .version_files
            .read(record.file, record.meta.size)?
            .ok_or_else(|| corrupt(doc, format!("version {id}: {} is missing", path.display())))?;
        if state.len() as u64 != record.meta.size || crc32fast::hash(&state) != record.crc32 {
            return Err(corrupt(
                doc,
                format!(
                    "version {id}: {} does not match its record ({} bytes, CRC32 {:08x})",
                    path.display(),
                    record.meta.size,
                    record.crc32
                ),
            ));
        }
        Ok(Some((record.meta, state)))
    }

    /// Adds the removal of `doc`'s versions to `batch`; returns their files, to remove once the
    /// batch is durable.
    pub(super) fn stage_versions_removal(
        &self,
        batch: &mut Batch,
        doc: &str,
    ) -> Result<Vec<u64>, StoreError> {
        let mut files = Vec::new();
        batch.remove(doc_key(VERSION_COUNTER, doc)?);
        for item in self.db.scan_prefix(doc_key(VERSION_META, doc)?) {
            let (key, raw) = item?;
            // A record too damaged to read still goes; its file is left to the sweep at open.
            files.extend(decode_record(doc, &raw).ok().map(|r| r.file));
            batch.remove(key);
        }
        Ok(files)
    }

    pub(super) fn remove_version_files(&self, files: &[u64]) {
        for file in files {
            self.version_files.remove(*file);
        }
    }

    /// Reads every version and checks it against its record.
    pub(super) fn check_versions(&self) -> Result<Vec<Damage>, StoreError> {
        let mut damage = Vec::new();
        for item in self.db.scan_prefix([VERSION_META]) {
            let (key, _) = item?;
            let Some((doc, id)) = split_record_key(&key) else {
                damage.push(Damage {
                    doc: None,
                    what: "a version record's key does not decode".into(),
                });
                continue;
            };
            if let Err(e) = self.read_version(&doc, id) {
                damage.push(Damage {
                    doc: Some(doc),
                    what: e.to_string(),
                });
            }
        }
        Ok(damage)
    }

    /// Removes version files no record names. Skipped while any record is unreadable.
    pub(super) fn sweep_versions(&self) -> Result<(), StoreError> {
        self.sweep(&self.version_files, VERSION_META, |key, raw| {
            let doc = split_record_key(key).map(|(d, _)| d).unwrap_or_default();
            decode_record(&doc, raw).map(|r| r.file)
        })
    }

    /// Moves version states that format 2 kept in sled's chunks into files, one sled batch per
    /// version. The bytes move as they are and the CRC32 is taken of them: format 2 had none, so
    /// a chunk damaged before the move goes unnoticed, as it did then.
    pub(super) fn convert_version_chunks(&self) -> Result<(), StoreError> {
        let mut old = Vec::new();
        for item in self.db.scan_prefix([VERSION_META]) {
            let (key, raw) = item?;
            if decode_whole::<VersionRecord>(&raw).is_some() {
                continue;
            }
            if let (Some(meta), Some((doc, _))) =
                (decode_whole::<VersionMeta>(&raw), split_record_key(&key))
            {
                old.push((doc, meta));
            }
        }
        for (doc, meta) in &old {
            let mut prefix = doc_key(V2_VERSION_CHUNK, doc)?;
            prefix.extend_from_slice(&meta.id.to_be_bytes());
            let mut batch = Batch::default();
            let mut state = Vec::with_capacity(meta.size as usize);
            for item in self.db.scan_prefix(prefix) {
                let (key, value) = item?;
                state.extend_from_slice(&value);
                batch.remove(key);
            }
            let record = VersionRecord {
                meta: meta.clone(),
                file: self.db.generate_id()?,
                crc32: crc32fast::hash(&state),
            };
            let raw = bincode::serde::encode_to_vec(&record, bincode_config())
                .map_err(|e| corrupt(doc, format!("version record: {e}")))?;
            self.version_files.write(record.file, &state)?;
            batch.insert(record_key(doc, meta.id)?, raw);
            self.db.apply_batch(batch)?;
            self.db.flush()?;
        }
        if !old.is_empty() {
            info!(
                versions = old.len(),
                "moved version states out of sled into files"
            );
        }
        Ok(())
    }
}
