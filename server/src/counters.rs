//! Counts of every limit and failure that fires, as plain atomics: the hot path pays one
//! relaxed increment, and the metrics endpoint reads them.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct Counters {
    /// Upgrades refused: total connection cap (503).
    pub refused_connection_cap: AtomicU64,
    /// Upgrades refused: --max-connections-per-ip (429).
    pub refused_per_ip: AtomicU64,
    /// Upgrades refused: --max-connections-per-doc (503).
    pub refused_per_doc: AtomicU64,
    /// Times a connection's reading was paused by its rate limit.
    pub rate_limit_pauses: AtomicU64,
    /// Connections closed (1008) for staying over their rate.
    pub rate_limit_closes: AtomicU64,
    /// Updates refused by --max-document-bytes (1009).
    pub document_too_large: AtomicU64,
    /// Awareness states refused by --max-awareness-bytes (1009).
    pub awareness_too_large: AtomicU64,
    /// Large incoming messages that had to wait for --max-incoming-bytes.
    pub incoming_budget_waits: AtomicU64,
    /// Large incoming messages refused (1013) after waiting for the budget too long.
    pub incoming_budget_refusals: AtomicU64,
    /// Messages over --max-message-size (1009, lingering close).
    pub oversized_messages: AtomicU64,
    /// Idle documents unloaded early because --max-loaded-documents was reached.
    pub documents_evicted: AtomicU64,
    /// Joins refused (1013) because every loaded document was in use.
    pub loaded_documents_full: AtomicU64,
    /// Sockets aborted because a close frame could not be written in time.
    pub close_write_timeouts: AtomicU64,
    /// Storage flushes that failed (each retry counts).
    pub storage_flush_failures: AtomicU64,
}

impl Counters {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

pub static COUNTERS: Counters = Counters {
    refused_connection_cap: AtomicU64::new(0),
    refused_per_ip: AtomicU64::new(0),
    refused_per_doc: AtomicU64::new(0),
    rate_limit_pauses: AtomicU64::new(0),
    rate_limit_closes: AtomicU64::new(0),
    document_too_large: AtomicU64::new(0),
    awareness_too_large: AtomicU64::new(0),
    incoming_budget_waits: AtomicU64::new(0),
    incoming_budget_refusals: AtomicU64::new(0),
    oversized_messages: AtomicU64::new(0),
    documents_evicted: AtomicU64::new(0),
    loaded_documents_full: AtomicU64::new(0),
    close_write_timeouts: AtomicU64::new(0),
    storage_flush_failures: AtomicU64::new(0),
};

/// Increments one of [`COUNTERS`].
pub fn count(pick: impl FnOnce(&'static Counters) -> &'static AtomicU64) {
    Counters::bump(pick(&COUNTERS));
}
