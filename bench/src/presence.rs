//! Presence: N clients in one document, each renewing its awareness state (a moving cursor)
//! every interval. Every client should receive every other client's renewals; measures the share
//! delivered, their latency and the server's CPU (cores busy) while it fans them out.

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

use crate::client::{self, SplitMix, Trouble};
use crate::proto::{self, Framing, Msg};
use crate::server::{self, Server};
use crate::stats::{round, summary_ms};

#[derive(Args, Debug, Clone)]
pub struct PresenceArgs {
    /// Clients in the document; each one both announces and receives.
    #[arg(long, default_value_t = 500)]
    pub clients: usize,
    /// Seconds between two awareness updates of one client.
    #[arg(long, default_value_t = 1.0)]
    pub interval: f64,
    /// Seconds of updates before the measured window.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Seconds of the measured window.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds to wait after the last update for outstanding deliveries.
    #[arg(long, default_value_t = 2.0)]
    pub drain: f64,
    #[arg(long, default_value = "bench-presence")]
    pub doc: String,
    #[arg(long, default_value_t = 32)]
    pub connect_concurrency: usize,
    #[arg(long, default_value_t = 3)]
    pub seed: u64,
}

struct Shared {
    base: Instant,
    index: HashMap<u64, usize>,
    /// Per client, per awareness clock: send time in µs since `base`, plus one (0 = not sent).
    sent_us: Vec<Vec<AtomicU64>>,
    trouble: Trouble,
    closing: AtomicBool,
}

impl Shared {
    fn now_us(&self) -> u64 {
        self.base.elapsed().as_micros() as u64
    }
}

#[derive(Default)]
struct Out {
    /// (sender, clock, latency µs) of other clients' updates.
    receipts: Vec<(u32, u32, u32)>,
    duplicates: u64,
    echoes: u64,
}

