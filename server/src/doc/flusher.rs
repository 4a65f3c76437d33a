//! Group commit: one storage flush (one fsync) covers every write that was made before it
//! started, across all documents.
//!
//! A failed flush is retried a few times (a transient EMFILE or ENOSPC may clear). If it keeps
//! failing the server is told to shut down: nothing unflushed was ever shown to a client, and a
//! supervisor's restart reopens storage, whereas serving on would fail every edit silently.

use std::sync::Arc;
use std::time::Duration;

use collab_storage::{Store, StoreError};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, warn};

use crate::counters::count;
use crate::telemetry::METRICS;

type Waiter = oneshot::Sender<Result<(), Arc<StoreError>>>;

/// Waits before each retry of a failed flush.
const RETRY_BACKOFF: [Duration; 3] = [
    Duration::from_millis(100),
    Duration::from_millis(400),
    Duration::from_millis(1600),
];

#[derive(Clone)]
pub struct Flusher {
    tx: mpsc::UnboundedSender<Waiter>,
}

#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    #[error("flush failed: {0}")]
    Store(Arc<StoreError>),
    #[error("the flusher has stopped")]
    Stopped,
}

async fn flush_once(store: &Arc<dyn Store>, delay: Duration) -> Result<(), Arc<StoreError>> {
    let store = store.clone();
    let timer = METRICS.flush_seconds.start_timer();
    let result = tokio::task::spawn_blocking(move || {
        std::thread::sleep(delay);
        store.flush()
    })
    .await;
    timer.observe_duration();
    match result {
        Ok(r) => r.map_err(Arc::new),
        Err(join) => Err(Arc::new(StoreError::Corrupt {
            doc: String::new(),
            what: format!("flush task failed: {join}"),
        })),
    }
}

impl Flusher {
    /// Starts the flusher task on the current runtime. Each document actor has at most one
    /// request outstanding, so the unbounded queue is bounded by the number of open documents.
    /// `fatal` receives the reason when storage cannot be flushed even after retries.
    pub fn start(
        store: Arc<dyn Store>,
        delay: Duration,
        fatal: watch::Sender<Option<String>>,
    ) -> Flusher {
        let (tx, mut rx) = mpsc::unbounded_channel::<Waiter>();
        actix_rt::spawn(async move {
            while let Some(first) = rx.recv().await {
                // Every waiter queued now wrote before this flush starts, so this flush covers it.
                let mut waiters = vec![first];
                while let Ok(w) = rx.try_recv() {
                    waiters.push(w);
                }
                let mut result = flush_once(&store, delay).await;
                for backoff in RETRY_BACKOFF {
                    let Err(e) = &result else { break };
                    count(|c| &c.storage_flush_failures);
                    METRICS.storage_errors.inc();
                    warn!(error = %e, retry_in = ?backoff, "storage flush failed; retrying");
                    tokio::time::sleep(backoff).await;
                    result = flush_once(&store, delay).await;
                }
                if let Err(e) = &result {
                    count(|c| &c.storage_flush_failures);
                    error!(error = %e, "storage flush keeps failing; the server will stop");
                    fatal.send_replace(Some(e.to_string()));
                }
                for w in waiters {
                    let _ = w.send(result.clone());
                }
            }
        });
        Flusher { tx }
    }

    /// Resolves once everything written before the call is durable.
    pub async fn flush(&self) -> Result<(), FlushError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(tx).map_err(|_| FlushError::Stopped)?;
        rx.await
            .map_err(|_| FlushError::Stopped)?
            .map_err(FlushError::Store)
    }
}
