//! What every host of collab runs, standalone (`serve`) or embedded in an actix-web app
//! (`embed`): storage, group commit, the documents, webhooks, access policy, the upgrade
//! checks, and the way all of it stops.

use std::sync::Arc;
use std::time::Duration;

use collab_storage::{SledStore, Store};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::auth::{Auth, Origins};
use crate::cluster::Cluster;
use crate::config::{Config, Secrets};
use crate::doc::flusher::Flusher;
use crate::doc::registry::Registry;
use crate::ws::limits::{connection_cap, Slots};
use crate::ws::metered::IncomingBudget;
use crate::ws::upgrade::Upgrades;
use crate::{webhooks, ServerError};

/// How long shutdown waits for connections to send their close frames.
const SHUTDOWN_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the last flush at shutdown may take before the process gives up on it.
const FINAL_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Core {
    pub config: Arc<Config>,
    pub store: Arc<dyn Store>,
    pub registry: Registry,
    pub auth: Arc<Auth>,
    /// Set when storage failed for good.
    pub fatal: watch::Sender<Option<String>>,
    /// What the WebSocket upgrade (standalone or embedded) checks and hands to a session.
    pub upgrades: Upgrades,
    shutdown: watch::Sender<bool>,
    connections: TaskTracker,
}

impl Core {
    /// Opens storage and starts the documents' machinery. Must run on an actix runtime (the
    /// flusher and the document actors live on it).
    pub fn open(config: Config, secrets: &Secrets) -> Result<Core, ServerError> {
        let sled = SledStore::open(&config.data_dir).map_err(|source| ServerError::OpenStore {
            path: config.data_dir.clone(),
            source,
        })?;
        report_stored_documents(&sled);
        let store: Arc<dyn Store> = Arc::new(sled);
        let config = Arc::new(config);
        let (fatal, _) = watch::channel(None::<String>);
        let flusher = Flusher::start(
            store.clone(),
            Duration::from_micros(config.flush_interval_us),
            Duration::from_millis(config.debug_flush_delay_ms),
            fatal.clone(),
        );
        let cluster = match &config.redis_url {
            Some(url) => Some(Cluster::connect(
                url,
                Duration::from_millis(config.debug_flush_delay_ms),
            )?),
            None => None,
        };
        let webhooks =
            webhooks::Webhooks::start(config.webhooks(), store.clone(), cluster.clone())?;
        let registry = Registry::new(
            store.clone(),
            flusher,
            config.clone(),
            webhooks,
            cluster.clone(),
        );
        let auth = Arc::new(Auth::new(
            secrets.auth.as_ref(),
            config.allow_anonymous_read,
        ));
        let origins = Arc::new(Origins::new(&config.allowed_origins));
        report_access(&config, secrets, &origins);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let connections = TaskTracker::new();
        let upgrades = Upgrades {
            registry: registry.clone(),
            shutdown: shutdown_rx,
            connections: connections.clone(),
            auth: auth.clone(),
            origins,
            slots: Slots::new(
                config.max_connections_per_ip,
                config.max_connections_per_doc,
            ),
            budget: IncomingBudget::new(config.max_incoming_bytes),
            max_connections: connection_cap(config.max_connections),
        };
        Ok(Core {
            config,
            store,
            registry,
            auth,
            fatal,
            upgrades,
            shutdown,
            connections,
        })
    }

    /// Closes every WebSocket with 1001 and waits (bounded) until their close frames are out.
    pub async fn close_connections(&self) {
        let _ = self.shutdown.send(true);
        self.connections.close();
        if tokio::time::timeout(SHUTDOWN_CLOSE_TIMEOUT, self.connections.wait())
            .await
            .is_err()
        {
            warn!(
                open = self.connections.len(),
                "connections still closing at shutdown"
            );
        }
    }

    /// The last flush: every update is appended before it is broadcast, and this covers
    /// compactions and any append whose flush the shutdown interrupted. Bounded, so a stop
    /// always ends.
    pub async fn final_flush(&self) -> Result<(), ServerError> {
        if let Some(why) = self.fatal.borrow().clone() {
            return Err(ServerError::StorageFailed(why));
        }
        let store = self.store.clone();
        let flush = tokio::task::spawn_blocking(move || store.flush());
        tokio::time::timeout(FINAL_FLUSH_TIMEOUT, flush)
            .await
            .map_err(|_| ServerError::FinalFlushTimeout(FINAL_FLUSH_TIMEOUT))?
            .map_err(std::io::Error::other)?
            .map_err(ServerError::FinalFlush)?;
        info!(
            open_documents = self.registry.open_documents(),
            "stopped cleanly"
        );
        Ok(())
    }
}

/// Reports damage found when storage was opened, by document, so it is seen at start-up
/// rather than when somebody opens the document.
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

/// States the access policy at start-up, loudly when it is open.
fn report_access(config: &Config, secrets: &Secrets, origins: &Origins) {
    match &secrets.auth {
        None => warn!(
            "no --auth-secret: running open, anyone who can reach {} may read and write every document",
            config.addr
        ),
        Some(secret) => {
            if secret.expose().len() < crate::auth::RECOMMENDED_SECRET_LEN {
                warn!(
                    "the auth secret is shorter than {} bytes; use a longer random secret",
                    crate::auth::RECOMMENDED_SECRET_LEN
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
