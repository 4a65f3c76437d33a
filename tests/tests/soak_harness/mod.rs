//! The crash-safety soak: the real server under continuous edits from several clients, killed
//! with SIGKILL at random moments and restarted on the same data folder, round after round.
//! Shared by the CI test (`tests/soak.rs`) and the long run (`examples/soak.rs`,
//! `scripts/soak.sh`).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use yrs::updates::decoder::Decode;
use yrs::{Doc, IdSet, ReadTxn, StateVector, Transact, Update, ID};

use crate::common::*;

pub struct SoakConfig {
    pub rounds: usize,
    /// Clients per document.
    pub clients: usize,
    pub docs: usize,
    pub server_args: Vec<String>,
    /// Characters inserted into the first document before the first round, to soak a big one.
    pub preload_chars: usize,
    /// How long the clients edit before the kill, picked at random in this range.
    pub edit_ms: (u64, u64),
    pub seed: u64,
    /// Print one line per round.
    pub verbose: bool,
}

#[derive(Debug, Default)]
pub struct SoakReport {
    pub rounds: usize,
    /// Characters any client saw acknowledged (each edit inserts one), summed over documents.
    pub echoed_edits: u64,
    /// Acknowledged characters (or deletions) missing from what a fresh client loaded.
    pub lost_edits: u64,
    pub data_bytes: u64,
    pub max_data_bytes: u64,
    /// Size of the documents as one Yjs v1 update each, summed, at the last round.
    pub encoded_bytes: u64,
    /// Largest data folder size seen over the bound, if any round exceeded it.
    pub over_bound: Option<(usize, u64, u64)>,
}

/// Steady-state disk bound: 4x the encoded documents, plus the fixed cost of an empty store
/// (sled's first segments and the open log segment).
pub fn disk_bound(encoded: u64) -> u64 {
    4 * encoded + 4 * 1024 * 1024
}

pub fn dir_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn doc_name(i: usize) -> String {
    format!("soak-{i}")
}

fn full_update(doc: &Doc) -> Update {
    let bytes = doc
        .transact()
        .encode_state_as_update_v1(&StateVector::default());
    Update::decode_v1(&bytes).unwrap()
}

/// Inserted characters, and deletions, the server sent that `loaded` lacks.
fn missing(seen: &Echoed, loaded: &Doc) -> u64 {
    let loaded = full_update(loaded);
    let (inserted, deleted) = (loaded.insertions(true), loaded.delete_set());
    let mut lost = 0;
    for (have, want) in [(&inserted, &seen.inserted), (deleted, &seen.deleted)] {
        for (client, ranges) in want.iter() {
            for range in ranges.iter() {
                lost += range
                    .clone()
                    .filter(|clock| !have.contains(&ID::new(*client, *clock)))
                    .count() as u64;
            }
        }
    }
    lost
}

/// Characters inserted by the edits any client saw acknowledged.
fn acknowledged(seen: &[&Echoed]) -> u64 {
    let mut all = IdSet::default();
    for e in seen {
        for (client, ranges) in e.inserted.iter() {
            for r in ranges.iter() {
                all.insert(ID::new(*client, r.start), r.end - r.start);
            }
        }
    }
    all.iter()
        .map(|(_, ranges)| {
            ranges
                .iter()
                .map(|r| u64::from(r.end - r.start))
                .sum::<u64>()
        })
        .sum()
}

async fn edit_until(client: Arc<Client>, stop: Arc<AtomicBool>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    while !stop.load(Ordering::Relaxed) && !client.is_closed() {
        let len = client.len();
        if len > 8 && rng.random_bool(0.2) {
            client.remove(rng.random_range(0..len), 1);
        } else {
            let c = char::from(b'a' + rng.random_range(0..26u8));
            client.insert(rng.random_range(0..=len), &c.to_string());
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(1..6))).await;
    }
}

async fn wait_converged(server: &Server, doc: &str, clients: &[Arc<Client>]) -> Client {
    let fresh = synced_client(&server.url(doc)).await;
    let ok = wait_until(Duration::from_secs(30), || {
        let t = fresh.text();
        clients.iter().all(|c| c.text() == t)
    })
    .await;
    if !ok {
        let texts: Vec<usize> = clients.iter().map(|c| c.text().len()).collect();
        panic!(
            "{doc}: clients did not re-converge with the server (fresh {} chars, clients {texts:?})",
            fresh.text().len()
        );
    }
    fresh
}

