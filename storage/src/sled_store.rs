use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use sled::{Batch, Db};
use tracing::warn;

use crate::recovery::Mark;
use crate::state_files::StateFiles;
use crate::wal::Wal;
use crate::{Damage, DocMeta, DocStats, Store, StoreError, StoredDoc, VersionMeta, FORMAT_VERSION};

// One sled tree. Keys: a record kind byte, the document name length-prefixed (so one name is
// never a prefix of another's keys), then for a version its big-endian id (and for format 2's
// chunks their big-endian index, so that sled's key order was the state's byte order).
const META: u8 = b'm';
// Versions beside the document, under the same name so a delete removes them together: its
// version counter and each version's record (key: name, u64 BE id). Versions are whole states,
// so compaction never touches them.
const VERSION_COUNTER: u8 = b'n';
const VERSION_META: u8 = b'V';
// Format 1 kept the snapshot as one value and the log in sled, format 2 the snapshot in chunks;
// read only to convert.
const V1_SNAPSHOT: u8 = b's';
const V1_LOG: u8 = b'u';
const V2_CHUNK: u8 = b'c';

fn doc_key(kind: u8, doc: &str) -> Result<Vec<u8>, StoreError> {
    let len = u16::try_from(doc.len()).map_err(|_| StoreError::NameTooLong(doc.len()))?;
    let mut key = Vec::with_capacity(3 + doc.len() + 8);
    key.push(kind);
    key.extend_from_slice(&len.to_be_bytes());
    key.extend_from_slice(doc.as_bytes());
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

fn mark_of(meta: &DocMeta) -> Mark {
    Mark {
        upto: meta.snapshot_upto,
        len: meta.snapshot_bytes,
        crc: meta.snapshot_crc32,
    }
}

/// The embedded default store: a folder holding a sled database (metadata), the snapshots in
/// `snapshots/`, the versions in `versions/` and the write-ahead log in `wal/`.
pub struct SledStore {
    db: Db,
    wal: Wal,
    snapshot_files: StateFiles,
    version_files: StateFiles,
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
            // Sled only holds metadata, each record flushed by its writer; a timer flush
            // would only add fsyncs that nobody waits for.
            .flush_every_ms(None)
            .open()?;
        let (wal, mut damage) = Wal::open(&path.join("wal"))?;
        let mut store = SledStore {
            db,
            wal,
            snapshot_files: StateFiles::open(&path.join("snapshots"))?,
            version_files: StateFiles::open(&path.join("versions"))?,
            touched: Default::default(),
            damaged: BTreeMap::new(),
            opened_damage: Vec::new(),
        };
        store.convert_format_1()?;
        store.convert_format_2()?;
        store.convert_version_chunks()?;
        store.sweep_snapshots()?;
        store.sweep_versions()?;
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

    /// Bytes the store occupies on disk: sled's files, the snapshots, the versions and the log's
    /// segments.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk()?
            + self.snapshot_files.size()?
            + self.version_files.size()?
            + self.wal.size().0)
    }

    /// Where `doc`'s snapshot is kept, if it has one (for operators and tests).
    pub fn snapshot_path(&self, doc: &str) -> Result<Option<std::path::PathBuf>, StoreError> {
        Ok(self
            .meta(doc)?
            .map(|m| self.snapshot_files.path(m.snapshot_file)))
    }

    fn read_snapshot(&self, doc: &str, meta: &DocMeta) -> Result<Vec<u8>, StoreError> {
        let path = self.snapshot_files.path(meta.snapshot_file);
        let Some(snapshot) = self
            .snapshot_files
            .read(meta.snapshot_file, meta.snapshot_bytes)?
        else {
            return Err(corrupt(
                doc,
                format!("its snapshot file {} is missing", path.display()),
            ));
        };
        if snapshot.len() as u64 != meta.snapshot_bytes
            || crc32fast::hash(&snapshot) != meta.snapshot_crc32
        {
            return Err(corrupt(
                doc,
                format!(
                    "snapshot file {} ({}{} bytes) does not match its metadata ({} bytes, CRC32 \
                     {:08x})",
                    path.display(),
                    if snapshot.len() as u64 > meta.snapshot_bytes {
                        "over "
                    } else {
                        ""
                    },
                    snapshot.len(),
                    meta.snapshot_bytes,
                    meta.snapshot_crc32
                ),
            ));
        }
        Ok(snapshot)
    }

    /// Removes snapshot files no metadata names (left by a crash mid-compaction). Skipped while
    /// any metadata record is unreadable: its file may be the one a repair needs.
    fn sweep_snapshots(&self) -> Result<(), StoreError> {
        self.sweep(&self.snapshot_files, META, |key, raw| {
            let doc = name_of(key).unwrap_or_default();
            decode_meta(&doc, raw).map(|m| m.snapshot_file)
        })
    }

    /// Removes the files in `files` that no record under `kind` names, as `file_of` reads them;
    /// removes nothing if any record does not read.
    fn sweep(
        &self,
        files: &StateFiles,
        kind: u8,
        file_of: impl Fn(&[u8], &[u8]) -> Result<u64, StoreError>,
    ) -> Result<(), StoreError> {
        let mut keep = std::collections::HashSet::new();
        for item in self.db.scan_prefix([kind]) {
            let (key, raw) = item?;
            match file_of(&key, &raw) {
                Ok(file) => keep.insert(file),
                Err(e) => {
                    warn!(error = %e, "stray files kept: a record naming files is unreadable");
                    return Ok(());
                }
            };
        }
        files.sweep(&keep)
    }

    /// Checks the snapshots sled's metadata names against what the log records of them, and that
    /// each document's log continues exactly where its snapshot ends. On open (`deep == false`)
    /// it also re-records a snapshot that sled names but the log does not know of yet (the
    /// process died between the two writes) and checks each snapshot file's size. `deep` reads
    /// every snapshot and log entry.
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
                            "sled lost the metadata of the snapshot up to {} that the log records",
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
            } else if let Some(meta) = &meta {
                // Reading every snapshot would make start-up as slow as `check`; a missing or
                // truncated file is found by its size, a changed byte when it is read.
                let path = self.snapshot_files.path(meta.snapshot_file);
                match self.snapshot_files.len(meta.snapshot_file) {
                    Some(len) if len == meta.snapshot_bytes => {}
                    Some(len) => report(
                        &name,
                        format!(
                            "its snapshot file {} holds {len} of its {} bytes",
                            path.display(),
                            meta.snapshot_bytes
                        ),
                    ),
                    None => report(
                        &name,
                        format!("its snapshot file {} is missing", path.display()),
                    ),
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

    /// Writes a new snapshot's file, durably, and adds its metadata to `batch`. The file the
    /// previous metadata names is the caller's to remove once the batch is durable.
    fn stage_snapshot(
        &self,
        batch: &mut Batch,
        doc: &str,
        snapshot: &[u8],
        upto: u64,
        previous: Option<&DocMeta>,
    ) -> Result<DocMeta, StoreError> {
        let now = now_ms();
        let meta = DocMeta {
            format_version: FORMAT_VERSION,
            created_at_ms: previous.map_or(now, |m| m.created_at_ms),
            snapshot_upto: upto.max(previous.map_or(0, |m| m.snapshot_upto)),
            snapshot_bytes: snapshot.len() as u64,
            snapshot_at_ms: now,
            compactions: previous.map_or(0, |m| m.compactions) + 1,
            snapshot_crc32: crc32fast::hash(snapshot),
            snapshot_file: self.db.generate_id()?,
        };
        let key = doc_key(META, doc)?;
        self.snapshot_files.write(meta.snapshot_file, snapshot)?;
        batch.insert(key, encode_meta(&meta));
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
        self.wal.append_snapshot(doc, mark_of(&meta))?;
        if let Some(previous) = previous {
            self.snapshot_files.remove(previous.snapshot_file);
        }
        Ok(())
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
        // A record too damaged to read still goes; its file is left to the sweep at open.
        let meta = self.meta(doc).ok().flatten();
        let existed = self.db.contains_key(&meta_key)? || self.wal.documents().contains_key(doc);
        let mut batch = Batch::default();
        batch.remove(meta_key);
        let versions_gone = self.stage_versions_removal(&mut batch, doc)?;
        self.db.apply_batch(batch)?;
        if let Ok(mut touched) = self.touched.lock() {
            touched.remove(doc);
        }
        self.db.flush()?;
        self.wal.append_delete(doc)?;
        if let Some(meta) = meta {
            self.snapshot_files.remove(meta.snapshot_file);
        }
        self.remove_version_files(&versions_gone);
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
        self.write_version(doc, label, state)
    }

    fn versions(&self, doc: &str) -> Result<Vec<VersionMeta>, StoreError> {
        self.list_versions(doc)
    }

    fn version(&self, doc: &str, id: u64) -> Result<Option<(VersionMeta, Vec<u8>)>, StoreError> {
        self.read_version(doc, id)
    }

    fn check(&self) -> Result<Vec<Damage>, StoreError> {
        let mut damage = self.wal.check()?;
        damage.extend(self.cross_check(true)?);
        damage.extend(self.check_versions()?);
        damage.sort();
        damage.dedup();
        Ok(damage)
    }
}

#[path = "sled_store_convert.rs"]
mod convert;
#[path = "sled_store_versions.rs"]
mod versions;

#[cfg(test)]
#[path = "sled_store_convert_tests.rs"]
mod convert_tests;
#[cfg(test)]
#[path = "sled_store_tests.rs"]
mod tests;
