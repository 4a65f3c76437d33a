//! Connection limits against the real binary: the open-file limit, sockets that never read,
//! slowloris, per-IP and per-document caps, and loaded documents.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use yrs::sync::protocol::{Message, SyncMessage};
use yrs::updates::encoder::Encode;
use yrs::{Doc, StateVector, Text, Transact};

/// An update inserting `len` bytes of text.
fn big_update(doc: &Doc, len: usize) -> Vec<u8> {
    let text = doc.get_or_insert_text("t");
    let mut txn = doc.transact_mut();
    text.insert(&mut txn, 0, &"x".repeat(len));
    Message::Sync(SyncMessage::Update(txn.encode_update_v1())).encode_v1()
}

/// Connects once the server has room again (a closed connection gives its place back when its
/// close handshake ends).
async fn connect_eventually(url: &str) -> Client {
    let deadline = Instant::now() + WAIT;
    loop {
        match Client::try_connect(request(url, &[]), Doc::new()).await {
            Ok(c) => {
                c.wait_synced().await;
                return c;
            }
            Err(r) if Instant::now() < deadline && (r.status == 503 || r.status == 429) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(r) => panic!("{url}: {r}"),
        }
    }
}

/// A WebSocket whose client never reads, with a tiny receive buffer. Returns it and its port.
async fn never_reading(server: &Server, doc: &str) -> (impl Sized, u16) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(server.addr).await.unwrap();
    let port = tcp.local_addr().unwrap().port();
    let (mut ws, _) = tokio_tungstenite::client_async(server.url(doc), tcp)
        .await
        .unwrap();
    let sv = Message::Sync(SyncMessage::SyncStep1(StateVector::default())).encode_v1();
    ws.send(WsMessage::Binary(sv.into())).await.unwrap();
    (ws, port)
}

#[tokio::test]
async fn descriptor_exhaustion_is_refused_not_wedging_storage() {
    // As with `ulimit -n 256`: before the fix, sockets took every descriptor, sled's next
    // write failed with EMFILE and no edit was ever echoed again.
    let mut server = Server::start_with_nofile(&[], Some(256));
    let editor = synced_client(&server.url("edited")).await;
    let mut idle = Vec::new();
    let mut refused = 0;
    for _ in 0..260 {
        let connect = Client::try_connect(request(&server.url("idle"), &[]), Doc::new());
        let result = tokio::time::timeout(WAIT, connect)
            .await
            .expect("a connection neither accepted nor refused: the server is out of descriptors");
        match result {
            Ok(c) => idle.push(c),
            Err(r) => {
                assert_eq!(r.status, 503, "{r}");
                refused += 1;
            }
        }
    }
    assert!(
        refused > 0,
        "all 260 sockets were accepted under a 256 descriptor limit"
    );
    assert!(server.log().contains("connection limit reached"));
    // A 1 MB update still becomes durable and is echoed.
    let source = Doc::new();
    editor.send_raw(big_update(&source, 1 << 20));
    editor
        .wait_for("the 1 MB echo", |c| c.len() == 1 << 20)
        .await;
    // With some sockets gone, a new document works too.
    for c in idle.drain(..5) {
        c.close();
    }
    let fresh = connect_eventually(&server.url("new-doc")).await;
    fresh.insert(0, "still alive");
    fresh.wait_text("still alive").await;
    let other = synced_client(&server.url("new-doc")).await;
    other.wait_text("still alive").await;
    let started = Instant::now();
    server.terminate();
    assert!(started.elapsed() < Duration::from_secs(10));
    server.restart();
    let after = synced_client(&server.url("edited")).await;
    assert_eq!(after.len(), 1 << 20);
}

#[tokio::test]
async fn a_client_that_never_reads_is_aborted_after_the_close_deadline() {
    let server = Server::start(&["--outbound-queue", "4", "--heartbeat-secs", "600"]);
    let writer = synced_client(&server.url("busy")).await;
    let (_silent, port) = never_reading(&server, "busy").await;
    assert!(
        wait_until(WAIT, || server.holds_connection(port)).await,
        "cannot see the connection in /proc"
    );
    let source = Doc::new();
    for i in 0..60 {
        writer.send_raw(big_update(&source, 128 * 1024));
        writer
            .wait_for("echo", |c| c.seen.lock().unwrap().updates_received > i)
            .await;
        if server.log().contains("outbound queue full") {
            break;
        }
    }
    assert!(
        wait_until(WAIT, || server.log().contains("outbound queue full")).await,
        "the silent client was never dropped"
    );
    // Its 1013 close frame cannot be written; after the 5 s deadline the socket is aborted.
    let gone = wait_until(Duration::from_secs(8), || !server.holds_connection(port)).await;
    assert!(
        gone,
        "the server still holds the socket of a client that never reads"
    );
}

