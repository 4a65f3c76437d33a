//! Cluster mode in the document actor: following the document's Redis stream (what other
//! instances appended), compacting under the cluster's lease, and awareness across instances.
//!
//! What arrives from the stream is already durable in Redis, so it is broadcast without a
//! flush of its own; it only waits behind local updates that are still waiting for theirs, so
//! clients see changes in the order this document applied them.

use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use actix_web::web::Bytes;
use collab_crdt::{protocol, ClientID, ClientMessage, Document, Update};
use tracing::{error, info, warn};
use yrs::updates::decoder::Decode;

use super::{load_doc, DocActor, Pending};
use crate::cluster::{Backlog, Compacted, EntryKind, RemoteEvent, StreamPos};
use crate::telemetry::{Kind, METRICS};
use crate::ws::close::doc_deleted;

/// Cluster mode: where a document stands in the Redis stream.
pub(super) struct Following {
    /// This actor's appends are tagged with it, so the stream reader skips them.
    pub(super) origin: Arc<str>,
    /// Every stream entry up to here is in the document.
    pub(super) stream_pos: StreamPos,
    /// The stream entries no snapshot covers yet (`log_count` and `log_bytes` follow it).
    pub(super) backlog: Backlog,
    /// The document's name was added to the set of documents since loading.
    pub(super) announced: bool,
}

impl DocActor {
    /// After a load: read the stream on from `position`, with the entries after the snapshot.
    /// Does nothing outside cluster mode.
    pub(super) fn follow_stream(
        &mut self,
        position: StreamPos,
        backlog: Backlog,
        ctx: &mut Context<Self>,
    ) {
        let Some(cluster) = self.registry.cluster().cloned() else {
            return;
        };
        let f = self.following.get_or_insert_with(|| {
            Box::new(Following {
                origin: cluster.origin(),
                stream_pos: StreamPos::ZERO,
                backlog: Backlog::default(),
                announced: false,
            })
        });
        f.stream_pos = position;
        f.backlog = backlog;
        let origin = f.origin.clone();
        self.sync_backlog();
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
        if let Some(f) = &self.following {
            self.log_count = f.backlog.count();
            self.log_bytes = f.backlog.bytes();
        }
    }

    fn push_backlog(&mut self, id: StreamPos, len: u64) {
        if let Some(f) = self.following.as_mut() {
            f.backlog.push(id, len);
        }
    }

    fn trim_backlog(&mut self, upto: StreamPos) {
        if let Some(f) = self.following.as_mut() {
            f.backlog.trim(upto);
        }
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
                self.changed_since_armed = true;
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
        let conns = self.conns.take_all();
        for (_, c) in &conns {
            let why = doc_deleted();
            c.kick
                .kick(why.code, why.description.as_deref().unwrap_or_default());
        }
        info!(doc = %self.name, connections = conns.len(), "document deleted by another instance");
        self.document = Some(Document::new());
        if let Some(f) = self.following.as_mut() {
            f.backlog.clear();
            f.announced = false;
        }
        self.sync_backlog();
        self.encoded_estimate = 0;
        self.measured_at = 0;
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
                    act.snapshot_bytes = loaded.snapshot_bytes;
                    info!(doc = %act.name, position = %loaded.position, "document reloaded from Redis");
                    act.follow_stream(loaded.position, loaded.backlog, ctx);
                    act.document_used(ctx);
                }
                Err(e) => act.fail(format!("reload from Redis failed: {e}"), ctx),
            },
        ));
    }

    /// Writes a snapshot covering the stream up to what this document has read, if no other
    /// instance is compacting it; the stream is trimmed below it.
    pub(super) fn compact_in_cluster(&mut self, ctx: &mut Context<Self>) {
        let (Some(cluster), Some(doc), Some(f)) = (
            self.registry.cluster().cloned(),
            &self.document,
            &self.following,
        ) else {
            return;
        };
        if f.stream_pos == StreamPos::ZERO {
            // Nothing read back from the stream yet: a snapshot would cover no entry.
            return;
        }
        self.compacting = true;
        let state = doc.encode_state();
        let upto = f.stream_pos;
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
                        act.trim_backlog(upto);
                        act.sync_backlog();
                        act.snapshot_bytes = len;
                        METRICS.compactions.inc();
                        info!(doc = %act.name, %upto, trimmed, snapshot_bytes = len, "compacted in Redis");
                    }
                    // Someone else is at it: their trim marker trims the backlog when read.
                    Ok(Compacted::Busy) => {}
                    // The stored snapshot already covers this much.
                    Ok(Compacted::Stale) => {
                        act.trim_backlog(upto);
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
                    let Some(f) = &self.following else {
                        return;
                    };
                    if e.id <= f.stream_pos {
                        // Read before a reload that already covered it.
                        continue;
                    }
                    match e.kind {
                        EntryKind::Update { bytes, .. } => {
                            if !self.apply_remote(&bytes, ctx) {
                                self.reload_from_cluster(ctx);
                                return;
                            }
                            self.push_backlog(e.id, bytes.len() as u64);
                        }
                        EntryKind::Own { len } => self.push_backlog(e.id, len),
                        EntryKind::Trimmed { upto } => self.trim_backlog(upto),
                        EntryKind::Deleted { .. } => self.deleted_elsewhere(),
                        EntryKind::Other => {}
                    }
                }
                self.sync_backlog();
                self.document_used(ctx);
                if let Some(f) = self.following.as_mut() {
                    f.stream_pos = f.stream_pos.max(upto);
                }
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
