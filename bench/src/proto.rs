//! Just enough of the y-websocket wire format for a light load generator: message builders and a
//! frame classifier that never decodes a document. Readers learn which edits a broadcast carries
//! from the update's struct headers (client id, first clock, length of each struct).

/// `SyncStep1` with an empty state vector (what a fresh client sends).
pub const SYNC_STEP1_EMPTY: [u8; 4] = [0, 0, 1, 0];
/// `SyncStep2` carrying an empty update (a fresh client's answer to the server's SyncStep1).
pub const SYNC_STEP2_EMPTY: [u8; 5] = [0, 1, 2, 0, 0];

pub fn write_var(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

pub fn read_var(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut n: u64 = 0;
    let mut shift = 0u32;
    loop {
        let b = *buf.get(*pos)?;
        *pos += 1;
        if shift > 56 {
            return None;
        }
        n |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(n);
        }
        shift += 7;
    }
}

fn read_bytes<'a>(buf: &'a [u8], pos: &mut usize) -> Option<&'a [u8]> {
    let len = usize::try_from(read_var(buf, pos)?).ok()?;
    let end = pos.checked_add(len)?;
    let s = buf.get(*pos..end)?;
    *pos = end;
    Some(s)
}

/// `sync / Update` message around a v1 update.
pub fn update_message(update: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(update.len() + 8);
    m.push(0);
    m.push(2);
    write_var(&mut m, update.len() as u64);
    m.extend_from_slice(update);
    m
}

/// Awareness message announcing one client with a JSON state.
pub fn awareness_message(client_id: u64, clock: u64, json: &str) -> Vec<u8> {
    let mut inner = Vec::with_capacity(json.len() + 16);
    write_var(&mut inner, 1);
    write_var(&mut inner, client_id);
    write_var(&mut inner, clock);
    write_var(&mut inner, json.len() as u64);
    inner.extend_from_slice(json.as_bytes());
    let mut m = Vec::with_capacity(inner.len() + 4);
    m.push(1);
    write_var(&mut m, inner.len() as u64);
    m.extend_from_slice(&inner);
    m
}

