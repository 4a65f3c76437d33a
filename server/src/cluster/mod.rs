//! Cluster mode (`--redis-url`): several instances share documents through Redis. Everything
//! that talks to Redis is in this module, on a small tokio runtime of its own; the rest of the
//! server sees [`Cluster`]: append and flush (group commit), load, compact, delete, the stream
//! reader's [`RemoteEvent`]s, awareness publishing, and whether Redis answers.
//!
//! Redis is the authority for content: an update is echoed only after the `XADD` that carries
//! it was acknowledged, every instance holding the document reads the stream and applies what
//! others appended, and loading reads snapshot and stream in one transaction.

mod backlog;
mod catalog;
pub mod content;
pub mod keys;
mod presence;
mod reader;
mod writer;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use actix_web::web::Bytes;
use collab_storage::{DocStats, VersionMeta};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ProtocolVersion, Value};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

pub use backlog::Backlog;
pub use content::{Compacted, Entry, EntryKind, Loaded};
pub use keys::StreamPos;

use crate::telemetry::METRICS;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClusterError {
    #[error("Redis is unavailable: {0}")]
    Unavailable(String),
    #[error("Redis refused a command: {0}")]
    Redis(String),
    #[error("data in Redis is corrupt: {0}")]
    Corrupt(String),
    #[error("invalid --redis-url: {0}")]
    Url(String),
}

impl From<redis::RedisError> for ClusterError {
    fn from(e: redis::RedisError) -> Self {
        if e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
        {
            ClusterError::Unavailable(e.to_string())
        } else {
            ClusterError::Redis(e.to_string())
        }
    }
}

/// What the stream reader and the awareness channel deliver to a document's actor.
#[derive(Message)]
#[rtype(result = "()")]
pub enum RemoteEvent {
    /// Entries other instances appended, in stream order; the document now covers the stream
    /// up to `upto` (its own entries included).
    Entries {
        entries: Vec<Entry>,
        upto: StreamPos,
    },
    /// The stream was trimmed past this instance's position: load again from the snapshot.
    Reload,
    /// A y-protocols awareness message from another instance.
    Awareness(Bytes),
    /// Another instance loaded the document and asks for the full awareness.
    AwarenessQuery,
}

/// Whether Redis answers, for `/readyz`, the upgrade check and the `collab_redis_up` gauge.
pub struct Health {
    up: AtomicBool,
    reason: Mutex<String>,
}

impl Health {
    fn new() -> Self {
        Health {
            up: AtomicBool::new(true),
            reason: Mutex::new(String::new()),
        }
    }

    fn set_down(&self, why: &str) {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = why.to_owned();
        if self.up.swap(false, Ordering::SeqCst) {
            error!(
                error = why,
                "Redis is unavailable: refusing updates until it answers again"
            );
        }
        METRICS.redis_up.set(0);
    }

    fn set_up(&self) {
        if !self.up.swap(true, Ordering::SeqCst) {
            info!("Redis answers again");
        }
        METRICS.redis_up.set(1);
    }
}

struct Inner {
    runtime: tokio::runtime::Handle,
    conn: ConnectionManager,
    writer: mpsc::UnboundedSender<writer::Op>,
    subs: Arc<reader::Subscriptions>,
    presence: mpsc::UnboundedSender<presence::Control>,
    health: Arc<Health>,
    instance: Arc<str>,
}

#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

/// How often Redis is pinged to tell `/readyz` and to notice it came back.
const PING_EVERY: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

fn manager_config() -> ConnectionManagerConfig {
    // Few, short retries: a command fails within about a second when Redis is away, so the
    // documents refuse updates promptly; the manager keeps reconnecting in the background.
    ConnectionManagerConfig::new()
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500))
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(5)))
}

