//! One actor per open document. It alone owns the document and its awareness, so the hot path
//! (apply, persist, broadcast) runs without locks.
//!
//! Durability rule: an update's bytes are appended to the store when applied, but every message
//! that reveals document content (the update broadcast, a SyncStep2 answer) waits in `pending`
//! until a flush that started after the append has completed. So nothing a client has seen can
//! be lost by a crash.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_web::web::Bytes;
use collab_crdt::{ClientID, Document, SmallMap};
use collab_storage::{CompactionPolicy, Store};
use thin_vec::ThinVec;
use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};
use uuid::Uuid;

// Awareness relaying, batched per window.
mod awareness;
// The backend's requests (HTTP API): apply, read, delete, versions.
mod backend;
// A connection's frames: sync, updates, awareness.
mod input;
// Cluster mode: what other instances appended, trims, awareness from Redis.
mod remote;
// Loading a document from the local store or from Redis.
mod load;
// Asking for durability and releasing what a flush covered.
mod flush;
// Sending to one connection or to all of them.
mod send;
// How much of its thread one document's broadcasts may take.
mod pace;
// Letting a quiet document keep only its bytes.
mod hibernate;

use load::{load, load_doc, LoadError};
use pace::SendBudget;
use remote::Following;

use super::messages::{
    DocError, DocStats, Evict, GetStats, Join, JoinError, Kick, Leave, Outgoing,
};
use super::registry::Registry;
use crate::doc::outbox;
use crate::telemetry::{Kind, METRICS};
use crate::ws::close::CloseCode;
use crate::ws::direct::Direct;

struct Conn {
    tx: outbox::Sender<Outgoing>,
    kick: Arc<Kick>,
    /// Awareness client ids this connection announced, sorted; removed when it closes. A
    /// sorted `Vec` rather than a set: a tab announces one id, and a set's table cost every
    /// connection about 50 bytes more.
    awareness: Vec<ClientID>,
    read_only: bool,
    /// It wants a SyncStatus for each of its changes (Hocuspocus).
    acks: bool,
    /// Its socket, when broadcasts may be written into it directly (`ws::direct`).
    direct: Option<Arc<Direct>>,
    /// Document changes refused from this (read-only) connection.
    refused: u64,
    /// Its first SyncStep1 was answered (for the first-sync size histogram).
    synced_once: bool,
}

enum Pending {
    /// An applied update's diff, broadcast to everyone once durable, and when its frame was
    /// received.
    Update(Vec<u8>, std::time::Instant),
    /// A message for one connection that reveals content (a SyncStep2 answer).
    One(Uuid, Bytes),
    /// A connection's change acknowledged (SyncStatus) once what it added is durable.
    Ack(Uuid, Outgoing),
    /// A backend request waiting until everything before it is durable.
    Durable(oneshot::Sender<()>),
}

/// Why an update could not be applied; the actor has already acted on it (failed, or started
/// rebuilding from storage).
enum ApplyFailure {
    Storage,
    Rejected(String),
}

