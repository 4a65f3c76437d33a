use std::path::{Path, PathBuf};

use super::*;

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("wal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

fn wal_bytes(dir: &Path) -> u64 {
    segments(dir)
        .iter()
        .map(|p| p.metadata().unwrap().len())
        .sum()
}

/// Opens the store again; sled's background threads let go of the folder's lock a moment after
/// the previous handle is dropped.
pub(super) fn reopen(dir: &Path) -> SledStore {
    for _ in 0..100 {
        match SledStore::open(dir) {
            Err(StoreError::Backend(sled::Error::Io(e))) if e.to_string().contains("lock") => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            other => return other.unwrap(),
        }
    }
    panic!("the store stayed locked")
}

pub(super) fn names(damage: &[Damage]) -> Vec<&str> {
    let mut v: Vec<&str> = damage.iter().filter_map(|d| d.doc.as_deref()).collect();
    v.dedup();
    v
}

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
    let store = reopen(dir.path());
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

    assert_eq!(store.list().unwrap(), vec!["doc", "doc-2"]);
    assert_eq!(
        store.load("doc-2").unwrap().log,
        vec![(0, b"other".to_vec())]
    );
    assert!(store.load("missing").unwrap().log.is_empty());

    assert!(store.delete("doc").unwrap());
    assert!(store.load("doc").unwrap().snapshot.is_none());
    assert_eq!(store.list().unwrap(), vec!["doc-2"]);
    store.flush().unwrap();
    drop(store);

    let store = reopen(dir.path());
    assert_eq!(store.list().unwrap(), vec!["doc-2"]);
    assert!(store.load("doc").unwrap().log.is_empty());
    assert_eq!(store.check().unwrap(), vec![]);
}

#[test]
fn a_compaction_survives_reopening_without_a_log_flush() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = SledStore::open(dir.path()).unwrap();
        for seq in 0..5u64 {
            store.append("doc", seq, &[seq as u8; 3]).unwrap();
        }
        store.flush().unwrap();
        // The snapshot is durable in sled, its marker in the log is not: the process dies here.
        store.compact("doc", b"snap", 5).unwrap();
    }
    let store = reopen(dir.path());
    assert_eq!(store.damage_at_open(), &[]);
    let stored = store.load("doc").unwrap();
    assert_eq!(stored.snapshot.as_deref(), Some(&b"snap"[..]));
    assert!(stored.log.is_empty());
    assert_eq!(stored.next_seq(), 5);
}

#[test]
fn names_that_prefix_each_other_stay_apart() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    store.append("a", 0, b"1").unwrap();
    store.append("ab", 0, b"2").unwrap();
    store.compact("a", &[7; 9000], 1).unwrap();
    store.compact("ab", &[8; 5000], 1).unwrap();
    assert_eq!(store.load("a").unwrap().snapshot.unwrap(), vec![7; 9000]);
    assert_eq!(store.load("ab").unwrap().snapshot.unwrap(), vec![8; 5000]);
    // A smaller snapshot leaves none of the bigger one's chunks behind.
    store.compact("a", &[9; 10], 1).unwrap();
    assert_eq!(store.load("a").unwrap().snapshot.unwrap(), vec![9; 10]);
    assert_eq!(store.check().unwrap(), vec![]);
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
    assert_eq!(names(&store.check().unwrap()), vec!["bad"]);
}

#[test]
fn small_flushes_write_inside_the_segment_and_reopening_continues_after_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let file_len = || {
        let last = segments(dir.path()).pop().unwrap();
        std::fs::metadata(last).unwrap().len()
    };
    {
        let store = SledStore::open(dir.path()).unwrap();
        store.append("doc", 0, b"first").unwrap();
        store.flush().unwrap();
        let allocated = file_len();
        for seq in 1..20u64 {
            store.append("doc", seq, &[b'x'; 100]).unwrap();
            store.flush().unwrap();
        }
        // The file did not grow with each flush: fdatasync had no size to persist.
        assert_eq!(file_len(), allocated);
    }
    for round in 0..2u64 {
        let store = reopen(dir.path());
        assert_eq!(store.damage_at_open(), &[]);
        store.append("doc", 20 + round, b"after reopen").unwrap();
        store.flush().unwrap();
    }
    let store = reopen(dir.path());
    assert_eq!(store.damage_at_open(), &[]);
    let log = store.load("doc").unwrap().log;
    assert_eq!(log.len(), 22);
    assert_eq!(log[21], (21, b"after reopen".to_vec()));
    assert_eq!(store.check().unwrap(), vec![]);
}

