//! Sending to one connection or to all of a document's: straight into a socket that is ready
//! (`ws::direct`), else into the connection's bounded queue.

use std::sync::Arc;

use actix::prelude::*;
use actix_web::web::Bytes;
use tracing::warn;
use uuid::Uuid;

use super::{Conn, DocActor};
use crate::doc::messages::Outgoing;
use crate::doc::outbox;
use crate::telemetry::{Kind, METRICS};
use crate::ws::close::CloseCode;
use crate::ws::direct::{Direct, Framed, Offer};

/// What became of a message offered to one connection.
enum Sent {
    /// Written into the socket, or queued for it.
    Queued,
    /// Its queue is full: the client is too slow.
    Full,
    /// It is closing.
    Closed,
}

/// Writes `msg` straight into the connection's socket when it is ready (`ws::direct`), else
/// queues it.
fn offer(c: &Conn, msg: &Framed) -> Sent {
    let queued = match c.direct.as_ref().map(|d| d.offer(msg)) {
        Some(Offer::Written) => return Sent::Queued,
        // The session sends the rest before anything queued after it.
        Some(Offer::Partial) => Direct::tail_marker(),
        // Cloned only here: a direct write needs no reference of its own.
        Some(Offer::Queue) | None => msg.payload().clone(),
    };
    match c.tx.try_send(queued) {
        Ok(()) => Sent::Queued,
        Err(outbox::TrySendError::Full(_)) => Sent::Full,
        Err(outbox::TrySendError::Closed(_)) => Sent::Closed,
    }
}

impl DocActor {
    /// Queues `bytes` for one connection; a full queue disconnects it rather than buffering
    /// without bound or silently skipping a message.
    pub(super) fn send_to(
        &mut self,
        conn: Uuid,
        bytes: Bytes,
        kind: Kind,
        ctx: &mut Context<Self>,
    ) {
        let len = bytes.len() as u64;
        if self.send_shared(conn, Arc::new(bytes), ctx) {
            METRICS.messages_sent.get(kind).inc();
            METRICS.bytes_sent.get(kind).inc_by(len);
        }
    }

    /// Whether the message was queued.
    pub(super) fn send_shared(
        &mut self,
        conn: Uuid,
        bytes: Outgoing,
        ctx: &mut Context<Self>,
    ) -> bool {
        let Some(c) = self.conns.get(&conn) else {
            return false;
        };
        match offer(c, &Framed::new(bytes)) {
            Sent::Queued => return true,
            Sent::Full => self.lost(conn, true, ctx),
            Sent::Closed => self.lost(conn, false, ctx),
        }
        false
    }

    pub(super) fn broadcast(&mut self, bytes: Bytes, kind: Kind, ctx: &mut Context<Self>) {
        let len = bytes.len() as u64;
        let msg = Framed::new(Arc::new(bytes));
        let mut sent = 0;
        let mut lost = Vec::new();
        for (id, c) in self.conns.iter() {
            match offer(c, &msg) {
                Sent::Queued => sent += 1,
                Sent::Full => lost.push((*id, true)),
                Sent::Closed => lost.push((*id, false)),
            }
        }
        // Dropped after the walk: a removal may broadcast (awareness) and changes the list.
        for (id, full) in lost {
            self.lost(id, full, ctx);
        }
        // Counted once per broadcast, not per recipient: two adds however many readers.
        METRICS.messages_sent.get(kind).inc_by(sent);
        METRICS.bytes_sent.get(kind).inc_by(sent * len);
    }

    /// A connection whose queue is full or closed: a full queue disconnects it rather than
    /// buffering without bound or silently skipping a message.
    fn lost(&mut self, conn: Uuid, full: bool, ctx: &mut Context<Self>) {
        if let Some(c) = self.conns.get(&conn).filter(|_| full) {
            warn!(doc = %self.name, conn = %conn, "outbound queue full, disconnecting slow client");
            c.kick
                .kick(CloseCode::Again, "client too slow, reconnect to resync");
        }
        self.drop_conn(conn, ctx);
    }
}
