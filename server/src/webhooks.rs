//! Signed webhooks: `document.updated` (debounced) and `document.deleted`, POSTed to every
//! `--webhook-url` with `X-Collab-Signature: sha256=<hex HMAC-SHA256 of the body>`.
//!
//! The editing path only calls [`Webhooks::updated`] / [`Webhooks::deleted`], a `try_send` into
//! a bounded queue: when the queue is full the notice is dropped, logged and counted, never
//! waited for. Debouncing and delivery (with bounded exponential-backoff retries) run on a
//! thread of their own, so a slow or failing receiver cannot slow any document.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use actix_web::web::Bytes;
use collab_storage::Store;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::auth::Secret;

/// Notices waiting for the dispatcher; beyond this they are dropped (and counted).
const QUEUE: usize = 4096;
/// Deliveries in flight at once, across receivers.
const IN_FLIGHT: usize = 64;
/// Attempts per delivery: the first and up to 5 retries, 0.5 s, 1 s, 2 s, 4 s, 8 s apart.
const ATTEMPTS: u32 = 6;
const FIRST_RETRY: Duration = Duration::from_millis(500);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A document edited without pause still gets a notice this many debounce windows after its
/// first unreported change.
const MAX_WAIT_WINDOWS: u32 = 5;

pub const SIGNATURE_HEADER: &str = "X-Collab-Signature";

#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub urls: Vec<String>,
    pub secret: Option<Secret>,
    pub debounce: Duration,
}

enum Notice {
    Updated(Arc<str>),
    Deleted(Arc<str>),
}

/// Counts reported in the log, so an operator can tell a flaky receiver from a lost one.
#[derive(Default, Debug)]
pub struct Counters {
    pub delivered: AtomicU64,
    pub retried: AtomicU64,
    pub failed: AtomicU64,
    pub dropped: AtomicU64,
}

/// The editing path's handle: cheap to clone, never blocks.
#[derive(Clone, Default)]
pub struct Webhooks {
    tx: Option<mpsc::Sender<Notice>>,
    counters: Arc<Counters>,
}

impl Webhooks {
    /// No `--webhook-url`: every notice is a no-op.
    pub fn disabled() -> Self {
        Webhooks::default()
    }

