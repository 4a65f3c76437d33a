//! The one stream reader of this instance: a blocking `XREAD` over the streams of every loaded
//! document, on a connection of its own, delivering what other instances appended to the
//! documents' actors.
//!
//! Each document is read from the position its load ended at, so nothing between the load and
//! the first read is missed. A `trim` marker whose `upto` is above the position means entries
//! this instance never read were trimmed: the document reloads from the snapshot. A wake-up
//! stream of this instance's own is part of every `XREAD`, so a newly loaded document is read
//! at once instead of after the current block times out.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::Recipient;
use redis::aio::ConnectionManager;
use redis::Value;
use tracing::{debug, warn};

use super::content::{self, Entry, EntryKind};
use super::keys::{self, StreamPos};
use super::{Health, RemoteEvent};
use crate::telemetry::METRICS;

const BLOCK_MS: u64 = 2_000;
/// Entries per stream per read; a document further behind is read in several rounds.
const COUNT: usize = 1_000;

struct Sub {
    cursor: StreamPos,
    generation: u64,
    /// A gap was found; nothing is delivered until the document registers again after its
    /// reload.
    reloading: bool,
    /// The `i` field of the entries the reading actor appended itself.
    origin: Arc<str>,
    to: Recipient<RemoteEvent>,
}

/// Which documents this instance reads, and where each stands.
#[derive(Default)]
pub struct Subscriptions {
    subs: Mutex<HashMap<Arc<str>, Sub>>,
    generation: AtomicU64,
}

impl Subscriptions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Sub>> {
        self.subs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads `name` from after `from` on, delivering to `to` (replacing any earlier reader).
    pub fn register(
        &self,
        name: Arc<str>,
        from: StreamPos,
        origin: Arc<str>,
        to: Recipient<RemoteEvent>,
    ) {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        self.lock().insert(
            name,
            Sub {
                cursor: from,
                generation,
                reloading: false,
                origin,
                to,
            },
        );
    }

    /// Stops reading `name` if `to` is still its reader.
    pub fn unregister(&self, name: &str, to: &Recipient<RemoteEvent>) -> bool {
        let mut subs = self.lock();
        if subs.get(name).is_some_and(|s| &s.to == to) {
            subs.remove(name);
            return true;
        }
        false
    }

    pub fn recipient(&self, name: &str) -> Option<Recipient<RemoteEvent>> {
        self.lock().get(name).map(|s| s.to.clone())
    }

    fn wanted(&self) -> Vec<(Arc<str>, StreamPos, u64)> {
        self.lock()
            .iter()
            .filter(|(_, s)| !s.reloading)
            .map(|(n, s)| (n.clone(), s.cursor, s.generation))
            .collect()
    }

    /// Hands entries read for `name` (asked at `generation`) to its document.
    fn deliver(&self, name: &str, generation: u64, entries: Vec<Entry>) {
        let mut subs = self.lock();
        let Some(sub) = subs.get_mut(name) else {
            return;
        };
        if sub.generation != generation || sub.reloading {
            // Registered again (reloaded) while this read was in flight: read from the new
            // position instead.
            return;
        }
        let mut out = Vec::new();
        let now_ms = super::now_ms();
        for e in entries {
            if e.id <= sub.cursor {
                continue;
            }
            match &e.kind {
                EntryKind::Trimmed { upto } if *upto > sub.cursor => {
                    warn!(doc = name, position = %sub.cursor, trimmed_to = %upto, "stream trimmed past this instance's position; reloading the document");
                    sub.reloading = true;
                    sub.to.do_send(RemoteEvent::Reload);
                    return;
                }
                EntryKind::Update {
                    origin: from,
                    bytes,
                } if from == sub.origin.as_bytes() => {
                    // Applied here before it was appended: only its size goes on, for the
                    // compaction policy.
                    let len = bytes.len() as u64;
                    sub.cursor = e.id;
                    out.push(Entry {
                        id: e.id,
                        kind: EntryKind::Own { len },
                    });
                    continue;
                }
                EntryKind::Deleted { origin: from } if from == sub.origin.as_bytes() => {
                    sub.cursor = e.id;
                    continue;
                }
                EntryKind::Other => {
                    sub.cursor = e.id;
                    continue;
                }
                EntryKind::Update { .. } => {
                    METRICS
                        .redis_read_lag_seconds
                        .observe(now_ms.saturating_sub(e.id.ms) as f64 / 1000.0);
                }
                _ => {}
            }
            sub.cursor = e.id;
            out.push(e);
        }
        sub.to.do_send(RemoteEvent::Entries {
            entries: out,
            upto: sub.cursor,
        });
    }
}

fn wake_key(instance: &str) -> String {
    format!("collab:instance:{{{instance}}}:wake")
}

/// Interrupts the reader's current block so it reads a newly registered document at once.
pub async fn wake(conn: &mut ConnectionManager, instance: &str) {
    let r: redis::RedisResult<Value> = redis::cmd("XADD")
        .arg(wake_key(instance))
        .arg("MAXLEN")
        .arg("~")
        .arg(16)
        .arg("*")
        .arg("w")
        .arg(1)
        .query_async(conn)
        .await;
    if let Err(e) = r {
        debug!(error = %e, "cannot wake the stream reader");
    }
}

pub async fn run(
    mut conn: ConnectionManager,
    subs: Arc<Subscriptions>,
    instance: Arc<str>,
    health: Arc<Health>,
) {
    let wake = wake_key(&instance);
    // `$` would miss a wake-up sent between two reads; read the wake stream from its end now.
    let mut wake_pos = StreamPos::ZERO;
    loop {
        let r: redis::RedisResult<String> = redis::cmd("XADD")
            .arg(&wake)
            .arg("MAXLEN")
            .arg("~")
            .arg(16)
            .arg("*")
            .arg("w")
            .arg(0)
            .query_async(&mut conn)
            .await;
        match r {
            Ok(id) => {
                wake_pos = StreamPos::parse(&id).unwrap_or(wake_pos);
                break;
            }
            Err(e) => {
                health.set_down(&e.to_string());
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    loop {
        let wanted = subs.wanted();
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(COUNT)
            .arg("BLOCK")
            .arg(BLOCK_MS)
            .arg("STREAMS")
            .arg(&wake);
        for (name, _, _) in &wanted {
            cmd.arg(keys::log(name));
        }
        cmd.arg(wake_pos.to_string());
        for (_, pos, _) in &wanted {
            cmd.arg(pos.to_string());
        }
        let reply: Value = match cmd.query_async(&mut conn).await {
            Ok(v) => v,
            Err(e) => {
                health.set_down(&e.to_string());
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let generations: HashMap<&str, u64> = wanted.iter().map(|(n, _, g)| (&**n, *g)).collect();
        for (key, entries) in content::streams(&reply) {
            if key == wake {
                if let Some(last) = entries.last() {
                    wake_pos = last.id;
                }
                continue;
            }
            let Some(name) = keys::doc_of(&key, ":log") else {
                continue;
            };
            if let Some(generation) = generations.get(name) {
                subs.deliver(name, *generation, entries);
            }
        }
    }
}
