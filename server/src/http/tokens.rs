//! `POST /api/tokens`: mint a document token with the admin key.

use std::time::{Duration, SystemTime};

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use tracing::info;

use super::{json_error, HttpState};
use crate::auth::{bearer, MintError, Perm};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MintRequest {
    doc: String,
    perm: Perm,
    ttl_secs: u64,
    #[serde(default)]
    sub: Option<String>,
}

/// Checks `Authorization: Bearer <admin key>`; `Some` is the refusal to send: 404 when the
/// server has no admin key (the endpoint does not exist), 401 otherwise.
pub fn admin_refusal(state: &HttpState, req: &HttpRequest) -> Option<HttpResponse> {
    let Some(key) = &state.admin_key else {
        return Some(json_error(StatusCode::NOT_FOUND, "not found"));
    };
    let presented = bearer(
        req.headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
    );
    match presented {
        Some(p) if key.matches(p) => None,
        _ => {
            info!(path = %req.path(), "admin request refused: missing or wrong admin key");
            let mut res = json_error(StatusCode::UNAUTHORIZED, "a valid admin key is required");
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            Some(res)
        }
    }
}

pub async fn mint(state: web::Data<HttpState>, req: HttpRequest, body: web::Bytes) -> HttpResponse {
    if let Some(res) = admin_refusal(&state, &req) {
        return res;
    }
    let request: MintRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, format!("invalid body: {e}")),
    };
    let minted = state.auth.mint(
        &request.doc,
        request.perm,
        Duration::from_secs(request.ttl_secs),
        request.sub.clone(),
        SystemTime::now(),
    );
    match minted {
        Ok(m) => {
            info!(doc = %request.doc, perm = ?request.perm, ttl_secs = request.ttl_secs, sub = request.sub.as_deref().unwrap_or(""), "token minted");
            HttpResponse::Ok().json(m)
        }
        Err(e @ MintError::NoSecret) => json_error(StatusCode::CONFLICT, e.to_string()),
        Err(e) => json_error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}