impl Cluster {
    /// Connects to Redis (waiting up to 10 s for it) and starts the writer, the stream reader,
    /// the awareness channel and the health check on a runtime thread of their own.
    /// `flush_delay` (tests only, `--debug-flush-delay-ms`) holds every pipeline back, so a
    /// broadcast that did not wait for Redis shows up as lost data, not as luck.
    pub fn connect(url: &str, flush_delay: Duration) -> Result<Cluster, ClusterError> {
        let client = redis::Client::open(url).map_err(|e| ClusterError::Url(e.to_string()))?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("collab-redis".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("collab-redis")
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(ClusterError::Unavailable(e.to_string())));
                        return;
                    }
                };
                let handle = rt.handle().clone();
                let _ = ready_tx.send(rt.block_on(start(client, handle, flush_delay)));
                // The runtime lives as long as the process: its tasks serve every document.
                rt.block_on(std::future::pending::<()>());
            })
            .map_err(|e| ClusterError::Unavailable(e.to_string()))?;
        ready_rx
            .recv()
            .map_err(|_| ClusterError::Unavailable("the Redis thread ended".into()))?
    }

    pub fn instance(&self) -> &str {
        &self.inner.instance
    }

    pub fn is_up(&self) -> bool {
        self.inner.health.up.load(Ordering::SeqCst)
    }

    pub fn down_reason(&self) -> String {
        self.inner
            .health
            .reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = Result<T, ClusterError>> + Send + 'static,
    ) -> Result<T, ClusterError> {
        self.inner
            .runtime
            .spawn(f)
            .await
            .map_err(|e| ClusterError::Unavailable(format!("Redis task failed: {e}")))?
    }

    /// Queues an update for the next pipeline; [`Cluster::flush`] tells when it is stored.
    pub fn append(&self, name: &Arc<str>, origin: &Arc<str>, bytes: Vec<u8>, first: bool) {
        let _ = self.inner.writer.send(writer::Op::Append {
            name: name.clone(),
            origin: origin.clone(),
            bytes,
            first,
        });
    }

    /// Resolves once every update of `name` appended before the call is acknowledged by Redis.
    pub async fn flush(&self, name: &Arc<str>) -> Result<(), ClusterError> {
        let (reply, rx) = oneshot::channel();
        self.inner
            .writer
            .send(writer::Op::Flush {
                name: name.clone(),
                reply,
            })
            .map_err(|_| ClusterError::Unavailable("the Redis writer stopped".into()))?;
        rx.await
            .map_err(|_| ClusterError::Unavailable("the Redis writer stopped".into()))?
    }

    pub async fn load(&self, name: &str) -> Result<Loaded, ClusterError> {
        let mut conn = self.inner.conn.clone();
        let name = name.to_owned();
        self.run(async move { content::load(&mut conn, &name).await })
            .await
    }

    /// A fresh origin for one document actor's appends. Per actor rather than per instance:
    /// an append still in flight when its actor failed must reach the actor that replaces it.
    pub fn origin(&self) -> Arc<str> {
        Arc::from(format!(
            "{}/{}",
            self.inner.instance,
            uuid::Uuid::new_v4().simple()
        ))
    }

    /// Starts delivering `name`'s stream after `from` (skipping entries of `origin`), and its
    /// awareness, to `to`.
    pub fn register(
        &self,
        name: Arc<str>,
        from: StreamPos,
        origin: Arc<str>,
        to: Recipient<RemoteEvent>,
    ) {
        self.inner.subs.register(name.clone(), from, origin, to);
        let _ = self
            .inner
            .presence
            .send(presence::Control::Subscribe(name.clone()));
        let mut conn = self.inner.conn.clone();
        let instance = self.inner.instance.clone();
        self.inner.runtime.spawn(async move {
            reader::wake(&mut conn, &instance).await;
            let query = presence::encode(presence::QUERY, &instance, &[]);
            let _: redis::RedisResult<Value> = redis::cmd("PUBLISH")
                .arg(keys::awareness(&name))
                .arg(query)
                .query_async(&mut conn)
                .await;
        });
    }

    pub fn unregister(&self, name: &Arc<str>, to: &Recipient<RemoteEvent>) {
        if self.inner.subs.unregister(name, to) {
            let _ = self
                .inner
                .presence
                .send(presence::Control::Unsubscribe(name.clone()));
        }
    }

    /// Sends a y-protocols awareness message to the other instances (at most once).
    pub fn publish_awareness(&self, name: &str, message: &[u8]) {
        let payload = presence::encode(presence::UPDATE, &self.inner.instance, message);
        let channel = keys::awareness(name);
        let mut conn = self.inner.conn.clone();
        self.inner.runtime.spawn(async move {
            let _: redis::RedisResult<Value> = redis::cmd("PUBLISH")
                .arg(channel)
                .arg(payload)
                .query_async(&mut conn)
                .await;
        });
    }

    pub async fn compact(
        &self,
        name: &str,
        state: Vec<u8>,
        upto: StreamPos,
    ) -> Result<Compacted, ClusterError> {
        let mut conn = self.inner.conn.clone();
        let name = name.to_owned();
        let r = self
            .run(async move { content::compact(&mut conn, &name, &state, upto).await })
            .await;
        if matches!(r, Ok(Compacted::Trimmed(_))) {
            METRICS.redis_trims.inc();
        }
        r
    }

    pub async fn delete(&self, name: &str, origin: &Arc<str>) -> Result<bool, ClusterError> {
        let mut conn = self.inner.conn.clone();
        let name = name.to_owned();
        let origin = origin.clone();
        self.run(async move { content::delete(&mut conn, &name, &origin).await })
            .await
    }

    /// Whether anything was ever written to `name` (and it was not deleted since).
    pub async fn exists(&self, name: &str) -> Result<bool, ClusterError> {
        let mut conn = self.inner.conn.clone();
        let name = name.to_owned();
        self.run(async move { catalog::exists(&mut conn, &name).await })
            .await
    }

    /// Every document name, unordered.
    pub async fn list(&self) -> Result<Vec<String>, ClusterError> {
        let mut conn = self.inner.conn.clone();
        self.run(async move { catalog::list(&mut conn).await })
            .await
    }

    pub async fn stats(&self, name: &str) -> Result<Option<DocStats>, ClusterError> {
        let mut conn = self.inner.conn.clone();
        let name = name.to_owned();
        self.run(async move { catalog::stats(&mut conn, &name).await })
            .await
    }

    pub async fn put_version(
        &self,
        name: &str,
        label: &str,
        state: Vec<u8>,
    ) -> Result<VersionMeta, ClusterError> {
        let mut conn = self.inner.conn.clone();
        let (name, label) = (name.to_owned(), label.to_owned());
        self.run(async move { catalog::put_version(&mut conn, &name, &label, &state).await })
            .await
    }

    pub async fn versions(&self, name: &str) -> Result<Vec<VersionMeta>, ClusterError> {
        let mut conn = self.inner.conn.clone();
        let name = name.to_owned();
        self.run(async move { catalog::versions(&mut conn, &name).await })
            .await
    }

    pub async fn version(
        &self,
        name: &str,
        id: u64,
    ) -> Result<Option<(VersionMeta, Vec<u8>)>, ClusterError> {
        let mut conn = self.inner.conn.clone();
        let name = name.to_owned();
        self.run(async move { catalog::version(&mut conn, &name, id).await })
            .await
    }

    /// A round trip to Redis, for `/readyz`.
    pub async fn ping(&self) -> Result<(), ClusterError> {
        let mut conn = self.inner.conn.clone();
        self.run(async move {
            redis::cmd("PING")
                .query_async::<()>(&mut conn)
                .await
                .map_err(ClusterError::from)
        })
        .await
    }
}

