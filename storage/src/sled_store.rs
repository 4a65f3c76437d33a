use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sled::{Batch, Db};
use tracing::info;

use crate::recovery::Mark;
use crate::wal::Wal;
use crate::{Damage, DocMeta, DocStats, Store, StoreError, StoredDoc, VersionMeta, FORMAT_VERSION};

// One sled tree. Keys: a record kind byte, the document name length-prefixed (so one name is
// never a prefix of another's keys), then for chunks the big-endian chunk index so that sled's
// key order is the snapshot's byte order.
const META: u8 = b'm';
const CHUNK: u8 = b'c';
// Versions beside the document, under the same name so a delete removes them together: its
// version counter, each version's description, and each version's state in chunks (key: name,
// u64 BE id, u32 BE chunk). Versions are whole states, so compaction never touches them.
const VERSION_COUNTER: u8 = b'n';
const VERSION_META: u8 = b'V';
const VERSION_CHUNK: u8 = b'v';
// Format 1 kept the snapshot as one value and the log in sled; read only to convert.
const V1_SNAPSHOT: u8 = b's';
const V1_LOG: u8 = b'u';

/// Sled writes any page larger than a quarter of its 512 KiB segment to a separate blob file,
/// rewritten whole on every change and leaked when the process dies at the wrong moment. A leaf
/// holds up to 17 entries before it splits, so 4 KiB chunks keep every page far below that.
const CHUNK_SIZE: usize = 4096;

fn doc_key(kind: u8, doc: &str) -> Result<Vec<u8>, StoreError> {
    let len = u16::try_from(doc.len()).map_err(|_| StoreError::NameTooLong(doc.len()))?;
    let mut key = Vec::with_capacity(3 + doc.len() + 8);
    key.push(kind);
    key.extend_from_slice(&len.to_be_bytes());
    key.extend_from_slice(doc.as_bytes());
    Ok(key)
}

fn version_chunk_key(doc: &str, id: u64, index: u32) -> Result<Vec<u8>, StoreError> {
    let mut key = doc_key(VERSION_CHUNK, doc)?;
    key.extend_from_slice(&id.to_be_bytes());
    key.extend_from_slice(&index.to_be_bytes());
    Ok(key)
}

fn decode_version(doc: &str, raw: &[u8]) -> Result<VersionMeta, StoreError> {
    bincode::serde::decode_from_slice(raw, bincode_config())
        .map(|(v, _)| v)
        .map_err(|e| corrupt(doc, format!("version record: {e}")))
}

fn chunk_key(doc: &str, index: u32) -> Result<Vec<u8>, StoreError> {
    let mut key = doc_key(CHUNK, doc)?;
    key.extend_from_slice(&index.to_be_bytes());
    Ok(key)
}

fn name_of(key: &[u8]) -> Option<String> {
    key.get(3..)
        .and_then(|b| std::str::from_utf8(b).ok())
        .map(str::to_owned)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn bincode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// The format version every metadata record starts with.
fn format_of(raw: &[u8]) -> Option<u32> {
    bincode::serde::decode_from_slice::<u32, _>(raw, bincode_config())
        .ok()
        .map(|(v, _)| v)
}

fn corrupt(doc: &str, what: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        doc: doc.to_owned(),
        what: what.into(),
    }
}

fn decode_meta(doc: &str, raw: &[u8]) -> Result<DocMeta, StoreError> {
    match format_of(raw) {
        Some(FORMAT_VERSION) => {}
        Some(found) if found > FORMAT_VERSION => {
            return Err(StoreError::UnsupportedFormat {
                doc: doc.to_owned(),
                found,
            })
        }
        _ => {}
    }
    let (meta, _): (DocMeta, usize) = bincode::serde::decode_from_slice(raw, bincode_config())
        .map_err(|e| corrupt(doc, format!("metadata: {e}")))?;
    if meta.format_version != FORMAT_VERSION {
        return Err(StoreError::UnsupportedFormat {
            doc: doc.to_owned(),
            found: meta.format_version,
        });
    }
    Ok(meta)
}

