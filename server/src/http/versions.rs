//! `/api/docs/{name}/versions`: named versions of a document, and restoring one.
//!
//! A version is the document's whole state (a Yjs v1 update) at that moment, stored beside the
//! document (in sled, or in Redis in cluster mode). The live document runs with garbage collection on, so a Yjs snapshot
//! (state vector + delete set) could not bring back content deleted before it was taken; a
//! whole state needs nothing else to be read, is served as is, survives compaction untouched,
//! and costs one document's size per version.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use collab_storage::VersionMeta;
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::info;

use super::api::{
    ask, authorize, blocking, doc_name, json_ok, read_body, rfc3339_ms, traced, ApiError,
    ApiResult, Intent,
};
use super::catalog::{self, exists};
use super::HttpState;
use crate::doc::messages::{ApplyUpdate, ReadState};

const MAX_LABEL: usize = 256;
const MAX_BODY: usize = 64 * 1024;

fn describe(v: &VersionMeta) -> Value {
    json!({
        "id": v.id,
        "label": v.label,
        "time": rfc3339_ms(v.created_at_ms),
        "size": v.size,
    })
}

/// The `{id}` of `/api/docs/{name}/versions/{id}...`.
fn version_id(req: &HttpRequest) -> Result<u64, ApiError> {
    req.match_info()
        .get("id")
        .and_then(|id| id.parse().ok())
        .ok_or_else(|| ApiError::BadRequest("a version id is a number".into()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewVersion {
    #[serde(default)]
    label: String,
}

/// `POST /api/docs/{name}/versions` with `{"label": "..."}`: 201 with the stored version.
pub async fn create(
    state: web::Data<HttpState>,
    req: HttpRequest,
    payload: web::Payload,
) -> ApiResult {
    let name = doc_name(&req)?;
    traced("create_version", &name, async {
        authorize(&state, &req, &name, Intent::Write)?;
        let body = read_body(payload, &req, MAX_BODY).await?;
        let request: NewVersion = if body.iter().all(u8::is_ascii_whitespace) {
            NewVersion {
                label: String::new(),
            }
        } else {
            serde_json::from_slice(&body)
                .map_err(|e| ApiError::BadRequest(format!("invalid body: {e}")))?
        };
        if request.label.len() > MAX_LABEL {
            return Err(ApiError::BadRequest(format!(
                "label is over {MAX_LABEL} bytes"
            )));
        }
        if !exists(&state, &name).await? {
            return Err(ApiError::NotFound);
        }
        // Answered once durable, so a version never holds content that a crash could lose.
        let update = ask(&state, &name, || ReadState { sv: None }).await?;
        let version = catalog::put_version(&state, &name, &request.label, update).await?;
        info!(id = version.id, size = version.size, "version stored");
        Ok(HttpResponse::Created().json(describe(&version)))
    })
    .await
}

/// `GET /api/docs/{name}/versions`: oldest first.
pub async fn list(state: web::Data<HttpState>, req: HttpRequest) -> ApiResult {
    let name = doc_name(&req)?;
    traced("list_versions", &name, async {
        authorize(&state, &req, &name, Intent::Read)?;
        if !exists(&state, &name).await? {
            return Err(ApiError::NotFound);
        }
        let versions = catalog::versions(&state, &name).await?;
        let versions: Vec<Value> = versions.iter().map(describe).collect();
        Ok(json_ok(json!({ "versions": versions })))
    })
    .await
}

async fn load_version(
    state: &HttpState,
    name: &str,
    id: u64,
) -> Result<(VersionMeta, Vec<u8>), ApiError> {
    catalog::version(state, name, id)
        .await?
        .ok_or(ApiError::VersionNotFound)
}

/// `GET /api/docs/{name}/versions/{id}`: JSON like `GET /api/docs/{name}`, or the state as a
/// Yjs update with `Accept: application/octet-stream`.
pub async fn get(state: web::Data<HttpState>, req: HttpRequest) -> ApiResult {
    let name = doc_name(&req)?;
    traced("get_version", &name, async {
        authorize(&state, &req, &name, Intent::Read)?;
        let id = version_id(&req)?;
        let (_, update) = load_version(&state, &name, id).await?;
        let binary = req
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("application/octet-stream"));
        if binary {
            return Ok(HttpResponse::Ok()
                .content_type("application/octet-stream")
                .body(update));
        }
        let json = blocking(move || collab_crdt::render_json(&update))
            .await?
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok(json_ok(json))
    })
    .await
}

/// `POST /api/docs/{name}/versions/{id}/restore`: the live content becomes the version's,
/// through a new update that every connected client receives. Edits made while the restore is
/// computed are kept, merged on top of it like any concurrent edit.
pub async fn restore(state: web::Data<HttpState>, req: HttpRequest) -> ApiResult {
    let name = doc_name(&req)?;
    traced("restore_version", &name, async {
        authorize(&state, &req, &name, Intent::Write)?;
        let id = version_id(&req)?;
        let (_, version) = load_version(&state, &name, id).await?;
        let current = ask(&state, &name, || ReadState { sv: None }).await?;
        // Computed off the actor: it builds two private copies of the document.
        let update = blocking(move || collab_crdt::restore_update(&current, &version))
            .await?
            .map_err(|e| ApiError::Internal(format!("cannot compute the restore: {e}")))?;
        let changed = match update {
            None => false,
            Some(update) => {
                let update = web::Bytes::from(update);
                ask(&state, &name, || ApplyUpdate {
                    update: update.clone(),
                })
                .await?
                .changed
            }
        };
        info!(id, changed, "version restored");
        Ok(json_ok(json!({ "restored": id, "changed": changed })))
    })
    .await
}
