//! The demo page, built into `web-demo/dist/` and embedded in the binary. Served with an ETag
//! (the file's hash) so a reload costs a 304, and compressed by the app's middleware.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse};
use rust_embed::RustEmbed;

#[derive(RustEmbed)]
#[folder = "../web-demo/dist/"]
struct DemoAssets;

fn etag_of(hash: [u8; 32]) -> String {
    let hex: String = hash[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("\"{hex}\"")
}

pub async fn serve(req: HttpRequest) -> HttpResponse {
    let file = match req.path().trim_start_matches('/') {
        "" => "index.html",
        other => other,
    };
    let Some(asset) = DemoAssets::get(file) else {
        return HttpResponse::NotFound().body("not found");
    };
    let etag = etag_of(asset.metadata.sha256_hash());
    let unchanged = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    if unchanged {
        return HttpResponse::NotModified()
            .insert_header((header::ETAG, etag))
            .finish();
    }
    HttpResponse::Ok()
        .content_type(asset.metadata.mimetype())
        // Revalidated on every load: the ETag makes that a 304 until the binary changes.
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header((header::ETAG, etag))
        .body(asset.data.into_owned())
}