#[test]
fn a_torn_tail_is_cut_off_silently() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = SledStore::open(dir.path()).unwrap();
        store.append("doc", 0, b"kept").unwrap();
        store.flush().unwrap();
    }
    // An unfinished write: half a record after the last commit.
    // It lands where the data ends, in the zeros the segment was extended with.
    let last = segments(dir.path()).pop().unwrap();
    let mut bytes = std::fs::read(&last).unwrap();
    let clean_len = crate::record::scan(&bytes).1;
    assert!(bytes.len() >= clean_len + 10, "free space after the data");
    bytes[clean_len..clean_len + 10].copy_from_slice(&[40, 0, 0, 0, 1, 2, 3, 4, b'u', 0]);
    std::fs::write(&last, &bytes).unwrap();

    let store = reopen(dir.path());
    assert_eq!(store.damage_at_open(), &[]);
    assert_eq!(store.load("doc").unwrap().log, vec![(0, b"kept".to_vec())]);
    assert_eq!(std::fs::metadata(&last).unwrap().len() as usize, clean_len);
    assert_eq!(store.check().unwrap(), vec![]);
}

#[test]
fn a_flipped_byte_in_the_log_is_reported_by_document() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = SledStore::open(dir.path()).unwrap();
        for seq in 0..20u64 {
            store.append("victim", seq, &[0xaa; 200]).unwrap();
            store.append("bystander", seq, &[0xbb; 10]).unwrap();
            store.flush().unwrap();
        }
    }
    let seg = segments(dir.path()).pop().unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    // Inside a `victim` update near the middle of the data: its payload is 200 bytes of 0xaa.
    let mid = crate::record::scan(&bytes).1 / 2;
    let at = (mid..bytes.len())
        .find(|&i| bytes[i..i + 50] == [0xaa; 50])
        .unwrap();
    bytes[at + 10] ^= 0x01;
    std::fs::write(&seg, &bytes).unwrap();

    let store = reopen(dir.path());
    assert_eq!(names(store.damage_at_open()), vec!["victim"]);
    assert!(matches!(
        store.load("victim"),
        Err(StoreError::Corrupt { .. })
    ));
    assert_eq!(store.load("bystander").unwrap().log.len(), 20);
    assert_eq!(names(&store.check().unwrap()), vec!["victim"]);
}

#[test]
fn a_snapshot_sled_lost_is_reported_by_document() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = SledStore::open(dir.path()).unwrap();
        store.append("doc", 0, b"x").unwrap();
        store.append("other", 0, b"y").unwrap();
        store.compact("doc", &[1; 20_000], 1).unwrap();
        store.compact("other", &[2; 100], 1).unwrap();
        store.flush().unwrap();
        // What sled's recovery does to records after a damaged spot: they are gone.
        store.db.remove(doc_key(META, "doc").unwrap()).unwrap();
        store.db.flush().unwrap();
    }
    let store = reopen(dir.path());
    assert_eq!(names(store.damage_at_open()), vec!["doc"]);
    assert!(store.load("doc").is_err());
    assert_eq!(store.load("other").unwrap().snapshot.unwrap(), vec![2; 100]);

    // A damaged snapshot file is caught by its CRC when read, a missing one by its absence.
    let path = store.snapshot_path("other").unwrap().unwrap();
    std::fs::write(&path, [3; 100]).unwrap();
    let err = store.load("other").unwrap_err().to_string();
    assert!(err.contains("does not match its metadata"), "{err}");
    store.append("third", 0, b"z").unwrap();
    store.compact("third", &[4; 10], 1).unwrap();
    std::fs::remove_file(store.snapshot_path("third").unwrap().unwrap()).unwrap();
    let err = store.load("third").unwrap_err().to_string();
    assert!(err.contains("is missing"), "{err}");
    assert_eq!(
        names(&store.check().unwrap()),
        vec!["doc", "other", "third"]
    );
    // At start-up a missing or truncated file is found by its size; a changed byte only when
    // read, which `check` does.
    drop(store);
    let store = reopen(dir.path());
    assert_eq!(names(store.damage_at_open()), vec!["doc", "third"]);
    assert_eq!(
        names(&store.check().unwrap()),
        vec!["doc", "other", "third"]
    );
}

