//! The y-websocket wire protocol (y-protocols sync + awareness over lib0 encoding).
//!
//! Decoding is strict: a frame must consist of whole, well-formed messages. yrs's own
//! `MessageReader` stops silently at a truncated message, which would let a client believe an
//! edit was delivered when it was dropped, so this module walks the frame itself.

use serde::de::IgnoredAny;
use thiserror::Error;
use yrs::encoding::read::{Cursor, Read};
use yrs::encoding::write::Write;
use yrs::sync::awareness::AwarenessUpdate;
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::{Encode, Encoder, EncoderV1};
use yrs::{StateVector, Update};

pub const MSG_SYNC: u64 = 0;
pub const MSG_AWARENESS: u64 = 1;
pub const MSG_AUTH: u64 = 2;
pub const MSG_QUERY_AWARENESS: u64 = 3;
pub const SYNC_STEP_1: u64 = 0;
pub const SYNC_STEP_2: u64 = 1;
pub const SYNC_UPDATE: u64 = 2;

/// A validated message received from a client.
#[derive(Debug)]
pub enum ClientMessage {
    SyncStep1(StateVector),
    SyncStep2(Update),
    Update(Update),
    Awareness(AwarenessUpdate),
    QueryAwareness,
    /// Clients never send auth to a server in practice; the reference server ignores it.
    Auth,
}

impl ClientMessage {
    /// Whether the message writes to the document (what a read-only connection may not send).
    pub fn is_document_write(&self) -> bool {
        matches!(self, ClientMessage::SyncStep2(_) | ClientMessage::Update(_))
    }
}

#[derive(Debug, Error)]
pub enum ProtocolError {
    #[error("empty frame")]
    EmptyFrame,
    #[error("malformed {what} message: {source}")]
    Malformed {
        what: &'static str,
        #[source]
        source: yrs::encoding::read::Error,
    },
    #[error("unknown message type {0}")]
    UnknownMessageType(u64),
    #[error("unknown sync message type {0}")]
    UnknownSyncType(u64),
    #[error("awareness state of client {client} is not valid JSON")]
    InvalidAwarenessJson { client: u64 },
}

impl ProtocolError {
    /// True when the frame was well-formed but used a message type this server does not speak.
    pub fn is_unsupported(&self) -> bool {
        matches!(
            self,
            ProtocolError::UnknownMessageType(_) | ProtocolError::UnknownSyncType(_)
        )
    }
}

fn malformed(what: &'static str) -> impl FnOnce(yrs::encoding::read::Error) -> ProtocolError {
    move |source| ProtocolError::Malformed { what, source }
}

/// Decodes every message of one binary frame. Any defect rejects the whole frame so that a
/// partially understood frame never reaches the document.
pub fn decode_frame(frame: &[u8]) -> Result<Vec<ClientMessage>, ProtocolError> {
    if frame.is_empty() {
        return Err(ProtocolError::EmptyFrame);
    }
    let mut cur = Cursor::new(frame);
    let mut out = Vec::with_capacity(1);
    while cur.has_content() {
        out.push(decode_message(&mut cur)?);
    }
    Ok(out)
}

