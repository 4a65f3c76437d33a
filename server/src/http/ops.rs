//! Operations endpoints: `/healthz`, `/readyz`, `/metrics`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header;
use actix_web::{web, HttpResponse};
use collab_storage::Store;
use tokio::sync::watch;

use super::HttpState;
use crate::doc::messages::GetStats;
use crate::doc::registry::Registry;
use crate::telemetry::{render, Sampled};

/// How long a readiness probe may wait for storage to answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long one scrape may wait for the documents' samples.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(2);

/// What `/readyz` looks at.
#[derive(Clone)]
pub struct Readiness {
    pub shutting_down: Arc<AtomicBool>,
    /// Set when storage failed for good (the server is stopping).
    pub fatal: watch::Receiver<Option<String>>,
    pub store: Arc<dyn Store>,
    /// Cluster mode: Redis must answer too.
    pub cluster: Option<crate::cluster::Cluster>,
}

pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().body("ok")
}

fn unavailable(reason: &str) -> HttpResponse {
    HttpResponse::ServiceUnavailable()
        .content_type("text/plain; charset=utf-8")
        .body(reason.to_owned())
}

/// 200 only while the server takes new work: not shutting down, storage answers a flush, and
/// in cluster mode Redis answers.
pub async fn readyz(state: web::Data<HttpState>) -> HttpResponse {
    let ready = &state.readiness;
    if ready.shutting_down.load(Ordering::SeqCst) {
        return unavailable("shutting down");
    }
    if let Some(why) = ready.fatal.borrow().clone() {
        return unavailable(&format!("storage failed: {why}"));
    }
    if let Some(cluster) = &ready.cluster {
        if !cluster.is_up() {
            return unavailable(&format!("Redis is unavailable: {}", cluster.down_reason()));
        }
        if let Err(e) = tokio::time::timeout(PROBE_TIMEOUT, cluster.ping())
            .await
            .unwrap_or_else(|_| Err(crate::cluster::ClusterError::Unavailable("timeout".into())))
        {
            return unavailable(&format!("Redis is unavailable: {e}"));
        }
    }
    let store = ready.store.clone();
    let probe = tokio::task::spawn_blocking(move || store.flush());
    match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
        Ok(Ok(Ok(()))) => HttpResponse::Ok().body("ready"),
        Ok(Ok(Err(e))) => unavailable(&format!("storage is not writable: {e}")),
        Ok(Err(_)) | Err(_) => unavailable("storage did not answer in time"),
    }
}

async fn sample(docs: &Registry) -> Sampled {
    let actors = docs.actors();
    let asks = actors.iter().map(|a| a.send(GetStats));
    let answers = tokio::time::timeout(SAMPLE_TIMEOUT, futures_util::future::join_all(asks))
        .await
        .unwrap_or_default();
    let mut sampled = Sampled::default();
    for stats in answers.into_iter().flatten() {
        sampled.connections_per_document.push(stats.connections);
        sampled.queue_depths.extend(stats.queue_depths);
    }
    sampled
}

pub async fn metrics(state: web::Data<HttpState>) -> HttpResponse {
    let sampled = sample(&state.docs).await;
    HttpResponse::Ok()
        .insert_header((
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        ))
        .body(render(&sampled))
}
