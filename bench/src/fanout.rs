//! Fan-out: W writers each type R single characters per second into one Y.Text; N readers (and
//! the writers themselves) receive every update. Measures propagation latency (writer send →
//! receiver frame read), deliveries against expectation, and the server's CPU per delivery.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use yrs::{Doc, Text, Transact};

use crate::client::{self, SplitMix, Trouble};
use crate::cluster::Cluster;
use crate::proto::{self, Msg};
use crate::server;
use crate::stats::{round, summary_ms};

#[derive(Args, Debug, Clone)]
pub struct FanoutArgs {
    /// Connections that only read.
    #[arg(long, default_value_t = 200)]
    pub readers: usize,
    /// Connections that write (they also read everybody else's edits).
    #[arg(long, default_value_t = 1)]
    pub writers: usize,
    /// Edits per second of each writer.
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// Seconds of writing before the measured window.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Seconds of the measured window.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds to wait after the last edit for outstanding deliveries.
    #[arg(long, default_value_t = 3.0)]
    pub drain: f64,
    /// Document name.
    #[arg(long, default_value = "bench-fanout")]
    pub doc: String,
    /// Connections opened at once while setting up.
    #[arg(long, default_value_t = 32)]
    pub connect_concurrency: usize,
    /// Seed of the client ids.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// One received edit.
#[derive(Clone, Copy)]
struct Receipt {
    writer: u16,
    seq: u32,
    recv_us: u32,
    lat_us: u32,
}

struct Shared {
    base: Instant,
    writer_index: HashMap<u64, usize>,
    /// Per writer, per sequence number: send time in µs since `base`, plus one (0 = not sent).
    sent_us: Vec<Vec<AtomicU64>>,
    received: AtomicU64,
    trouble: Trouble,
    /// Set when the generator starts closing: a close from now on is expected.
    closing: AtomicBool,
    framing: proto::Framing,
}

impl Shared {
    fn now_us(&self) -> u64 {
        self.base.elapsed().as_micros() as u64
    }
}

#[derive(Default)]
struct ReaderOut {
    receipts: Vec<Receipt>,
    echoes: Vec<Receipt>,
    duplicates: u64,
    unknown: u64,
}

async fn reader_loop(
    mut stream: client::Stream,
    shared: Arc<Shared>,
    own: Option<usize>,
    mut stop: watch::Receiver<bool>,
) -> ReaderOut {
    let mut out = ReaderOut::default();
    let cap = shared.sent_us.first().map_or(0, |v| v.len());
    let mut seen: Vec<Vec<u64>> = vec![vec![0u64; cap / 64 + 1]; shared.sent_us.len()];
    loop {
        let msg = tokio::select! {
            biased;
            _ = stop.changed() => break,
            m = stream.next() => m,
        };
        let frame = match msg {
            Some(Ok(Message::Binary(b))) => b,
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None
                if shared.closing.load(Ordering::Relaxed) =>
            {
                break
            }
            Some(Ok(Message::Close(c))) => {
                shared.trouble.disconnects.fetch_add(1, Ordering::Relaxed);
                shared
                    .trouble
                    .note(format!("server closed a connection: {c:?}"));
                break;
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                shared.trouble.disconnects.fetch_add(1, Ordering::Relaxed);
                shared.trouble.note(format!("connection error: {e}"));
                break;
            }
            None => {
                shared.trouble.disconnects.fetch_add(1, Ordering::Relaxed);
                shared
                    .trouble
                    .note("connection ended without a close frame".into());
                break;
            }
        };
        let now = shared.now_us();
        let mut bad = false;
        let ok = shared.framing.messages(&frame, |m| {
            if let Msg::Update(u) = m {
                let parsed = proto::update_ranges(u, |client, clock, len| {
                    let Some(&w) = shared.writer_index.get(&client) else {
                        out.unknown += len;
                        return;
                    };
                    for seq in clock..clock + len {
                        let Some(sent) = shared.sent_us[w].get(seq as usize) else {
                            out.unknown += 1;
                            continue;
                        };
                        let sent = sent.load(Ordering::Acquire);
                        if sent == 0 {
                            out.unknown += 1;
                            continue;
                        }
                        let bits = &mut seen[w][seq as usize / 64];
                        let bit = 1u64 << (seq % 64);
                        if *bits & bit != 0 {
                            out.duplicates += 1;
                            continue;
                        }
                        *bits |= bit;
                        let r = Receipt {
                            writer: w as u16,
                            seq: seq as u32,
                            recv_us: now as u32,
                            lat_us: now.saturating_sub(sent - 1) as u32,
                        };
                        if own == Some(w) {
                            out.echoes.push(r);
                        } else {
                            out.receipts.push(r);
                            shared.received.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
                bad |= !parsed;
            }
        });
        if bad || !ok {
            shared
                .trouble
                .unparsed_frames
                .fetch_add(1, Ordering::Relaxed);
        }
    }
    out
}

async fn writer_loop(
    idx: usize,
    client_id: u64,
    mut sink: client::Sink,
    shared: Arc<Shared>,
    first_tick: tokio::time::Instant,
    period: Duration,
    end: tokio::time::Instant,
) -> (client::Sink, u64) {
    let doc = Doc::with_client_id(client_id);
    let text = doc.get_or_insert_text("t");
    let mut ticker = tokio::time::interval_at(first_tick, period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let letters = b"abcdefghijklmnopqrstuvwxyz";
    let mut seq: u64 = 0;
    loop {
        ticker.tick().await;
        if tokio::time::Instant::now() >= end || seq as usize >= shared.sent_us[idx].len() {
            break;
        }
        let update = {
            let mut txn = doc.transact_mut();
            let len = text.len(&txn);
            let c = letters[(seq % 26) as usize] as char;
            text.insert(&mut txn, len, c.encode_utf8(&mut [0u8; 4]));
            txn.encode_update_v1()
        };
        let msg = shared.framing.frame(&proto::update_message(&update));
        shared.sent_us[idx][seq as usize].store(shared.now_us() + 1, Ordering::Release);
        if let Err(e) = sink.send(Message::binary(msg)).await {
            shared
                .trouble
                .note(format!("writer {idx} send failed: {e}"));
            break;
        }
        seq += 1;
    }
    (sink, seq)
}

/// Against a cluster, reader r connects to instance r mod N and writer w to w mod N, so with one
/// writer a reader on another instance sees an edit only through the shared backend.
pub async fn run(
    a: &FanoutArgs,
    server: &Cluster,
) -> anyhow::Result<(Value, Vec<(String, String)>)> {
    if a.writers == 0 || a.writers > 1000 {
        bail!("--writers must be in 1..=1000");
    }
    let clk = server.clk_tck();
    let instances = server.len();
    let instance_of = |conn: usize| conn.checked_sub(a.readers).unwrap_or(conn) % instances;
    let urls: Vec<String> = (0..instances).map(|k| server.url(k, &a.doc)).collect();
    let base = Instant::now();
    let rss_idle = server.rss_kb();
    let total = a.warmup + a.duration;
    let cap = (a.rate * (total + 1.0)).ceil() as usize + 16;
    let mut rng = SplitMix(a.seed);
    let ids: Vec<u64> = (0..a.writers).map(|_| rng.client_id()).collect();
    let shared = Arc::new(Shared {
        base,
        writer_index: ids.iter().enumerate().map(|(i, id)| (*id, i)).collect(),
        sent_us: (0..a.writers)
            .map(|_| (0..cap).map(|_| AtomicU64::new(0)).collect())
            .collect(),
        received: AtomicU64::new(0),
        trouble: Trouble::default(),
        closing: AtomicBool::new(false),
        framing: server.framing(&a.doc),
    });

    // Connect everybody: readers first, then writers.
    let t_connect = Instant::now();
    let n = a.readers + a.writers;
    let conns = {
        let urls = urls.clone();
        let fr = shared.framing.clone();
        client::bounded(n, a.connect_concurrency, move |i| {
            let url = urls[instance_of(i)].clone();
            let fr = fr.clone();
            async move { client::connect_synced(&url, &fr, None, Duration::from_secs(15)).await }
        })
        .await
    };
    let connect_s = t_connect.elapsed().as_secs_f64();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut reader_tasks = Vec::new();
    let mut writer_sinks = Vec::new();
    let mut reader_sinks = Vec::new();
    let mut readers_ok = 0usize;
    for (i, c) in conns.into_iter().enumerate() {
        let is_writer = i >= a.readers;
        match c {
            Ok(s) => {
                let own = is_writer.then(|| i - a.readers);
                let task = reader_loop(s.stream, shared.clone(), own, stop_rx.clone());
                reader_tasks.push((instance_of(i), tokio::spawn(task)));
                if is_writer {
                    writer_sinks.push((i - a.readers, s.sink));
                } else {
                    readers_ok += 1;
                    reader_sinks.push(s.sink);
                }
            }
            Err(e) => {
                shared
                    .trouble
                    .connect_errors
                    .fetch_add(1, Ordering::Relaxed);
                shared.trouble.note(format!("{e:#}"));
            }
        }
    }
    if writer_sinks.len() != a.writers {
        bail!("not all writers connected: {:?}", shared.trouble.examples());
    }
    let rss_connected = server.rss_kb();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Write: warm-up, then the measured window.
    let period = Duration::from_secs_f64(1.0 / a.rate);
    let t_start = tokio::time::Instant::now() + Duration::from_millis(100);
    let t_ws = t_start + Duration::from_secs_f64(a.warmup);
    let t_we = t_ws + Duration::from_secs_f64(a.duration);
    let mut writer_tasks = Vec::new();
    for (w, sink) in writer_sinks {
        let stagger = period.mul_f64(w as f64 / a.writers as f64);
        writer_tasks.push(tokio::spawn(writer_loop(
            w,
            ids[w],
            sink,
            shared.clone(),
            t_start + stagger,
            period,
            t_we,
        )));
    }
    tokio::time::sleep_until(t_ws).await;
    let ws_us = shared.now_us();
    let cpu0 = server.cpu_seconds();
    let redis0 = server.redis_cpu_seconds();
    let gen0 = server::self_cpu_seconds(clk);
    tokio::time::sleep_until(t_we).await;
    let we_us = shared.now_us();
    let cpu1 = server.cpu_seconds();
    let redis1 = server.redis_cpu_seconds();
    let gen1 = server::self_cpu_seconds(clk);
    let rss_loaded = server.rss_kb();
    let mut sent_total = 0u64;
    let mut sent_per_writer = Vec::new();
    let mut kept_writer_sinks = Vec::new();
    for t in writer_tasks {
        let (sink, sent) = t.await?;
        sent_total += sent;
        sent_per_writer.push(sent);
        kept_writer_sinks.push(sink);
    }
    let receivers = (readers_ok + a.writers - 1) as u64;
    let expected_all = sent_total * receivers;
    let drain_deadline = Instant::now() + Duration::from_secs_f64(a.drain);
    while shared.received.load(Ordering::Relaxed) < expected_all && Instant::now() < drain_deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // While everybody is still connected: an in-memory server (hocuspocus) drops a document
    // once its last connection closes.
    let convergence =
        crate::converge::check_all(&urls, &shared.framing, &ids, &sent_per_writer).await;
    // Close every connection cleanly; the read loops end on the server's close answer.
    shared.closing.store(true, Ordering::Relaxed);
    let mut sinks: Vec<client::Sink> = kept_writer_sinks.into_iter().chain(reader_sinks).collect();
    let _ = tokio::time::timeout(
        Duration::from_secs(3),
        futures_util::future::join_all(sinks.iter_mut().map(|s| s.close())),
    )
    .await;
    let close_deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut outs = Vec::new();
    for (k, mut t) in reader_tasks {
        match tokio::time::timeout_at(close_deadline, &mut t).await {
            Ok(r) => outs.push((k, r?)),
            Err(_) => {
                let _ = stop_tx.send(true);
                outs.push((k, t.await?));
            }
        }
    }
    drop(sinks);

    // Window sequence numbers of each writer: sent in [ws_us, we_us).
    let window: Vec<(u32, u32)> = shared
        .sent_us
        .iter()
        .map(|v| {
            let t = |s: &AtomicU64| s.load(Ordering::Relaxed);
            let lo = v
                .iter()
                .position(|s| t(s) == 0 || t(s) > ws_us)
                .unwrap_or(v.len());
            let hi = v
                .iter()
                .position(|s| t(s) == 0 || t(s) > we_us)
                .unwrap_or(v.len());
            (lo as u32, hi.max(lo) as u32)
        })
        .collect();
    let in_window = |r: &Receipt| {
        let (lo, hi) = window[r.writer as usize];
        r.seq >= lo && r.seq < hi
    };
    let sent_window: u64 = window.iter().map(|(lo, hi)| u64::from(hi - lo)).sum();
    let expected = sent_window * receivers;
    let mut lat = Vec::new();
    // Readers on another instance than the writer's: what crossing the shared backend costs.
    let mut lat_remote = Vec::new();
    let mut ack = Vec::new();
    let mut deliveries_in_window = 0u64;
    let mut duplicates = 0;
    let mut unknown = 0;
    for (k, o) in &outs {
        duplicates += o.duplicates;
        unknown += o.unknown;
        for r in &o.receipts {
            if in_window(r) {
                lat.push(f64::from(r.lat_us) / 1000.0);
                if *k != r.writer as usize % instances {
                    lat_remote.push(f64::from(r.lat_us) / 1000.0);
                }
            }
            if u64::from(r.recv_us) >= ws_us && u64::from(r.recv_us) < we_us {
                deliveries_in_window += 1;
            }
        }
        for r in o.echoes.iter().filter(|r| in_window(r)) {
            ack.push(f64::from(r.lat_us) / 1000.0);
        }
    }
    let delivered = lat.len() as u64;
    let echoes = ack.len() as u64;
    let cpu_s = match (cpu0, cpu1) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let redis_s = redis0.zip(redis1).map(|(a, b)| b - a);
    let per_delivery = |c: f64| round(c * 1e6 / deliveries_in_window as f64, 3);
    let cpu_per = cpu_s.filter(|_| deliveries_in_window > 0).map(per_delivery);
    let window_s = (we_us - ws_us) as f64 / 1e6;
    let lat_j = summary_ms(lat);
    let remote_j = (instances > 1).then(|| summary_ms(lat_remote));
    let ack_j = summary_ms(ack);
    let j = json!({
        "scenario": "fanout",
        "writers": a.writers,
        "readers": a.readers,
        "readers_connected": readers_ok,
        "rate_per_writer": a.rate,
        "warmup_s": a.warmup,
        "window_s": round(window_s, 3),
        "connect_s": round(connect_s, 3),
        "sent_total": sent_total,
        "sent_window": sent_window,
        "expected": expected,
        "delivered": delivered,
        "missing": expected.saturating_sub(delivered),
        "duplicates": duplicates,
        "unknown_clocks": unknown,
        "echoes": echoes,
        "lat_ms": lat_j,
        "echo_ms": ack_j,
        "deliveries_in_window": deliveries_in_window,
        "cpu_s": cpu_s.map(|c| round(c, 3)),
        "cpu_us_per_delivery": cpu_per,
        "cpu_util": cpu_s.map(|c| round(c / window_s, 3)),
        "instances": instances,
        "lat_remote_ms": remote_j,
        "redis_cpu_s": redis_s.map(|c| round(c, 3)),
        "redis_cpu_us_per_delivery": redis_s.filter(|_| deliveries_in_window > 0).map(per_delivery),
        "gen_cpu_util": round((gen1 - gen0) / window_s, 3),
        "rss_kb": {"idle": rss_idle, "connected": rss_connected, "end_of_window": rss_loaded},
        "convergence": convergence,
        "trouble": shared.trouble.json(),
    });
    let f = |v: &Value| crate::stats::fmt_opt(v);
    let mut rows = vec![
        (
            "connections".into(),
            format!(
                "{} writers + {} readers ({} connected)",
                a.writers, a.readers, readers_ok
            ),
        ),
        (
            "edits in window".into(),
            format!(
                "{sent_window} ({} /s per writer, window {:.1} s)",
                a.rate, window_s
            ),
        ),
        (
            "deliveries".into(),
            format!(
                "{delivered} of {expected} expected ({} duplicates)",
                duplicates
            ),
        ),
        (
            "latency ms p50/p99/max".into(),
            format!(
                "{} / {} / {}",
                f(&j["lat_ms"]["p50"]),
                f(&j["lat_ms"]["p99"]),
                f(&j["lat_ms"]["max"])
            ),
        ),
        (
            "echo to writer ms p50/p99".into(),
            format!("{} / {}", f(&j["echo_ms"]["p50"]), f(&j["echo_ms"]["p99"])),
        ),
        (
            "server CPU".into(),
            format!(
                "{} s in window = {} µs per delivery ({} cores busy)",
                f(&j["cpu_s"]),
                f(&j["cpu_us_per_delivery"]),
                f(&j["cpu_util"])
            ),
        ),
        (
            "convergence (fresh client per instance)".into(),
            match j["convergence"]["converged"].as_bool() {
                Some(true) => format!(
                    "yes: {} characters, every writer's clock matches",
                    j["convergence"]["text_len"]
                ),
                Some(false) => format!(
                    "NO: {} characters of {} sent, {} of {} writers' clocks match",
                    j["convergence"]["text_len"],
                    j["convergence"]["expected_len"],
                    j["convergence"]["writers_matching"],
                    a.writers
                ),
                None => format!("not checked: {}", j["convergence"]["error"]),
            },
        ),
        (
            "generator CPU".into(),
            format!("{} cores busy", f(&j["gen_cpu_util"])),
        ),
        (
            "server RSS KiB idle/connected".into(),
            format!(
                "{} / {}",
                f(&j["rss_kb"]["idle"]),
                f(&j["rss_kb"]["connected"])
            ),
        ),
    ];
    if instances > 1 || redis_s.is_some() {
        rows.push((
            format!("{instances} instances: other-instance p50/p99"),
            format!(
                "{} / {} ms",
                f(&j["lat_remote_ms"]["p50"]),
                f(&j["lat_remote_ms"]["p99"])
            ),
        ));
        rows.push((
            "redis CPU".into(),
            format!(
                "{} s = {} µs per delivery",
                f(&j["redis_cpu_s"]),
                f(&j["redis_cpu_us_per_delivery"])
            ),
        ));
    }
    Ok((j, rows))
}