/// One y-protocols message inside a frame, payload borrowed.
#[derive(Debug, PartialEq, Eq)]
pub enum Msg<'a> {
    SyncStep1,
    SyncStep2(&'a [u8]),
    Update(&'a [u8]),
    /// The awareness update (entry count, then client id, clock and JSON state per entry).
    Awareness(&'a [u8]),
    Other,
}

/// Which dialect of the protocol the server speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Protocol {
    /// y-websocket: the room is the URL path, one message per frame.
    Y,
    /// Hocuspocus: every message starts with the document name (varString); the client first
    /// sends an Auth token message and the server holds back everything else of that document
    /// until it has answered with Authenticated (checked against @hocuspocus/server 3.4.4,
    /// ClientConnection.ts and MessageReceiver.ts).
    Hocuspocus,
    /// y-sweet 0.9: y-websocket messages, but a document lives at `/d/{doc}/ws/{doc}` and is
    /// created first with `POST /doc/new {"docId": …}` (as its JS client does through the app).
    YSweet,
}

impl Protocol {
    /// WebSocket URL of document `doc` on the server at `base` (`ws://host:port`).
    pub fn doc_url(self, base: &str, doc: &str) -> String {
        match self {
            Protocol::YSweet => format!("{base}/d/{doc}/ws/{doc}"),
            Protocol::Y | Protocol::Hocuspocus => format!("{base}/{doc}"),
        }
    }
}

/// How one connection wraps and unwraps messages for one document.
#[derive(Clone, Debug)]
pub struct Framing {
    pub protocol: Protocol,
    /// varString(document name) for hocuspocus, empty for y-websocket.
    prefix: Vec<u8>,
    pub doc: String,
}

/// Hocuspocus message types beyond y-websocket's 0–3 (@hocuspocus/server src/types.ts).
const HP_SYNC_REPLY: u64 = 4;
const HP_STATELESS: u64 = 5;
const HP_BROADCAST_STATELESS: u64 = 6;
const HP_CLOSE: u64 = 7;
const HP_SYNC_STATUS: u64 = 8;

impl Framing {
    pub fn new(protocol: Protocol, doc: &str) -> Framing {
        let mut prefix = Vec::new();
        if protocol == Protocol::Hocuspocus {
            write_var(&mut prefix, doc.len() as u64);
            prefix.extend_from_slice(doc.as_bytes());
        }
        Framing {
            protocol,
            prefix,
            doc: doc.to_string(),
        }
    }

    /// One outgoing frame around one y-protocols message.
    pub fn frame(&self, msg: &[u8]) -> Vec<u8> {
        if self.prefix.is_empty() {
            return msg.to_vec();
        }
        let mut v = Vec::with_capacity(self.prefix.len() + msg.len());
        v.extend_from_slice(&self.prefix);
        v.extend_from_slice(msg);
        v
    }

    /// Frames a client sends before SyncStep1: hocuspocus's Auth(Token, "") (what
    /// HocuspocusProvider sends without a token), nothing for y-websocket.
    pub fn hello(&self) -> Option<Vec<u8>> {
        (self.protocol == Protocol::Hocuspocus).then(|| self.frame(&[2, 0, 0]))
    }

    /// Calls `f` for each message of a frame; false when the frame is malformed.
    pub fn messages<'a>(&self, frame: &'a [u8], f: impl FnMut(Msg<'a>)) -> bool {
        match self.protocol {
            Protocol::Y | Protocol::YSweet => for_each_message(frame, f),
            Protocol::Hocuspocus => hocuspocus_message(frame, f),
        }
    }
}

/// A hocuspocus frame: document name, then exactly one message.
fn hocuspocus_message<'a>(frame: &'a [u8], mut f: impl FnMut(Msg<'a>)) -> bool {
    let mut pos = 0;
    if read_bytes(frame, &mut pos).is_none() {
        return false;
    }
    let Some(kind) = read_var(frame, &mut pos) else {
        return false;
    };
    let ok = match kind {
        0 | HP_SYNC_REPLY => {
            let (Some(sub), Some(payload)) =
                (read_var(frame, &mut pos), read_bytes(frame, &mut pos))
            else {
                return false;
            };
            f(sync_msg(sub, payload));
            true
        }
        1 => match read_bytes(frame, &mut pos) {
            Some(p) => {
                f(Msg::Awareness(p));
                true
            }
            None => false,
        },
        2 => {
            // Token request (0) has no string; PermissionDenied (1) and Authenticated (2) do.
            let ok = match read_var(frame, &mut pos) {
                Some(0) => true,
                Some(_) => read_bytes(frame, &mut pos).is_some(),
                None => false,
            };
            f(Msg::Other);
            ok
        }
        3 => {
            f(Msg::Other);
            true
        }
        HP_STATELESS | HP_BROADCAST_STATELESS | HP_CLOSE => {
            f(Msg::Other);
            read_bytes(frame, &mut pos).is_some()
        }
        HP_SYNC_STATUS => {
            f(Msg::Other);
            read_var(frame, &mut pos).is_some()
        }
        _ => {
            f(Msg::Other);
            true
        }
    };
    ok
}

fn sync_msg(sub: u64, payload: &[u8]) -> Msg<'_> {
    match sub {
        0 => Msg::SyncStep1,
        1 => Msg::SyncStep2(payload),
        2 => Msg::Update(payload),
        _ => Msg::Other,
    }
}

/// Calls `f` for each message of a y-websocket frame (servers send one per frame; several are
/// tolerated). Returns false when the frame is malformed.
pub fn for_each_message<'a>(frame: &'a [u8], mut f: impl FnMut(Msg<'a>)) -> bool {
    let mut pos = 0;
    while pos < frame.len() {
        let Some(kind) = read_var(frame, &mut pos) else {
            return false;
        };
        match kind {
            0 => {
                let Some(sub) = read_var(frame, &mut pos) else {
                    return false;
                };
                let Some(payload) = read_bytes(frame, &mut pos) else {
                    return false;
                };
                f(sync_msg(sub, payload));
            }
            1 => {
                let Some(p) = read_bytes(frame, &mut pos) else {
                    return false;
                };
                f(Msg::Awareness(p));
            }
            2 => {
                // auth: sub-type then a reason string
                if read_var(frame, &mut pos).is_none() || read_bytes(frame, &mut pos).is_none() {
                    return false;
                }
                f(Msg::Other);
            }
            3 => f(Msg::Other),
            _ => {
                f(Msg::Other);
                return true;
            }
        }
    }
    true
}

