//! One actor per open document. It alone owns the document and its awareness, so the hot path
//! (apply, persist, broadcast) runs without locks.
//!
//! Durability rule: an update's bytes are appended to the store when applied, but every message
//! that reveals document content (the update broadcast, a SyncStep2 answer) waits in `pending`
//! until a flush that started after the append has completed. So nothing a client has seen can
//! be lost by a crash.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use actix::prelude::*;
use actix_web::web::Bytes;
use collab_crdt::{ClientID, ClientMessage, Document, DocumentError, StateVector};
use collab_storage::{CompactionPolicy, Store, StoreError};
use tokio::sync::{mpsc, Notify};
use tracing::{debug, error, info, info_span, warn};
use uuid::Uuid;

use crate::connection::{CloseCode, CloseReason};
use crate::registry::Registry;

/// One outgoing message, shared by every recipient. An `Arc` rather than `Bytes` itself: a
/// queue slot is then 8 bytes instead of 32, and tokio allocates every queue's first 32 slots
/// up front, so this saves about 0.75 KiB per idle connection.
pub type Outgoing = Arc<Bytes>;

/// Lets the document close a connection whose outbound queue it can no longer use.
#[derive(Default)]
pub struct Kick {
    reason: OnceLock<CloseReason>,
    notify: Notify,
}

impl Kick {
    pub fn kick(&self, code: CloseCode, description: &str) {
        let _ = self.reason.set(CloseReason {
            code,
            description: Some(description.to_owned()),
        });
        self.notify.notify_one();
    }

    pub async fn kicked(&self) -> CloseReason {
        self.notify.notified().await;
        self.reason()
    }

    pub fn reason(&self) -> CloseReason {
        self.reason.get().cloned().unwrap_or(CloseReason {
            code: CloseCode::Error,
            description: Some("document closed".into()),
        })
    }
}

/// Why a connection's input was refused; each maps to the close code the client receives.
#[derive(Debug, thiserror::Error)]
pub enum Violation {
    #[error("update rejected: {0}")]
    UpdateRejected(String),
    #[error("connection announced more than {0} awareness clients")]
    TooManyAwarenessClients(usize),
    #[error("document unavailable: {0}")]
    Unavailable(String),
}

