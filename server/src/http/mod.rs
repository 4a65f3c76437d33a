//! Plain HTTP: the demo page, health, and the admin API. WebSocket upgrades never reach this
//! app; they are taken by `ws::upgrade` before actix-web routes anything.

mod demo;
mod tokens;

use std::sync::Arc;

use actix_web::{web, HttpResponse};

use crate::auth::{Auth, Secret};

/// Shared by every request handler.
pub struct HttpState {
    pub auth: Arc<Auth>,
    /// `None`: the admin endpoints do not exist (404).
    pub admin_key: Option<Secret>,
}

/// Routes of the HTTP app; `configure` keeps them in one place for the server and for tests.
pub fn configure(state: web::Data<HttpState>) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.app_data(state)
            .route("/healthz", web::get().to(healthz))
            .route("/api/tokens", web::post().to(tokens::mint))
            .default_service(web::get().to(demo::serve));
    }
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().body("ok")
}

/// A JSON error body, `{"error": "..."}`, as every API endpoint answers.
pub fn json_error(status: actix_web::http::StatusCode, message: impl Into<String>) -> HttpResponse {
    HttpResponse::build(status).json(serde_json::json!({ "error": message.into() }))
}
