//! The fuzzing driver: untrusted bytes through the whole input path of the server, with the
//! invariants that must hold checked after every step.
//!
//! It models what the server's document actor does with what clients send (frame decode, then
//! `handle_message` for each message, a violation closing the connection), across
//! [`CONNECTIONS`] simulated connections, with the durable store modelled as a snapshot plus the
//! log of accepted diffs. Both the libFuzzer target (`fuzz/fuzz_targets/frames.rs`) and the corpus
//! replay test (`crdt/tests/fuzz_corpus.rs`, stable toolchain) call [`run`]; an invariant that
//! does not hold panics.
//!
//! # Input format
//!
//! Byte 0 configures the run: bits 0-3 make connections 0-3 read-only, bits 4-5 choose the
//! per-connection awareness id cap (1, 2, 4 or 64, the server's default). Then a sequence of
//! operations, each starting with one byte `op`, whose low two bits name the connection:
//!
//! | `op >> 2` | operation |
//! | --- | --- |
//! | 0..=47 | a frame: a big-endian `u16` length, then that many bytes (cut at the input's end) |
//! | 48..=55 | the connection closes and a new one takes its place (read-only when `op & 4`) |
//! | 56..=59 | compaction: the store's snapshot becomes the encoded state, the log is emptied |
//! | 60..=63 | restart: the document is loaded from the store, every connection starts anew |
//!
//! # Invariants
//!
//! - No panic escapes the document (yrs panics become [`DocumentError::Poisoned`]); after any
//!   rejected update the document is rebuilt from the store, exactly as the server does, and has
//!   the state it had before that update.
//! - Every diff `apply_update` returns decodes, and the broadcasts built from them
//!   ([`protocol::encode_updates`], merged) decode and apply cleanly to a subscriber that joined at
//!   the start: the subscriber ends with the document's state and content.
//! - The store (snapshot plus log) reloads to the document's state and content, and so does the
//!   encoded state alone and the SyncStep2 answering an empty state vector.
//! - Every message the server would send decodes with [`decode_frame`].
//! - `carries_new` is never false for an update that would change the document.
//! - Awareness: a connection's ids are gone when it closes; every live state belongs to an open
//!   connection; the awareness keeps entries only for ids that were once announced (no memory for
//!   removals of clients nobody announced), and a bounded number of removed ones.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;

use yrs::sync::awareness::AwarenessUpdate;
use yrs::types::ToJson;
use yrs::updates::decoder::Decode;
use yrs::{Any, ArrayRef, ClientID, MapRef, Out, ReadTxn, Snapshot, StateVector, Transact, Update};

use crate::document::{Document, DocumentError};
use crate::protocol::{self, decode_frame, ClientMessage};

/// Simulated connections (the low two bits of an operation byte).
pub const CONNECTIONS: usize = 4;

/// Removed awareness clients the document remembers, lowered from the default so that short
/// inputs reach the point where they are forgotten.
const MAX_REMOVED_AWARENESS: usize = 8;

fn new_document() -> Document {
    let mut d = Document::new();
    d.set_max_removed_awareness(MAX_REMOVED_AWARENESS);
    d
}

/// What one run did, for the replay test's summary and for judging a corpus.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub frames: u64,
    pub bad_frames: u64,
    pub messages: u64,
    pub updates_applied: u64,
    pub updates_unchanged: u64,
    pub refused_writes: u64,
    pub rejected: u64,
    pub out_of_order: u64,
    pub undecodable_diffs: u64,
    pub poisoned: u64,
    pub awareness_changes: u64,
    pub violations: u64,
    pub reconnects: u64,
    pub compactions: u64,
    pub hibernations: u64,
    pub restarts: u64,
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Stats) {
        self.frames += o.frames;
        self.bad_frames += o.bad_frames;
        self.messages += o.messages;
        self.updates_applied += o.updates_applied;
        self.updates_unchanged += o.updates_unchanged;
        self.refused_writes += o.refused_writes;
        self.rejected += o.rejected;
        self.out_of_order += o.out_of_order;
        self.undecodable_diffs += o.undecodable_diffs;
        self.poisoned += o.poisoned;
        self.awareness_changes += o.awareness_changes;
        self.violations += o.violations;
        self.reconnects += o.reconnects;
        self.compactions += o.compactions;
        self.hibernations += o.hibernations;
        self.restarts += o.restarts;
    }
}

