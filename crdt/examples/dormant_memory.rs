//! Heap held by one document live and dormant (`Document::hibernate`), after an editing session
//! of three clients typing and deleting at random places:
//!
//!     cargo run --release -p collab-crdt --example dormant_memory
//!
//! Counts bytes through a wrapping global allocator, so the figures are the heap the document
//! holds, not the allocator's rounding or RSS.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use collab_crdt::Document;
use yrs::updates::decoder::Decode;
use yrs::{Doc, GetString, Options, Text, Transact, Update};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// A small deterministic generator (xorshift), so every run edits alike.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u32) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % u64::from(n.max(1))) as u32
    }
}

fn heap() -> isize {
    LIVE.load(Ordering::Relaxed)
}

fn main() {
    for ops in [1, 100, 1_000, 10_000, 60_000] {
        let clients: Vec<Doc> = (1..=3)
            .map(|id| {
                Doc::with_options(Options {
                    client_id: yrs::ClientID::new(id),
                    ..Options::default()
                })
            })
            .collect();
        let mut updates = Vec::new();
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for i in 0..ops {
            let c = &clients[i % 3];
            let text = c.get_or_insert_text("t");
            let mut txn = c.transact_mut();
            let len = text.len(&txn);
            // a burst of typing at one place, now and then a deletion
            if len > 20 && rng.below(5) == 0 {
                let at = rng.below(len - 10);
                text.remove_range(&mut txn, at, 1 + rng.below(8));
            } else {
                text.insert(&mut txn, rng.below(len + 1), "word ");
            }
            let u = txn.encode_update_v1();
            drop(txn);
            for other in &clients {
                if !std::ptr::eq(other, c) {
                    other
                        .transact_mut()
                        .apply_update(Update::decode_v1(&u).unwrap())
                        .unwrap();
                }
            }
            updates.push(u);
        }
        let before = heap();
        let mut doc = Document::load(None, updates.iter().map(Vec::as_slice)).unwrap();
        let live = heap() - before;
        let chars = {
            let t = doc.doc().get_or_insert_text("t");
            let s = t.get_string(&doc.doc().transact());
            s.chars().count()
        };
        let encoded = doc.encode_state().len();
        assert!(doc.hibernate());
        let dormant = heap() - before;
        // waking: what the first change after a quiet spell pays on the actor's thread
        let woke = std::time::Instant::now();
        let _ = doc.doc();
        let wake = woke.elapsed();
        println!(
            "{ops:>6} edits: {} chars, encoded {encoded} B; heap live {live} B, dormant {dormant} B ({:.2}x); wakes in {wake:?}",
            chars,
            live as f64 / dormant.max(1) as f64
        );
    }
}
