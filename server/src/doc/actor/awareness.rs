//! Relaying awareness (presence) changes, merged within a batching window.

use actix::prelude::*;
use actix_web::web::Bytes;
use collab_crdt::ClientID;

use super::DocActor;
use crate::telemetry::Kind;

impl DocActor {
    /// Relays awareness changes. The first change after a quiet window goes out at once; later
    /// ones are merged and sent when the window ends, so N clients moving their cursors cost
    /// every recipient at most one message per window instead of N (each entry carries its
    /// clock, so a merged message means the same to clients as the separate ones).
    pub(super) fn awareness_changed(&mut self, ids: Vec<ClientID>, ctx: &mut Context<Self>) {
        let window = self.registry.config().awareness_batch();
        if window.is_zero() || !self.awareness_window_open {
            if let Some(msg) = self
                .document
                .as_ref()
                .and_then(|d| d.awareness_message_for(ids))
            {
                self.broadcast(Bytes::from(msg), Kind::Awareness, ctx);
            }
            if !window.is_zero() {
                self.awareness_window_open = true;
                ctx.run_later(window, |act, ctx| act.awareness_window_ended(ctx));
            }
            return;
        }
        // Merged before it grows, so a window of many changes from a few clients stays about as
        // small as the set of those clients.
        let dirty = &mut self.awareness_dirty;
        if dirty.len() >= 32 && dirty.len() + ids.len() > dirty.capacity() {
            dirty.sort_unstable();
            dirty.dedup();
        }
        dirty.extend(ids);
    }

    fn awareness_window_ended(&mut self, ctx: &mut Context<Self>) {
        if self.awareness_dirty.is_empty() {
            self.awareness_window_open = false;
            return;
        }
        let mut ids = std::mem::take(&mut self.awareness_dirty);
        ids.sort_unstable();
        ids.dedup();
        if let Some(msg) = self
            .document
            .as_ref()
            .and_then(|d| d.awareness_message_for(ids))
        {
            self.broadcast(Bytes::from(msg), Kind::Awareness, ctx);
        }
        let window = self.registry.config().awareness_batch();
        ctx.run_later(window, |act, ctx| act.awareness_window_ended(ctx));
    }
}