    /// Starts the dispatcher thread.
    /// `cluster`: sizes come from Redis in cluster mode.
    pub fn start(
        config: WebhookConfig,
        store: Arc<dyn Store>,
        cluster: Option<crate::cluster::Cluster>,
    ) -> std::io::Result<Self> {
        if config.urls.is_empty() {
            return Ok(Self::disabled());
        }
        if config.secret.is_none() {
            warn!("--webhook-url without --webhook-secret: deliveries are not signed");
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        info!(
            receivers = config.urls.len(),
            debounce_ms = config.debounce.as_millis() as u64,
            "webhooks enabled"
        );
        std::thread::Builder::new()
            .name("collab-webhooks".into())
            .spawn(move || {
                // awc's client is single-threaded; a runtime of its own keeps deliveries off
                // the server's workers and its flusher.
                actix_rt::System::new().block_on(dispatch(config, store, cluster, rx, c));
            })?;
        Ok(Webhooks {
            tx: Some(tx),
            counters,
        })
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The document has new durable content.
    pub fn updated(&self, doc: &Arc<str>) {
        self.notify(Notice::Updated(doc.clone()));
    }

    /// The document was deleted.
    pub fn deleted(&self, doc: &Arc<str>) {
        self.notify(Notice::Deleted(doc.clone()));
    }

    fn notify(&self, notice: Notice) {
        let Some(tx) = &self.tx else { return };
        if let Err(mpsc::error::TrySendError::Full(n)) = tx.try_send(notice) {
            let dropped = self.counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            let doc = match &n {
                Notice::Updated(d) | Notice::Deleted(d) => d.clone(),
            };
            // Once per power of two: a flood is visible without flooding the log itself.
            if dropped.is_power_of_two() {
                warn!(doc = %doc, dropped, "webhook queue full, notice dropped");
            }
        }
    }
}

/// `sha256=<hex>` of `body` under `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut hex = String::with_capacity(7 + 64);
    hex.push_str("sha256=");
    for b in digest.iter() {
        hex.push_str(&format!("{b:02x}"));
    }
    hex
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Changes of one document not yet reported.
struct Unreported {
    first: Instant,
    last: Instant,
}

impl Unreported {
    fn due(&self, window: Duration) -> Instant {
        (self.last + window).min(self.first + window * MAX_WAIT_WINDOWS)
    }
}

async fn dispatch(
    config: WebhookConfig,
    store: Arc<dyn Store>,
    cluster: Option<crate::cluster::Cluster>,
    mut rx: mpsc::Receiver<Notice>,
    counters: Arc<Counters>,
) {
    let client = Rc::new(awc::Client::builder().timeout(REQUEST_TIMEOUT).finish());
    let urls: Rc<[String]> = config.urls.clone().into();
    let secret = config.secret.clone();
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let window = config.debounce;
    let mut unreported: HashMap<Arc<str>, Unreported> = HashMap::new();
    loop {
        let next = unreported.values().map(|u| u.due(window)).min();
        let notice = tokio::select! {
            n = rx.recv() => match n {
                Some(n) => Some(n),
                None => break,
            },
            _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => None,
        };
        let now = Instant::now();
        let mut events: Vec<(Arc<str>, &'static str)> = Vec::new();
        match notice {
            Some(Notice::Updated(doc)) => {
                unreported
                    .entry(doc)
                    .and_modify(|u| u.last = now)
                    .or_insert(Unreported {
                        first: now,
                        last: now,
                    });
            }
            Some(Notice::Deleted(doc)) => {
                // Changes just before a delete are moot; the receiver hears of the delete.
                unreported.remove(&doc);
                events.push((doc, "document.deleted"));
            }
            None => {
                let due: Vec<Arc<str>> = unreported
                    .iter()
                    .filter(|(_, u)| u.due(window) <= now)
                    .map(|(d, _)| d.clone())
                    .collect();
                for doc in due {
                    unreported.remove(&doc);
                    events.push((doc, "document.updated"));
                }
            }
        }
        for (doc, event) in events {
            let body = event_body(&store, cluster.as_ref(), &doc, event).await;
            let signature = secret
                .as_ref()
                .map(|s| signature(s.expose().as_bytes(), &body));
            let delivery = uuid::Uuid::new_v4().to_string();
            for url in urls.iter() {
                // Waits when IN_FLIGHT deliveries are running: the notice queue fills (and
                // drops) instead of this task growing without bound.
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let job = Delivery {
                    client: client.clone(),
                    url: url.clone(),
                    body: body.clone(),
                    signature: signature.clone(),
                    delivery: delivery.clone(),
                    doc: doc.clone(),
                    event,
                    counters: counters.clone(),
                };
                actix_rt::spawn(async move {
                    job.run().await;
                    drop(permit);
                });
            }
        }
    }
}

async fn event_body(
    store: &Arc<dyn Store>,
    cluster: Option<&crate::cluster::Cluster>,
    doc: &Arc<str>,
    event: &str,
) -> Bytes {
    let mut body = serde_json::json!({
        "event": event,
        "doc": &**doc,
        "time": rfc3339(SystemTime::now()),
    });
    if event == "document.updated" {
        let stats = match cluster {
            Some(c) => c.stats(doc).await.ok().flatten(),
            None => {
                let (store, name) = (store.clone(), doc.clone());
                tokio::task::spawn_blocking(move || store.stats(&name))
                    .await
                    .ok()
                    .and_then(|r| r.ok())
                    .flatten()
            }
        };
        let size = stats.map_or(0, |s| s.size_bytes);
        body["size"] = size.into();
    }
    Bytes::from(body.to_string())
}

struct Delivery {
    client: Rc<awc::Client>,
    url: String,
    body: Bytes,
    signature: Option<String>,
    delivery: String,
    doc: Arc<str>,
    event: &'static str,
    counters: Arc<Counters>,
}

/// What one attempt came to.
enum Attempt {
    Delivered,
    Retry(String),
    GiveUp(String),
}

impl Delivery {
    async fn run(self) {
        let mut wait = FIRST_RETRY;
        for attempt in 1..=ATTEMPTS {
            match self.attempt().await {
                Attempt::Delivered => {
                    self.counters.delivered.fetch_add(1, Ordering::Relaxed);
                    debug!(doc = %self.doc, url = %self.url, event = self.event, attempt, "webhook delivered");
                    return;
                }
                Attempt::Retry(why) if attempt < ATTEMPTS => {
                    self.counters.retried.fetch_add(1, Ordering::Relaxed);
                    warn!(doc = %self.doc, url = %self.url, event = self.event, attempt, retry_in_ms = wait.as_millis() as u64, reason = %why, "webhook delivery failed, retrying");
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
                Attempt::Retry(why) | Attempt::GiveUp(why) => {
                    let failed = self.counters.failed.fetch_add(1, Ordering::Relaxed) + 1;
                    error!(doc = %self.doc, url = %self.url, event = self.event, attempt, failed_total = failed, reason = %why, "webhook delivery failed, giving up");
                    return;
                }
            }
        }
    }

    async fn attempt(&self) -> Attempt {
        let mut req = self
            .client
            .post(&self.url)
            .insert_header(("Content-Type", "application/json"))
            .insert_header(("X-Collab-Event", self.event))
            .insert_header(("X-Collab-Delivery", self.delivery.as_str()));
        if let Some(sig) = &self.signature {
            req = req.insert_header((SIGNATURE_HEADER, sig.as_str()));
        }
        match req.send_body(self.body.clone()).await {
            Ok(res) if res.status().is_success() => Attempt::Delivered,
            // Server errors, rate limits and timeouts are worth another try; any other refusal
            // would only be refused again.
            Ok(res)
                if res.status().is_server_error() || matches!(res.status().as_u16(), 408 | 429) =>
            {
                Attempt::Retry(format!("HTTP {}", res.status()))
            }
            Ok(res) => Attempt::GiveUp(format!("HTTP {}", res.status())),
            Err(e) => Attempt::Retry(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_a_known_hmac() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn a_busy_document_is_still_reported() {
        let t = Instant::now();
        let w = Duration::from_secs(2);
        let u = Unreported {
            first: t,
            last: t + Duration::from_secs(9),
        };
        assert_eq!(u.due(w), t + w * MAX_WAIT_WINDOWS);
    }
}
