//! Group commit: one storage flush (one fsync) covers every write that was made before it
//! started, across all documents.
//!
//! A failed flush is retried a few times (a transient EMFILE or ENOSPC may clear). If it keeps
//! failing the server is told to shut down: nothing unflushed was ever shown to a client, and a
//! supervisor's restart reopens storage, whereas serving on would fail every edit silently.
//!
//! How flushes are scheduled depends on who asks. While one document asks alone (the last
//! [`SOLO_AFTER`] requests all came from it) and its thread is idle enough (the caller says
//! so; see `doc/actor/flush.rs`), it flushes on its own thread, right away:
//! that document's actor gathers its own updates while a flush runs, so there is nobody to
//! group with, and doing it inline saves the hops to the flush thread and back (two thread
//! wake-ups per update: 18 % of the server's CPU at 50 readers). A busy thread does not flush
//! inline: the fsync's wall time would stall the sends it has to do (at 1,000 readers the
//! server fell behind and delivered 77 %). While several documents ask,
//! requests go to the flush thread, which paces flushes `interval` apart so that one fsync
//! covers many documents' edits.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use collab_storage::{Store, StoreError};
use tokio::sync::{oneshot, watch};
use tracing::{error, warn};

use crate::counters::count;
use crate::telemetry::METRICS;

/// A request: who asks (a hash of the document name) and where the result goes.
type Waiter = (u64, oneshot::Sender<Result<(), Arc<StoreError>>>);

/// Waits before each retry of a failed flush.
const RETRY_BACKOFF: [Duration; 3] = [
    Duration::from_millis(100),
    Duration::from_millis(400),
    Duration::from_millis(1600),
];

/// One document asking this many times in a row, with nobody else, is asking alone.
const SOLO_AFTER: u32 = 8;

#[derive(Clone)]
pub struct Flusher {
    tx: mpsc::Sender<Waiter>,
    shared: Arc<Shared>,
}

/// What the flush thread and inline flushes share.
struct Shared {
    store: Arc<dyn Store>,
    /// Inline flushes only without injected delays: a delay would stall the caller's thread.
    inline: bool,
    /// Requests sent to the flush thread and not yet taken by it.
    queued: AtomicUsize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    last_start: Option<Instant>,
    last_requester: u64,
    /// Consecutive flushes that carried only `last_requester`'s request.
    solo_run: u32,
    /// Flushes running now, on the flush thread or inline.
    running: u32,
    /// Times the flush thread found nothing queued and slept until a request woke it.
    woken: u64,
}

impl State {
    fn solo(&self) -> bool {
        self.solo_run >= SOLO_AFTER
    }

    /// A flush starts, carrying one request (`Some(who)`) or several (`None`).
    fn started(&mut self, alone: Option<u64>) {
        self.last_start = Some(Instant::now());
        self.running += 1;
        match alone {
            Some(who) if who == self.last_requester => {
                self.solo_run = (self.solo_run + 1).min(SOLO_AFTER)
            }
            Some(who) => {
                self.last_requester = who;
                self.solo_run = 1;
            }
            None => self.solo_run = 0,
        }
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // The state is plain numbers; a panic elsewhere cannot leave it inconsistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    #[error("flush failed: {0}")]
    Store(Arc<StoreError>),
    #[error("the flusher has stopped")]
    Stopped,
}

/// One flush. A panicking store is reported like a failed flush (and retried), not allowed to
/// take the thread and every later waiter with it.
fn flush_once(store: &Arc<dyn Store>, delay: Duration) -> Result<(), Arc<StoreError>> {
    let timer = METRICS.flush_seconds.start_timer();
    if !delay.is_zero() {
        std::thread::sleep(delay);
    }
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| store.flush()));
    timer.observe_duration();
    match result {
        Ok(r) => r.map_err(Arc::new),
        Err(_) => Err(Arc::new(StoreError::Corrupt {
            doc: String::new(),
            what: "flush task failed: the store panicked".into(),
        })),
    }
}

fn note_failure(e: &StoreError) {
    count(|c| &c.storage_flush_failures);
    METRICS.storage_errors.inc();
    warn!(error = %e, "storage flush failed; retrying");
}

