//! What the document actor does for backends (the HTTP API): apply an update, read the state,
//! delete the document, and the automatic versions and webhook notices that follow changes.
//!
//! Every answer that reveals or confirms content waits for the flush that covers it, as the
//! WebSocket path does: a `Pending::Durable` waiter queued behind the updates it depends on.

use actix::prelude::*;
use actix_web::web::Bytes;
use collab_crdt::{Document, Update};
use tokio::sync::oneshot;
use tracing::{error, info, warn};
use yrs::updates::decoder::Decode;

use super::{ApplyFailure, DocActor, Pending};
use crate::doc::messages::{Applied, ApplyUpdate, DeleteDoc, DocError, ReadState};
use crate::ws::close::doc_deleted;

/// Label of the versions `--auto-version-secs` stores.
pub const AUTO_VERSION_LABEL: &str = "auto";

impl DocActor {
    /// Refuses backend requests the actor cannot serve right now.
    fn backend_ready(&self) -> Result<(), DocError> {
        if let Some(reason) = &self.failed {
            return Err(DocError::Unavailable(reason.to_string()));
        }
        if self.deleting {
            return Err(DocError::Deleting);
        }
        if self.closing || self.document.is_none() {
            return Err(DocError::Closing);
        }
        Ok(())
    }

    /// Resolves once everything applied so far is durable (at once if nothing is pending).
    fn when_durable(&mut self, ctx: &mut Context<Self>) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        if self.pending.is_empty() {
            let _ = tx.send(());
        } else {
            self.pending.push(Pending::Durable(tx));
            self.request_flush(ctx);
        }
        rx
    }

    /// Called once per flush that made new content durable.
    pub(super) fn changed_durably(&mut self, ctx: &mut Context<Self>) {
        self.registry.webhooks().updated(&self.name);
        let Some(every) = self.registry.config().auto_version() else {
            return;
        };
        if !self.auto_version_armed {
            self.auto_version_armed = true;
            ctx.run_later(every, |act, ctx| act.auto_version(ctx));
        }
    }

    /// Stores the current state as an automatic version. The state is taken when nothing is
    /// waiting for a flush, so a version never holds content that is not yet durable.
    pub(super) fn auto_version(&mut self, ctx: &mut Context<Self>) {
        if !self.auto_version_armed || self.versioning || self.deleting {
            return;
        }
        if !self.pending.is_empty() {
            ctx.run_later(std::time::Duration::from_millis(50), |act, ctx| {
                act.auto_version(ctx)
            });
            return;
        }
        let Some(doc) = self.document.as_ref() else {
            return;
        };
        self.auto_version_armed = false;
        self.versioning = true;
        let state = doc.encode_state();
        let store = self.store();
        let flusher = self.registry.flusher();
        let name = self.name.clone();
        let requester = self.name.clone();
        let cluster = self.registry.cluster().cloned();
        ctx.spawn(
            async move {
                if let Some(cluster) = cluster {
                    return cluster
                        .put_version(&name, AUTO_VERSION_LABEL, state)
                        .await
                        .map_err(|e| e.to_string());
                }
                let put = tokio::task::spawn_blocking(move || {
                    store.put_version(&name, AUTO_VERSION_LABEL, &state)
                })
                .await;
                match put {
                    Ok(Ok(v)) => flusher
                        .flush(&requester, false)
                        .await
                        .map(|()| v)
                        .map_err(|e| e.to_string()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(e) => Err(e.to_string()),
                }
            }
            .into_actor(self)
            .map(|result, act, _ctx| {
                act.versioning = false;
                match result {
                    Ok(v) => {
                        info!(doc = %act.name, id = v.id, size = v.size, "automatic version stored")
                    }
                    Err(e) => error!(doc = %act.name, error = %e, "automatic version failed"),
                }
            }),
        );
    }

    /// Deletes once no write is in flight (a flush, a compaction or a version write finishing
    /// after the delete would bring records back). The delete itself runs inside `ctx.wait`, so
    /// no message is handled until storage is empty and the document is reset.
    fn delete_when_quiet(&mut self, ctx: &mut Context<Self>) {
        if self.flushing.is_some() || self.compacting || self.versioning {
            ctx.run_later(std::time::Duration::from_millis(10), |act, ctx| {
                act.delete_when_quiet(ctx)
            });
            return;
        }
        let store = self.store();
        let flusher = self.registry.flusher();
        let name = self.name.clone();
        let requester = self.name.clone();
        let origin = self.following.as_ref().map(|f| f.origin.clone());
        let cluster = self.registry.cluster().cloned().zip(origin);
        ctx.wait(
            async move {
                if let Some((cluster, origin)) = cluster {
                    return cluster
                        .delete(&name, &origin)
                        .await
                        .map_err(|e| e.to_string());
                }
                let deleted = tokio::task::spawn_blocking(move || store.delete(&name))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                flusher
                    .flush(&requester, false)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<bool, String>(deleted)
            }
            .into_actor(self)
            .map(|result, act, ctx| {
                let reply = act.delete_reply.take();
                match result {
                    Ok(existed) => {
                        act.document = Some(Document::new());
                        act.document_used(ctx);
                        act.next_seq = 0;
                        act.log_count = 0;
                        act.log_bytes = 0;
                        act.awareness_dirty.clear();
                        act.auto_version_armed = false;
                        if let Some(f) = act.following.as_mut() {
                            f.announced = false;
                            f.backlog.clear();
                        }
                        act.deleting = false;
                        info!(doc = %act.name, existed, "document deleted");
                        act.registry.webhooks().deleted(&act.name);
                        if let Some(r) = reply {
                            let _ = r.send(Ok(()));
                        }
                        act.became_idle(ctx);
                    }
                    Err(e) => {
                        if let Some(r) = reply {
                            let _ = r.send(Err(DocError::Unavailable(e.clone())));
                        }
                        // What storage holds is not known: serve nothing until reloaded.
                        act.deleting = false;
                        act.fail(format!("delete failed: {e}"), ctx);
                    }
                }
            }),
        );
    }
}