fn encode_meta(meta: &DocMeta) -> Vec<u8> {
    // Encoding a plain struct of integers into a Vec cannot fail.
    bincode::serde::encode_to_vec(meta, bincode_config()).expect("DocMeta encodes")
}

/// The metadata record of format 1.
#[derive(Deserialize, Serialize)]
struct DocMetaV1 {
    format_version: u32,
    created_at_ms: u64,
    snapshot_upto: u64,
    snapshot_bytes: u64,
    snapshot_at_ms: u64,
    compactions: u64,
}

fn mark_of(meta: &DocMeta) -> Mark {
    Mark {
        upto: meta.snapshot_upto,
        len: meta.snapshot_bytes,
        crc: meta.snapshot_crc32,
    }
}

/// The embedded default store: a folder holding a sled database (snapshots and metadata) and
/// the write-ahead log in `wal/`.
pub struct SledStore {
    db: Db,
    wal: Wal,
    /// When each document was last appended to by this process (for listings).
    touched: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    /// Found damaged when opened: never served.
    damaged: BTreeMap<String, String>,
    opened_damage: Vec<Damage>,
}

impl SledStore {
    /// Opens (or creates) the store, recovering the log and checking it against sled: damage is
    /// logged, kept in [`SledStore::damage_at_open`], and its documents refuse to load.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref();
        let db = sled::Config::new()
            .path(path)
            // Sled only holds snapshots now, each flushed by its compaction; a timer flush
            // would only add fsyncs that nobody waits for.
            .flush_every_ms(None)
            .open()?;
        let (wal, mut damage) = Wal::open(&path.join("wal"))?;
        let mut store = SledStore {
            db,
            wal,
            touched: Default::default(),
            damaged: BTreeMap::new(),
            opened_damage: Vec::new(),
        };
        store.convert_format_1()?;
        damage.extend(store.cross_check(false)?);
        store.wal.flush()?;
        damage.sort();
        damage.dedup();
        for d in &damage {
            if let Some(doc) = &d.doc {
                store.damaged.entry(doc.clone()).or_insert(d.what.clone());
            }
        }
        store.opened_damage = damage;
        Ok(store)
    }

    /// Damage found while opening, sorted; its documents are not served.
    pub fn damage_at_open(&self) -> &[Damage] {
        &self.opened_damage
    }

    /// Bytes the store occupies on disk: sled's files and the log's segments.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk()? + self.wal.size().0)
    }

    fn read_snapshot(&self, doc: &str, meta: &DocMeta) -> Result<Vec<u8>, StoreError> {
        let mut snapshot = Vec::with_capacity(meta.snapshot_bytes as usize);
        let mut chunks = 0u32;
        for item in self.db.scan_prefix(doc_key(CHUNK, doc)?) {
            let (_, value) = item?;
            snapshot.extend_from_slice(&value);
            chunks += 1;
        }
        if chunks != meta.snapshot_chunks
            || snapshot.len() as u64 != meta.snapshot_bytes
            || crc32fast::hash(&snapshot) != meta.snapshot_crc32
        {
            return Err(corrupt(
                doc,
                format!(
                    "snapshot of {} bytes in {chunks} chunks does not match its metadata ({} bytes, \
                     {} chunks, CRC32 {:08x})",
                    snapshot.len(),
                    meta.snapshot_bytes,
                    meta.snapshot_chunks,
                    meta.snapshot_crc32
                ),
            ));
        }
        Ok(snapshot)
    }

    /// Checks sled's snapshots against what the log records of them, and that each document's
    /// log continues exactly where its snapshot ends. On open (`deep == false`) it also
    /// re-records a snapshot that sled holds but the log does not know of yet (the process died
    /// between the two writes). `deep` also reads every snapshot and log entry.
    fn cross_check(&self, deep: bool) -> Result<Vec<Damage>, StoreError> {
        let mut damage = Vec::new();
        let mut report = |doc: &str, what: String| {
            damage.push(Damage {
                doc: Some(doc.to_owned()),
                what,
            })
        };
        let mut unattributed = Vec::new();
        let logs = self.wal.documents();
        let mut names: BTreeSet<String> = logs.keys().cloned().collect();
        for item in self.db.scan_prefix([META]) {
            match item {
                Ok((key, _)) => names.extend(name_of(&key)),
                Err(e) => unattributed.push(Damage {
                    doc: None,
                    what: format!("sled cannot list its metadata: {e}"),
                }),
            }
        }
        for name in names {
            let (seqs, mark) = logs.get(&name).cloned().unwrap_or_default();
            let meta = match self.meta(&name) {
                Ok(m) => m,
                Err(e) => {
                    report(&name, e.to_string());
                    continue;
                }
            };
            let upto = match (&meta, mark) {
                (None, None) => 0,
                (None, Some(m)) => {
                    report(
                        &name,
                        format!(
                            "sled lost the snapshot up to {} that the log records",
                            m.upto
                        ),
                    );
                    continue;
                }
                (Some(meta), Some(m)) if meta.snapshot_upto == m.upto && mark_of(meta) != m => {
                    report(
                        &name,
                        format!(
                            "sled's snapshot up to {} differs from the one the log records",
                            m.upto
                        ),
                    );
                    continue;
                }
                (Some(meta), Some(m)) if meta.snapshot_upto < m.upto => {
                    report(&name, format!("sled holds the snapshot up to {}, the log records a newer one up to {}", meta.snapshot_upto, m.upto));
                    continue;
                }
                (Some(meta), m) => {
                    if !deep && m != Some(mark_of(meta)) {
                        self.wal.append_snapshot(&name, mark_of(meta))?;
                    }
                    meta.snapshot_upto
                }
            };
            let mut expected = upto;
            for seq in seqs.into_iter().filter(|s| *s >= upto) {
                if seq != expected {
                    report(&name, format!("log entries {expected}..{seq} are missing"));
                }
                expected = seq + 1;
            }
            if deep {
                if let Err(e) = self.load_unchecked(&name) {
                    report(&name, e.to_string());
                }
            }
        }
        damage.extend(unattributed);
        Ok(damage)
    }

    fn load_unchecked(&self, doc: &str) -> Result<StoredDoc, StoreError> {
        let meta = self.meta(doc)?;
        let (mut log, mark) = self.wal.read(doc)?;
        let snapshot = match &meta {
            Some(m) => Some(self.read_snapshot(doc, m)?),
            None if mark.is_some() => return Err(corrupt(doc, "sled lost the snapshot")),
            None => None,
        };
        let upto = meta.as_ref().map_or(0, |m| m.snapshot_upto);
        log.retain(|(seq, _)| *seq >= upto);
        if let Some((i, (seq, _))) = log
            .iter()
            .enumerate()
            .find(|(i, (seq, _))| *seq != upto + *i as u64)
        {
            return Err(corrupt(
                doc,
                format!("log entries {}..{seq} are missing", upto + i as u64),
            ));
        }
        Ok(StoredDoc {
            meta,
            snapshot,
            log,
        })
    }

    /// Moves documents stored by format 1 into this layout: log entries into the write-ahead
    /// log, the snapshot into chunks. Safe to repeat if interrupted: a document is converted by
    /// one sled batch, and log entries appended twice are the same entries.
    fn convert_format_1(&self) -> Result<(), StoreError> {
        let mut old = Vec::new();
        for item in self.db.scan_prefix([META]) {
            let (key, raw) = item?;
            if format_of(&raw) == Some(1) {
                let name = name_of(&key).ok_or_else(|| corrupt("?", "metadata key"))?;
                let (meta, _): (DocMetaV1, usize) =
                    bincode::serde::decode_from_slice(&raw, bincode_config())
                        .map_err(|e| corrupt(&name, format!("format 1 metadata: {e}")))?;
                old.push((name, meta));
            }
        }
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

    /// Adds the chunks and metadata of a new snapshot to `batch`, removing chunks of the old one
    /// that the new one does not overwrite.
    fn stage_snapshot(
        &self,
        batch: &mut Batch,
        doc: &str,
        snapshot: &[u8],
        upto: u64,
        previous: Option<&DocMeta>,
    ) -> Result<DocMeta, StoreError> {
        let now = now_ms();
        let chunks = snapshot.chunks(CHUNK_SIZE).count() as u32;
        let meta = DocMeta {
            format_version: FORMAT_VERSION,
            created_at_ms: previous.map_or(now, |m| m.created_at_ms),
            snapshot_upto: upto.max(previous.map_or(0, |m| m.snapshot_upto)),
            snapshot_bytes: snapshot.len() as u64,
            snapshot_at_ms: now,
            compactions: previous.map_or(0, |m| m.compactions) + 1,
            snapshot_crc32: crc32fast::hash(snapshot),
            snapshot_chunks: chunks,
        };
        for (i, chunk) in snapshot.chunks(CHUNK_SIZE).enumerate() {
            batch.insert(chunk_key(doc, i as u32)?, chunk);
        }
        let prefix = doc_key(CHUNK, doc)?;
        let mut end = prefix.clone();
        end.extend_from_slice(&[0xff; 5]);
        for item in self.db.range(chunk_key(doc, chunks)?..end) {
            batch.remove(item?.0);
        }
        batch.insert(doc_key(META, doc)?, encode_meta(&meta));
        Ok(meta)
    }
}

