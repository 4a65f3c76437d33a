//! Replays the fuzz corpus (`fuzz/corpus/frames/`) through the fuzzing driver on the stable
//! toolchain, so the regressions the fuzzer found stay fixed without running the fuzzer; and
//! builds the seed inputs (realistic client traffic) the corpus started from.
//!
//! `cargo test -p collab-crdt --test fuzz_corpus -- --ignored write_seeds` writes the seeds to
//! `fuzz/seeds/frames/`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use collab_crdt::fuzzing::{
    self, encode_frame_op, reconnect_op, Stats, COMPACT_OP, HIBERNATE_OP, RESTART_OP,
};
use collab_crdt::protocol::{
    encode_awareness, encode_permission_denied, encode_sync_step1, encode_sync_step2, encode_update,
};
use yrs::sync::awareness::{AwarenessUpdate, AwarenessUpdateEntry};
use yrs::types::Attrs;
use yrs::updates::decoder::Decode;
use yrs::{
    Any, Array, ArrayPrelim, ClientID, Doc, Map, MapPrelim, Options, ReadTxn, StateVector, Text,
    TextPrelim, Transact, Xml, XmlElementPrelim, XmlFragment, XmlTextPrelim,
};

const TARGET: &str = "frames";

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn client(id: u64) -> Doc {
    Doc::with_options(Options {
        client_id: ClientID::new(id),
        ..Options::default()
    })
}

fn full_state(doc: &Doc) -> Vec<u8> {
    doc.transact()
        .encode_state_as_update_v1(&StateVector::default())
}

fn awareness(entries: &[(u64, u32, &str)]) -> Vec<u8> {
    let clients: HashMap<ClientID, AwarenessUpdateEntry> = entries
        .iter()
        .map(|&(id, clock, json)| {
            (
                ClientID::new(id),
                AwarenessUpdateEntry {
                    clock,
                    json: json.into(),
                },
            )
        })
        .collect();
    encode_awareness(&AwarenessUpdate { clients })
}

/// Builds one input: the config byte, then operations.
struct Input(Vec<u8>);

impl Input {
    fn new(config: u8) -> Self {
        Input(vec![config])
    }
    fn frame(mut self, conn: u8, frame: &[u8]) -> Self {
        self.0.extend(encode_frame_op(conn, frame));
        self
    }
    fn frames(self, conn: u8, messages: &[&[u8]]) -> Self {
        self.frame(conn, &messages.concat())
    }
    fn op(mut self, op: u8) -> Self {
        self.0.push(op);
        self
    }
}