impl Handler<ApplyUpdate> for DocActor {
    type Result = ResponseFuture<Result<Applied, DocError>>;

    fn handle(&mut self, msg: ApplyUpdate, ctx: &mut Self::Context) -> Self::Result {
        let outcome = self.backend_apply(&msg.update, ctx);
        self.document_used(ctx);
        let durable = outcome.as_ref().ok().map(|_| self.when_durable(ctx));
        Box::pin(async move {
            let changed = outcome?;
            if let Some(durable) = durable {
                durable
                    .await
                    .map_err(|_| DocError::Unavailable("storage failure".into()))?;
            }
            Ok(Applied { changed })
        })
    }
}

impl DocActor {
    fn backend_apply(&mut self, bytes: &Bytes, ctx: &mut Context<Self>) -> Result<bool, DocError> {
        self.backend_ready()?;
        let update =
            Update::decode_v1(bytes).map_err(|e| DocError::InvalidUpdate(e.to_string()))?;
        // Checked before applying: yrs would keep such an update in memory, waiting for what
        // it depends on, and the API promises that a refused update leaves nothing behind.
        if self
            .document
            .as_ref()
            .is_some_and(|d| d.lacks_dependencies_of(&update))
        {
            return Err(DocError::MissingDependencies);
        }
        if let Err(v) = self.check_document_size(bytes.len()) {
            return Err(DocError::TooLarge(v.to_string()));
        }
        match self.apply(update, std::time::Instant::now(), ctx) {
            Ok(changed) => Ok(changed),
            Err(ApplyFailure::Storage) => Err(DocError::Unavailable("storage failure".into())),
            Err(ApplyFailure::Rejected(e)) => {
                warn!(doc = %self.name, error = %e, "update from the API rejected; rebuilding document from storage");
                Err(DocError::InvalidUpdate(e))
            }
        }
    }
}

impl Handler<ReadState> for DocActor {
    type Result = ResponseFuture<Result<Vec<u8>, DocError>>;

    fn handle(&mut self, msg: ReadState, ctx: &mut Self::Context) -> Self::Result {
        let read = self.backend_ready().map(|()| {
            let doc = self.document.as_ref().expect("checked by backend_ready");
            match &msg.sv {
                None => doc.encode_state(),
                Some(sv) => doc.encode_diff(sv),
            }
        });
        self.document_used(ctx);
        let durable = read.as_ref().ok().map(|_| self.when_durable(ctx));
        Box::pin(async move {
            let bytes = read?;
            if let Some(durable) = durable {
                durable
                    .await
                    .map_err(|_| DocError::Unavailable("storage failure".into()))?;
            }
            Ok(bytes)
        })
    }
}

impl Handler<DeleteDoc> for DocActor {
    type Result = ResponseFuture<Result<(), DocError>>;

    fn handle(&mut self, _msg: DeleteDoc, ctx: &mut Self::Context) -> Self::Result {
        if let Err(e) = self.backend_ready() {
            return Box::pin(async move { Err(e) });
        }
        self.deleting = true;
        // Closed with 4404 at once; their queued output goes with them.
        let conns = self.conns.take_all();
        for (_, c) in &conns {
            let why = doc_deleted();
            c.kick
                .kick(why.code, why.description.as_deref().unwrap_or_default());
        }
        if !conns.is_empty() {
            info!(doc = %self.name, connections = conns.len(), "closing connections: document deleted");
        }
        let (tx, rx) = oneshot::channel();
        self.delete_reply = Some(tx);
        self.delete_when_quiet(ctx);
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err(DocError::Unavailable("document stopped".into())))
        })
    }
}
