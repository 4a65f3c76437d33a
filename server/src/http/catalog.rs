//! What the document API reads and writes besides live content (which documents exist, their
//! sizes, versions), from Redis in cluster mode and from the local store otherwise, so the
//! handlers do not care which.

use collab_storage::{DocStats, VersionMeta};

use super::api::{blocking, ApiError};
use super::HttpState;

/// Whether the document has anything stored (an open document nobody wrote to has not).
pub async fn exists(state: &HttpState, name: &str) -> Result<bool, ApiError> {
    if let Some(cluster) = state.docs.cluster() {
        return Ok(cluster.exists(name).await?);
    }
    let store = state.docs.store();
    let name = name.to_owned();
    // Not `meta`: a document is stored from its first append, its metadata only from its first
    // compaction.
    Ok(blocking(move || store.stats(&name)).await??.is_some())
}

pub async fn stats(state: &HttpState, name: &str) -> Result<Option<DocStats>, ApiError> {
    if let Some(cluster) = state.docs.cluster() {
        return Ok(cluster.stats(name).await?);
    }
    let store = state.docs.store();
    let name = name.to_owned();
    Ok(blocking(move || store.stats(&name)).await??)
}

/// Every stored document's name, unordered.
pub async fn names(state: &HttpState) -> Result<Vec<String>, ApiError> {
    if let Some(cluster) = state.docs.cluster() {
        return Ok(cluster.list().await?);
    }
    let store = state.docs.store();
    Ok(blocking(move || store.list()).await??)
}

/// Stores a version and answers once it is durable.
pub async fn put_version(
    state: &HttpState,
    name: &str,
    label: &str,
    update: Vec<u8>,
) -> Result<VersionMeta, ApiError> {
    if let Some(cluster) = state.docs.cluster() {
        return Ok(cluster.put_version(name, label, update).await?);
    }
    let store = state.docs.store();
    let (doc, label) = (name.to_owned(), label.to_owned());
    let version = blocking(move || store.put_version(&doc, &label, &update)).await??;
    state
        .docs
        .flusher()
        .flush(name, false)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(version)
}

pub async fn versions(state: &HttpState, name: &str) -> Result<Vec<VersionMeta>, ApiError> {
    if let Some(cluster) = state.docs.cluster() {
        return Ok(cluster.versions(name).await?);
    }
    let store = state.docs.store();
    let doc = name.to_owned();
    Ok(blocking(move || store.versions(&doc)).await??)
}

pub async fn version(
    state: &HttpState,
    name: &str,
    id: u64,
) -> Result<Option<(VersionMeta, Vec<u8>)>, ApiError> {
    if let Some(cluster) = state.docs.cluster() {
        return Ok(cluster.version(name, id).await?);
    }
    let store = state.docs.store();
    let doc = name.to_owned();
    Ok(blocking(move || store.version(&doc, id)).await??)
}