/// Realistic client traffic: y-websocket's connect handshake, text, map, array, XML and nested
/// edits, concurrent and out-of-order updates, read-only clients, awareness, and the server's
/// own reconnect, compaction and restart operations.
fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    let cap64 = 0x30;

    // A text editor session: connect handshake, typing, deleting, a second client.
    {
        let a = client(1);
        let b = client(2);
        let ta = a.get_or_insert_text("t");
        let tb = b.get_or_insert_text("t");
        let mut input = Input::new(cap64).frames(
            0,
            &[
                &encode_sync_step1(&StateVector::default()),
                &encode_sync_step2(&full_state(&a)),
            ],
        );
        let mut sent = Vec::new();
        for (i, word) in ["hello", " ", "world", "!"].iter().enumerate() {
            let mut txn = a.transact_mut();
            let len = ta.len(&txn);
            ta.insert(&mut txn, len, word);
            let u = txn.encode_update_v1();
            drop(txn);
            input = input.frame(0, &encode_update(&u));
            sent.push(u);
            if i == 1 {
                input = input.frame(
                    0,
                    &awareness(&[(
                        1,
                        1,
                        r##"{"user":{"name":"a","color":"#f00"},"cursor":null}"##,
                    )]),
                );
            }
        }
        {
            let mut txn = a.transact_mut();
            ta.remove_range(&mut txn, 0, 5);
            sent.push(txn.encode_update_v1());
        }
        input = input.frame(0, &encode_update(sent.last().unwrap()));
        b.transact_mut()
            .apply_update(yrs::Update::decode_v1(&full_state(&a)).unwrap())
            .unwrap();
        let sv_b = b.transact().state_vector();
        let u = {
            let mut txn = b.transact_mut();
            tb.insert(&mut txn, 0, "Hi");
            txn.encode_update_v1()
        };
        input = input
            .frames(
                1,
                &[
                    &encode_sync_step1(&sv_b),
                    &encode_sync_step2(&full_state(&b)),
                    &encode_update(&u),
                ],
            )
            .frame(1, &awareness(&[(2, 1, r#"{"user":{"name":"b"}}"#)]))
            .frame(2, &[3])
            .op(reconnect_op(0, false))
            .frame(1, &awareness(&[(2, 2, "null")]))
            .op(COMPACT_OP)
            .op(HIBERNATE_OP)
            .frame(3, &encode_sync_step1(&StateVector::default()))
            .frame(2, &encode_sync_step1(&sv_b))
            .op(RESTART_OP)
            .frame(3, &encode_sync_step1(&StateVector::default()));
        out.push(("text_session", input.0));
    }

    // Every shared type, formatting, embeds, nested types, deletions and a map overwrite.
    {
        let a = client(10);
        let mut updates = Vec::new();
        let text = a.get_or_insert_text("text");
        let map = a.get_or_insert_map("map");
        let array = a.get_or_insert_array("array");
        let xml = a.get_or_insert_xml_fragment("xml");
        {
            let mut txn = a.transact_mut();
            text.insert(&mut txn, 0, "bold and plain");
            let bold = Attrs::from([("bold".into(), Any::Bool(true))]);
            text.format(&mut txn, 0, 4, bold);
            text.insert_embed(&mut txn, 4, Any::from("image"));
            updates.push(txn.encode_update_v1());
        }
        {
            let mut txn = a.transact_mut();
            map.insert(&mut txn, "title", "Doc");
            map.insert(&mut txn, "count", 3.5);
            map.insert(&mut txn, "big", 1i64 << 40);
            map.insert(&mut txn, "buf", vec![1u8, 2, 3]);
            let inner = map.insert(&mut txn, "inner", MapPrelim::default());
            inner.insert(&mut txn, "k", "v");
            map.insert(&mut txn, "list", ArrayPrelim::default());
            updates.push(txn.encode_update_v1());
        }
        {
            let mut txn = a.transact_mut();
            array.insert_range(&mut txn, 0, [1, 2, 3]);
            array.push_back(&mut txn, TextPrelim::new("nested"));
            array.push_back(&mut txn, Any::Null);
            updates.push(txn.encode_update_v1());
        }
        {
            let mut txn = a.transact_mut();
            let p = xml.push_back(&mut txn, XmlElementPrelim::empty("p"));
            p.push_back(&mut txn, XmlTextPrelim::new("para"));
            p.insert_attribute(&mut txn, "class", "x");
            updates.push(txn.encode_update_v1());
        }
        {
            let mut txn = a.transact_mut();
            text.remove_range(&mut txn, 2, 5);
            map.insert(&mut txn, "title", "Renamed");
            map.remove(&mut txn, "count");
            array.remove_range(&mut txn, 0, 2);
            updates.push(txn.encode_update_v1());
        }
        let mut input = Input::new(cap64);
        for u in &updates {
            input = input.frame(0, &encode_update(u));
        }
        input = input
            .op(COMPACT_OP)
            .frame(1, &encode_sync_step1(&StateVector::default()));
        out.push(("all_types", input.0));

        // The same updates, newest first: each waits for its predecessors, then all integrate.
        // Hibernating halfway finds blocks parked: the document stays live.
        let mut input = Input::new(cap64);
        for (i, u) in updates.iter().rev().enumerate() {
            input = input.frame(1, &encode_update(u));
            if i == updates.len() / 2 {
                input = input.op(HIBERNATE_OP);
            }
        }
        input = input.op(HIBERNATE_OP);
        out.push(("out_of_order", input.0));

        // One frame carrying several messages, as a client flushing a queue does.
        let msgs: Vec<Vec<u8>> = updates.iter().map(|u| encode_update(u)).collect();
        let refs: Vec<&[u8]> = msgs.iter().map(Vec::as_slice).collect();
        let input = Input::new(cap64)
            .frames(2, &refs)
            .frames(
                2,
                &[
                    &awareness(&[(10, 1, r#"{"a":[1,2,{"b":null}]}"#)]),
                    &[3],
                    &[3],
                ],
            )
            .op(RESTART_OP);
        out.push(("batched", input.0));
    }

    // Concurrent edits of three clients on the same text, merged by the server.
    {
        let docs: Vec<Doc> = (20..23).map(client).collect();
        let mut input = Input::new(cap64);
        for round in 0..3u32 {
            for (i, d) in docs.iter().enumerate() {
                let t = d.get_or_insert_text("t");
                let mut txn = d.transact_mut();
                let len = t.len(&txn);
                t.insert(&mut txn, len.min(round), &format!("{i}{round}"));
                if round == 2 && len > 1 {
                    t.remove_range(&mut txn, 0, 1);
                }
                let u = txn.encode_update_v1();
                drop(txn);
                input = input.frame(i as u8, &encode_update(&u));
            }
        }
        out.push(("concurrent", input.0));
    }

    // A read-only viewer: its sync answer repeats what the server has, then it tries to write.
    {
        let a = client(30);
        let t = a.get_or_insert_text("t");
        let u = {
            let mut txn = a.transact_mut();
            t.insert(&mut txn, 0, "shared");
            txn.encode_update_v1()
        };
        let viewer = client(31);
        viewer
            .transact_mut()
            .apply_update(yrs::Update::decode_v1(&u).unwrap())
            .unwrap();
        let w = {
            let tv = viewer.get_or_insert_text("t");
            let mut txn = viewer.transact_mut();
            tv.remove_range(&mut txn, 0, 2);
            tv.insert(&mut txn, 0, "x");
            txn.encode_update_v1()
        };
        let input = Input::new(cap64 | 0b0010)
            .frame(0, &encode_update(&u))
            .frames(
                1,
                &[
                    &encode_sync_step1(&viewer.transact().state_vector()),
                    &encode_sync_step2(&encode_update_state(&u)),
                ],
            )
            .frame(1, &encode_update(&w))
            .frame(1, &awareness(&[(31, 1, r#"{"user":"viewer"}"#)]))
            .op(reconnect_op(1, true))
            .frame(0, &encode_update(&w));
        out.push(("read_only", input.0));
    }

    // Awareness: cap of two ids, renewals, removals, stale clocks, unknown removals, and a
    // connection exceeding its cap (closed).
    {
        let cap2 = 0x10;
        let input = Input::new(cap2)
            .frame(
                0,
                &awareness(&[(100, 1, r#"{"cursor":{"anchor":1,"head":2}}"#)]),
            )
            .frame(
                0,
                &awareness(&[(100, 2, r#"{"cursor":{"anchor":3,"head":3}}"#)]),
            )
            .frame(0, &awareness(&[(100, 1, r#"{"stale":true}"#)]))
            .frame(1, &awareness(&[(200, 1, "{}"), (201, 1, "[]")]))
            .frame(1, &awareness(&[(202, 1, "1")]))
            .frame(2, &awareness(&[(300, 5, "null")]))
            .frame(3, &awareness(&[(100, 9, r#""taken""#)]))
            .frame(0, &awareness(&[(100, 3, "null")]))
            .frame(3, &[3])
            .op(reconnect_op(3, false))
            .frame(3, &[3]);
        out.push(("awareness", input.0));
    }

    // What a server must refuse: unknown types, truncation, bad JSON, empty frames, auth.
    {
        let input = Input::new(cap64)
            .frame(0, &encode_permission_denied("x"))
            .frame(0, &[2, 1])
            .frame(1, &[7, 0])
            .frame(1, &[0, 5, 0])
            .frame(2, &[0, 2, 12, 1, 1, 1])
            .frame(2, &[])
            .frame(3, &[1, 8, 1, 1, 1, 4, 0x7b, 0x7b, 0x7b, 0x7b])
            .frame(3, &[0, 0, 1, 0, 0]);
        out.push(("refused", input.0));
    }

    // A longer document: many small edits (merged broadcasts), compaction mid-way, a restart.
    {
        let a = client(40);
        let t = a.get_or_insert_text("t");
        let mut input = Input::new(cap64);
        for i in 0..40u32 {
            let u = {
                let mut txn = a.transact_mut();
                let len = t.len(&txn);
                if i % 7 == 6 {
                    t.remove_range(&mut txn, len / 2, 2);
                } else {
                    t.insert(&mut txn, (i * 3) % (len + 1), "ab");
                }
                txn.encode_update_v1()
            };
            input = input.frame((i % 2) as u8, &encode_update(&u));
            if i == 20 {
                input = input.op(COMPACT_OP);
            }
            if i % 15 == 14 {
                input = input.op(HIBERNATE_OP);
            }
        }
        out.push(("long_document", input.op(RESTART_OP).0));
    }
    out
}

/// A client's SyncStep2 repeats its whole state: here, exactly what `update` holds.
fn encode_update_state(update: &[u8]) -> Vec<u8> {
    let d = Doc::new();
    d.transact_mut()
        .apply_update(yrs::Update::decode_v1(update).unwrap())
        .unwrap();
    full_state(&d)
}

#[test]
fn seeds_hold_the_invariants() {
    let mut total = Stats::default();
    for (name, input) in seeds() {
        let stats = fuzzing::run(&input);
        assert!(stats.frames > 0, "{name} ran no frame");
        total += stats;
    }
    assert!(total.updates_applied > 20, "{total:?}");
    assert!(total.awareness_changes > 3, "{total:?}");
    assert!(total.hibernations > 3, "{total:?}");
    assert!(
        total.refused_writes > 0 && total.bad_frames > 0,
        "{total:?}"
    );
}

#[test]
fn replay_corpus() {
    // FUZZ_CORPUS_DIR replays another directory (fuzzer artifacts, say) the same way.
    let dir = std::env::var_os("FUZZ_CORPUS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| fuzz_dir().join("corpus").join(TARGET));
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "empty corpus at {}", dir.display());
    let started = Instant::now();
    let mut total = Stats::default();
    let mut failed = Vec::new();
    for f in &files {
        let data = std::fs::read(f).unwrap();
        let result = std::panic::catch_unwind(|| fuzzing::run(&data));
        match result {
            Ok(stats) => total += stats,
            Err(_) => failed.push(f.display().to_string()),
        }
    }
    eprintln!(
        "replayed {} corpus files in {:?}: {total:?}",
        files.len(),
        started.elapsed()
    );
    assert!(failed.is_empty(), "failing corpus files: {failed:#?}");
}

#[test]
#[ignore = "writes the seed corpus; run by hand"]
fn write_seeds() {
    let dir = fuzz_dir().join("seeds").join(TARGET);
    std::fs::create_dir_all(&dir).unwrap();
    for (name, input) in seeds() {
        std::fs::write(dir.join(name), input).unwrap();
    }
}
