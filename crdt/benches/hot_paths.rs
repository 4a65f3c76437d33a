//! Micro-benchmarks of the per-edit hot paths: decoding a client frame, applying an update,
//! encoding the broadcast, and encoding the whole state (snapshots, SyncStep2).
//!
//! Every input is built from fixed client ids and a fixed pseudo-random sequence so that the
//! byte sizes, and hence the numbers, are comparable between runs and machines.

use std::hint::black_box;
use std::time::{Duration, Instant};

use collab_crdt::protocol::{encode_awareness, encode_update, encode_updates};
use collab_crdt::{decode_frame, AwarenessUpdate, ClientMessage, Document, Update};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use yrs::sync::awareness::AwarenessUpdateEntry;
use yrs::updates::decoder::Decode;
use yrs::{ClientID, Doc, GetString, ReadTxn, StateVector, Text, Transact};

const TEXT: &str = "t";
const WRITER: u64 = 0x1d2c_3b4a;
const TYPIST: u64 = 0x5e6f_7081;
/// Inserting whole words rather than characters gives the document one block per word, the
/// shape of a long-edited document, instead of one block holding everything.
const WORD: &str = "lorem ipsum dol ";
/// Updates applied to one copy of a document before it is rebuilt; small against the document
/// sizes so that its growth during a round does not change what is measured.
const ROUND: usize = 1000;

/// xorshift64: deterministic positions without a dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u32) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % u64::from(n)) as u32
    }
}

/// A document of at least `chars` characters, written word by word at scattered positions.
fn base_doc(chars: u32) -> Doc {
    let doc = Doc::with_client_id(WRITER);
    let text = doc.get_or_insert_text(TEXT);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut len = 0u32;
    while len < chars {
        let at = rng.below(len + 1);
        text.insert(&mut doc.transact_mut(), at, WORD);
        len += WORD.len() as u32;
    }
    doc
}

fn full_state(doc: &Doc) -> Vec<u8> {
    doc.transact()
        .encode_state_as_update_v1(&StateVector::default())
}

/// `n` successive single-character updates from a second client typing in the middle of
/// `base`, each exactly what its browser would send for one keystroke.
fn typed_updates(base: &Doc, n: usize) -> Vec<Vec<u8>> {
    let typist = Doc::with_client_id(TYPIST);
    let text = typist.get_or_insert_text(TEXT);
    typist
        .transact_mut()
        .apply_update(Update::decode_v1(&full_state(base)).unwrap())
        .unwrap();
    let mut at = text.len(&typist.transact()) / 2;
    (0..n)
        .map(|i| {
            let mut txn = typist.transact_mut();
            let c = (b'a' + (i % 26) as u8) as char;
            text.insert(&mut txn, at, c.encode_utf8(&mut [0; 4]));
            at += 1;
            txn.encode_update_v1()
        })
        .collect()
}

/// What y-websocket clients with a y-codemirror/y-prosemirror cursor announce on every caret
/// move: a user record plus anchor and head relative positions.
fn awareness_frame() -> Vec<u8> {
    let json = concat!(
        r##"{"user":{"name":"Anonymous 42","color":"#30bced","colorLight":"#30bced33"},"##,
        r#""cursor":{"anchor":{"type":{"client":1580123456,"clock":12},"tname":null,"#,
        r#""item":{"client":1580123456,"clock":4711},"assoc":0},"#,
        r#""head":{"type":{"client":1580123456,"clock":12},"tname":null,"#,
        r#""item":{"client":1580123456,"clock":4718},"assoc":0}}}"#
    );
    let mut update = AwarenessUpdate {
        clients: Default::default(),
    };
    update.clients.insert(
        ClientID::new(TYPIST),
        AwarenessUpdateEntry {
            clock: 37,
            json: json.into(),
        },
    );
    encode_awareness(&update)
}

