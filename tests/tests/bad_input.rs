//! Untrusted input: the offending connection is closed with a clear code and a log line; the
//! document and everyone else carry on.

mod common;

use common::*;
use yrs::sync::protocol::{Message, SyncMessage};
use yrs::updates::encoder::Encode;

/// Sends `frame` from a fresh connection to a document that has content and a watching client,
/// and checks the close code, the log line, and that the document still works for everyone.
async fn offending_frame_is_contained(
    server: &Server,
    doc: &str,
    send: impl FnOnce(&Client),
    expected_code: u16,
) {
    let writer = synced_client(&server.url(doc)).await;
    let watcher = synced_client(&server.url(doc)).await;
    writer.insert(0, "intact");
    watcher.wait_text("intact").await;

    let bad = synced_client(&server.url(doc)).await;
    send(&bad);
    assert_eq!(bad.wait_closed().await, Some(expected_code));

    // The others are still connected and the document still takes edits.
    writer.insert(6, "!");
    watcher.wait_text("intact!").await;
    assert!(!writer.is_closed() && !watcher.is_closed());
    let late = synced_client(&server.url(doc)).await;
    assert_eq!(late.text(), "intact!");
    assert!(
        server.log().contains("closing connection"),
        "no log line for the offending connection"
    );
}

#[tokio::test]
async fn garbage_bytes_close_with_protocol_error() {
    let server = Server::start(&[]);
    offending_frame_is_contained(&server, "g", |c| c.send_raw(vec![0xff; 9]), 1002).await;
}

#[tokio::test]
async fn a_truncated_message_closes_with_protocol_error() {
    let server = Server::start(&[]);
    let truncated = vec![0x00, 0x02, 0x0c, 0x01, 0x01, 0x01];
    offending_frame_is_contained(&server, "t", |c| c.send_raw(truncated), 1002).await;
}

#[tokio::test]
async fn an_unknown_message_type_closes_with_unsupported() {
    let server = Server::start(&[]);
    offending_frame_is_contained(&server, "u", |c| c.send_raw(vec![0x07, 0x00]), 1003).await;
}

#[tokio::test]
async fn random_bytes_as_an_update_close_and_leave_the_document_intact() {
    let server = Server::start(&[]);
    let mut x: u32 = 12345;
    let junk: Vec<u8> = (0..300)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 16) as u8
        })
        .collect();
    let frame = Message::Sync(SyncMessage::Update(junk)).encode_v1();
    offending_frame_is_contained(&server, "r", |c| c.send_raw(frame), 1002).await;
}

#[tokio::test]
async fn a_huge_length_prefix_is_refused_not_allocated() {
    let server = Server::start(&[]);
    // sync/update whose payload claims 2^40 bytes.
    let frame = vec![0x00, 0x02, 0x80, 0x80, 0x80, 0x80, 0x80, 0x20, 0x01];
    offending_frame_is_contained(&server, "h", |c| c.send_raw(frame), 1002).await;
}

#[tokio::test]
async fn an_oversized_message_closes_with_1009() {
    let server = Server::start(&["--max-message-size", "65536"]);
    let big = Message::Sync(SyncMessage::Update(vec![0; 100_000])).encode_v1();
    offending_frame_is_contained(&server, "big", |c| c.send_raw(big), 1009).await;
}

#[tokio::test]
async fn a_text_frame_closes_with_unsupported() {
    let server = Server::start(&[]);
    offending_frame_is_contained(&server, "txt", |c| c.send_text("hello"), 1003).await;
}

#[tokio::test]
async fn invalid_awareness_json_closes_with_protocol_error() {
    let server = Server::start(&[]);
    // awareness: 1 client, id 1, clock 1, state "{{{{"
    let frame = vec![0x01, 0x08, 0x01, 0x01, 0x01, 0x04, b'{', b'{', b'{', b'{'];
    offending_frame_is_contained(&server, "aw", |c| c.send_raw(frame), 1002).await;
}

#[tokio::test]
async fn too_many_awareness_clients_close_with_policy() {
    let server = Server::start(&["--max-awareness-per-connection", "4"]);
    let mut update = yrs::sync::awareness::AwarenessUpdate {
        clients: Default::default(),
    };
    for id in 1..=5u64 {
        update.clients.insert(
            yrs::ClientID::new(id),
            yrs::sync::awareness::AwarenessUpdateEntry {
                clock: 1,
                json: "{}".into(),
            },
        );
    }
    let frame = Message::Awareness(update).encode_v1();
    offending_frame_is_contained(&server, "many", |c| c.send_raw(frame), 1008).await;
}

#[tokio::test]
async fn overlong_document_names_are_refused_before_upgrade() {
    let server = Server::start(&[]);
    let long = "n".repeat(513);
    let url = format!("ws://{}/{}", server.addr, long);
    match tokio_tungstenite::connect_async(&url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 400)
        }
        other => panic!("expected HTTP 400, got {:?}", other.map(|_| ())),
    }
    // The root path names no document: it is where Hocuspocus providers connect.
    let root = format!("ws://{}/", server.addr);
    assert!(tokio_tungstenite::connect_async(&root).await.is_ok());
}

#[tokio::test]
async fn connections_beyond_the_limit_are_refused_and_the_rest_carry_on() {
    let server = Server::start(&["--max-connections", "2"]);
    let a = synced_client(&server.url("limit")).await;
    let b = synced_client(&server.url("limit")).await;
    match tokio_tungstenite::connect_async(server.url("limit")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 503),
        other => panic!("expected HTTP 503, got {:?}", other.map(|_| ())),
    }
    assert!(server.log().contains("connection limit reached"));
    a.insert(0, "still here");
    b.wait_text("still here").await;
    // A slot frees up when a connection ends (after its close handshake, so retry briefly).
    a.close();
    a.wait_closed().await;
    let mut joined = None;
    for _ in 0..50 {
        if let Ok((ws, _)) = tokio_tungstenite::connect_async(server.url("limit")).await {
            joined = Some(ws);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(joined.is_some(), "a freed slot is usable again");
}