impl Violation {
    pub fn close_reason(&self) -> CloseReason {
        let code = match self {
            Violation::UpdateRejected(_) => CloseCode::Protocol,
            Violation::TooManyAwarenessClients(_) => CloseCode::Policy,
            Violation::Unavailable(_) => CloseCode::Error,
        };
        CloseReason {
            code,
            description: Some(self.to_string()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("document is closing")]
    Closing,
    #[error("document unavailable: {0}")]
    Unavailable(String),
}

#[derive(Message)]
#[rtype(result = "Result<(), JoinError>")]
pub struct Join {
    pub conn: Uuid,
    pub tx: mpsc::Sender<Outgoing>,
    pub kick: Arc<Kick>,
}

#[derive(Message)]
#[rtype(result = "Result<(), Violation>")]
pub struct Incoming {
    pub conn: Uuid,
    pub messages: Vec<ClientMessage>,
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Leave {
    pub conn: Uuid,
}

struct Conn {
    tx: mpsc::Sender<Outgoing>,
    kick: Arc<Kick>,
    /// Awareness client ids this connection announced; removed when it closes.
    awareness: HashSet<ClientID>,
}

enum Pending {
    /// An applied update's diff, broadcast to everyone once durable.
    Update(Vec<u8>),
    /// A message for one connection that reveals content (a SyncStep2 answer).
    One(Uuid, Bytes),
}

/// What loading produced: the document and where its log stands.
struct Loaded {
    document: Document,
    next_seq: u64,
    log_count: u64,
    log_bytes: u64,
    snapshot_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
enum LoadError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Document(#[from] DocumentError),
    #[error("load task failed: {0}")]
    Task(String),
}

fn load(store: &dyn Store, name: &str) -> Result<Loaded, LoadError> {
    let stored = store.load(name)?;
    let document = Document::load(
        stored.snapshot.as_deref(),
        stored.log.iter().map(|(_, u)| u.as_slice()),
    )?;
    Ok(Loaded {
        document,
        next_seq: stored.next_seq(),
        log_count: stored.log.len() as u64,
        log_bytes: stored.log_bytes(),
        snapshot_bytes: stored.snapshot_bytes(),
    })
}

pub struct DocActor {
    name: Arc<str>,
    registry: Registry,
    document: Option<Document>,
    failed: Option<String>,
    closing: bool,
    conns: HashMap<Uuid, Conn>,
    next_seq: u64,
    log_count: u64,
    log_bytes: u64,
    snapshot_bytes: u64,
    pending: Vec<Pending>,
    /// How many `pending` entries the flush in flight covers.
    flushing: Option<usize>,
    compacting: bool,
    /// The SyncStep2 for a client with an empty state vector, shared by concurrent joiners.
    full_state: Option<Bytes>,
    /// Bumped whenever the document becomes idle or busy, so stale idle timers do nothing.
    idle_epoch: u64,
    /// Awareness clients changed since the last awareness broadcast, sent when the window ends.
    awareness_dirty: HashSet<ClientID>,
    /// An awareness broadcast went out less than one batching window ago.
    awareness_window_open: bool,
}

impl DocActor {
    pub fn new(name: Arc<str>, registry: Registry) -> Self {
        DocActor {
            name,
            registry,
            document: None,
            failed: None,
            closing: false,
            conns: HashMap::new(),
            next_seq: 0,
            log_count: 0,
            log_bytes: 0,
            snapshot_bytes: 0,
            pending: Vec::new(),
            flushing: None,
            compacting: false,
            full_state: None,
            idle_epoch: 0,
            awareness_dirty: HashSet::new(),
            awareness_window_open: false,
        }
    }

    fn store(&self) -> Arc<dyn Store> {
        self.registry.store()
    }

    /// Queues `bytes` for one connection; a full queue disconnects it rather than buffering
    /// without bound or silently skipping a message.
    fn send_to(&mut self, conn: Uuid, bytes: Bytes, ctx: &mut Context<Self>) {
        self.send_shared(conn, Arc::new(bytes), ctx);
    }

    fn send_shared(&mut self, conn: Uuid, bytes: Outgoing, ctx: &mut Context<Self>) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        match c.tx.try_send(bytes) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                warn!(doc = %self.name, conn = %conn, "outbound queue full, disconnecting slow client");
                c.kick
                    .kick(CloseCode::Again, "client too slow, reconnect to resync");
                self.drop_conn(conn, ctx);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => self.drop_conn(conn, ctx),
        }
    }

    fn broadcast(&mut self, bytes: Bytes, ctx: &mut Context<Self>) {
        let bytes = Arc::new(bytes);
        let ids: Vec<Uuid> = self.conns.keys().copied().collect();
        for id in ids {
            self.send_shared(id, bytes.clone(), ctx);
        }
    }

    /// Relays awareness changes. The first change after a quiet window goes out at once; later
    /// ones are merged and sent when the window ends, so N clients moving their cursors cost
    /// every recipient at most one message per window instead of N (each entry carries its
    /// clock, so a merged message means the same to clients as the separate ones).
    fn awareness_changed(&mut self, ids: Vec<ClientID>, ctx: &mut Context<Self>) {
        let window = self.registry.config().awareness_batch();
        if window.is_zero() || !self.awareness_window_open {
            if let Some(msg) = self
                .document
                .as_ref()
                .and_then(|d| d.awareness_message_for(ids))
            {
                self.broadcast(Bytes::from(msg), ctx);
            }
            if !window.is_zero() {
                self.awareness_window_open = true;
                ctx.run_later(window, |act, ctx| act.awareness_window_ended(ctx));
            }
            return;
        }
        self.awareness_dirty.extend(ids);
    }

    fn awareness_window_ended(&mut self, ctx: &mut Context<Self>) {
        if self.awareness_dirty.is_empty() {
            self.awareness_window_open = false;
            return;
        }
        let ids: Vec<ClientID> = self.awareness_dirty.drain().collect();
        if let Some(msg) = self
            .document
            .as_ref()
            .and_then(|d| d.awareness_message_for(ids))
        {
            self.broadcast(Bytes::from(msg), ctx);
        }
        let window = self.registry.config().awareness_batch();
        ctx.run_later(window, |act, ctx| act.awareness_window_ended(ctx));
    }

    /// Removes a connection and, at once, the awareness states it announced.
    fn drop_conn(&mut self, conn: Uuid, ctx: &mut Context<Self>) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        if let Some(doc) = self.document.as_mut() {
            let ids: Vec<ClientID> = c.awareness.into_iter().collect();
            if doc.remove_awareness(&ids).is_some() {
                self.awareness_changed(ids, ctx);
            }
        }
        if self.conns.is_empty() {
            self.became_idle(ctx);
        }
    }

    fn became_idle(&mut self, ctx: &mut Context<Self>) {
        self.idle_epoch += 1;
        let epoch = self.idle_epoch;
        // The log is durable as it is; a snapshot is rewritten only when the log is worth it.
        self.maybe_compact(ctx);
        let grace = self.registry.config().grace_period();
        ctx.run_later(grace, move |act, ctx| act.try_stop(epoch, ctx));
    }

    fn try_stop(&mut self, epoch: u64, ctx: &mut Context<Self>) {
        if epoch != self.idle_epoch || !self.conns.is_empty() || self.closing {
            return;
        }
        if self.flushing.is_some() || self.compacting {
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
        for (_, c) in self.conns.drain() {
            c.kick.kick(CloseCode::Error, "document unavailable, retry");
        }
        self.failed = Some(reason);
        self.closing = true;
        self.registry.remove(&self.name, &ctx.address());
        ctx.stop();
    }

    fn request_flush(&mut self, ctx: &mut Context<Self>) {
        if self.flushing.is_some() || self.pending.is_empty() {
            return;
        }
        self.flushing = Some(self.pending.len());
        let flusher = self.registry.flusher();
        ctx.spawn(
            async move { flusher.flush().await }
                .into_actor(self)
                .map(|result, act, ctx| act.flushed(result, ctx)),
        );
    }

    fn flushed(&mut self, result: Result<(), crate::flusher::FlushError>, ctx: &mut Context<Self>) {
        let covered = self.flushing.take().unwrap_or(0);
        if let Err(e) = result {
            self.fail(format!("storage flush failed: {e}"), ctx);
            return;
        }
        let durable: Vec<Pending> = self.pending.drain(..covered).collect();
        self.deliver(durable, ctx);
        self.request_flush(ctx);
        self.maybe_compact(ctx);
    }

    /// Sends durable output in order. Consecutive updates go out as one merged message, so a
    /// burst costs each recipient one frame (and one queue slot) per flush, not one per edit.
    fn deliver(&mut self, items: Vec<Pending>, ctx: &mut Context<Self>) {
        let mut run: Vec<Vec<u8>> = Vec::new();
        for item in items {
            match item {
                Pending::Update(diff) => run.push(diff),
                Pending::One(conn, bytes) => {
                    self.broadcast_updates(&mut run, ctx);
                    self.send_to(conn, bytes, ctx);
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
        self.broadcast(msg, ctx);
    }

    /// Sends a SyncStep2 now if nothing is waiting for durability, else in order behind the
    /// pending writes it may include.
    fn release_step2(&mut self, conn: Uuid, bytes: Bytes, ctx: &mut Context<Self>) {
        if self.pending.is_empty() {
            self.send_to(conn, bytes, ctx);
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
                        act.snapshot_bytes = snapshot_len as u64;
                        info!(doc = %act.name, entries = count, log_bytes = bytes, snapshot_bytes = snapshot_len, "compacted");
                    }
                    // The log is still intact, so nothing is lost; the next trigger retries.
                    Ok(Err(e)) => error!(doc = %act.name, error = %e, "compaction failed"),
                    Err(e) => error!(doc = %act.name, error = %e, "compaction task failed"),
                }
            }),
        );
    }

    /// Replaces a document that may be inconsistent with what durable storage (which includes
    /// every accepted update) says, keeping connections and awareness.
    fn reload(&mut self, ctx: &mut Context<Self>) {
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
                    act.full_state = None;
                    warn!(doc = %act.name, "document rebuilt from storage after a rejected update");
                }
                Err(e) => act.fail(format!("reload failed: {e}"), ctx),
            }),
        );
    }

    fn handle_message(
        &mut self,
        conn: Uuid,
        msg: ClientMessage,
        ctx: &mut Context<Self>,
    ) -> Result<(), Violation> {
        let Some(doc) = self.document.as_mut() else {
            return Err(Violation::Unavailable("not loaded".into()));
        };
        match msg {
            ClientMessage::SyncStep1(sv) => {
                let bytes = if sv == StateVector::default() {
                    // Copied to its exact size: the encoder's spare capacity (about 1 KiB for a
                    // small document) would otherwise stay allocated for as long as the cache.
                    self.full_state
                        .get_or_insert_with(|| Bytes::copy_from_slice(&doc.sync_step2_message(&sv)))
                        .clone()
                } else {
                    Bytes::from(doc.sync_step2_message(&sv))
                };
                self.release_step2(conn, bytes, ctx);
            }
            ClientMessage::SyncStep2(update) | ClientMessage::Update(update) => {
                match doc.apply_update(update) {
                    Ok(None) => {}
                    Ok(Some(diff)) => {
                        self.full_state = None;
                        let seq = self.next_seq;
                        if let Err(e) = self.registry.store().append(&self.name, seq, &diff) {
                            self.fail(format!("append failed: {e}"), ctx);
                            return Err(Violation::Unavailable("storage failure".into()));
                        }
                        self.next_seq += 1;
                        self.log_count += 1;
                        self.log_bytes += diff.len() as u64;
                        self.pending.push(Pending::Update(diff));
                        self.request_flush(ctx);
                    }
                    Err(e) => {
                        warn!(doc = %self.name, conn = %conn, error = %e, "update rejected; rebuilding document from storage");
                        self.reload(ctx);
                        return Err(Violation::UpdateRejected(e.to_string()));
                    }
                }
            }
            ClientMessage::Awareness(update) => {
                let limit = self.registry.config().max_awareness_per_connection;
                let c = self.conns.get(&conn);
                let owned = c.map_or(0, |c| c.awareness.len());
                let new = update
                    .clients
                    .keys()
                    .filter(|id| c.is_none_or(|c| !c.awareness.contains(id)))
                    .count();
                if owned + new > limit {
                    return Err(Violation::TooManyAwarenessClients(limit));
                }
                if let Some(change) = doc.apply_awareness(update) {
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.awareness.extend(change.announced.iter().copied());
                        for id in &change.removed {
                            c.awareness.remove(id);
                        }
                    }
                    let ids = change.announced.into_iter().chain(change.removed);
                    self.awareness_changed(ids.collect(), ctx);
                }
            }
            ClientMessage::QueryAwareness => {
                if let Some(msg) = doc.awareness_message() {
                    self.send_to(conn, Bytes::from(msg), ctx);
                }
            }
            ClientMessage::Auth => {}
        }
        Ok(())
    }
}

