//! Prometheus metrics. Every series the hot path touches is resolved once (labels included)
//! into a plain atomic handle, so counting costs one relaxed add; histograms are fixed-bucket
//! atomics. Label values come from small fixed sets: never a document name or a connection id.

use std::sync::LazyLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// The y-websocket message types, as label values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    SyncStep1,
    SyncStep2,
    Update,
    Awareness,
    QueryAwareness,
    Auth,
}

impl Kind {
    const ALL: [Kind; 6] = [
        Kind::SyncStep1,
        Kind::SyncStep2,
        Kind::Update,
        Kind::Awareness,
        Kind::QueryAwareness,
        Kind::Auth,
    ];

    fn label(self) -> &'static str {
        match self {
            Kind::SyncStep1 => "sync_step1",
            Kind::SyncStep2 => "sync_step2",
            Kind::Update => "update",
            Kind::Awareness => "awareness",
            Kind::QueryAwareness => "query_awareness",
            Kind::Auth => "auth",
        }
    }

    pub fn of(msg: &collab_crdt::ClientMessage) -> Kind {
        use collab_crdt::ClientMessage as M;
        match msg {
            M::SyncStep1(_) => Kind::SyncStep1,
            M::SyncStep2(_) => Kind::SyncStep2,
            M::Update(_) => Kind::Update,
            M::Awareness(_) => Kind::Awareness,
            M::QueryAwareness => Kind::QueryAwareness,
            M::Auth => Kind::Auth,
        }
    }
}

/// One counter per message type, resolved up front.
pub struct PerKind([IntCounter; 6]);

impl PerKind {
    fn new(vec: &IntCounterVec) -> Self {
        PerKind(Kind::ALL.map(|k| vec.with_label_values(&[k.label()])))
    }

    pub fn get(&self, kind: Kind) -> &IntCounter {
        &self.0[kind as usize]
    }
}

/// Why an update was refused, as label values.
pub enum Refusal {
    ReadOnly,
    Malformed,
    TooLarge,
}

/// Close codes are a small fixed set; anything else is counted as "other".
const CLOSE_CODES: [u16; 13] = [
    1000, 1001, 1002, 1003, 1007, 1008, 1009, 1011, 1013, 4401, 4403, 4404, 0,
];

pub struct Metrics {
    pub registry: Registry,
    pub connections: IntGauge,
    pub connections_opened: IntCounter,
    connections_closed: Vec<IntCounter>,
    connections_closed_other: IntCounter,
    pub upgrades_refused: IntCounterVec,
    pub messages_received: PerKind,
    pub bytes_received: PerKind,
    pub messages_sent: PerKind,
    pub bytes_sent: PerKind,
    pub updates_applied: IntCounter,
    updates_refused: [IntCounter; 3],
    pub documents_loaded: IntGauge,
    pub documents_dormant: IntGauge,
    pub document_hibernations: IntCounter,
    pub document_loads: IntCounter,
    pub document_unloads: IntCounter,
    pub connections_moved: IntCounter,
    pub broadcasts_paced: IntCounter,
    pub compactions: IntCounter,
    pub storage_errors: IntCounter,
    pub apply_seconds: Histogram,
    pub flush_seconds: Histogram,
    pub broadcast_delay_seconds: Histogram,
    pub load_seconds: Histogram,
    pub first_sync_bytes: Histogram,
    pub resident_memory_bytes: IntGauge,
    pub limit_events: IntCounterVec,
    pub redis_up: IntGauge,
    pub redis_append_seconds: Histogram,
    pub redis_read_lag_seconds: Histogram,
    pub redis_reloads: IntCounter,
    pub redis_trims: IntCounter,
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn counter_vec(registry: &Registry, name: &str, help: &str, label: &str) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .expect("valid metric");
    registry
        .register(Box::new(h.clone()))
        .expect("unique metric");
    h
}

/// 10 µs to 10 s.
fn seconds_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.00001, 4.0, 11).expect("buckets")
}

/// 64 B to 64 MiB.
fn bytes_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(64.0, 4.0, 11).expect("buckets")
}