/// Calls `f(client, clock)` for each entry of an awareness update; false when malformed.
pub fn awareness_entries(update: &[u8], mut f: impl FnMut(u64, u64)) -> bool {
    let mut pos = 0;
    let Some(n) = read_var(update, &mut pos) else {
        return false;
    };
    for _ in 0..n {
        let (Some(client), Some(clock)) = (read_var(update, &mut pos), read_var(update, &mut pos))
        else {
            return false;
        };
        if read_bytes(update, &mut pos).is_none() {
            return false;
        }
        f(client, clock);
    }
    true
}

/// Length in clocks (UTF-16 code units) of a UTF-8 string, without validating it.
fn utf16_len(s: &[u8]) -> u64 {
    let mut n = 0;
    for &b in s {
        if b & 0xC0 != 0x80 {
            n += if b >= 0xF0 { 2 } else { 1 };
        }
    }
    n
}

/// Walks the struct headers of a v1 update and calls `f(client, first_clock, length)` for each
/// struct. Understands GC, Skip and the item contents a text editor produces (string, deleted,
/// embed, format, binary, JSON); anything else returns false and the frame counts as unparsed.
pub fn update_ranges(update: &[u8], mut f: impl FnMut(u64, u64, u64)) -> bool {
    let mut pos = 0;
    let Some(clients) = read_var(update, &mut pos) else {
        return false;
    };
    for _ in 0..clients {
        let (Some(structs), Some(client), Some(mut clock)) = (
            read_var(update, &mut pos),
            read_var(update, &mut pos),
            read_var(update, &mut pos),
        ) else {
            return false;
        };
        for _ in 0..structs {
            let Some(&info) = update.get(pos) else {
                return false;
            };
            pos += 1;
            let len = match info & 0x1f {
                0 | 10 => {
                    // GC or Skip: a length
                    let Some(l) = read_var(update, &mut pos) else {
                        return false;
                    };
                    l
                }
                content => {
                    if info & 0x80 != 0
                        && (read_var(update, &mut pos).is_none()
                            || read_var(update, &mut pos).is_none())
                    {
                        return false;
                    }
                    if info & 0x40 != 0
                        && (read_var(update, &mut pos).is_none()
                            || read_var(update, &mut pos).is_none())
                    {
                        return false;
                    }
                    if info & 0xC0 == 0 {
                        match read_var(update, &mut pos) {
                            Some(1) => {
                                if read_bytes(update, &mut pos).is_none() {
                                    return false;
                                }
                            }
                            Some(0) => {
                                if read_var(update, &mut pos).is_none()
                                    || read_var(update, &mut pos).is_none()
                                {
                                    return false;
                                }
                            }
                            _ => return false,
                        }
                        if info & 0x20 != 0 && read_bytes(update, &mut pos).is_none() {
                            return false;
                        }
                    }
                    match content {
                        1 => match read_var(update, &mut pos) {
                            Some(l) => l,
                            None => return false,
                        },
                        2 => {
                            let Some(n) = read_var(update, &mut pos) else {
                                return false;
                            };
                            for _ in 0..n {
                                if read_bytes(update, &mut pos).is_none() {
                                    return false;
                                }
                            }
                            n
                        }
                        3 | 5 => {
                            if read_bytes(update, &mut pos).is_none() {
                                return false;
                            }
                            1
                        }
                        4 => match read_bytes(update, &mut pos) {
                            Some(s) => utf16_len(s),
                            None => return false,
                        },
                        6 => {
                            if read_bytes(update, &mut pos).is_none()
                                || read_bytes(update, &mut pos).is_none()
                            {
                                return false;
                            }
                            1
                        }
                        _ => return false,
                    }
                }
            };
            f(client, clock, len);
            clock += len;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use yrs::{Doc, ReadTxn, Text, Transact};

    #[test]
    fn varints() {
        for (n, bytes) in [
            (127u64, vec![0x7f]),
            (128, vec![0x80, 1]),
            (300, vec![0xac, 2]),
        ] {
            let mut v = Vec::new();
            write_var(&mut v, n);
            assert_eq!(v, bytes);
            let mut p = 0;
            assert_eq!(read_var(&v, &mut p), Some(n));
        }
    }

    #[test]
    fn reference_bytes() {
        assert_eq!(
            awareness_message(1, 1, r#"{"user":"a"}"#),
            [
                0x01, 0x10, 0x01, 0x01, 0x01, 0x0c, 0x7b, 0x22, 0x75, 0x73, 0x65, 0x72, 0x22, 0x3a,
                0x22, 0x61, 0x22, 0x7d
            ]
        );
        let hi = [
            0x00, 0x02, 0x0c, 0x01, 0x01, 0x01, 0x00, 0x04, 0x01, 0x01, 0x74, 0x02, 0x68, 0x69,
            0x00,
        ];
        let mut seen = Vec::new();
        assert!(for_each_message(&hi, |m| seen.push(format!("{m:?}"))));
        assert_eq!(seen.len(), 1);
        let mut ranges = Vec::new();
        assert!(update_ranges(&hi[3..], |c, k, l| ranges.push((c, k, l))));
        assert_eq!(ranges, vec![(1, 0, 2)]);
    }

    #[test]
    fn hocuspocus_framing() {
        let fr = Framing::new(Protocol::Hocuspocus, "doc");
        // Auth token "" as HocuspocusProvider.sendToken writes it: name, Auth, Token, "".
        assert_eq!(fr.hello().unwrap(), [3, b'd', b'o', b'c', 2, 0, 0]);
        assert_eq!(
            fr.frame(&SYNC_STEP1_EMPTY),
            [3, b'd', b'o', b'c', 0, 0, 1, 0]
        );
        let mut seen = Vec::new();
        // SyncReply (4) carrying SyncStep1, as the server answers a client's SyncStep1.
        assert!(fr.messages(&[3, b'd', b'o', b'c', 4, 0, 1, 0], |m| seen
            .push(format!("{m:?}"))));
        // Authenticated "read-write", then SyncStatus(true).
        let mut auth = vec![3, b'd', b'o', b'c', 2, 2, 10];
        auth.extend_from_slice(b"read-write");
        assert!(fr.messages(&auth, |m| seen.push(format!("{m:?}"))));
        assert!(fr.messages(&[3, b'd', b'o', b'c', 8, 1], |m| seen
            .push(format!("{m:?}"))));
        let aw = fr.frame(&awareness_message(5, 9, "{}"));
        assert!(fr.messages(&aw, |m| {
            if let Msg::Awareness(p) = m {
                let mut e = Vec::new();
                assert!(awareness_entries(p, |c, k| e.push((c, k))));
                assert_eq!(e, vec![(5, 9)]);
            }
            seen.push(format!("{m:?}").chars().take(9).collect())
        }));
        assert_eq!(seen, ["SyncStep1", "Other", "Other", "Awareness"]);
        let y = Framing::new(Protocol::Y, "doc");
        assert!(y.hello().is_none());
        assert_eq!(y.frame(&SYNC_STEP1_EMPTY), SYNC_STEP1_EMPTY);
    }

    #[test]
    fn yrs_updates_parse() {
        let doc = Doc::with_client_id(77);
        let text = doc.get_or_insert_text("t");
        for i in 0..300u32 {
            let mut txn = doc.transact_mut();
            let len = text.len(&txn);
            let pos = if i % 7 == 0 { len / 2 } else { len };
            // One character per update, as the fanout writer sends; deletions only add a
            // delete set, which the parser must skip.
            text.insert(&mut txn, pos, if i % 5 == 0 { "y" } else { "x" });
            if i % 11 == 0 && len > 3 {
                text.remove_range(&mut txn, 1, 2);
            }
            let u = txn.encode_update_v1();
            let mut ranges = Vec::new();
            assert!(
                update_ranges(&u, |c, k, l| ranges.push((c, k, l))),
                "update {i}"
            );
            assert_eq!(ranges, vec![(77, u64::from(i), 1)], "update {i}");
        }
        let full = doc
            .transact()
            .encode_state_as_update_v1(&Default::default());
        let mut total = 0;
        assert!(update_ranges(&full, |_, _, l| total += l));
        assert_eq!(total, 300);
    }
}