#[test]
fn a_snapshot_is_a_plain_file_replaced_whole_and_removed_with_its_document() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    store.append("doc", 0, b"x").unwrap();
    store.compact("doc", &[1; 300_000], 1).unwrap();
    let first = store.snapshot_path("doc").unwrap().unwrap();
    // The file holds exactly the compacted update, so any Yjs tool can read it.
    assert_eq!(std::fs::read(&first).unwrap(), vec![1; 300_000]);
    assert!(first.starts_with(dir.path().join("snapshots")));
    // Sled holds none of it, only the metadata naming it.
    let in_sled: usize = store.db.iter().map(|kv| kv.unwrap().1.len()).sum();
    assert!(in_sled < 200, "sled holds {in_sled} bytes");
    assert!(store.size_on_disk().unwrap() >= 300_000);

    store.compact("doc", b"smaller", 1).unwrap();
    let second = store.snapshot_path("doc").unwrap().unwrap();
    assert_ne!(first, second);
    assert!(!first.exists(), "the replaced snapshot's file is removed");
    assert_eq!(std::fs::read(&second).unwrap(), b"smaller");
    assert_eq!(store.load("doc").unwrap().snapshot.unwrap(), b"smaller");

    assert!(store.delete("doc").unwrap());
    assert!(
        !second.exists(),
        "a deleted document's snapshot file is removed"
    );
    assert_eq!(snapshot_files(dir.path()), Vec::<String>::new());
}

