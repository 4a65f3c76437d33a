//! Counts of every limit and failure that fires, exported as
//! `collab_limit_events_total{event="..."}`: the hot path pays one relaxed increment on a
//! handle resolved once.

use std::sync::LazyLock;

use prometheus::IntCounter;

use crate::telemetry::METRICS;

pub struct Counters {
    /// Upgrades refused: total connection cap (503).
    pub refused_connection_cap: IntCounter,
    /// Upgrades refused: --max-connections-per-ip (429).
    pub refused_per_ip: IntCounter,
    /// Upgrades refused: --max-connections-per-doc (503).
    pub refused_per_doc: IntCounter,
    /// Times a connection's reading was paused by its rate limit.
    pub rate_limit_pauses: IntCounter,
    /// Connections closed (1008) for staying over their rate.
    pub rate_limit_closes: IntCounter,
    /// Updates refused by --max-document-bytes (1009).
    pub document_too_large: IntCounter,
    /// Awareness states refused by --max-awareness-bytes (1009).
    pub awareness_too_large: IntCounter,
    /// Large incoming messages that had to wait for --max-incoming-bytes.
    pub incoming_budget_waits: IntCounter,
    /// Large incoming messages refused (1013) after waiting for the budget too long.
    pub incoming_budget_refusals: IntCounter,
    /// Messages over --max-message-size (1009, lingering close).
    pub oversized_messages: IntCounter,
    /// Idle documents unloaded early because --max-loaded-documents was reached.
    pub documents_evicted: IntCounter,
    /// Joins refused (1013) because every loaded document was in use.
    pub loaded_documents_full: IntCounter,
    /// Sockets aborted because a close frame could not be written in time.
    pub close_write_timeouts: IntCounter,
    /// Storage flushes that failed (each retry counts).
    pub storage_flush_failures: IntCounter,
    /// Upgrades refused (503) because Redis did not answer (cluster mode).
    pub refused_redis_down: IntCounter,
}

pub static COUNTERS: LazyLock<Counters> = LazyLock::new(|| {
    let event = |name: &str| METRICS.limit_events.with_label_values(&[name]);
    Counters {
        refused_connection_cap: event("refused_connection_cap"),
        refused_per_ip: event("refused_per_ip"),
        refused_per_doc: event("refused_per_doc"),
        rate_limit_pauses: event("rate_limit_pauses"),
        rate_limit_closes: event("rate_limit_closes"),
        document_too_large: event("document_too_large"),
        awareness_too_large: event("awareness_too_large"),
        incoming_budget_waits: event("incoming_budget_waits"),
        incoming_budget_refusals: event("incoming_budget_refusals"),
        oversized_messages: event("oversized_messages"),
        documents_evicted: event("documents_evicted"),
        loaded_documents_full: event("loaded_documents_full"),
        close_write_timeouts: event("close_write_timeouts"),
        storage_flush_failures: event("storage_flush_failures"),
        refused_redis_down: event("refused_redis_down"),
    }
});

/// Increments one of [`COUNTERS`].
pub fn count(pick: impl FnOnce(&'static Counters) -> &'static IntCounter) {
    pick(&COUNTERS).inc();
}
