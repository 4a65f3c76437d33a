//! Awareness (presence) across instances over Redis pub/sub, one channel per document.
//!
//! Awareness is soft state: a message lost while Redis is away is repaired by the clients'
//! own renewals (every 15 s in y-protocols), so pub/sub's at-most-once delivery is enough.
//! A message is `kind ‖ instance id length ‖ instance id ‖ body`; kind 0 carries a y-protocols
//! awareness message, kind 1 asks the other instances for their full awareness (sent when a
//! document loads, so its first joiners see everyone at once).

use std::sync::Arc;

use actix_web::web::Bytes;
use redis::aio::ConnectionManager;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;
use tracing::debug;

use super::keys;
use super::reader::Subscriptions;
use super::RemoteEvent;

pub const UPDATE: u8 = 0;
pub const QUERY: u8 = 1;

pub fn encode(kind: u8, instance: &str, body: &[u8]) -> Vec<u8> {
    let id = instance.as_bytes();
    let mut out = Vec::with_capacity(2 + id.len() + body.len());
    out.push(kind);
    out.push(id.len() as u8);
    out.extend_from_slice(id);
    out.extend_from_slice(body);
    out
}

/// `(kind, instance, body)`.
fn decode(msg: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&kind, rest) = msg.split_first()?;
    let (&len, rest) = rest.split_first()?;
    let len = usize::from(len);
    if rest.len() < len {
        return None;
    }
    let (id, body) = rest.split_at(len);
    Some((kind, id, body))
}

pub enum Control {
    Subscribe(Arc<str>),
    Unsubscribe(Arc<str>),
}

/// Applies (un)subscriptions in the order they were asked for. The connection manager
/// subscribes again by itself after a reconnect.
pub async fn control(mut rx: mpsc::UnboundedReceiver<Control>, mut conn: ConnectionManager) {
    while let Some(c) = rx.recv().await {
        let r = match &c {
            Control::Subscribe(name) => conn.subscribe(keys::awareness(name)).await,
            Control::Unsubscribe(name) => conn.unsubscribe(keys::awareness(name)).await,
        };
        if let Err(e) = r {
            debug!(error = %e, "awareness (un)subscription failed");
        }
    }
}

/// Routes published awareness to the documents loaded here.
pub async fn route(
    mut pushes: mpsc::UnboundedReceiver<PushInfo>,
    subs: Arc<Subscriptions>,
    instance: Arc<str>,
) {
    while let Some(push) = pushes.recv().await {
        if push.kind != PushKind::Message {
            continue;
        }
        let [Value::BulkString(channel), Value::BulkString(msg)] = push.data.as_slice() else {
            continue;
        };
        let Some(name) = std::str::from_utf8(channel)
            .ok()
            .and_then(|c| keys::doc_of(c, ":aw"))
        else {
            continue;
        };
        let Some((kind, from, body)) = decode(msg) else {
            continue;
        };
        if from == instance.as_bytes() {
            continue;
        }
        if let Some(to) = subs.recipient(name) {
            let event = match kind {
                UPDATE => RemoteEvent::Awareness(Bytes::copy_from_slice(body)),
                QUERY => RemoteEvent::AwarenessQuery,
                _ => continue,
            };
            to.do_send(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let m = encode(UPDATE, "inst-1", b"\x01\x02");
        assert_eq!(decode(&m), Some((UPDATE, &b"inst-1"[..], &b"\x01\x02"[..])));
        assert_eq!(decode(&[0, 9, 1]), None);
    }
}
