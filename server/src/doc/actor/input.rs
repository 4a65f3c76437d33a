//! Input from a connection: the messages of one frame, applied in order.

use std::time::Instant;

use actix::prelude::*;
use actix_web::web::Bytes;
use collab_crdt::{ClientMessage, StateVector, Update};
use tracing::warn;
use uuid::Uuid;

use super::{ApplyFailure, DocActor, Pending};
use crate::counters::count;
use crate::doc::messages::{ack_message, Incoming, Violation};
use crate::telemetry::{Kind, Refusal, METRICS};

impl DocActor {
    /// A read-only connection sent a document change: it is dropped here, before anything is
    /// applied, stored or broadcast. The connection stays open, since a closed one would only
    /// reconnect and send the same change again. A sync answer that repeats what the document
    /// already holds is not a refusal.
    /// Returns whether the update would have changed the document (and so was refused).
    fn refuse_write(&mut self, conn: Uuid, update: &Update) -> bool {
        let new = self
            .document
            .as_ref()
            .is_some_and(|d| d.carries_new(update));
        let Some(c) = self.conns.get_mut(&conn) else {
            return new;
        };
        if !new {
            return false;
        }
        c.refused += 1;
        METRICS.update_refused(Refusal::ReadOnly);
        if c.refused == 1 {
            warn!(doc = %self.name, conn = %conn, "refused a document change from a read-only connection; later ones are counted");
        }
        true
    }

    /// Applies one message; returns the bytes of the answer queued for `conn`, if any.
    fn handle_message(
        &mut self,
        conn: Uuid,
        msg: ClientMessage,
        frame_bytes: usize,
        received: Instant,
        ctx: &mut Context<Self>,
    ) -> Result<usize, Violation> {
        let Some(doc) = self.document.as_mut() else {
            return Err(Violation::Unavailable("not loaded".into()));
        };
        match msg {
            ClientMessage::SyncStep1(sv) => {
                let bytes = if sv == StateVector::default() {
                    doc.full_sync_step2()
                } else {
                    Bytes::from(doc.sync_step2_message(&sv))
                };
                let len = bytes.len();
                if let Some(c) = self.conns.get_mut(&conn) {
                    if !c.synced_once {
                        c.synced_once = true;
                        METRICS.first_sync_bytes.observe(len as f64);
                    }
                }
                self.release_step2(conn, bytes, ctx);
                return Ok(len);
            }
            ClientMessage::SyncStep2(update) | ClientMessage::Update(update)
                if self.conns.get(&conn).is_some_and(|c| c.read_only) =>
            {
                let refused = self.refuse_write(conn, &update);
                // A sync answer that brings nothing new was not refused (Hocuspocus says 1).
                self.ack(conn, !refused, ctx);
            }
            ClientMessage::SyncStep2(update) | ClientMessage::Update(update) => {
                self.check_document_size(frame_bytes)?;
                match self.apply(update, received, ctx) {
                    Ok(_) => self.ack(conn, true, ctx),
                    Err(ApplyFailure::Storage) => {
                        return Err(Violation::Unavailable("storage failure".into()))
                    }
                    Err(ApplyFailure::Rejected(e)) => {
                        METRICS.update_refused(Refusal::Malformed);
                        warn!(doc = %self.name, conn = %conn, error = %e, "update rejected; rebuilding document from storage");
                        return Err(Violation::UpdateRejected(e));
                    }
                }
            }
            ClientMessage::Awareness(update) => {
                let max_bytes = self.registry.config().max_awareness_bytes;
                if update.clients.values().any(|e| e.json.len() > max_bytes) {
                    count(|c| &c.awareness_too_large);
                    return Err(Violation::AwarenessTooLarge(max_bytes));
                }
                let limit = self.registry.config().max_awareness_per_connection;
                let c = self.conns.get(&conn);
                let owned = c.map_or(0, |c| c.awareness.len());
                let new = update
                    .clients
                    .keys()
                    .filter(|id| c.is_none_or(|c| c.awareness.binary_search(id).is_err()))
                    .count();
                if owned + new > limit {
                    return Err(Violation::TooManyAwarenessClients(limit));
                }
                if let Some(change) = doc.apply_awareness(update) {
                    if let Some(c) = self.conns.get_mut(&conn) {
                        for id in &change.announced {
                            if let Err(at) = c.awareness.binary_search(id) {
                                c.awareness.insert(at, *id);
                            }
                        }
                        for id in &change.removed {
                            if let Ok(at) = c.awareness.binary_search(id) {
                                c.awareness.remove(at);
                            }
                        }
                    }
                    let ids: Vec<_> = change.announced.into_iter().chain(change.removed).collect();
                    self.publish_awareness(&ids);
                    self.awareness_changed(ids, ctx);
                }
            }
            ClientMessage::QueryAwareness => {
                if let Some(msg) = doc.awareness_message() {
                    let len = msg.len();
                    self.send_to(conn, Bytes::from(msg), Kind::Awareness, ctx);
                    return Ok(len);
                }
            }
            ClientMessage::Auth => {}
        }
        Ok(0)
    }

