//! Document name -> actor address. Touched when a connection opens and when a document unloads,
//! never on the per-update path.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use actix::prelude::*;
use collab_storage::Store;

use super::actor::DocActor;
use super::flusher::Flusher;
use crate::config::Config;
use crate::webhooks::Webhooks;

#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    docs: Mutex<HashMap<Arc<str>, Addr<DocActor>>>,
    store: Arc<dyn Store>,
    flusher: Flusher,
    config: Arc<Config>,
    webhooks: Webhooks,
}

impl Registry {
    pub fn new(
        store: Arc<dyn Store>,
        flusher: Flusher,
        config: Arc<Config>,
        webhooks: Webhooks,
    ) -> Self {
        Registry {
            inner: Arc::new(Inner {
                docs: Mutex::new(HashMap::new()),
                store,
                flusher,
                config,
                webhooks,
            }),
        }
    }

    /// The actor of `name`, started (and loading) if the document is not open. Holding the lock
    /// while starting guarantees one actor and one load per document, however many connections
    /// race to open it.
    pub fn get_or_start(&self, name: &str) -> Addr<DocActor> {
        let mut docs = self.lock();
        if let Some(addr) = docs.get(name) {
            if addr.connected() {
                return addr.clone();
            }
        }
        let name: Arc<str> = Arc::from(name);
        let addr = DocActor::new(name.clone(), self.clone()).start();
        docs.insert(name, addr.clone());
        addr
    }

    /// Forgets `name` if it still maps to `addr` (a newer actor may already own the name).
    pub fn remove(&self, name: &str, addr: &Addr<DocActor>) {
        let mut docs = self.lock();
        if docs.get(name).is_some_and(|a| a == addr) {
            docs.remove(name);
        }
    }

    pub fn open_documents(&self) -> usize {
        self.lock().len()
    }

    pub fn store(&self) -> Arc<dyn Store> {
        self.inner.store.clone()
    }

    pub fn flusher(&self) -> Flusher {
        self.inner.flusher.clone()
    }

    pub fn webhooks(&self) -> &Webhooks {
        &self.inner.webhooks
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Addr<DocActor>>> {
        // The map stays consistent even if a holder panicked: every operation is a single insert
        // or remove.
        self.inner.docs.lock().unwrap_or_else(|e| e.into_inner())
    }
}