impl Store for SledStore {
    fn load(&self, doc: &str) -> Result<StoredDoc, StoreError> {
        if let Some(what) = self.damaged.get(doc) {
            return Err(corrupt(doc, what.clone()));
        }
        self.load_unchecked(doc)
    }

    fn append(&self, doc: &str, seq: u64, update: &[u8]) -> Result<(), StoreError> {
        doc_key(META, doc)?;
        self.wal.append_update(doc, seq, update)?;
        // Every update passes here: the name is copied only the first time a document is seen.
        if let Ok(mut touched) = self.touched.lock() {
            match touched.get_mut(doc) {
                Some(at) => *at = now_ms(),
                None => {
                    touched.insert(doc.to_owned(), now_ms());
                }
            }
        }
        Ok(())
    }

    fn compact(&self, doc: &str, snapshot: &[u8], upto: u64) -> Result<(), StoreError> {
        let previous = self.meta(doc)?;
        let mut batch = Batch::default();
        let meta = self.stage_snapshot(&mut batch, doc, snapshot, upto, previous.as_ref())?;
        self.db.apply_batch(batch)?;
        // The log may drop entries only once the snapshot replacing them is durable.
        self.db.flush()?;
        self.wal.append_snapshot(doc, mark_of(&meta))
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.wal.flush()
    }

