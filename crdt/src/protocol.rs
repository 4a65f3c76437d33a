//! The y-websocket wire protocol (y-protocols sync + awareness over lib0 encoding).
//!
//! Decoding is strict: a frame must consist of whole, well-formed messages. yrs's own
//! `MessageReader` stops silently at a truncated message, which would let a client believe an
//! edit was delivered when it was dropped, so this module walks the frame itself.

use std::panic::{catch_unwind, AssertUnwindSafe};

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
    /// A client id past 53 bits or a clock range past 2^32: yrs asserts against them in debug
    /// builds and wraps them in release ones.
    #[error("{what} message has a client id or clock out of range")]
    OutOfRange { what: &'static str },
    #[error("{what} message declares more entries than its bytes can hold")]
    CountTooLarge { what: &'static str },
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
        // yrs's decoders assert (in debug builds) that client ids fit in 53 bits and that clock
        // ranges do not pass 2^32; such a panic is a refused frame, not a crashed task.
        let msg = catch_unwind(AssertUnwindSafe(|| decode_message(&mut cur)))
            .unwrap_or(Err(ProtocolError::OutOfRange { what: "frame" }))?;
        out.push(msg);
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
                    // Each entry is a client and a clock, a byte each at least.
                    check_counts(buf, &[2], "sync step 1")?;
                    let sv = StateVector::decode_v1(buf).map_err(malformed("sync step 1"))?;
                    Ok(ClientMessage::SyncStep1(sv))
                }
                SYNC_STEP_2 => {
                    let buf = cur.read_buf().map_err(malformed("sync step 2"))?;
                    Ok(ClientMessage::SyncStep2(decode_update(buf, "sync step 2")?))
                }
                SYNC_UPDATE => {
                    let buf = cur.read_buf().map_err(malformed("update"))?;
                    Ok(ClientMessage::Update(decode_update(buf, "update")?))
                }
                other => Err(ProtocolError::UnknownSyncType(other)),
            }
        }
        MSG_AWARENESS => {
            let buf = cur.read_buf().map_err(malformed("awareness"))?;
            // Each entry is a client, a clock and a JSON string, a byte each at least.
            check_counts(buf, &[3], "awareness")?;
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

/// Refuses a payload whose leading counts declare more entries than its bytes can hold. yrs
/// reserves room for the declared count before reading the entries; a hash map reservation
/// writes its control bytes, so a 6-byte message declaring 2^28 entries made the server touch
/// 512 MiB (found by the fuzzer). `min_bytes[i]` is the least size of one entry of the i-th
/// count, each count read right after the one before (the first counts of the format).
fn check_counts(buf: &[u8], min_bytes: &[u64], what: &'static str) -> Result<(), ProtocolError> {
    let mut cur = Cursor::new(buf);
    for (i, &min) in min_bytes.iter().enumerate() {
        // A truncated payload is left to the decoder, which reports it.
        let Ok(count) = cur.read_var::<u64>() else {
            return Ok(());
        };
        let left = (buf.len() - cur.next) as u64;
        if count > left / min {
            return Err(ProtocolError::CountTooLarge { what });
        }
        // Only the first entry's own count follows directly: the client count's first entry
        // starts with its block count.
        if count == 0 || i + 1 == min_bytes.len() {
            break;
        }
    }
    Ok(())
}

/// Decodes an update whose clock ranges stay within `u32`. yrs computes a range's end as
/// `clock + len`: past 2^32 that panics in a debug build and wraps in a release one, leaving an
/// inverted range for the document to trip over (found by the fuzzer).
fn decode_update(buf: &[u8], what: &'static str) -> Result<Update, ProtocolError> {
    // The number of clients (each a block count, a client and a clock), then the first client's
    // block count (a byte per block at least).
    check_counts(buf, &[3, 1], what)?;
    let checked = catch_unwind(|| {
        let u = Update::decode_v1(buf)?;
        let sane = |set: &yrs::IdSet| {
            set.iter()
                .all(|(_, ranges)| ranges.iter().all(|r| r.start <= r.end))
        };
        let ok = sane(u.delete_set()) && sane(&u.insertions(true));
        // The upper state vector adds each client's last block length to its clock.
        let _ = u.state_vector();
        Ok((u, ok))
    });
    match checked {
        Ok(Ok((u, true))) => Ok(u),
        Ok(Err(source)) => Err(ProtocolError::Malformed { what, source }),
        Ok(Ok((_, false))) | Err(_) => Err(ProtocolError::OutOfRange { what }),
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
        // A delete range whose end passes 2^32 (clock 0xffffffff, length 2).
        assert!(matches!(
            decode_frame(&hex("00 02 0a 00 01 01 01 ff ff ff ff 0f 02")),
            Err(ProtocolError::OutOfRange { what: "update" })
        ));
        // Counts larger than the bytes that follow: 2^28 state vector entries, 2^28 awareness
        // clients, 2^28 update clients, and 2^28 blocks of the first client.
        for (frame, what) in [
            ("00 00 04 80 80 80 01", "sync step 1"),
            ("01 04 80 80 80 01", "awareness"),
            ("00 02 04 80 80 80 01", "update"),
            ("00 02 07 01 80 80 80 01 01 00", "update"),
        ] {
            assert!(
                matches!(decode_frame(&hex(frame)), Err(ProtocolError::CountTooLarge { what: w }) if w == what),
                "{frame}"
            );
        }
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
