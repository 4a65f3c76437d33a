//! The collab server: HTTP + WebSocket front, one actor per open document, sled persistence.

pub mod auth;
pub mod config;
pub mod doc;
pub mod http;
pub mod tls;
pub mod webhooks;
pub mod ws;

use std::net::SocketAddr;
use std::sync::Arc;

use actix_http::HttpService;
use actix_service::{fn_service, map_config, IntoServiceFactory};
use actix_web::dev::AppConfig;
use actix_web::{web, App};
use collab_storage::{SledStore, Store, StoreError};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use auth::{Auth, Origins};
pub use config::{Config, Secrets};
use doc::flusher::Flusher;
use doc::registry::Registry;
use http::HttpState;
use ws::upgrade::{upgrade, Upgrades};

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
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// Runs the server until SIGTERM or Ctrl-C, then closes every socket with 1001, flushes storage
/// and returns. `on_listening` receives the bound address once connections are accepted.
pub async fn serve(
    config: Config,
    secrets: Secrets,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<(), ServerError> {
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(tls::server_config(cert, key)?),
        _ => None,
    };
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
    let webhooks = webhooks::Webhooks::start(config.webhooks(), store.clone())?;
    let registry = Registry::new(store.clone(), flusher, config.clone(), webhooks);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let auth = Arc::new(Auth::new(
        secrets.auth.as_ref(),
        config.allow_anonymous_read,
    ));
    let origins = Arc::new(Origins::new(&config.allowed_origins));
    report_access(&config, &secrets, &origins);
    let http_state = web::Data::new(HttpState {
        auth: auth.clone(),
        admin_key: secrets.admin.clone(),
        docs: registry.clone(),
    });

    let connections = TaskTracker::new();
    let upgrades = Upgrades {
        registry: registry.clone(),
        shutdown: shutdown_rx,
        connections: connections.clone(),
        auth,
        origins,
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
        let http_state = http_state.clone();
        // One service description for both transports; only the last step differs, and the
        // two results are different types, hence a macro rather than a function.
        macro_rules! http_service {
            () => {{
                let upgrades = upgrades.clone();
                let app = App::new()
                    .configure(http::configure(http_state.clone()))
                    .into_factory();
                // Every message is small and latency-bound; with Nagle on, an echo waits for
                // the next edit's ACK (measured: 20 writers x 20 edits/s, p99 41.7 ms with
                // Nagle, 0.9 ms without).
                HttpService::build()
                    .tcp_nodelay(true)
                    .upgrade(fn_service(move |(req, framed)| {
                        upgrade(upgrades.clone(), req, framed)
                    }))
                    .finish(map_config(app, |_| AppConfig::default()))
            }};
        }
        builder = match tls.clone() {
            Some(tls) => builder.listen("collab", listener, move || {
                http_service!().rustls_0_23(tls.clone())
            })?,
            None => builder.listen("collab", listener, move || http_service!().tcp())?,
        };
    }
    let running = builder.run();
    let handle = running.handle();
    for addr in &addrs {
        info!(%addr, tls = tls.is_some(), data_dir = %config.data_dir.display(), "listening");
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

/// Checks every stored document's metadata at start-up so a damaged record is reported by name
/// right away instead of when somebody opens it.
fn report_stored_documents(store: &SledStore) {
    match store.list() {
        Ok(names) => {
            let mut damaged = 0;
            for name in &names {
                if let Err(e) = store.meta(name) {
                    damaged += 1;
                    error!(doc = %name, error = %e, "stored document is damaged; it will not be served");
                }
            }
            info!(documents = names.len(), damaged, "storage opened");
        }
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

/// States the access policy at start-up, loudly when it is open.
fn report_access(config: &Config, secrets: &Secrets, origins: &Origins) {
    match &secrets.auth {
        None => warn!(
            "no --auth-secret: running open, anyone who can reach {} may read and write every document",
            config.addr
        ),
        Some(secret) => {
            if secret.expose().len() < auth::RECOMMENDED_SECRET_LEN {
                warn!(
                    "the auth secret is shorter than {} bytes; use a longer random secret",
                    auth::RECOMMENDED_SECRET_LEN
                );
            }
            info!(
                anonymous_read = config.allow_anonymous_read,
                "document tokens required (JWT HS256)"
            );
        }
    }
    if !origins.is_restricted() {
        info!("no --allowed-origins: WebSockets from every origin are accepted");
    }
}
