use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use sled::{Batch, Db, IVec};

use crate::{DocMeta, DocStats, Store, StoreError, StoredDoc, VersionMeta, FORMAT_VERSION};

// One sled tree holds everything so that a compaction (snapshot + log trim + metadata) is a
// single atomic batch. Keys: a record kind byte, the document name length-prefixed (so one name
// is never a prefix of another's keys), then for log entries the big-endian sequence number so
// that sled's key order is the application order.
const META: u8 = b'm';
const SNAPSHOT: u8 = b's';
const LOG: u8 = b'u';
// Beside the document, under the same name so a delete removes them in the same batch:
// when it was last appended to, its version counter, each version's description and state.
// Versions are whole-document states (see `Store::put_version`), so compaction never touches them.
const TOUCHED: u8 = b't';
const VERSION_COUNTER: u8 = b'c';
const VERSION_META: u8 = b'V';
const VERSION_STATE: u8 = b'v';

fn doc_key(kind: u8, doc: &str) -> Result<Vec<u8>, StoreError> {
    let len = u16::try_from(doc.len()).map_err(|_| StoreError::NameTooLong(doc.len()))?;
    let mut key = Vec::with_capacity(3 + doc.len() + 8);
    key.push(kind);
    key.extend_from_slice(&len.to_be_bytes());
    key.extend_from_slice(doc.as_bytes());
    Ok(key)
}

fn log_key(doc: &str, seq: u64) -> Result<Vec<u8>, StoreError> {
    seq_key(LOG, doc, seq)
}

fn seq_key(kind: u8, doc: &str, seq: u64) -> Result<Vec<u8>, StoreError> {
    let mut key = doc_key(kind, doc)?;
    key.extend_from_slice(&seq.to_be_bytes());
    Ok(key)
}

fn corrupt(doc: &str, what: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        doc: doc.to_owned(),
        what: what.into(),
    }
}

fn decode_version(doc: &str, raw: &[u8]) -> Result<VersionMeta, StoreError> {
    bincode::serde::decode_from_slice(raw, bincode_config())
        .map(|(v, _)| v)
        .map_err(|e| corrupt(doc, format!("version record: {e}")))
}

fn u64_value(doc: &str, raw: Option<IVec>) -> Result<u64, StoreError> {
    match raw {
        None => Ok(0),
        Some(v) => <[u8; 8]>::try_from(v.as_ref())
            .map(u64::from_be_bytes)
            .map_err(|_| corrupt(doc, "counter of the wrong size")),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn bincode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

fn decode_meta(doc: &str, raw: &[u8]) -> Result<DocMeta, StoreError> {
    let (meta, _): (DocMeta, usize) = bincode::serde::decode_from_slice(raw, bincode_config())
        .map_err(|e| StoreError::Corrupt {
            doc: doc.to_owned(),
            what: format!("metadata: {e}"),
        })?;
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

/// The embedded default store: a sled database in a local folder.
pub struct SledStore {
    db: Db,
}

impl SledStore {
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path)
            // Durability comes from explicit, grouped flushes; sled's timer flush would only add
            // fsyncs that nobody waits for.
            .flush_every_ms(None)
            .open()?;
        Ok(SledStore { db })
    }

    /// Bytes sled occupies on disk.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk()?)
    }

    fn log_prefix(doc: &str) -> Result<Vec<u8>, StoreError> {
        doc_key(LOG, doc)
    }
}

impl Store for SledStore {
    fn load(&self, doc: &str) -> Result<StoredDoc, StoreError> {
        let meta = match self.db.get(doc_key(META, doc)?)? {
            Some(raw) => Some(decode_meta(doc, &raw)?),
            None => None,
        };
        let snapshot = self.db.get(doc_key(SNAPSHOT, doc)?)?.map(|v| v.to_vec());
        let prefix = Self::log_prefix(doc)?;
        let mut log = Vec::new();
        for item in self.db.scan_prefix(&prefix) {
            let (key, value) = item?;
            let seq_bytes: [u8; 8] =
                key[prefix.len()..]
                    .try_into()
                    .map_err(|_| StoreError::Corrupt {
                        doc: doc.to_owned(),
                        what: format!("log key of {} bytes", key.len()),
                    })?;
            log.push((u64::from_be_bytes(seq_bytes), value.to_vec()));
        }
        if snapshot.is_some() && meta.is_none() {
            return Err(StoreError::Corrupt {
                doc: doc.to_owned(),
                what: "snapshot without metadata".into(),
            });
        }
        Ok(StoredDoc {
            meta,
            snapshot,
            log,
        })
    }