pub struct DocActor {
    name: Arc<str>,
    registry: Registry,
    document: Option<Document>,
    /// A thin pointer: 8 bytes less than `Box<str>` in every document, for a rare state.
    #[allow(clippy::box_collection)]
    failed: Option<Box<String>>,
    closing: bool,
    /// Most documents have a few connections: see `SmallMap`.
    conns: SmallMap<Uuid, Conn>,
    next_seq: u64,
    log_count: u64,
    log_bytes: u64,
    snapshot_bytes: u64,
    /// `ThinVec`s here and below keep their length and capacity in the allocation: 16 bytes
    /// less each in the task cell of every document, for lists that are usually empty.
    pending: ThinVec<Pending>,
    /// How many `pending` entries the flush in flight covers.
    flushing: Option<u32>,
    /// Send time this document's broadcasts may still take (`--max-send-share`, `pace.rs`),
    /// and when its thread counts as idle enough for an inline flush: the last delivery's
    /// end plus as long as it took, and at least `MIN_IDLE_FOR_INLINE` (`flush.rs`).
    send_budget: SendBudget,
    compacting: bool,
    /// Bumped whenever the document becomes idle or busy, so stale idle timers do nothing.
    idle_epoch: u32,
    /// The grace-period timer of an idle document, cancelled when someone joins: it holds
    /// about 120 bytes for the whole grace period, for every document opened.
    idle_timer: Option<SpawnHandle>,
    /// Awareness clients changed since the last awareness broadcast, sent when the window ends
    /// (duplicates are merged then).
    awareness_dirty: ThinVec<ClientID>,
    /// An awareness broadcast went out less than one batching window ago.
    awareness_window_open: bool,
    /// Upper bound of the encoded size, for `--max-document-bytes` (see `check_document_size`).
    encoded_estimate: u64,
    /// `encoded_estimate` when it was last measured exactly (0: never).
    measured_at: u64,
    /// Counted in the loaded-documents gauge (loaded successfully, not yet stopped).
    counted_loaded: bool,
    /// A `DeleteDoc` is waiting for writes in flight to finish; joins and backend requests
    /// are turned away until the document is empty again.
    deleting: bool,
    delete_reply: Option<oneshot::Sender<Result<(), DocError>>>,
    /// An automatic version is scheduled (`--auto-version-secs`).
    auto_version_armed: bool,
    /// A version is being written.
    versioning: bool,
    /// The document is counted in the dormant-documents gauge.
    counted_dormant: bool,
    /// A hibernation check is scheduled (`hibernate.rs`).
    hibernation_armed: bool,
    /// The document changed since that check was scheduled.
    changed_since_armed: bool,
    /// Cluster mode: where this document stands in the Redis stream (`None` outside cluster
    /// mode, and until loaded). Boxed, as it is part of every document actor otherwise.
    following: Option<Box<Following>>,
}

impl DocActor {
    pub fn new(name: Arc<str>, registry: Registry) -> Self {
        DocActor {
            name,
            registry,
            document: None,
            failed: None,
            closing: false,
            conns: SmallMap::default(),
            next_seq: 0,
            log_count: 0,
            log_bytes: 0,
            snapshot_bytes: 0,
            pending: ThinVec::new(),
            flushing: None,
            send_budget: SendBudget::new(Instant::now()),
            compacting: false,
            idle_epoch: 0,
            idle_timer: None,
            awareness_dirty: ThinVec::new(),
            awareness_window_open: false,
            encoded_estimate: 0,
            measured_at: 0,
            counted_loaded: false,
            deleting: false,
            delete_reply: None,
            auto_version_armed: false,
            versioning: false,
            counted_dormant: false,
            hibernation_armed: false,
            changed_since_armed: false,
            following: None,
        }
    }

    fn store(&self) -> Arc<dyn Store> {
        self.registry.store()
    }

