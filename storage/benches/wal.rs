//! Micro-benchmarks of the write-ahead update log: appending an update, making it durable, and
//! folding the log into a snapshot. Runs against a real store in a temporary folder, so the
//! flush numbers are the write-and-sync latency of the disk the folder is on: a log flush is one
//! `write` and one `fdatasync` of the log segment; a compaction writes the snapshot's chunks to
//! sled and flushes sled. `file/append_30B+fdatasync` is the floor: the same durable append on a
//! plain file. (`examples/durable_append.rs` compares CPU time against sled's own flush.)

use std::hint::black_box;
use std::io::Write;

use collab_storage::{SledStore, Store};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use tempfile::TempDir;

const DOC: &str = "bench-doc";
/// The size of a typical single-keystroke Yjs update (client id, clock, origins, one char).
const UPDATE: [u8; 30] = [0x5a; 30];
/// Sequence numbers wrap here so that the log's index stays small however many iterations
/// criterion picks; a re-appended sequence number replaces its index entry, and the log writes
/// every append whatever its number.
const WRAP: u64 = 1 << 16;
/// A burst of edits that the server's grouped flush makes durable together.
const GROUP: u64 = 64;
const COMPACT_ENTRIES: u64 = 1000;

fn open() -> (TempDir, SledStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    // Sequence 0 writes the metadata record too; the steady state the benches measure is after.
    store.append(DOC, 0, &UPDATE).unwrap();
    store.flush().unwrap();
    (dir, store)
}

/// Hands out sequence numbers 1..WRAP round and round, each with a distinct update.
struct Seq {
    seq: u64,
    written: u64,
    update: [u8; 30],
}

impl Seq {
    fn new() -> Self {
        Seq {
            seq: 0,
            written: 0,
            update: UPDATE,
        }
    }

    fn next(&mut self) -> (u64, &[u8]) {
        self.seq = self.seq % (WRAP - 1) + 1;
        self.written += 1;
        self.update[..8].copy_from_slice(&self.written.to_le_bytes());
        (self.seq, &self.update)
    }
}

fn bench_append(c: &mut Criterion) {
    let (_dir, store) = open();
    let mut seq = Seq::new();

    let mut group = c.benchmark_group("wal");
    group.throughput(Throughput::Elements(1));
    group.bench_function("append_30B", |b| {
        b.iter(|| {
            let (n, update) = seq.next();
            store.append(DOC, n, black_box(update)).unwrap()
        })
    });
    group.bench_function("append_30B+flush", |b| {
        b.iter(|| {
            let (n, update) = seq.next();
            store.append(DOC, n, black_box(update)).unwrap();
            store.flush().unwrap();
        })
    });
    group.throughput(Throughput::Elements(GROUP));
    group.bench_function(BenchmarkId::new("append_30B_x_then_flush", GROUP), |b| {
        b.iter(|| {
            for _ in 0..GROUP {
                let (n, update) = seq.next();
                store.append(DOC, n, black_box(update)).unwrap();
            }
            store.flush().unwrap();
        })
    });
    group.finish();

    let dir = tempfile::tempdir().unwrap();
    let mut file = std::fs::File::create(dir.path().join("plain.log")).unwrap();
    let mut group = c.benchmark_group("file");
    group.throughput(Throughput::Elements(1));
    group.bench_function("append_30B+fdatasync", |b| {
        b.iter(|| {
            let (_, update) = seq.next();
            file.write_all(black_box(update)).unwrap();
            file.sync_data().unwrap();
        })
    });
    group.finish();
}

fn bench_compact(c: &mut Criterion) {
    let (_dir, store) = open();
    // Each compaction removes the whole log, so sequence numbers only ever grow here, as in the
    // server.
    let mut next_seq = 1u64;

    let mut group = c.benchmark_group("compact");
    group.throughput(Throughput::Elements(COMPACT_ENTRIES));
    group.sample_size(30);
    for snapshot_kib in [32usize, 512] {
        let template = vec![0xa5u8; snapshot_kib * 1024];
        for durable in [false, true] {
            // Either way the snapshot is durable in sled on return; `+flush` adds the log flush
            // that makes its record in the log durable too.
            let name = if durable {
                "1000_entries+flush"
            } else {
                "1000_entries"
            };
            group.bench_function(
                BenchmarkId::new(name, format!("snapshot_{snapshot_kib}KiB")),
                |b| {
                    b.iter_batched(
                        // Filling and flushing the log is not part of the compaction. The
                        // snapshot is stamped with the sequence number so that no two are equal.
                        || {
                            for _ in 0..COMPACT_ENTRIES {
                                store.append(DOC, next_seq, &UPDATE).unwrap();
                                next_seq += 1;
                            }
                            store.flush().unwrap();
                            let mut snapshot = template.clone();
                            snapshot[..8].copy_from_slice(&next_seq.to_le_bytes());
                            (next_seq, snapshot)
                        },
                        |(upto, snapshot)| {
                            store.compact(DOC, &snapshot, upto).unwrap();
                            if durable {
                                store.flush().unwrap();
                            }
                            snapshot
                        },
                        BatchSize::PerIteration,
                    )
                },
            );
        }
    }
    group.finish();
}

criterion_group!(benches, bench_append, bench_compact);
criterion_main!(benches);
