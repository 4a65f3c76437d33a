//! Folders written by earlier formats open converted, their data intact.

use super::convert::{DocMetaV1, DocMetaV2};
use super::tests::{names, reopen};
use super::versions::V2_VERSION_CHUNK;
use super::*;
use crate::recovery::Mark;

/// Format 2 kept snapshots and versions in sled in chunks of this size.
const V2_CHUNK_SIZE: usize = 4096;

fn sled_holds_no_chunk(store: &SledStore) -> bool {
    store.db.scan_prefix([V2_CHUNK]).next().is_none()
}

#[test]
fn format_1_folders_are_converted() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = sled::open(dir.path()).unwrap();
        let v1 = DocMetaV1 {
            format_version: 1,
            created_at_ms: 5,
            snapshot_upto: 3,
            snapshot_bytes: 6,
            snapshot_at_ms: 6,
            compactions: 2,
        };
        let raw = bincode::serde::encode_to_vec(&v1, bincode_config()).unwrap();
        db.insert(doc_key(META, "old").unwrap(), raw).unwrap();
        db.insert(doc_key(V1_SNAPSHOT, "old").unwrap(), &b"snap01"[..])
            .unwrap();
        for seq in 3..5u64 {
            let mut key = doc_key(V1_LOG, "old").unwrap();
            key.extend_from_slice(&seq.to_be_bytes());
            db.insert(key, &[seq as u8][..]).unwrap();
        }
        db.flush().unwrap();
    }
    let store = reopen(dir.path());
    let stored = store.load("old").unwrap();
    assert_eq!(stored.snapshot.as_deref(), Some(&b"snap01"[..]));
    assert_eq!(stored.log, vec![(3, vec![3]), (4, vec![4])]);
    let meta = stored.meta.unwrap();
    assert_eq!(
        (meta.created_at_ms, meta.compactions, meta.format_version),
        (5, 2, FORMAT_VERSION)
    );
    assert_eq!(
        std::fs::read(store.snapshot_path("old").unwrap().unwrap()).unwrap(),
        b"snap01"
    );
    assert_eq!(store.check().unwrap(), vec![]);
}

fn v2_chunk_key(doc: &str, index: u32) -> Vec<u8> {
    let mut key = doc_key(V2_CHUNK, doc).unwrap();
    key.extend_from_slice(&index.to_be_bytes());
    key
}

#[test]
fn format_2_snapshots_move_from_sled_into_files() {
    let dir = tempfile::tempdir().unwrap();
    let whole: Vec<u8> = (0..V2_CHUNK_SIZE + 100).map(|i| i as u8).collect();
    let version = VersionMeta {
        id: 1,
        label: "v".into(),
        created_at_ms: 7,
        size: whole.len() as u64,
    };
    {
        let store = SledStore::open(dir.path()).unwrap();
        store.append("old", 0, b"a").unwrap();
        store.append("old", 1, b"b").unwrap();
        store.append("hurt", 0, b"c").unwrap();
        store.flush().unwrap();
        // What a format 2 build left: metadata naming chunks, the chunks, the log's mark.
        for (doc, upto, stored) in [("old", 1, whole.clone()), ("hurt", 1, vec![9; 50])] {
            let v2 = DocMetaV2 {
                format_version: 2,
                created_at_ms: 5,
                snapshot_upto: upto,
                snapshot_bytes: whole.len() as u64,
                snapshot_at_ms: 6,
                compactions: 3,
                snapshot_crc32: crc32fast::hash(&whole),
                snapshot_chunks: 2,
            };
            let raw = bincode::serde::encode_to_vec(&v2, bincode_config()).unwrap();
            store.db.insert(doc_key(META, doc).unwrap(), raw).unwrap();
            for (i, chunk) in stored.chunks(V2_CHUNK_SIZE).enumerate() {
                store.db.insert(v2_chunk_key(doc, i as u32), chunk).unwrap();
            }
            let mark = Mark {
                upto,
                len: whole.len() as u64,
                crc: v2.snapshot_crc32,
            };
            store.wal.append_snapshot(doc, mark).unwrap();
        }
        // And a version: a bare description, its state in chunks.
        let meta = version.clone();
        let raw = bincode::serde::encode_to_vec(&meta, bincode_config()).unwrap();
        let mut key = doc_key(VERSION_META, "old").unwrap();
        key.extend_from_slice(&1u64.to_be_bytes());
        store.db.insert(key, raw).unwrap();
        for (i, chunk) in whole.chunks(V2_CHUNK_SIZE).enumerate() {
            let mut key = doc_key(V2_VERSION_CHUNK, "old").unwrap();
            key.extend_from_slice(&1u64.to_be_bytes());
            key.extend_from_slice(&(i as u32).to_be_bytes());
            store.db.insert(key, chunk).unwrap();
        }
        store
            .db
            .insert(
                doc_key(VERSION_COUNTER, "old").unwrap(),
                &1u64.to_be_bytes(),
            )
            .unwrap();
        store.db.flush().unwrap();
        store.flush().unwrap();
    }
    let store = reopen(dir.path());
    assert_eq!(
        store.version("old", 1).unwrap().unwrap(),
        (version, whole.clone())
    );
    assert!(store.db.scan_prefix([V2_VERSION_CHUNK]).next().is_none());
    assert_eq!(store.put_version("old", "next", b"s").unwrap().id, 2);
    let stored = store.load("old").unwrap();
    assert_eq!(stored.snapshot.as_deref(), Some(&whole[..]));
    assert_eq!(stored.log, vec![(1, b"b".to_vec())]);
    let meta = stored.meta.unwrap();
    assert_eq!(
        (meta.created_at_ms, meta.compactions, meta.format_version),
        (5, 3, FORMAT_VERSION)
    );
    assert!(sled_holds_no_chunk(&store), "the chunks left sled");
    assert_eq!(
        std::fs::read(store.snapshot_path("old").unwrap().unwrap()).unwrap(),
        whole
    );
    // A snapshot damaged in sled stays reported as damaged once it is a file.
    assert!(store.load("hurt").is_err());
    assert_eq!(names(&store.check().unwrap()), vec!["hurt"]);
    assert_eq!(store.load("old").unwrap().log.len(), 1);
}