/// The flush thread: waits for the first request; unless one document is asking alone, waits
/// until `interval` has passed since the previous flush started; takes every request queued by
/// then (each wrote before this flush starts, so this flush covers it), flushes, answers them
/// all. One long-lived thread rather than a blocking-pool task per group commit: no thread is
/// created and no pool is consulted per flush.
///
/// The pacing is what makes group commit group across documents: an fsync here costs 40–100 µs
/// of CPU and little wall time, so without it 2,500 edits/s spread over documents cost nearly
/// as many fsyncs. It adds no latency to an edit after a quiet spell, and none to one busy
/// document (at 1,000 edits/s into one document, pacing it took the median latency from 0.7 to
/// 2.3 ms for nothing: its actor already gathers its updates while a flush runs).
fn run(
    rx: mpsc::Receiver<Waiter>,
    shared: Arc<Shared>,
    interval: Duration,
    delay: Duration,
    fatal: watch::Sender<Option<String>>,
) {
    // The last flush carried several documents' requests: more will come within `interval`.
    let mut busy = false;
    loop {
        if busy {
            // Sleeping out the interval before looking saves the wake-up that the first request
            // would otherwise cost (a futex wake, then this same sleep): at 2,500 edits/s over
            // 2,500 documents, one of the flush thread's three wake-ups per flush.
            wait_out_interval(&shared, interval);
        }
        let first = match rx.try_recv() {
            Ok(w) => w,
            Err(mpsc::TryRecvError::Empty) => {
                let Ok(w) = rx.recv() else { break };
                lock(&shared.state).woken += 1;
                w
            }
            Err(mpsc::TryRecvError::Disconnected) => break,
        };
        wait_out_interval(&shared, interval);
        let mut waiters = vec![first];
        waiters.extend(rx.try_iter());
        shared.queued.fetch_sub(waiters.len(), Ordering::SeqCst);
        let alone = (waiters.len() == 1).then_some(waiters[0].0);
        busy = alone.is_none();
        lock(&shared.state).started(alone);
        let mut result = flush_once(&shared.store, delay);
        for backoff in RETRY_BACKOFF {
            let Err(e) = &result else { break };
            note_failure(e);
            std::thread::sleep(backoff);
            result = flush_once(&shared.store, delay);
        }
        lock(&shared.state).running -= 1;
        if let Err(e) = &result {
            count(|c| &c.storage_flush_failures);
            error!(error = %e, "storage flush keeps failing; the server will stop");
            fatal.send_replace(Some(e.to_string()));
        }
        for (_, w) in waiters {
            let _ = w.send(result.clone());
        }
    }
}

/// Sleeps until `interval` has passed since the last flush started, unless one document is
/// asking alone (it is not paced). Returns at once when the interval is already out.
fn wait_out_interval(shared: &Shared, interval: Duration) {
    let since = {
        let st = lock(&shared.state);
        st.last_start.filter(|_| !st.solo()).map(|t| t.elapsed())
    };
    if let Some(wait) = since.and_then(|t| interval.checked_sub(t)) {
        std::thread::sleep(wait);
    }
}

fn requester(doc: &str) -> u64 {
    let mut h = DefaultHasher::new();
    doc.hash(&mut h);
    h.finish()
}

impl Flusher {
    /// Starts the flush thread; it ends once every `Flusher` clone is gone. Each document actor
    /// has at most one request outstanding, so the unbounded queue is bounded by the number of
    /// open documents. While several documents ask, flushes start at least `interval` apart.
    /// `delay` (tests) holds every flush back. `fatal` receives the reason when storage cannot
    /// be flushed even after retries.
    pub fn start(
        store: Arc<dyn Store>,
        interval: Duration,
        delay: Duration,
        fatal: watch::Sender<Option<String>>,
    ) -> Flusher {
        let (tx, rx) = mpsc::channel::<Waiter>();
        let shared = Arc::new(Shared {
            store,
            inline: delay.is_zero(),
            queued: AtomicUsize::new(0),
            state: Mutex::new(State::default()),
        });
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("collab-flush".into())
            .spawn(move || run(rx, thread_shared, interval, delay, fatal))
            .expect("spawn the flush thread");
        Flusher { tx, shared }
    }

