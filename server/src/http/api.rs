//! What every `/api/docs` endpoint shares: its error type (JSON `{"error": ...}` with the
//! status), credentials, the document name in the path, bodies, and asking a document's actor.

use std::time::SystemTime;

use actix::dev::ToEnvelope;
use actix::{Handler, Message};
use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use collab_storage::StoreError;
use futures_util::StreamExt;
use percent_encoding::percent_decode_str;
use tracing::Instrument;

use super::{json_error, HttpState};
use crate::auth::{bearer, presented_token, AuthError};
use crate::config::MAX_DOC_NAME_LEN;
use crate::doc::actor::DocActor;
use crate::doc::messages::DocError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("a valid admin key is required")]
    AdminOnly,
    #[error("this token is read-only")]
    ReadOnly,
    #[error("the document name must be one percent-encoded path segment of 1 to {MAX_DOC_NAME_LEN} bytes of UTF-8")]
    BadName,
    #[error("document not found")]
    NotFound,
    #[error("version not found")]
    VersionNotFound,
    #[error("{0}")]
    BadRequest(String),
    #[error("the body exceeds the {0}-byte limit")]
    TooLarge(usize),
    #[error(transparent)]
    Doc(#[from] DocError),
    #[error("storage failed: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Internal(String),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Auth(e) => {
                StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNAUTHORIZED)
            }
            ApiError::AdminOnly => StatusCode::UNAUTHORIZED,
            ApiError::ReadOnly => StatusCode::FORBIDDEN,
            ApiError::BadName | ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound | ApiError::VersionNotFound => StatusCode::NOT_FOUND,
            ApiError::TooLarge(_) | ApiError::Doc(DocError::TooLarge(_)) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ApiError::Doc(DocError::InvalidUpdate(_) | DocError::MissingDependencies) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::Doc(DocError::Deleting) => StatusCode::CONFLICT,
            ApiError::Doc(DocError::Closing | DocError::Unavailable(_)) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Cluster(crate::cluster::ClusterError::Unavailable(_)) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Store(_) | ApiError::Internal(_) | ApiError::Cluster(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        let mut res = json_error(status, self.to_string());
        if status == StatusCode::UNAUTHORIZED {
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        res
    }
}

pub type ApiResult = Result<HttpResponse, ApiError>;

/// Runs a handler's work in a span carrying the document name, and logs its refusal or
/// failure there.
pub async fn traced(
    op: &'static str,
    doc: &str,
    work: impl std::future::Future<Output = ApiResult>,
) -> ApiResult {
    let span = tracing::info_span!("api", op, doc = %doc);
    let result = work.instrument(span.clone()).await;
    if let Err(e) = &result {
        let status = e.status_code();
        span.in_scope(|| {
            if status.is_server_error() {
                tracing::error!(status = status.as_u16(), error = %e, "api request failed");
            } else {
                tracing::info!(status = status.as_u16(), error = %e, "api request refused");
            }
        });
    }
    result
}

/// What a request intends, for the token check.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    Read,
    Write,
}

fn admin_key_presented(state: &HttpState, req: &HttpRequest) -> bool {
    let presented = bearer(
        req.headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
    );
    matches!((&state.admin_key, presented), (Some(key), Some(p)) if key.matches(p))
}

/// The admin key, or a document token covering `doc` (read-only tokens only read). Runs before
/// anything is loaded. Without an auth secret the server is open and everyone passes, as on
/// the WebSocket.
pub fn authorize(
    state: &HttpState,
    req: &HttpRequest,
    doc: &str,
    intent: Intent,
) -> Result<(), ApiError> {
    if admin_key_presented(state, req) {
        return Ok(());
    }
    let token = presented_token(
        req.query_string(),
        req.headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
    );
    let access = state
        .auth
        .authorize(token.as_deref(), doc, SystemTime::now())?;
    if intent == Intent::Write && access.read_only {
        return Err(ApiError::ReadOnly);
    }
    Ok(())
}

/// Listing spans documents, so it takes the admin key (or an open server).
pub fn authorize_admin(state: &HttpState, req: &HttpRequest) -> Result<(), ApiError> {
    if admin_key_presented(state, req) || !state.auth.enabled() {
        return Ok(());
    }
    Err(ApiError::AdminOnly)
}

/// The document name of an `/api/docs/{name}...` request: the raw path segment after
/// `/api/docs/`, percent-decoded exactly once (so `a%2Fb` is `a/b` and `my%2520doc` is
/// `my%20doc`, the name a WebSocket to `/my%20doc` uses).
pub fn doc_name(req: &HttpRequest) -> Result<String, ApiError> {
    let raw = req
        .uri()
        .path()
        .strip_prefix("/api/docs/")
        .and_then(|rest| rest.split('/').next())
        .ok_or(ApiError::BadName)?;
    decode_name(raw)
}

pub fn decode_name(segment: &str) -> Result<String, ApiError> {
    let name = percent_decode_str(segment)
        .decode_utf8()
        .map_err(|_| ApiError::BadName)?;
    if name.is_empty() || name.len() > MAX_DOC_NAME_LEN {
        return Err(ApiError::BadName);
    }
    Ok(name.into_owned())
}

/// Reads a body of at most `limit` bytes (413 beyond, before reading it when the length is
/// announced).
pub async fn read_body(
    mut payload: web::Payload,
    req: &HttpRequest,
    limit: usize,
) -> Result<web::Bytes, ApiError> {
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if announced.is_some_and(|n| n > limit) {
        return Err(ApiError::TooLarge(limit));
    }
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::BadRequest(format!("cannot read the body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::TooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Runs blocking storage work off the async workers.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    web::block(f)
        .await
        .map_err(|e| ApiError::Internal(format!("blocking task failed: {e}")))
}

/// Sends `make()` to the document's actor, started if needed. A document that is unloading
/// answers `Closing` (or its mailbox is gone before the message is handled); the registry then
/// has, or starts, its successor.
pub async fn ask<M, T>(state: &HttpState, name: &str, make: impl Fn() -> M) -> Result<T, ApiError>
where
    M: Message<Result = Result<T, DocError>> + Send + 'static,
    T: Send + 'static,
    DocActor: Handler<M>,
    <DocActor as actix::Actor>::Context: ToEnvelope<DocActor, M>,
{
    for attempt in 0..10u64 {
        if attempt > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(10 * attempt)).await;
        }
        // Every loaded document in use (--max-loaded-documents): retry later.
        let addr = state
            .docs
            .get_or_start(name)
            .map_err(|_| ApiError::Doc(DocError::Closing))?;
        match addr.send(make()).await {
            Ok(Err(DocError::Closing)) | Err(_) => continue,
            Ok(result) => return result.map_err(ApiError::from),
        }
    }
    Err(ApiError::Doc(DocError::Closing))
}

/// `time` fields: RFC 3339 in UTC with milliseconds.
pub fn rfc3339_ms(ms: u64) -> String {
    let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

pub fn json_ok(value: serde_json::Value) -> HttpResponse {
    HttpResponse::Ok().json(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_decoded_once() {
        assert_eq!(decode_name("a%2Fb").unwrap(), "a/b");
        assert_eq!(decode_name("my%2520doc").unwrap(), "my%20doc");
        assert_eq!(decode_name("plain").unwrap(), "plain");
        assert!(decode_name("").is_err());
        assert!(decode_name("%FF").is_err());
        assert!(decode_name(&"x".repeat(513)).is_err());
    }
}