#[allow(clippy::too_many_arguments)]
async fn client_task(
    idx: usize,
    id: u64,
    s: client::Synced,
    fr: Framing,
    shared: Arc<Shared>,
    first_tick: tokio::time::Instant,
    period: Duration,
    end: tokio::time::Instant,
    mut stop: watch::Receiver<bool>,
) -> (client::Sink, Out) {
    let (mut sink, mut stream) = (s.sink, s.stream);
    let mut out = Out::default();
    let cap = shared.sent_us[idx].len();
    let mut seen = vec![0u64; (shared.sent_us.len() * cap).div_ceil(64)];
    let mut ticker = tokio::time::interval_at(first_tick, period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Clock 1 went with the handshake.
    let mut clock = 2usize;
    let mut writing = true;
    loop {
        let m = tokio::select! {
            biased;
            _ = stop.changed() => break,
            _ = ticker.tick(), if writing => {
                if tokio::time::Instant::now() >= end || clock >= cap {
                    writing = false;
                    continue;
                }
                let state = format!(
                    r##"{{"user":{{"name":"bench-{idx}","color":"#30bced"}},"cursor":{{"anchor":{clock},"head":{clock}}}}}"##
                );
                let msg = fr.frame(&proto::awareness_message(id, clock as u64, &state));
                shared.sent_us[idx][clock].store(shared.now_us() + 1, Ordering::Release);
                if let Err(e) = sink.send(Message::binary(msg)).await {
                    shared.trouble.note(format!("client {idx} send failed: {e}"));
                    writing = false;
                }
                clock += 1;
                continue;
            }
            m = stream.next() => m,
        };
        let frame = match m {
            Some(Ok(Message::Binary(b))) => b,
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None
                if shared.closing.load(Ordering::Relaxed) =>
            {
                break
            }
            Some(Ok(_)) => continue,
            other => {
                shared.trouble.disconnects.fetch_add(1, Ordering::Relaxed);
                shared.trouble.note(format!("connection ended: {other:?}"));
                break;
            }
        };
        let now = shared.now_us();
        let mut bad = false;
        let ok = fr.messages(&frame, |m| {
            let Msg::Awareness(u) = m else { return };
            bad |= !proto::awareness_entries(u, |client, k| {
                let Some(&from) = shared.index.get(&client) else {
                    return;
                };
                if from == idx {
                    out.echoes += 1;
                    return;
                }
                let Some(sent) = shared.sent_us[from].get(k as usize) else {
                    return;
                };
                let sent = sent.load(Ordering::Acquire);
                if sent == 0 {
                    return; // the handshake state, or a full-state answer
                }
                let bit = from * cap + k as usize;
                if seen[bit / 64] & (1 << (bit % 64)) != 0 {
                    out.duplicates += 1;
                    return;
                }
                seen[bit / 64] |= 1 << (bit % 64);
                out.receipts
                    .push((from as u32, k as u32, now.saturating_sub(sent - 1) as u32));
            });
        });
        if bad || !ok {
            shared
                .trouble
                .unparsed_frames
                .fetch_add(1, Ordering::Relaxed);
        }
    }
    (sink, out)
}

pub async fn run(
    a: &PresenceArgs,
    server: &Server,
) -> anyhow::Result<(Value, Vec<(String, String)>)> {
    if a.clients < 2 || a.interval <= 0.0 {
        bail!("--clients must be at least 2 and --interval positive");
    }
    let clk = server.clk_tck();
    let url = server.url(&a.doc);
    let fr = server.framing(&a.doc);
    let mut rng = SplitMix(a.seed);
    let ids: Vec<u64> = (0..a.clients).map(|_| rng.client_id()).collect();
    let cap = ((a.warmup + a.duration) / a.interval).ceil() as usize + 4;
    let shared = Arc::new(Shared {
        base: Instant::now(),
        index: ids.iter().enumerate().map(|(i, id)| (*id, i)).collect(),
        sent_us: (0..a.clients)
            .map(|_| (0..cap).map(|_| AtomicU64::new(0)).collect())
            .collect(),
        trouble: Trouble::default(),
        closing: AtomicBool::new(false),
    });
    let rss_idle = server.rss_kb();
    let t_connect = Instant::now();
    let conns = {
        let (url, fr, ids) = (url.clone(), fr.clone(), ids.clone());
        client::bounded(a.clients, a.connect_concurrency, move |i| {
            let (url, fr) = (url.clone(), fr.clone());
            let aw = proto::awareness_message(
                ids[i],
                1,
                &format!(r##"{{"user":{{"name":"bench-{i}","color":"#30bced"}}}}"##),
            );
            async move { client::connect_synced(&url, &fr, Some(aw), Duration::from_secs(20)).await }
        })
        .await
    };
    let connect_s = t_connect.elapsed().as_secs_f64();
    let period = Duration::from_secs_f64(a.interval);
    let t_start = tokio::time::Instant::now() + Duration::from_millis(300);
    let t_ws = t_start + Duration::from_secs_f64(a.warmup);
    let t_we = t_ws + Duration::from_secs_f64(a.duration);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    for (i, c) in conns.into_iter().enumerate() {
        match c {
            Ok(s) => tasks.push(tokio::spawn(client_task(
                i,
                ids[i],
                s,
                fr.clone(),
                shared.clone(),
                t_start + period.mul_f64(i as f64 / a.clients as f64),
                period,
                t_we,
                stop_rx.clone(),
            ))),
            Err(e) => {
                shared
                    .trouble
                    .connect_errors
                    .fetch_add(1, Ordering::Relaxed);
                shared.trouble.note(format!("{e:#}"));
            }
        }
    }
    let connected = tasks.len();
    let rss_connected = server.rss_kb();
    tokio::time::sleep_until(t_ws).await;
    let ws_us = shared.now_us();
    let cpu0 = server.cpu_seconds();
    let gen0 = server::self_cpu_seconds(clk);
    tokio::time::sleep_until(t_we).await;
    let we_us = shared.now_us();
    let cpu1 = server.cpu_seconds();
    let gen1 = server::self_cpu_seconds(clk);
    let rss_end = server.rss_kb();
    tokio::time::sleep(Duration::from_secs_f64(a.drain)).await;
    shared.closing.store(true, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    let mut outs = Vec::new();
    for t in tasks {
        let (mut sink, o) = t.await?;
        let _ = tokio::time::timeout(Duration::from_millis(200), sink.close()).await;
        outs.push(o);
    }
    let in_window = |from: usize, k: usize| {
        let s = shared.sent_us[from][k].load(Ordering::Relaxed);
        s > ws_us && s - 1 < we_us
    };
    let sent_window: u64 = (0..a.clients)
        .map(|i| (0..cap).filter(|&k| in_window(i, k)).count() as u64)
        .sum();
    let expected = sent_window * (connected.saturating_sub(1)) as u64;
    let mut lat = Vec::new();
    let (mut duplicates, mut echoes) = (0, 0);
    for o in &outs {
        duplicates += o.duplicates;
        echoes += o.echoes;
        for &(from, k, l) in &o.receipts {
            if in_window(from as usize, k as usize) {
                lat.push(f64::from(l) / 1000.0);
            }
        }
    }
    let delivered = lat.len() as u64;
    let window_s = (we_us - ws_us) as f64 / 1e6;
    let cpu_util = match (cpu0, cpu1) {
        (Some(x), Some(y)) => Some(round((y - x) / window_s, 4)),
        _ => None,
    };
    let j = json!({
        "scenario": "presence",
        "clients": a.clients,
        "connected": connected,
        "interval_s": a.interval,
        "warmup_s": a.warmup,
        "window_s": round(window_s, 3),
        "connect_s": round(connect_s, 3),
        "sent_window": sent_window,
        "expected": expected,
        "delivered": delivered,
        "delivered_pct": (expected > 0).then(|| round(100.0 * delivered as f64 / expected as f64, 3)),
        "duplicates": duplicates,
        "echoes": echoes,
        "lat_ms": summary_ms(lat),
        "cpu_util": cpu_util,
        "cpu_pct_one_core": cpu_util.map(|u| round(u * 100.0, 2)),
        "cpu_us_per_delivery": match (cpu0, cpu1) {
            (Some(x), Some(y)) if delivered > 0 => Some(round((y - x) * 1e6 / delivered as f64, 3)),
            _ => None,
        },
        "gen_cpu_util": round((gen1 - gen0) / window_s, 3),
        "rss_kb": {"idle": rss_idle, "connected": rss_connected, "end_of_window": rss_end},
        "trouble": shared.trouble.json(),
    });
    let f = |v: &Value| crate::stats::fmt_opt(v);
    let rows = vec![
        (
            "clients".into(),
            format!("{connected} of {} connected in {connect_s:.2} s", a.clients),
        ),
        (
            "awareness updates in window".into(),
            format!("{sent_window} (one per {} s per client)", a.interval),
        ),
        (
            "deliveries".into(),
            format!(
                "{delivered} of {expected} expected ({} %, {duplicates} duplicates)",
                f(&j["delivered_pct"])
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
            "server CPU".into(),
            format!(
                "{} % of one core ({} µs per delivery)",
                f(&j["cpu_pct_one_core"]),
                f(&j["cpu_us_per_delivery"])
            ),
        ),
        (
            "generator CPU".into(),
            format!("{} cores busy", f(&j["gen_cpu_util"])),
        ),
    ];
    Ok((j, rows))
}
