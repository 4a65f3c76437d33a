//! Rooms: K documents × C idle clients each. Measures the server's RSS growth per connection and
//! per document once everybody is connected, synced and quiet; then, optionally, the first client
//! of every document types one character per second and the others time its arrival.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, SplitMix, Trouble};
use crate::proto;
use crate::server::{self, Server};
use crate::stats::{round, summary_ms};

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
    /// After the memory measurement, seconds during which the first client of every document
    /// edits (0: stay idle).
    #[arg(long, default_value_t = 0.0)]
    pub edit_seconds: f64,
    /// Edits per second of each document's editing client.
    #[arg(long, default_value_t = 1.0)]
    pub edit_rate: f64,
    #[arg(long, default_value_t = 2)]
    pub seed: u64,
}

/// What the connection tasks share for the edit phase.
struct EditShared {
    base: Instant,
    /// Editing client id → document.
    writer_of: HashMap<u64, usize>,
    /// Per document, per clock: send time in µs since `base`, plus one (0 = not sent).
    sent_us: Vec<Vec<AtomicU64>>,
}

/// One connection's share of the results: latencies (µs) of other clients' edits.
#[derive(Default)]
struct ConnOut {
    lat_us: Vec<u32>,
}

#[allow(clippy::too_many_arguments)]
async fn connection_task(
    s: client::Synced,
    fr: proto::Framing,
    doc: usize,
    writer: Option<u64>,
    edit_start: watch::Receiver<Option<tokio::time::Instant>>,
    mut stop: watch::Receiver<bool>,
    edits: Arc<EditShared>,
    period: Duration,
    stagger: Duration,
    trouble: Arc<Trouble>,
) -> ConnOut {
    let (mut sink, mut stream) = (s.sink, s.stream);
    let mut out = ConnOut::default();
    let mut edit_start = edit_start;
    let mut ticker: Option<tokio::time::Interval> = None;
    let ydoc = writer.map(yrs::Doc::with_client_id);
    let mut seq = 0usize;
    let cap = edits.sent_us.first().map_or(0, Vec::len);
    loop {
        let m = tokio::select! {
            biased;
            _ = stop.changed() => {
                client::close_gracefully(sink, stream).await;
                return out;
            }
            r = edit_start.changed(), if ydoc.is_some() && ticker.is_none() => {
                if r.is_err() {
                    continue;
                }
                let start = *edit_start.borrow();
                if let Some(t0) = start {
                    ticker = Some(tokio::time::interval_at(t0 + stagger, period));
                }
                continue;
            }
            _ = async { ticker.as_mut().expect("guarded").tick().await }, if ticker.is_some() && seq < cap => {
                let d = ydoc.as_ref().expect("writer");
                let update = {
                    use yrs::{Text, Transact};
                    let text = d.get_or_insert_text("t");
                    let mut txn = d.transact_mut();
                    let len = text.len(&txn);
                    text.insert(&mut txn, len, "x");
                    txn.encode_update_v1()
                };
                let now = edits.base.elapsed().as_micros() as u64;
                edits.sent_us[doc][seq].store(now + 1, Ordering::Release);
                seq += 1;
                if let Err(e) = sink.send(Message::binary(fr.frame(&proto::update_message(&update)))).await {
                    trouble.note(format!("room writer send failed: {e}"));
                    ticker = None;
                }
                continue;
            }
            m = stream.next() => m,
        };
        match m {
            Some(Ok(Message::Binary(b))) => {
                let now = edits.base.elapsed().as_micros() as u64;
                fr.messages(&b, |m| {
                    if let proto::Msg::Update(u) = m {
                        proto::update_ranges(u, |client, clock, len| {
                            if Some(client) == writer {
                                return; // own echo
                            }
                            let Some(&d) = edits.writer_of.get(&client) else {
                                return;
                            };
                            for k in clock..clock + len {
                                let sent = edits.sent_us[d]
                                    .get(k as usize)
                                    .map_or(0, |s| s.load(Ordering::Acquire));
                                if sent > 0 {
                                    out.lat_us.push(now.saturating_sub(sent - 1) as u32);
                                }
                            }
                        });
                    }
                });
            }
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
    out
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
    let per_doc = a.per_doc.max(1);
    let mut rng = SplitMix(a.seed);
    let ids: Arc<Vec<u64>> = Arc::new((0..n).map(|_| rng.client_id()).collect());
    let edit_count = if a.edit_seconds > 0.0 && a.edit_rate > 0.0 {
        (a.edit_seconds * a.edit_rate).ceil() as usize
    } else {
        0
    };
    let edits = Arc::new(EditShared {
        base: Instant::now(),
        writer_of: (0..a.docs)
            .filter(|_| edit_count > 0)
            .map(|d| (ids[d * per_doc], d))
            .collect(),
        sent_us: (0..a.docs)
            .map(|_| (0..edit_count).map(|_| AtomicU64::new(0)).collect())
            .collect(),
    });
    let period = Duration::from_secs_f64(1.0 / a.edit_rate.max(0.001));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (edit_tx, edit_rx) = watch::channel(None);
    let t0 = Instant::now();
    let results = {
        let base = server.base_url.clone();
        let protocol = server.protocol;
        let prefix = a.doc_prefix.clone();
        let awareness = !a.no_awareness;
        let trouble = trouble.clone();
        let edits = edits.clone();
        let docs = a.docs.max(1);
        client::bounded(n, a.connect_concurrency, move |i| {
            let name = format!("{prefix}-{}", i / per_doc);
            let url = protocol.doc_url(&base, &name);
            let fr = proto::Framing::new(protocol, &name);
            let aw = awareness.then(|| {
                proto::awareness_message(
                    ids[i],
                    1,
                    &format!(r##"{{"user":{{"name":"bench-{i}","color":"#30bced"}}}}"##),
                )
            });
            let writer = (edit_count > 0 && i % per_doc == 0).then_some(ids[i]);
            let stop = stop_rx.clone();
            let edit_rx = edit_rx.clone();
            let trouble = trouble.clone();
            let edits = edits.clone();
            let doc = i / per_doc;
            let stagger = period.mul_f64(doc as f64 / docs as f64);
            async move {
                let s = client::connect_synced(&url, &fr, aw, Duration::from_secs(15)).await?;
                let sync_time = s.sync_time;
                let task = tokio::spawn(connection_task(
                    s, fr, doc, writer, edit_rx, stop, edits, period, stagger, trouble,
                ));
                anyhow::Ok((task, sync_time))
            }
        })
        .await
    };
    let connect_s = t0.elapsed().as_secs_f64();
    let mut tasks = Vec::new();
    let mut sync_ms = Vec::new();
    // Receivers connected per document, for the expected deliveries of the edit phase.
    let mut receivers = vec![0u64; a.docs];
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok((t, d)) => {
                tasks.push(t);
                sync_ms.push(d.as_secs_f64() * 1000.0);
                if i % per_doc != 0 {
                    receivers[i / per_doc] += 1;
                }
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

    // Edit phase: every document's first client types; the others time the arrivals.
    let mut edit_j = Value::Null;
    let mut edit_cpu = None;
    if edit_count > 0 {
        let start = tokio::time::Instant::now() + Duration::from_millis(100);
        let c0 = server.cpu_seconds();
        let _ = edit_tx.send(Some(start));
        let window = Duration::from_secs_f64(edit_count as f64 / a.edit_rate);
        tokio::time::sleep_until(start + window).await;
        let c1 = server.cpu_seconds();
        edit_cpu = match (c0, c1) {
            (Some(x), Some(y)) => Some(round((y - x) / window.as_secs_f64(), 4)),
            _ => None,
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let rss_edits = server.rss_kb();
    let _ = stop_tx.send(true);
    let mut lat = Vec::new();
    for t in tasks {
        if let Ok(Ok(o)) = tokio::time::timeout(Duration::from_secs(3), t).await {
            lat.extend(o.lat_us.into_iter().map(|u| f64::from(u) / 1000.0));
        }
    }
    if edit_count > 0 {
        let expected: u64 = edits
            .sent_us
            .iter()
            .zip(&receivers)
            .map(|(v, r)| v.iter().filter(|s| s.load(Ordering::Relaxed) > 0).count() as u64 * r)
            .sum();
        let delivered = lat.len() as u64;
        edit_j = json!({
            "seconds": a.edit_seconds,
            "rate_per_doc": a.edit_rate,
            "expected": expected,
            "delivered": delivered,
            "lat_ms": summary_ms(lat),
            "server_cpu_util": edit_cpu,
            "rss_kb_after": rss_edits,
        });
    }
    let delta = match (rss_idle, rss_conn) {
        (Some(a), Some(b)) => Some(b as f64 - a as f64),
        _ => None,
    };
    let per_conn = delta
        .filter(|_| connected > 0)
        .map(|d| round(d / connected as f64, 2));
    let docs_connected = connected.div_ceil(per_doc);
    let per_doc_kb = delta
        .filter(|_| docs_connected > 0)
        .map(|d| round(d / (connected as f64 / per_doc as f64), 2));
    let j = json!({
        "scenario": "rooms",
        "docs": a.docs,
        "per_doc": a.per_doc,
        "awareness": !a.no_awareness,
        "connections": n,
        "connected": connected,
        "connect_s": round(connect_s, 3),
        "connect_rate": (connect_s > 0.0).then(|| round(connected as f64 / connect_s, 1)),
        "sync_ms": crate::stats::summary_ms(sync_ms),
        "rss_kb": {"idle": rss_idle, "connected": rss_conn},
        "rss_delta_kb": delta,
        "rss_kb_per_conn": per_conn,
        "rss_kb_per_doc": per_doc_kb,
        "cpu_s_connecting": match (cpu0, cpu1) { (Some(a), Some(b)) => Some(round(b - a, 3)), _ => None },
        "gen_cpu_s": round(gen1 - gen0, 3),
        "edits": edit_j,
        "trouble": trouble.json(),
    });
    let f = |v: &Value| crate::stats::fmt_opt(v);
    let mut rows = vec![
        (
            "connections".into(),
            format!("{connected} of {n} ({} docs × {})", a.docs, a.per_doc),
        ),
        (
            "connect + sync all".into(),
            format!(
                "{connect_s:.2} s = {} connections/s (p99 one client {} ms)",
                f(&j["connect_rate"]),
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
    if edit_count > 0 {
        let e = &j["edits"];
        rows.push((
            "edits: delivered, latency ms p50/p99/max".into(),
            format!(
                "{} of {}, {} / {} / {} (server {} cores busy)",
                e["delivered"],
                e["expected"],
                f(&e["lat_ms"]["p50"]),
                f(&e["lat_ms"]["p99"]),
                f(&e["lat_ms"]["max"]),
                f(&e["server_cpu_util"])
            ),
        ));
    }
    Ok((j, rows))
}