    /// Removes a connection and, at once, the awareness states it announced.
    fn drop_conn(&mut self, conn: Uuid, ctx: &mut Context<Self>) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        if c.refused > 0 {
            info!(doc = %self.name, conn = %conn, refused = c.refused, "read-only connection left; its document changes were refused");
        }
        if let Some(doc) = self.document.as_mut() {
            let ids = c.awareness;
            if let Some(removal) = doc.remove_awareness(&ids) {
                if let Some(cluster) = self.registry.cluster() {
                    cluster.publish_awareness(&self.name, &removal);
                }
                self.awareness_changed(ids, ctx);
            }
        }
        if self.conns.is_empty() {
            self.became_idle(ctx);
        }
    }

    fn became_idle(&mut self, ctx: &mut Context<Self>) {
        self.idle_epoch = self.idle_epoch.wrapping_add(1);
        self.registry.mark_idle(&self.name);
        let epoch = self.idle_epoch;
        // The log is durable as it is; a snapshot is rewritten only when the log is worth it.
        self.maybe_compact(ctx);
        let grace = self.registry.config().grace_period();
        if let Some(old) = self.idle_timer.take() {
            ctx.cancel_future(old);
        }
        self.idle_timer = Some(ctx.run_later(grace, move |act, ctx| {
            act.idle_timer = None;
            act.try_stop(epoch, ctx)
        }));
    }

    fn try_stop(&mut self, epoch: u32, ctx: &mut Context<Self>) {
        if epoch != self.idle_epoch || !self.conns.is_empty() || self.closing {
            return;
        }
        if self.auto_version_armed && !self.versioning {
            // Activity since the last automatic version: take it before leaving.
            self.auto_version(ctx);
        }
        if self.flushing.is_some() || self.compacting || self.versioning || self.deleting {
            // Never leave with writes in flight: a successor would load an older state.
            ctx.run_later(Duration::from_millis(50), move |act, ctx| {
                act.try_stop(epoch, ctx)
            });
            return;
        }
        self.closing = true;
        self.registry.remove(&self.name, &ctx.address());
        debug!(doc = %self.name, "document idle, unloading");
        ctx.stop();
    }

    /// The document can no longer be served correctly: tell everyone, unload, and let the next
    /// connection load it again from durable storage.
    fn fail(&mut self, reason: String, ctx: &mut Context<Self>) {
        error!(doc = %self.name, %reason, "document failed, closing its connections");
        // In cluster mode the cause is Redis (or a rebuild from it): 1013, try again later.
        let code = if self.registry.cluster().is_some() {
            CloseCode::Again
        } else {
            CloseCode::Error
        };
        for (_, c) in self.conns.take_all() {
            c.kick.kick(code, "document unavailable, retry");
        }
        self.failed = Some(Box::new(reason));
        self.closing = true;
        self.registry.remove(&self.name, &ctx.address());
        ctx.stop();
    }

    /// Sends durable output in order. Consecutive updates go out as one merged message, so a
    /// burst costs each recipient one frame (and one queue slot) per flush, not one per edit.
    fn deliver(&mut self, items: Vec<Pending>, ctx: &mut Context<Self>) {
        let mut run: Vec<Vec<u8>> = Vec::new();
        for item in items {
            match item {
                Pending::Update(diff, received) => {
                    METRICS
                        .broadcast_delay_seconds
                        .observe(received.elapsed().as_secs_f64());
                    run.push(diff);
                }
                Pending::One(conn, bytes) => {
                    self.broadcast_updates(&mut run, ctx);
                    self.send_to(conn, bytes, Kind::SyncStep2, ctx);
                }
                Pending::Ack(conn, ack) => {
                    self.broadcast_updates(&mut run, ctx);
                    self.send_shared(conn, ack, ctx);
                }
                Pending::Durable(waiter) => {
                    // Broadcast first: a backend's 200 then means clients were sent the update.
                    self.broadcast_updates(&mut run, ctx);
                    let _ = waiter.send(());
                }
            }
        }
        self.broadcast_updates(&mut run, ctx);
    }

    fn broadcast_updates(&mut self, run: &mut Vec<Vec<u8>>, ctx: &mut Context<Self>) {
        if run.is_empty() {
            return;
        }
        let msg = Bytes::from(collab_crdt::protocol::encode_updates(run));
        run.clear();
        self.broadcast(msg, Kind::Update, ctx);
    }

    /// Sends a SyncStep2 now if nothing is waiting for durability, else in order behind the
    /// pending writes it may include.
    fn release_step2(&mut self, conn: Uuid, bytes: Bytes, ctx: &mut Context<Self>) {
        if self.pending.is_empty() {
            self.send_to(conn, bytes, Kind::SyncStep2, ctx);
        } else {
            self.pending.push(Pending::One(conn, bytes));
        }
    }

    fn maybe_compact(&mut self, ctx: &mut Context<Self>) {
        let cfg = self.registry.config();
        let policy = CompactionPolicy {
            after_updates: cfg.compact_after_updates,
            after_bytes: cfg.compact_after_bytes,
        };
        if policy.due(self.snapshot_bytes, self.log_count, self.log_bytes) {
            self.compact(ctx);
        }
    }

    fn compact(&mut self, ctx: &mut Context<Self>) {
        if self.compacting || self.log_count == 0 {
            return;
        }
        if self.registry.cluster().is_some() {
            self.compact_in_cluster(ctx);
            return;
        }
        let Some(doc) = self.document.as_ref() else {
            return;
        };
        self.compacting = true;
        let snapshot = doc.encode_state();
        let upto = self.next_seq;
        let (count, bytes) = (self.log_count, self.log_bytes);
        let store = self.store();
        let name = self.name.clone();
        ctx.spawn(
            async move {
                let snapshot_len = snapshot.len();
                let r = tokio::task::spawn_blocking(move || store.compact(&name, &snapshot, upto))
                    .await;
                (r, snapshot_len)
            }
            .into_actor(self)
            .map(move |(result, snapshot_len), act, _ctx| {
                act.compacting = false;
                match result {
                    Ok(Ok(())) => {
                        act.log_count -= count;
                        act.log_bytes -= bytes;
                        act.encoded_estimate = snapshot_len as u64 + act.log_bytes;
                        act.measured_at = snapshot_len as u64;
                        act.snapshot_bytes = snapshot_len as u64;
                        METRICS.compactions.inc();
                        info!(doc = %act.name, entries = count, log_bytes = bytes, snapshot_bytes = snapshot_len, "compacted");
                    }
                    // The log is still intact, so nothing is lost; the next trigger retries.
                    Ok(Err(e)) => {
                        METRICS.storage_errors.inc();
                        error!(doc = %act.name, error = %e, "compaction failed")
                    }
                    Err(e) => {
                        METRICS.storage_errors.inc();
                        error!(doc = %act.name, error = %e, "compaction task failed")
                    }
                }
            }),
        );
    }

    /// Replaces a document that may be inconsistent with what durable storage (which includes
    /// every accepted update) says, keeping connections and awareness.
    fn reload(&mut self, ctx: &mut Context<Self>) {
        if self.registry.cluster().is_some() {
            // Updates of this actor may still be on their way to the stream, so a fresh load
            // could miss them; a new actor, whose reader does not skip them, is loaded instead.
            self.fail("rebuilding from Redis after a rejected update".into(), ctx);
            return;
        }
        let store = self.store();
        let name = self.name.clone();
        ctx.wait(
            async move {
                tokio::task::spawn_blocking(move || load(store.as_ref(), &name))
                    .await
                    .map_err(|e| LoadError::Task(e.to_string()))
                    .and_then(|r| r)
            }
            .into_actor(self)
            .map(|result, act, ctx| match result {
                Ok(loaded) => {
                    if let Some(doc) = act.document.as_mut() {
                        doc.replace_content(loaded.document);
                    }
                    act.document_used(ctx);
                    warn!(doc = %act.name, "document rebuilt from storage after a rejected update");
                }
                Err(e) => act.fail(format!("reload failed: {e}"), ctx),
            }),
        );
    }
}

