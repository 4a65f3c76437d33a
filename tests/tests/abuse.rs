//! Traffic limits against the real binary: a flooding client, amplification by SyncStep1,
//! document and awareness sizes, memory for large incoming messages, oversized messages, and
//! a client that never reads.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use yrs::sync::protocol::{Message, SyncMessage};
use yrs::updates::encoder::Encode;
use yrs::{Doc, StateVector, Text, Transact};

/// The latency test runs alone: the other tests here push hundreds of megabytes through
/// loopback, which on a 2-core machine would measure them rather than the flood.
static ALONE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Types a unique marker every `every`, `n` times, and measures how long until `observer`
/// (another client of the same document) has it: the full path through the server.
async fn relay_latencies(
    c: &Client,
    observer: &Client,
    n: usize,
    every: Duration,
) -> Vec<Duration> {
    let mut out = Vec::new();
    for i in 0..n {
        let marker = format!("<{}-{i}>", c.client_id());
        let sent = Instant::now();
        let at = c.len();
        c.insert(at, &marker);
        // Polled every millisecond: wait_for's 10 ms steps would dominate the figure.
        let deadline = Instant::now() + WAIT;
        while !observer.text().contains(&marker) {
            assert!(Instant::now() < deadline, "{marker} never arrived");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        out.push(sent.elapsed());
        tokio::time::sleep(every).await;
    }
    out.sort();
    out
}

#[tokio::test]
async fn a_flooding_client_does_not_degrade_the_others() {
    let _alone = ALONE.write().await;
    // The limit sits well below what a debug build applies per second under CI's load: a
    // flooder the server cannot read faster than its rate is never over budget (the bucket
    // refills between frames), and at 200/s that made this test fail now and then.
    let server = Server::start(&[
        "--rate-limit-messages",
        "100",
        "--rate-limit-burst-secs",
        "1",
        "--rate-limit-grace-secs",
        "3",
    ]);
    let flooder = synced_client(&server.url("flooded")).await;
    let peer = synced_client(&server.url("flooded")).await;
    let peer_observer = synced_client(&server.url("flooded")).await;
    let elsewhere = synced_client(&server.url("quiet")).await;
    let elsewhere_observer = synced_client(&server.url("quiet")).await;
    let stop = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    // The flood: single-character edits as fast as the socket takes them.
    let flood = {
        let (stop, sent) = (stop.clone(), sent.clone());
        let url = server.url("flooded");
        tokio::spawn(async move {
            let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
            let doc = Doc::new();
            let text = doc.get_or_insert_text("t");
            let mut close = None;
            let (mut sink, mut stream) = ws.split();
            let writer = async {
                while stop.load(Ordering::Relaxed) == 0 {
                    let u = {
                        let mut txn = doc.transact_mut();
                        text.insert(&mut txn, 0, "f");
                        txn.encode_update_v1()
                    };
                    let m = Message::Sync(SyncMessage::Update(u)).encode_v1();
                    if sink.send(WsMessage::Binary(m.into())).await.is_err() {
                        break;
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            };
            let reader = async {
                while let Some(Ok(m)) = stream.next().await {
                    if let WsMessage::Close(f) = m {
                        close = f.map(|f| u16::from(f.code));
                        break;
                    }
                }
            };
            tokio::select! { _ = writer => {}, _ = reader => {} }
            close
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (same, other) = tokio::join!(
        relay_latencies(&peer, &peer_observer, 100, Duration::from_millis(20)),
        relay_latencies(
            &elsewhere,
            &elsewhere_observer,
            100,
            Duration::from_millis(20)
        ),
    );
    let (p50s, p99s) = (percentile(&same, 0.5), percentile(&same, 0.99));
    let (p50o, p99o) = (percentile(&other, 0.5), percentile(&other, 0.99));
    eprintln!(
        "flood: same document relay p50 {p50s:?} p99 {p99s:?}; other document p50 {p50o:?} p99 {p99o:?}; flooder sent {}",
        sent.load(Ordering::Relaxed)
    );
    assert!(
        p99s < Duration::from_millis(50),
        "same-document p99 {p99s:?}"
    );
    assert!(
        p99o < Duration::from_millis(50),
        "other-document p99 {p99o:?}"
    );
    // The flooder stayed over its rate past the grace period: 1008.
    let code = tokio::time::timeout(Duration::from_secs(10), flood)
        .await
        .expect("the flooder was never closed")
        .unwrap();
    stop.store(1, Ordering::Relaxed);
    assert_eq!(code, Some(1008));
    // Everyone else received everything: the peer has all of its own edits and the
    // flooder's accepted ones, and a fresh client agrees.
    let fresh = synced_client(&server.url("flooded")).await;
    peer.wait_text(&fresh.text()).await;
    flooder.close();
    assert!(!peer.is_closed() && !elsewhere.is_closed());
}

#[tokio::test]
async fn pasting_a_large_document_works_with_the_default_limits() {
    let _shared = ALONE.read().await;
    let server = Server::start(&[]);
    let a = synced_client(&server.url("paste")).await;
    let b = synced_client(&server.url("paste")).await;
    let paste = "lorem ipsum ".repeat(500_000); // 6 MB in one update
    a.insert(0, &paste);
    b.wait_for("the paste", |c| c.len() as usize == paste.len())
        .await;
    a.insert(0, "typing after the paste ");
    b.wait_for("typing", |c| c.text().starts_with("typing"))
        .await;
    assert!(!a.is_closed());
}

#[tokio::test]
async fn repeated_sync_requests_cannot_amplify() {
    let _shared = ALONE.read().await;
    let server = Server::start(&[
        "--rate-limit-bytes",
        "1048576",
        "--rate-limit-burst-secs",
        "1",
        "--rate-limit-grace-secs",
        "2",
    ]);
    let writer = synced_client(&server.url("big")).await;
    writer.insert(0, &"y".repeat(1 << 20));
    writer.wait_for("echo", |c| c.len() == 1 << 20).await;
    // A state vector the document is ahead of: every request is answered with ~1 MB.
    let sv = {
        let mut sv = StateVector::default();
        sv.set_max(writer.doc.client_id(), 1);
        sv
    };
    let request = Message::Sync(SyncMessage::SyncStep1(sv)).encode_v1();
    let (mut ws, _) = tokio_tungstenite::connect_async(server.url("big"))
        .await
        .unwrap();
    let started = Instant::now();
    let mut received = 0usize;
    let mut requests = 0usize;
    let mut ticker = tokio::time::interval(Duration::from_millis(2));
    let code = loop {
        tokio::select! {
            _ = ticker.tick(), if started.elapsed() < Duration::from_secs(8) => {
                if ws.send(WsMessage::Binary(request.clone().into())).await.is_err() { break None; }
                requests += 1;
            }
            m = ws.next() => match m {
                Some(Ok(WsMessage::Binary(b))) => received += b.len(),
                Some(Ok(WsMessage::Close(f))) => break f.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                _ => break None,
            },
        }
        if started.elapsed() > Duration::from_secs(12) {
            break None;
        }
    };
    eprintln!(
        "amplification: {requests} requests ({} bytes) drew {received} bytes in {:?}",
        requests * request.len(),
        started.elapsed()
    );
    assert_eq!(code, Some(1008), "the requester was not closed");
    // 1 MiB/s with a 1 s burst over at most grace + burst seconds: far from gigabytes.
    assert!(
        received < 8 << 20,
        "{received} bytes sent to a {requests}-request stream"
    );
}

#[tokio::test]
async fn a_document_cannot_grow_past_its_limit() {
    let _shared = ALONE.read().await;
    let server = Server::start(&["--max-document-bytes", "100000"]);
    let a = synced_client(&server.url("capped")).await;
    let b = synced_client(&server.url("capped")).await;
    a.insert(0, &"a".repeat(60_000));
    b.wait_for("the first 60 KB", |c| c.len() == 60_000).await;
    let big = synced_client(&server.url("capped")).await;
    big.insert(0, &"b".repeat(60_000));
    assert_eq!(big.wait_closed().await, Some(1009));
    assert!(server.log().contains("max-document-bytes"));
    // Intact, and still editable by the others.
    b.insert(0, "small");
    a.wait_for("a small edit", |c| c.text().starts_with("small"))
        .await;
    let fresh = synced_client(&server.url("capped")).await;
    assert_eq!(fresh.len(), 60_005);
}

#[tokio::test]
async fn a_huge_awareness_state_closes_with_1009() {
    let _shared = ALONE.read().await;
    let server = Server::start(&["--max-awareness-bytes", "65536"]);
    let watcher = synced_client(&server.url("aw")).await;
    let mut c = synced_client(&server.url("aw")).await;
    let state = format!(r#"{{"cursor":"{}"}}"#, "z".repeat(100_000));
    c.set_awareness(&state);
    assert_eq!(c.wait_closed().await, Some(1009));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        watcher.awareness_states().is_empty(),
        "the state was relayed"
    );
    let mut ok = synced_client(&server.url("aw")).await;
    ok.set_awareness(r#"{"cursor":1}"#);
    let id = ok.client_id();
    watcher
        .wait_for("a normal state", |w| w.awareness_states().contains_key(&id))
        .await;
}

/// Sends one binary frame of `len` garbage bytes, slowly enough to hold it open.
async fn send_big_frame(addr: std::net::SocketAddr, path: &str, len: usize) -> Option<u16> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET /{path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = vec![0u8; 4096];
    let n = s.read(&mut head).await.unwrap();
    assert!(String::from_utf8_lossy(&head[..n]).contains("101"));
    let mut frame = vec![0x82, 0x80 | 127];
    frame.extend_from_slice(&(len as u64).to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 0]); // mask of zeros: payload as is
    s.write_all(&frame).await.unwrap();
    // Like a real client: the whole message is written before anything is read, so a server
    // that resets the connection is seen as a failed write, never as a close code.
    let chunk = vec![0xffu8; 256 * 1024];
    let mut sent = 0;
    while sent < len {
        let n = chunk.len().min(len - sent);
        if s.write_all(&chunk[..n]).await.is_err() {
            return None;
        }
        sent += n;
    }
    let (mut rd, _wr) = s.into_split();
    // Read until a close frame (its code) or the socket ends.
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(30), rd.read(&mut tmp)).await {
            Ok(Ok(n)) if n > 0 => {
                buf.extend_from_slice(&tmp[..n]);
                // Skip the server's sync step 1 and awareness frames; find the close frame.
                let mut i = 0;
                let mut found = None;
                while i + 2 <= buf.len() {
                    let len = (buf[i + 1] & 0x7f) as usize;
                    if len >= 126 || i + 2 + len > buf.len() {
                        break;
                    }
                    if buf[i] & 0x0f == 8 && len >= 2 {
                        found = Some(u16::from_be_bytes([buf[i + 2], buf[i + 3]]));
                    }
                    i += 2 + len;
                }
                if found.is_some() {
                    break found;
                }
            }
            _ => break None,
        }
    };
    code
}

#[tokio::test]
async fn an_oversized_message_gets_a_1009_the_client_can_read() {
    let _shared = ALONE.read().await;
    let server = Server::start(&["--max-message-size", "1048576"]);
    // 64 MiB announced and sent: the server says 1009 at the header and drains the rest.
    let code = send_big_frame(server.addr, "over", 64 << 20).await;
    assert_eq!(
        code,
        Some(1009),
        "the client saw a reset, not the close code"
    );
}

#[tokio::test]
async fn large_incoming_messages_share_a_memory_budget() {
    let _shared = ALONE.read().await;
    let server = Server::start(&["--max-incoming-bytes", "33554432"]);
    let base = server.rss_kib();
    let addr = server.addr;
    let sampler = {
        let pid = server.pid();
        tokio::spawn(async move {
            let mut peak = 0u64;
            for _ in 0..400 {
                let status =
                    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                let rss = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
                peak = peak.max(rss);
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            peak
        })
    };
    // Ten clients each send a 31 MiB message at once (garbage: each ends in a 1002).
    let sends: Vec<_> = (0..10)
        .map(|i| {
            tokio::spawn(send_big_frame(
                addr,
                if i % 2 == 0 { "m1" } else { "m2" },
                31 << 20,
            ))
        })
        .collect();
    let mut codes = Vec::new();
    for s in sends {
        codes.push(s.await.unwrap());
    }
    let peak = sampler.await.unwrap();
    eprintln!("incoming budget 32 MiB: base RSS {base} KiB, peak {peak} KiB, closes {codes:?}");
    // Ten messages at once would need 310 MiB; the budget keeps about one at a time.
    assert!(
        peak < base + 160 * 1024,
        "peak RSS {peak} KiB over a base of {base} KiB"
    );
    for code in codes {
        assert!(matches!(code, Some(1002) | Some(1013)), "{code:?}");
    }
}

#[tokio::test]
async fn a_client_that_never_reads_does_not_grow_memory() {
    let _shared = ALONE.read().await;
    let server = Server::start(&["--heartbeat-secs", "600"]);
    let writer = synced_client(&server.url("busy-doc")).await;
    let (mut silent, _) = tokio_tungstenite::connect_async(server.url("busy-doc"))
        .await
        .unwrap();
    let sv = Message::Sync(SyncMessage::SyncStep1(StateVector::default())).encode_v1();
    silent.send(WsMessage::Binary(sv.into())).await.unwrap();
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut i = 0;
    // Busy but not growing: 2 KB typed and deleted again, 100 times a second.
    while started.elapsed() < Duration::from_secs(30) {
        writer.insert(0, &"w".repeat(2000));
        writer.remove(0, 2000);
        i += 1;
        if i % 50 == 0 {
            samples.push(server.rss_kib());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (first, last) = (samples[samples.len() / 4], *samples.last().unwrap());
    eprintln!("slow consumer: RSS {first} KiB after warm-up, {last} KiB after 30 s ({i} edits)");
    assert!(
        last < first + 16 * 1024,
        "RSS grew from {first} to {last} KiB"
    );
    drop(silent);
}
