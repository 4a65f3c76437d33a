//! Cluster mode in the document actor: following the document's Redis stream (what other
//! instances appended), compacting under the cluster's lease, and awareness across instances.
//!
//! What arrives from the stream is already durable in Redis, so it is broadcast without a
//! flush of its own; it only waits behind local updates that are still waiting for theirs, so
//! clients see changes in the order this document applied them.

use std::time::Instant;

use actix::prelude::*;
use actix_web::web::Bytes;
use collab_crdt::{protocol, ClientID, ClientMessage, Document, Update};
use tracing::{error, info, warn};
use yrs::updates::decoder::Decode;

use super::{load_doc, DocActor, Pending};
use crate::cluster::{Compacted, EntryKind, RemoteEvent, StreamPos};
use crate::telemetry::{Kind, METRICS};
use crate::ws::close::doc_deleted;

impl DocActor {
    /// After a load: read the stream on from `position`. Does nothing outside cluster mode.
    pub(super) fn follow_stream(&mut self, position: StreamPos, ctx: &mut Context<Self>) {
        let Some(cluster) = self.registry.cluster() else {
            return;
        };
        let origin = self.origin.get_or_insert_with(|| cluster.origin()).clone();
        self.stream_pos = position;
        cluster.register(
            self.name.clone(),
            position,
            origin,
            ctx.address().recipient(),
        );
    }

    /// The compaction policy reads `log_count` and `log_bytes`; in cluster mode they are the
    /// backlog's.
    fn sync_backlog(&mut self) {
        self.log_count = self.backlog.count();
        self.log_bytes = self.backlog.bytes();
    }

    /// Sends local awareness changes to the other instances.
    pub(super) fn publish_awareness(&self, ids: &[ClientID]) {
        let Some(cluster) = self.registry.cluster() else {
            return;
        };
        if let Some(msg) = self
            .document
            .as_ref()
            .and_then(|d| d.awareness_message_for(ids.to_vec()))
        {
            cluster.publish_awareness(&self.name, &msg);
        }
    }

    /// Applies an update another instance appended; what was new goes to this instance's
    /// clients.
    fn apply_remote(&mut self, bytes: &[u8], ctx: &mut Context<Self>) -> bool {
        let Some(doc) = self.document.as_mut() else {
            return true;
        };
        let update = match Update::decode_v1(bytes) {
            Ok(u) => u,
            Err(e) => {
                // Another instance validated it before appending; a stream entry that does not
                // decode is damage, and is skipped like any update the document rejects.
                error!(doc = %self.name, error = %e, "undecodable update in the Redis stream; skipped");
                return true;
            }
        };
        match doc.apply_update(update) {
            Ok(None) => true,
            Ok(Some(diff)) => {
                self.full_state = None;
                self.encoded_estimate += diff.len() as u64;
                if self.pending.is_empty() {
                    let msg = Bytes::from(protocol::encode_update(&diff));
                    self.broadcast(msg, Kind::Update, ctx);
                } else {
                    self.pending.push(Pending::Update(diff, Instant::now()));
                }
                true
            }
            Err(e) => {
                warn!(doc = %self.name, error = %e, "update from the Redis stream rejected; reloading");
                false
            }
        }
    }

    /// Another instance deleted the document: the same as a local delete for the clients here.
    fn deleted_elsewhere(&mut self) {
        let conns: Vec<_> = self.conns.drain().collect();
        for (_, c) in &conns {
            let why = doc_deleted();
            c.kick
                .kick(why.code, why.description.as_deref().unwrap_or_default());
        }
        info!(doc = %self.name, connections = conns.len(), "document deleted by another instance");
        self.document = Some(Document::new());
        self.full_state = None;
        self.backlog.clear();
        self.sync_backlog();
        self.encoded_estimate = 0;
        self.measured_at = 0;
        self.announced = false;
    }