fn decode_message(cur: &mut Cursor<'_>) -> Result<ClientMessage, ProtocolError> {
    let tag: u64 = cur.read_var().map_err(malformed("message type"))?;
    match tag {
        MSG_SYNC => {
            let sub: u64 = cur.read_var().map_err(malformed("sync"))?;
            match sub {
                SYNC_STEP_1 => {
                    let buf = cur.read_buf().map_err(malformed("sync step 1"))?;
                    let sv = StateVector::decode_v1(buf).map_err(malformed("sync step 1"))?;
                    Ok(ClientMessage::SyncStep1(sv))
                }
                SYNC_STEP_2 => {
                    let buf = cur.read_buf().map_err(malformed("sync step 2"))?;
                    let u = Update::decode_v1(buf).map_err(malformed("sync step 2"))?;
                    Ok(ClientMessage::SyncStep2(u))
                }
                SYNC_UPDATE => {
                    let buf = cur.read_buf().map_err(malformed("update"))?;
                    let u = Update::decode_v1(buf).map_err(malformed("update"))?;
                    Ok(ClientMessage::Update(u))
                }
                other => Err(ProtocolError::UnknownSyncType(other)),
            }
        }
        MSG_AWARENESS => {
            let buf = cur.read_buf().map_err(malformed("awareness"))?;
            let update = AwarenessUpdate::decode_v1(buf).map_err(malformed("awareness"))?;
            for (client, entry) in &update.clients {
                if serde_json::from_str::<IgnoredAny>(&entry.json).is_err() {
                    return Err(ProtocolError::InvalidAwarenessJson {
                        client: client.get(),
                    });
                }
            }
            Ok(ClientMessage::Awareness(update))
        }
        MSG_AUTH => {
            let sub: u64 = cur.read_var().map_err(malformed("auth"))?;
            if sub == 0 {
                cur.read_string().map_err(malformed("auth"))?;
            }
            Ok(ClientMessage::Auth)
        }
        MSG_QUERY_AWARENESS => Ok(ClientMessage::QueryAwareness),
        other => Err(ProtocolError::UnknownMessageType(other)),
    }
}

fn sync_message(sub: u64, payload: &[u8]) -> Vec<u8> {
    let mut enc = EncoderV1::new();
    enc.write_var(MSG_SYNC);
    enc.write_var(sub);
    enc.write_buf(payload);
    enc.to_vec()
}

/// `sync/SyncStep1(state vector)`.
pub fn encode_sync_step1(sv: &StateVector) -> Vec<u8> {
    sync_message(SYNC_STEP_1, &sv.encode_v1())
}

/// `sync/SyncStep2(update)`.
pub fn encode_sync_step2(update: &[u8]) -> Vec<u8> {
    sync_message(SYNC_STEP_2, update)
}

/// `sync/Update(update)`.
pub fn encode_update(update: &[u8]) -> Vec<u8> {
    sync_message(SYNC_UPDATE, update)
}

/// One `sync/Update` carrying all of `updates` (merged when there are several), so a batch
/// released together costs each recipient one frame instead of one per edit.
pub fn encode_updates(updates: &[Vec<u8>]) -> Vec<u8> {
    match updates {
        [one] => encode_update(one),
        many => match yrs::merge_updates_v1(many) {
            Ok(merged) => encode_update(&merged),
            // Every input is a diff this server produced and applied, so merging cannot fail;
            // if it somehow did, a lossless fallback is to concatenate per-update messages.
            Err(_) => many.iter().flat_map(|u| encode_update(u)).collect(),
        },
    }
}

/// `awareness(update)`.
pub fn encode_awareness(update: &AwarenessUpdate) -> Vec<u8> {
    let mut enc = EncoderV1::new();
    enc.write_var(MSG_AWARENESS);
    enc.write_buf(update.encode_v1());
    enc.to_vec()
}