fn snapshot_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[test]
fn files_a_crash_left_unnamed_are_removed_at_open_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let kept;
    {
        let store = SledStore::open(dir.path()).unwrap();
        store.append("doc", 0, b"x").unwrap();
        store.compact("doc", b"snap", 1).unwrap();
        store.flush().unwrap();
        kept = store.snapshot_path("doc").unwrap().unwrap();
        // Written, but the process died before its metadata was: nobody names it.
        store
            .snapshot_files
            .write(store.db.generate_id().unwrap(), b"half")
            .unwrap();
        // The same for a version's state.
        store
            .version_files
            .write(store.db.generate_id().unwrap(), b"half")
            .unwrap();
    }
    std::fs::write(dir.path().join("snapshots/README"), b"not ours").unwrap();
    assert_eq!(snapshot_files(dir.path()).len(), 3);
    let store = reopen(dir.path());
    let kept_name = kept.file_name().unwrap().to_str().unwrap().to_owned();
    assert_eq!(
        snapshot_files(dir.path()),
        vec![kept_name, "README".to_owned()]
    );
    assert_eq!(store.load("doc").unwrap().snapshot.unwrap(), b"snap");
    assert_eq!(
        std::fs::read_dir(dir.path().join("versions"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(store.check().unwrap(), vec![]);

    // While a metadata record is unreadable, no file is removed: it may be that record's.
    let stray = store.db.generate_id().unwrap();
    store.snapshot_files.write(stray, b"maybe needed").unwrap();
    store
        .db
        .insert(doc_key(META, "broken").unwrap(), &[3u8, 0xff][..])
        .unwrap();
    store.db.flush().unwrap();
    drop(store);
    let store = reopen(dir.path());
    assert!(store.snapshot_files.path(stray).exists());
    assert_eq!(names(store.damage_at_open()), vec!["broken"]);
}

#[test]
fn the_log_reclaims_dead_segments_and_copies_live_records_forward() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    // One entry of a quiet document sits in the first segment for the whole run.
    store.append("quiet", 0, b"pinned").unwrap();
    let update = [0x42u8; 1000];
    let mut seq = 0;
    for round in 0..100u64 {
        for _ in 0..100 {
            store.append("busy", seq, &update).unwrap();
            seq += 1;
        }
        store.flush().unwrap();
        store.compact("busy", &round.to_le_bytes(), seq).unwrap();
    }
    store.flush().unwrap();
    // 10 MB went through the log; what stays is the quiet entry and a few segments.
    assert!(
        wal_bytes(dir.path()) < 4 << 20,
        "log holds {} bytes",
        wal_bytes(dir.path())
    );
    drop(store);
    let store = reopen(dir.path());
    assert_eq!(
        store.load("quiet").unwrap().log,
        vec![(0, b"pinned".to_vec())]
    );
    assert_eq!(store.load("busy").unwrap().next_seq(), seq);
    assert_eq!(store.check().unwrap(), vec![]);
}

#[test]
fn versions_survive_compaction_and_go_with_the_document() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = SledStore::open(dir.path()).unwrap();
        store.append("doc", 0, b"one").unwrap();
        store.append("doc", 1, b"two").unwrap();
        let v1 = store.put_version("doc", "first", b"state-1").unwrap();
        let big = vec![7u8; 20_000];
        let v2 = store.put_version("doc", "second", &big).unwrap();
        assert_eq!((v1.id, v2.id, v2.size), (1, 2, big.len() as u64));
        store.put_version("other", "x", b"o").unwrap();
        store.compact("doc", b"snap", 2).unwrap();
        store.flush().unwrap();
    }
    let store = reopen(dir.path());
    let labels: Vec<String> = store
        .versions("doc")
        .unwrap()
        .into_iter()
        .map(|v| v.label)
        .collect();
    assert_eq!(labels, vec!["first", "second"]);
    let (meta, state) = store.version("doc", 2).unwrap().unwrap();
    assert_eq!((meta.label.as_str(), state.len()), ("second", 20_000));
    // Each state is a file of its own, outside sled.
    let in_sled: usize = store.db.iter().map(|kv| kv.unwrap().1.len()).sum();
    assert!(in_sled < 400, "sled holds {in_sled} bytes");
    let files = |dir: &Path| std::fs::read_dir(dir.join("versions")).unwrap().count();
    assert_eq!(files(dir.path()), 3);
    assert!(store.version("doc", 3).unwrap().is_none());
    let stats = store.stats("doc").unwrap().unwrap();
    assert_eq!((stats.size_bytes, stats.updates, stats.versions), (4, 2, 2));
    assert!(stats.last_modified_ms > 0);

    assert!(store.delete("doc").unwrap());
    store.flush().unwrap();
    assert!(store.versions("doc").unwrap().is_empty());
    assert!(store.stats("doc").unwrap().is_none());
    // A recreated document numbers its versions from 1 again; others are untouched.
    assert_eq!(store.put_version("doc", "new", b"s").unwrap().id, 1);
    assert_eq!(store.versions("other").unwrap().len(), 1);
    assert_eq!(
        files(dir.path()),
        2,
        "the deleted document's files went with it"
    );

    // A changed byte in a version's file is refused when read and named by `check`.
    assert_eq!(store.check().unwrap(), vec![]);
    let other = std::fs::read_dir(dir.path().join("versions"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| std::fs::read(p).unwrap() == b"o")
        .unwrap();
    std::fs::write(&other, b"x").unwrap();
    assert!(store.version("other", 1).is_err());
    assert_eq!(names(&store.check().unwrap()), vec!["other"]);
}