    fn append(&self, doc: &str, seq: u64, update: &[u8]) -> Result<(), StoreError> {
        let meta_key = doc_key(META, doc)?;
        if seq == 0 && !self.db.contains_key(&meta_key)? {
            // The metadata record is what `list` enumerates; write it with the first update.
            let meta = DocMeta {
                format_version: FORMAT_VERSION,
                created_at_ms: now_ms(),
                snapshot_upto: 0,
                snapshot_bytes: 0,
                snapshot_at_ms: 0,
                compactions: 0,
            };
            let mut batch = Batch::default();
            batch.insert(meta_key, encode_meta(&meta));
            batch.insert(log_key(doc, seq)?, update);
            self.db.apply_batch(batch)?;
        } else {
            self.db.insert(log_key(doc, seq)?, update)?;
        }
        // For listings' "last modified": an 8-byte in-memory write, made durable by the same
        // flush as the update.
        self.db
            .insert(doc_key(TOUCHED, doc)?, &now_ms().to_be_bytes())?;
        Ok(())
    }

    fn compact(&self, doc: &str, snapshot: &[u8], upto: u64) -> Result<(), StoreError> {
        let meta_key = doc_key(META, doc)?;
        let previous = match self.db.get(&meta_key)? {
            Some(raw) => Some(decode_meta(doc, &raw)?),
            None => None,
        };
        let now = now_ms();
        let meta = DocMeta {
            format_version: FORMAT_VERSION,
            created_at_ms: previous.as_ref().map_or(now, |m| m.created_at_ms),
            snapshot_upto: upto.max(previous.as_ref().map_or(0, |m| m.snapshot_upto)),
            snapshot_bytes: snapshot.len() as u64,
            snapshot_at_ms: now,
            compactions: previous.as_ref().map_or(0, |m| m.compactions) + 1,
        };
        let mut batch = Batch::default();
        batch.insert(meta_key, encode_meta(&meta));
        batch.insert(doc_key(SNAPSHOT, doc)?, snapshot);
        let start = log_key(doc, 0)?;
        let end = log_key(doc, upto)?;
        for item in self.db.range(start..end) {
            let (key, _) = item?;
            batch.remove(key);
        }
        self.db.apply_batch(batch)?;
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    fn list(&self) -> Result<Vec<String>, StoreError> {
        let mut names = Vec::new();
        for item in self.db.scan_prefix([META]) {
            let (key, _): (IVec, IVec) = item?;
            let name = key
                .get(3..)
                .and_then(|b| std::str::from_utf8(b).ok())
                .ok_or_else(|| StoreError::Corrupt {
                    doc: String::from_utf8_lossy(&key).into_owned(),
                    what: "metadata key is not a document name".into(),
                })?;
            names.push(name.to_owned());
        }
        Ok(names)
    }

    fn meta(&self, doc: &str) -> Result<Option<DocMeta>, StoreError> {
        match self.db.get(doc_key(META, doc)?)? {
            Some(raw) => Ok(Some(decode_meta(doc, &raw)?)),
            None => Ok(None),
        }
    }

    fn delete(&self, doc: &str) -> Result<bool, StoreError> {
        let meta_key = doc_key(META, doc)?;
        let existed = self.db.contains_key(&meta_key)?;
        let mut batch = Batch::default();
        batch.remove(meta_key);
        batch.remove(doc_key(SNAPSHOT, doc)?);
        batch.remove(doc_key(TOUCHED, doc)?);
        batch.remove(doc_key(VERSION_COUNTER, doc)?);
        for kind in [LOG, VERSION_META, VERSION_STATE] {
            for item in self.db.scan_prefix(doc_key(kind, doc)?) {
                let (key, _) = item?;
                batch.remove(key);
            }
        }
        self.db.apply_batch(batch)?;
        Ok(existed)
    }

    fn stats(&self, doc: &str) -> Result<Option<DocStats>, StoreError> {
        let Some(meta) = self.meta(doc)? else {
            return Ok(None);
        };
        let prefix = Self::log_prefix(doc)?;
        let (mut log_bytes, mut next_seq) = (0u64, meta.snapshot_upto);
        for item in self.db.scan_prefix(&prefix) {
            let (key, value) = item?;
            log_bytes += value.len() as u64;
            let seq = <[u8; 8]>::try_from(&key[prefix.len()..])
                .map(u64::from_be_bytes)
                .map_err(|_| corrupt(doc, "log key of the wrong size"))?;
            next_seq = next_seq.max(seq + 1);
        }
        let touched = u64_value(doc, self.db.get(doc_key(TOUCHED, doc)?)?)?;
        let versions = self.db.scan_prefix(doc_key(VERSION_META, doc)?).count() as u64;
        Ok(Some(DocStats {
            size_bytes: meta.snapshot_bytes + log_bytes,
            updates: next_seq,
            last_modified_ms: touched.max(meta.snapshot_at_ms).max(meta.created_at_ms),
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
        let id = u64_value(doc, counter)?;
        let version = VersionMeta {
            id,
            label: label.to_owned(),
            created_at_ms: now_ms(),
            size: state.len() as u64,
        };
        let record = bincode::serde::encode_to_vec(&version, bincode_config())
            .map_err(|e| corrupt(doc, format!("version record: {e}")))?;
        let mut batch = Batch::default();
        batch.insert(seq_key(VERSION_META, doc, id)?, record);
        batch.insert(seq_key(VERSION_STATE, doc, id)?, state);
        self.db.apply_batch(batch)?;
        Ok(version)
    }

    fn versions(&self, doc: &str) -> Result<Vec<VersionMeta>, StoreError> {
        self.db
            .scan_prefix(doc_key(VERSION_META, doc)?)
            .map(|item| decode_version(doc, &item?.1))
            .collect()
    }

    fn version(&self, doc: &str, id: u64) -> Result<Option<(VersionMeta, Vec<u8>)>, StoreError> {
        let Some(raw) = self.db.get(seq_key(VERSION_META, doc, id)?)? else {
            return Ok(None);
        };
        let meta = decode_version(doc, &raw)?;
        let state = self
            .db
            .get(seq_key(VERSION_STATE, doc, id)?)?
            .ok_or_else(|| corrupt(doc, format!("version {id} has no state")))?;
        Ok(Some((meta, state.to_vec())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_load_compact_roundtrip_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path()).unwrap();
            for seq in 0..10u64 {
                store.append("doc", seq, &[seq as u8; 3]).unwrap();
            }
            store.append("doc-2", 0, b"other").unwrap();
            store.flush().unwrap();
        }
        let store = SledStore::open(dir.path()).unwrap();
        let stored = store.load("doc").unwrap();
        assert_eq!(stored.log.len(), 10);
        assert_eq!(stored.log[3], (3, vec![3u8; 3]));
        assert_eq!(stored.next_seq(), 10);
        assert_eq!(stored.log_bytes(), 30);

        store.compact("doc", b"snap", 7).unwrap();
        let stored = store.load("doc").unwrap();
        assert_eq!(stored.snapshot.as_deref(), Some(&b"snap"[..]));
        assert_eq!(
            stored.log.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![7, 8, 9]
        );
        let meta = stored.meta.unwrap();
        assert_eq!((meta.snapshot_upto, meta.compactions), (7, 1));

        // Compacting everything keeps the sequence moving forward.
        store.compact("doc", b"snap2", 10).unwrap();
        let stored = store.load("doc").unwrap();
        assert!(stored.log.is_empty());
        assert_eq!(stored.next_seq(), 10);

        let mut names = store.list().unwrap();
        names.sort();
        assert_eq!(names, vec!["doc", "doc-2"]);
        assert_eq!(
            store.load("doc-2").unwrap().log,
            vec![(0, b"other".to_vec())]
        );
        assert!(store.load("missing").unwrap().log.is_empty());

        assert!(store.delete("doc").unwrap());
        assert!(store.load("doc").unwrap().snapshot.is_none());
        assert_eq!(store.list().unwrap(), vec!["doc-2"]);
    }

    #[test]
    fn versions_survive_compaction_and_go_with_the_document() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path()).unwrap();
            store.append("doc", 0, b"one").unwrap();
            store.append("doc", 1, b"two").unwrap();
            let v1 = store.put_version("doc", "first", b"state-1").unwrap();
            let v2 = store.put_version("doc", "second", b"state-22").unwrap();
            assert_eq!((v1.id, v2.id, v2.size), (1, 2, 8));
            store.put_version("other", "x", b"o").unwrap();
            store.compact("doc", b"snap", 2).unwrap();
            store.flush().unwrap();
        }
        let store = SledStore::open(dir.path()).unwrap();
        let versions = store.versions("doc").unwrap();
        assert_eq!(
            versions
                .iter()
                .map(|v| v.label.as_str())
                .collect::<Vec<_>>(),
            vec!["first", "second"]
        );
        let (meta, state) = store.version("doc", 2).unwrap().unwrap();
        assert_eq!(
            (meta.label.as_str(), state.as_slice()),
            ("second", &b"state-22"[..])
        );
        assert!(store.version("doc", 3).unwrap().is_none());
        let stats = store.stats("doc").unwrap().unwrap();
        assert_eq!((stats.size_bytes, stats.updates, stats.versions), (4, 2, 2));
        assert!(stats.last_modified_ms > 0);

        assert!(store.delete("doc").unwrap());
        assert!(store.versions("doc").unwrap().is_empty());
        assert!(store.stats("doc").unwrap().is_none());
        // A recreated document numbers its versions from 1 again; others are untouched.
        assert_eq!(store.put_version("doc", "new", b"s").unwrap().id, 1);
        assert_eq!(store.versions("other").unwrap().len(), 1);
    }

    #[test]
    fn names_that_prefix_each_other_stay_apart() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        store.append("a", 0, b"1").unwrap();
        store.append("ab", 0, b"2").unwrap();
        assert_eq!(store.load("a").unwrap().log, vec![(0, b"1".to_vec())]);
        assert_eq!(store.load("ab").unwrap().log, vec![(0, b"2".to_vec())]);
    }

    #[test]
    fn corrupt_metadata_is_reported_with_the_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        store.append("good", 0, b"x").unwrap();
        store
            .db
            .insert(doc_key(META, "bad").unwrap(), &[0xff, 0xff, 0xff][..])
            .unwrap();
        match store.load("bad") {
            Err(StoreError::Corrupt { doc, .. }) => assert_eq!(doc, "bad"),
            other => panic!("expected corruption error, got {other:?}"),
        }
        assert_eq!(store.load("good").unwrap().log.len(), 1);
    }
}