fn bench_decode(c: &mut Criterion) {
    let base = base_doc(10_000);
    // The second keystroke: its left origin is the typist's own previous character, as for
    // nearly every keystroke in a session.
    let update_frame = encode_update(&typed_updates(&base, 2)[1]);
    let aw_frame = awareness_frame();
    assert!(matches!(
        decode_frame(&update_frame).unwrap().as_slice(),
        [ClientMessage::Update(_)]
    ));
    assert!(matches!(
        decode_frame(&aw_frame).unwrap().as_slice(),
        [ClientMessage::Awareness(_)]
    ));
    eprintln!(
        "decode_frame inputs: update frame {} B, awareness frame {} B",
        update_frame.len(),
        aw_frame.len()
    );

    let mut group = c.benchmark_group("decode_frame");
    group.throughput(Throughput::Elements(1));
    group.bench_function("update_1char", |b| {
        b.iter(|| decode_frame(black_box(&update_frame)).unwrap())
    });
    group.bench_function("awareness", |b| {
        b.iter(|| decode_frame(black_box(&aw_frame)).unwrap())
    });
    group.finish();
}

fn bench_apply(c: &mut Criterion) {
    let mut group = c.benchmark_group("apply_update");
    group.throughput(Throughput::Elements(1));
    for chars in [10_000u32, 100_000] {
        let base = base_doc(chars);
        let snapshot = full_state(&base);
        let updates = typed_updates(&base, ROUND);
        {
            let mut doc = Document::load(Some(&snapshot), std::iter::empty()).unwrap();
            for u in &updates {
                // A no-op apply would measure the duplicate fast path instead.
                assert!(doc
                    .apply_update(Update::decode_v1(u).unwrap())
                    .unwrap()
                    .is_some());
            }
            let t = doc.doc().get_or_insert_text(TEXT);
            let len = t.get_string(&doc.doc().transact()).len();
            assert_eq!(len, base_len(&base) + ROUND);
        }
        group.bench_function(BenchmarkId::new("1char_into_doc_chars", chars), |b| {
            // Each update is new only once, so rounds start over from a fresh copy of the base
            // document; rebuilding it and decoding the inputs stay outside the timed part.
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let round = left.min(ROUND as u64) as usize;
                    let mut doc = Document::load(Some(&snapshot), std::iter::empty()).unwrap();
                    let decoded: Vec<Update> = updates[..round]
                        .iter()
                        .map(|u| Update::decode_v1(u).unwrap())
                        .collect();
                    let start = Instant::now();
                    for u in decoded {
                        black_box(doc.apply_update(u).unwrap());
                    }
                    total += start.elapsed();
                    left -= round as u64;
                }
                total
            })
        });
    }
    group.finish();
}

fn base_len(doc: &Doc) -> usize {
    let t = doc.get_or_insert_text(TEXT);
    t.get_string(&doc.transact()).len()
}

fn bench_broadcast(c: &mut Criterion) {
    let base = base_doc(10_000);
    let updates = typed_updates(&base, 64);

    let mut group = c.benchmark_group("encode_broadcast");
    group.throughput(Throughput::Elements(1));
    group.bench_function("encode_update_1char", |b| {
        b.iter(|| encode_update(black_box(&updates[0])))
    });
    for n in [1usize, 8, 64] {
        let batch = &updates[..n];
        eprintln!(
            "encode_updates({n}): {} B of updates -> {} B frame",
            batch.iter().map(Vec::len).sum::<usize>(),
            encode_updates(batch).len()
        );
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::new("encode_updates", n), batch, |b, batch| {
            b.iter(|| encode_updates(black_box(batch)))
        });
    }
    group.finish();
}

fn bench_encode_state(c: &mut Criterion) {
    let base = base_doc(165_000);
    let snapshot = full_state(&base);
    let doc = Document::load(Some(&snapshot), std::iter::empty()).unwrap();
    let size = doc.encode_state().len();
    eprintln!(
        "encode_state input: {} chars, {size} B encoded",
        base_len(&base)
    );

    let mut group = c.benchmark_group("encode_state");
    group.throughput(Throughput::Bytes(size as u64));
    group.sample_size(30);
    group.bench_function(BenchmarkId::new("doc_bytes", size), |b| {
        b.iter(|| doc.encode_state())
    });
    group.finish();
}

criterion_group!(
    benches,
    bench_decode,
    bench_apply,
    bench_broadcast,
    bench_encode_state
);
criterion_main!(benches);