    /// Tells a connection that asked for acknowledgements that its change was applied (after
    /// everything pending, so only once it is durable) or refused (at once).
    fn ack(&mut self, conn: Uuid, applied: bool, ctx: &mut Context<Self>) {
        if !self.conns.get(&conn).is_some_and(|c| c.acks) {
            return;
        }
        let ack = ack_message(applied);
        if !applied || self.pending.is_empty() {
            self.send_shared(conn, ack, ctx);
        } else {
            self.pending.push(Pending::Ack(conn, ack));
        }
    }

    /// Applies an update from a client or a backend. What was new is appended to the log and
    /// queued for broadcast once durable; `Ok(false)` when nothing was new.
    pub(super) fn apply(
        &mut self,
        update: Update,
        received: Instant,
        ctx: &mut Context<Self>,
    ) -> Result<bool, ApplyFailure> {
        let Some(doc) = self.document.as_mut() else {
            return Err(ApplyFailure::Storage);
        };
        let started = Instant::now();
        let applied = doc.apply_update(update);
        METRICS
            .apply_seconds
            .observe(started.elapsed().as_secs_f64());
        match applied {
            Ok(None) => Ok(false),
            Ok(Some(diff)) => {
                self.changed_since_armed = true;
                let seq = self.next_seq;
                if let (Some(cluster), Some(f)) = (self.registry.cluster(), &mut self.following) {
                    // Counted for compaction when read back from the stream, with its id.
                    cluster.append(&self.name, &f.origin, diff.clone(), !f.announced);
                    f.announced = true;
                } else {
                    if let Err(e) = self.registry.store().append(&self.name, seq, &diff) {
                        METRICS.storage_errors.inc();
                        self.fail(format!("append failed: {e}"), ctx);
                        return Err(ApplyFailure::Storage);
                    }
                    self.log_count += 1;
                    self.log_bytes += diff.len() as u64;
                }
                self.next_seq += 1;
                self.encoded_estimate += diff.len() as u64;
                METRICS.updates_applied.inc();
                self.pending.push(Pending::Update(diff, received));
                self.request_flush(ctx);
                Ok(true)
            }
            Err(e) => {
                self.reload(ctx);
                Err(ApplyFailure::Rejected(e.to_string()))
            }
        }
    }

    /// Refuses an update of up to `incoming` bytes that could take the document past
    /// `--max-document-bytes`. The running estimate (encoded size at load or compaction plus
    /// every diff since) only grows faster than the real size, so it is exact enough far from
    /// the limit; near it the document is measured, at most once per 1/64 of the limit
    /// written, so a full document cannot make every keystroke re-encode it.
    pub(super) fn check_document_size(&mut self, incoming: usize) -> Result<(), Violation> {
        let max = self.registry.config().max_document_bytes;
        let incoming = incoming as u64;
        if self.encoded_estimate + incoming <= max {
            return Ok(());
        }
        let stale = self.encoded_estimate - self.measured_at;
        if stale > max / 64 || self.measured_at == 0 {
            if let Some(doc) = self.document.as_ref() {
                self.encoded_estimate = doc.encode_state().len() as u64;
                self.measured_at = self.encoded_estimate;
            }
        }
        if self.encoded_estimate + incoming > max {
            count(|c| &c.document_too_large);
            METRICS.update_refused(Refusal::TooLarge);
            warn!(doc = %self.name, size = self.encoded_estimate, incoming, max, "refused an update: document size limit");
            return Err(Violation::DocumentTooLarge(max));
        }
        Ok(())
    }
}

impl Handler<Incoming> for DocActor {
    type Result = Result<usize, Violation>;

    fn handle(&mut self, msg: Incoming, ctx: &mut Self::Context) -> Self::Result {
        if !self.conns.contains_key(&msg.conn) {
            // Dropped (too slow, or the document failed) while this frame was in flight.
            return Err(self.failed.as_deref().map_or(
                Violation::Unavailable("connection was dropped".into()),
                |reason| Violation::Unavailable(reason.to_owned()),
            ));
        }
        let mut replies = 0;
        let mut outcome = Ok(());
        for m in msg.messages {
            match self.handle_message(msg.conn, m, msg.bytes, msg.received, ctx) {
                Ok(n) => replies += n,
                Err(v) => {
                    outcome = Err(v);
                    break;
                }
            }
        }
        self.document_used(ctx);
        outcome.map(|()| replies)
    }
}
