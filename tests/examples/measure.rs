//! Quick figures for the core server (the side-by-side benchmarks live in `bench/`):
//! the update rate one writer reaches with write-ahead durability on, and the first-sync time
//! of a ~2 MB document.
//!
//! cargo build --release --bin collab
//! COLLAB_BIN=target/release/collab cargo run --release -p collab-tests --example measure

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use yrs::sync::protocol::{Message, SyncMessage};
use yrs::updates::encoder::Encode;
use yrs::{Doc, ReadTxn, StateVector, Text, Transact};

#[tokio::main]
async fn main() {
    let server = Server::start(&[]);

    // 1. One writer sending single-character updates back to back; a reader counts them.
    let n = 20_000usize;
    let writer = synced_client(&server.url("rate")).await;
    let reader = synced_client(&server.url("rate")).await;
    let start = Instant::now();
    for i in 0..n {
        writer.insert(i as u32, "x");
    }
    // Updates that become durable in one flush reach readers merged, so count characters.
    let all = wait_until(Duration::from_secs(120), || reader.len() as usize == n).await;
    let took = start.elapsed();
    let frames = reader.seen.lock().unwrap().updates_received;
    assert!(all, "reader has {} of {n} characters", reader.len());
    println!("reader received the {n} updates in {frames} frames");
    println!(
        "one writer: {n} updates relayed in {:.2} s = {:.0} updates/s (each durable before relay)",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64()
    );

    // 2. A ~2 MB document built from 20,000 edits, then a fresh client's first sync.
    let source = Doc::new();
    let text = source.get_or_insert_text("t");
    for i in 0..20_000u32 {
        let mut txn = source.transact_mut();
        let at = (i.wrapping_mul(2_654_435_761) % (text.len(&txn) + 1)).min(text.len(&txn));
        text.insert(&mut txn, at, &format!("{:0>100}", i));
    }
    let state = source
        .transact()
        .encode_state_as_update_v1(&StateVector::default());
    let loader = synced_client(&server.url("big")).await;
    loader.send_raw(Message::Sync(SyncMessage::Update(state.clone())).encode_v1());
    loader
        .wait_for("upload echoed", |c| {
            c.seen.lock().unwrap().updates_received == 1
        })
        .await;
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let c = synced_client(&server.url("big")).await;
        times.push(t.elapsed());
        assert_eq!(c.len(), text.len(&source.transact()));
        c.close();
    }
    times.sort();
    println!(
        "first sync of a {:.2} MB document (20,000 edits): median {:.1} ms, max {:.1} ms over 5 joins (connect -> SyncStep2 applied)",
        state.len() as f64 / 1e6,
        times[2].as_secs_f64() * 1e3,
        times[4].as_secs_f64() * 1e3
    );
}