impl Actor for DocActor {
    type Context = Context<Self>;

    fn stopped(&mut self, ctx: &mut Self::Context) {
        if let (Some(cluster), Some(_)) = (self.registry.cluster(), &self.following) {
            cluster.unregister(&self.name, &ctx.address().recipient());
        }
        self.uncount_dormant();
        if self.counted_loaded {
            METRICS.documents_loaded.dec();
            METRICS.document_unloads.inc();
        }
    }

    fn started(&mut self, ctx: &mut Self::Context) {
        let registry = self.registry.clone();
        let name = self.name.clone();
        // `wait` holds back every message (joins included) until the document is loaded, so no
        // client is ever answered from a document that is still empty.
        ctx.wait(
            async move {
                let started = std::time::Instant::now();
                let r = load_doc(&registry, name).await;
                (r, started.elapsed())
            }
            .into_actor(self)
            .map(|(result, took), act, ctx| match result {
                Ok(loaded) => {
                    info!(doc = %act.name, entries = loaded.log_count, ?took, "document loaded");
                    METRICS.load_seconds.observe(took.as_secs_f64());
                    METRICS.document_loads.inc();
                    METRICS.documents_loaded.inc();
                    act.counted_loaded = true;
                    act.document = Some(loaded.document);
                    act.next_seq = loaded.next_seq;
                    act.log_count = loaded.log_count;
                    act.log_bytes = loaded.log_bytes;
                    // Snapshot plus log: an upper bound of the encoded size.
                    act.encoded_estimate = loaded.snapshot_bytes + loaded.log_bytes;
                    act.snapshot_bytes = loaded.snapshot_bytes;
                    act.follow_stream(loaded.position, loaded.backlog, ctx);
                    act.document_used(ctx);
                    // A document nobody joins (every joiner gave up while it loaded) still unloads.
                    act.became_idle(ctx);
                }
                Err(e) => {
                    error!(doc = %act.name, error = %e, "cannot load document; it is not served");
                    METRICS.storage_errors.inc();
                    act.failed = Some(Box::new(e.to_string()));
                    act.closing = true;
                    act.registry.remove(&act.name, &ctx.address());
                    // Answer the joins already queued with a clear error, then go.
                    ctx.run_later(Duration::from_secs(1), |_, ctx| ctx.stop());
                }
            }),
        );
    }
}

