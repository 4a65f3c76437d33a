//! `POST /api/backup` (admin key): writes a backup of every document into a folder on the
//! server, in the format of `collab backup`, while editing goes on. Each document is consistent
//! on its own: a loaded one is its actor's state (answered once durable), an unloaded one is
//! rebuilt from storage (Redis in cluster mode, so one instance backs up the whole cluster).

use std::path::PathBuf;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;
use tracing::{info, warn};

use super::api::blocking;
use super::tokens::admin_refusal;
use super::{json_error, HttpState};
use crate::doc::messages::{DocError, ReadState};
use crate::tools::backup::{self, BackupError, Skipped};
use crate::tools::{load_document, ToolError};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupRequest {
    path: PathBuf,
}

fn refusal(e: &BackupError) -> HttpResponse {
    let status = match e {
        BackupError::Relative(_) => StatusCode::BAD_REQUEST,
        BackupError::TargetNotEmpty(_) => StatusCode::CONFLICT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    if status.is_server_error() {
        warn!(error = %e, "backup failed");
    } else {
        info!(error = %e, "backup refused");
    }
    json_error(status, e.to_string())
}

fn internal(e: impl std::fmt::Display) -> HttpResponse {
    warn!(error = %e, "backup failed");
    json_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("backup failed: {e}"),
    )
}

fn internal_tool(e: impl std::fmt::Display) -> ToolError {
    ToolError::Internal(e.to_string())
}

/// One document's state: through its actor when loaded, else from storage (Redis in cluster
/// mode). `None`: the
/// document is gone (deleted since the listing).
async fn state_of(state: &HttpState, name: &str) -> Result<Option<Vec<u8>>, ToolError> {
    for attempt in 0..10u64 {
        if attempt > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(10 * attempt)).await;
        }
        if let Some(addr) = state.docs.loaded(name) {
            match addr.send(ReadState { sv: None }).await {
                Ok(Ok(bytes)) => return Ok(Some(bytes)),
                // Unloading (or loading failed and it stops): ask again, then from storage.
                Ok(Err(DocError::Closing | DocError::Deleting)) | Err(_) => continue,
                Ok(Err(e)) => {
                    return Err(ToolError::Damaged {
                        name: name.to_owned(),
                        why: e.to_string(),
                    })
                }
            }
        }
        if let Some(cluster) = state.docs.cluster() {
            if !cluster.exists(name).await.map_err(internal_tool)? {
                return Ok(None);
            }
            let stored = cluster.load(name).await.map_err(internal_tool)?;
            let doc = collab_crdt::Document::load(
                stored.snapshot.as_deref(),
                stored.updates.iter().map(|(_, u)| u.as_slice()),
            )
            .map_err(|e| ToolError::Damaged {
                name: name.to_owned(),
                why: e.to_string(),
            })?;
            return Ok(Some(doc.encode_state()));
        }
        let store = state.docs.store();
        let owned = name.to_owned();
        let read = blocking(move || -> Result<Option<Vec<u8>>, ToolError> {
            if store.stats(&owned)?.is_none() {
                return Ok(None);
            }
            Ok(Some(load_document(store.as_ref(), &owned)?.encode_state()))
        })
        .await
        .map_err(|e| ToolError::Internal(e.to_string()))?;
        return read;
    }
    Err(ToolError::Damaged {
        name: name.to_owned(),
        why: "the document kept closing".into(),
    })
}

pub async fn backup(
    state: web::Data<HttpState>,
    req: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    if let Some(res) = admin_refusal(&state, &req) {
        return res;
    }
    let request: BackupRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, format!("invalid body: {e}")),
    };
    let dir = request.path;
    if !dir.is_absolute() {
        return refusal(&BackupError::Relative(dir));
    }
    let target = dir.clone();
    match blocking(move || backup::prepare_target(&target)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return refusal(&e),
        Err(e) => return internal(e),
    }
    let names = match super::catalog::names(&state).await {
        Ok(names) => names,
        Err(e) => return internal(e),
    };
    let started = std::time::Instant::now();
    let mut entries = Vec::with_capacity(names.len());
    let mut skipped = Vec::new();
    for name in names {
        let bytes = match state_of(&state, &name).await {
            Ok(Some(bytes)) => bytes,
            Ok(None) => continue,
            Err(ToolError::Damaged { why, .. }) => {
                warn!(doc = %name, why = %why, "backup: document left out, it does not load");
                skipped.push(Skipped { name, why });
                continue;
            }
            Err(e) => return internal(e),
        };
        let target = dir.clone();
        match blocking(move || backup::write_entry(&target, &name, &bytes)).await {
            Ok(Ok(entry)) => entries.push(entry),
            Ok(Err(e)) => return refusal(&e),
            Err(e) => return internal(e),
        }
    }
    let target = dir.clone();
    let manifest = match blocking(move || backup::finish(&target, entries)).await {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => return refusal(&e),
        Err(e) => return internal(e),
    };
    info!(
        path = %dir.display(),
        documents = manifest.documents.len(),
        bytes = manifest.total_bytes(),
        skipped = skipped.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "backup written"
    );
    HttpResponse::Ok().json(json!({
        "path": dir,
        "manifest": backup::MANIFEST,
        "format": manifest.format,
        "version": manifest.version,
        "created": manifest.created,
        "documents": manifest.documents.len(),
        "bytes": manifest.total_bytes(),
        "skipped": skipped,
    }))
}
