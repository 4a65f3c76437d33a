//! Durability against the real binary and a real sled database on disk.

mod common;

use collab_storage::{SledStore, Store};
use common::*;

#[tokio::test]
async fn content_survives_a_graceful_restart() {
    let mut server = Server::start(&[]);
    {
        let a = synced_client(&server.url("doc")).await;
        a.insert(0, "persisted");
        a.wait_for("echo", |c| c.seen.lock().unwrap().updates_received == 1)
            .await;
        server.terminate();
        // Clients are told the server is going away (1001), not dropped.
        assert_eq!(a.wait_closed().await, Some(1001));
    }
    server.restart();
    let b = synced_client(&server.url("doc")).await;
    assert_eq!(b.text(), "persisted");
}

#[tokio::test]
async fn an_echoed_update_survives_kill_9() {
    // Slow flushes make "relayed before durable" lose data every time, not by chance.
    let mut server = Server::start(&["--debug-flush-delay-ms", "300"]);
    let writer = synced_client(&server.url("crash")).await;
    let watcher = synced_client(&server.url("crash")).await;
    for i in 0..30u32 {
        writer.insert(i, "k");
    }
    // The instant the last edit is relayed, it must be on disk: kill without any grace.
    watcher.wait_text(&"k".repeat(30)).await;
    server.kill9();
    server.restart();
    let after = synced_client(&server.url("crash")).await;
    assert_eq!(after.text(), "k".repeat(30));
}

#[tokio::test]
async fn compaction_keeps_content_and_shrinks_the_log() {
    let mut server = Server::start(&["--compact-after-updates", "10"]);
    let a = synced_client(&server.url("compact")).await;
    let watcher = synced_client(&server.url("compact")).await;
    for i in 0..95u32 {
        a.insert(i, "c");
        // Spread edits so that several flush batches and compactions happen.
        if i % 10 == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    let expected = a.text();
    // Relayed to the watcher means durable (bursts arrive merged, so compare content, not frames).
    watcher.wait_text(&expected).await;
    server.terminate();

    let store = SledStore::open(server.db_path()).expect("open the server's database");
    let stored = store.load("compact").unwrap();
    let meta = stored.meta.clone().expect("metadata");
    assert!(meta.compactions >= 1, "no compaction ran: {meta:?}");
    assert!(stored.snapshot.is_some());
    // Leaving the document also snapshots it, so the log was folded into the snapshot.
    assert!(
        stored.log.len() < 10,
        "log still has {} entries",
        stored.log.len()
    );
    assert_eq!(
        stored.next_seq(),
        95,
        "every update got its own sequence number"
    );
    drop(store);

    server.restart();
    let b = synced_client(&server.url("compact")).await;
    assert_eq!(b.text(), expected);
}

#[tokio::test]
async fn updates_are_stored_raw_in_the_log() {
    let mut server = Server::start(&[]);
    let a = synced_client(&server.url("raw")).await;
    let sent = a.insert(0, "raw bytes");
    a.wait_for("echo", |c| c.seen.lock().unwrap().updates_received == 1)
        .await;
    server.kill9();
    let store = SledStore::open(server.db_path()).unwrap();
    let stored = store.load("raw").unwrap();
    assert_eq!(stored.log.len(), 1);
    // The log entry is a plain Yjs v1 update: the very bytes the client produced.
    assert_eq!(stored.log[0].1, sent);
    assert_eq!(store.list().unwrap(), vec!["raw".to_string()]);
}