/// Runs one fuzz input; panics when an invariant does not hold.
pub fn run(data: &[u8]) -> Stats {
    let Some((&config, mut rest)) = data.split_first() else {
        return Stats::default();
    };
    let mut s = Server::new(config);
    while let Some((&op, tail)) = rest.split_first() {
        rest = tail;
        let conn = usize::from(op & 3);
        match op >> 2 {
            0..=47 => {
                let (frame, tail) = take_frame(rest);
                rest = tail;
                s.frame(conn, frame);
            }
            48..=55 => s.reconnect(conn, op & 4 != 0),
            56..=57 => s.compact(),
            58..=59 => s.hibernate(),
            _ => s.restart(),
        }
        s.deliver();
        s.check_awareness();
    }
    s.check_all();
    s.stats
}

fn take_frame(rest: &[u8]) -> (&[u8], &[u8]) {
    if rest.len() < 2 {
        return (rest, &[]);
    }
    let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
    let body = &rest[2..];
    body.split_at(len.min(body.len()))
}

/// Builds one operation of the input format: a frame sent on `conn` (0..4).
pub fn encode_frame_op(conn: u8, frame: &[u8]) -> Vec<u8> {
    let len = u16::try_from(frame.len()).expect("frame longer than 65535 bytes");
    let mut out = vec![conn & 3];
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(frame);
    out
}

/// Operation bytes for the other operations, to build seeds.
pub fn reconnect_op(conn: u8, read_only: bool) -> u8 {
    (48 << 2) | (u8::from(read_only) << 2) | (conn & 3)
}
pub const COMPACT_OP: u8 = 56 << 2;
pub const HIBERNATE_OP: u8 = 58 << 2;
pub const RESTART_OP: u8 = 60 << 2;

#[derive(Default)]
struct Conn {
    read_only: bool,
    awareness: HashSet<ClientID>,
}

struct Server {
    doc: Document,
    snapshot: Option<Vec<u8>>,
    log: Vec<Vec<u8>>,
    conns: Vec<Conn>,
    read_only: [bool; CONNECTIONS],
    awareness_cap: usize,
    /// Diffs applied since the last delivery (the actor's `pending` updates).
    unsent: Vec<Vec<u8>>,
    /// A client connected from the start that receives every broadcast.
    subscriber: Document,
    /// Every id some connection announced a state for.
    announced_ever: HashSet<ClientID>,
    stats: Stats,
}

fn snapshot_of(doc: &Document) -> Snapshot {
    doc.doc().transact().snapshot()
}