impl Metrics {
    fn new() -> Metrics {
        let r = Registry::new();
        let closed = counter_vec(
            &r,
            "collab_connections_closed_total",
            "WebSocket connections closed, by the close code the server sent (0: the client closed or the socket was lost).",
            "code",
        );
        let refused = counter_vec(
            &r,
            "collab_updates_refused_total",
            "Document changes refused, by reason: read_only, too_large, malformed (a frame that does not decode, or an update the document rejects).",
            "reason",
        );
        let messages_received = counter_vec(
            &r,
            "collab_messages_received_total",
            "y-websocket messages received, by type.",
            "type",
        );
        let bytes_received = counter_vec(
            &r,
            "collab_received_bytes_total",
            "Bytes of WebSocket messages received, by the type of their first y-websocket message.",
            "type",
        );
        let messages_sent = counter_vec(
            &r,
            "collab_messages_sent_total",
            "y-websocket messages queued to connections, by type (one per recipient).",
            "type",
        );
        let bytes_sent = counter_vec(
            &r,
            "collab_sent_bytes_total",
            "Bytes queued to connections, by message type (counted per recipient).",
            "type",
        );
        Metrics {
            redis_up: gauge(
                &r,
                "collab_redis_up",
                "Cluster mode: 1 while Redis answers, 0 while it does not (updates are refused).",
            ),
            redis_append_seconds: histogram(
                &r,
                "collab_redis_append_seconds",
                "Cluster mode: time of one group-commit pipeline of stream appends (XADD) until Redis acknowledged it.",
                seconds_buckets(),
            ),
            redis_read_lag_seconds: histogram(
                &r,
                "collab_redis_read_lag_seconds",
                "Cluster mode: age of another instance's update when this instance read it from the stream.",
                seconds_buckets(),
            ),
            redis_reloads: counter(
                &r,
                "collab_redis_reloads_total",
                "Cluster mode: documents reloaded from the snapshot because their stream was trimmed past this instance's read position.",
            ),
            redis_trims: counter(
                &r,
                "collab_redis_trims_total",
                "Cluster mode: compactions by this instance that wrote a snapshot and trimmed the stream.",
            ),
            connections: gauge(&r, "collab_connections", "Open WebSocket connections."),
            connections_opened: counter(
                &r,
                "collab_connections_opened_total",
                "WebSocket connections accepted.",
            ),
            connections_closed: CLOSE_CODES
                .iter()
                .map(|c| closed.with_label_values(&[&c.to_string()]))
                .collect(),
            connections_closed_other: closed.with_label_values(&["other"]),
            upgrades_refused: counter_vec(
                &r,
                "collab_upgrades_refused_total",
                "WebSocket upgrades refused, by HTTP status.",
                "status",
            ),
            messages_received: PerKind::new(&messages_received),
            bytes_received: PerKind::new(&bytes_received),
            messages_sent: PerKind::new(&messages_sent),
            bytes_sent: PerKind::new(&bytes_sent),
            updates_applied: counter(
                &r,
                "collab_updates_applied_total",
                "Document updates that changed a document (stored and broadcast).",
            ),
            updates_refused: ["read_only", "malformed", "too_large"]
                .map(|reason| refused.with_label_values(&[reason])),
            documents_loaded: gauge(&r, "collab_documents_loaded", "Documents in memory."),
            documents_dormant: gauge(
                &r,
                "collab_documents_dormant",
                "Loaded documents held as their encoded bytes only (quiet, or never edited).",
            ),
            document_hibernations: counter(
                &r,
                "collab_document_hibernations_total",
                "Times a quiet document let go of its yrs document (--hibernate-after-secs).",
            ),
            document_loads: counter(
                &r,
                "collab_document_loads_total",
                "Documents loaded from storage.",
            ),
            document_unloads: counter(
                &r,
                "collab_document_unloads_total",
                "Documents unloaded from memory.",
            ),
            connections_moved: counter(
                &r,
                "collab_connections_moved_total",
                "Connections moved, after the upgrade, to the worker thread running their document.",
            ),
            broadcasts_paced: counter(
                &r,
                "collab_broadcasts_paced_total",
                "Broadcasts held back so that one document's sends stay within --max-send-share of its thread.",
            ),
            compactions: counter(
                &r,
                "collab_compactions_total",
                "Update logs folded into a snapshot.",
            ),
            storage_errors: counter(
                &r,
                "collab_storage_errors_total",
                "Failed storage operations (appends, flushes, compactions, loads).",
            ),
            apply_seconds: histogram(
                &r,
                "collab_update_apply_seconds",
                "Time to apply one update to its document.",
                seconds_buckets(),
            ),
            flush_seconds: histogram(
                &r,
                "collab_flush_seconds",
                "Time of one group-commit flush (fsync).",
                seconds_buckets(),
            ),
            broadcast_delay_seconds: histogram(
                &r,
                "collab_broadcast_delay_seconds",
                "Time from receiving an update to queueing its broadcast (durability included).",
                seconds_buckets(),
            ),
            load_seconds: histogram(
                &r,
                "collab_document_load_seconds",
                "Time to load a document from storage.",
                seconds_buckets(),
            ),
            first_sync_bytes: histogram(
                &r,
                "collab_first_sync_bytes",
                "Size of the SyncStep2 that answers a client's first SyncStep1.",
                bytes_buckets(),
            ),
            resident_memory_bytes: gauge(
                &r,
                "collab_process_resident_memory_bytes",
                "Resident memory of the process.",
            ),
            limit_events: counter_vec(
                &r,
                "collab_limit_events_total",
                "Limits and failures that fired, by event (see README, Limits).",
                "event",
            ),
            registry: r,
        }
    }

