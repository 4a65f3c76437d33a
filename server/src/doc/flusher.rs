//! Group commit: one storage flush (one fsync) covers every write that was made before it
//! started, across all documents.

use std::sync::Arc;

use collab_storage::{Store, StoreError};
use tokio::sync::{mpsc, oneshot};
use tracing::error;

type Waiter = oneshot::Sender<Result<(), Arc<StoreError>>>;

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

impl Flusher {
    /// Starts the flusher task on the current runtime. Each document actor has at most one
    /// request outstanding, so the unbounded queue is bounded by the number of open documents.
    pub fn start(store: Arc<dyn Store>, delay: std::time::Duration) -> Flusher {
        let (tx, mut rx) = mpsc::unbounded_channel::<Waiter>();
        actix_rt::spawn(async move {
            while let Some(first) = rx.recv().await {
                // Every waiter queued now wrote before this flush starts, so this flush covers it.
                let mut waiters = vec![first];
                while let Ok(w) = rx.try_recv() {
                    waiters.push(w);
                }
                let store = store.clone();
                let result = match tokio::task::spawn_blocking(move || {
                    std::thread::sleep(delay);
                    store.flush()
                })
                .await
                {
                    Ok(r) => r.map_err(Arc::new),
                    Err(join) => Err(Arc::new(StoreError::Corrupt {
                        doc: String::new(),
                        what: format!("flush task failed: {join}"),
                    })),
                };
                if let Err(e) = &result {
                    error!(error = %e, "storage flush failed");
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
