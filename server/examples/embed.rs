//! An existing actix-web application that hosts collab itself: its own page, its own
//! middleware in front of everything, and collab's WebSocket endpoint mounted under
//! `/collab/{document}`. `new WebsocketProvider('ws://HOST:PORT/collab', name, ydoc)` connects
//! to it as written.
//!
//!     cargo run -p collab-server --example embed
//!
//! It listens on `COLLAB_ADDR` (default 127.0.0.1:8090) and prints `listening on HOST:PORT`;
//! every other `COLLAB_*` setting (data folder, secret, limits) is read as by `collab` itself.

use std::io::Write;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, App, HttpResponse, HttpServer};
use anyhow::Context;
use clap::Parser;
use collab_server::config::Cli;
use collab_server::embed::Collab;

/// The app's own middleware. A real app checks its session cookie here; this one admits
/// everyone, logs the request and marks the response, so a test can see it ran.
async fn app_session_check(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    tracing::info!(path = %req.path(), "app middleware");
    let mut res = next.call(req).await?;
    res.headers_mut().insert(
        HeaderName::from_static("x-app-session"),
        HeaderValue::from_static("checked"),
    );
    Ok(res)
}

async fn home() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(
            "<!doctype html><title>My app</title><h1>My app</h1>\
         <p>Its editors connect to <code>ws://this-host/collab/&lt;document&gt;</code>.</p>",
        )
}

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let addr = std::env::var("COLLAB_ADDR").unwrap_or_else(|_| "127.0.0.1:8090".into());
    // collab's settings come from the same COLLAB_* variables as the standalone binary.
    let mut config = Cli::parse_from(["embed"]).config;
    config.addr = addr.clone();
    let secrets = config.secrets().context("collab settings")?;
    let collab = Collab::start(config, secrets).context("starting collab")?;

    let mounted = collab.clone();
    let server = HttpServer::new(move || {
        App::new()
            .wrap(from_fn(app_session_check))
            .route("/", web::get().to(home))
            .service(mounted.service("/collab"))
    })
    .bind(&addr)
    .with_context(|| format!("cannot listen on {addr}"))?;
    for a in server.addrs() {
        println!("listening on {a}");
    }
    std::io::stdout().flush()?;
    server.run().await?;
    collab.shutdown().await?;
    Ok(())
}
