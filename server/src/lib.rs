//! The collab server: HTTP + WebSocket front, one actor per open document, sled persistence.

pub mod config;
pub mod connection;
pub mod doc_actor;
pub mod flusher;
pub mod registry;

use std::net::SocketAddr;
use std::sync::Arc;

use actix_codec::Framed;
use actix_http::body::BodySize;
use actix_http::{h1, ws, HttpService, Request, Response, StatusCode};
use actix_service::{fn_service, map_config, IntoServiceFactory};
use actix_web::dev::AppConfig;
use actix_web::http::header;
use actix_web::web::Bytes;
use actix_web::{web, App, HttpRequest, HttpResponse};
use collab_storage::{SledStore, Store, StoreError};
use futures_util::SinkExt;
use rust_embed::RustEmbed;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

pub use config::Config;
use config::MAX_DOC_NAME_LEN;
use flusher::Flusher;
use registry::Registry;

/// How long shutdown waits for connections to send their close frames.
const SHUTDOWN_CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot open the data folder {path}: {source}")]
    OpenStore {
        path: std::path::PathBuf,
        #[source]
        source: StoreError,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("server failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("final flush failed: {0}")]
    FinalFlush(#[source] StoreError),
}

#[derive(RustEmbed)]
#[folder = "../web-demo/dist/"]
struct DemoAssets;

/// The document name of a WebSocket request: the raw path without its leading `/` (the query
/// string is not part of the path), exactly as the reference server derives its room name.
pub fn doc_name(path: &str) -> Option<&str> {
    let name = path.strip_prefix('/').unwrap_or(path);
    (!name.is_empty() && name.len() <= MAX_DOC_NAME_LEN).then_some(name)
}

fn serve_asset(path: &str) -> HttpResponse {
    let file = match path.trim_start_matches('/') {
        "" => "index.html",
        other => other,
    };
    match DemoAssets::get(file) {
        Some(asset) => HttpResponse::Ok()
            .content_type(asset.metadata.mimetype())
            .insert_header((header::CACHE_CONTROL, "no-cache"))
            .body(asset.data.into_owned()),
        None if path == "/healthz" => HttpResponse::Ok().body("ok"),
        None => HttpResponse::NotFound().body("not found"),
    }
}

async fn entry(req: HttpRequest) -> HttpResponse {
    serve_asset(req.path())
}

/// What the upgrade service needs; cloned into every worker.
#[derive(Clone)]
struct Upgrades {
    registry: Registry,
    shutdown: watch::Receiver<bool>,
    connections: TaskTracker,
}

fn plain_response(status: StatusCode, text: String) -> (Response<()>, Bytes) {
    let mut res = Response::with_body(status, ());
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    (res, Bytes::from(text))
}

/// Every HTTP/1 upgrade request lands here with its socket. A WebSocket upgrade to a valid
/// document name gets its 101 and a connection task that owns the socket from then on; the
/// HTTP dispatcher, with its buffers, is gone once this returns.
async fn upgrade(
    up: Upgrades,
    req: Request,
    mut framed: Framed<TcpStream, h1::Codec>,
) -> Result<(), actix_web::Error> {
    let refusal = match ws::verify_handshake(req.head()) {
        Err(e) => Some(plain_response(StatusCode::BAD_REQUEST, e.to_string())),
        Ok(()) if doc_name(req.path()).is_none() => Some(plain_response(
            StatusCode::BAD_REQUEST,
            format!("the document name (the URL path) must be 1 to {MAX_DOC_NAME_LEN} bytes"),
        )),
        Ok(()) if up.connections.len() >= up.registry.config().max_connections => {
            warn!(
                limit = up.registry.config().max_connections,
                "refusing a WebSocket: connection limit reached"
            );
            Some(plain_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is at its connection limit, retry later".into(),
            ))
        }
        Ok(()) => None,
    };
    if let Some((res, body)) = refusal {
        debug!(path = %req.path(), status = %res.status(), "upgrade refused");
        let size = BodySize::Sized(body.len() as u64);
        framed.send(h1::Message::Item((res, size))).await?;
        framed.send(h1::Message::Chunk(Some(body))).await?;
        framed.send(h1::Message::Chunk(None)).await?;
        return Ok(());
    }
    let Some(name) = doc_name(req.path()).map(str::to_owned) else {
        return Ok(());
    };
    let res = ws::handshake_response(req.head()).finish().drop_body();
    framed
        .send(h1::Message::Item((res, BodySize::None)))
        .await?;
    let parts = framed.into_parts();
    let max = up.registry.config().max_message_size;
    // A small read buffer: tungstenite zero-fills its whole capacity, so its 128 KiB default
    // would be resident for every idle connection. Typical messages (an edit, a cursor) are far
    // smaller; a big frame grows the buffer to its announced length and is read 1 KiB per
    // syscall (about 1 ms per MB, paid only by the rare big message).
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(64 * 1024)
        .max_message_size(Some(max))
        .max_frame_size(Some(max));
    let socket = WebSocketStream::from_partially_read(
        parts.io,
        parts.read_buf.to_vec(),
        Role::Server,
        Some(ws_config),
    )
    .await;
    let connection = connection::run(socket, name, up.registry.clone(), up.shutdown.clone());
    actix_web::rt::spawn(up.connections.track_future(connection));
    Ok(())
}

/// Runs the server until SIGTERM or Ctrl-C, then closes every socket with 1001, flushes storage
/// and returns. `on_listening` receives the bound address once connections are accepted.
pub async fn serve(
    config: Config,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<(), ServerError> {
    let store = SledStore::open(&config.data_dir).map_err(|source| ServerError::OpenStore {
        path: config.data_dir.clone(),
        source,
    })?;
    report_stored_documents(&store);
    let store: Arc<dyn Store> = Arc::new(store);
    let config = Arc::new(config);
    let flusher = Flusher::start(
        store.clone(),
        std::time::Duration::from_millis(config.debug_flush_delay_ms),
    );
    let registry = Registry::new(store.clone(), flusher, config.clone());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let connections = TaskTracker::new();
    let upgrades = Upgrades {
        registry: registry.clone(),
        shutdown: shutdown_rx,
        connections: connections.clone(),
    };
    let mut builder = actix_server::Server::build()
        .disable_signals()
        // Connection tasks are closed (1001) and awaited below before the workers stop; this
        // only bounds plain HTTP requests still in flight.
        .shutdown_timeout(5);
    if let Some(workers) = config.workers {
        builder = builder.workers(workers);
    }
    let mut addrs = Vec::new();
    for listener in bind_listeners(&config.addr).map_err(|source| ServerError::Bind {
        addr: config.addr.clone(),
        source,
    })? {
        let addr = listener.local_addr()?;
        addrs.push(addr);
        let upgrades = upgrades.clone();
        builder = builder.listen("collab", listener, move || {
            let upgrades = upgrades.clone();
            let app = App::new().default_service(web::to(entry)).into_factory();
            HttpService::build()
                // Every message is small and latency-bound; with Nagle on, an echo waits for
                // the next edit's ACK (measured: 20 writers x 20 edits/s, p99 41.7 ms with
                // Nagle, 0.9 ms without).
                .tcp_nodelay(true)
                .upgrade(fn_service(move |(req, framed)| {
                    upgrade(upgrades.clone(), req, framed)
                }))
                .finish(map_config(app, |_| AppConfig::default()))
                .tcp()
        })?;
    }
    let running = builder.run();
    let handle = running.handle();
    for addr in &addrs {
        info!(%addr, data_dir = %config.data_dir.display(), "listening");
    }
    if let Some(addr) = addrs.first() {
        on_listening(*addr);
    }

    actix_web::rt::spawn(async move {
        wait_for_signal().await;
        info!("shutting down: closing connections");
        let _ = shutdown_tx.send(true);
        // Connection tasks live on the workers: they must finish (close frame sent) before the
        // workers stop, or clients would see a reset instead of 1001.
        connections.close();
        if tokio::time::timeout(SHUTDOWN_CLOSE_TIMEOUT, connections.wait())
            .await
            .is_err()
        {
            warn!(
                open = connections.len(),
                "connections still closing at shutdown"
            );
        }
        handle.stop(true).await;
    });
    running.await?;
    // Every update is appended before it is broadcast; this flush covers compactions and any
    // append whose flush the shutdown interrupted.
    let s = store.clone();
    tokio::task::spawn_blocking(move || s.flush())
        .await
        .map_err(std::io::Error::other)?
        .map_err(ServerError::FinalFlush)?;
    info!(
        open_documents = registry.open_documents(),
        "stopped cleanly"
    );
    Ok(())
}

/// Binds every address `addr` resolves to. The backlog is large because a restart brings every
/// client back at once (no jitter in the client's backoff).
fn bind_listeners(addr: &str) -> std::io::Result<Vec<std::net::TcpListener>> {
    use std::net::ToSocketAddrs;
    let mut listeners = Vec::new();
    let mut last_error = None;
    for a in addr.to_socket_addrs()? {
        let socket = Socket::new(Domain::for_address(a), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        match socket.bind(&a.into()).and_then(|()| socket.listen(4096)) {
            Ok(()) => listeners.push(socket.into()),
            Err(e) => last_error = Some(e),
        }
    }
    match (listeners.is_empty(), last_error) {
        (true, Some(e)) => Err(e),
        (true, None) => Err(std::io::Error::other("the address resolves to nothing")),
        _ => Ok(listeners),
    }
}

/// Reports, by name, every document the store found damaged when it opened (it checks the
/// write-ahead log and each snapshot's record in it), so damage is known right away instead of
/// when somebody opens the document. Damaged documents are not served.
fn report_stored_documents(store: &SledStore) {
    let damage = store.damage_at_open();
    for d in damage {
        error!(doc = d.doc.as_deref().unwrap_or("-"), damage = %d.what, "stored data is damaged; a damaged document is not served");
    }
    match store.list() {
        Ok(names) => info!(
            documents = names.len(),
            damaged = damage.len(),
            "storage opened"
        ),
        Err(e) => warn!(error = %e, "cannot list stored documents"),
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::doc_name;

    #[test]
    fn document_names_follow_the_reference_server() {
        assert_eq!(doc_name("/my-doc"), Some("my-doc"));
        assert_eq!(doc_name("/a/b"), Some("a/b"));
        assert_eq!(doc_name("/"), None);
        assert_eq!(doc_name(&format!("/{}", "x".repeat(513))), None);
        assert!(doc_name(&format!("/{}", "x".repeat(512))).is_some());
    }
}