pub async fn run(cfg: &SoakConfig) -> SoakReport {
    let args: Vec<&str> = cfg.server_args.iter().map(String::as_str).collect();
    let mut server = Server::start(&args);
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut report = SoakReport::default();
    let started = Instant::now();

    if cfg.preload_chars > 0 {
        let c = synced_client(&server.url(&doc_name(0))).await;
        let block: String = (0..cfg.preload_chars)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        c.insert(0, &block);
        c.wait_for("the preload echoed", |c| {
            c.seen.lock().unwrap().updates_received > 0
        })
        .await;
    }

    // Per document: (doc, echoed) of each client, carried across reconnects.
    let states: Vec<Vec<(Doc, Arc<Mutex<Echoed>>)>> = (0..cfg.docs)
        .map(|_| {
            (0..cfg.clients)
                .map(|_| (Doc::new(), Arc::default()))
                .collect()
        })
        .collect();
    let mut clients: Vec<Vec<Arc<Client>>> = Vec::new();
    for (d, docs) in states.iter().enumerate() {
        let mut v = Vec::new();
        for (doc, echoed) in docs {
            let url = server.url(&doc_name(d));
            let c = Client::connect_resuming(&url, doc.clone(), echoed.clone()).await;
            c.wait_synced().await;
            v.push(Arc::new(c));
        }
        clients.push(v);
    }

    for round in 1..=cfg.rounds {
        let stop = Arc::new(AtomicBool::new(false));
        let mut editors = Vec::new();
        for c in clients.iter().flatten() {
            let seed = rng.random();
            editors.push(tokio::spawn(edit_until(c.clone(), stop.clone(), seed)));
        }
        let edit_for = rng.random_range(cfg.edit_ms.0..=cfg.edit_ms.1);
        tokio::time::sleep(Duration::from_millis(edit_for)).await;
        if std::env::var_os("SOAK_GRACEFUL").is_some() {
            server.terminate();
        } else {
            server.kill9();
        }
        stop.store(true, Ordering::Relaxed);
        for e in editors {
            e.await.unwrap();
        }
        // The server is dead: nothing more can be acknowledged, so `echoed` is final.
        server.restart();

        let mut echoed_total = 0;
        let mut encoded = 0;
        for (d, docs) in states.iter().enumerate() {
            let fresh = synced_client(&server.url(&doc_name(d))).await;
            let echoed: Vec<_> = docs.iter().map(|(_, e)| e.lock().unwrap()).collect();
            for e in &echoed {
                let lost = missing(e, &fresh.doc);
                if lost > 0 {
                    eprintln!(
                        "round {round}: {} lost {lost} acknowledged edits",
                        doc_name(d)
                    );
                }
                report.lost_edits += lost;
            }
            echoed_total += acknowledged(&echoed.iter().map(|e| &**e).collect::<Vec<_>>());
            if d == 0 {
                echoed_total -= cfg.preload_chars as u64;
            }
            fresh.close();
        }

        for (d, docs) in states.iter().enumerate() {
            let url = server.url(&doc_name(d));
            let mut v = Vec::new();
            for (doc, echoed) in docs {
                v.push(Arc::new(
                    Client::connect_resuming(&url, doc.clone(), echoed.clone()).await,
                ));
            }
            for c in &v {
                c.wait_synced().await;
            }
            let fresh = wait_converged(&server, &doc_name(d), &v).await;
            encoded += fresh
                .doc
                .transact()
                .encode_state_as_update_v1(&StateVector::default())
                .len() as u64;
            fresh.close();
            clients[d] = v;
        }

        let size = dir_size(&server.db_path());
        report.rounds = round;
        report.echoed_edits = echoed_total;
        report.data_bytes = size;
        report.max_data_bytes = report.max_data_bytes.max(size);
        report.encoded_bytes = encoded;
        if size > disk_bound(encoded) && report.over_bound.is_none() {
            report.over_bound = Some((round, size, disk_bound(encoded)));
        }
        if cfg.verbose {
            println!(
                "round {round:>4}  {:>6.1}s  echoed {echoed_total:>8}  lost {:>4}  data {:>8.2} MB (log {:>5.2})  encoded {:>8.2} MB",
                started.elapsed().as_secs_f64(),
                report.lost_edits,
                size as f64 / 1e6,
                dir_size(&server.db_path().join("wal")) as f64 / 1e6,
                encoded as f64 / 1e6,
            );
        }
    }
    for c in clients.iter().flatten() {
        c.close();
    }
    report
}