#[tokio::test]
async fn slowloris_connections_are_closed_by_the_handshake_deadline() {
    let server = Server::start(&["--handshake-timeout-secs", "2"]);
    let mut stalled = Vec::new();
    let opened = Instant::now();
    for _ in 0..2000 {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        s.write_all(b"GET /doc HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
            .await
            .unwrap();
        stalled.push(s);
    }
    // A normal client gets in and syncs while they hang.
    let a = synced_client(&server.url("doc")).await;
    a.insert(0, "fine");
    a.wait_text("fine").await;
    // Every stalled socket is closed by the server within the deadline (plus slack; the
    // stock actix-http timeout of 5 s would miss it).
    let deadline = opened + Duration::from_millis(4500);
    let mut closed = 0;
    for mut s in stalled {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut buf = [0u8; 512];
        loop {
            match tokio::time::timeout(left, s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    closed += 1;
                    break;
                }
                Ok(Ok(_)) => continue, // the 408 answer, then the close
                Err(_) => break,
            }
        }
    }
    assert_eq!(closed, 2000, "sockets with half a request were left open");
}

#[tokio::test]
async fn connections_per_ip_are_capped_and_forwarded_for_needs_a_trusted_proxy() {
    let server = Server::start(&["--max-connections-per-ip", "3"]);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(synced_client(&server.url("ip")).await);
    }
    let r = Client::try_connect(request(&server.url("ip"), &[]), Doc::new())
        .await
        .err()
        .expect("a 4th connection from one address");
    assert_eq!(r.status, 429, "{r}");
    // Not trusted: the header is ignored.
    let r = Client::try_connect(
        request(&server.url("ip"), &[("X-Forwarded-For", "203.0.113.9")]),
        Doc::new(),
    )
    .await
    .err()
    .expect("X-Forwarded-For from an untrusted peer counted");
    assert_eq!(r.status, 429);
    held.pop().unwrap().close();
    connect_eventually(&server.url("ip")).await;

    // Behind a trusted proxy each forwarded address has its own allowance.
    let proxied = Server::start(&[
        "--max-connections-per-ip",
        "1",
        "--trusted-proxies",
        "127.0.0.0/8",
    ]);
    let xff = |ip: &'static str| request(&proxied.url("p"), &[("X-Forwarded-For", ip)]);
    let _a = Client::try_connect(xff("203.0.113.1"), Doc::new())
        .await
        .unwrap();
    let _b = Client::try_connect(xff("203.0.113.2"), Doc::new())
        .await
        .unwrap();
    let r = Client::try_connect(xff("203.0.113.1"), Doc::new())
        .await
        .err()
        .expect("a second connection from 203.0.113.1");
    assert_eq!(r.status, 429);
}

#[tokio::test]
async fn connections_per_document_are_capped() {
    let server = Server::start(&["--max-connections-per-doc", "3"]);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(synced_client(&server.url("full")).await);
    }
    let r = Client::try_connect(request(&server.url("full"), &[]), Doc::new())
        .await
        .err()
        .expect("a 4th connection to one document");
    assert_eq!(r.status, 503, "{r}");
    synced_client(&server.url("other")).await;
    held.pop().unwrap().close();
    connect_eventually(&server.url("full")).await;
}

#[tokio::test]
async fn loaded_documents_are_bounded_idle_ones_evicted_first() {
    let server = Server::start(&["--max-loaded-documents", "50", "--grace-period-secs", "600"]);
    // 20,000 documents opened one after another (8 at a time), each edited once.
    let mut rss_after_1000 = 0;
    for batch in 0..2500 {
        let mut clients = Vec::new();
        for j in 0..8 {
            let c = Client::connect(&server.url(&format!("many-{batch}-{j}"))).await;
            clients.push(c);
        }
        for c in &clients {
            c.wait_synced().await;
            c.insert(0, "x");
        }
        for c in &clients {
            c.wait_text("x").await;
            c.close();
        }
        if batch == 125 {
            rss_after_1000 = server.rss_kib();
        }
    }
    let rss_end = server.rss_kib();
    eprintln!("RSS after 1,000 documents: {rss_after_1000} KiB; after 20,000: {rss_end} KiB");
    assert!(
        rss_end < rss_after_1000 + 32 * 1024,
        "RSS grew from {rss_after_1000} to {rss_end} KiB"
    );
    // Evicted documents were stored, not lost.
    let back = synced_client(&server.url("many-0-0")).await;
    assert_eq!(back.text(), "x");

    // With every loaded document in use, another one is refused with 1013.
    let tight = Server::start(&["--max-loaded-documents", "2"]);
    let _a = synced_client(&tight.url("a")).await;
    let _b = synced_client(&tight.url("b")).await;
    let c = Client::connect(&tight.url("c")).await;
    assert_eq!(c.wait_closed().await, Some(1013));
}
