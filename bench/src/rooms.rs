//! Rooms: K documents × C idle clients each. Measures the server's RSS growth per connection and
//! per document once everybody is connected, synced and quiet.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, SplitMix, Trouble};
use crate::proto;
use crate::server::{self, Server};
use crate::stats::round;

#[derive(Args, Debug, Clone)]
pub struct RoomsArgs {
    /// Documents (rooms).
    #[arg(long, default_value_t = 500)]
    pub docs: usize,
    /// Idle clients per document.
    #[arg(long, default_value_t = 4)]
    pub per_doc: usize,
    /// Seconds to stay idle after the last client synced, before measuring.
    #[arg(long, default_value_t = 3.0)]
    pub settle: f64,
    /// Clients send no awareness state (by default each announces one, as a browser tab does).
    #[arg(long)]
    pub no_awareness: bool,
    /// Connections opened at once.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
    #[arg(long, default_value = "bench-room")]
    pub doc_prefix: String,
    #[arg(long, default_value_t = 2)]
    pub seed: u64,
}

pub async fn run(a: &RoomsArgs, server: &Server) -> anyhow::Result<(Value, Vec<(String, String)>)> {
    let clk = server.clk_tck();
    let trouble = Arc::new(Trouble::default());
    // A short pause so that the idle figure is not taken mid-start-up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_idle = server.rss_kb();
    let cpu0 = server.cpu_seconds();
    let gen0 = server::self_cpu_seconds(clk);
    let n = a.docs * a.per_doc;
    let mut rng = SplitMix(a.seed);
    let ids: Arc<Vec<u64>> = Arc::new((0..n).map(|_| rng.client_id()).collect());
    let (stop_tx, stop_rx) = watch::channel(false);
    let t0 = Instant::now();
    let results = {
        let base = server.base_url.clone();
        let prefix = a.doc_prefix.clone();
        let per_doc = a.per_doc;
        let awareness = !a.no_awareness;
        let trouble = trouble.clone();
        client::bounded(n, a.connect_concurrency, move |i| {
            let url = format!("{base}/{prefix}-{}", i / per_doc);
            let aw = awareness.then(|| {
                proto::awareness_message(
                    ids[i],
                    1,
                    &format!(r##"{{"user":{{"name":"bench-{i}","color":"#30bced"}}}}"##),
                )
            });
            let stop = stop_rx.clone();
            let trouble = trouble.clone();
            async move {
                let s = client::connect_synced(&url, aw, Duration::from_secs(15)).await?;
                // Stay connected and drain until told to stop.
                let task = tokio::spawn(async move {
                    let (sink, mut stream, mut stop) = (s.sink, s.stream, stop);
                    loop {
                        let m = tokio::select! {
                            biased;
                            _ = stop.changed() => {
                                client::close_gracefully(sink, stream).await;
                                return;
                            }
                            m = stream.next() => m,
                        };
                        match m {
                            Some(Ok(Message::Close(c))) => {
                                trouble.disconnects.fetch_add(1, Ordering::Relaxed);
                                trouble.note(format!("server closed an idle connection: {c:?}"));
                                break;
                            }
                            Some(Ok(_)) => {}
                            Some(Err(e)) => {
                                trouble.disconnects.fetch_add(1, Ordering::Relaxed);
                                trouble.note(format!("idle connection error: {e}"));
                                break;
                            }
                            None => {
                                trouble.disconnects.fetch_add(1, Ordering::Relaxed);
                                trouble.note("idle connection ended".into());
                                break;
                            }
                        }
                    }
                    drop(sink);
                });
                anyhow::Ok((task, s.sync_time))
            }
        })
        .await
    };
    let connect_s = t0.elapsed().as_secs_f64();
    let mut tasks = Vec::new();
    let mut sync_ms = Vec::new();
    for r in results {
        match r {
            Ok((t, d)) => {
                tasks.push(t);
                sync_ms.push(d.as_secs_f64() * 1000.0);
            }
            Err(e) => {
                trouble.connect_errors.fetch_add(1, Ordering::Relaxed);
                trouble.note(format!("{e:#}"));
            }
        }
    }
    let connected = tasks.len();
    let cpu1 = server.cpu_seconds();
    tokio::time::sleep(Duration::from_secs_f64(a.settle)).await;
    // Median of a few samples, a little apart.
    let mut samples = Vec::new();
    for _ in 0..5 {
        if let Some(r) = server.rss_kb() {
            samples.push(r);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    samples.sort();
    let rss_conn = samples.get(samples.len() / 2).copied();
    let gen1 = server::self_cpu_seconds(clk);
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(3), t).await;
    }
    let delta = match (rss_idle, rss_conn) {
        (Some(a), Some(b)) => Some(b as f64 - a as f64),
        _ => None,
    };
    let per_conn = delta
        .filter(|_| connected > 0)
        .map(|d| round(d / connected as f64, 2));
    let docs_connected = connected.div_ceil(a.per_doc.max(1));
    let per_doc = delta
        .filter(|_| docs_connected > 0)
        .map(|d| round(d / (connected as f64 / a.per_doc as f64), 2));
    let j = json!({
        "scenario": "rooms",
        "docs": a.docs,
        "per_doc": a.per_doc,
        "awareness": !a.no_awareness,
        "connections": n,
        "connected": connected,
        "connect_s": round(connect_s, 3),
        "sync_ms": crate::stats::summary_ms(sync_ms),
        "rss_kb": {"idle": rss_idle, "connected": rss_conn},
        "rss_delta_kb": delta,
        "rss_kb_per_conn": per_conn,
        "rss_kb_per_doc": per_doc,
        "cpu_s_connecting": match (cpu0, cpu1) { (Some(a), Some(b)) => Some(round(b - a, 3)), _ => None },
        "gen_cpu_s": round(gen1 - gen0, 3),
        "trouble": trouble.json(),
    });
    let f = |v: &Value| crate::stats::fmt_opt(v);
    let rows = vec![
        (
            "connections".into(),
            format!("{connected} of {n} ({} docs × {})", a.docs, a.per_doc),
        ),
        (
            "connect + sync all".into(),
            format!(
                "{connect_s:.2} s (p99 one client {} ms)",
                f(&j["sync_ms"]["p99"])
            ),
        ),
        (
            "server RSS KiB idle → connected".into(),
            format!(
                "{} → {}",
                f(&j["rss_kb"]["idle"]),
                f(&j["rss_kb"]["connected"])
            ),
        ),
        (
            "RSS per connection / per doc".into(),
            format!(
                "{} KiB / {} KiB",
                f(&j["rss_kb_per_conn"]),
                f(&j["rss_kb_per_doc"])
            ),
        ),
        (
            "server CPU connecting".into(),
            format!("{} s", f(&j["cpu_s_connecting"])),
        ),
    ];
    Ok((j, rows))
}
