//! Plain HTTP: the demo page, health, and the admin API. WebSocket upgrades never reach this
//! app; they are taken by `ws::upgrade` before actix-web routes anything.

mod api;
mod backup;
mod catalog;
mod demo;
mod docs;
pub mod ops;
mod tokens;
mod versions;

use std::sync::Arc;

use actix_web::{web, HttpResponse};

use crate::auth::{Auth, Secret};
use crate::doc::registry::Registry;
use ops::Readiness;

/// Shared by every request handler.
pub struct HttpState {
    pub auth: Arc<Auth>,
    /// `None`: the admin endpoints do not exist (404).
    pub admin_key: Option<Secret>,
    /// The documents: `/api/docs`, and sampling for `/metrics`.
    pub docs: Registry,
    pub readiness: Readiness,
    /// `/metrics` is served here (not moved to `--metrics-addr`).
    pub metrics_here: bool,
}

/// Routes of the HTTP app; `configure` keeps them in one place for the server and for tests.
pub fn configure(state: web::Data<HttpState>) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        let metrics_here = state.metrics_here;
        cfg.app_data(state)
            .route("/healthz", web::get().to(ops::healthz))
            .route("/readyz", web::get().to(ops::readyz))
            .route("/api/tokens", web::post().to(tokens::mint))
            .route("/api/backup", web::post().to(backup::backup))
            // `{name}` is one segment: actix routes on a path in which `%2F` stays encoded,
            // and the handlers decode the raw segment themselves, exactly once.
            .route("/api/docs", web::get().to(docs::list))
            .route("/api/docs/{name}", web::get().to(docs::content))
            .route("/api/docs/{name}", web::delete().to(docs::delete))
            .route("/api/docs/{name}/update", web::get().to(docs::get_update))
            .route("/api/docs/{name}/update", web::post().to(docs::post_update))
            .route("/api/docs/{name}/versions", web::get().to(versions::list))
            .route(
                "/api/docs/{name}/versions",
                web::post().to(versions::create),
            )
            .route(
                "/api/docs/{name}/versions/{id}",
                web::get().to(versions::get),
            )
            .route(
                "/api/docs/{name}/versions/{id}/restore",
                web::post().to(versions::restore),
            );
        if metrics_here {
            cfg.route("/metrics", web::get().to(ops::metrics));
        }
        cfg.service(web::resource("/api/{tail:.*}").to(api_not_found))
            .default_service(web::get().to(demo::serve));
    }
}

/// Unknown API paths and methods answer JSON, not the demo page.
async fn api_not_found() -> HttpResponse {
    json_error(actix_web::http::StatusCode::NOT_FOUND, "no such endpoint")
}

/// The separate `--metrics-addr` listener: `/metrics` (and `/healthz`) only.
pub fn configure_metrics(state: web::Data<HttpState>) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.app_data(state)
            .route("/metrics", web::get().to(ops::metrics))
            .route("/healthz", web::get().to(ops::healthz));
    }
}

/// A JSON error body, `{"error": "..."}`, as every API endpoint answers.
pub fn json_error(status: actix_web::http::StatusCode, message: impl Into<String>) -> HttpResponse {
    HttpResponse::build(status).json(serde_json::json!({ "error": message.into() }))
}
