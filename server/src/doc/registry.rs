//! Document name -> actor address. Touched when a connection opens, when a document becomes
//! idle or busy, and when it unloads; never on the per-update path.
//!
//! It also bounds how many documents are loaded (`--max-loaded-documents`): opening one more
//! evicts the longest-idle document, and when none is idle the open is refused.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;

use actix::prelude::*;
use actix_rt::ArbiterHandle;
use collab_storage::Store;
use tracing::warn;

use super::actor::DocActor;
use super::flusher::Flusher;
use super::messages::Evict;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::counters::count;
use crate::webhooks::Webhooks;

#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

/// Every loaded document is in use; the join should be retried later (close code 1013).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistryFull(pub usize);

/// A loaded document: its actor, and the worker thread whose event loop runs it.
struct Loaded {
    addr: Addr<DocActor>,
    home: Option<Home>,
}

/// The worker thread a document's actor runs on; its new connections are moved there
/// (`ws::home`).
#[derive(Clone)]
struct Home {
    thread: ThreadId,
    arbiter: ArbiterHandle,
}

#[derive(Default)]
struct Docs {
    actors: HashMap<Arc<str>, Loaded>,
    /// Idle documents (no connections) by when they became idle, oldest first; and the key of
    /// each in that order.
    idle: BTreeMap<u64, Arc<str>>,
    idle_key: HashMap<Arc<str>, u64>,
    idle_seq: u64,
}

impl Docs {
    fn forget_idle(&mut self, name: &str) {
        if let Some(key) = self.idle_key.remove(name) {
            self.idle.remove(&key);
            shrink_if_sparse(&mut self.idle_key);
        }
    }
}

/// Gives a map's table back once it is mostly empty: a hash map keeps the capacity of its
/// busiest moment, which after a burst of 20,000 connections is most of a megabyte per map.
/// Shrinking to twice the length when it falls below a quarter keeps the work amortized O(1).
pub(crate) fn shrink_if_sparse<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > 64 && map.len() * 4 < map.capacity() {
        map.shrink_to(map.len() * 2);
    }
}

struct Inner {
    docs: Mutex<Docs>,
    store: Arc<dyn Store>,
    flusher: Flusher,
    config: Arc<Config>,
    webhooks: Webhooks,
    /// Cluster mode: document content lives in Redis, not in `store`.
    cluster: Option<Cluster>,
}

impl Registry {
    pub fn new(
        store: Arc<dyn Store>,
        flusher: Flusher,
        config: Arc<Config>,
        webhooks: Webhooks,
        cluster: Option<Cluster>,
    ) -> Self {
        Registry {
            inner: Arc::new(Inner {
                docs: Mutex::new(Docs::default()),
                store,
                flusher,
                config,
                webhooks,
                cluster,
            }),
        }
    }

    /// The actor of `name`, started (and loading) if the document is not open. Holding the lock
    /// while starting guarantees one actor and one load per document, however many connections
    /// race to open it.
    pub fn get_or_start(&self, name: &str) -> Result<Addr<DocActor>, RegistryFull> {
        let mut docs = self.lock();
        if let Some(loaded) = docs.actors.get(name) {
            if loaded.addr.connected() {
                return Ok(loaded.addr.clone());
            }
        }
        let max = self.inner.config.max_loaded_documents.max(1);
        if docs.actors.len() >= max {
            // The oldest idle document goes; it leaves the map once it has stopped (after any
            // flush or compaction in flight), so the count may pass the limit briefly.
            let Some((_, oldest)) = docs.idle.pop_first() else {
                warn!(
                    loaded = docs.actors.len(),
                    max, "every loaded document is in use; refusing to open another"
                );
                return Err(RegistryFull(max));
            };
            docs.idle_key.remove(&oldest);
            if let Some(loaded) = docs.actors.get(&oldest) {
                count(|c| &c.documents_evicted);
                loaded.addr.do_send(Evict);
            }
        }
        let name: Arc<str> = Arc::from(name);
        // Started on this thread's event loop, as `start` does.
        let home = Arbiter::try_current().map(|arbiter| Home {
            thread: std::thread::current().id(),
            arbiter,
        });
        let addr = DocActor::new(name.clone(), self.clone()).start();
        let loaded = Loaded {
            addr: addr.clone(),
            home,
        };
        docs.actors.insert(name, loaded);
        Ok(addr)
    }

    /// The actor of `name` if the document is loaded; never starts one.
    pub fn loaded(&self, name: &str) -> Option<Addr<DocActor>> {
        self.lock()
            .actors
            .get(name)
            .filter(|l| l.addr.connected())
            .map(|l| l.addr.clone())
    }

    /// The event loop of the worker thread running `name`'s actor, if the document is loaded
    /// and that is another thread than this one.
    pub fn home_elsewhere(&self, name: &str) -> Option<ArbiterHandle> {
        let here = std::thread::current().id();
        let docs = self.lock();
        let loaded = docs.actors.get(name).filter(|l| l.addr.connected())?;
        let home = loaded.home.as_ref().filter(|h| h.thread != here)?;
        Some(home.arbiter.clone())
    }

    /// The document has no connections: it may be evicted, oldest first.
    pub fn mark_idle(&self, name: &Arc<str>) {
        let mut docs = self.lock();
        docs.forget_idle(name);
        docs.idle_seq += 1;
        let key = docs.idle_seq;
        docs.idle.insert(key, name.clone());
        docs.idle_key.insert(name.clone(), key);
    }

    pub fn mark_busy(&self, name: &str) {
        self.lock().forget_idle(name);
    }

    /// Forgets `name` if it still maps to `addr` (a newer actor may already own the name).
    pub fn remove(&self, name: &str, addr: &Addr<DocActor>) {
        let mut docs = self.lock();
        if docs.actors.get(name).is_some_and(|l| &l.addr == addr) {
            docs.actors.remove(name);
            shrink_if_sparse(&mut docs.actors);
            docs.forget_idle(name);
        }
    }

    /// Every loaded document's actor, for sampling at scrape time.
    pub fn actors(&self) -> Vec<Addr<DocActor>> {
        self.lock()
            .actors
            .values()
            .map(|l| l.addr.clone())
            .collect()
    }

    pub fn open_documents(&self) -> usize {
        self.lock().actors.len()
    }

    pub fn store(&self) -> Arc<dyn Store> {
        self.inner.store.clone()
    }

    pub fn flusher(&self) -> Flusher {
        self.inner.flusher.clone()
    }

    pub fn cluster(&self) -> Option<&Cluster> {
        self.inner.cluster.as_ref()
    }

    pub fn webhooks(&self) -> &Webhooks {
        &self.inner.webhooks
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Docs> {
        // The maps stay consistent even if a holder panicked: every operation is a few inserts
        // or removes with no early exit between them.
        self.inner.docs.lock().unwrap_or_else(|e| e.into_inner())
    }
}