/// `auth/permission-denied(reason)`, the only auth message the JS client reads.
pub fn encode_permission_denied(reason: &str) -> Vec<u8> {
    let mut enc = EncoderV1::new();
    enc.write_var(MSG_AUTH);
    enc.write_var(0u8);
    enc.write_string(reason);
    enc.to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use yrs::{Doc, GetString, ReadTxn, Text, Transact};

    fn hex(s: &str) -> Vec<u8> {
        s.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect()
    }

    #[test]
    fn encodes_the_reference_bytes() {
        assert_eq!(
            encode_sync_step1(&StateVector::default()),
            hex("00 00 01 00")
        );
        let empty = Doc::new()
            .transact()
            .encode_state_as_update_v1(&StateVector::default());
        assert_eq!(encode_sync_step2(&empty), hex("00 01 02 00 00"));
        assert_eq!(encode_permission_denied("no"), hex("02 00 02 6e 6f"));
    }

    #[test]
    fn decodes_reference_update_and_awareness() {
        let frame = hex("00 02 0c 01 01 01 00 04 01 01 74 02 68 69 00");
        let msgs = decode_frame(&frame).unwrap();
        let Ok([ClientMessage::Update(u)]) = <[ClientMessage; 1]>::try_from(msgs) else {
            panic!("expected one update");
        };
        let doc = Doc::new();
        let text = doc.get_or_insert_text("t");
        doc.transact_mut().apply_update(u).unwrap();
        assert_eq!(text.get_string(&doc.transact()), "hi");

        let aw = hex("01 10 01 01 01 0c 7b 22 75 73 65 72 22 3a 22 61 22 7d");
        let msgs = decode_frame(&aw).unwrap();
        let [ClientMessage::Awareness(a)] = msgs.as_slice() else {
            panic!("expected awareness, got {msgs:?}");
        };
        let entry = a.clients.values().next().unwrap();
        assert_eq!(&*entry.json, r#"{"user":"a"}"#);
        assert_eq!(encode_awareness(a), aw);
    }

    #[test]
    fn decodes_several_messages_in_one_frame() {
        let mut frame = hex("00 00 01 00");
        frame.extend(hex("03"));
        frame.extend(hex("01 08 01 01 01 04 6e 75 6c 6c"));
        let msgs = decode_frame(&frame).unwrap();
        assert_eq!(msgs.len(), 3);
        assert!(matches!(msgs[0], ClientMessage::SyncStep1(_)));
        assert!(matches!(msgs[1], ClientMessage::QueryAwareness));
        assert!(matches!(msgs[2], ClientMessage::Awareness(_)));
    }

    #[test]
    fn rejects_defective_frames() {
        assert!(matches!(decode_frame(&[]), Err(ProtocolError::EmptyFrame)));
        // Truncated update: the length prefix promises 12 bytes, 3 follow.
        assert!(matches!(
            decode_frame(&hex("00 02 0c 01 01 01")),
            Err(ProtocolError::Malformed { .. })
        ));
        // A whole message followed by the first byte of another.
        assert!(decode_frame(&hex("00 00 01 00 00")).is_err());
        assert!(matches!(
            decode_frame(&hex("07 00")),
            Err(ProtocolError::UnknownMessageType(7))
        ));
        assert!(matches!(
            decode_frame(&hex("00 05 00")),
            Err(ProtocolError::UnknownSyncType(5))
        ));
        // A length prefix of 2^35 bytes must be refused, not allocated.
        assert!(decode_frame(&hex("00 02 80 80 80 80 80 01 00")).is_err());
        // Awareness JSON that would break every browser's JSON.parse.
        let bad = hex("01 08 01 01 01 04 7b 7b 7b 7b");
        assert!(matches!(
            decode_frame(&bad),
            Err(ProtocolError::InvalidAwarenessJson { client: 1 })
        ));
    }

    #[test]
    fn random_bytes_never_panic() {
        // A cheap deterministic generator keeps this test reproducible without a dependency.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for len in 0..2000usize {
            let frame: Vec<u8> = (0..len % 64)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = decode_frame(&frame);
        }
    }

    #[test]
    fn a_batch_of_updates_is_one_message() {
        let doc = Doc::new();
        let text = doc.get_or_insert_text("t");
        let updates: Vec<Vec<u8>> = ["a", "b", "c"]
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut txn = doc.transact_mut();
                text.insert(&mut txn, i as u32, s);
                txn.encode_update_v1()
            })
            .collect();
        let msgs = decode_frame(&encode_updates(&updates)).unwrap();
        let Ok([ClientMessage::Update(u)]) = <[ClientMessage; 1]>::try_from(msgs) else {
            panic!("expected one update message");
        };
        let other = Doc::new();
        let t = other.get_or_insert_text("t");
        other.transact_mut().apply_update(u).unwrap();
        assert_eq!(t.get_string(&other.transact()), "abc");
    }

    #[test]
    fn a_real_edit_roundtrips() {
        let doc = Doc::new();
        let text = doc.get_or_insert_text("t");
        let mut txn = doc.transact_mut();
        text.insert(&mut txn, 0, "hello");
        let update = txn.encode_update_v1();
        drop(txn);
        let msgs = decode_frame(&encode_update(&update)).unwrap();
        assert!(matches!(msgs.as_slice(), [ClientMessage::Update(_)]));
        assert!(msgs[0].is_document_write());
    }
}