    /// Counts a closed connection by the close code sent (`None`: the client closed).
    pub fn connection_closed(&self, code: Option<u16>) {
        let code = code.unwrap_or(0);
        match CLOSE_CODES.iter().position(|c| *c == code) {
            Some(i) => self.connections_closed[i].inc(),
            None => self.connections_closed_other.inc(),
        }
    }

    pub fn update_refused(&self, why: Refusal) {
        self.updates_refused[why as usize].inc();
    }
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// Resident memory of this process, from /proc (0 where it cannot be read).
fn resident_bytes() -> i64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: i64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    // The page size is 4 KiB on every platform collab is built for (x86-64, aarch64 Linux).
    pages * 4096
}

/// Values sampled at scrape time rather than counted as they happen.
#[derive(Default)]
pub struct Sampled {
    /// Connections of each loaded document.
    pub connections_per_document: Vec<usize>,
    /// Messages waiting in each connection's outbound queue.
    pub queue_depths: Vec<usize>,
}

fn snapshot_histogram(
    name: &str,
    help: &str,
    buckets: Vec<f64>,
    values: &[usize],
) -> Vec<prometheus::proto::MetricFamily> {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &[])
        .expect("valid metric");
    let child = h.with_label_values::<&str>(&[]);
    for v in values {
        child.observe(*v as f64);
    }
    prometheus::core::Collector::collect(&h)
}

/// The text exposition of every metric.
pub fn render(sampled: &Sampled) -> String {
    let m = &*METRICS;
    m.resident_memory_bytes.set(resident_bytes());
    let mut families = m.registry.gather();
    families.extend(snapshot_histogram(
        "collab_document_connections",
        "Connections per loaded document, sampled at this scrape.",
        vec![0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 64.0, 256.0, 1024.0, 4096.0],
        &sampled.connections_per_document,
    ));
    families.extend(snapshot_histogram(
        "collab_outbound_queue_depth",
        "Messages waiting in each connection's outbound queue, sampled at this scrape.",
        vec![0.0, 1.0, 4.0, 16.0, 64.0, 256.0, 1024.0],
        &sampled.queue_depths,
    ));
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&families, &mut out)
        .expect("text encoding of gathered metrics");
    String::from_utf8(out).expect("prometheus text is UTF-8")
}