async fn start(
    client: redis::Client,
    runtime: tokio::runtime::Handle,
    flush_delay: Duration,
) -> Result<Cluster, ClusterError> {
    let connect = async {
        loop {
            match ConnectionManager::new_with_config(client.clone(), manager_config()).await {
                Ok(c) => return c,
                Err(e) => {
                    warn!(error = %e, "cannot reach Redis yet; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    };
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| {
            ClusterError::Unavailable(format!("no answer from Redis within {CONNECT_TIMEOUT:?}"))
        })?;
    check_persistence(&mut conn.clone()).await;
    // The blocking reads get a connection of their own, with room for the block itself.
    let reader_conn = ConnectionManager::new_with_config(
        client.clone(),
        manager_config().set_response_timeout(Some(Duration::from_secs(10))),
    )
    .await?;
    // Pub/sub pushes need RESP3 on the same kind of self-healing connection.
    let info = client.get_connection_info().clone();
    let redis_settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    let push_client = redis::Client::open(info.set_redis_settings(redis_settings))
        .map_err(|e| ClusterError::Url(e.to_string()))?;
    let (push_tx, push_rx) = mpsc::unbounded_channel();
    let push_conn = ConnectionManager::new_with_config(
        push_client,
        manager_config()
            .set_push_sender(push_tx)
            .set_automatic_resubscription(),
    )
    .await?;

    let instance: Arc<str> = Arc::from(uuid::Uuid::new_v4().simple().to_string());
    let health = Arc::new(Health::new());
    METRICS.redis_up.set(1);
    let subs = Arc::new(reader::Subscriptions::default());
    let (writer_tx, writer_rx) = mpsc::unbounded_channel();
    let (presence_tx, presence_rx) = mpsc::unbounded_channel();
    runtime.spawn(writer::run(
        writer_rx,
        conn.clone(),
        health.clone(),
        flush_delay,
    ));
    runtime.spawn(reader::run(
        reader_conn,
        subs.clone(),
        instance.clone(),
        health.clone(),
    ));
    runtime.spawn(presence::control(presence_rx, push_conn));
    runtime.spawn(presence::route(push_rx, subs.clone(), instance.clone()));
    runtime.spawn(watch_health(conn.clone(), health.clone()));
    info!(%instance, "cluster mode: documents live in Redis");
    Ok(Cluster {
        inner: Arc::new(Inner {
            runtime,
            conn,
            writer: writer_tx,
            subs,
            presence: presence_tx,
            health,
            instance,
        }),
    })
}

async fn watch_health(mut conn: ConnectionManager, health: Arc<Health>) {
    loop {
        let ping =
            tokio::time::timeout(PING_EVERY, redis::cmd("PING").query_async::<()>(&mut conn)).await;
        match ping {
            Ok(Ok(())) => health.set_up(),
            Ok(Err(e)) => health.set_down(&e.to_string()),
            Err(_) => health.set_down("no answer to PING within 1 s"),
        }
        tokio::time::sleep(PING_EVERY).await;
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Acknowledged means durable only if Redis fsyncs its append-only file on every write; say so
/// loudly when it does not (or when it will not tell).
async fn check_persistence(conn: &mut ConnectionManager) {
    let get = |key: &'static str| {
        let mut conn = conn.clone();
        async move {
            let v: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
                .arg("GET")
                .arg(key)
                .query_async(&mut conn)
                .await;
            v.map(|kv| kv.get(1).cloned().unwrap_or_default())
        }
    };
    match (get("appendonly").await, get("appendfsync").await) {
        (Ok(aof), Ok(fsync)) if aof == "yes" && fsync == "always" => {
            info!("Redis persistence: appendonly yes, appendfsync always")
        }
        (Ok(aof), Ok(fsync)) => warn!(
            appendonly = %aof,
            appendfsync = %fsync,
            "REDIS DOES NOT FSYNC EVERY WRITE: an acknowledged update can be lost if Redis or its machine crashes. Set `appendonly yes` and `appendfsync always` (see README, Cluster mode)"
        ),
        (Err(e), _) | (_, Err(e)) => warn!(
            error = %e,
            "cannot read Redis' persistence settings (CONFIG GET refused?): make sure it runs with `appendonly yes` and `appendfsync always`, or acknowledged updates can be lost"
        ),
    }
}