impl Actor for DocActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let store = self.store();
        let name = self.name.clone();
        let span = info_span!("load", doc = %self.name);
        // `wait` holds back every message (joins included) until the document is loaded, so no
        // client is ever answered from a document that is still empty.
        ctx.wait(
            async move {
                let started = std::time::Instant::now();
                let r = tokio::task::spawn_blocking(move || {
                    let _g = span.enter();
                    load(store.as_ref(), &name)
                })
                .await
                .map_err(|e| LoadError::Task(e.to_string()))
                .and_then(|r| r);
                (r, started.elapsed())
            }
            .into_actor(self)
            .map(|(result, took), act, ctx| match result {
                Ok(loaded) => {
                    info!(doc = %act.name, entries = loaded.log_count, ?took, "document loaded");
                    act.document = Some(loaded.document);
                    act.next_seq = loaded.next_seq;
                    act.log_count = loaded.log_count;
                    act.log_bytes = loaded.log_bytes;
                    act.snapshot_bytes = loaded.snapshot_bytes;
                    // A document nobody joins (every joiner gave up while it loaded) still unloads.
                    act.became_idle(ctx);
                }
                Err(e) => {
                    error!(doc = %act.name, error = %e, "cannot load document; it is not served");
                    act.failed = Some(e.to_string());
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
            return Err(JoinError::Unavailable(reason.clone()));
        }
        if self.closing {
            return Err(JoinError::Closing);
        }
        let Some(doc) = self.document.as_ref() else {
            return Err(JoinError::Unavailable("not loaded".into()));
        };
        // One message per frame: stable y-websocket clients read only the first of a frame.
        let step1 = Bytes::from(doc.sync_step1_message());
        let awareness = doc.awareness_message().map(Bytes::from);
        self.idle_epoch += 1;
        self.conns.insert(
            msg.conn,
            Conn {
                tx: msg.tx,
                kick: msg.kick,
                awareness: HashSet::new(),
            },
        );
        self.send_to(msg.conn, step1, ctx);
        if let Some(aw) = awareness {
            self.send_to(msg.conn, aw, ctx);
        }
        Ok(())
    }
}

impl Handler<Incoming> for DocActor {
    type Result = Result<(), Violation>;

    fn handle(&mut self, msg: Incoming, ctx: &mut Self::Context) -> Self::Result {
        if !self.conns.contains_key(&msg.conn) {
            // Dropped (too slow, or the document failed) while this frame was in flight.
            return Err(self.failed.clone().map_or(
                Violation::Unavailable("connection was dropped".into()),
                Violation::Unavailable,
            ));
        }
        for m in msg.messages {
            self.handle_message(msg.conn, m, ctx)?;
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