    fn list(&self) -> Result<Vec<String>, StoreError> {
        let mut names: BTreeSet<String> = self.wal.documents().into_keys().collect();
        for item in self.db.scan_prefix([META]) {
            let (key, _) = item?;
            names.insert(name_of(&key).ok_or_else(|| corrupt("?", "metadata key is not a name"))?);
        }
        Ok(names.into_iter().collect())
    }

    fn meta(&self, doc: &str) -> Result<Option<DocMeta>, StoreError> {
        match self.db.get(doc_key(META, doc)?)? {
            Some(raw) => Ok(Some(decode_meta(doc, &raw)?)),
            None => Ok(None),
        }
    }

    fn delete(&self, doc: &str) -> Result<bool, StoreError> {
        let meta_key = doc_key(META, doc)?;
        let existed = self.db.contains_key(&meta_key)? || self.wal.documents().contains_key(doc);
        let mut batch = Batch::default();
        batch.remove(meta_key);
        batch.remove(doc_key(VERSION_COUNTER, doc)?);
        for kind in [CHUNK, VERSION_META, VERSION_CHUNK] {
            for item in self.db.scan_prefix(doc_key(kind, doc)?) {
                batch.remove(item?.0);
            }
        }
        self.db.apply_batch(batch)?;
        if let Ok(mut touched) = self.touched.lock() {
            touched.remove(doc);
        }
        self.db.flush()?;
        self.wal.append_delete(doc)?;
        Ok(existed)
    }