/// The visible content of every root in a canonical text form. Roots made by remote updates have
/// no declared type, so each is read both as a sequence and as a map; empty roots are skipped
/// (a root can exist only because a deleted item named it).
///
/// A root's sequence is compared as a multiset: an update whose items' origins contradict each
/// other (origin-right left of origin-left, both the same item) integrates in an order that
/// depends on how the blocks were split when it arrived, so replicas of such a document can
/// order it differently. That is a limit of the CRDT on malformed input from a client allowed
/// to write, not something the server can check cheaply; see fuzz/README.md.
fn content_of(doc: &Document) -> String {
    let txn = doc.doc().transact();
    let mut roots = BTreeMap::new();
    for (name, out) in txn.root_refs() {
        let text = match out {
            Out::UndefinedRef(b) => {
                let seq = ArrayRef::from(b).to_json(&txn);
                let map = MapRef::from(b).to_json(&txn);
                let mut items: Vec<String> = match &seq {
                    Any::Array(items) => items
                        .iter()
                        .map(|i| {
                            let mut s = String::new();
                            canonical(i, &mut s);
                            s
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                items.sort();
                let mut s = format!("[{}]", items.join(","));
                s.push('|');
                canonical(&map, &mut s);
                s
            }
            other => {
                let mut s = String::new();
                canonical(&other.to_json(&txn), &mut s);
                s
            }
        };
        if text != "[]|{}" && text != "[]" && text != "{}" {
            roots.insert(name.to_string(), text);
        }
    }
    let mut out = String::new();
    for (name, text) in roots {
        let _ = writeln!(out, "{name:?}={text}");
    }
    out
}

fn canonical(any: &Any, out: &mut String) {
    match any {
        Any::Array(items) => {
            out.push('[');
            for i in items.iter() {
                canonical(i, out);
                out.push(',');
            }
            out.push(']');
        }
        Any::Map(map) => {
            let sorted: BTreeMap<_, _> = map.iter().collect();
            out.push('{');
            for (k, v) in sorted {
                let _ = write!(out, "{k:?}:");
                canonical(v, out);
                out.push(',');
            }
            out.push('}');
        }
        other => {
            let _ = write!(out, "{other:?}");
        }
    }
}

/// Asserts that `a` and `b` hold the same items, deletions and visible content.
fn assert_same(a: &Document, b: &Document, what: &str) {
    assert_eq!(snapshot_of(a), snapshot_of(b), "{what}: state differs");
    assert_eq!(content_of(a), content_of(b), "{what}: content differs");
}

/// Decodes a message the server would send; it must be exactly one message.
fn outgoing(bytes: &[u8], what: &str) -> ClientMessage {
    let msgs = decode_frame(bytes).unwrap_or_else(|e| panic!("{what} does not decode: {e}"));
    assert_eq!(msgs.len(), 1, "{what} is not one message");
    msgs.into_iter().next().unwrap()
}

fn awareness_states(doc: &Document) -> AwarenessUpdate {
    match doc.awareness_message() {
        None => AwarenessUpdate {
            clients: Default::default(),
        },
        Some(bytes) => match outgoing(&bytes, "awareness state message") {
            ClientMessage::Awareness(u) => u,
            other => panic!("awareness message decodes as {other:?}"),
        },
    }
}

impl Server {
    fn new(config: u8) -> Self {
        let read_only = std::array::from_fn(|i| config & (1 << i) != 0);
        let awareness_cap = [1, 2, 4, 64][usize::from((config >> 4) & 3)];
        let mut s = Server {
            doc: new_document(),
            snapshot: None,
            log: Vec::new(),
            conns: Vec::new(),
            read_only,
            awareness_cap,
            unsent: Vec::new(),
            subscriber: Document::new(),
            announced_ever: HashSet::new(),
            stats: Stats::default(),
        };
        for ro in read_only {
            s.join(ro);
        }
        s
    }

    /// What the actor sends a joining connection.
    fn join(&mut self, read_only: bool) {
        let step1 = self.doc.sync_step1_message();
        assert!(matches!(
            outgoing(&step1, "server SyncStep1"),
            ClientMessage::SyncStep1(sv) if sv == self.doc.state_vector()
        ));
        awareness_states(&self.doc);
        self.conns.push(Conn {
            read_only,
            awareness: HashSet::new(),
        });
    }

    fn frame(&mut self, c: usize, frame: &[u8]) {
        self.stats.frames += 1;
        let msgs = match decode_frame(frame) {
            Ok(m) => m,
            Err(_) => {
                self.stats.bad_frames += 1;
                self.reconnect(c, self.conns[c].read_only);
                return;
            }
        };
        for m in msgs {
            self.stats.messages += 1;
            if self.message(c, m).is_err() {
                self.stats.violations += 1;
                self.reconnect(c, self.conns[c].read_only);
                return;
            }
        }
    }

    /// The actor's `handle_message`; `Err` closes the connection.
    fn message(&mut self, c: usize, msg: ClientMessage) -> Result<(), ()> {
        match msg {
            ClientMessage::SyncStep1(sv) => {
                let reply = self.doc.sync_step2_message(&sv);
                assert!(matches!(
                    outgoing(&reply, "SyncStep2 answer"),
                    ClientMessage::SyncStep2(_)
                ));
            }
            ClientMessage::SyncStep2(update) | ClientMessage::Update(update)
                if self.conns[c].read_only =>
            {
                self.stats.refused_writes += 1;
                if !self.doc.carries_new(&update) {
                    // The contract: a refused update said to carry nothing new changes nothing.
                    let mut copy = Document::load(Some(&self.doc.encode_state()), [])
                        .expect("encoded state reloads");
                    if let Ok(Some(_)) = copy.apply_update(update) {
                        panic!("carries_new said nothing new, but the update changes the document");
                    }
                }
            }
            ClientMessage::SyncStep2(update) | ClientMessage::Update(update) => {
                let before = snapshot_of(&self.doc);
                match self.doc.apply_update(update) {
                    Ok(None) => self.stats.updates_unchanged += 1,
                    Ok(Some(diff)) => {
                        self.stats.updates_applied += 1;
                        Update::decode_v1(&diff).expect("an accepted diff decodes");
                        self.log.push(diff.clone());
                        self.unsent.push(diff);
                    }
                    Err(e) => {
                        match e {
                            DocumentError::Poisoned => self.stats.poisoned += 1,
                            DocumentError::OutOfOrder => self.stats.out_of_order += 1,
                            DocumentError::DiffDoesNotDecode => self.stats.undecodable_diffs += 1,
                            _ => self.stats.rejected += 1,
                        }
                        self.rebuild();
                        assert_eq!(
                            snapshot_of(&self.doc),
                            before,
                            "rebuilt document differs from the one before the rejected update"
                        );
                        return Err(());
                    }
                }
            }
            ClientMessage::Awareness(update) => {
                let conn = &self.conns[c];
                let new = update
                    .clients
                    .keys()
                    .filter(|id| !conn.awareness.contains(id))
                    .count();
                if conn.awareness.len() + new > self.awareness_cap {
                    return Err(());
                }
                if let Some(change) = self.doc.apply_awareness(update) {
                    self.stats.awareness_changes += 1;
                    let conn = &mut self.conns[c];
                    conn.awareness.extend(change.announced.iter().copied());
                    for id in &change.removed {
                        conn.awareness.remove(id);
                    }
                    self.announced_ever.extend(change.announced.iter().copied());
                    let ids: Vec<ClientID> =
                        change.announced.into_iter().chain(change.removed).collect();
                    let relay = self
                        .doc
                        .awareness_message_for(ids.iter().copied())
                        .expect("a changed client has an entry");
                    let ClientMessage::Awareness(u) = outgoing(&relay, "awareness relay") else {
                        panic!("awareness relay is not awareness");
                    };
                    assert_eq!(u.clients.len(), ids.iter().collect::<HashSet<_>>().len());
                }
            }
            ClientMessage::QueryAwareness => {
                awareness_states(&self.doc);
            }
            ClientMessage::Auth => {}
        }
        Ok(())
    }

    fn load_store(&self) -> Document {
        Document::load(self.snapshot.as_deref(), self.log.iter().map(Vec::as_slice))
            .expect("the store (accepted diffs) reloads")
    }

    /// The server rebuilds a document whose update was rejected from storage.
    fn rebuild(&mut self) {
        let loaded = self.load_store();
        self.doc.replace_content(loaded);
    }

    /// The connection closes (its awareness states go) and a new one takes the slot.
    fn reconnect(&mut self, c: usize, read_only: bool) {
        self.stats.reconnects += 1;
        let old = std::mem::take(&mut self.conns[c]);
        let ids: Vec<ClientID> = old.awareness.into_iter().collect();
        if let Some(msg) = self.doc.remove_awareness(&ids) {
            let ClientMessage::Awareness(u) = outgoing(&msg, "awareness removal") else {
                panic!("awareness removal is not awareness");
            };
            assert!(u.clients.values().all(|e| &*e.json == "null"));
        }
        let live = awareness_states(&self.doc);
        for id in &ids {
            assert!(
                !live.clients.contains_key(id),
                "awareness of client {id} outlived its connection"
            );
        }
        let step1 = self.doc.sync_step1_message();
        outgoing(&step1, "server SyncStep1");
        self.conns[c] = Conn {
            read_only,
            awareness: HashSet::new(),
        };
    }

    fn compact(&mut self) {
        self.stats.compactions += 1;
        self.deliver();
        self.snapshot = Some(self.doc.encode_state());
        self.log.clear();
        assert_same(&self.load_store(), &self.doc, "compacted store");
    }

    /// The actor lets a quiet document keep only its bytes. What it answers while dormant must
    /// be what it answered live; the ops that follow run against the dormant document, and
    /// `check_all` compares the one it wakes into with the store.
    fn hibernate(&mut self) {
        let sv = self.doc.state_vector();
        let state = self.doc.encode_state();
        let step1 = self.doc.sync_step1_message();
        let step2 = self.doc.sync_step2_message(&StateVector::default());
        if !self.doc.hibernate() {
            // blocks held pending for missing predecessors keep it live
            assert!(!self.doc.is_dormant());
            return;
        }
        self.stats.hibernations += 1;
        assert!(self.doc.is_dormant());
        assert_eq!(self.doc.state_vector(), sv, "dormant state vector");
        let step1_sv = |m: &[u8]| match outgoing(m, "server SyncStep1") {
            ClientMessage::SyncStep1(sv) => sv,
            _ => panic!("server SyncStep1 is not SyncStep1"),
        };
        assert_eq!(
            step1_sv(&self.doc.sync_step1_message()),
            step1_sv(&step1),
            "dormant SyncStep1"
        );
        let dormant_state = self.doc.encode_state();
        let dormant_step2 = self.doc.sync_step2_message(&StateVector::default());
        assert!(
            self.doc.is_dormant(),
            "answering a joiner woke the document"
        );
        // The bytes may order blocks differently from a fresh encode; they must hold the same.
        let load = |state: &[u8]| Document::load(Some(state), []).expect("state bytes load");
        assert_same(&load(&dormant_state), &load(&state), "dormant state");
        let join = |step2: &[u8]| {
            let ClientMessage::SyncStep2(u) = outgoing(step2, "full SyncStep2") else {
                panic!("full SyncStep2 is not SyncStep2");
            };
            let mut joiner = Document::new();
            joiner
                .apply_update(u)
                .expect("a joiner applies the full state");
            joiner
        };
        assert_same(&join(&dormant_step2), &join(&step2), "dormant SyncStep2");
    }

    fn restart(&mut self) {
        self.stats.restarts += 1;
        self.deliver();
        let loaded = self.load_store();
        assert_same(&loaded, &self.doc, "document loaded at restart");
        self.doc = loaded;
        self.doc.set_max_removed_awareness(MAX_REMOVED_AWARENESS);
        self.conns.clear();
        self.announced_ever.clear();
        for ro in self.read_only {
            self.join(ro);
        }
    }

    /// Broadcasts what was applied, merged as the actor does, to the subscriber.
    fn deliver(&mut self) {
        if self.unsent.is_empty() {
            return;
        }
        if self.unsent.len() > 1 {
            yrs::merge_updates_v1(&self.unsent).expect("the server's own diffs merge");
        }
        let msg = protocol::encode_updates(&self.unsent);
        self.unsent.clear();
        let ClientMessage::Update(u) = outgoing(&msg, "update broadcast") else {
            panic!("update broadcast is not an update");
        };
        match self.subscriber.apply_update(u) {
            Ok(_) => {}
            Err(e) => panic!("a subscriber cannot apply the server's broadcast: {e}"),
        }
    }

    fn check_awareness(&self) {
        let live = awareness_states(&self.doc);
        for id in live.clients.keys() {
            assert!(
                self.conns.iter().any(|c| c.awareness.contains(id)),
                "awareness state of client {id} belongs to no open connection"
            );
        }
        let removed = self.doc.awareness_entries() - live.clients.len();
        assert!(
            removed <= MAX_REMOVED_AWARENESS + self.awareness_cap,
            "awareness remembers {removed} removed clients"
        );
        assert!(
            self.doc.awareness_entries() <= self.announced_ever.len(),
            "awareness keeps {} entries but only {} ids were ever announced",
            self.doc.awareness_entries(),
            self.announced_ever.len()
        );
    }

    fn check_all(&mut self) {
        self.deliver();
        assert_same(&self.subscriber, &self.doc, "subscriber");
        assert_same(&self.load_store(), &self.doc, "store reload");
        let state = self.doc.encode_state();
        let reloaded = Document::load(Some(&state), []).expect("encoded state reloads");
        assert_same(&reloaded, &self.doc, "encoded state reload");
        let step2 = self.doc.sync_step2_message(&StateVector::default());
        let ClientMessage::SyncStep2(u) = outgoing(&step2, "full SyncStep2") else {
            panic!("full SyncStep2 is not SyncStep2");
        };
        let mut joiner = Document::new();
        joiner
            .apply_update(u)
            .expect("a joiner applies the full state");
        assert_same(&joiner, &self.doc, "joiner");
    }
}
