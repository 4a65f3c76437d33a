//! Group commit to Redis: every append and flush request queued while a pipeline is in flight
//! goes out as the next pipeline, one round trip however many documents wrote. A flush request
//! is answered once the pipeline that carries every earlier append of its document was
//! acknowledged by Redis (with `appendfsync always`, written to Redis' disk).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use super::{keys, ClusterError, Health};
use crate::telemetry::METRICS;

/// A pipeline that takes longer than this is treated as failed: its appends may or may not have
/// landed, and the documents that wrote them reload from Redis.
const PIPELINE_TIMEOUT: Duration = Duration::from_secs(5);

pub enum Op {
    Append {
        name: Arc<str>,
        /// Who applied it before appending (see `Cluster::origin`); readers skip their own.
        origin: Arc<str>,
        bytes: Vec<u8>,
        /// The document's first append since it was loaded: (re)register its name in the set
        /// of documents.
        first: bool,
    },
    Flush {
        name: Arc<str>,
        reply: oneshot::Sender<Result<(), ClusterError>>,
    },
}

pub async fn run(
    mut rx: mpsc::UnboundedReceiver<Op>,
    mut conn: ConnectionManager,
    health: Arc<Health>,
    delay: Duration,
) {
    // Documents whose appends were in a failed pipeline: their next flush must fail too, or it
    // would confirm an update Redis never stored.
    let mut poisoned: HashSet<Arc<str>> = HashSet::new();
    while let Some(first) = rx.recv().await {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut ops = vec![first];
        while let Ok(op) = rx.try_recv() {
            ops.push(op);
        }
        let mut pipe = redis::pipe();
        let mut written: Vec<Arc<str>> = Vec::new();
        let mut waiters = Vec::new();
        for op in ops {
            match op {
                Op::Append {
                    name,
                    origin,
                    bytes,
                    first,
                } => {
                    pipe.cmd("XADD")
                        .arg(keys::log(&name))
                        .arg("*")
                        .arg("u")
                        .arg(bytes)
                        .arg("i")
                        .arg(&*origin)
                        .ignore();
                    if first {
                        pipe.cmd("SADD").arg(keys::DOCS).arg(&*name).ignore();
                    }
                    written.push(name);
                }
                Op::Flush { name, reply } => waiters.push((name, reply)),
            }
        }
        let result = if written.is_empty() {
            Ok(())
        } else {
            let started = Instant::now();
            let r = tokio::time::timeout(PIPELINE_TIMEOUT, pipe.query_async::<()>(&mut conn))
                .await
                .unwrap_or(Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "pipeline timed out",
                ))));
            METRICS
                .redis_append_seconds
                .observe(started.elapsed().as_secs_f64());
            r.map_err(ClusterError::from)
        };
        if let Err(e) = &result {
            warn!(error = %e, documents = written.len(), "Redis append failed");
            health.set_down(&e.to_string());
            // A document with a flush in this pipeline learns of the failure from it (and
            // reloads); the others learn at their next flush.
            let told: HashSet<&Arc<str>> = waiters.iter().map(|(n, _)| n).collect();
            let untold: Vec<Arc<str>> = written
                .iter()
                .filter(|n| !told.contains(n))
                .cloned()
                .collect();
            poisoned.extend(untold);
        }
        for (name, reply) in waiters {
            let r = match &result {
                Err(e) => Err(e.clone()),
                Ok(()) if poisoned.remove(&name) => Err(ClusterError::Unavailable(
                    "an earlier append was not acknowledged".into(),
                )),
                Ok(()) => Ok(()),
            };
            let _ = reply.send(r);
        }
    }
}