    /// Resolves once everything written before the call is durable. `doc` names who asks;
    /// `may_inline` says its thread is idle enough to run the flush itself.
    pub async fn flush(&self, doc: &str, may_inline: bool) -> Result<(), FlushError> {
        let who = requester(doc);
        if may_inline && self.try_inline(who) {
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        self.shared.queued.fetch_add(1, Ordering::SeqCst);
        if self.tx.send((who, tx)).is_err() {
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(FlushError::Stopped);
        }
        rx.await
            .map_err(|_| FlushError::Stopped)?
            .map_err(FlushError::Store)
    }

    /// Flushes on the caller's thread if `who` is asking alone and nothing else is flushing
    /// or queued; true if that flush succeeded. A failed one leaves the request to the flush
    /// thread, which retries without stalling the caller's thread.
    fn try_inline(&self, who: u64) -> bool {
        if !self.shared.inline {
            return false;
        }
        {
            let mut st = lock(&self.shared.state);
            let alone = st.solo() && st.last_requester == who;
            if !alone || st.running > 0 || self.shared.queued.load(Ordering::SeqCst) > 0 {
                return false;
            }
            st.started(Some(who));
        }
        let result = flush_once(&self.shared.store, Duration::ZERO);
        lock(&self.shared.state).running -= 1;
        match result {
            Ok(()) => true,
            Err(e) => {
                note_failure(&e);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use collab_storage::{Damage, DocMeta, DocStats, StoredDoc, VersionMeta};

    use super::*;

    /// A store whose next `fail` flushes fail, and which notes the thread of every flush;
    /// nothing else is called.
    struct FlakyStore {
        fail: AtomicUsize,
        flushes: AtomicUsize,
        threads: std::sync::Mutex<Vec<String>>,
    }

    impl Store for FlakyStore {
        fn flush(&self) -> Result<(), StoreError> {
            self.flushes.fetch_add(1, Ordering::SeqCst);
            let thread = std::thread::current().name().unwrap_or("").to_owned();
            self.threads.lock().unwrap().push(thread);
            let failing = self
                .fail
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
            if failing.is_ok() {
                return Err(StoreError::Corrupt {
                    doc: String::new(),
                    what: "injected".into(),
                });
            }
            Ok(())
        }
        fn load(&self, _: &str) -> Result<StoredDoc, StoreError> {
            unimplemented!()
        }
        fn append(&self, _: &str, _: u64, _: &[u8]) -> Result<(), StoreError> {
            unimplemented!()
        }
        fn compact(&self, _: &str, _: &[u8], _: u64) -> Result<(), StoreError> {
            unimplemented!()
        }
        fn list(&self) -> Result<Vec<String>, StoreError> {
            unimplemented!()
        }
        fn meta(&self, _: &str) -> Result<Option<DocMeta>, StoreError> {
            unimplemented!()
        }
        fn delete(&self, _: &str) -> Result<bool, StoreError> {
            unimplemented!()
        }
        fn stats(&self, _: &str) -> Result<Option<DocStats>, StoreError> {
            unimplemented!()
        }
        fn put_version(&self, _: &str, _: &str, _: &[u8]) -> Result<VersionMeta, StoreError> {
            unimplemented!()
        }
        fn versions(&self, _: &str) -> Result<Vec<VersionMeta>, StoreError> {
            unimplemented!()
        }
        fn version(&self, _: &str, _: u64) -> Result<Option<(VersionMeta, Vec<u8>)>, StoreError> {
            unimplemented!()
        }
        fn check(&self) -> Result<Vec<Damage>, StoreError> {
            unimplemented!()
        }
    }

    fn start_paced(
        failures: usize,
        interval: Duration,
        delay: Duration,
    ) -> (Flusher, Arc<FlakyStore>, watch::Receiver<Option<String>>) {
        let store = Arc::new(FlakyStore {
            fail: AtomicUsize::new(failures),
            flushes: AtomicUsize::new(0),
            threads: std::sync::Mutex::new(Vec::new()),
        });
        let (fatal, fatal_rx) = watch::channel(None);
        let f = Flusher::start(store.clone(), interval, delay, fatal);
        (f, store, fatal_rx)
    }

    fn start(failures: usize) -> (Flusher, Arc<FlakyStore>, watch::Receiver<Option<String>>) {
        start_paced(failures, Duration::ZERO, Duration::ZERO)
    }

    /// Requests from `docs`, `gap` apart; resolves when every one was answered.
    async fn requests(f: &Flusher, docs: &[&str], gap: Duration) {
        let mut tasks = Vec::new();
        for doc in docs {
            let (f, doc) = (f.clone(), doc.to_string());
            tasks.push(tokio::spawn(async move { f.flush(&doc, true).await }));
            tokio::time::sleep(gap).await;
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
    }

    #[tokio::test]
    async fn while_several_documents_ask_flushes_wait_out_the_interval() {
        let interval = Duration::from_millis(300);
        // Each flush takes 50 ms, so requests made during one queue for the next.
        let (f, store, _) = start_paced(0, interval, Duration::from_millis(50));
        let flushes = || store.flushes.load(Ordering::SeqCst);

        // a, then b and c during a's flush: with several documents asking, they share the
        // next flush, which waits out the interval after a's.
        let t = Instant::now();
        requests(&f, &["a", "b", "c"], Duration::from_millis(10)).await;
        assert_eq!(flushes(), 2, "b and c share one flush");
        assert!(t.elapsed() >= interval, "it waited out the interval");

        // After a quiet spell a request is flushed at once.
        tokio::time::sleep(interval).await;
        let t = Instant::now();
        requests(&f, &["g"], Duration::ZERO).await;
        assert!(t.elapsed() < interval / 2, "no wait: {:?}", t.elapsed());

        // Once one document has asked alone SOLO_AFTER times, it is not held back.
        for _ in 1..SOLO_AFTER {
            requests(&f, &["g"], Duration::ZERO).await;
        }
        let t = Instant::now();
        requests(&f, &["g"], Duration::ZERO).await;
        assert!(t.elapsed() < interval / 2, "no wait: {:?}", t.elapsed());
        assert_eq!(flushes(), 2 + SOLO_AFTER as usize + 1);
    }

    #[tokio::test]
    async fn a_busy_flush_thread_sleeps_out_the_interval_instead_of_being_woken() {
        let interval = Duration::from_millis(300);
        let (f, store, _) = start_paced(0, interval, Duration::from_millis(50));
        let woken = || lock(&f.shared.state).woken;

        // a alone, then b and c together: the second flush carried several documents.
        requests(&f, &["a", "b", "c"], Duration::from_millis(10)).await;
        assert_eq!(store.flushes.load(Ordering::SeqCst), 2);
        let before = woken();
        // d and e ask during the interval after it: the thread, asleep until the interval is
        // out, finds them queued, and no request had to wake it.
        let t = Instant::now();
        requests(&f, &["d", "e"], Duration::from_millis(10)).await;
        assert_eq!(
            store.flushes.load(Ordering::SeqCst),
            3,
            "d and e share one flush"
        );
        assert_eq!(woken(), before, "a request woke the flush thread");
        assert!(t.elapsed() >= interval / 2, "it waited out the interval");

        // Once the requests stop, it waits for the next one, which is flushed at once.
        tokio::time::sleep(interval * 2).await;
        let t = Instant::now();
        requests(&f, &["g"], Duration::ZERO).await;
        assert!(t.elapsed() < interval / 2, "no wait: {:?}", t.elapsed());
        assert_eq!(woken(), before + 1);
    }

    #[tokio::test]
    async fn a_document_asking_alone_flushes_on_its_own_thread_and_falls_back_on_failure() {
        let (f, store, fatal) = start(0);
        let last_thread = || store.threads.lock().unwrap().last().cloned().unwrap();
        for _ in 0..SOLO_AFTER {
            f.flush("solo", true).await.unwrap();
            assert_eq!(last_thread(), "collab-flush");
        }
        f.flush("solo", true).await.unwrap();
        assert_ne!(last_thread(), "collab-flush", "flushed inline");
        // Not when the caller's thread is busy.
        f.flush("solo", false).await.unwrap();
        assert_eq!(last_thread(), "collab-flush");
        f.flush("solo", true).await.unwrap();
        assert_ne!(last_thread(), "collab-flush", "flushed inline again");

        // A failed inline flush goes to the flush thread, which retries it.
        store.fail.store(1, Ordering::SeqCst);
        let before = store.flushes.load(Ordering::SeqCst);
        f.flush("solo", true).await.unwrap();
        assert_eq!(store.flushes.load(Ordering::SeqCst), before + 2);
        assert_eq!(last_thread(), "collab-flush");
        assert!(fatal.borrow().is_none());

        // Another document asking ends it: both go through the flush thread.
        f.flush("other", true).await.unwrap();
        assert_eq!(last_thread(), "collab-flush");
        f.flush("solo", true).await.unwrap();
        assert_eq!(last_thread(), "collab-flush");
    }

    #[tokio::test]
    async fn a_transient_failure_is_retried_and_not_fatal() {
        let (f, store, fatal) = start(2);
        f.flush("d", true).await.expect("third attempt succeeds");
        assert_eq!(store.flushes.load(Ordering::SeqCst), 3);
        assert!(fatal.borrow().is_none());
        f.flush("d", true).await.expect("later flushes succeed");
    }

    #[tokio::test]
    async fn a_lasting_failure_reaches_every_waiter_and_stops_the_server() {
        let (f, store, fatal) = start(usize::MAX);
        let (a, b) = tokio::join!(f.flush("a", true), f.flush("b", true));
        assert!(matches!(a, Err(FlushError::Store(_))));
        assert!(matches!(b, Err(FlushError::Store(_))));
        // One try and three retries per flush.
        assert!(store.flushes.load(Ordering::SeqCst) >= 4);
        assert!(fatal.borrow().is_some());
    }
}
