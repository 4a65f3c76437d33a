//! Connections that stop reading: the heartbeat and the bounded outbound queue let the server
//! drop them instead of holding them (and their memory) forever.

mod common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use yrs::sync::protocol::{Message, SyncMessage};
use yrs::updates::encoder::Encode;
use yrs::{Doc, ReadTxn, StateVector, Text, Transact};

/// Connects, sends SyncStep1 and an awareness state, then never reads again: no pong is ever
/// sent and nothing is taken off the socket.
async fn silent_peer(url: &str, client_id: u64) -> impl Sized {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let sv = Message::Sync(SyncMessage::SyncStep1(StateVector::default())).encode_v1();
    ws.send(WsMessage::Binary(sv.into())).await.unwrap();
    // awareness: 1 client, id, clock 1, {"user":"silent"}
    let mut aw = vec![0x01];
    let mut body = vec![0x01];
    let mut id = client_id;
    loop {
        let b = (id & 0x7f) as u8;
        id >>= 7;
        if id == 0 {
            body.push(b);
            break;
        }
        body.push(b | 0x80);
    }
    let json = br#"{"user":"silent"}"#;
    body.push(0x01);
    body.push(json.len() as u8);
    body.extend_from_slice(json);
    aw.push(body.len() as u8);
    aw.extend(body);
    ws.send(WsMessage::Binary(aw.into())).await.unwrap();
    ws
}

#[tokio::test]
async fn a_peer_that_misses_a_pong_is_dropped_and_its_presence_removed() {
    let server = Server::start(&["--heartbeat-secs", "1"]);
    let watcher = synced_client(&server.url("hb")).await;
    let _silent = silent_peer(&server.url("hb"), 4242).await;
    watcher
        .wait_for("silent peer's presence", |c| {
            c.awareness_states().contains_key(&4242)
        })
        .await;
    // Ping at 1 s, no pong by the ping at 2 s: closed, presence removed.
    assert!(
        wait_until(Duration::from_secs(5), || {
            !watcher.awareness_states().contains_key(&4242)
        })
        .await,
        "silent peer was not dropped"
    );
    assert!(server.log().contains("no pong"), "{}", server.log());
    // The watcher answers pings (tungstenite does) and stays connected.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!watcher.is_closed());
}

#[tokio::test]
async fn a_client_that_cannot_keep_up_is_disconnected_not_buffered() {
    let server = Server::start(&["--outbound-queue", "4", "--heartbeat-secs", "600"]);
    let writer = synced_client(&server.url("slow")).await;
    let reader = synced_client(&server.url("slow")).await;
    let _silent = silent_peer(&server.url("slow"), 777).await;
    // 100 separate 256 KiB messages: more than the silent peer's socket buffers, the
    // connection's write buffer and its queue of 4 can absorb.
    let source = Doc::new();
    let text = source.get_or_insert_text("t");
    let chunk = "z".repeat(1 << 18);
    for i in 0..100 {
        let update = {
            let mut txn = source.transact_mut();
            text.insert(&mut txn, 0, &chunk);
            txn.encode_update_v1()
        };
        writer.send_raw(Message::Sync(SyncMessage::Update(update)).encode_v1());
        // Let each update be flushed on its own so each is a separate frame.
        writer
            .wait_for("echo", |c| c.seen.lock().unwrap().updates_received > i)
            .await;
    }
    assert!(
        wait_until(WAIT, || server.log().contains("outbound queue full")).await,
        "the silent peer was never disconnected:\n{}",
        server.log()
    );
    // Everyone who reads got everything.
    let len = 100 * (1 << 18);
    let got_all = wait_until(Duration::from_secs(30), || reader.len() == len).await;
    assert!(
        got_all,
        "reader has {} of {len}, closed: {}",
        reader.len(),
        reader.is_closed()
    );
    assert!(!reader.is_closed() && !writer.is_closed());
    assert_eq!(source.transact().state_vector().len(), 1);
}

/// Broadcasts are written straight into a free socket by the document (`ws::direct`); when the
/// kernel takes only part of one, the session must send the rest before anything else. A
/// reader that keeps its receive window small and stalls makes that happen over and over; it
/// must still receive every update, frame by frame intact.
#[tokio::test]
async fn a_stalling_reader_receives_every_broadcast_intact() {
    use futures_util::StreamExt;
    use tokio::net::TcpSocket;
    use yrs::updates::decoder::Decode;
    use yrs::{GetString, Update};

    let server = Server::start(&["--rate-limit-bytes", "100000000"]);
    let writer = synced_client(&server.url("stalled")).await;
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(server.addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(server.url("stalled"), tcp)
        .await
        .unwrap();
    let sv = Message::Sync(SyncMessage::SyncStep1(StateVector::default())).encode_v1();
    ws.send(WsMessage::Binary(sv.into())).await.unwrap();
    // Each broadcast under the 64 KiB a direct write takes, most over what a stalled socket
    // has room for.
    let chunk = "x".repeat(50_000);
    for i in 0..60u32 {
        writer.insert(i * 50_000, &chunk);
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    let doc = Doc::new();
    let text = doc.get_or_insert_text("t");
    let expected = 60 * 50_000;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut frames = 0u32;
    while text.get_string(&doc.transact()).len() < expected {
        assert!(
            std::time::Instant::now() < deadline,
            "not everything arrived"
        );
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("the server stopped sending")
            .expect("the connection ended")
            .expect("a frame that does not parse");
        frames += 1;
        if frames.is_multiple_of(2) {
            // Stall: the server's socket buffer fills while this side does not read.
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let WsMessage::Binary(bytes) = msg else {
            continue;
        };
        let mut decoder = yrs::updates::decoder::DecoderV1::from(bytes.as_ref());
        for m in yrs::sync::protocol::MessageReader::new(&mut decoder) {
            let update = match m.expect("a message that decodes") {
                Message::Sync(SyncMessage::SyncStep2(u))
                | Message::Sync(SyncMessage::Update(u)) => u,
                _ => continue,
            };
            let u = Update::decode_v1(&update).expect("an update that decodes");
            doc.transact_mut().apply_update(u).unwrap();
        }
    }
    assert_eq!(text.get_string(&doc.transact()), writer.text());
}