    fn stats(&self, doc: &str) -> Result<Option<DocStats>, StoreError> {
        let meta = self.meta(doc)?;
        let log = self.wal.log_stats(doc);
        if meta.is_none() && log.is_none() {
            return Ok(None);
        }
        let (log_bytes, next_seq) = log.unwrap_or((0, 0));
        let touched = self
            .touched
            .lock()
            .ok()
            .and_then(|t| t.get(doc).copied())
            .unwrap_or(0);
        let versions = self.db.scan_prefix(doc_key(VERSION_META, doc)?).count() as u64;
        Ok(Some(DocStats {
            size_bytes: meta.as_ref().map_or(0, |m| m.snapshot_bytes) + log_bytes,
            updates: next_seq.max(meta.as_ref().map_or(0, |m| m.snapshot_upto)),
            last_modified_ms: touched.max(meta.as_ref().map_or(0, |m| m.snapshot_at_ms)),
            versions,
        }))
    }

    fn put_version(&self, doc: &str, label: &str, state: &[u8]) -> Result<VersionMeta, StoreError> {
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
        let version = VersionMeta {
            id,
            label: label.to_owned(),
            created_at_ms: now_ms(),
            size: state.len() as u64,
        };
        let record = bincode::serde::encode_to_vec(&version, bincode_config())
            .map_err(|e| corrupt(doc, format!("version record: {e}")))?;
        let mut batch = Batch::default();
        let mut meta_key = doc_key(VERSION_META, doc)?;
        meta_key.extend_from_slice(&id.to_be_bytes());
        batch.insert(meta_key, record);
        // Chunked like snapshots, so a large version never becomes a sled blob file.
        for (i, chunk) in state.chunks(CHUNK_SIZE).enumerate() {
            batch.insert(version_chunk_key(doc, id, i as u32)?, chunk);
        }
        self.db.apply_batch(batch)?;
        self.db.flush()?;
        Ok(version)
    }

    fn versions(&self, doc: &str) -> Result<Vec<VersionMeta>, StoreError> {
        self.db
            .scan_prefix(doc_key(VERSION_META, doc)?)
            .map(|item| decode_version(doc, &item?.1))
            .collect()
    }

    fn version(&self, doc: &str, id: u64) -> Result<Option<(VersionMeta, Vec<u8>)>, StoreError> {
        let mut meta_key = doc_key(VERSION_META, doc)?;
        meta_key.extend_from_slice(&id.to_be_bytes());
        let Some(raw) = self.db.get(meta_key)? else {
            return Ok(None);
        };
        let meta = decode_version(doc, &raw)?;
        let mut prefix = doc_key(VERSION_CHUNK, doc)?;
        prefix.extend_from_slice(&id.to_be_bytes());
        let mut state = Vec::with_capacity(meta.size as usize);
        for item in self.db.scan_prefix(prefix) {
            state.extend_from_slice(&item?.1);
        }
        if state.len() as u64 != meta.size {
            return Err(corrupt(
                doc,
                format!(
                    "version {id} holds {} of its {} bytes",
                    state.len(),
                    meta.size
                ),
            ));
        }
        Ok(Some((meta, state)))
    }

    fn check(&self) -> Result<Vec<Damage>, StoreError> {
        let mut damage = self.wal.check()?;
        damage.extend(self.cross_check(true)?);
        damage.sort();
        damage.dedup();
        Ok(damage)
    }
}

#[cfg(test)]
#[path = "sled_store_tests.rs"]
mod tests;
