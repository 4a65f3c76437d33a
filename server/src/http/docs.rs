//! `/api/docs`: list documents, read one as JSON or as a Yjs update, write an update into it,
//! delete it. Every read and write of content goes through the document's actor, so the API
//! sees and makes exactly what WebSocket clients see and make, under the same durability rule.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use base64::Engine;
use collab_crdt::StateVector;
use serde::Deserialize;
use serde_json::json;
use tracing::info;
use yrs::updates::decoder::Decode;

use super::api::{
    ask, authorize, authorize_admin, blocking, doc_name, json_ok, read_body, rfc3339_ms, traced,
    ApiError, ApiResult, Intent,
};
use super::catalog::{self, exists};
use super::HttpState;
use crate::doc::messages::{ApplyUpdate, DeleteDoc, ReadState};

const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

#[derive(Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    prefix: String,
    limit: Option<usize>,
    cursor: Option<String>,
}

/// `GET /api/docs?prefix=&limit=&cursor=`: names in byte order with size, update count and
/// last change. `cursor` is the `next_cursor` of the previous page (base64url of the last
/// name), so a page never repeats or skips a name that exists throughout.
pub async fn list(state: web::Data<HttpState>, req: HttpRequest) -> ApiResult {
    authorize_admin(&state, &req)?;
    let query = web::Query::<ListQuery>::from_query(req.query_string())
        .map_err(|e| ApiError::BadRequest(e.to_string()))?
        .into_inner();
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::BadRequest(format!(
            "limit must be 1 to {MAX_PAGE}"
        )));
    }
    let after = match &query.cursor {
        None => None,
        Some(c) => Some(
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(c)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| ApiError::BadRequest("cursor is not one this server gave".into()))?,
        ),
    };
    let mut names: Vec<String> = catalog::names(&state)
        .await?
        .into_iter()
        .filter(|n| n.starts_with(&query.prefix))
        .filter(|n| after.as_ref().is_none_or(|a| n > a))
        .collect();
    names.sort();
    let more = names.len() > limit;
    names.truncate(limit);
    let mut docs = Vec::with_capacity(names.len());
    for name in &names {
        // A document deleted since the listing began is skipped, not an error.
        if let Some(s) = catalog::stats(&state, name).await? {
            docs.push(json!({
                "name": name,
                "size": s.size_bytes,
                "updates": s.updates,
                "versions": s.versions,
                "last_modified": rfc3339_ms(s.last_modified_ms),
            }));
        }
    }
    let next = more
        .then(|| {
            names
                .last()
                .map(|n| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(n))
        })
        .flatten();
    Ok(json_ok(json!({ "docs": docs, "next_cursor": next })))
}

/// `GET /api/docs/{name}`: every root type rendered as JSON.
pub async fn content(state: web::Data<HttpState>, req: HttpRequest) -> ApiResult {
    let name = doc_name(&req)?;
    traced("content", &name, async {
        authorize(&state, &req, &name, Intent::Read)?;
        if !exists(&state, &name).await? {
            return Err(ApiError::NotFound);
        }
        let update = ask(&state, &name, || ReadState { sv: None }).await?;
        let json = blocking(move || collab_crdt::render_json(&update))
            .await?
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok(json_ok(json))
    })
    .await
}

/// A state vector from `?sv=`, in standard or URL-safe base64 (padded or not). A `+` that was
/// not percent-encoded arrives as a space, which is mapped back.
fn state_vector(param: &str) -> Result<StateVector, ApiError> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let text = param.trim().replace(' ', "+");
    let bytes = [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|e| e.decode(&text).ok())
        .ok_or_else(|| ApiError::BadRequest("sv is not base64".into()))?;
    StateVector::decode_v1(&bytes)
        .map_err(|e| ApiError::BadRequest(format!("sv is not a Yjs state vector: {e}")))
}

/// `GET /api/docs/{name}/update[?sv=]`: the state as a Yjs v1 update, or what `sv` lacks.
pub async fn get_update(state: web::Data<HttpState>, req: HttpRequest) -> ApiResult {
    let name = doc_name(&req)?;
    traced("get_update", &name, async {
        authorize(&state, &req, &name, Intent::Read)?;
        let sv = form_urlencoded::parse(req.query_string().as_bytes())
            .find(|(k, _)| k == "sv")
            .map(|(_, v)| state_vector(&v))
            .transpose()?;
        if !exists(&state, &name).await? {
            return Err(ApiError::NotFound);
        }
        let update = ask(&state, &name, || ReadState { sv: sv.clone() }).await?;
        Ok(HttpResponse::Ok()
            .content_type("application/octet-stream")
            .body(update))
    })
    .await
}

/// `POST /api/docs/{name}/update`: a binary Yjs v1 update, applied like a client's. The 200
/// comes after the flush that makes it durable, and after it was sent to every connection.
pub async fn post_update(
    state: web::Data<HttpState>,
    req: HttpRequest,
    payload: web::Payload,
) -> ApiResult {
    let name = doc_name(&req)?;
    traced("post_update", &name, async {
        authorize(&state, &req, &name, Intent::Write)?;
        let limit = state.docs.config().max_message_size;
        let body = read_body(payload, &req, limit).await?;
        if body.is_empty() {
            return Err(ApiError::BadRequest(
                "the body must be a Yjs v1 update".into(),
            ));
        }
        // Checked here so a body that is not an update never reaches (or loads) the document.
        yrs::Update::decode_v1(&body)
            .map_err(|e| ApiError::BadRequest(format!("not a Yjs v1 update: {e}")))?;
        let applied = ask(&state, &name, || ApplyUpdate {
            update: body.clone(),
        })
        .await?;
        info!(
            bytes = body.len(),
            changed = applied.changed,
            "update applied from the API"
        );
        Ok(json_ok(json!({ "changed": applied.changed })))
    })
    .await
}

/// `DELETE /api/docs/{name}`: connections closed with 4404, storage and versions removed.
pub async fn delete(state: web::Data<HttpState>, req: HttpRequest) -> ApiResult {
    let name = doc_name(&req)?;
    traced("delete", &name, async {
        authorize(&state, &req, &name, Intent::Write)?;
        if !exists(&state, &name).await? {
            return Err(ApiError::NotFound);
        }
        ask(&state, &name, || DeleteDoc).await?;
        Ok(HttpResponse::NoContent()
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .finish())
    })
    .await
}
