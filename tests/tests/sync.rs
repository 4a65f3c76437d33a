//! Multi-client synchronisation over real WebSockets against the real server binary.

mod common;

use std::time::Duration;

use common::*;
use rand::{Rng, SeedableRng};
use yrs::sync::protocol::{Message, SyncMessage};
use yrs::updates::encoder::Encode;
use yrs::{ReadTxn, Transact};

#[tokio::test]
async fn two_clients_converge_on_concurrent_edits() {
    let server = Server::start(&[]);
    let a = synced_client(&server.url("doc")).await;
    let b = synced_client(&server.url("doc")).await;
    a.insert(0, "hello ");
    b.insert(0, "world");
    let deadline = WAIT;
    assert!(
        wait_until(deadline, || a.text() == b.text() && a.text().len() == 11).await,
        "a={:?} b={:?}",
        a.text(),
        b.text()
    );
}

#[tokio::test]
async fn the_sender_gets_its_own_update_echoed() {
    let server = Server::start(&[]);
    let a = synced_client(&server.url("echo")).await;
    a.insert(0, "x");
    a.wait_for("echo", |c| c.seen.lock().unwrap().updates_received == 1)
        .await;
}

#[tokio::test]
async fn twenty_clients_fifty_random_edits_converge() {
    let server = Server::start(&[]);
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(synced_client(&server.url("busy")).await);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut inserts = vec![0u32; clients.len()];
    for round in 0..50 {
        for (i, c) in clients.iter().enumerate() {
            let len = c.len();
            if len > 0 && rng.random_bool(0.3) {
                let at = rng.random_range(0..len);
                c.remove(at, 1);
            } else {
                let at = rng.random_range(0..=len);
                c.insert(at, &format!("{}", round % 10));
                inserts[i] += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let converged = wait_until(Duration::from_secs(20), || {
        let t = clients[0].text();
        clients.iter().all(|c| c.text() == t)
    })
    .await;
    assert!(converged, "clients did not converge");
    // Every client's state includes every insert of every other client (deletes advance no
    // clock). Concurrent deletes of one character count once, so the length is bounded.
    let sv = clients[0].doc.transact().state_vector();
    for (c, n) in clients.iter().zip(&inserts) {
        assert_eq!(sv.get(&c.doc.client_id()), *n);
    }
    let total_inserts: u32 = inserts.iter().sum();
    let deletes = 20 * 50 - total_inserts;
    let len = clients[0].len();
    assert!(
        len >= total_inserts - deletes && len <= total_inserts,
        "len {len}"
    );
}

#[tokio::test]
async fn a_late_joiner_receives_the_full_document() {
    let server = Server::start(&[]);
    {
        let a = synced_client(&server.url("late")).await;
        let b = synced_client(&server.url("late")).await;
        a.insert(0, "abc");
        b.wait_text("abc").await;
        b.insert(3, "def");
        a.wait_text("abcdef").await;
        a.close();
        b.close();
        a.wait_closed().await;
        b.wait_closed().await;
    }
    let c = synced_client(&server.url("late")).await;
    assert_eq!(c.text(), "abcdef");
}

/// The server sends messages over 64 KiB as continuation frames; the joiner must still get the
/// whole document, and as one message (the client decodes each message independently).
#[tokio::test]
async fn a_document_larger_than_one_fragment_reaches_a_late_joiner_whole() {
    let server = Server::start(&[]);
    let a = synced_client(&server.url("big")).await;
    let watcher = synced_client(&server.url("big")).await;
    // ~400 KB in a few updates: seven fragments of the full-state SyncStep2.
    let chunk: String = (0..10_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    for i in 0..40u32 {
        a.insert(i * 10_000, &chunk);
    }
    watcher
        .wait_for("all updates", |c| c.len() == 400_000)
        .await;
    let b = synced_client(&server.url("big")).await;
    assert_eq!(b.len(), 400_000);
    assert_eq!(b.text(), a.text());
    let s = b.seen.lock().unwrap();
    assert!(
        s.frames.iter().any(|f| f.len() > 400_000),
        "the full state arrives as one message: {:?}",
        s.frames.iter().map(Vec::len).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn documents_are_isolated() {
    let server = Server::start(&[]);
    let a = synced_client(&server.url("room-1")).await;
    let b = synced_client(&server.url("room-2")).await;
    a.insert(0, "only in room 1");
    a.wait_for("echo", |c| c.seen.lock().unwrap().updates_received == 1)
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(b.text(), "");
    assert_eq!(b.seen.lock().unwrap().updates_received, 0);
    let c = synced_client(&server.url("room-1")).await;
    assert_eq!(c.text(), "only in room 1");
}

/// Presence changes within one batching window reach everyone merged: fewer frames than
/// changes, and every client's latest state arrives.
#[tokio::test]
async fn a_burst_of_awareness_changes_is_merged_and_every_latest_state_arrives() {
    let server = Server::start(&["--awareness-batch-ms", "200"]);
    let watcher = synced_client(&server.url("presence")).await;
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(synced_client(&server.url("presence")).await);
    }
    let awareness_frames = |c: &Client| {
        c.seen
            .lock()
            .unwrap()
            .frames
            .iter()
            .filter(|f| f[0] == 1)
            .count()
    };
    let before = awareness_frames(&watcher);
    for round in 0..5 {
        for (i, c) in clients.iter_mut().enumerate() {
            c.set_awareness(&format!(r#"{{"n":{i},"round":{round}}}"#));
        }
    }
    let expected: Vec<(u64, String)> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| (c.client_id(), format!(r#"{{"n":{i},"round":4}}"#)))
        .collect();
    watcher
        .wait_for("every client's latest state", |w| {
            let states = w.awareness_states();
            expected
                .iter()
                .all(|(id, json)| states.get(id).is_some_and(|s| s.replace(' ', "") == *json))
        })
        .await;
    let frames = awareness_frames(&watcher) - before;
    assert!(
        frames < 25,
        "50 changes arrived in {frames} frames; they were not merged"
    );
}

#[tokio::test]
async fn awareness_is_relayed_and_removed_on_disconnect() {
    let server = Server::start(&[]);
    let mut a = synced_client(&server.url("aw")).await;
    let b = synced_client(&server.url("aw")).await;
    a.set_awareness(r#"{"user":{"name":"a"}}"#);
    let a_id = a.client_id();
    b.wait_for("a's presence", |c| c.awareness_states().contains_key(&a_id))
        .await;
    // The sender gets its own state back: the stock client's idle keep-alive depends on it.
    a.wait_for("own presence echoed", |c| {
        c.awareness_states().contains_key(&a_id)
    })
    .await;
    // A late joiner is told who is here right after the server's SyncStep1.
    let c = synced_client(&server.url("aw")).await;
    c.wait_for("presence on join", |c| {
        c.awareness_states().contains_key(&a_id)
    })
    .await;
    a.close();
    // Removal must come from the server at once, not from the client's 30 s timeout.
    if !wait_until(Duration::from_secs(2), || {
        !b.awareness_states().contains_key(&a_id)
    })
    .await
    {
        panic!("a's presence was not removed within 2 s");
    }
    // The removal keeps a's clock (1), as the reference server does; a bumped clock would make
    // peers ignore a when it reconnects with the same id.
    let meta = b.awareness.lock().unwrap().meta(yrs::ClientID::new(a_id));
    assert_eq!(meta.map(|(clock, _)| clock), Some(1));
}

#[tokio::test]
async fn several_messages_in_one_frame_are_all_handled() {
    let server = Server::start(&[]);
    let reader = synced_client(&server.url("multi")).await;
    let writer = synced_client(&server.url("multi")).await;
    // Two updates and an awareness update packed into one frame.
    let u1 = {
        let text = writer.doc.get_or_insert_text("t");
        let mut txn = writer.doc.transact_mut();
        yrs::Text::insert(&text, &mut txn, 0, "one ");
        txn.encode_update_v1()
    };
    let u2 = {
        let text = writer.doc.get_or_insert_text("t");
        let mut txn = writer.doc.transact_mut();
        yrs::Text::insert(&text, &mut txn, 4, "two");
        txn.encode_update_v1()
    };
    let mut w = writer;
    let mut frame = Message::Sync(SyncMessage::Update(u1)).encode_v1();
    frame.extend(Message::Sync(SyncMessage::Update(u2)).encode_v1());
    frame.extend(w.awareness_message(r#"{"user":"w"}"#));
    w.send_raw(frame);
    reader.wait_text("one two").await;
    let w_id = w.client_id();
    reader
        .wait_for("awareness from the packed frame", |c| {
            c.awareness_states().contains_key(&w_id)
        })
        .await;
}

#[tokio::test]
async fn the_server_sends_one_message_per_frame() {
    let server = Server::start(&[]);
    let mut a = synced_client(&server.url("frames")).await;
    a.set_awareness(r#"{"user":"a"}"#);
    a.insert(0, "x");
    // b joins a document that has content and awareness: SyncStep1, awareness and SyncStep2.
    let b = synced_client(&server.url("frames")).await;
    let a_id = a.client_id();
    b.wait_for("awareness", |c| c.awareness_states().contains_key(&a_id))
        .await;
    a.insert(1, "y");
    b.wait_text("xy").await;
    for c in [&a, &b] {
        let seen = c.seen.lock().unwrap();
        assert!(seen.messages_per_frame.len() >= 3);
        assert!(
            seen.messages_per_frame.iter().all(|&n| n == 1),
            "frames with several messages: {:?}",
            seen.messages_per_frame
        );
    }
    // The first frame is the server's SyncStep1, as the reference server sends it.
    assert_eq!(b.seen.lock().unwrap().frames[0][..2], [0, 0]);
}

#[tokio::test]
async fn query_awareness_is_answered_with_all_states() {
    let server = Server::start(&[]);
    let mut a = synced_client(&server.url("q")).await;
    a.set_awareness(r#"{"user":"a"}"#);
    let a_id = a.client_id();
    a.wait_for("own state", |c| c.awareness_states().contains_key(&a_id))
        .await;
    let b = synced_client(&server.url("q")).await;
    let before = b.seen.lock().unwrap().frames.len();
    b.send_raw(vec![3]);
    b.wait_for("answer", |c| c.seen.lock().unwrap().frames.len() > before)
        .await;
    assert_eq!(b.seen.lock().unwrap().frames.last().unwrap()[0], 1);
}

#[tokio::test]
async fn an_unused_document_unloads_and_reloads_from_storage() {
    let server = Server::start(&["--grace-period-secs", "0"]);
    {
        let a = synced_client(&server.url("reload")).await;
        a.insert(0, "kept");
        a.wait_for("echo", |c| c.seen.lock().unwrap().updates_received == 1)
            .await;
        a.close();
        a.wait_closed().await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b = synced_client(&server.url("reload")).await;
    assert_eq!(b.text(), "kept");
}

#[tokio::test]
async fn many_simultaneous_first_joins_load_the_document_once() {
    let mut server = Server::start(&[]);
    {
        let a = synced_client(&server.url("storm")).await;
        a.insert(0, "stored");
        a.wait_for("echo", |c| c.seen.lock().unwrap().updates_received == 1)
            .await;
    }
    server.terminate();
    server.restart();
    let url = server.url("storm");
    let joins: Vec<_> = (0..50)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { synced_client(&url).await.text() })
        })
        .collect();
    for j in joins {
        assert_eq!(j.await.unwrap(), "stored");
    }
    // One actor, one load per process: a race would log "document loaded" more than once after
    // the restart (the first process loaded the new document once too).
    let loads = server.log().matches("document loaded").count();
    assert_eq!(loads, 2, "document loads:\n{}", server.log());
}

/// A document's connections run on its actor's worker thread (`ws::home`). With two workers,
/// sockets the other worker accepted are moved there; each of them still sends, receives
/// (written straight into it by the actor) and is closed with 1001 at shutdown.
#[tokio::test]
async fn connections_accepted_by_another_worker_move_to_their_document_and_keep_working() {
    let mut server = Server::start(&["--workers", "2"]);
    let url = server.url("home");
    // The first loads the document on the worker that accepted it.
    let mut clients = vec![synced_client(&url).await];
    for _ in 0..8 {
        clients.push(synced_client(&url).await);
    }
    let moved = metric(&server, "collab_connections_moved_total");
    assert!((1.0..=8.0).contains(&moved), "moved: {moved}");
    for (i, c) in clients.iter().enumerate() {
        c.insert(0, &format!("[{i}]"));
    }
    let converged = || {
        let text = clients[0].text();
        text.len() == 27 && clients.iter().all(|c| c.text() == text)
    };
    assert!(
        wait_until(WAIT, converged).await,
        "{:?}",
        clients.iter().map(|c| c.text()).collect::<Vec<_>>()
    );
    server.terminate();
    for c in &clients {
        assert_eq!(c.wait_closed().await, Some(1001));
    }
}

/// `--max-send-share`: a document whose broadcasts would take more than that share of its
/// thread holds the next one back and sends what arrived meanwhile as one merged message;
/// every reader still gets every edit. At 100 nothing is ever held back.
#[tokio::test]
async fn a_busy_document_merges_its_broadcasts_to_stay_within_its_send_share() {
    const EDITS: usize = 150;
    for (share, paces) in [("2", true), ("100", false)] {
        let server = Server::start(&["--max-send-share", share]);
        let url = server.url("busy");
        let mut readers = Vec::new();
        for _ in 0..40 {
            readers.push(synced_client(&url).await);
        }
        let writer = synced_client(&url).await;
        for i in 0..EDITS {
            writer.insert(i as u32, "x");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let all = "x".repeat(EDITS);
        let converged = || readers.iter().all(|r| r.text() == all);
        assert!(
            wait_until(WAIT, converged).await,
            "share {share}: readers missed edits"
        );
        let paced = metric(&server, "collab_broadcasts_paced_total");
        let messages = readers[0].seen.lock().unwrap().updates_received;
        if paces {
            assert!(paced > 0.0, "share {share}: nothing held back");
            assert!(
                messages < EDITS / 2,
                "share {share}: {messages} messages for {EDITS} edits"
            );
        } else {
            assert_eq!(paced, 0.0, "share {share}: held back {paced} times");
        }
    }
}
