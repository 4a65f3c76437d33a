//! Memory comes back: the server's RSS after load goes away. Two phases on one server:
//! (1) N idle sockets (N/4 documents × 4, each announcing an awareness state) open, then close;
//! (2) one large document is built, fetched by a few joining clients, then every connection
//! closes and the server unloads it (after its grace period: start collab with a short
//! `--grace-period-secs` to measure the allocator rather than the grace period).
//! After each phase RSS is sampled once a second for `--watch` seconds; reported: the idle
//! level, the peak, RSS 1/10/30/60 s after the close, and the first second at which RSS is
//! within 2x of the idle level.

use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Value};

use crate::client::{self, SplitMix};
use crate::join::{self, TraceArgs};
use crate::server::Server;
use crate::stats::{fmt_opt, round};

#[derive(Args, Debug, Clone)]
pub struct MemoryArgs {
    /// Idle sockets of phase 1 (0 skips it), four per document.
    #[arg(long, default_value_t = 20_000)]
    pub sockets: usize,
    /// The document of phase 2 (`--ops 0` skips it): 20.7 M words of 1–8 characters encode to
    /// about 112 MB.
    #[command(flatten)]
    pub trace: TraceArgs,
    /// Clients that fetch the whole document once it is built (as joining browsers would).
    #[arg(long, default_value_t = 4)]
    pub joiners: usize,
    /// Seconds of RSS samples after each close.
    #[arg(long, default_value_t = 60)]
    pub watch: u64,
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
}

/// RSS once a second for `secs` seconds, starting now.
async fn watch(server: &Server, secs: u64) -> Vec<u64> {
    let t0 = tokio::time::Instant::now();
    let mut out = Vec::new();
    for s in 0..=secs {
        tokio::time::sleep_until(t0 + Duration::from_secs(s)).await;
        out.push(server.rss_kb().unwrap_or(0));
    }
    out
}

/// The figures of one phase: peak under load and how RSS came down after the close.
fn phase_json(idle: u64, loaded: u64, series: &[u64]) -> Value {
    let at = |s: usize| series.get(s).copied();
    let back = series.iter().position(|&r| r <= 2 * idle);
    json!({
        "rss_kb_loaded": loaded,
        "rss_kb_after_close": {"1s": at(1), "10s": at(10), "30s": at(30), "60s": at(60),
                               "last": series.last()},
        "ratio_to_idle_last": series.last().map(|&l| round(l as f64 / idle.max(1) as f64, 2)),
        "seconds_to_2x_idle": back,
        "series_kb": series,
    })
}

fn phase_row(what: &str, j: &Value) -> (String, String) {
    let a = &j["rss_kb_after_close"];
    (
        what.into(),
        format!(
            "{} loaded → {} / {} / {} / {} KiB at 1/10/30/60 s ({}× idle at the end; ≤ 2× idle after {} s)",
            j["rss_kb_loaded"],
            fmt_opt(&a["1s"]),
            fmt_opt(&a["10s"]),
            fmt_opt(&a["30s"]),
            fmt_opt(&a["60s"]),
            fmt_opt(&j["ratio_to_idle_last"]),
            fmt_opt(&j["seconds_to_2x_idle"]),
        ),
    )
}

pub async fn run(
    a: &MemoryArgs,
    server: &Server,
) -> anyhow::Result<(Value, Vec<(String, String)>)> {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = server.rss_kb().unwrap_or(0);
    let mut rows = vec![("server RSS idle".to_string(), format!("{idle} KiB"))];
    let mut j = json!({"scenario": "memory", "rss_kb_idle": idle, "sockets": a.sockets,
                       "ops": a.trace.ops, "joiners": a.joiners, "watch_s": a.watch});

    if a.sockets > 0 {
        let per_doc = 4;
        let mut rng = SplitMix(3);
        let ids: Vec<u64> = (0..a.sockets).map(|_| rng.client_id()).collect();
        let t0 = Instant::now();
        let base = server.base_url.clone();
        let protocol = server.protocol;
        let conns = client::bounded(a.sockets, a.connect_concurrency, move |i| {
            let name = format!("bench-mem-{}", i / per_doc);
            let url = protocol.doc_url(&base, &name);
            let fr = crate::proto::Framing::new(protocol, &name);
            let aw = crate::proto::awareness_message(
                ids[i],
                1,
                &format!(r##"{{"user":{{"name":"bench-{i}","color":"#30bced"}}}}"##),
            );
            async move { client::connect_synced(&url, &fr, Some(aw), Duration::from_secs(30)).await }
        })
        .await;
        let connect_s = t0.elapsed().as_secs_f64();
        let (ok, errors): (Vec<_>, Vec<_>) = conns.into_iter().partition(Result::is_ok);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let loaded = server.rss_kb().unwrap_or(0);
        futures_util::future::join_all(ok.into_iter().map(|s| {
            let s = s.expect("partitioned");
            client::close_gracefully(s.sink, s.stream)
        }))
        .await;
        let series = watch(server, a.watch).await;
        let p = phase_json(idle, loaded, &series);
        rows.push(phase_row(
            &format!("{} idle sockets ({} failed)", a.sockets, errors.len()),
            &p,
        ));
        j["sockets_phase"] = p;
        j["sockets_phase"]["connected"] = json!(a.sockets - errors.len());
        j["sockets_phase"]["connect_s"] = json!(round(connect_s, 2));
    }

    if a.trace.ops > 0 {
        let doc = "bench-mem-large";
        let url = server.url(doc);
        let fr = server.framing(doc);
        let built = join::build(&url, &fr, a.trace.generator(), a.trace.ops, a.trace.batch).await?;
        let mut joined = Vec::new();
        let mut doc_bytes = 0;
        for _ in 0..a.joiners {
            let s = client::connect_synced(&url, &fr, None, Duration::from_secs(120)).await?;
            doc_bytes = s.step2_bytes;
            joined.push(s);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let loaded = server.rss_kb().unwrap_or(0);
        client::close_gracefully(built.sink, built.stream).await;
        for s in joined {
            client::close_gracefully(s.sink, s.stream).await;
        }
        let series = watch(server, a.watch).await;
        let p = phase_json(idle, loaded, &series);
        rows.push((
            "document".into(),
            format!(
                "{} ops, {doc_bytes} bytes encoded, built in {:.1} s",
                a.trace.ops, built.build_s
            ),
        ));
        rows.push(phase_row("document closed", &p));
        j["document_phase"] = p;
        j["document_phase"]["doc_bytes"] = json!(doc_bytes);
        j["document_phase"]["build_s"] = json!(round(built.build_s, 2));
    }
    Ok((j, rows))
}
