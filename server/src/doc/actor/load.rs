//! Loading a document: from the local store, or from Redis in cluster mode.

use std::sync::Arc;

use collab_crdt::{Document, DocumentError};
use collab_storage::{Store, StoreError};
use tracing::info_span;

use crate::cluster::{Backlog, ClusterError, StreamPos};
use crate::doc::registry::Registry;

/// What loading produced: the document and where its log stands.
pub(super) struct Loaded {
    pub(super) document: Document,
    pub(super) next_seq: u64,
    pub(super) log_count: u64,
    pub(super) log_bytes: u64,
    pub(super) snapshot_bytes: u64,
    /// Cluster mode: the last stream id the loaded content covers.
    pub(super) position: StreamPos,
    /// Cluster mode: the stream entries after the snapshot.
    pub(super) backlog: Backlog,
}

#[derive(Debug, thiserror::Error)]
pub(super) enum LoadError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Document(#[from] DocumentError),
    #[error("load task failed: {0}")]
    Task(String),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

/// Loads from Redis in cluster mode, else from the local store.
pub(super) async fn load_doc(registry: &Registry, name: Arc<str>) -> Result<Loaded, LoadError> {
    if let Some(cluster) = registry.cluster() {
        let stored = cluster.load(&name).await?;
        let document = Document::load(
            stored.snapshot.as_deref(),
            stored.updates.iter().map(|(_, u)| u.as_slice()),
        )?;
        let mut backlog = Backlog::default();
        for (id, u) in &stored.updates {
            backlog.push(*id, u.len() as u64);
        }
        return Ok(Loaded {
            document,
            next_seq: 0,
            log_count: backlog.count(),
            log_bytes: backlog.bytes(),
            snapshot_bytes: stored.snapshot.as_ref().map_or(0, |s| s.len() as u64),
            position: stored.position,
            backlog,
        });
    }
    let store = registry.store();
    let span = info_span!("load", doc = %name);
    tokio::task::spawn_blocking(move || {
        let _g = span.enter();
        load(store.as_ref(), &name)
    })
    .await
    .map_err(|e| LoadError::Task(e.to_string()))
    .and_then(|r| r)
}

pub(super) fn load(store: &dyn Store, name: &str) -> Result<Loaded, LoadError> {
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
        position: StreamPos::ZERO,
        backlog: Backlog::default(),
    })
}