impl Handler<Join> for DocActor {
    type Result = Result<(), JoinError>;

    fn handle(&mut self, msg: Join, ctx: &mut Self::Context) -> Self::Result {
        if let Some(reason) = &self.failed {
            return Err(JoinError::Unavailable(reason.to_string()));
        }
        if self.closing || self.deleting {
            // While deleting: the session retries shortly and joins the emptied document.
            return Err(JoinError::Closing);
        }
        let Some(doc) = self.document.as_ref() else {
            return Err(JoinError::Unavailable("not loaded".into()));
        };
        // One message per frame: stable y-websocket clients read only the first of a frame.
        let step1 = Bytes::from(doc.sync_step1_message());
        let awareness = doc.awareness_message().map(Bytes::from);
        self.idle_epoch = self.idle_epoch.wrapping_add(1);
        if let Some(timer) = self.idle_timer.take() {
            ctx.cancel_future(timer);
        }
        self.registry.mark_busy(&self.name);
        self.conns.insert(
            msg.conn,
            Conn {
                tx: msg.tx,
                kick: msg.kick,
                awareness: Vec::new(),
                read_only: msg.read_only,
                acks: msg.acks,
                direct: msg.direct,
                refused: 0,
                synced_once: false,
            },
        );
        self.send_to(msg.conn, step1, Kind::SyncStep1, ctx);
        if let Some(aw) = awareness {
            self.send_to(msg.conn, aw, Kind::Awareness, ctx);
        }
        Ok(())
    }
}

impl Handler<Leave> for DocActor {
    type Result = ();

    fn handle(&mut self, msg: Leave, ctx: &mut Self::Context) {
        self.drop_conn(msg.conn, ctx);
    }
}

impl Handler<Evict> for DocActor {
    type Result = ();

    /// Too many documents are loaded and this one is the longest idle: unload it now rather
    /// than after the grace period. A join that arrived meanwhile keeps it.
    fn handle(&mut self, _: Evict, ctx: &mut Self::Context) {
        if self.conns.is_empty() && !self.closing {
            debug!(doc = %self.name, "evicting idle document");
            self.try_stop(self.idle_epoch, ctx);
        }
    }
}

impl Handler<GetStats> for DocActor {
    type Result = MessageResult<GetStats>;

    fn handle(&mut self, _: GetStats, _: &mut Self::Context) -> Self::Result {
        MessageResult(DocStats {
            connections: self.conns.len(),
            queue_depths: self.conns.values().map(|c| c.tx.queued()).collect(),
        })
    }
}
#[cfg(test)]
mod tests {
    /// Every open document is one tokio task whose cell holds the actor's context future:
    /// 32 bytes of header, 16 of scheduler and id, the future with its stage tag, and 48 of
    /// trailer, rounded up to 128 (the cell is cache-line aligned). Up to 536 bytes of future
    /// the cell takes 640 bytes; one byte more and it takes 768 in every document.
    #[test]
    fn a_document_task_fits_its_640_byte_cell() {
        let future = std::mem::size_of::<
            actix::dev::ContextFut<super::DocActor, actix::Context<super::DocActor>>,
        >();
        assert!(
            future <= 536,
            "the document actor's future is {future} bytes"
        );
    }
}
