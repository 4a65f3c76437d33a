//! The demo page, built into `web-demo/dist/` and embedded in the binary.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse};
use rust_embed::RustEmbed;

#[derive(RustEmbed)]
#[folder = "../web-demo/dist/"]
struct DemoAssets;

pub async fn serve(req: HttpRequest) -> HttpResponse {
    let file = match req.path().trim_start_matches('/') {
        "" => "index.html",
        other => other,
    };
    match DemoAssets::get(file) {
        Some(asset) => HttpResponse::Ok()
            .content_type(asset.metadata.mimetype())
            .insert_header((header::CACHE_CONTROL, "no-cache"))
            .body(asset.data.into_owned()),
        None => HttpResponse::NotFound().body("not found"),
    }
}
