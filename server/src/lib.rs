//! The collab server: HTTP + WebSocket front, one actor per open document, sled persistence.

pub mod auth;
pub mod cluster;
pub mod config;
pub mod config_file;
pub mod core;
pub mod counters;
pub mod doc;
pub mod embed;
pub mod http;
pub mod telemetry;
pub mod tls;
/// The data tools (`collab docs|backup|restore|check`) and the backup format they share with
/// `POST /api/backup`.
pub mod tools;
pub mod webhooks;
pub mod ws;

use std::net::SocketAddr;
use std::sync::Arc;

use actix_http::{HttpService, TlsAcceptorConfig};
use actix_service::{fn_service, map_config, IntoServiceFactory};
use actix_web::dev::AppConfig;
use actix_web::{web, App};
use collab_storage::StoreError;
use socket2::{Domain, Protocol, Socket, Type};
use tracing::{error, info};

pub use config::{Config, Secrets};
use core::Core;
use http::HttpState;
use ws::upgrade::upgrade;

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
    #[error("final flush did not finish within {0:?}")]
    FinalFlushTimeout(std::time::Duration),
    #[error("storage failed and did not recover: {0}")]
    StorageFailed(String),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cluster mode: {0}")]
    Cluster(#[from] cluster::ClusterError),
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
    let core = Core::open(config, &secrets)?;
    let config = core.config.clone();
    let shutting_down = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let http_state = web::Data::new(HttpState {
        auth: core.auth.clone(),
        admin_key: secrets.admin.clone(),
        docs: core.registry.clone(),
        readiness: http::ops::Readiness {
            shutting_down: shutting_down.clone(),
            fatal: core.fatal.subscribe(),
            store: core.store.clone(),
            cluster: core.registry.cluster().cloned(),
        },
        metrics_here: config.metrics_addr.is_none(),
    });
    let upgrades = core.upgrades.clone();
    let mut builder = actix_server::Server::build()
        .disable_signals()
        // Connection tasks are closed (1001) and awaited below before the workers stop; this
        // only bounds plain HTTP requests still in flight.
        .shutdown_timeout(5);
    if let Some(workers) = config.workers {
        builder = builder.workers(workers);
    }
    let handshake_timeout = config.handshake_timeout();
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
                    // The demo's files and JSON answers, gzip or brotli as the client asks.
                    .wrap(actix_web::middleware::Compress::default())
                    .configure(http::configure(http_state.clone()))
                    .into_factory();
                // Every message is small and latency-bound; with Nagle on, an echo waits for
                // the next edit's ACK (measured: 20 writers x 20 edits/s, p99 41.7 ms with
                // Nagle, 0.9 ms without).
                HttpService::build()
                    .tcp_nodelay(true)
                    // Slowloris: a connection that has not sent its whole request in time is
                    // closed, so idle half-requests cannot hold descriptors.
                    .client_request_timeout(handshake_timeout)
                    .upgrade(fn_service(move |(req, framed)| {
                        upgrade(upgrades.clone(), req, framed)
                    }))
                    .finish(map_config(app, |_| AppConfig::default()))
            }};
        }
        builder = match tls.clone() {
            Some(tls) => builder.listen("collab", listener, move || {
                let acceptor = TlsAcceptorConfig::default().handshake_timeout(handshake_timeout);
                http_service!().rustls_0_23_with_config(tls.clone(), acceptor)
            })?,
            None => builder.listen("collab", listener, move || http_service!().tcp())?,
        };
    }
    if let Some(metrics_addr) = &config.metrics_addr {
        let http_state = http_state.clone();
        for listener in bind_listeners(metrics_addr).map_err(|source| ServerError::Bind {
            addr: metrics_addr.clone(),
            source,
        })? {
            info!(addr = %listener.local_addr()?, "metrics listening");
            let http_state = http_state.clone();
            builder = builder.listen("metrics", listener, move || {
                let app = App::new()
                    .configure(http::configure_metrics(http_state.clone()))
                    .into_factory();
                HttpService::build()
                    .finish(map_config(app, |_| AppConfig::default()))
                    .tcp()
            })?;
        }
    }
    let running = builder.run();
    let handle = running.handle();
    for addr in &addrs {
        info!(%addr, tls = tls.is_some(), data_dir = %config.data_dir.display(), "listening");
    }
    if let Some(addr) = addrs.first() {
        on_listening(*addr);
    }

    let core = Arc::new(core);
    let mut fatal_rx = core.fatal.subscribe();
    let drain = std::time::Duration::from_secs(config.shutdown_drain_secs);
    let stopping = core.clone();
    actix_web::rt::spawn(async move {
        tokio::select! {
            _ = wait_for_signal() => {
                // Not ready first, so a load balancer stops sending new clients here before
                // the sockets close.
                shutting_down.store(true, std::sync::atomic::Ordering::SeqCst);
                if !drain.is_zero() {
                    info!(?drain, "shutting down: /readyz answers 503, draining");
                    tokio::time::sleep(drain).await;
                }
                info!("shutting down: closing connections");
            }
            // A supervisor restarts the process; serving on would only fail every edit.
            _ = fatal_rx.wait_for(Option::is_some) => {
                shutting_down.store(true, std::sync::atomic::Ordering::SeqCst);
                error!("storage failed: shutting down");
            }
        }
        // Connection tasks live on the workers: they must finish (close frame sent) before the
        // workers stop, or clients would see a reset instead of 1001.
        stopping.close_connections().await;
        handle.stop(true).await;
    });
    running.await?;
    core.final_flush().await
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