    /// Reads the document again from Redis after this instance fell behind a trim (seen at the
    /// trim marker, or earlier when an update after the gap does not apply), and merges it in: local content not yet in Redis stays, and what was missed goes to the clients.
    fn reload_from_cluster(&mut self, ctx: &mut Context<Self>) {
        METRICS.redis_reloads.inc();
        let registry = self.registry.clone();
        let name = self.name.clone();
        ctx.wait(async move { load_doc(&registry, name).await }.into_actor(self).map(
            |result, act, ctx| match result {
                Ok(loaded) => {
                    let state = loaded.document.encode_state();
                    if !act.apply_remote(&state, ctx) {
                        act.fail("reload from Redis failed to merge".into(), ctx);
                        return;
                    }
                    act.backlog = loaded.backlog;
                    act.sync_backlog();
                    act.snapshot_bytes = loaded.snapshot_bytes;
                    info!(doc = %act.name, position = %loaded.position, "document reloaded from Redis");
                    act.follow_stream(loaded.position, ctx);
                }
                Err(e) => act.fail(format!("reload from Redis failed: {e}"), ctx),
            },
        ));
    }

    /// Writes a snapshot covering the stream up to what this document has read, if no other
    /// instance is compacting it; the stream is trimmed below it.
    pub(super) fn compact_in_cluster(&mut self, ctx: &mut Context<Self>) {
        let (Some(cluster), Some(doc)) = (self.registry.cluster().cloned(), &self.document) else {
            return;
        };
        if self.stream_pos == StreamPos::ZERO {
            // Nothing read back from the stream yet: a snapshot would cover no entry.
            return;
        }
        self.compacting = true;
        let state = doc.encode_state();
        let upto = self.stream_pos;
        let name = self.name.clone();
        ctx.spawn(
            async move {
                let len = state.len() as u64;
                (cluster.compact(&name, state, upto).await, len)
            }
            .into_actor(self)
            .map(move |(result, len), act, _ctx| {
                act.compacting = false;
                match result {
                    Ok(Compacted::Trimmed(trimmed)) => {
                        act.backlog.trim(upto);
                        act.sync_backlog();
                        act.snapshot_bytes = len;
                        METRICS.compactions.inc();
                        info!(doc = %act.name, %upto, trimmed, snapshot_bytes = len, "compacted in Redis");
                    }
                    // Someone else is at it: their trim marker trims the backlog when read.
                    Ok(Compacted::Busy) => {}
                    // The stored snapshot already covers this much.
                    Ok(Compacted::Stale) => {
                        act.backlog.trim(upto);
                        act.sync_backlog();
                    }
                    Err(e) => {
                        METRICS.storage_errors.inc();
                        error!(doc = %act.name, error = %e, "compaction in Redis failed");
                    }
                }
            }),
        );
    }
}

impl Handler<RemoteEvent> for DocActor {
    type Result = ();

    fn handle(&mut self, event: RemoteEvent, ctx: &mut Self::Context) {
        if self.document.is_none() || self.closing {
            return;
        }
        match event {
            RemoteEvent::Entries { entries, upto } => {
                for e in entries {
                    if e.id <= self.stream_pos {
                        // Read before a reload that already covered it.
                        continue;
                    }
                    match e.kind {
                        EntryKind::Update { bytes, .. } => {
                            if !self.apply_remote(&bytes, ctx) {
                                self.reload_from_cluster(ctx);
                                return;
                            }
                            self.backlog.push(e.id, bytes.len() as u64);
                        }
                        EntryKind::Own { len } => self.backlog.push(e.id, len),
                        EntryKind::Trimmed { upto } => self.backlog.trim(upto),
                        EntryKind::Deleted { .. } => self.deleted_elsewhere(),
                        EntryKind::Other => {}
                    }
                }
                self.sync_backlog();
                self.stream_pos = self.stream_pos.max(upto);
                self.maybe_compact(ctx);
            }
            RemoteEvent::Reload => self.reload_from_cluster(ctx),
            RemoteEvent::Awareness(bytes) => {
                let Ok(messages) = protocol::decode_frame(&bytes) else {
                    return;
                };
                for m in messages {
                    let ClientMessage::Awareness(update) = m else {
                        continue;
                    };
                    let Some(doc) = self.document.as_mut() else {
                        return;
                    };
                    if let Some(change) = doc.apply_awareness(update) {
                        let ids = change.announced.into_iter().chain(change.removed);
                        self.awareness_changed(ids.collect(), ctx);
                    }
                }
            }
            RemoteEvent::AwarenessQuery => {
                if let (Some(cluster), Some(msg)) = (
                    self.registry.cluster(),
                    self.document.as_ref().and_then(|d| d.awareness_message()),
                ) {
                    cluster.publish_awareness(&self.name, &msg);
                }
            }
        }
    }
}
