//! A quiet document keeps only its encoded bytes (`Document::hibernate`): a yrs document costs
//! several times its encoded size, and most open documents are not being edited.

use actix::prelude::*;
use tracing::debug;

use super::DocActor;
use crate::telemetry::METRICS;

/// Larger documents stay built. Waking runs on the actor's thread, which other documents share:
/// a document of 1 MiB encoded (about 190,000 characters edited at random places) took 30-60 ms
/// to build again, one of 160 KiB 7 ms (`crdt/examples/dormant_memory.rs`).
const HIBERNATE_UP_TO_BYTES: u64 = 256 * 1024;

impl DocActor {
    /// Call after anything that may have built the yrs document (a change, a diff for a client
    /// that has part of the document, a backend read): it keeps the dormant-documents gauge right
    /// and arms the check that lets the document sleep again after `--hibernate-after-secs`.
    pub(super) fn document_used(&mut self, ctx: &mut Context<Self>) {
        let Some(doc) = self.document.as_ref() else {
            return;
        };
        let dormant = doc.is_dormant();
        if dormant != self.counted_dormant {
            self.counted_dormant = dormant;
            if dormant {
                METRICS.documents_dormant.inc();
            } else {
                METRICS.documents_dormant.dec();
                debug!(doc = %self.name, "dormant document woke");
            }
        }
        let after = self.registry.config().hibernate_after();
        if dormant
            || self.hibernation_armed
            || after.is_zero()
            || self.closing
            || self.encoded_estimate > HIBERNATE_UP_TO_BYTES
        {
            return;
        }
        self.hibernation_armed = true;
        self.changed_since_armed = false;
        ctx.run_later(after, |act, ctx| {
            act.hibernation_armed = false;
            if act.changed_since_armed || act.encoded_estimate > HIBERNATE_UP_TO_BYTES {
                // Changed within the period: look again one period from now.
                act.document_used(ctx);
                return;
            }
            let Some(doc) = act.document.as_mut() else {
                return;
            };
            if doc.hibernate() {
                METRICS.document_hibernations.inc();
                debug!(doc = %act.name, "document quiet, kept as bytes");
            }
            // Still live (blocks wait for missing predecessors): the check is armed again.
            act.document_used(ctx);
        });
    }

    /// Leaves the dormant-documents gauge when the document unloads.
    pub(super) fn uncount_dormant(&mut self) {
        if std::mem::take(&mut self.counted_dormant) {
            METRICS.documents_dormant.dec();
        }
    }
}
